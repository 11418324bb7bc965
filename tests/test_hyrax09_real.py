"""Real Hyrax 0.13 trains with raycache's cache: every item read once, on one cache.

Each test runs ``hyrax09_train.py`` (a user's training script: ``raycache.hyrax.install()``
at its top, a dataset class of its own that logs each provider read with its pid) in a
subprocess joined to the test's Ray, with Hyrax 0.13 from ``scripts/hyrax_env.sh`` on its
path, then runs it again in check mode: Hyrax's own ``DataProvider`` resolves every item
and raycache's ``DataCache`` fetches it from the shared cache. The tests skip when that
Hyrax directory is absent.

The distributed case makes Hyrax's train verb see two CUDA devices and use gloo (Hyrax
0.13 takes its ``idist.Parallel`` path only with ``torch.cuda.device_count() > 1``, and
hard-codes nccl); see ``hyrax09_train.show_two_devices``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import raycache

ROOT = Path(__file__).resolve().parent.parent
HYRAX_DIR = Path(os.environ.get("RAYCACHE_HYRAX013_DIR", ROOT / ".hyrax-0.13"))

pytestmark = pytest.mark.skipif(
    not (HYRAX_DIR / "hyrax" / "datasets" / "data_cache.py").exists(),
    reason=f"Hyrax 0.13 is not installed in {HYRAX_DIR}: run scripts/hyrax_env.sh",
)

SIZE = 200


def run_script(options: dict, tmp_path: Path, address: str, timeout: float = 300) -> dict:
    """Run the training script with ``options``; return its RESULT line as a dict."""
    path = tmp_path / f"options-{len(list(tmp_path.glob('options-*')))}.json"
    path.write_text(json.dumps(options))
    env = dict(
        os.environ,
        RAY_ADDRESS=address,
        PYTHONPATH=os.pathsep.join([str(HYRAX_DIR), str(ROOT), str(ROOT / "tests")]),
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "hyrax09_train.py"), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT ") :])


def reads(log: Path) -> tuple[Counter, set[int]]:
    """Provider reads per index, and the pids that read."""
    counts: Counter = Counter()
    pids = set()
    for line in log.read_text().splitlines():
        pid, idx = line.split()
        counts[int(idx)] += 1
        pids.add(int(pid))
    return counts, pids


CASES = {
    "one process": ({}, 1),
    "2 persistent workers": ({"num_workers": 2, "persistent_workers": True}, 3),
    "2 workers, not persistent": ({"num_workers": 2, "persistent_workers": False}, 3),
    # Spawned ranks unpickle the dataset; its metadata table's digest changes then, so
    # this case states the dataset's identity (hyrax09_train.CountingDataset).
    "2 DDP ranks": ({"distributed": True, "state_identity": True}, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_reads_each_item_once(case, tmp_path, ray_address):
    extra, min_pids = CASES[case]
    common = {"size": SIZE, "results_dir": str(tmp_path), "raycache": {"linger_s": 120}}
    common.update(extra)
    trained = run_script(
        dict(common, cache="raycache", epochs=2, reads_log=str(tmp_path / "reads.log")),
        tmp_path,
        ray_address,
    )
    counts, pids = reads(tmp_path / "reads.log")
    # The case ran as described: reads happened in the workers or ranks too.
    assert len(pids) >= min_pids, (case, pids)
    twice = {idx: n for idx, n in counts.items() if n > 1}
    assert not twice, f"{case}: items read more than once: {twice}"

    checked = run_script(
        dict(common, cache="hyrax", check=True, reads_log=str(tmp_path / "check.log")),
        tmp_path,
        ray_address,
    )
    try:
        assert checked["wrong"] == [], "cached values differ from Hyrax's own resolution"
        assert set(checked["missing"]) == set(range(SIZE)) - set(counts)
        assert checked["items"] == len(counts)
        # One copy on the node: the cache's bytes are about one copy of what was read
        # (arrays plus a little per item), and there is one cache for this dataset.
        assert checked["items"] * checked["item_bytes"] <= checked["bytes"]
        assert checked["bytes"] < 2 * checked["items"] * checked["item_bytes"]
        assert raycache.list_caches().count(checked["name"]) == 1
        assert trained["wall_s"] > 0
    finally:
        raycache.drop_cache(checked["name"])
