"""Errors raised inside Ray reach the user as plain, picklable exceptions of the original type."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray
from ray.exceptions import RayActorError, RayTaskError

import raycache
from raycache import errors
from raycache.client import CacheClient
from raycache.config import CacheConfig
from raycache.errors import (
    CacheMismatchError,
    CacheUnavailableError,
    RemoteError,
    plain_error,
    ray_errors_as_plain,
)
from raycache.mismatch import attach_with_policy

ROOT = Path(__file__).resolve().parent.parent


@ray.remote
class Raiser:
    def fail(self, kind: str, message: str):
        raise getattr(errors, kind)(message)


EXCEPTIONS = [
    name
    for name in errors.__all__
    if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), BaseException)
]


@pytest.mark.parametrize("name", EXCEPTIONS)
def test_every_raycache_exception_pickles_with_its_message(name):
    kind = getattr(errors, name)
    exc = kind(f"{name} at index 3")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is kind and str(back) == f"{name} at index 3"


@pytest.mark.parametrize("kind", ["CacheMismatchError", "CacheUnavailableError", "ConfigError"])
def test_error_from_a_real_actor_becomes_plain_and_pickles(ray_address, kind):
    actor = Raiser.remote()
    with pytest.raises(RayTaskError) as info:
        ray.get(actor.fail.remote(kind, "cache 'x' holds other items"), timeout=60)
    raw = info.value
    # Why the conversion exists: Ray's class for this error cannot be pickled by reference.
    with pytest.raises(Exception):  # noqa: B017 - pickle raises PicklingError or AttributeError
        pickle.dumps(type(raw))
    plain = plain_error(raw, "attaching to cache 'x'")
    assert type(plain) is getattr(errors, kind)
    back = pickle.loads(pickle.dumps(plain))
    assert type(back) is type(plain)
    assert "cache 'x' holds other items" in str(back)
    assert any("raised inside Ray" in note and "attaching" in note for note in back.__notes__)
    ray.kill(actor)


def test_context_manager_raises_the_plain_error(ray_address):
    actor = Raiser.remote()
    with pytest.raises(CacheMismatchError, match="other items") as info:
        with ray_errors_as_plain("attaching"):
            ray.get(actor.fail.remote("CacheMismatchError", "other items"), timeout=60)
    assert type(info.value) is CacheMismatchError
    assert isinstance(info.value.__cause__, RayTaskError)
    ray.kill(actor)


def test_dead_actor_becomes_cache_unavailable(ray_address):
    actor = Raiser.remote()
    ray.kill(actor, no_restart=True)
    with pytest.raises(RayActorError) as info:
        ray.get(actor.fail.remote("CacheMismatchError", "x"), timeout=60)
    plain = plain_error(info.value, "reading stats of cache 'x'")
    assert type(plain) is CacheUnavailableError
    assert "reading stats of cache 'x'" in str(plain)
    assert type(pickle.loads(pickle.dumps(plain))) is CacheUnavailableError


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickling re-calls __init__ with one argument: fails
        super().__init__(f"{a}-{b}")


def test_an_exception_that_does_not_pickle_becomes_remote_error():
    plain = plain_error(Unpicklable(1, 2))
    assert type(plain) is RemoteError
    assert "Unpicklable" in str(plain) and "1-2" in str(plain)
    assert type(pickle.loads(pickle.dumps(plain))) is RemoteError
    ok = ValueError("fine")
    assert plain_error(ok) is ok


WORKER_SCRIPT = """
import os, sys
import ray
import torch
from raycache.errors import ray_errors_as_plain

@ray.remote
class Refuser:
    def attach(self):
        from raycache.errors import CacheMismatchError
        raise CacheMismatchError("cache 'c' holds 5 items of Other[5]")

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        actor = ray.get_actor("refuser", namespace="errtest")
        if "--plain" in sys.argv:
            with ray_errors_as_plain("attaching to cache 'c'"):
                ray.get(actor.attach.remote(), timeout=60)
        ray.get(actor.attach.remote(), timeout=60)

def init(_):
    ray.init(address=os.environ["RAY_ADDRESS"], namespace="errtest")

if __name__ == "__main__":
    ray.init(address=os.environ["RAY_ADDRESS"], namespace="errtest")
    refuser = Refuser.options(name="refuser").remote()
    loader = torch.utils.data.DataLoader(
        Data(), batch_size=None, num_workers=1, multiprocessing_context="spawn",
        worker_init_fn=init, timeout=90,
    )
    try:
        next(iter(loader))
    except Exception as exc:
        print("PARENT GOT", type(exc).__module__, type(exc).__qualname__, str(exc)[-300:])
"""


def test_spawned_dataloader_worker_error_reaches_parent(ray_address, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(WORKER_SCRIPT))
    env = dict(
        os.environ,
        RAY_ADDRESS=ray_address,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    )
    proc = subprocess.run(
        [sys.executable, str(script), "--plain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert "PARENT GOT raycache.errors CacheMismatchError" in proc.stdout, proc.stdout + proc.stderr
    assert "holds 5 items of Other[5]" in proc.stdout


def _client(name: str, fingerprint: str) -> CacheClient:
    config = CacheConfig.from_dict({"raycache": {"name": name, "linger_s": 0.5}})
    return CacheClient(config, name, 4, fingerprint)


def test_attach_with_policy_error_and_rebuild(ray_address, cache_name):
    first = _client(cache_name, "A[4] digest aaaa (state: x=1)")
    with pytest.raises(CacheMismatchError):
        attach_with_policy(
            lambda: _client(cache_name, "A[4] digest bbbb (state: x=2)"),
            lambda: raycache.drop_cache(cache_name),
            "error",
            cache_name,
        )
    first.close()
    dropped = []

    def drop():
        dropped.append(cache_name)
        raycache.drop_cache(cache_name)

    second = attach_with_policy(
        lambda: _client(cache_name, "A[4] digest bbbb (state: x=2)"), drop, "rebuild", cache_name
    )
    assert dropped == [cache_name]
    assert second.settings.length == 4
    second.close()
    raycache.drop_cache(cache_name)
    with pytest.raises(ValueError, match="on_mismatch"):
        attach_with_policy(lambda: None, lambda: None, "replace")
