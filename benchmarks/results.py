"""One result row per measured variant, and its ratios to the baselines it is held to."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["Row", "compare"]


@dataclass
class Row:
    """One measured variant of one scenario, compared with its baselines.

    Attributes
    ----------
    scenario : str
        What was measured, for example ``"warm, 48 KiB items"``.
    variant : str
        Which implementation.
    value : float
        Items per second (``unit == "items/s"``, higher is better) or seconds
        (``unit == "s"``, lower is better).
    unit : str
        ``"items/s"`` or ``"s"``.
    ratios : dict
        Baseline variant -> ratio, always oriented so that > 1 means this variant is
        better (faster, or less time).
    targets : dict
        Baseline variant -> the ratio the issue asks for.
    note : str
        Anything a reader must know to interpret the row.
    samples : list of float
        Every measurement behind ``value`` (the median of them).
    """

    scenario: str
    variant: str
    value: float
    unit: str
    ratios: dict[str, float] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    note: str = ""
    samples: list[float] = field(default_factory=list)


def compare(
    scenario: str,
    values: dict[str, list[float]],
    unit: str,
    checks: dict[str, dict[str, float | None]],
    notes: dict[str, str] | None = None,
) -> list[Row]:
    """Build rows from samples; ``checks[variant][baseline]`` is a target or None."""
    notes = notes or {}
    medians = {k: statistics.median(v) for k, v in values.items()}
    rows = []
    for variant, samples in values.items():
        row = Row(scenario, variant, medians[variant], unit, note=notes.get(variant, ""))
        row.samples = list(samples)
        for baseline, target in checks.get(variant, {}).items():
            row.ratios[baseline] = _paired_ratio(samples, values[baseline], unit)
            if target is not None:
                row.targets[baseline] = target
        rows.append(row)
    return rows


def _paired_ratio(mine: list[float], theirs: list[float], unit: str) -> float:
    """Return the median over rounds of the ratio within each round (> 1: ``mine`` better).

    Both lists hold one sample per round, taken back to back, so a round's ratio compares
    runs that saw the same interference from the rest of a shared machine; the median of
    those is steadier than the ratio of two medians taken at different moments. A
    baseline run in fewer rounds (``--nocache-rounds``) is compared by its median.
    """
    if len(mine) != len(theirs):
        theirs = [statistics.median(theirs)] * len(mine)
    if unit == "items/s":
        return statistics.median(m / t for m, t in zip(mine, theirs))
    return statistics.median(t / m for m, t in zip(mine, theirs))
