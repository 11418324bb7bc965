"""``raycache preload``: preload once, train many, with real processes and the real CLI."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
N = 200
ITEM_FLOATS = 16384  # 64 KiB per item: 12.5 MiB in all, well above store noise

PROVIDER_MODULE = textwrap.dedent(
    """
    import os
    import numpy as np

    class Squares:
        def __init__(self, n, reads, fail_at=()):
            self.n, self.reads, self.fail_at = n, reads, tuple(fail_at)

        def __len__(self):
            return self.n

        def __getitem__(self, idx):
            fd = os.open(self.reads, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(fd, b"%d\\n" % idx)
            os.close(fd)
            if idx in self.fail_at:
                raise ValueError(f"bad item {idx}")
            return {"x": np.full(ITEM_FLOATS, idx, dtype=np.float32)}

    ITEM_FLOATS = @FLOATS@

    def make(config):
        ds = config["data_set"]
        return Squares(ds["n_items"], ds["reads_file"], ds.get("fail_at", ()))
    """
).replace("@FLOATS@", str(ITEM_FLOATS))

# The training script: epoch 1 over every index, then `raycache list --json` while it
# is still attached. PROVIDER is either an import from the module the preload used or
# a class defined in the script itself.
TRAIN = textwrap.dedent(
    """
    import json, os, subprocess, sys
    import numpy as np
    from raycache import CachedDataset
    %(provider)s
    name, reads = sys.argv[1], sys.argv[2]
    config = {
        "data_set": {"use_cache": True, "preload_cache": False},
        "raycache": {"name": name, "linger_s": 1.0},
    }
    ds = CachedDataset(Squares(%(n)d, reads), config)
    ok = all(float(ds[i]["x"][0]) == i for i in range(len(ds)))
    listing = subprocess.run(
        [sys.executable, "-m", "raycache", "list", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    print(json.dumps({"ok": ok, "list": json.loads(listing.stdout), "rc": listing.returncode}))
    ds.cache.close()
    """
)

SCRIPT_DEFINED = textwrap.dedent(
    """
    class Squares:
        def __init__(self, n, reads, fail_at=()):
            self.n, self.reads, self.fail_at = n, reads, tuple(fail_at)
        def __len__(self):
            return self.n
        def __getitem__(self, idx):
            fd = os.open(self.reads, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(fd, b"%d\\n" % idx)
            os.close(fd)
            return {"x": np.full(16384, idx, dtype=np.float32)}
    """
)


def write_config(
    tmp: Path, name: str, extra: str = "", provider: str = "mymod:make", n: int = N
) -> Path:
    cfg = tmp / f"{name}.toml"
    provider_line = f'provider = "{provider}"' if provider else ""
    cfg.write_text(
        textwrap.dedent(
            f"""
            [data_set]
            n_items = {n}
            reads_file = "{tmp / (name + ".reads")}"
            preload_threads = 4
            {extra}

            [raycache]
            name = "{name}"
            linger_s = 1.0
            preload_cpus = 0.5
            {provider_line}
            """
        )
    )
    return cfg


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "mymod.py").write_text(PROVIDER_MODULE)
    return tmp_path


def run(args: list, tmp: Path, address: str | None, timeout: float = 240.0):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp), str(REPO)]))
    if address is not None:
        env["RAY_ADDRESS"] = address
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp
    )


def reads(tmp: Path, name: str) -> list[int]:
    path = tmp / f"{name}.reads"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def store_used_bytes(address: str) -> int:
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    reply = get_memory_info_reply(get_state_from_address(address))
    return int(reply.store_stats.object_store_bytes_used)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_preload_once_train_warm_then_drop(ray_address, workdir, cache_name):
    cfg = write_config(workdir, cache_name)
    proc = run(["-m", "raycache", "preload", str(cfg), "--address", ray_address], workdir, None)
    assert proc.returncode == 0, proc.stderr
    assert f"{N} items" in proc.stdout and "kept" in proc.stdout
    assert sorted(reads(workdir, cache_name)) == list(range(N))

    (workdir / "train.py").write_text(TRAIN % {"provider": "from mymod import Squares", "n": N})
    proc = run(["train.py", cache_name, str(workdir / f"{cache_name}.reads")], workdir, ray_address)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"]
    assert len(reads(workdir, cache_name)) == N, "epoch 1 read the provider"
    row = {r["name"]: r for r in out["list"]}[cache_name]
    assert row["items"] == N and row["length"] == N and row["bytes"] >= N * ITEM_FLOATS * 4
    assert row["clients"] == 1 and row["detached"] is True

    proc = run(["-m", "raycache", "stats", cache_name, "--json"], workdir, ray_address)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["items"] == N

    before = store_used_bytes(ray_address)
    proc = run(["-m", "raycache", "drop", cache_name], workdir, ray_address)
    assert proc.returncode == 0, proc.stderr
    freed = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        freed = before - store_used_bytes(ray_address)
        if freed >= N * ITEM_FLOATS * 4:
            break
        time.sleep(0.2)
    assert freed >= N * ITEM_FLOATS * 4, f"drop returned only {freed} bytes of the store"


def test_training_script_defining_its_own_class_attaches_warm(ray_address, workdir, cache_name):
    cfg = write_config(workdir, cache_name)
    proc = run(["-m", "raycache", "preload", str(cfg), "--address", ray_address], workdir, None)
    assert proc.returncode == 0, proc.stderr
    (workdir / "train.py").write_text(TRAIN % {"provider": SCRIPT_DEFINED, "n": N})
    proc = run(["train.py", cache_name, str(workdir / f"{cache_name}.reads")], workdir, ray_address)
    try:
        assert proc.returncode == 0, proc.stderr
        assert len(reads(workdir, cache_name)) == N, "epoch 1 read the provider"
    finally:
        run(["-m", "raycache", "drop", cache_name], workdir, ray_address)


def test_provider_file_override_and_no_keep(ray_address, workdir, cache_name):
    (workdir / "script.py").write_text(PROVIDER_MODULE)
    cfg = write_config(workdir, cache_name, provider="nosuch.module:make")
    proc = run(
        ["-m", "raycache", "preload", str(cfg), "--provider", "script.py:make", "--no-keep"],
        workdir,
        ray_address,
    )
    assert proc.returncode == 0, proc.stderr
    assert "not kept" in proc.stdout
    from raycache.admin import list_caches

    deadline = time.monotonic() + 60  # linger_s (1 s) plus the actor's reap interval
    while cache_name in list_caches() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cache_name not in list_caches(), "a --no-keep cache outlived its linger"


@pytest.mark.parametrize("on_error, verb", [("continue", "failed at"), ("stop", "stopped at")])
def test_provider_error_is_reported_with_its_index(
    ray_address, workdir, cache_name, on_error, verb
):
    cfg = write_config(workdir, cache_name, extra="fail_at = [7]")
    proc = run(
        ["-m", "raycache", "preload", str(cfg), "--on-error", on_error], workdir, ray_address
    )
    try:
        assert proc.returncode == 1, proc.stderr
        line = one_line(proc.stderr)
        assert "index 7" in line and "bad item 7" in line and verb in line
    finally:
        run(["-m", "raycache", "drop", cache_name], workdir, ray_address)


def test_a_provider_ray_workers_cannot_import_exits_1_and_drops_the_empty_cache(
    ray_address, workdir, cache_name
):
    # The provider file is shipped by value, but the class it imports is pickled by
    # reference, from a directory only this command's process has on its path.
    hidden = workdir / "driver_only"
    hidden.mkdir()
    (hidden / "driver_only_squares.py").write_text(PROVIDER_MODULE)
    (workdir / "make_hidden.py").write_text(
        f"import sys\nsys.path.insert(0, {str(hidden)!r})\nfrom driver_only_squares import make\n"
    )
    cfg = write_config(workdir, cache_name, provider="make_hidden.py:make")
    proc = run(["-m", "raycache", "preload", str(cfg)], workdir, ray_address)
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert "every preload task failed" in line, line
    assert "ModuleNotFoundError: No module named 'driver_only_squares'" in line, line
    assert line.endswith("the empty cache was dropped"), line
    listing = run(["-m", "raycache", "list", "--json"], workdir, ray_address)
    assert listing.returncode == 0 and cache_name not in listing.stdout, listing.stdout


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("badkey", "nosuchkey"),
        ("noprovider", "no provider"),
        ("notimportable", "cannot import provider module 'nosuch_mod'"),
        ("noattr", "has no attribute 'nothing'"),
    ],
)
def test_config_and_provider_errors_exit_2(workdir, cache_name, case, expected):
    if case == "missing":
        cfg = workdir / "absent.toml"
    elif case == "badkey":
        cfg = write_config(workdir, cache_name)
        cfg.write_text(cfg.read_text() + "nosuchkey = 1\n")
    elif case == "noprovider":
        cfg = write_config(workdir, cache_name, provider="")
    elif case == "notimportable":
        cfg = write_config(workdir, cache_name, provider="nosuch_mod:make")
    else:
        cfg = write_config(workdir, cache_name, provider="mymod:nothing")
    # No Ray address: each of these fails before any Ray is needed.
    proc = run(["-m", "raycache", "preload", str(cfg)], workdir, None, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expected in one_line(proc.stderr)


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_timeout_must_be_a_number_above_zero(workdir, cache_name, value):
    cfg = write_config(workdir, cache_name)
    proc = run(["-m", "raycache", "preload", str(cfg), f"--timeout={value}"], workdir, None)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith("raycache preload: argument --timeout: must be a number of seconds > 0")
    assert line.endswith("(see 'raycache preload --help')"), line
    assert reads(workdir, cache_name) == [], "the provider was read"


def test_a_provider_without_items_exits_1_and_makes_no_cache(ray_address, workdir, cache_name):
    cfg = write_config(workdir, cache_name, n=0)
    proc = run(["-m", "raycache", "preload", str(cfg)], workdir, ray_address)
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert "the provider from 'mymod:make' has no items (its length is 0)" in line, line
    assert "no cache was made" in line and proc.stdout == ""
    from raycache.admin import list_caches

    assert cache_name not in list_caches(None), "an empty cache was left behind"


def test_the_kept_line_suggests_a_drop_in_the_namespace_used(ray_address, workdir, cache_name):
    cfg = write_config(workdir, cache_name, n=8)
    proc = run(["-m", "raycache", "preload", str(cfg), "--namespace", "nsx"], workdir, ray_address)
    assert proc.returncode == 0, proc.stderr
    suggested = f"raycache drop {cache_name} --namespace nsx"
    assert proc.stdout.strip().endswith(f"kept until '{suggested}'"), proc.stdout
    # The suggested command, as given, finds and drops the cache.
    proc = run(["-m", *shlex.split(suggested)], workdir, ray_address)
    assert proc.returncode == 0 and f"dropped {cache_name}" in proc.stdout, proc.stderr
    from raycache.admin import list_caches

    assert cache_name not in list_caches(None)


GATED_MODULE = textwrap.dedent(
    """
    import os, time

    class Gated:
        \"\"\"Items wait (at most 120 s) until the file ``gate`` exists.\"\"\"

        def __init__(self, n, gate):
            self.n, self.gate = n, gate

        def __len__(self):
            return self.n

        def __getitem__(self, idx):
            deadline = time.monotonic() + 120
            while not os.path.exists(self.gate):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gate {self.gate} not opened in 120 s")
                time.sleep(0.02)
            return {"x": idx}

    def make(config):
        return Gated(config["data_set"]["n_items"], config["data_set"]["reads_file"] + ".gate")
    """
)

# The command, with a progress line at every poll instead of every 5 s.
EVERY_POLL = (
    "import sys, raycache.preload_command as pc; pc.LOG_INTERVAL_S = 0.0; "
    "from raycache.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_progress_lines_say_eta_unknown_until_items_are_cached(ray_address, workdir, cache_name):
    (workdir / "gated.py").write_text(GATED_MODULE)
    cfg = write_config(workdir, cache_name, provider="gated:make", n=8)
    gate = workdir / f"{cache_name}.reads.gate"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(workdir), str(REPO)]))
    env["RAY_ADDRESS"] = ray_address
    proc = subprocess.Popen(
        [sys.executable, "-c", EVERY_POLL, "preload", str(cfg), "--progress", "log"],
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True)
    reader.start()
    try:
        prefix = f"preload {cache_name}: "
        first = ""
        deadline = time.monotonic() + 120
        while not first.startswith(prefix):
            first = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        # Nothing can be cached before the gate opens: no rate, so no ETA yet.
        assert first.startswith(prefix + "0/8 items") and "ETA ?," in first, first
        assert "nan" not in first
        gate.touch()
        proc.wait(timeout=120)  # stderr is the reader thread's alone
        out = proc.stdout.read()
        reader.join(timeout=30)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        run(["-m", "raycache", "drop", cache_name], workdir, ray_address)
    rest = []
    while not lines.empty():
        rest.append(lines.get_nowait())
    progress = [line for line in rest if line.startswith(prefix)]
    assert progress and all("nan" not in line for line in progress), rest
    assert re.search(r"8/8 items, .* ETA 0 s, 0 errors", progress[-1]), progress
