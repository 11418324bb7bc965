"""End to end: processes whose provider is defined in a script share one cache by identity."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from providers import ArrayProvider

import raycache
from raycache import DataCache

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
import numpy as np
from raycache import DataCache


class ScriptProvider:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full(16, i, np.float32)}


def config(extra=None):
    return {"raycache": dict({"detached": True}, **(extra or {}))}


def fill():
    cache = DataCache(config(), ScriptProvider(30))
    for i in range(30):
        cache.insert_into_cache(i, ScriptProvider(30)[i])
    cache.flush(timeout=60)
    print("name", cache.name)
    cache.close()


def read():
    cache = DataCache(config(), ScriptProvider(30))
    hits = sum(cache.try_fetch(i) is not None for i in range(30))
    print("name", cache.name)
    print("hits", hits)
    cache.close()


if __name__ == "__main__":
    fill()
"""


def _run(args, address, cwd, timeout=240):
    env = dict(
        os.environ,
        RAY_ADDRESS=address,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    )
    proc = subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def test_script_and_importer_share_one_warm_cache(ray_address, tmp_path):
    (tmp_path / "trainer.py").write_text(textwrap.dedent(SCRIPT))
    filled = _run(["trainer.py"], ray_address, tmp_path)  # ScriptProvider is __main__'s
    name = filled["name"]
    try:
        read = _run(["-c", "import trainer; trainer.read()"], ray_address, tmp_path)
        assert read["name"] == name
        assert read["hits"] == "30"
    finally:
        raycache.drop_cache(name)


def test_config_identity_names_the_cache(ray_address):
    a = DataCache({"raycache": {"identity": "v1"}}, ArrayProvider(5, scale=1.0))
    b = DataCache({"raycache": {"identity": "v1"}}, ArrayProvider(5, scale=2.0))
    c = DataCache({"raycache": {"identity": "v2"}}, ArrayProvider(5, scale=1.0))
    assert a.name == b.name != c.name


def test_mismatch_error_says_what_differs_and_rebuild_refills(ray_address, cache_name):
    first = DataCache({"raycache": {"name": cache_name}}, ArrayProvider(6, scale=1.0))
    first.insert_into_cache(0, ArrayProvider(6)[0])
    first.flush(timeout=60)
    other = DataCache({"raycache": {"name": cache_name}}, ArrayProvider(6, scale=2.0))
    with pytest.raises(raycache.CacheMismatchError) as err:
        other.try_fetch(0)
    assert type(err.value) is raycache.CacheMismatchError
    assert "differ in scale" in str(err.value) and "on_mismatch" in str(err.value)
    first.close()
    rebuilt = DataCache(
        {"raycache": {"name": cache_name, "on_mismatch": "rebuild"}}, ArrayProvider(6, scale=2.0)
    )
    assert rebuilt.try_fetch(0) is None  # the old items are gone
    assert rebuilt.stats()["items"] == 0
    rebuilt.close()
    raycache.drop_cache(cache_name)


WORKER = """
import os
import torch
from providers import ArrayProvider
import raycache
from raycache import CachedDataset, DataCache

if __name__ == "__main__":
    name = os.environ["CACHE"]
    dataset = CachedDataset(ArrayProvider(4, scale=3.0), {"raycache": {"name": name}})
    # Another job drops the cache and makes its own under the same name: the worker,
    # attaching by name, finds items of another provider.
    raycache.drop_cache(name)
    holder = DataCache({"raycache": {"name": name}}, ArrayProvider(4, scale=1.0))
    holder.insert_into_cache(0, ArrayProvider(4)[0])
    holder.flush(timeout=60)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=1,
        multiprocessing_context="spawn", timeout=60,
    )
    try:
        next(iter(loader))
    except Exception as exc:
        print("PARENT GOT", type(exc).__module__, type(exc).__qualname__)
    holder.close()
"""


def test_spawned_worker_attach_mismatch_reaches_parent(ray_address, cache_name, tmp_path):
    (tmp_path / "w.py").write_text(textwrap.dedent(WORKER))
    env = dict(
        os.environ,
        RAY_ADDRESS=ray_address,
        CACHE=cache_name,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    )
    try:
        proc = subprocess.run(
            [sys.executable, "w.py"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert "PARENT GOT raycache.errors CacheMismatchError" in proc.stdout, (
            proc.stdout + proc.stderr
        )
    finally:
        raycache.drop_cache(cache_name)
