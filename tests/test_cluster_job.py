"""Jobs submitted with ``ray job submit`` to one Ray cluster share a detached cache.

The module starts its own Ray head (``ray start --head --block`` on free ports, its own
``--temp-dir``, dashboard on 127.0.0.1) and stops it by the process it holds; it never
runs ``ray stop``. Every job is submitted with the repository's runtime env file
(``examples/ray_job_submit/runtime_env.yaml``) and ``--working-dir`` the repository, so
the jobs import this checkout's raycache from the uploaded working directory, as the
cluster guide says. The sweep's jobs are a script whose provider class is defined in
the script itself (``__main__``); the training example runs as one job too, and its
Ray Train workers must each read exactly their shard (``ranks.check_ranks``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from ports import free_ports
from ranks import check_ranks

REPO = Path(__file__).resolve().parent.parent
RUNTIME_ENV = REPO / "examples" / "ray_job_submit" / "runtime_env.yaml"
RAY = shutil.which("ray")
START_S = 90  # the head and its dashboard agent answer within this
STOP_S = 5  # then its processes have this long to end after SIGTERM
JOB_S = 180  # one job, from submission to its end
N = 512

# Ray's dashboard takes jobs only with a token where token authentication is on: the
# head and every `ray job submit` share one made up for this module.
AUTH_ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
AUTH_ENV.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex)

pytestmark = pytest.mark.skipif(RAY is None, reason="the `ray` command is not installed")


def _submit(dashboard: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``ray job submit`` (waiting for the job), retrying while the agent starts."""
    deadline = time.monotonic() + timeout
    cmd = [RAY, "job", "submit", "--address", dashboard, "--runtime-env", str(RUNTIME_ENV)]
    cmd += ["--working-dir", str(REPO)]
    while True:
        proc = subprocess.run(
            [*cmd, "--submission-id", f"rc-{uuid.uuid4().hex[:8]}", "--", *args],
            capture_output=True,
            text=True,
            timeout=max(1.0, deadline - time.monotonic()),
            cwd=REPO,
            env=AUTH_ENV,
        )
        # Right after the head starts, its job agent may not answer yet: try again.
        starting = "No available agent" in proc.stdout + proc.stderr
        if not starting or time.monotonic() > deadline:
            return proc
        time.sleep(1.0)


@pytest.fixture(scope="module")
def head():
    """A Ray head started with ``ray start --head --block``; yields the dashboard URL."""
    gcs, dash, agent, agent_grpc, metrics, client, env_agent, nm, om = free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rcj-", dir="/tmp")  # short: socket paths
    cmd = [
        RAY, "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={temp_dir}",
        "--num-cpus=2", f"--object-store-memory={200 * 2**20}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
        f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=AUTH_ENV,
        start_new_session=True,  # its own process group, for the last-resort kill
    )
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(dashboard, proc)
        yield {"dashboard": dashboard, "address": f"127.0.0.1:{gcs}"}
    finally:
        # `ray start --block` stops the processes it started when it is terminated, but
        # its GCS and monitor take ~30 s to go; they are all in the process group it was
        # started in: each gets SIGTERM, and what is left after STOP_S gets SIGKILL.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(dashboard: str, proc: subprocess.Popen) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + START_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{dashboard}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 where Ray's token authentication is on)
        except (urllib.error.URLError, OSError):
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise RuntimeError(f"the dashboard at {dashboard} did not answer in {START_S} s")
        time.sleep(0.5)


# One job of a sweep: its provider is defined in the script. It writes its result to
# a file, so the test reads it whatever `ray job submit` prints around the job's output.
SWEEP_JOB = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import ray
    import raycache

    name, log_dir, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    drop = sys.argv[5:] == ["drop"]  # the sweep's last job drops the cache when done

    class SweepProvider:
        def __init__(self, n, log_dir):
            self.n, self.log_dir = n, log_dir
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            with open(os.path.join(self.log_dir, f"{os.getpid()}.log"), "a") as f:
                f.write(f"{i}\\n")
            return {"image": np.full((3, 16, 16), i, dtype=np.float32), "label": i}

    def finish(result, code=0):
        result["raycache_file"] = raycache.__file__
        with open(out, "w") as f:
            json.dump(result, f)
        sys.exit(code)

    config = {
        "data_set": {"use_cache": True, "preload_cache": True, "preload_threads": 2},
        "raycache": {"name": name, "detached": True, "chunk_size": 64},
    }
    try:
        ds = raycache.CachedDataset(SweepProvider(n, log_dir), config)
    except raycache.CacheMismatchError as exc:
        finish({"error": type(exc).__name__, "message": str(exc)}, 3)
    if not ds.cache.wait_for_preload(timeout=120):
        sys.exit("preload did not end in 120 s")
    bad = [i for i in np.random.default_rng(1).permutation(n).tolist()
           if ds[i]["label"] != i or not (ds[i]["image"] == i).all()]
    stats = ds.cache.stats()
    ds.cache.close()
    if drop and not raycache.drop_cache(name):
        sys.exit(f"no cache {name} to drop")
    finish({"items": stats["items"], "bad": bad[:5], "hits": stats["client"]["hits"],
            "misses": stats["client"]["misses"], "address": ray.get_runtime_context().gcs_address})
    """
)


def _provider_reads(log_dir: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in log_dir.glob("*.log"))


def test_jobs_submitted_to_one_cluster_share_a_detached_cache(head, tmp_path):
    script = tmp_path / "sweep_job.py"
    script.write_text(SWEEP_JOB)
    logs = tmp_path / "reads"
    logs.mkdir()
    name = f"job-{uuid.uuid4().hex[:8]}"

    def job(n: int, expect_ok: bool = True, *more: str) -> dict:
        out = tmp_path / f"out-{uuid.uuid4().hex[:6]}.json"
        before = _provider_reads(logs)
        args = ["python", str(script), name, str(logs), str(n), str(out), *more]
        proc = _submit(head["dashboard"], args, JOB_S)
        assert (proc.returncode == 0) == expect_ok, proc.stdout[-3000:] + proc.stderr[-2000:]
        result = json.loads(out.read_text())
        result["provider_reads"] = _provider_reads(logs) - before
        return result

    first = job(N)
    assert first["items"] == N and first["bad"] == []
    assert first["provider_reads"] == N
    # The job ran on this cluster, with the raycache of the uploaded working directory.
    assert first["address"].rsplit(":", 1)[1] == head["address"].rsplit(":", 1)[1]
    assert "_ray_pkg_" in first["raycache_file"], first["raycache_file"]

    mismatched = job(N + 1, False)  # another length: refused, the cache untouched
    assert mismatched["error"] == "CacheMismatchError"
    assert f"holds {N} items" in mismatched["message"]
    assert mismatched["provider_reads"] == 0

    last = job(N, True, "drop")
    assert last["bad"] == [] and last["provider_reads"] == 0
    assert (last["hits"], last["misses"]) == (2 * N, 0)  # two reads of each item


@pytest.mark.slow  # Ray Train's start-up: ~90 s on a busy 2-core machine
def test_the_training_example_runs_as_a_submitted_job(head, tmp_path):
    # The documented command, smaller: Ray Train workers attach to one cache on the
    # cluster, each reads exactly its shard every epoch, and the example drops its cache.
    items, epochs = 256, 2
    args = [
        "python", "examples/ray_train.py", "--address", "auto", "--workers", "2",
        "--items", str(items), "--shape", "3x8x8", "--epochs", str(epochs),
        "--result-dir", str(tmp_path),
    ]  # fmt: skip
    proc = _submit(head["dashboard"], args, JOB_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank-*.json"))]
    assert all(r["length"] == items and r["world"] == 2 for r in ranks)
    check_ranks(ranks, items, 2, epochs)
    listed = subprocess.run(
        [sys.executable, "-m", "raycache.cli", "list", "--json", "--address", head["address"]],
        capture_output=True,
        text=True,
        timeout=120,
        env=AUTH_ENV,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert json.loads(listed.stdout) == [], listed.stdout  # the example dropped its cache
