"""Fault matrix, the whole Ray instance: the cluster under a trainer dies mid-epoch.

The test starts a Ray head of its own (``ray start --head --block`` on free ports, its
own ``--temp-dir``, no dashboard) and a trainer process attached to it whose provider
class is defined in the trainer's own ``__main__``. Two thirds of the items are cached;
mid-epoch the test SIGKILLs ``ray start`` and every process under it (GCS, raylet,
object store, workers, the directory actor) and checks that the trainer ends its epoch
with every item right (the cached ones from what it already holds, the others from the
provider, their inserts given up), logs the loss once, learns once that the cache is
gone, gets ``CacheUnavailableError`` naming the cause from ``stats()``, and exits 0
within a bound. It never runs ``ray stop``: it kills only the processes it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest
from ports import free_ports

REPO = Path(__file__).resolve().parent.parent
RAY = shutil.which("ray")
START_S = 90  # the head answers within this
TRAINER_S = 120  # the trainer's cold epoch and first half of the warm one
AFTER_DEATH_S = 45  # the trainer's epoch end, loss, stats() and exit after Ray died
N = 600

pytestmark = pytest.mark.skipif(RAY is None, reason="the `ray` command is not installed")

# Its own token, so that nothing here depends on (or writes) the user's ~/.ray token.
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
ENV.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex)

# The trainer: a provider of its own (``__main__``), a cold epoch that fills the cache,
# then a warm epoch in batches that stops halfway until the test has killed Ray.
TRAINER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import ray
    from raycache import CachedDataset, CacheUnavailableError

    class Stars:
        def __init__(self, n):
            self.n = n
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            return {"flux": np.full((3, 8), i, dtype=np.float32), "label": i}

    address, name, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    provider = Stars(n)
    ds = CachedDataset(provider, {"raycache": {"name": name, "chunk_size": 50}})

    def batch_loss(indices):
        loss = 0.0
        for idx, item in zip(indices, ds.__getitems__(indices)):
            want = provider[idx]
            flux = np.asarray(item["flux"])
            if (flux.dtype != want["flux"].dtype or flux.shape != want["flux"].shape
                    or not np.array_equal(flux, want["flux"]) or item["label"] != idx):
                print("WRONG", idx, flush=True)
            loss += float(flux.sum())
        return loss

    order = list(range(n))
    for start in range(0, 2 * n // 3, 25):  # a partial first epoch caches two thirds
        batch_loss(order[start:start + 25])
    assert ds.cache.flush(timeout=60)
    print("CACHED", ds.cache.stats()["items"], flush=True)
    np.random.default_rng(1).shuffle(order)
    loss, half = 0.0, n // 2
    for start in range(0, half, 25):
        loss += batch_loss(order[start:start + 25])
    print("HALF", flush=True)
    deadline = time.monotonic() + 120
    while not __import__("os").path.exists(go):  # the test kills Ray, then makes this file
        if time.monotonic() > deadline:
            sys.exit("the test never said that Ray is gone")
        time.sleep(0.05)
    start_rest = time.monotonic()
    for start in range(half, n, 25):
        loss += batch_loss(order[start:start + 25])
    print("LOSS", loss, flush=True)
    print("REST OF EPOCH S", round(time.monotonic() - start_rest, 2), flush=True)
    try:
        ds.cache.stats()
        print("STATS ANSWERED", ds.cache.stats(), flush=True)
    except CacheUnavailableError as exc:
        print("STATS", type(exc).__name__, str(exc).splitlines()[0], flush=True)
    ds.cache.close()
    print("EXITING", flush=True)
    """
)


def _start_head(temp_dir: str) -> tuple[subprocess.Popen, str]:
    """Start ``ray start --head --block`` in its own session; its process and address."""
    gcs, client, env_agent, nm, om, metrics, agent_grpc = free_ports(7)
    cmd = [
        RAY, "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={temp_dir}",
        "--num-cpus=2", f"--object-store-memory={100 * 2**20}", "--include-dashboard=false",
        f"--ray-client-server-port={client}", f"--runtime-env-agent-port={env_agent}",
        f"--node-manager-port={nm}", f"--object-manager-port={om}",
        f"--metrics-export-port={metrics}", f"--dashboard-agent-grpc-port={agent_grpc}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        start_new_session=True,  # one process group: the whole instance, to kill at once
    )
    return proc, f"127.0.0.1:{gcs}"


def _wait_until_up(proc: subprocess.Popen, address: str) -> None:
    """Wait (bounded) until the head's GCS takes connections."""
    host, port = address.split(":")
    deadline = time.monotonic() + START_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}")
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head at {address} did not answer in {START_S} s") from None
            time.sleep(0.5)


def _kill_instance(proc: subprocess.Popen) -> int:
    """SIGKILL ``ray start`` and every process under it at once; return how many.

    Ray's workers (the directory actor among them) run in process groups of their own,
    so a group kill would leave them answering for a few seconds: the whole tree is
    collected first, then killed, as a machine losing its Ray would.
    """
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass  # already gone
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # already gone
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)
    return len(tree) + 1


def _read_until(trainer: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    """Lines the trainer printed up to and including the one starting with ``marker``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = trainer.stdout.readline()
        if not line:
            trainer.wait(timeout=30)
            tail = trainer.stderr.read()[-3000:]
            raise AssertionError(
                f"the trainer ended ({trainer.returncode}) before {marker!r}: {lines}\n{tail}"
            )
        lines.append(line.rstrip("\n"))
        if line.startswith(marker):
            return lines
    raise AssertionError(f"no {marker!r} from the trainer in {timeout} s: {lines}")


def test_the_whole_ray_instance_dies_under_a_training_process(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rcf-", dir="/tmp")  # short: socket paths
    head, address = _start_head(temp_dir)
    go = tmp_path / "ray-is-gone"
    trainer = None
    try:
        _wait_until_up(head, address)
        script = tmp_path / "train.py"
        script.write_text(TRAINER)
        env = dict(ENV, PYTHONPATH=str(REPO))
        args = [sys.executable, str(script), address, "whole-ray", str(N), str(go)]
        trainer = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
        )
        before = _read_until(trainer, "HALF", TRAINER_S)
        assert f"CACHED {2 * N // 3}" in before, before

        killed = _kill_instance(head)
        died = time.monotonic()
        go.touch()
        out, err = trainer.communicate(timeout=AFTER_DEATH_S)
        took = time.monotonic() - died
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.kill()
            trainer.communicate(timeout=30)
        if head.poll() is None:
            _kill_instance(head)
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert killed > 3, killed  # ray start, GCS, raylet and at least the actor
    lines = before + out.splitlines()
    assert trainer.returncode == 0, f"exit {trainer.returncode}:\n{out}\n{err[-3000:]}"
    assert not [line for line in lines if line.startswith("WRONG")], lines
    want = float(sum(3 * 8 * i for i in range(N)))  # every item's flux, summed once
    losses = [line for line in lines if line.startswith("LOSS")]
    assert len(losses) == 1 and float(losses[0].split()[1]) == want, lines
    stats = [line for line in lines if line.startswith("STATS")]
    assert len(stats) == 1 and stats[0].startswith("STATS CacheUnavailableError"), lines
    assert "gone or unreachable" in stats[0], stats
    assert "EXITING" in lines, lines
    rest = [float(line.split()[-1]) for line in lines if line.startswith("REST OF EPOCH S")]
    assert rest and rest[0] < 20, lines  # no stale ref or dead call costs seconds each
    assert took < AFTER_DEATH_S, f"the trainer took {took:.1f}s after Ray died"
    lost = [line for line in err.splitlines() if "cache unavailable" in line]
    assert len(lost) <= 1, lost  # the trainer learns once, not per chunk
    assert "Traceback" not in err, err[-3000:]
