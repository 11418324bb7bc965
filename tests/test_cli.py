"""The raycache command driven as a user would: exit codes, one-line errors, no hangs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import run_python

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["preload", "list", "stats", "drop"]


def cli(*args: str, env: dict | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``python -m raycache ARGS`` with this worktree first on the path."""
    base = dict(os.environ if env is None else env)
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    return subprocess.run(
        [sys.executable, "-m", "raycache", *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def no_ray_env():
    """A user environment with no Ray to find: private TMPDIR, no RAY_ADDRESS."""
    tmp = tempfile.mkdtemp(prefix="rcc", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "XDG_RUNTIME_DIR")}
    env["TMPDIR"] = tmp
    yield env, Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_text(command):
    proc = cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--address" in proc.stdout and "--namespace" in proc.stdout
    for markup in ("``", ":class:", ":func:", ":meth:"):
        assert markup not in proc.stdout
    if command in ("list", "stats"):
        assert "--json" in proc.stdout


def _commands_in_help() -> list[str]:
    """The commands ``raycache --help`` lists, read from its output."""
    proc = cli("--help")
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return re.findall(r"^    (\w+) ", listed, re.M)


def test_every_command_has_plain_help_and_a_docs_section():
    commands = _commands_in_help()
    assert set(COMMANDS) | {"demo", "bench"} <= set(commands), commands
    page = (REPO / "docs" / "cli.md").read_text()
    for command in commands:
        proc = cli(command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"usage: raycache {command}"), proc.stdout[:200]
        for markup in ("``", ":class:", ":func:", ":meth:", "Traceback"):
            assert markup not in proc.stdout + proc.stderr, (command, markup)
        assert f"`raycache {command}" in page, f"docs/cli.md has no section on {command}"


# The command-line front ends, whose output is what they print; everything else logs.
PRINTING_MODULES = ("raycache/cli.py", "raycache/preload_command.py", "raycache/tools/")


def test_library_modules_log_and_never_print():
    import ast

    printing = []
    for path in sorted((REPO / "raycache").rglob("*.py")):
        where = path.relative_to(REPO).as_posix()
        if where.startswith(PRINTING_MODULES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "print"
            ):
                printing.append(f"{where}:{node.lineno}")
    assert printing == [], f"print in library code (use the module's logger): {printing}"


def test_the_command_line_and_data_cache_do_not_import_torch():
    # torch takes seconds to import and most of a second to tear down; only a process that
    # reads batches (CachedDataset, the DataLoader) needs it.
    code = """
        import sys
        import raycache.cli, raycache.preload_command
        from raycache import DataCache
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
        from raycache import CachedDataset
        print("torch" in sys.modules)
        """
    assert run_python(code, address="", timeout=120).split() == ["[]", "True"]


def test_top_level_help_and_bad_usage():
    proc = cli("--help")
    assert proc.returncode == 0 and "exit status" in proc.stdout
    proc = cli("nosuchcommand")
    assert proc.returncode == 2


def test_no_ray_running(no_ray_env):
    env, tmp = no_ray_env
    start = time.monotonic()
    proc = cli("list", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "no Ray is running" in one_line(proc.stderr)
    proc = cli("list", "--json", env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    for command in ("stats", "drop"):
        proc = cli(command, "somecache", env=env)
        assert proc.returncode == 3, proc.stderr
        assert "no Ray is running" in one_line(proc.stderr)
    assert time.monotonic() - start < 60, "four calls with no Ray took too long"
    # Inspection never starts a Ray: no node Ray record, no Ray session.
    assert not (tmp / f"raycache-{os.getuid()}" / "node.json").exists()
    assert not (tmp / "ray").exists()


def test_stale_ray_start_file_fails_fast(no_ray_env):
    env, tmp = no_ray_env
    (tmp / "ray").mkdir()
    with socket_bound_then_closed() as port:
        (tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    start = time.monotonic()
    proc = cli("list", env=env, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 3, proc.stderr
    line = one_line(proc.stderr)
    assert f"127.0.0.1:{port}" in line and "ray start" in line
    assert elapsed < 20, f"a stale address took {elapsed:.1f} s to report"


def test_stale_node_record_means_no_ray(no_ray_env):
    env, tmp = no_ray_env
    directory = tmp / f"raycache-{os.getuid()}"
    directory.mkdir(mode=0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    with socket_bound_then_closed() as port:
        record = {"address": f"127.0.0.1:{port}", "pid": dead.pid, "session_dir": "/nonexistent"}
    (directory / "node.json").write_text(json.dumps(record))
    proc = cli("list", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "no Ray is running" in one_line(proc.stderr)


def test_bad_address():
    proc = cli("stats", "x", "--address", "127.0.0.1:1", timeout=60)
    assert proc.returncode == 3
    assert "127.0.0.1:1" in one_line(proc.stderr)
    proc = cli("list", "--address", "not-an-address", timeout=60)
    assert proc.returncode == 3
    assert "host:port" in one_line(proc.stderr)


def test_ensure_ray_reports_a_stale_address_within_seconds():
    code = """
        import time
        from raycache.runtime import ensure_ray, RayUnreachableError
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
        start = time.monotonic()
        try:
            ensure_ray(f"127.0.0.1:{port}")
        except RayUnreachableError as exc:
            print(round(time.monotonic() - start, 2), exc)
        """
    out = run_python(code, address="", timeout=60)
    seconds, _, message = out.strip().partition(" ")
    assert float(seconds) < 5 and "no Ray answers" in message


def test_list_stats_drop_with_a_cache(ray_address, cache_name):
    run_python(
        f"""
        from raycache import DataCache
        from providers import ArrayProvider
        config = {{"raycache": {{"name": "{cache_name}", "detached": True}}}}
        provider = ArrayProvider(40)
        cache = DataCache(config, provider)
        for i in range(40):
            cache.insert_into_cache(i, provider[i])
        assert cache.flush(timeout=30)
        cache.close()
        """,
        ray_address,
    )
    env = dict(os.environ, RAY_ADDRESS=ray_address)

    proc = cli("list", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Token authentication is enabled" not in proc.stderr
    row = [line for line in proc.stdout.splitlines() if line.startswith(cache_name)]
    assert row and "40/40" in row[0] and "yes" in row[0], proc.stdout

    proc = cli("list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows[cache_name]["items"] == 40 and rows[cache_name]["length"] == 40
    assert rows[cache_name]["bytes"] > 0 and rows[cache_name]["clients"] == 0

    proc = cli("stats", cache_name, "--json", "--address", ray_address)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["items"] == 40
    proc = cli("stats", cache_name, env=env)
    assert proc.returncode == 0 and "items: 40" in proc.stdout

    proc = cli("stats", cache_name + "-missing", env=env)
    assert proc.returncode == 1
    assert "no cache named" in one_line(proc.stderr)

    proc = cli("drop", cache_name, env=env)
    assert proc.returncode == 0 and f"dropped {cache_name}" in proc.stdout
    proc = cli("drop", cache_name, env=env)
    assert proc.returncode == 1
    assert "no cache named" in one_line(proc.stderr)


class socket_bound_then_closed:
    """Yield a loopback port that nothing listens on once the block ends."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
