"""Hyrax 0.8.3's train and validate providers over one dataset share one cache.

Most tests use ``hyrax_like``, providers built the way Hyrax 0.8.3's ``DataProvider`` and
``setup_dataset`` build theirs. ``test_real_hyrax_train_and_validate_share`` runs real
Hyrax 0.8.3 when it can be imported (installed, or on ``RAYCACHE_HYRAX_PATH``), with the
stand-ins of ``hyrax_standins`` for the packages it imports but a cache never uses.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hyrax_like
import numpy as np
import pytest
import ray.cloudpickle
from hyrax_like import hyrax_config, setup_dataset

import raycache
from raycache.identity import derive_identity

ROOT = Path(__file__).resolve().parent.parent

# Ray workers running the preload do not have tests/ on their path.
ray.cloudpickle.register_pickle_by_value(hyrax_like)


def identities(changes=None):
    providers = setup_dataset(hyrax_config(changes))
    return {g: derive_identity(p, len(p)) for g, p in providers.items()}, providers


def test_train_and_validate_get_one_identity():
    ids, providers = identities()
    assert ids["train"] == ids["validate"]
    assert providers["train"].data_cache.name == providers["validate"].data_cache.name
    # What differs between the two is left out, and nothing else is.
    assert {"split_fraction", "split_indices", "data_cache"} <= set(ids["train"].left_out)
    assert providers["train"].split_fraction != providers["validate"].split_fraction
    assert providers["train"].split_indices != providers["validate"].split_indices


@pytest.mark.parametrize(
    "path,value",
    [
        (("data_loader", "batch_size"), 512),
        (("data_loader", "num_workers"), 4),
        (("train", "epochs"), 30),
        (("model", "name"), "HyraxCNN"),
        (("torch.optim.SGD", "lr"), 0.5),
        (("data_set", "seed"), 99),
        (("data_set", "preload_threads"), 16),
        (("data_set", "nan_mode"), "zero"),
        (("general", "results_dir"), "/elsewhere"),
        (("data_request", "train", "data", "split_fraction"), 0.6),
        (("raycache",), {"max_bytes": 10_000_000}),
    ],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else str(v),
)
def test_options_that_do_not_change_items_keep_the_identity(path, value):
    base, _ = identities()
    changed, _ = identities({path: value})
    assert changed["train"].digest == base["train"].digest
    assert changed["validate"].digest == base["validate"].digest


@pytest.mark.parametrize(
    "path,value",
    [
        (("data_set", "HyraxRandomDataset", "seed"), 1),
        (("data_set", "HyraxRandomDataset", "shape"), [1, 3, 3]),
        (("data_set", "HyraxRandomDataset", "size"), 50),
        (("data_request", "train", "data", "data_location"), "./other"),
        (("data_request", "train", "data", "fields"), ["image"]),
        (("general", "data_dir"), "/other/data"),
    ],
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else str(v),
)
def test_options_that_change_items_change_the_identity(path, value):
    base, _ = identities()
    changed, _ = identities({path: value})
    assert changed["train"].digest != base["train"].digest


def test_train_preload_serves_validate(ray_address):
    config = hyrax_config(
        {
            ("data_set", "preload_cache"): True,
            ("raycache",): {"linger_s": 1.0, "preload_cpus": 0.5},
        }
    )
    providers = setup_dataset(config)  # each constructor calls start_preload_thread()
    train, validate = providers["train"], providers["validate"]
    name = train.data_cache.name
    try:
        assert validate.data_cache.name == name
        assert train.data_cache.wait_for_preload(timeout=120)
        assert raycache.list_caches().count(name) == 1
        dataset = train.prepped_datasets["data"]
        for i in validate.split_indices:
            item = validate.data_cache.try_fetch(i)
            assert item is not None, f"validate index {i} was not in the shared cache"
            np.testing.assert_array_equal(item["data"]["image"], dataset.get_image(i))
        stats = validate.data_cache.stats()
        assert stats["items"] == len(train)
    finally:
        train.data_cache.close()
        validate.data_cache.close()
        raycache.drop_cache(name)


REAL_HYRAX = """
import sys
import hyrax_standins

print("standins", hyrax_standins.install())
import hyrax
import hyrax.datasets.data_cache as hyrax_cache
import raycache
from raycache.identity import derive_identity

hyrax_cache.DataCache = raycache.DataCache  # DataProvider imports it from here at build time
from hyrax.pytorch_ignite import setup_dataset

config = hyrax.Hyrax(setup_logging=False).config
group = {"dataset_class": "HyraxRandomDataset", "data_location": sys.argv[1],
         "primary_id_field": "object_id"}
config["data_request"] = {
    "train": {"data": dict(group, split_fraction=0.8)},
    "validate": {"data": dict(group, split_fraction=0.2)},
}
config["data_set"]["HyraxRandomDataset"]["size"] = 400
config["data_loader"]["batch_size"] = int(sys.argv[2])
for group, provider in setup_dataset(config).items():
    ident = derive_identity(provider, len(provider))
    print("ident", group, type(provider).__module__, provider.data_cache.name, ident.fingerprint,
          sep="|")
"""


def _hyrax_path() -> str | None:
    extra = os.environ.get("RAYCACHE_HYRAX_PATH")
    if extra:
        return extra
    return "" if importlib.util.find_spec("hyrax") is not None else None


@pytest.mark.skipif(
    _hyrax_path() is None,
    reason="Hyrax 0.8.3 is not installed (pip install --no-deps hyrax==0.8.3 astropy ... "
    "and set RAYCACHE_HYRAX_PATH to run against it)",
)
def test_real_hyrax_train_and_validate_share(tmp_path):
    script = tmp_path / "real_hyrax.py"
    script.write_text(textwrap.dedent(REAL_HYRAX))
    path = [p for p in (_hyrax_path(), str(ROOT), str(ROOT / "tests")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    seen = []
    for batch_size in (32, 512):  # two jobs that differ in a DataLoader option
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(batch_size)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        seen += [line.split("|")[1:] for line in proc.stdout.splitlines() if "|" in line]
    assert len(seen) == 4
    assert {module for _, module, _, _ in seen} == {"hyrax.datasets.data_provider"}
    assert len({(name, fp) for _, _, name, fp in seen}) == 1, seen
