"""Shared fixtures: one real local Ray per test module, and a subprocess runner."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
import ray.cloudpickle

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import providers  # noqa: E402

# Ray workers do not have tests/ on their path: ship the test providers by value.
ray.cloudpickle.register_pickle_by_value(providers)


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


@pytest.fixture(scope="module")
def ray_address():
    """Start one local Ray for the module and return the address others join it by."""
    with local_ray() as address:
        yield address


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
