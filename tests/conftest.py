"""Shared fixtures: one real local Ray for the session, joined by each module; a subprocess runner.

Starting a Ray takes 7-8 s on a loaded 2-core machine and joining a running one ~0.1 s, so
the session starts one (in a child process that holds it, so that every module can join it
as a driver of its own and leave) and each module that asks for ``ray_address`` joins it
for its tests. Modules that need a Ray of another shape (CPUs, store size) or that stop
Ray's processes start their own with :func:`local_ray` or ``ray.cluster_utils.Cluster``.

``scripts/test.sh`` runs the suite in two pytest-xdist workers: each has its session Ray,
its own temporary directory (below) and whole test files, so a module's Ray and fixtures
are set up once.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# The suite runs in two pytest-xdist workers (scripts/test.sh). Each worker is a machine of
# its own for what a user's processes find by a per-user path: the node Ray
# (``<tmp>/raycache-<uid>``) and Ray's temp files both follow TMPDIR. The directory is short,
# because Ray's socket paths are made under it.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _XDIST_WORKER:
    os.environ["TMPDIR"] = tempfile.mkdtemp(prefix=f"rc-{_XDIST_WORKER}-", dir="/tmp")
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again

# Ray 2.60 turns token authentication on for each Ray that ray.init() starts, by setting
# RAY_AUTH_MODE=token in the process that starts it (and so in that process's children).
# A process that joins a Ray by its address reads the mode once, when it imports ray: the
# tests join the session's Ray (started by a holder process), so the mode is set first.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray  # noqa: E402
import ray.cloudpickle  # noqa: E402

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import providers  # noqa: E402

# Ray workers do not have tests/ on their path: ship the test providers by value.
ray.cloudpickle.register_pickle_by_value(providers)


def pytest_configure(config: pytest.Config) -> None:
    """Make the user's Ray token now, if there is none, before any worker starts a Ray.

    A Ray that ``ray.init`` starts writes ``~/.ray/auth_token`` when it is missing: two
    pytest-xdist workers starting theirs at once would each write a token of their own, and
    one of the two Rays would refuse its own processes.
    """
    if not hasattr(config, "workerinput"):  # the session's controller (or a serial run)
        from ray._private.authentication.authentication_token_setup import (
            ensure_token_if_auth_enabled,
        )

        ensure_token_if_auth_enabled()


@contextmanager
def local_ray(num_cpus: int = 2, object_store_memory: int | None = None):
    """Start a Ray of the test's own (never one found on the machine); yield its address."""
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


SESSION_RAY_START_S = 120.0  # the holder prints the address within this
SESSION_RAY_STOP_S = 60.0  # and stops its Ray within this once its stdin closes

# The session's Ray holder: starts Ray as each module started its own before (2 CPUs, no
# dashboard), prints the address, and stops Ray when the session closes its stdin.
HOLDER = """
import logging, sys
import ray
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.fixture(scope="session")
def session_ray() -> Iterator[subprocess.Popen]:
    """Start the session's local Ray in a holder process; yield the holder (``.address``)."""
    # The source tree on the path of the Ray's workers, as for a Ray started from it:
    # benchmark rows run on this Ray unpickle ``benchmarks.*`` providers by reference.
    paths = [str(TESTS.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths))),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, for the last-resort kill
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], SESSION_RAY_START_S)
        address = proc.stdout.readline().strip() if ready else ""
        if not address:
            raise RuntimeError(
                f"the session's Ray did not start in {SESSION_RAY_START_S:.0f} s "
                f"(holder exit status {proc.poll()}); its stderr is above"
            )
        proc.address = address
        yield proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=SESSION_RAY_STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_address(session_ray: subprocess.Popen) -> Iterator[str]:
    """Join the session's Ray as this module's driver; return the address others join by."""
    if session_ray.poll() is not None:
        raise RuntimeError(
            f"the session's Ray holder exited ({session_ray.returncode}): an earlier module "
            "stopped its Ray; a test that stops Ray's processes needs a Ray of its own"
        )
    ray.init(address=session_ray.address, logging_level=logging.WARNING)
    try:
        yield session_ray.address
    finally:
        ray.shutdown()


@pytest.fixture
def cache_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def run_python(code: str, address: str, timeout: float = 120.0, returncode: int = 0) -> str:
    """Run ``code`` in a fresh Python process attached to the test's Ray; return stdout.

    The process must exit with ``returncode``.
    """
    env = dict(
        os.environ, RAY_ADDRESS=address, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)])
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != returncode:
        raise AssertionError(
            f"subprocess exited with {proc.returncode}, not {returncode}:\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout
