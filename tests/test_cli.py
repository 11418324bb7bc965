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


@pytest.mark.parametrize(
    "args, prog, names",
    [
        (["list", "--bogus"], "raycache list", "--bogus"),  # unknown option
        (["stats"], "raycache stats", "name"),  # missing argument
        (["preload", "x.toml", "--on-error", "maybe"], "raycache preload", "'maybe'"),  # choice
        (["list", "--json", "extra"], "raycache list", "extra"),  # extra argument
        (["drop", "a", "b"], "raycache drop", "b"),
        (["stats", "x", "--timeout"], "raycache stats", "--timeout"),  # option without value
        (["nosuchcommand"], "raycache", "'nosuchcommand'"),
        ([], "raycache", "COMMAND"),
        (["--bogus", "list"], "raycache", "--bogus"),  # before the command: raycache's own
    ],
)
def test_usage_errors_are_one_line_naming_the_command(args, prog, names):
    proc = cli(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith(f"{prog}: ") and line.endswith(f"(see '{prog} --help')"), line
    assert names in line, line
    assert "usage:" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ["stats", "somecache", "--timeout", "-5"],
        ["stats", "somecache", "--timeout=0"],
        ["list", "--timeout", "-1"],
        ["list", "--timeout", "nan"],
        ["list", "--timeout", "soon"],
    ],
)
def test_timeout_must_be_a_number_above_zero(args):
    # Refused by the parser, before any Ray is looked for (a negative wait crashed in Ray).
    proc = cli(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert line.startswith(f"raycache {args[0]}: argument --timeout: "), line
    assert "must be a number of seconds > 0" in line and repr(args[-1].split("=")[-1]) in line


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


def make_cache(name: str, address: str, namespace: str = "raycache", n: int = 40) -> None:
    """Make a kept cache ``name`` of ``n`` ArrayProvider items on the test's Ray."""
    run_python(
        f"""
        from raycache import DataCache
        from providers import ArrayProvider
        config = {{"raycache": {{"name": "{name}", "namespace": "{namespace}", "detached": True}}}}
        provider = ArrayProvider({n})
        cache = DataCache(config, provider)
        for i in range({n}):
            cache.insert_into_cache(i, provider[i])
        assert cache.flush(timeout=30)
        cache.close()
        """,
        address,
    )


def test_stats_text_is_plain_and_a_late_answer_names_the_cache(ray_address, cache_name):
    make_cache(cache_name, ray_address)
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    try:
        proc = cli("stats", cache_name, env=env)
        assert proc.returncode == 0, proc.stderr
        lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
        assert lines["name"] == cache_name  # bare, not "..."
        assert lines["items"] == "40" and lines["detached"] == "true"
        assert re.fullmatch(r"\d+ \(\d+\.\d (B|KiB|MiB)\)", lines["bytes"]), lines["bytes"]
        assert lines["fingerprint"].startswith("ArrayProvider[40] ")
        proc = cli("stats", cache_name, "--json", env=env)
        assert json.loads(proc.stdout)["name"] == cache_name  # --json unchanged

        # A microsecond is less than any actor's answer takes: the wait times out.
        proc = cli("stats", cache_name, "--timeout", "0.000001", env=env)
        assert proc.returncode == 1, proc.stderr
        line = one_line(proc.stderr)
        assert line.startswith(f"raycache stats: cache {cache_name!r} "), line
        assert "GetTimeout" not in line
        assert "did not answer within --timeout 1e-06 seconds" in line, line

        proc = cli("list", "--timeout", "0.000001", env=env)
        assert proc.returncode == 0, proc.stderr
        row = [line for line in proc.stdout.splitlines() if line.startswith(cache_name)]
        assert row and row[0].endswith("no answer in 1e-06 s"), proc.stdout
        proc = cli("list", "--json", "--timeout", "0.000001", env=env)
        rows = {r["name"]: r for r in json.loads(proc.stdout)}
        assert rows[cache_name]["error"] == "no answer in 1e-06 s", rows[cache_name]
    finally:
        cli("drop", cache_name, env=env)


def test_suggested_commands_name_the_namespace(ray_address, cache_name):
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    make_cache(cache_name, ray_address, namespace="nsx", n=4)
    try:
        for command in ("stats", "drop"):
            proc = cli(command, cache_name + "-missing", "--namespace", "nsx", env=env)
            assert proc.returncode == 1, proc.stderr
            line = one_line(proc.stderr)
            assert line.endswith("('raycache list --namespace nsx' shows the caches there)"), line
        # The suggested command finds the namespace's cache.
        proc = cli("list", "--namespace", "nsx", env=env)
        assert proc.returncode == 0 and cache_name in proc.stdout, proc.stderr
        proc = cli("stats", cache_name + "-missing", env=env)
        assert one_line(proc.stderr).endswith("('raycache list' shows the caches there)")
        # An address given is part of the suggestion too.
        proc = cli("drop", cache_name + "-missing", "--namespace", "nsx", "--address", ray_address)
        assert proc.returncode == 1, proc.stderr
        hint = f"('raycache list --namespace nsx --address {ray_address}' shows the caches there)"
        assert one_line(proc.stderr).endswith(hint)
    finally:
        cli("drop", cache_name, "--namespace", "nsx", env=env)


class socket_bound_then_closed:
    """Yield a loopback port that nothing listens on once the block ends."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
