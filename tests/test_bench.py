"""``raycache bench`` is a tool of the source tree: it writes where ``--out`` says.

One small run of the suite (the fill-on-miss scenario at a tiny size, one round) writes its
page and figure under ``--out`` and nothing under the repository's ``docs/`` or the
working directory; the rest is checked without Ray: the default folder, the one-line
error where the suite is not found, and the report template's fields.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raycache.tools.bench import BenchmarksNotFound, source_root

ROOT = source_root()
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _tree(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time in ns."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.timeout(180)
def test_bench_writes_its_report_under_out_only(tmp_path):
    pytest.importorskip("matplotlib")  # the bench extra draws benchmarks.png
    docs_before = _tree(ROOT / "docs")
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "report"
    cmd = [
        sys.executable, "-m", "raycache.tools.bench", "--only", "fill",
        "--fill-items", "64", "--warm-large-items", "64", "--first-rounds", "1",
        "--num-cpus", "2", "--object-store-mb", "256", "--out", str(out),
    ]  # fmt: skip
    # The raycache under test, wherever the working directory is.
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])

    page = (out / "benchmarks.md").read_text()
    assert (out / "benchmarks.png").stat().st_size > 0
    assert page.startswith("# Benchmarks")
    assert "<!--" not in page and "$" not in page  # the template's note and every field filled
    assert "first epoch filling on miss, 2 ms I/O latency per item, n=64" in page
    assert "raycache bench --only fill" in page
    assert _tree(ROOT / "docs") == docs_before
    assert list(work.iterdir()) == []  # no default results folder, no docs/, when --out is given


def test_default_out_is_a_results_folder_in_the_working_directory():
    from benchmarks.suite import DEFAULT_OUT, parse_args

    assert parse_args([]).out == Path(DEFAULT_OUT) == Path("raycache-bench-results")
    assert parse_args(["--out", "docs"]).out == Path("docs")


def test_missing_suite_is_a_one_line_error(tmp_path):
    with pytest.raises(BenchmarksNotFound) as info:
        source_root(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "benchmarks/suite.py" in message and "pip install -e" in message


def test_report_template_has_every_field_the_bench_fills():
    from benchmarks.report import TEMPLATE, render

    fields = dict.fromkeys(
        ["store", "rounds", "raydata", "threads", "spin", "scale", "env", "argv", "wall"], "x"
    )
    page = render(TEMPLATE.read_text(), table="TABLE", summary="SUMMARY", **fields)
    assert "TABLE" in page and "SUMMARY" in page and "$" not in page
    with pytest.raises(KeyError):
        render(TEMPLATE.read_text(), table="TABLE")
