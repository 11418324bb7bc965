"""``raycache demo``, the README's first command, at a tiny size: it trains, checks
every rank's shard, prints its tables and leaves nothing running."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ranks import check_ranks

ITEMS = 256
EPOCHS = 2


def _command() -> list[str]:
    # The raycache of this interpreter and path, which a ``raycache`` script found on PATH
    # might not be.
    return [sys.executable, "-m", "raycache.cli"]


def _processes_naming(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd:
                found.append(f"{entry}: {cmd[:120]}")
    return found


def test_demo_runs_checks_and_cleans_up(tmp_path):
    report = tmp_path / "demo.json"
    cmd = _command() + [
        "demo", "--items", str(ITEMS), "--latency-ms", "1", "--epochs", str(EPOCHS),
        "--trainers", "2", "--batch-size", "32", "--json", str(report),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    out = proc.stdout
    assert proc.returncode == 0, (out[-4000:], proc.stderr[-6000:])

    # The two tables: with the cache, then without.
    assert "with raycache" in out and "without cache" in out
    assert out.count("hit ratio") == 2
    assert "CHECK FAILED" not in out
    assert re.search(r"warm epochs: [\d.]+ s with raycache", out)

    runs = json.loads(report.read_text())["runs"]
    assert [r["no_cache"] for r in runs] == [False, True]
    for run in runs:
        assert run["ok"] and len(run["rows"]) == EPOCHS
        check_ranks(run["ranks"], ITEMS, 2, EPOCHS)
    cached = runs[0]["rows"]
    assert cached[-1]["hit_ratio"] == 1.0  # warm epoch served from the cache
    assert cached[-1]["cache_bytes"] >= ITEMS * 3 * 64 * 64 * 4

    # Nothing left behind: not the demo's Ray, not its temporary data.
    address = re.search(r"started a local Ray at (\S+)", out).group(1)
    assert _processes_naming(address) == []
    data_dir = re.search(r"\) in (\S+) \(", out).group(1)
    assert not Path(data_dir).exists()


def test_demo_rejects_bad_options():
    proc = subprocess.run(
        _command() + ["demo", "--shape", "3x64"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "CxHxW" in proc.stderr
