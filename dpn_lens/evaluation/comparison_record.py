"""The comparison's result as data: ``run_comparison`` returns a ``ComparisonRecord``, ``comparison.json``
holds its ``to_dict()``, and ``from_dict`` / ``load_comparison_record`` read it back.

A record holds, per method x trait x direction, a ``ComparisonRow`` (neurons edited, questionnaire and
statement scores, capability, the signed shifts with their intervals, the changes from the unsteered
model); the per-method means (``MethodSummary``); the γ and q sweeps (``ComparisonSweepRow``); respondent matching
(``RespondentRow``); the judge's ratings of generated answers (``JudgedAnswer``); and ``ComparisonMeta``.

The JSON is the one ``compare`` always wrote: ``from_dict(d).to_dict() == d`` with the same keys in the
same order, also for records of earlier releases (no ``summary``, no ``statements_shift`` or intervals,
no ``judged``: those fields are None). Columns a row has only in some runs (the capability tasks, the
judge's) are typed mappings or optional fields; a key this module does not know is kept in ``extra``
and written back after the known ones, so reading and writing an old folder loses nothing.

This module imports nothing heavy (no torch): the long table (``evaluation.table``) and the report read
records through it.

Example:
    >>> row = ComparisonRow(method="caa", trait="openness", direction="increase", n_edited=0, pct_edited=0.0,
    ...                     questionnaire=3.4, option_mass=0.9, statements_high=0.6, statements_low=0.4,
    ...                     statements_gap=0.2, accuracies={"mmlu_acc": 0.5}, wikitext_ppl=31.0, kl=0.01,
    ...                     trait_shift=0.2, trait_shift_interval=Interval(0.1, 0.3, 0.02), seconds=1.5)
    >>> list(row.to_dict())[9:16]
    ['statements_gap', 'mmlu_acc', 'wikitext_ppl', 'kl', 'trait_shift', 'trait_shift_ci_low', 'trait_shift_ci_high']
    >>> ComparisonRow.from_dict(row.to_dict()) == row
    True
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from dpn_lens.evaluation.control_rows import _present as _measured_only   # None: a column the row lacks

__all__ = ["Interval", "ComparisonRow", "ComparisonSweepRow", "MethodSummary", "RespondentRow", "JudgedAnswer",
           "ComparisonMeta", "ComparisonRecord", "load_comparison_record", "shift_fields", "capability_fields",
           "SHIFT_METRICS", "COMPARISON_FILE"]

COMPARISON_FILE = "comparison.json"
"""The record's file name in a ``compare`` (or ``evaluate``) run folder."""
SHIFT_METRICS = ("trait_shift", "statements_shift")
"""Per-row shifts that carry ``_ci_low``, ``_ci_high`` and ``_p`` (signed: positive = moved as asked)."""
_SCORES = ("questionnaire", "option_mass", "statements_high", "statements_low", "statements_gap")
_JUDGE_SCORES = ("judge_trait", "judge_fluency", "judge_unparsable")
_TEXT_CAPABILITY = ("wikitext_ppl", "kl")
"""The capability numbers every condition has (the sweeps measure only these), last in its block."""


# --- reading one JSON object: each check names the key and the object it is in --------------------------------

def _mapping(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}: {data!r:.60}")
    return data


def _present(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ValueError(f"{where} has no {key!r} (keys: {', '.join(map(str, data)) or 'none'})")
    return data[key]


def _number(data: Mapping[str, Any], key: str, where: str) -> float:
    """``data[key]`` as read: an int stays an int (the JSON writes ``3``, not ``3.0``); a bool is no number."""
    value = _present(data, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {key} must be a number, got {value!r:.60}")
    return value


def _optional_number(data: Mapping[str, Any], key: str, where: str) -> float | None:
    """None where ``key`` is absent (a column of some runs only); a present null is an error."""
    return _number(data, key, where) if key in data else None


def _text(data: Mapping[str, Any], key: str, where: str) -> str:
    value = _present(data, key, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key} must be a string, got {value!r:.60}")
    return value


def _count(data: Mapping[str, Any], key: str, where: str) -> int:
    value = _number(data, key, where)
    if not isinstance(value, int):
        raise ValueError(f"{where}: {key} must be a whole number, got {value!r}")
    return value


def _listed(entries: Sequence[Any]) -> list[dict[str, Any]]:
    return [entry.to_dict() for entry in entries]


def _rows_of(data: Mapping[str, Any], key: str, kind: Any) -> tuple[Any, ...]:
    """``data[key]`` (a list) read with ``kind.from_dict``; an error names the list and the entry."""
    entries = _present(data, key, "the comparison record")
    if not isinstance(entries, list):
        raise ValueError(f"the comparison record's {key!r} must be a list, got {type(entries).__name__}")
    return tuple(kind.from_dict(entry, f"{key}[{i}]") for i, entry in enumerate(entries))


# --- the parts of a record -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A shift's 95% percentile-bootstrap interval over items and its paired Wilcoxon p-value.

    Written beside the shift as ``<shift>_ci_low``, ``<shift>_ci_high`` and ``<shift>_p``.

    Example:
        >>> Interval(0.1, 0.3, 0.02).columns("trait_shift")
        {'trait_shift_ci_low': 0.1, 'trait_shift_ci_high': 0.3, 'trait_shift_p': 0.02}
        >>> Interval.from_columns({"trait_shift": 0.2}, "trait_shift") is None
        True
    """

    ci_low: float
    ci_high: float
    p: float

    def columns(self, name: str) -> dict[str, float]:
        """The interval's JSON columns for the shift ``name``."""
        return {f"{name}_ci_low": self.ci_low, f"{name}_ci_high": self.ci_high, f"{name}_p": self.p}

    @classmethod
    def from_columns(cls, data: Mapping[str, Any], name: str, where: str = "a row") -> "Interval | None":
        """The interval of ``name`` in ``data``, None where it has none (a baseline row, an earlier release).

        Raises:
            ValueError: when only some of the three columns are there, or one is not a number.
        """
        keys = [f"{name}_ci_low", f"{name}_ci_high", f"{name}_p"]
        found = [key for key in keys if key in data]
        if not found:
            return None
        if len(found) < len(keys):
            raise ValueError(f"{where} has {', '.join(found)} but not {', '.join(k for k in keys if k not in found)}; "
                             f"an interval of {name} needs all three")
        return cls(*(_number(data, key, where) for key in keys))


def _interval_keys(names: Sequence[str] = SHIFT_METRICS) -> set[str]:
    return {f"{name}_{part}" for name in names for part in ("ci_low", "ci_high", "p")}


def shift_fields(columns: Mapping[str, Any], where: str = "a row") -> dict[str, Any]:
    """``trait_shift``, ``trait_shift_interval``, ``statements_shift`` and ``statements_shift_interval``
    (the keyword arguments of ``ComparisonRow`` and ``ComparisonSweepRow``) from flat columns such as
    ``compare.trait_effects`` returns; ``statements_shift`` is None in a record of an earlier release.

    Example:
        >>> fields = shift_fields({"trait_shift": 0.2, "trait_shift_ci_low": 0.1, "trait_shift_ci_high": 0.3,
        ...                        "trait_shift_p": 0.01})
        >>> fields["trait_shift_interval"], fields["statements_shift"]
        (Interval(ci_low=0.1, ci_high=0.3, p=0.01), None)
    """
    return {"trait_shift": _number(columns, "trait_shift", where),
            "trait_shift_interval": Interval.from_columns(columns, "trait_shift", where),
            "statements_shift": _optional_number(columns, "statements_shift", where),
            "statements_shift_interval": Interval.from_columns(columns, "statements_shift", where)}


def _shift_columns(trait_shift: float, trait_interval: Interval | None, statements_shift: float | None,
                   statements_interval: Interval | None) -> dict[str, float]:
    """The shifts as JSON columns: each shift, then its interval (where it has one)."""
    columns: dict[str, float] = {"trait_shift": trait_shift}
    columns.update(trait_interval.columns("trait_shift") if trait_interval else {})
    columns.update(_measured_only(**{"statements_shift": statements_shift}))
    columns.update(statements_interval.columns("statements_shift") if statements_interval else {})
    return columns


def _is_accuracy(key: str) -> bool:
    """A capability accuracy column: ``<task>_acc`` of each multiple-choice task, and ``lambada_acc``."""
    return key.endswith("_acc") and not key.startswith("delta_")


def capability_fields(capability: Mapping[str, Any], where: str = "a row") -> dict[str, Any]:
    """``accuracies``, ``wikitext_ppl`` and ``kl`` (keyword arguments of the rows) from the capability numbers
    of one condition (``metrics.Capability``'s details, or a row's columns: the accuracies are found by name).

    Example:
        >>> capability_fields({"mmlu_acc": 0.5, "lambada_acc": 0.25, "wikitext_ppl": 31.0, "kl": 0.01})
        {'accuracies': {'mmlu_acc': 0.5, 'lambada_acc': 0.25}, 'wikitext_ppl': 31.0, 'kl': 0.01}
    """
    accuracies = {key: _number(capability, key, where) for key in capability if _is_accuracy(key)}
    return {"accuracies": accuracies, **{key: _number(capability, key, where) for key in _TEXT_CAPABILITY}}


def _scores(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The questionnaire and statement scores, and the judge's where the run had a judge (all three or none)."""
    scores = {key: _number(data, key, where) for key in _SCORES}
    judged = [key for key in _JUDGE_SCORES if key in data]
    if judged and len(judged) < len(_JUDGE_SCORES):
        raise ValueError(f"{where} has {', '.join(judged)} but not every judge score ({', '.join(_JUDGE_SCORES)})")
    return {**scores, **{key: _optional_number(data, key, where) for key in _JUDGE_SCORES}}


def _extra(data: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    """The keys of ``data`` this module does not read, kept as they are (written back last)."""
    return {key: value for key, value in data.items() if key not in known}


@dataclass(frozen=True, kw_only=True)
class _Condition:
    """What every measured condition has, a row of the comparison or a point of a sweep (the fields are
    documented on ``ComparisonRow``); each subclass adds its own and writes its own column order."""

    method: str
    trait: str
    n_edited: int
    questionnaire: float
    option_mass: float
    statements_high: float
    statements_low: float
    statements_gap: float
    wikitext_ppl: float
    kl: float
    trait_shift: float
    trait_shift_interval: Interval | None = None
    statements_shift: float | None = None
    statements_shift_interval: Interval | None = None
    judge_trait: float | None = None
    judge_fluency: float | None = None
    judge_unparsable: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ComparisonRow(_Condition):
    """One condition of the comparison: a method in one direction on one trait, or the unsteered baseline.

    Attributes:
        method: the method (``evaluation.methods``), or ``unsteered``.
        trait: the trait.
        direction: ``increase``, ``decrease``, or ``none`` (the unsteered row).
        n_edited, pct_edited: MLP neurons the edit changes, and their % of all MLP neurons.
        questionnaire: the mean keyed answer (1..5) to the trait's questionnaire items.
        option_mass: the mean probability of the answer options.
        statements_high, statements_low, statements_gap: mean P(Yes) to the high- and low-pole
            statements, and high minus low.
        accuracies: ``<task>_acc`` of each multiple-choice task and ``lambada_acc``, as measured (the
            capability sizes decide which).
        wikitext_ppl, kl: WikiText perplexity, and KL from the unsteered model (nats/token).
        trait_shift, trait_shift_interval: the questionnaire change signed by the direction (positive =
            moved as asked), with its interval (None on the unsteered row and in records of earlier releases).
        statements_shift, statements_shift_interval: the same for the statement gap (None: an earlier release).
        seconds: the condition's run time.
        judge_trait, judge_fluency, judge_unparsable: the judge's mean ratings of generated answers and the
            replies that were no rating (None without a judge).
        judge_shift: ``judge_trait``'s change, signed by the direction (None without a judge).
        deltas: each score and capability number minus the unsteered row's, keyed by its column
            (written ``delta_<column>``; empty on the unsteered row).
        extra: columns of another release, kept as read.
    """

    direction: str
    pct_edited: float
    seconds: float
    accuracies: Mapping[str, float] = field(default_factory=dict)
    judge_shift: float | None = None
    deltas: Mapping[str, float] = field(default_factory=dict)

    def number(self, column: str) -> float | None:
        """The row's value in ``column`` of ``comparison.json`` (``kl``, ``mmlu_acc``, ``delta_kl``, ...);
        None where the row has no such column."""
        if column in _ROW_NUMBERS:
            return getattr(self, column)
        if column.startswith("delta_"):
            return self.deltas.get(column.removeprefix("delta_"))
        return self.accuracies.get(column)

    def to_dict(self) -> dict[str, Any]:
        """The row as ``comparison.json`` holds it (the column order ``compare`` writes)."""
        return {"method": self.method, "trait": self.trait, "direction": self.direction, "n_edited": self.n_edited,
                "pct_edited": self.pct_edited, **{key: getattr(self, key) for key in _SCORES},
                **_measured_only(**{key: getattr(self, key) for key in _JUDGE_SCORES}),
                **self.accuracies, "wikitext_ppl": self.wikitext_ppl, "kl": self.kl,
                **_shift_columns(self.trait_shift, self.trait_shift_interval, self.statements_shift,
                                 self.statements_shift_interval),
                "seconds": self.seconds, **_measured_only(**{"judge_shift": self.judge_shift}),
                **{f"delta_{key}": value for key, value in self.deltas.items()}, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "a comparison row") -> "ComparisonRow":
        """A row from ``to_dict`` or from ``comparison.json`` (any release).

        Raises:
            ValueError: naming ``where`` and the key, for a missing column or a value of the wrong type.
        """
        data = _mapping(data, where)
        deltas = {key.removeprefix("delta_"): _number(data, key, where) for key in data if key.startswith("delta_")}
        fields = {**_scores(data, where), **capability_fields(data, where), **shift_fields(data, where)}
        known = {*_ROW_KEYS, *fields["accuracies"], *(f"delta_{key}" for key in deltas)}
        return cls(method=_text(data, "method", where), trait=_text(data, "trait", where),
                   direction=_text(data, "direction", where), n_edited=_count(data, "n_edited", where),
                   pct_edited=_number(data, "pct_edited", where), seconds=_number(data, "seconds", where),
                   judge_shift=_optional_number(data, "judge_shift", where), deltas=deltas,
                   extra=_extra(data, known), **fields)


_ROW_NUMBERS = frozenset({"n_edited", "pct_edited", *_SCORES, *_JUDGE_SCORES, *_TEXT_CAPABILITY, *SHIFT_METRICS,
                          "seconds", "judge_shift"})
"""The number columns a ``ComparisonRow`` holds in fields of their own."""
_ROW_KEYS = frozenset({"method", "trait", "direction", *_ROW_NUMBERS, *_interval_keys()})


@dataclass(frozen=True, kw_only=True)
class ComparisonSweepRow(_Condition):
    """One point of a sweep on the sweep trait, direction ``increase``: a method at one γ (``gamma``), or
    DPN-LE's map reselected at one quantile (``q``). Capability is WikiText perplexity and KL only.

    Attributes:
        method, trait: the method and the sweep trait.
        gamma: the strength (None on a q-sweep row).
        q: the selection quantile (None on a γ-sweep row).
        n_edited: MLP neurons edited; pct_edited: their % of all MLP neurons (q sweep only, else None).
        questionnaire, option_mass, statements_high, statements_low, statements_gap, judge_trait,
        judge_fluency, judge_unparsable, wikitext_ppl, kl, trait_shift, trait_shift_interval,
        statements_shift, statements_shift_interval: as in ``ComparisonRow``.
        extra: columns of another release, kept as read.
    """

    gamma: float | None = None
    q: float | None = None
    pct_edited: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as ``comparison.json`` holds it."""
        return {"method": self.method, "trait": self.trait, **_measured_only(**{"gamma": self.gamma, "q": self.q}),
                "n_edited": self.n_edited, **_measured_only(**{"pct_edited": self.pct_edited}),
                **{key: getattr(self, key) for key in _SCORES},
                **_measured_only(**{key: getattr(self, key) for key in _JUDGE_SCORES}),
                **_shift_columns(self.trait_shift, self.trait_shift_interval, self.statements_shift,
                                 self.statements_shift_interval),
                "wikitext_ppl": self.wikitext_ppl, "kl": self.kl, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "a sweep row") -> "ComparisonSweepRow":
        """A row from ``to_dict`` or ``comparison.json``.

        Raises:
            ValueError: for a missing column, a value of the wrong type, or neither ``gamma`` nor ``q``.
        """
        data = _mapping(data, where)
        if "gamma" not in data and "q" not in data:
            raise ValueError(f"{where} has neither 'gamma' nor 'q'; a sweep row is at one of them")
        fields = {**_scores(data, where), **shift_fields(data, where)}
        known = {"method", "trait", "gamma", "q", "n_edited", "pct_edited", *fields, *_JUDGE_SCORES,
                 *_TEXT_CAPABILITY, *_interval_keys()}
        return cls(method=_text(data, "method", where), trait=_text(data, "trait", where),
                   gamma=_optional_number(data, "gamma", where), q=_optional_number(data, "q", where),
                   n_edited=_count(data, "n_edited", where), pct_edited=_optional_number(data, "pct_edited", where),
                   wikitext_ppl=_number(data, "wikitext_ppl", where), kl=_number(data, "kl", where),
                   extra=_extra(data, known), **fields)


@dataclass(frozen=True)
class MethodSummary:
    """One method's means over its traits and directions (``compare.summary_by_method``), with a 95%
    interval and a paired test of its mean shifts over the pooled items (``compare.summary_with_intervals``).

    Attributes:
        method: the method, or ``unsteered``.
        conditions: the rows (trait x direction) averaged.
        means: the mean of each column the rows have, by column (``trait_shift``, ``kl``, ``mmlu_acc``, ...).
        intervals: by shift (``trait_shift``, ``statements_shift``), the interval of its mean (none for the
            unsteered baseline); written ``<shift>_ci_low``, ... after the means.
        extra: columns of another release, kept as read.

    Example:
        >>> entry = MethodSummary("caa", 2, {"trait_shift": 0.2, "kl": 0.01}, {"trait_shift": Interval(0.1, 0.3, 0.02)})
        >>> entry.to_dict()
        {'method': 'caa', 'conditions': 2, 'trait_shift': 0.2, 'kl': 0.01, 'trait_shift_ci_low': 0.1, 'trait_shift_ci_high': 0.3, 'trait_shift_p': 0.02}
        >>> MethodSummary.from_dict(entry.to_dict()) == entry
        True
    """

    method: str
    conditions: int
    means: Mapping[str, float] = field(default_factory=dict)
    intervals: Mapping[str, Interval] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The entry as ``comparison.json``'s ``summary`` holds it."""
        intervals = {key: value for name, interval in self.intervals.items() for key, value in interval.columns(name).items()}
        return {"method": self.method, "conditions": self.conditions, **self.means, **intervals, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "a summary entry") -> "MethodSummary":
        """An entry from ``to_dict`` or ``comparison.json``; every other number is a mean.

        Raises:
            ValueError: for a missing method or count, or a partial interval.
        """
        data = _mapping(data, where)
        intervals = {name: interval for name in SHIFT_METRICS
                     if (interval := Interval.from_columns(data, name, where)) is not None}
        rest = {key: value for key, value in data.items() if key not in {"method", "conditions", *_interval_keys()}}
        means = {key: value for key, value in rest.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
        return cls(_text(data, "method", where), _count(data, "conditions", where), means, intervals,
                   {key: value for key, value in rest.items() if key not in means})


@dataclass(frozen=True)
class RespondentRow:
    """Respondent matching of one method (IPIP-NEO-300's test split): the MAE of its answers against the
    sample respondents', lower is better.

    Example:
        >>> RespondentRow.from_dict({"method": "caa", "respondent_mae": 0.8, "n_respondents": 10, "n_test_items": 40})
        RespondentRow(method='caa', respondent_mae=0.8, n_respondents=10, n_test_items=40, extra={})
    """

    method: str
    respondent_mae: float
    n_respondents: int
    n_test_items: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "respondent_mae": self.respondent_mae, "n_respondents": self.n_respondents,
                "n_test_items": self.n_test_items, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "a respondent row") -> "RespondentRow":
        data = _mapping(data, where)
        known = {"method", "respondent_mae", "n_respondents", "n_test_items"}
        return cls(_text(data, "method", where), _number(data, "respondent_mae", where),
                   _count(data, "n_respondents", where), _count(data, "n_test_items", where), _extra(data, known))


@dataclass(frozen=True, kw_only=True)
class JudgedAnswer:
    """One generated answer with the judge's ratings (``judged.csv``), for inspection.

    Attributes:
        method: the condition's method (``unsteered`` for the baseline).
        direction, gamma, q: which condition of the method: a direction (main rows), a γ (γ sweep) or a q
            (q sweep); None where the condition has none (the baseline has neither).
        trait, question, answer: the trait, the PersonalityBench question and the generated answer.
        judge_trait, judge_fluency: the ratings (1-5), None where the reply was no rating.
        judge_parsed: whether the reply was a rating.
        judge_reply: the judge's raw reply.
        extra: columns of another release, kept as read.
    """

    method: str
    trait: str
    question: str
    answer: str
    judge_trait: float | None
    judge_fluency: float | None
    judge_parsed: bool
    judge_reply: str
    direction: str | None = None
    gamma: float | None = None
    q: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **_measured_only(**{"direction": self.direction, "gamma": self.gamma, "q": self.q}),
                "trait": self.trait, "question": self.question, "answer": self.answer,
                "judge_trait": self.judge_trait, "judge_fluency": self.judge_fluency,
                "judge_parsed": self.judge_parsed, "judge_reply": self.judge_reply, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "a judged answer") -> "JudgedAnswer":
        data = _mapping(data, where)
        parsed = _present(data, "judge_parsed", where)
        if not isinstance(parsed, bool):
            raise ValueError(f"{where}: judge_parsed must be true or false, got {parsed!r:.40}")
        ratings = {key: None if _present(data, key, where) is None else _number(data, key, where)
                   for key in ("judge_trait", "judge_fluency")}
        direction = _text(data, "direction", where) if "direction" in data else None
        known = {"method", "direction", "gamma", "q", "trait", "question", "answer", "judge_trait", "judge_fluency",
                 "judge_parsed", "judge_reply"}
        return cls(method=_text(data, "method", where), direction=direction,
                   gamma=_optional_number(data, "gamma", where), q=_optional_number(data, "q", where),
                   trait=_text(data, "trait", where), question=_text(data, "question", where),
                   answer=_text(data, "answer", where), judge_parsed=parsed,
                   judge_reply=_text(data, "judge_reply", where), extra=_extra(data, known), **ratings)


@dataclass(frozen=True, kw_only=True)
class ComparisonMeta:
    """What the comparison ran on and how long it took.

    Attributes:
        model: the model's name.
        n_mlp_neurons: all MLP neurons of the model (``n_layers * d_mlp``).
        n_questionnaire_items, n_statements: per trait, the items and statements asked (None: an earlier release).
        config: the ``CompareConfig`` as JSON (``dataclasses.asdict``; a record keeps the fields of the
            release that wrote it, so it stays a mapping).
        seconds: the comparison's run time.
        judge_replies, judge_unparsable: the judge's replies, and those that were no rating (None without a judge).
        command_seconds: the command's run time, model loading included (written by the CLI; None otherwise).
        ran_with: how the command ran it (``dpn-lens evaluate`` in one pass with control; None otherwise).
        extra: keys of another release, kept as read.
    """

    model: str
    n_mlp_neurons: int
    config: Mapping[str, Any]
    seconds: float
    n_questionnaire_items: Mapping[str, int] | None = None
    n_statements: Mapping[str, int] | None = None
    judge_replies: int | None = None
    judge_unparsable: int | None = None
    command_seconds: float | None = None
    ran_with: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "n_mlp_neurons": self.n_mlp_neurons,
                **_measured_only(**{"n_questionnaire_items": self.n_questionnaire_items, "n_statements": self.n_statements}),
                "config": self.config, "seconds": self.seconds,
                **_measured_only(**{"judge_replies": self.judge_replies, "judge_unparsable": self.judge_unparsable,
                                 "command_seconds": self.command_seconds, "ran_with": self.ran_with}), **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "meta") -> "ComparisonMeta":
        data = _mapping(data, where)
        counts = {key: dict(_mapping(data[key], f"{where}.{key}")) if key in data else None
                  for key in ("n_questionnaire_items", "n_statements")}
        ran_with = _text(data, "ran_with", where) if "ran_with" in data else None
        known = {"model", "n_mlp_neurons", "config", "seconds", "n_questionnaire_items", "n_statements",
                 "judge_replies", "judge_unparsable", "command_seconds", "ran_with"}
        return cls(model=_text(data, "model", where), n_mlp_neurons=_count(data, "n_mlp_neurons", where),
                   config=dict(_mapping(_present(data, "config", where), f"{where}.config")),
                   seconds=_number(data, "seconds", where),
                   judge_replies=_count(data, "judge_replies", where) if "judge_replies" in data else None,
                   judge_unparsable=_count(data, "judge_unparsable", where) if "judge_unparsable" in data else None,
                   command_seconds=_optional_number(data, "command_seconds", where), ran_with=ran_with,
                   extra=_extra(data, known), **counts)


@dataclass(frozen=True, kw_only=True)
class ComparisonRecord:
    """The comparison's result (``run_comparison``), written as ``comparison.json``.

    Attributes:
        rows: every condition: the unsteered baseline of each trait, then each method x direction.
        meta: model, sizes, config and run time.
        summary: per method, the means with intervals (None: a record of an earlier release, which had none;
            ``compare.summary_by_method(rows)`` computes the means then).
        gamma_sweep, q_sweep: the sweeps on the sweep trait (empty where none ran).
        respondents: respondent matching per method (empty unless every trait ran on IPIP-NEO-300's test split).
        judged: every answer the judge rated (empty without a judge; None: a release before the judge).
        extra: keys of another release, kept as read.

    Example:
        >>> record = load_comparison_record("results/smollm2-135m-instruct")                # doctest: +SKIP
        >>> best = max((r for r in record.rows if r.method == "dpn-le"), key=lambda r: r.trait_shift)  # doctest: +SKIP
        >>> best.trait, best.direction, best.kl < 0.1                                      # doctest: +SKIP
        ('extraversion', 'decrease', True)
    """

    rows: tuple[ComparisonRow, ...]
    meta: ComparisonMeta
    summary: tuple[MethodSummary, ...] | None = None
    gamma_sweep: tuple[ComparisonSweepRow, ...] = ()
    q_sweep: tuple[ComparisonSweepRow, ...] = ()
    respondents: tuple[RespondentRow, ...] = ()
    judged: tuple[JudgedAnswer, ...] | None = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def with_meta(self, **changes: Any) -> "ComparisonRecord":
        """The record with ``meta``'s fields replaced (the CLI adds ``command_seconds`` and ``ran_with``)."""
        return dataclasses.replace(self, meta=dataclasses.replace(self.meta, **changes))

    def to_dict(self) -> dict[str, Any]:
        """The record as ``comparison.json`` holds it (``write_outputs`` writes this)."""
        return {"rows": _listed(self.rows), **({"summary": _listed(self.summary)} if self.summary is not None else {}),
                "gamma_sweep": _listed(self.gamma_sweep), "q_sweep": _listed(self.q_sweep),
                "respondents": _listed(self.respondents),
                **({"judged": _listed(self.judged)} if self.judged is not None else {}),
                "meta": self.meta.to_dict(), **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ComparisonRecord":
        """A record from ``to_dict`` or a ``comparison.json`` of any release.

        Raises:
            ValueError: naming the list, the entry and the key that is missing or of the wrong type.
        """
        data = _mapping(data, "the comparison record")
        known = {"rows", "summary", "gamma_sweep", "q_sweep", "respondents", "judged", "meta"}
        return cls(rows=_rows_of(data, "rows", ComparisonRow),
                   summary=_rows_of(data, "summary", MethodSummary) if "summary" in data else None,
                   gamma_sweep=_rows_of(data, "gamma_sweep", ComparisonSweepRow), q_sweep=_rows_of(data, "q_sweep", ComparisonSweepRow),
                   respondents=_rows_of(data, "respondents", RespondentRow),
                   judged=_rows_of(data, "judged", JudgedAnswer) if "judged" in data else None,
                   meta=ComparisonMeta.from_dict(_present(data, "meta", "the comparison record")),
                   extra=_extra(data, known))


def load_comparison_record(path: str | os.PathLike) -> ComparisonRecord:
    """The record in ``path``: a ``comparison.json``, or a run folder that holds one.

    Raises:
        FileNotFoundError: when there is no such file (naming where it looked).
        ValueError: when the file is not JSON or not a comparison record (naming the file and the key).

    Example:
        >>> load_comparison_record("results/smollm2-135m-instruct").meta.model   # doctest: +SKIP
        'smollm2-135m-instruct'
    """
    from dpn_lens.io import read_json_record

    path, data = read_json_record(path, COMPARISON_FILE, "`dpn-lens compare` or `dpn-lens evaluate`")
    try:
        return ComparisonRecord.from_dict(data)
    except ValueError as error:
        raise ValueError(f"{path} is not a comparison record: {error}") from None
