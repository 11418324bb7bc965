"""The busy-node benchmark scenarios run end to end at a tiny size and clean up.

Only what they report is checked (every scenario and variant present, with its ratio to
the dict cache), never a speed: the machine running the tests is not quiet. One trainer
process per way of reading (the benchmark runs two) keeps the test to what it checks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raycache.tools.bench import source_root

ROOT = source_root()


@pytest.mark.timeout(600)
def test_busy_scenarios_report_every_variant_against_the_dict_cache():
    cmd = [
        sys.executable, "-m", "benchmarks.run_benchmarks", "--only", "busy",
        "--busy-items", "128", "--busy-trainers", "1", "--busy-epochs", "1", "--rounds", "1",
        "--num-cpus", "2", "--object-store-mb", "256", "--no-report",
    ]  # fmt: skip
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    table = [line for line in proc.stdout.splitlines() if line.startswith("| busy node")]
    for scenario in ("(a)", "(b)", "(c)"):
        rows = [line for line in table if f"busy node {scenario}" in line]
        variants = {"dict cache", "raycache, collate_fn=ds.collate", "raycache, default_collate"}
        assert all(any(v in row for row in rows) for v in variants), (scenario, table)
    assert any("OMP_NUM_THREADS=1" in line for line in table)
    assert any("numpy gather (limit)" in line for line in table if "(a)" in line)


def test_spinner_is_a_separate_process_that_ends_when_killed():
    sys.path.insert(0, str(ROOT))
    from benchmarks.busy import spinner

    proc = spinner()
    try:
        assert proc.poll() is None  # running
    finally:
        proc.kill()
    assert proc.wait(timeout=30) != 0
