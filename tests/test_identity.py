"""Cache identity: equal wherever the provider class is defined, different when items differ."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from providers import ArrayProvider, HyraxStyleProvider

from raycache.identity import CacheIdentity, derive_identity, mismatch_message, stable_digest

ROOT = Path(__file__).resolve().parent.parent


def ident(provider, stated=None) -> CacheIdentity:
    return derive_identity(provider, len(provider), stated)


class Files:
    """A provider over files: where the data is and which fields are read decide items."""

    def __init__(self, root, fields=("image",), transform=None, batch_size=32):
        self.root = root
        self.fields = list(fields)
        self.transform = transform
        self.batch_size = batch_size  # a DataLoader option some providers carry along
        self.log = logging.getLogger("files")
        self.lock = threading.Lock()

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {f: i for f in self.fields}


class OtherFiles(Files):
    pass


def test_same_provider_same_identity_and_name():
    a, b = ident(Files("/data/a")), ident(Files("/data/a"))
    assert a == b
    assert a.name == b.name and a.name.startswith("Files-")
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize(
    "other",
    [
        OtherFiles("/data/a"),  # another class
        Files("/data/b"),  # another data location
        Files("/data/a", fields=("image", "label")),  # other selected fields
        Files("/data/a", transform=lambda x: x * 3),  # an item-affecting option
    ],
    ids=["class", "location", "fields", "transform"],
)
def test_what_changes_items_changes_identity(other):
    base = Files("/data/a", transform=lambda x: x * 2)
    if not isinstance(other, OtherFiles) and other.transform is None:
        other.transform = base.transform
    assert ident(other).digest != ident(base).digest
    assert ident(other).name != ident(base).name


def test_length_changes_identity():
    assert ident(ArrayProvider(10)).digest != ident(ArrayProvider(11)).digest
    assert (
        derive_identity(ArrayProvider(10), 10).digest
        != derive_identity(ArrayProvider(10), 12).digest
    )


def test_data_loader_options_loggers_locks_and_own_cache_are_left_out():
    a, b = Files("/data/a", batch_size=32), Files("/data/a", batch_size=256)
    b.log = logging.getLogger("another")
    b.lock = threading.RLock()
    ia, ib = ident(a), ident(b)
    assert ia.digest == ib.digest
    assert {"batch_size", "log", "lock"} <= set(ia.left_out)
    assert "batch_size" not in dict(ia.fields)

    hyrax_style = HyraxStyleProvider({}, 5)  # owns a raycache DataCache
    assert "data_cache" in ident(hyrax_style).left_out


def test_module_name_is_not_part_of_identity():
    # The same class body as __main__.P, script.P and __mp_main__.P.
    made = []
    for module in ("__main__", "myscript", "__mp_main__"):
        ns = {"__name__": module}
        exec("class P:\n    def __init__(self):\n        self.n = 3\n", ns)  # noqa: S102
        made.append(ns["P"]())
    assert len({type(p).__module__ for p in made}) == 3
    assert len({derive_identity(p, 3).fingerprint for p in made}) == 1


def test_function_code_and_closures_count():
    def scale(k):
        return lambda x: x * k

    assert stable_digest(scale(2)) == stable_digest(scale(2))
    assert stable_digest(scale(2)) != stable_digest(scale(3))
    assert stable_digest(lambda x: x + 1) != stable_digest(lambda x: x - 1)


def test_arrays_and_tensors_count_by_content():
    assert stable_digest(np.arange(5)) == stable_digest(np.arange(5))
    assert stable_digest(np.arange(5)) != stable_digest(np.arange(1, 6))
    assert stable_digest(np.zeros(3, np.float32)) != stable_digest(np.zeros(3, np.float64))
    assert stable_digest(torch.arange(4)) == stable_digest(torch.arange(4))
    assert stable_digest(torch.arange(4)) != stable_digest(torch.arange(1, 5))
    big = np.zeros(80 << 20, np.uint8)  # over the whole-array limit: sampled
    other = big.copy()
    other[-1] = 1
    assert stable_digest(big) != stable_digest(other)


def test_mapping_and_set_order_do_not_count():
    assert stable_digest({"a": 1, "b": 2}) == stable_digest({"b": 2, "a": 1})
    assert stable_digest({"x", "y", "z"}) == stable_digest({"z", "x", "y"})
    assert stable_digest([1, 2]) != stable_digest([2, 1])


def test_cycles_back_to_the_provider_terminate():
    p = Files("/data/a")
    p.me = p
    p.getter = p.__getitem__
    assert ident(p).digest == ident(p).digest


class Stated(Files):
    def __init__(self, root, version):
        super().__init__(root)
        self.version = version

    def cache_identity(self):
        return ("catalog", self.version)


def test_cache_identity_method_replaces_the_state_digest():
    a, b = ident(Stated("/data/a", 1)), ident(Stated("/elsewhere", 1))
    assert a.digest == b.digest  # the provider says the location does not matter
    assert a.source == "cache_identity()"
    assert ident(Stated("/data/a", 2)).digest != a.digest


def test_config_identity_replaces_everything_but_class_and_length():
    a = ident(Files("/data/a"), stated="gaia-dr3")
    b = ident(Files("/data/b"), stated="gaia-dr3")
    assert a.digest == b.digest and a.source == "raycache.identity"
    assert ident(Files("/data/a"), stated="gaia-dr4").digest != a.digest
    assert ident(OtherFiles("/data/a"), stated="gaia-dr3").digest != a.digest
    # The stated identity wins over the provider's own method.
    assert ident(Stated("/data/a", 1), stated="x").source == "raycache.identity"


def test_unreadable_state_is_reported(caplog):
    class Opaque:
        __slots__ = ()

        def __reduce_ex__(self, protocol):
            raise TypeError("cannot pickle")

    p = Files("/data/a")
    p.handle = Opaque()
    with caplog.at_level(logging.WARNING, logger="raycache.identity"):
        out = ident(p)
    assert out.opaque == ("test_unreadable_state_is_reported.<locals>.Opaque",)
    assert "cache_identity()" in caplog.text


def test_mismatch_message_names_differences_and_what_to_do():
    a, b = ident(Files("/data/a")), ident(Files("/data/b"))
    msg = mismatch_message("imgs", 10, a.fingerprint, 10, b.fingerprint)
    assert "differ in root (" in msg
    assert a.fingerprint in msg and b.fingerprint in msg
    assert "raycache.name" in msg and 'raycache.on_mismatch = "rebuild"' in msg
    msg = mismatch_message("imgs", 10, "old.P[10]", 12, b.fingerprint)  # an older actor
    assert "length (10 in the cache, 12 here)" in msg
    c = derive_identity(Files("/data/a"), 12)
    assert "length (10 in the cache, 12 here)" in mismatch_message(
        "imgs", 10, a.fingerprint, 12, c.fingerprint
    )


def _run(args, env_extra=None, timeout=120, cwd=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_naming_does_not_import_data_cache():
    out = _run(
        [
            "-c",
            "import sys, raycache.naming, raycache.identity; "
            "print('raycache.data_cache' in sys.modules)",
        ]
    )
    assert out.strip() == "False"


SCRIPT = '''
import sys
import numpy as np
import torch
from raycache.identity import derive_identity


class MyProvider:
    def __init__(self, root, n):
        self.root = root
        self.n = n
        self.offsets = np.arange(n) * 3

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full(4, self.offsets[i], np.float32)}


class Identify(torch.utils.data.Dataset):
    """Each spawned DataLoader worker computes the identity of its own MyProvider."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        p = MyProvider("/data/set", 7)
        ident = derive_identity(p, len(p))
        return f"{type(p).__module__} {ident.name} {ident.fingerprint}"


def show(where):
    p = MyProvider("/data/set", 7)
    ident = derive_identity(p, len(p))
    print(where, type(p).__module__, ident.name, ident.fingerprint, sep="|")


if __name__ == "__main__":
    show("script")
    if "--workers" in sys.argv:
        loader = torch.utils.data.DataLoader(
            Identify(), batch_size=None, num_workers=1, multiprocessing_context="spawn",
            timeout=120,
        )
        for line in loader:
            module, name, fp = line.split(" ", 2)
            print("worker", module, name, fp, sep="|")
'''


def _lines(out):
    return [line.split("|") for line in out.splitlines() if "|" in line]


def test_same_identity_in_script_importer_and_spawned_worker(tmp_path):
    (tmp_path / "myscript.py").write_text(textwrap.dedent(SCRIPT))
    direct = _lines(_run([str(tmp_path / "myscript.py"), "--workers"], cwd=tmp_path))
    imported = _lines(_run(["-c", "import myscript; myscript.show('import')"], cwd=tmp_path))
    seen = {where: (module, name, fp) for where, module, name, fp in direct + imported}
    assert seen["script"][0] == "__main__"
    assert seen["import"][0] == "myscript"
    assert seen["worker"][0] == "__mp_main__"
    assert len({(name, fp) for _, name, fp in seen.values()}) == 1, seen


def test_identity_is_taken_once_per_provider_object():
    p = Files("/data/a")
    first = ident(p)
    p.reads = 17  # state a provider changes as it serves items
    assert ident(p) is first
    fresh = Files("/data/a")
    fresh.reads = 17
    assert ident(fresh).digest != first.digest  # a new object is digested as it is now
