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
    >>> [row.stage for row in clock.rows("openness", total=1.0)]
    ['KL curves', 'other']
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

__all__ = ["STAGES", "StageClock", "StageRow", "stage_seconds"]

STAGES = ("locate", "held-out pairs", "persona control", "selection", "method preparation", "KL curves",
          "answer scoring", "budget sweep", "generation check")
"""The stages of a control run, in the order a trait runs them (the plan's stage names)."""
OTHER = "other"
"""The rest of a trait's wall time: intervals, building edits, logging."""


@dataclass(frozen=True)
class StageRow:
    """Wall seconds one trait spent in one stage (a row of a control record's ``stages``).

    Example:
        >>> row = StageRow("openness", "locate", 2.5)
        >>> row.to_dict(), StageRow.from_dict(row.to_dict()) == row
        ({'trait': 'openness', 'stage': 'locate', 'seconds': 2.5}, True)
    """

    trait: str
    stage: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"trait": self.trait, "stage": self.stage, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StageRow":
        unknown = sorted(set(data) - {"trait", "stage", "seconds"})
        if unknown:
            raise ValueError(f"a stages row carries {', '.join(unknown)}, which this version does not keep")
        return cls(data["trait"], data["stage"], data["seconds"])


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

    def rows(self, trait: str, total: float) -> list[StageRow]:
        """One row per stage that ran and ``other`` (``total`` minus the stages), in ``STAGES`` order; the
        clock starts over."""
        rows = [StageRow(trait, name, self.seconds[name]) for name in STAGES if name in self.seconds]
        rows.append(StageRow(trait, OTHER, max(total - sum(self.seconds.values()), 0.0)))
        self.seconds = {}
        return rows


def stage_seconds(rows: Sequence[StageRow]) -> dict[str, float]:
    """Seconds per stage summed over traits (a run's ``stages`` rows), in ``STAGES`` order, ``other`` last.

    Example:
        >>> stage_seconds([StageRow("o", "KL curves", 2.0), StageRow("c", "KL curves", 3.0),
        ...                StageRow("c", "other", 1.0)])
        {'KL curves': 5.0, 'other': 1.0}
    """
    totals: dict[str, float] = {}
    for row in rows:
        totals[row.stage] = totals.get(row.stage, 0.0) + float(row.seconds)
    order = [*STAGES, OTHER]
    return {name: totals[name] for name in sorted(totals, key=order.index)}
