"""Synthetic astronomy-like cutouts: generated in memory or written to .npy shards.

Each item is ``{"image": float32 (C, H, W), "label": int, "index": int}``: sky noise
plus one source, a point source (label 0) or an extended one (label 1), with a
colour (flux per band) of its own. Every value is a pure function of the index and a
seed, so any process can compute what an item must hold and check what the cache
returned (``expected``).

``NpyCutouts`` reads the items back from shards on disk and sleeps a fixed time per
read, the latency of opening one file on a network file system, which is what makes
a cache worth having for Hyrax-style datasets of one small file per cutout.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NpyCutouts", "SyntheticCutouts", "cutout", "parse_shape", "write_cutouts"]

_FORMAT = 1


def parse_shape(text: str | tuple[int, ...]) -> tuple[int, int, int]:
    """Read an item shape such as ``"3x64x64"`` (channels, height, width).

    Parameters
    ----------
    text : str or tuple of int
        ``"CxHxW"`` or a 3-tuple.

    Returns
    -------
    tuple of int
        ``(C, H, W)``.

    Raises
    ------
    ValueError
        If it is not three positive integers.
    """
    parts = tuple(text) if isinstance(text, tuple) else tuple(text.lower().split("x"))
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"item shape must be CxHxW with positive sizes, got {text!r}")
    return shape  # type: ignore[return-value]


def cutout(idx: int, shape: tuple[int, int, int] = (3, 64, 64), seed: int = 0) -> dict:
    """Return synthetic item ``idx``.

    Parameters
    ----------
    idx : int
        Item index.
    shape : tuple of int
        ``(C, H, W)``.
    seed : int
        Dataset seed; the same (seed, idx) always gives the same item.

    Returns
    -------
    dict
        ``{"image": float32 array of shape, "label": 0 or 1, "index": idx}``.
    """
    rng = np.random.default_rng((seed, int(idx)))
    c, h, w = shape
    label = int(rng.integers(2))
    image = rng.standard_normal(size=shape, dtype=np.float32)
    image *= np.float32(0.05)
    y0, x0 = rng.uniform(0.3, 0.7, 2) * (h, w)
    sigma = (rng.uniform(0.6, 1.2) if label == 0 else rng.uniform(2.5, 5.0)) * min(h, w) / 64
    flux = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None] - np.float32(y0)
    xx = np.arange(w, dtype=np.float32)[None, :] - np.float32(x0)
    profile = np.exp(-(yy * yy + xx * xx) / np.float32(2 * sigma * sigma))
    image += flux[:, None, None] * profile[None]
    return {"image": image, "label": label, "index": int(idx)}


class SyntheticCutouts:
    """A map-style dataset of synthetic cutouts computed on each read.

    Parameters
    ----------
    length : int
        Number of items.
    shape : tuple of int
        ``(C, H, W)``.
    seed : int
        Dataset seed.
    latency_ms : float
        Seconds slept per read, in milliseconds (a slow file system); 0 for none.
    """

    def __init__(
        self,
        length: int,
        shape: tuple[int, int, int] = (3, 64, 64),
        seed: int = 0,
        latency_ms: float = 0.0,
    ):
        self.length = int(length)
        self.shape = parse_shape(tuple(shape))
        self.seed = int(seed)
        self.latency_ms = float(latency_ms)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> dict:
        idx = _check_index(idx, self.length)
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000)
        return cutout(idx, self.shape, self.seed)

    def expected(self, idx: int) -> dict:
        """Return what item ``idx`` must hold, without the simulated latency."""
        return cutout(_check_index(idx, self.length), self.shape, self.seed)

    @property
    def item_nbytes(self) -> int:
        """Bytes of one item's image (the labels and indices add 16 bytes)."""
        return int(np.prod(self.shape)) * 4


def _check_index(idx: Any, length: int) -> int:
    idx = int(idx)
    if not 0 <= idx < length:
        raise IndexError(f"index {idx} is out of range [0, {length})")
    return idx


def write_cutouts(
    directory: str | os.PathLike,
    length: int,
    shape: tuple[int, int, int] = (3, 64, 64),
    seed: int = 0,
    shard_items: int = 1024,
) -> Path:
    """Write synthetic cutouts to ``.npy`` shards, unless the same set is already there.

    Parameters
    ----------
    directory : str or PathLike
        Where to write ``images-NNNNN.npy`` (``shard_items`` images each),
        ``labels.npy`` and ``meta.json``.
    length : int
        Number of items.
    shape : tuple of int
        ``(C, H, W)``.
    seed : int
        Dataset seed.
    shard_items : int
        Items per shard file.

    Returns
    -------
    Path
        The directory.
    """
    root = Path(directory)
    meta = {
        "format": _FORMAT,
        "length": int(length),
        "shape": list(parse_shape(tuple(shape))),
        "seed": int(seed),
        "shard_items": int(shard_items),
    }
    meta_path = root / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return root
    root.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # written last: a half-written set is never reused
    labels = np.empty(length, dtype=np.int64)
    for shard, start in enumerate(range(0, length, shard_items)):
        stop = min(length, start + shard_items)
        images = np.empty((stop - start, *meta["shape"]), dtype=np.float32)
        for i in range(start, stop):
            item = cutout(i, tuple(meta["shape"]), seed)
            images[i - start] = item["image"]
            labels[i] = item["label"]
        np.save(root / f"images-{shard:05d}.npy", images)
    np.save(root / "labels.npy", labels)
    meta_path.write_text(json.dumps(meta))
    return root


# Labels are read once per process; kept outside the instance so that the provider's
# state (which names the default cache) does not change when it is first read.
_labels: dict[str, np.ndarray] = {}


class NpyCutouts:
    """A map-style dataset reading cutouts written by ``write_cutouts``.

    Each read opens the item's shard file (memory-mapped) and copies one row out of
    it, after sleeping ``latency_ms``: the per-file latency of a network file system.

    Parameters
    ----------
    directory : str or PathLike
        The directory ``write_cutouts`` wrote.
    latency_ms : float
        Milliseconds slept per read.
    """

    def __init__(self, directory: str | os.PathLike, latency_ms: float = 0.0):
        self.directory = str(Path(directory).resolve())
        meta = json.loads((Path(self.directory) / "meta.json").read_text())
        self.length = int(meta["length"])
        self.shape = tuple(meta["shape"])
        self.seed = int(meta["seed"])
        self.shard_items = int(meta["shard_items"])
        self.latency_ms = float(latency_ms)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> dict:
        idx = _check_index(idx, self.length)
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000)
        return self._read(idx)

    def _read(self, idx: int) -> dict:
        shard, row = divmod(idx, self.shard_items)
        images = np.load(Path(self.directory) / f"images-{shard:05d}.npy", mmap_mode="r")
        labels = _labels.get(self.directory)
        if labels is None:
            labels = _labels[self.directory] = np.load(Path(self.directory) / "labels.npy")
        return {"image": np.array(images[row]), "label": int(labels[idx]), "index": idx}

    def expected(self, idx: int) -> dict:
        """Return what item ``idx`` must hold: the file's contents, without the latency."""
        return self._read(_check_index(idx, self.length))

    @property
    def item_nbytes(self) -> int:
        """Bytes of one item's image (the labels and indices add 16 bytes)."""
        return int(np.prod(self.shape)) * 4
