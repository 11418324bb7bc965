"""Plot the tensorboardX scalars raycache writes, from the event files of a real run.

``python scripts/plot_metrics.py --run OUT.png`` trains nothing: it runs three epochs of a
``CachedDataset`` over synthetic items with ``raycache.log_dir`` set (a preload, then two warm
epochs, in one process with an embedded Ray), then reads every event file under the log
directory and draws one panel per scalar. ``python scripts/plot_metrics.py LOGDIR OUT.png``
plots the event files of a run of your own.

The event files are read directly (TFRecord framing around tensorboardX's ``Event`` protobuf),
so neither TensorBoard nor TensorFlow is needed.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

Scalars = dict[str, dict[str, list[tuple[float, int, float]]]]


def read_scalars(log_dir: Path) -> Scalars:
    """Return ``{tag: {writer: [(walltime, step, value), ...]}}`` for every event file.

    ``writer`` is the event file's folder under ``log_dir`` (one per process and cache).
    """
    from tensorboardX.proto import event_pb2

    out: Scalars = defaultdict(lambda: defaultdict(list))
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        writer = str(path.parent.relative_to(log_dir))
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            start = pos + 12  # length (8 bytes) and its CRC (4 bytes)
            record = data[start : start + length]
            pos = start + length + 4  # the record and its CRC
            event = event_pb2.Event()
            event.ParseFromString(record)
            for value in event.summary.value:
                out[value.tag][writer].append((event.wall_time, event.step, value.simple_value))
    return out


def sample_run(log_dir: Path, items: int = 5000) -> None:
    """Make every scalar appear: a preloaded cache, then a Hyrax-style fill on miss."""
    from raycache import CachedDataset, DataCache, drop_cache

    class Cutouts:
        """A map-style dataset of synthetic 4x32x32 cutouts."""

        def __len__(self) -> int:
            return items

        def __getitem__(self, idx: int) -> dict:
            rng = np.random.default_rng(idx)
            return {"image": rng.random((4, 32, 32), dtype=np.float32), "label": idx % 10}

    # 1. A preload: the directory actor writes preload_1k_obj_s, cache_count, cache_bytes.
    preloaded = {
        "data_set": {"use_cache": True, "preload_cache": True, "preload_threads": 8},
        "raycache": {"log_dir": str(log_dir / "preload"), "chunk_size": 500},
    }
    ds = CachedDataset(Cutouts(), preloaded)
    ds.cache.wait_for_preload(timeout=300)
    name = ds.cache.name
    ds.cache.close()
    drop_cache(name)  # closes the actor's event file

    # 2. Hyrax's loop, fill on miss then a warm epoch: the trainer writes cache_insert_s,
    #    miss_s, hit_s, cache_count and cache_bytes every DataCache.logging_interval calls.
    provider = Cutouts()
    cache = DataCache({"raycache": {"log_dir": str(log_dir / "fill")}}, provider)
    for _epoch in range(2):
        for idx in np.random.default_rng(_epoch).permutation(items).tolist():
            item = cache.try_fetch(idx)
            if item is None:
                cache.insert_into_cache(idx, provider[idx])
    name = cache.name
    cache.close()
    drop_cache(name)


def plot(scalars: Scalars, out: Path) -> None:
    """Draw one panel per scalar tag, against seconds since the first event."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = sorted(scalars)
    if not tags:
        raise SystemExit("no scalars found: was raycache.log_dir set for the run?")
    t0 = min(w for by in scalars.values() for series in by.values() for w, _, _ in series)
    cols = 3
    rows = (len(tags) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for writer, series in sorted(scalars[tag].items()):
            series = sorted(series)
            ax.plot([w - t0 for w, _, _ in series], [v for _, _, v in series], ".-", label=writer)
        ax.legend(fontsize=6)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("seconds into the run", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tags) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Plot an existing log directory, or make a sample run first with ``--run``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="LOGDIR OUT.png, or OUT.png with --run")
    parser.add_argument("--run", action="store_true", help="make a sample run first")
    args = parser.parse_args(argv)
    if args.run:
        if len(args.paths) != 1:
            parser.error("with --run give only OUT.png")
        with tempfile.TemporaryDirectory() as tmp:
            sample_run(Path(tmp))
            plot(read_scalars(Path(tmp)), Path(args.paths[0]))
        return 0
    if len(args.paths) != 2:
        parser.error("give LOGDIR and OUT.png")
    plot(read_scalars(Path(args.paths[0])), Path(args.paths[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
