"""Ray's token file is private (0600, in a 0700 ``~/.ray``) wherever raycache starts Ray.

The unit tests call ``raycache.auth_token.prepare_token`` on files in a temporary
directory under the common umask 022. The end-to-end test runs a script with its own
HOME and TMPDIR and no Ray to find, so raycache starts the node Ray itself, and checks
the token file Ray then uses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest

from raycache.auth_token import TOKEN_MODE, default_token_path, prepare_token

REPO = Path(__file__).resolve().parent.parent


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual umask, under which Ray's own token is 0644
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_token_is_0600_in_a_new_0700_directory(tmp_path, umask_022):
    path = tmp_path / ".ray" / "auth_token"
    assert prepare_token(path) == "created"
    assert _mode(path) == TOKEN_MODE and _mode(path.parent) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 bits in hex, as Ray makes them
    assert prepare_token(path) == "kept"
    assert path.read_text() == token


def test_an_existing_directory_keeps_its_mode(tmp_path, umask_022):
    (tmp_path / ".ray").mkdir(mode=0o755)
    path = tmp_path / ".ray" / "auth_token"
    assert prepare_token(path) == "created"
    assert _mode(path) == TOKEN_MODE and _mode(path.parent) == 0o755


def test_a_token_others_can_read_is_made_0600_and_kept(tmp_path, umask_022, caplog):
    caplog.set_level(logging.WARNING, logger="raycache")
    path = tmp_path / "auth_token"
    path.write_text("f" * 64)
    os.chmod(path, 0o644)
    assert prepare_token(path) == "repaired"
    assert _mode(path) == TOKEN_MODE and path.read_text() == "f" * 64
    assert any("mode 644" in r.getMessage() for r in caplog.records), caplog.text


def test_a_link_is_neither_followed_nor_changed(tmp_path, umask_022):
    target = tmp_path / "elsewhere"
    target.write_text("e" * 64)
    os.chmod(target, 0o644)
    path = tmp_path / "auth_token"
    path.symlink_to(target)
    assert prepare_token(path) == "kept"
    assert _mode(target) == 0o644 and target.read_text() == "e" * 64


@pytest.mark.parametrize(
    "env",
    [{"RAY_AUTH_TOKEN": "a" * 64}, {"RAY_AUTH_TOKEN_PATH": "/x"}, {"RAY_AUTH_MODE": "disabled"}],
)
def test_a_token_the_environment_decides_is_not_touched(tmp_path, monkeypatch, env):
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert default_token_path() == tmp_path / ".ray" / "auth_token"
    assert prepare_token() == "not used"
    assert not (tmp_path / ".ray").exists()


SCRIPT = textwrap.dedent(
    """
    import json, os
    os.umask(0o022)
    import ray
    from raycache.runtime import ensure_ray, gcs_address
    from raycache.node_ray import read_host
    ensure_ray()
    ray.get(ray.remote(lambda: 1).remote(), timeout=60)  # the token works
    print(json.dumps({"address": gcs_address(), "host": read_host()}))
    ray.shutdown()
    """
)


def test_the_node_ray_raycache_starts_uses_a_private_token():
    tmp = Path(tempfile.mkdtemp(prefix="rct", dir="/tmp"))  # short: Ray's socket paths
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "XDG_RUNTIME"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(REPO), RAYCACHE_NODE_LINGER_S="1")
    host_pid = None
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        host_pid = (record["host"] or {}).get("pid")
        token = home / ".ray" / "auth_token"
        assert _mode(token) == TOKEN_MODE, oct(_mode(token))
        assert _mode(token.parent) == 0o700, oct(_mode(token.parent))
        assert len(token.read_text()) == 64
    finally:
        # The node Ray stops by itself once its last user is gone (linger 1 s).
        if host_pid is not None and psutil.pid_exists(host_pid):
            try:
                psutil.Process(host_pid).wait(timeout=60)
            except psutil.TimeoutExpired:
                psutil.Process(host_pid).terminate()
                psutil.Process(host_pid).wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    assert host_pid is not None, "the script did not run on the node Ray"
