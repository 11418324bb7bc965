"""One node, one Ray: scripts given no Ray share the node Ray, which then goes away.

Each test runs real scripts in fresh processes with no Ray address and a private
TMPDIR, so that they find no Ray of this machine's other users (neither a ``ray start``
session file nor another node Ray) and start the node Ray themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent

# The provider is defined in the script itself, as a user writes it. Every read appends
# one line to a file, so reads in preload tasks (other processes) are counted too.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    from raycache import DataCache

    N = int(sys.argv[1])
    READS = sys.argv[2]
    SEEN = sys.argv[3]  # each script leaves a file here once it has seen both attached

    class Squares:
        def __len__(self):
            return N

        def __getitem__(self, idx):
            fd = os.open(READS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(fd, b"%d\\n" % idx)
            os.close(fd)
            return {"x": np.full(16, idx, dtype=np.float32)}

    config = {
        "data_set": {"use_cache": True, "preload_cache": True, "preload_threads": 2},
        "raycache": {"linger_s": 1.0, "preload_cpus": 0.5},
    }
    cache = DataCache(config, Squares())
    cache.start_preload_thread()
    clients = 0
    deadline = time.monotonic() + 120
    while clients < 2 and time.monotonic() < deadline:
        clients = max(clients, cache.stats()["clients"])
        time.sleep(0.2)
    if clients >= 2:
        open(os.path.join(SEEN, str(os.getpid())), "w").close()
    assert cache.wait_for_preload(timeout=120)
    values = [cache.try_fetch(i) for i in range(N)]
    ok = all(v is not None and float(v["x"][0]) == i for i, v in enumerate(values))
    import ray
    print(json.dumps({
        "clients": clients,
        "ok": ok,
        "address": ray.get_runtime_context().gcs_address,
        "name": cache.name,
    }), flush=True)
    # Stay attached until the other script has seen this one: a script that starts its
    # polling late (a slow start on a loaded machine) must still find both attached.
    while len(os.listdir(SEEN)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    cache.close()
    """
)


@pytest.fixture
def isolated_env():
    """An environment with no Ray to find: a short private TMPDIR, no RAY_ADDRESS."""
    tmp = tempfile.mkdtemp(prefix="rcn", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "XDG_RUNTIME_DIR")}
    env.update(
        TMPDIR=tmp,
        PYTHONPATH=str(REPO),
        RAYCACHE_NODE_LINGER_S="2",
    )
    yield env, Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def _host_record(tmp: Path) -> dict:
    return json.loads((tmp / f"raycache-{os.getuid()}" / "node.json").read_text())


def _processes_of_session(session_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            if proc.info["uids"].real != os.getuid():
                continue
            if any(session_dir in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError, AttributeError):
            continue
    return found


def test_two_scripts_share_one_node_ray_that_goes_away(isolated_env):
    env, tmp = isolated_env
    script = tmp / "train.py"
    script.write_text(SCRIPT)
    reads = tmp / "reads.log"
    seen = tmp / "seen"
    seen.mkdir()
    n = 300
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(n), str(reads), str(seen)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["address"] == outs[1]["address"], "the two scripts used two Rays"
    assert outs[0]["address"].startswith("127.0.0.1:")
    assert all(o["ok"] for o in outs)
    assert [o["clients"] for o in outs] == [2, 2]
    lines = reads.read_text().split()
    assert sorted(map(int, lines)) == list(range(n)), "each item read from the provider once"

    record = _host_record(tmp)
    host = psutil.Process(record["pid"])
    # linger_s (1 s) frees the cache, then the host's linger (2 s) stops Ray.
    gone, alive = psutil.wait_procs([host], timeout=90)
    assert not alive, "the node Ray host did not exit"
    deadline = time.monotonic() + 30
    left = _processes_of_session(record["session_dir"])
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _processes_of_session(record["session_dir"])
    assert not left, f"Ray processes left behind: {[p.pid for p in left]}"
    assert not (tmp / f"raycache-{os.getuid()}" / "node.json").exists()


def test_node_ray_listens_on_loopback_only(isolated_env):
    env, tmp = isolated_env
    code = textwrap.dedent(
        """
        import json, os, psutil, ray
        from raycache.runtime import ensure_ray
        ensure_ray()
        from raycache.node_ray import read_host
        record = read_host()
        host = psutil.Process(record["pid"])
        procs = [host, *host.children(recursive=True), psutil.Process()]
        listening = []
        for p in procs:
            try:
                conns = p.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            listening += [
                [p.name(), c.laddr.ip, c.laddr.port]
                for c in conns if c.status == psutil.CONN_LISTEN
            ]
        # A sibling handed the address explicitly (as a DDP rank is by rank 0), with
        # none of the settings this process picked up, joins the same Ray.
        import subprocess, sys
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
        sibling = subprocess.run(
            [sys.executable, "-c",
             "import ray; from raycache.runtime import ensure_ray; "
             f"ensure_ray({record['address']!r}); "
             "print(ray.get_runtime_context().gcs_address)"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert sibling.returncode == 0, sibling.stderr
        joined = sibling.stdout.strip().splitlines()[-1]
        print(json.dumps({"listening": listening, "host": record["pid"], "sibling": joined,
                          "address": record["address"]}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sibling"] == out["address"], "a sibling given the address joined elsewhere"
    assert out["listening"], "found no listening socket to check"
    for name, ip, port in out["listening"]:
        assert ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), f"{name} listens on {ip}:{port}"
    assert "8265" not in [str(port) for _, _, port in out["listening"]], "dashboard is on"
    gone, alive = psutil.wait_procs([psutil.Process(out["host"])], timeout=90)
    assert not alive, "the node Ray host did not exit after its only user"


def test_directory_of_another_mode_is_refused(isolated_env, monkeypatch):
    from raycache import node_ray

    env, tmp = isolated_env
    shared = tmp / "open"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv("RAYCACHE_NODE_DIR", str(shared))
    with pytest.raises(node_ray.NodeRayError, match="mode 755"):
        node_ray.attach(start=True)


def test_a_kept_preload_exits_3_rather_than_fill_a_private_ray(isolated_env):
    env, tmp = isolated_env
    shared = tmp / "open"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (tmp / "prov.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            class Squares:
                def __len__(self):
                    return 8

                def __getitem__(self, idx):
                    return {"x": np.full(4, idx, dtype=np.float32)}

            def make(config):
                return Squares()
            """
        )
    )
    cfg = tmp / "cfg.toml"
    cfg.write_text('[raycache]\nname = "kept-private"\nprovider = "prov:make"\n')
    env = dict(env, RAYCACHE_NODE_DIR=str(shared), PYTHONPATH=f"{tmp}{os.pathsep}{REPO}")
    proc = subprocess.run(
        [sys.executable, "-m", "raycache", "preload", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp,
    )
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "mode 755" in lines[0] and "--no-keep" in lines[0], lines[0]
    assert "private Ray" not in proc.stderr and proc.stdout == ""
