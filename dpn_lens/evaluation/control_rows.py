"""Typed rows of a trait-control run (``evaluation.control``): one frozen dataclass per long table of ``control.json``.

``run_control`` builds these while it measures and turns them into dicts (``to_dict``) only where the
result is assembled. ``from_dict`` reads a row of a ``control.json`` back, today's and older ones: a key
an older run did not write reads as None, and ``to_dict`` leaves a None key out again, so a record
round-trips unchanged, key order included. Values are kept as read (no float() or int()), for the same
reason.

Each ``to_dict`` writes the keys, in the order, that ``control.json`` has always had: the tables a
write-up, ``report.control`` and ``evaluation.table`` read are unchanged. The wide tables
(``matched_cost``, ``matched_summary``, ``goal``; one column per KL level) and the whole record are
typed in ``evaluation.control_record``.

A value derived from others (``ValidationRow.valid``, ``CalibratedRow.reached_target``, ``SweepRow.reached``,
``RandomComparison.beats_random``) is a property, not a field, so it cannot disagree with what it says.

Example:
    >>> zero = GammaZeroRow("openness", Effect(shift=0.0, ci_low=0.0, ci_high=0.0, p=1.0, n=24, z=0.0), kl_floor=1e-7)
    >>> list(zero.to_dict())
    ['trait', 'shift', 'ci_low', 'ci_high', 'p', 'z', 'n', 'kl_floor']
    >>> GammaZeroRow.from_dict(zero.to_dict()) == zero
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from dpn_lens.evaluation.intervals import Fraction, PairedEffect

__all__ = ["Effect", "MeasuredEdit", "CostPoint", "DosePoint", "RandomComparison", "CalibratedRow", "ValidationRow",
           "GammaZeroRow", "SweepRow", "GenerationRandomComparison", "GenerationRow", "ROW_TYPES"]


def _present(**values: Any) -> dict[str, Any]:
    """``values`` without the None ones: an optional key is written only when it was measured.

    Example:
        >>> _present(z=1.5, recovered=None)
        {'z': 1.5}
    """
    return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class Effect:
    """A signed shift (positive = moved as asked, nats/token) with its 95% interval, paired test and item
    count; and, where the persona effect is positive, the fraction of it the edit recovers.

    Attributes:
        shift, ci_low, ci_high: the mean shift and its bootstrap interval (``intervals.paired_effect`` or,
            over random draws, ``intervals.draws_effect``).
        p: two-sided Wilcoxon signed-rank p-value.
        n: items (pairs, or questions in the generation check).
        z: ``shift / standard error`` (None where the row has none: the generation check).
        recovered, recovered_ci_low, recovered_ci_high: ``intervals.fraction_recovered`` (None when the
            persona effect is not positive: a ratio to it would mean nothing).

    Example:
        >>> effect = Effect(shift=0.02, ci_low=0.01, ci_high=0.03, p=0.004, n=64, z=3.1)
        >>> effect.to_dict()
        {'shift': 0.02, 'ci_low': 0.01, 'ci_high': 0.03, 'p': 0.004, 'z': 3.1, 'n': 64}
        >>> Effect.from_dict({**effect.to_dict(), "recovered": 0.5, "recovered_ci_low": 0.2,
        ...                   "recovered_ci_high": 0.8}).recovered
        0.5
    """

    shift: float
    ci_low: float
    ci_high: float
    p: float
    n: int
    z: float | None = None
    recovered: float | None = None
    recovered_ci_low: float | None = None
    recovered_ci_high: float | None = None

    @classmethod
    def of(cls, effect: "PairedEffect", recovered: "Fraction | None" = None) -> "Effect":
        """From an ``intervals.PairedEffect`` (and the ``intervals.Fraction`` of the persona effect recovered)."""
        fraction = {} if recovered is None else dict(recovered=recovered.value, recovered_ci_low=recovered.ci_low,
                                                     recovered_ci_high=recovered.ci_high)
        return cls(shift=effect.shift, ci_low=effect.ci_low, ci_high=effect.ci_high, p=effect.p_value, n=effect.n,
                   z=effect.z, **fraction)

    def to_dict(self) -> dict[str, Any]:
        recovered = ({} if self.recovered is None else
                     {"recovered": self.recovered, "recovered_ci_low": self.recovered_ci_low,
                      "recovered_ci_high": self.recovered_ci_high})
        return {"shift": self.shift, "ci_low": self.ci_low, "ci_high": self.ci_high, "p": self.p,
                **_present(z=self.z), "n": self.n, **recovered}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Effect":
        return cls(shift=data["shift"], ci_low=data["ci_low"], ci_high=data["ci_high"], p=data["p"], n=data["n"],
                   z=data.get("z"), recovered=data.get("recovered"), recovered_ci_low=data.get("recovered_ci_low"),
                   recovered_ci_high=data.get("recovered_ci_high"))


@dataclass(frozen=True)
class MeasuredEdit:
    """One edit measured at one gamma: neurons edited, KL and perplexity on the probe text, and the shift.

    ``draws``: for the random-neuron control, how many random draws the point averages (KL and perplexity
    are means over draws, the shift's interval is over draws and pairs); None for every other edit.

    Example:
        >>> measured = MeasuredEdit(gamma=4.0, n_edited=12, kl=0.05, ppl=11.2,
        ...                         effect=Effect(shift=0.02, ci_low=0.01, ci_high=0.03, p=0.004, n=64, z=3.1))
        >>> list(measured.to_dict())
        ['gamma', 'n_edited', 'kl', 'ppl', 'shift', 'ci_low', 'ci_high', 'p', 'z', 'n']
        >>> MeasuredEdit.from_dict({**measured.to_dict(), "draws": 5}).draws
        5
    """

    gamma: float
    n_edited: int
    kl: float
    ppl: float
    effect: Effect
    draws: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "n_edited": self.n_edited, "kl": self.kl, "ppl": self.ppl,
                **_present(draws=self.draws), **self.effect.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MeasuredEdit":
        return cls(gamma=data["gamma"], n_edited=data["n_edited"], kl=data["kl"], ppl=data["ppl"],
                   effect=Effect.from_dict(data), draws=data.get("draws"))


@dataclass(frozen=True)
class CostPoint:
    """One gamma of a method's cost curve (``costs``): KL from the unsteered model and perplexity of the
    probe text, measured on the whole gamma grid.

    Example:
        >>> point = CostPoint("openness", "increase", "dpn-le", gamma=2.0, kl=0.01, ppl=10.5)
        >>> list(point.to_dict().values())
        ['openness', 'increase', 'dpn-le', 2.0, 0.01, 10.5]
        >>> CostPoint.from_dict(point.to_dict()) == point
        True
    """

    trait: str
    direction: str
    method: str
    gamma: float
    kl: float
    ppl: float

    def to_dict(self) -> dict[str, Any]:
        return {"trait": self.trait, "direction": self.direction, "method": self.method, "gamma": self.gamma,
                "kl": self.kl, "ppl": self.ppl}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CostPoint":
        return cls(trait=data["trait"], direction=data["direction"], method=data["method"], gamma=data["gamma"],
                   kl=data["kl"], ppl=data["ppl"])


@dataclass(frozen=True)
class DosePoint:
    """One measured point of a dose-response curve (``curves``): a method (or a rule's random-neuron
    control, ``control.random_curve``) at the gamma where its cost curve reaches ``kl_level``.

    Example:
        >>> measured = MeasuredEdit(gamma=4.0, n_edited=12, kl=0.049, ppl=11.2,
        ...                         effect=Effect(shift=0.1, ci_low=0.02, ci_high=0.18, p=0.01, n=64, z=2.5))
        >>> point = DosePoint("openness", "increase", "dpn-le", kl_level=0.05, measured=measured)
        >>> list(point.to_dict())[:6]
        ['trait', 'direction', 'method', 'kl_level', 'gamma', 'n_edited']
        >>> DosePoint.from_dict(point.to_dict()) == point
        True
    """

    trait: str
    direction: str
    method: str
    kl_level: float
    measured: MeasuredEdit

    def to_dict(self) -> dict[str, Any]:
        return {"trait": self.trait, "direction": self.direction, "method": self.method, "kl_level": self.kl_level,
                **self.measured.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DosePoint":
        return cls(trait=data["trait"], direction=data["direction"], method=data["method"], kl_level=data["kl_level"],
                   measured=MeasuredEdit.from_dict(data))


@dataclass(frozen=True)
class RandomComparison:
    """A rule's random-neuron control at the rule's calibrated gamma, and the paired difference rule - random
    over draws and pairs (does the choice of neurons matter?).

    ``random_draws`` is None in runs from before it was recorded (one draw).

    Example:
        >>> versus = RandomComparison(random_shift=0.0, random_ci_low=-0.01, random_ci_high=0.01, random_kl=0.05,
        ...                           vs_random=0.02, vs_random_ci_low=0.01, vs_random_ci_high=0.03, random_draws=5)
        >>> versus.beats_random, list(versus.to_dict())[-1]
        (True, 'beats_random')
    """

    random_shift: float
    random_ci_low: float
    random_ci_high: float
    random_kl: float
    vs_random: float
    vs_random_ci_low: float
    vs_random_ci_high: float
    random_draws: int | None = None

    @property
    def beats_random(self) -> bool:
        """Whether the rule - random interval lies above 0."""
        return bool(self.vs_random_ci_low > 0)

    def to_dict(self) -> dict[str, Any]:
        return {"random_shift": self.random_shift, "random_ci_low": self.random_ci_low,
                "random_ci_high": self.random_ci_high, "random_kl": self.random_kl,
                **_present(random_draws=self.random_draws), "vs_random": self.vs_random,
                "vs_random_ci_low": self.vs_random_ci_low, "vs_random_ci_high": self.vs_random_ci_high,
                "beats_random": self.beats_random}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RandomComparison":
        return cls(random_shift=data["random_shift"], random_ci_low=data["random_ci_low"],
                   random_ci_high=data["random_ci_high"], random_kl=data["random_kl"], vs_random=data["vs_random"],
                   vs_random_ci_low=data["vs_random_ci_low"], vs_random_ci_high=data["vs_random_ci_high"],
                   random_draws=data.get("random_draws"))


@dataclass(frozen=True)
class CalibratedRow:
    """A selection rule at its calibrated gamma (``calibrated``): where its cost curve reaches ``target_kl``,
    measured there, beside its random-neuron control at the same gamma.

    Attributes:
        method: the rule (None in runs from before rules other than DPN-LE, which wrote none).
        measured: the rule's point at ``target_kl``; None when its curve never reaches it.
        random: the random-neuron comparison; None when the control did not run (or the target was not reached).

    Example:
        >>> row = CalibratedRow("dpn-le", "openness", "increase", target_kl=0.05)
        >>> row.reached_target, list(row.to_dict().items())[-2:]
        (False, [('reached_target', False), ('gamma', nan)])
        >>> CalibratedRow.from_dict(row.to_dict()) == row
        True
    """

    method: str | None
    trait: str
    direction: str
    target_kl: float
    measured: MeasuredEdit | None = None
    random: RandomComparison | None = None

    @property
    def reached_target(self) -> bool:
        """Whether the rule's cost curve reaches ``target_kl`` (so there is a point to measure)."""
        return self.measured is not None

    def to_dict(self) -> dict[str, Any]:
        head = {**_present(method=self.method), "trait": self.trait, "direction": self.direction,
                "target_kl": self.target_kl}
        if self.measured is None:
            return {**head, "reached_target": False, "gamma": math.nan}
        return {**head, **self.measured.to_dict(), "reached_target": True,
                **(self.random.to_dict() if self.random is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CalibratedRow":
        measured = MeasuredEdit.from_dict(data) if data["reached_target"] else None
        random = RandomComparison.from_dict(data) if "random_shift" in data else None
        return cls(method=data.get("method"), trait=data["trait"], direction=data["direction"],
                   target_kl=data["target_kl"], measured=measured, random=random)


@dataclass(frozen=True)
class ValidationRow:
    """A trait's positive control (``validation``): the held-out pairs, and the persona effect
    ``(high - low) / 2`` with each persona against none. The metric can judge the trait only if the persona
    effect's interval lies above 0 (``valid``).

    Example:
        >>> row = ValidationRow("openness", 60, 64, 3, 1, base_margin=-0.1, persona_effect=0.04,
        ...                     persona_ci_low=0.02, persona_ci_high=0.06, persona_p=0.001, persona_z=4.0,
        ...                     high_vs_none=0.3, high_vs_none_ci_low=0.2, high_vs_none_ci_high=0.4,
        ...                     low_vs_none=0.2, low_vs_none_ci_low=0.1, low_vs_none_ci_high=0.3)
        >>> row.valid, list(row.to_dict())[9:13]
        (True, ['persona_p', 'persona_z', 'valid', 'high_vs_none'])
        >>> ValidationRow.from_dict(row.to_dict()) == row
        True
    """

    trait: str
    n_pairs: int
    n_drawn: int
    n_identical: int
    n_empty: int
    base_margin: float
    persona_effect: float
    persona_ci_low: float
    persona_ci_high: float
    persona_p: float
    persona_z: float
    high_vs_none: float
    high_vs_none_ci_low: float
    high_vs_none_ci_high: float
    low_vs_none: float
    low_vs_none_ci_low: float
    low_vs_none_ci_high: float

    @property
    def valid(self) -> bool:
        """Whether the persona effect's interval lies above 0 (the metric can judge this trait)."""
        return bool(self.persona_ci_low > 0)

    def to_dict(self) -> dict[str, Any]:
        return {"trait": self.trait, "n_pairs": self.n_pairs, "n_drawn": self.n_drawn, "n_identical": self.n_identical,
                "n_empty": self.n_empty, "base_margin": self.base_margin, "persona_effect": self.persona_effect,
                "persona_ci_low": self.persona_ci_low, "persona_ci_high": self.persona_ci_high,
                "persona_p": self.persona_p, "persona_z": self.persona_z, "valid": self.valid,
                "high_vs_none": self.high_vs_none, "high_vs_none_ci_low": self.high_vs_none_ci_low,
                "high_vs_none_ci_high": self.high_vs_none_ci_high, "low_vs_none": self.low_vs_none,
                "low_vs_none_ci_low": self.low_vs_none_ci_low, "low_vs_none_ci_high": self.low_vs_none_ci_high}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ValidationRow":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class GammaZeroRow:
    """A trait's gamma-0 control (``gamma_zero``): DPN-LE's edit scaled to 0 through the same hooks must shift
    nothing; ``kl_floor`` is the KL of gamma 0.001, what rounding alone costs in the model's dtype (None in
    runs from before it was recorded).

    Example:
        >>> row = GammaZeroRow("openness", Effect(shift=0.0, ci_low=0.0, ci_high=0.0, p=1.0, n=24, z=0.0))
        >>> "kl_floor" in row.to_dict(), GammaZeroRow.from_dict(row.to_dict()) == row
        (False, True)
    """

    trait: str
    effect: Effect
    kl_floor: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"trait": self.trait, **self.effect.to_dict(), **_present(kl_floor=self.kl_floor)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GammaZeroRow":
        return cls(trait=data["trait"], effect=Effect.from_dict(data), kl_floor=data.get("kl_floor"))


@dataclass(frozen=True)
class SweepRow:
    """One budget of the budget sweep (``sweep``): a rule re-selected at ``k`` neurons (``"all"``: every
    candidate), its gamma calibrated to the target KL, measured there.

    Attributes:
        k: the budget, an int or ``"all"``.
        n_edited: neurons the re-selected map edits (0 when it selects none: nothing is measured).
        curve_points: probe passes of the gamma search (None when nothing was searched, and in runs from
            before it was recorded).
        measured: the edit at the target KL; None when it never reaches it (or the map selects nothing).
        max_kl: the highest KL the search saw, when the target was not reached.

    Example:
        >>> empty = SweepRow("openness", "increase", "attribution", k=8, n_edited=0)
        >>> empty.reached, list(empty.to_dict())
        (False, ['trait', 'direction', 'rule', 'k', 'n_edited', 'reached'])
        >>> SweepRow.from_dict(empty.to_dict()) == empty
        True
    """

    trait: str
    direction: str
    rule: str
    k: int | str
    n_edited: int
    curve_points: int | None = None
    measured: MeasuredEdit | None = None
    max_kl: float | None = None

    def __post_init__(self) -> None:
        if self.measured is not None and self.measured.n_edited != self.n_edited:
            raise ValueError(f"n_edited {self.n_edited} differs from the measured edit's {self.measured.n_edited}")

    @property
    def reached(self) -> bool:
        """Whether the edit on ``k`` neurons reaches the target KL (so it was measured there)."""
        return self.measured is not None

    def to_dict(self) -> dict[str, Any]:
        head = {"trait": self.trait, "direction": self.direction, "rule": self.rule, "k": self.k,
                **_present(curve_points=self.curve_points)}
        if self.measured is not None:
            return {**head, "reached": True, **self.measured.to_dict()}
        return {**head, "n_edited": self.n_edited, "reached": False, **_present(max_kl=self.max_kl)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepRow":
        return cls(trait=data["trait"], direction=data["direction"], rule=data["rule"], k=data["k"],
                   n_edited=data["n_edited"], curve_points=data.get("curve_points"),
                   measured=MeasuredEdit.from_dict(data) if data["reached"] else None, max_kl=data.get("max_kl"))


@dataclass(frozen=True)
class GenerationRandomComparison:
    """The generation check's random-neuron control of a rule: its shift over ``draws`` draws, and the
    paired difference rule - random.

    Example:
        >>> versus = GenerationRandomComparison(0.0, -0.1, 0.1, 0.2, 0.05, 0.35, draws=5)
        >>> list(versus.to_dict())[3:]
        ['vs_random', 'vs_random_ci_low', 'vs_random_ci_high', 'draws']
    """

    random_shift: float
    random_ci_low: float
    random_ci_high: float
    vs_random: float
    vs_random_ci_low: float
    vs_random_ci_high: float
    draws: int

    def to_dict(self) -> dict[str, Any]:
        return {"random_shift": self.random_shift, "random_ci_low": self.random_ci_low,
                "random_ci_high": self.random_ci_high, "vs_random": self.vs_random,
                "vs_random_ci_low": self.vs_random_ci_low, "vs_random_ci_high": self.vs_random_ci_high,
                "draws": self.draws}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationRandomComparison":
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class GenerationRow:
    """One answer set of the generation-based check (``generation``): greedy answers under an edit at a KL
    level, scored by the unsteered model under the high and the low persona; or the persona reference
    (direction ``"both"``, KL level and gamma NaN).

    Attributes:
        effect: the shift of the answers' persona score (no ``z``); None when the method's curve never
            reaches ``kl_level`` (the row then says ``shift`` NaN and nothing else).
        changed: the fraction of answers the edit changed (None for the persona reference).
        random: the random-neuron comparison, for a rule at the level where the verdict is read.

    Example:
        >>> unreached = GenerationRow("openness", "increase", "caa", kl_level=0.5, gamma=float("nan"))
        >>> list(unreached.to_dict().items())[-2:]
        [('gamma', nan), ('shift', nan)]
        >>> GenerationRow.from_dict(unreached.to_dict()).effect is None
        True
    """

    trait: str
    direction: str
    method: str
    kl_level: float
    gamma: float
    effect: Effect | None = None
    changed: float | None = None
    random: GenerationRandomComparison | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"trait": self.trait, "direction": self.direction, "method": self.method, "kl_level": self.kl_level,
                "gamma": self.gamma, **(self.effect.to_dict() if self.effect is not None else {"shift": math.nan}),
                **_present(changed=self.changed), **(self.random.to_dict() if self.random is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationRow":
        return cls(trait=data["trait"], direction=data["direction"], method=data["method"], kl_level=data["kl_level"],
                   gamma=data["gamma"], effect=Effect.from_dict(data) if "ci_low" in data else None,
                   changed=data.get("changed"),
                   random=GenerationRandomComparison.from_dict(data) if "random_shift" in data else None)


ROW_TYPES: dict[str, type] = {"validation": ValidationRow, "costs": CostPoint, "curves": DosePoint,
                              "calibrated": CalibratedRow, "gamma_zero": GammaZeroRow, "sweep": SweepRow,
                              "generation": GenerationRow}
"""The row type of each long table of ``control.json``, by its key (``ControlRecord`` adds the wide tables and
``stages``)."""
