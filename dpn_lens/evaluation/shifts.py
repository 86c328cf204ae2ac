"""Typed preference shifts: one edit's measured shift of the trait margin, as data.

The demo measures, per trait, the shift of each edit (the paper's neurons and an effect rule's, each
direction at its calibrated gamma) and the persona prompt's effect. Each is a ``ShiftRow``;
``summary.json`` stores them as dicts (``to_dict``), the report and the demo's summary read them back
(``from_dict``), and ``line()`` is only ever for printing.

Example:
    >>> row = ShiftRow("openness", "DPN-LE", "increase", 3.1, 32, Shift(0.02, 0.01, 0.03, 0.004))
    >>> ShiftRow.from_dict(row.to_dict()) == row
    True
    >>> row.label(), row.effect.verdict()
    ('DPN-LE increase', 'moved as asked')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from dpn_lens.evaluation.calibrate import Calibration

__all__ = ["Shift", "ShiftRow", "PERSONA", "rows_of_record"]

PERSONA = "persona prompt"
"""The ``neurons`` of the positive control's row: the high vs low persona prompt, (high - low) / 2."""


@dataclass(frozen=True)
class Shift:
    """A signed shift (positive = moved as asked), nats/token, with its 95% interval and paired p-value."""

    shift: float
    ci_low: float
    ci_high: float
    p: float

    @classmethod
    def of(cls, effect: Any) -> "Shift":
        """From an ``intervals.PairedEffect``."""
        return cls(float(effect.shift), float(effect.ci_low), float(effect.ci_high), float(effect.p_value))

    def verdict(self) -> str:
        """What the interval says (``intervals.shift_verdict``)."""
        from dpn_lens.evaluation.intervals import shift_verdict

        return shift_verdict(self.ci_low, self.ci_high)

    def to_dict(self) -> dict[str, float]:
        return {"shift": self.shift, "ci_low": self.ci_low, "ci_high": self.ci_high, "p": self.p}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Shift":
        try:
            return cls(float(data["shift"]), float(data["ci_low"]), float(data["ci_high"]), float(data["p"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"a shift is a dict with shift, ci_low, ci_high and p; got {data!r:.80}") from None


@dataclass(frozen=True)
class ShiftRow:
    """One edit's (or the persona prompt's) shift on one trait's held-out pairs.

    Attributes:
        trait: the trait.
        neurons: whose edit: ``"DPN-LE"``, an effect rule's name, or ``PERSONA``.
        direction: ``"increase"``/``"decrease"`` (``""`` for the persona prompt).
        gamma: the edit's strength (None for the persona prompt).
        n_pairs: held-out pairs the shift is measured on.
        effect: the shift with its interval.
        calibration: how ``gamma`` was found, with its KL curve (None for a fixed gamma, the persona
            prompt, and rows read from an earlier release's summary).
    """

    trait: str
    neurons: str
    direction: str
    gamma: float | None
    n_pairs: int
    effect: Shift
    calibration: Calibration | None = None

    def label(self) -> str:
        """``"DPN-LE increase"``, ``"attribution-t decrease"``, ``"persona prompt"``."""
        return f"{self.neurons} {self.direction}".strip()

    def line(self) -> str:
        """The line printed to a terminal: label and gamma, shift [interval], p and verdict."""
        name = self.label() + (f" (gamma {self.gamma:.3g})" if self.gamma is not None else " (high-low)/2")
        e = self.effect
        return f"  {name:<26} {e.shift:+.3f} [{e.ci_low:+.3f}, {e.ci_high:+.3f}]  p={e.p:.2g}  {e.verdict()}"

    def to_dict(self) -> dict[str, Any]:
        return {"trait": self.trait, "neurons": self.neurons, "direction": self.direction, "gamma": self.gamma,
                "n_pairs": self.n_pairs, "effect": self.effect.to_dict(),
                **({"calibration": self.calibration.to_dict()} if self.calibration is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShiftRow":
        if not isinstance(data, Mapping) or not {"trait", "neurons", "effect"} <= set(data):
            raise ValueError(f"a shift row is a dict with trait, neurons and effect; got {data!r:.80}")
        gamma = data.get("gamma")
        calibration = data.get("calibration")
        return cls(str(data["trait"]), str(data["neurons"]), str(data.get("direction", "")),
                   None if gamma is None else float(gamma), int(data.get("n_pairs", 0)),
                   Shift.from_dict(data["effect"]), None if calibration is None else Calibration.from_dict(calibration))


def rows_of_record(record: Mapping[str, Any]) -> list[ShiftRow]:
    """The shift rows of one trait's demo record: its ``"shifts"`` (written since they are typed), or,
    for a ``summary.json`` of an earlier release, the same rows read from its ``"preference"`` dict.

    Example:
        >>> check = {"n_pairs": 8, "persona": {"shift": .05, "ci_low": .02, "ci_high": .08, "p": .01}}
        >>> check.update({d: {"shift": .01, "ci_low": -.01, "ci_high": .03, "p": .3} for d in ("increase", "decrease")})
        >>> [row.label() for row in rows_of_record({"trait": "openness", "gamma": {"increase": 2, "decrease": 2},
        ...                                         "preference": check})]
        ['DPN-LE increase', 'DPN-LE decrease', 'persona prompt']
    """
    if "shifts" in record:
        return [ShiftRow.from_dict(row) for row in record["shifts"]]
    check = record.get("preference")
    if not check:
        return []
    trait, n_pairs = str(record.get("trait", "")), int(check.get("n_pairs", 0))
    edits = [("DPN-LE", record.get("gamma") or {}, "")]
    edits += [(rule, entry.get("gamma") or {}, f"{rule}-") for rule, entry in (record.get("rules") or {}).items()]
    rows = [ShiftRow(trait, neurons, direction, _number(gammas.get(direction)), n_pairs,
                     Shift.from_dict(check[f"{prefix}{direction}"]))
            for neurons, gammas, prefix in edits for direction in ("increase", "decrease")
            if f"{prefix}{direction}" in check]
    if "persona" in check:
        rows.append(ShiftRow(trait, PERSONA, "", None, n_pairs, Shift.from_dict(check["persona"])))
    return rows


def _number(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)
