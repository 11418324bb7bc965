"""Hyrax 0.13's own cache against raycache's, in Hyrax's train verb: reads, time, memory.

Runs ``tests/hyrax09_train.py`` (Hyrax 0.13 from ``scripts/hyrax_env.sh``, a dataset
whose reads each take ``--latency-ms`` and are logged) in a subprocess for each of three
set-ups: one process, 2 DDP ranks (gloo on CPU), 2 DataLoader workers (Hyrax's default,
not persistent); each with Hyrax's own cache and with ``raycache.hyrax.install()``,
interleaved (own, raycache, own, raycache for each set-up). Reported per run: provider
reads, the train verb's wall time, and the node's peak memory while it ran (PSS summed
over the training processes and, for raycache, the Ray session, sampled every 0.2 s).

Run: ``python -m benchmarks.hyrax_rows [--size 1000 --epochs 2 --rounds 1]``; it starts
its own local Ray. Prints a Markdown table and, with ``--json PATH``, writes the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray

import raycache
from raycache.tools.memory import node_memory

__all__ = ["main", "run_one", "run_rows"]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "hyrax09_train.py"
SETUPS = {
    "1 process": {},
    "2 DDP ranks": {"distributed": True, "state_identity": True},
    "2 workers": {"num_workers": 2, "persistent_workers": False},
}


def run_one(options: dict, hyrax_dir: Path, workdir: Path, address: str) -> dict:
    """Train once with ``options``; return reads, wall time and peak node memory.

    Parameters
    ----------
    options : dict
        Options of ``tests/hyrax09_train.py`` (``cache``, ``size``, ...).
    hyrax_dir : Path
        Where Hyrax 0.13 is installed.
    workdir : Path
        A fresh directory for the run's data location, logs and results.
    address : str
        The Ray to join.

    Returns
    -------
    dict
        ``reads``, ``wall_s``, ``peak_pss_mb`` (training processes) and
        ``peak_ray_pss_mb`` (the Ray session, raycache runs only).
    """
    log = workdir / "reads.log"
    opts = dict(options, results_dir=str(workdir), reads_log=str(log))
    opts["raycache"] = {"linger_s": 5}
    (workdir / "options.json").write_text(json.dumps(opts))
    env = dict(
        os.environ,
        RAY_ADDRESS=address,
        PYTHONPATH=os.pathsep.join([str(hyrax_dir), str(ROOT), str(ROOT / "tests")]),
    )
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(workdir / "options.json")],
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak, peak_ray = 0, 0
    include_ray = opts["cache"] == "raycache"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        usage = node_memory([proc.pid], include_ray=include_ray, children=True)
        if usage["total"] > peak + peak_ray:
            peak, peak_ray = usage["trainers"], usage["ray"]
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training run failed ({proc.returncode}):\n{out[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    reads = len(log.read_text().splitlines()) if log.exists() else 0
    return {
        "reads": reads,
        "wall_s": round(result["wall_s"], 2),
        "peak_pss_mb": round(peak / 2**20, 1),
        "peak_ray_pss_mb": round(peak_ray / 2**20, 1),
    }


def run_rows(
    setups: list[str], base: dict, hyrax_dir: Path, address: str, rounds: int = 1
) -> list[dict]:
    """Run each set-up with Hyrax's own cache, then raycache's, ``rounds`` times.

    Parameters
    ----------
    setups : list of str
        Keys of ``SETUPS``.
    base : dict
        Options every run gets (``size``, ``shape``, ``epochs``, ``batch_size``,
        ``latency_s``).
    hyrax_dir : Path
        Where Hyrax 0.13 is installed.
    address : str
        The Ray (already started, its workers able to import raycache) to join.
    rounds : int
        Repetitions, interleaved.

    Returns
    -------
    list of dict
        One row per run: ``setup``, ``cache``, and ``run_one``'s numbers.
    """
    rows = []
    for _ in range(rounds):
        for setup in setups:
            for cache in ("hyrax", "raycache"):
                with tempfile.TemporaryDirectory(prefix="hyrax-row-") as tmp:
                    options = dict(base, cache=cache, **SETUPS[setup])
                    row = run_one(options, hyrax_dir, Path(tmp), address)
                rows.append({"setup": setup, "cache": cache, **row})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1000, help="dataset items")
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 32, 32])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument(
        "--hyrax-dir",
        type=Path,
        default=Path(os.environ.get("RAYCACHE_HYRAX013_DIR", ROOT / ".hyrax-0.13")),
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the rows; print them as a Markdown table.

    Parameters
    ----------
    argv : list of str, optional
        Command line; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status.
    """
    args = parse_args(argv)
    if not (args.hyrax_dir / "hyrax").is_dir():
        print(f"Hyrax 0.13 is not in {args.hyrax_dir}: run scripts/hyrax_env.sh", file=sys.stderr)
        return 2
    # Ray's workers must import this checkout's raycache.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    address = ray.get_runtime_context().gcs_address
    base = {
        "size": args.size,
        "shape": args.shape,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "latency_s": args.latency_ms / 1000.0,
    }
    try:
        rows = run_rows(args.setups, base, args.hyrax_dir, address, args.rounds)
    finally:
        for name in raycache.list_caches():
            if name.startswith("CountingDataset-"):
                raycache.drop_cache(name)
        ray.shutdown()
    print("\n| set-up | cache | provider reads | wall s | peak PSS MB (trainers + Ray) |")
    print("|---|---|---|---|---|")
    for r in rows:
        mem = f"{r['peak_pss_mb']} + {r['peak_ray_pss_mb']}"
        print(f"| {r['setup']} | {r['cache']} | {r['reads']} | {r['wall_s']} | {mem} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
