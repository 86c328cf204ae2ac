"""Where an evaluation run's time goes: wall seconds per stage, recorded beside its results.

``dpn-lens plan`` predicts a run's time per stage (``plan_control``); a run that records its own
per-stage times lets the two be compared stage by stage instead of only in total (issue 25). The
stage names are the plan's (``STAGES``), so a row of ``stages.csv`` and a line of the plan name the same
work.

Stages nest by containment: work done inside a stage counts for the outermost one only, so the budget
sweep's probe and answer passes count as the budget sweep, not as KL curves and answer scoring, as the
plan counts them.

Example:
    >>> clock = StageClock()
    >>> with clock.stage("KL curves"):
    ...     with clock.stage("answer scoring"):     # inside: counted as KL curves
    ...         pass
    >>> [row["stage"] for row in clock.rows("openness", total=1.0)]
    ['KL curves', 'other']
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["STAGES", "StageClock", "stage_seconds"]

STAGES = ("locate", "held-out pairs", "persona control", "selection", "method preparation", "KL curves",
          "answer scoring", "budget sweep", "generation check")
"""The stages of a control run, in the order a trait runs them (the plan's stage names)."""
OTHER = "other"
"""The rest of a trait's wall time: intervals, building edits, logging."""


class StageClock:
    """Accumulates wall seconds per stage; ``rows(trait)`` gives them and starts over for the next trait."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: str | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the wall time of the block for ``name`` (unless an outer stage is open: it keeps the time)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; use one of {', '.join(STAGES)}")
        if self._open is not None:
            yield
            return
        self._open, started = name, time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self._open = None

    def rows(self, trait: str, total: float) -> list[dict[str, Any]]:
        """One row per stage that ran (``trait, stage, seconds``) and ``other`` (``total`` minus the stages),
        in ``STAGES`` order; the clock starts over."""
        rows = [{"trait": trait, "stage": name, "seconds": self.seconds[name]} for name in STAGES
                if name in self.seconds]
        rows.append({"trait": trait, "stage": OTHER, "seconds": max(total - sum(self.seconds.values()), 0.0)})
        self.seconds = {}
        return rows


def stage_seconds(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per stage summed over traits (a run's ``stages`` rows), in ``STAGES`` order, ``other`` last.

    Example:
        >>> stage_seconds([{"trait": "o", "stage": "KL curves", "seconds": 2.0},
        ...                {"trait": "c", "stage": "KL curves", "seconds": 3.0},
        ...                {"trait": "c", "stage": "other", "seconds": 1.0}])
        {'KL curves': 5.0, 'other': 1.0}
    """
    totals: dict[str, float] = {}
    for row in rows:
        totals[row["stage"]] = totals.get(row["stage"], 0.0) + float(row["seconds"])
    order = [*STAGES, OTHER]
    return {name: totals[name] for name in sorted(totals, key=order.index)}
