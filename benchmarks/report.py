"""The report: a markdown table of every row, the filled-in page and the figure.

The page's prose lives in ``docs/benchmarks-template.md`` (next to this folder in the source
tree), so that it is edited as Markdown; ``write_report`` fills in the run's figures and
writes the page and ``benchmarks.png`` into the folder ``--out`` names.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

import raycache
from benchmarks.common import log
from benchmarks.results import Row

__all__ = ["TEMPLATE", "environment", "markdown_table", "plot", "render", "write_report"]

TEMPLATE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-template.md"


def _fmt_value(row: Row, spread: bool = False) -> str:
    if row.unit == "items/s":
        text = f"{row.value:,.0f} items/s"
        if spread and len(row.samples) > 1:
            text += f" ({min(row.samples):,.0f}–{max(row.samples):,.0f})"
        return text
    if row.unit == "s":
        text = f"{row.value:.2f} s"
        if spread and len(row.samples) > 1:
            text += f" ({min(row.samples):.2f}–{max(row.samples):.2f})"
        return text
    if row.unit == "reads":  # a count, never a fraction
        return f"{row.value:,.0f} reads"
    return f"{row.value:,.1f} {row.unit}"


def _fmt_ratio(row: Row, baseline: str) -> tuple[str, str]:
    ratio = row.ratios[baseline]
    target = row.targets.get(baseline)
    if target is None:
        return f"{ratio:.2f}x", ""
    met = "met" if ratio >= target else "**missed**"
    digits = 3 if abs(ratio - target) < 0.005 else 2  # never print 0.50x for a miss of 0.50x
    if row.unit == "s" and target < 1:  # the issue states fill targets as time ratios
        return (
            f"{ratio:.{digits}f}x (time {1 / ratio:.{digits}f}x)",
            f"time <= {1 / target:.2f}x: {met}",
        )
    return f"{ratio:.{digits}f}x", f">= {target:.2f}x: {met}"


def _target_row(row: Row) -> tuple[str, str] | None:
    limit = 2.0 if row.unit == "s" else 300.0
    if not row.scenario.startswith("scale"):
        return None
    return "", f"< {limit:g} {row.unit}: " + ("met" if row.value < limit else "**missed**")


def markdown_table(rows: Sequence[Row]) -> str:
    """Render rows as a markdown table: one line per comparison with its baseline.

    Parameters
    ----------
    rows : Sequence[Row]
        Measured rows.

    Returns
    -------
    str
        The table.
    """
    lines = [
        "| scenario | variant | median (min–max) | vs | ratio (>1: better) | target |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        comparisons = list(row.ratios) or [None]
        for baseline in comparisons:
            if baseline is None:
                target = _target_row(row)
                ratio, goal = ("", target[1]) if target else ("", "")
                vs = ""
            else:
                ratio, goal = _fmt_ratio(row, baseline)
                vs = baseline
            lines.append(
                f"| {row.scenario} | {row.variant} | {_fmt_value(row, spread=True)} | {vs} | "
                f"{ratio} | {goal} |"
            )
    return "\n".join(lines)


def environment() -> dict[str, str]:
    """Describe the machine and the versions the numbers were measured with.

    Returns
    -------
    dict
        Name -> description.
    """
    import numpy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        memory = f"{mem:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = "unknown"
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores ({cpu}), {memory} memory, {platform.system()} "
        f"{platform.release()}",
        "load average at the end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "versions": f"Python {platform.python_version()}, Ray {ray.__version__}, torch "
        f"{torch.__version__}, numpy {numpy.__version__}, raycache {raycache.__version__}",
    }


def _summary(rows: Sequence[Row]) -> str:
    met, missed = [], []
    for row in rows:
        for baseline, target in row.targets.items():
            ratio = row.ratios[baseline]
            line = (
                f"{row.scenario}: {row.variant} vs {baseline}: {ratio:.2f}x (target {target:.2f}x)"
            )
            (met if ratio >= target else missed).append(line)
        goal = _target_row(row)
        if goal is not None:
            line = f"{row.scenario}: {row.variant}: {_fmt_value(row)} ({goal[1].split(':')[0]})"
            (met if "met" in goal[1] and "missed" not in goal[1] else missed).append(line)
    out = ["### Targets", "", f"Met ({len(met)}):", ""] + [f"- {m}" for m in met]
    out += ["", f"Missed ({len(missed)}):", ""] + [f"- {m}" for m in missed or ["none"]]
    return "\n".join(out)


def write_report(args: argparse.Namespace, rows: Sequence[Row], info: dict, table: str) -> None:
    """Write ``benchmarks.md`` and ``benchmarks.png`` into ``args.out``.

    The page is ``docs/benchmarks-template.md`` with its ``$`` fields filled in.

    Parameters
    ----------
    args : argparse.Namespace
        Options (``out`` and the sizes described in the page).
    rows : Sequence[Row]
        Results.
    info : dict
        Wall time, arguments, scale details.
    table : str
        The markdown table.
    """
    if args.no_preallocate_store:
        store = "The object store was not preallocated (`--no-preallocate-store`)."
    else:
        store = (
            f"Nine tenths of the object store's {args.object_store_mb:,} MiB were written once "
            f"before the scenarios ({info.get('store_written_s') or 0:.1f} s, untimed), so that "
            "no round pays first writes into the store."
        )
    page = render(
        TEMPLATE.read_text(),
        store=store,
        rounds=args.rounds,
        raydata=f"{args.raydata_items:,}",
        threads=args.threads,
        spin=f"{info.get('spin_iterations_per_ms', 0):,}",
        scale=f"{args.scale_items:,}",
        env="\n".join(f"- {k}: {v}" for k, v in environment().items()),
        argv=" ".join(["raycache bench", *info["argv"]]),
        wall=f"{info['wall_s']:.0f}",
        table=table,
        summary=_summary(rows),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.md").write_text(page)
    plot(rows, args.out / "benchmarks.png")
    log("wrote %s", ", ".join(str(args.out / f) for f in ("benchmarks.md", "benchmarks.png")))


def render(template: str, **fields: Any) -> str:
    """Fill in a report template: drop its leading ``<!-- ... -->`` note, substitute fields.

    Parameters
    ----------
    template : str
        Markdown with ``$name`` fields (``string.Template``).
    **fields : Any
        A value for every field.

    Returns
    -------
    str
        The page.

    Raises
    ------
    KeyError
        If the template names a field that is not given.
    """
    if template.startswith("<!--"):
        template = template.split("-->\n", 1)[1]
    return string.Template(template).substitute(fields)


def plot(rows: Sequence[Row], path: Path) -> None:
    """Draw one panel per scenario family: warm throughput, first-epoch times.

    Parameters
    ----------
    rows : Sequence[Row]
        Results.
    path : Path
        The PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [
        ("warm epoch, 48 KiB", "items/s", "warm epoch, 48 KiB items (items/s, log)"),
        ("warm epoch, 1 KiB", "items/s", "warm epoch, 1 KiB items (items/s, log)"),
        ("first epoch with preload", "s", "first epoch with preload (s)"),
        ("first epoch filling", "s", "first epoch filling on miss (s)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
    for ax, (prefix, unit, title) in zip(axes.flat, families):
        chosen = [r for r in rows if r.scenario.startswith(prefix) and r.unit == unit]
        _bars(ax, chosen, log=unit == "items/s")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax: Any, rows: Sequence[Row], log: bool) -> None:
    if not rows:
        ax.set_visible(False)
        return
    labels = [_short(r) for r in rows]
    colors = ["tab:orange" if r.variant.startswith("raycache") else "tab:gray" for r in rows]
    positions = range(len(rows))
    ax.barh(positions, [r.value for r in rows], color=colors)
    ax.set_yticks(list(positions), labels, fontsize=8)
    ax.invert_yaxis()
    top = max(r.value for r in rows)
    if log:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(right=top * 4)  # room for the value labels
    else:
        ax.set_xlim(0, top * 1.3)
    for pos, row in zip(positions, rows):
        ax.text(row.value, pos, " " + _fmt_value(row), va="center", fontsize=7)


def _short(row: Row) -> str:
    detail = row.scenario.split(",")[1].strip() if "," in row.scenario else ""
    if row.scenario.startswith("warm"):
        return row.variant
    return f"{detail.replace(' per item', '')}: {row.variant}"
