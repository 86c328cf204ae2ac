"""The record of a trait-control run (``evaluation.control``), typed: what ``run_control`` returns and
``control.json`` holds.

``ControlRecord`` holds every table as frozen dataclasses: the long tables' rows
(``evaluation.control_rows``), the wide tables derived from them (``MatchedCostRow``, ``MatchedSummaryRow``,
``GoalRow``: one column per KL level in the file, one ``levels`` entry per KL level here), the wall seconds
per stage (``StageRow``), the example answers (``TraitExamples``) and the run's settings (``ControlMeta``).
Readers (the report, the long result table, the plan, the merge) use attributes, not the file's keys.

``to_dict`` writes ``control.json`` as it has always been written, and ``from_dict`` reads today's records
and older ones: a table an older run did not write is None and stays out of ``to_dict``, so
``ControlRecord.from_dict(data).to_dict() == data`` for every committed record (a test checks each).
Keys the record does not know are refused where a row is read, and kept as read in ``meta`` (``extra``).

Example:
    >>> record = ControlRecord.from_dict({"validation": [], "costs": [], "curves": [], "matched_cost": [],
    ...     "matched_summary": [], "calibrated": [], "gamma_zero": [], "examples": {},
    ...     "meta": {"model": "tiny", "dtype": "torch.float32", "config": {"kl_levels": [0.05], "target_kl": 0.05},
    ...              "seconds": 1.0, "probe_tokens": 64, "traits_done": []}})
    >>> record.meta.model, record.kl_levels, record.goal is None
    ('tiny', [0.05], True)
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from dpn_lens.evaluation.control_rows import (CalibratedRow, CostPoint, DosePoint, GammaZeroRow, GenerationRow,
                                              SweepRow, ValidationRow)
from dpn_lens.evaluation.stage_times import StageRow

__all__ = ["LevelPoint", "MatchedCostRow", "LevelSummary", "MatchedSummaryRow", "GoalRow", "PairExample",
           "GenerationExamples", "TraitExamples", "ControlMeta", "ControlRecord", "load_control_record",
           "level_key", "examples_by_trait", "CONTROL_FILE"]

CONTROL_FILE = "control.json"
"""The record's file name in a ``control`` (or ``evaluate``) run folder."""


def level_key(name: str, level: float) -> str:
    """The wide tables' column of ``name`` at KL ``level`` (``shift@kl0.05``).

    Example:
        >>> level_key("shift", 0.05), level_key("mean_shift", 0.1)
        ('shift@kl0.05', 'mean_shift@kl0.1')
    """
    return f"{name}@kl{level:g}"


def _levels_of(data: Mapping[str, Any], names: Sequence[str], where: str) -> list[float]:
    """The KL levels of a wide row, in its column order; every level must have each of ``names``."""
    levels: dict[float, None] = {}
    for key in data:
        if "@kl" in key:
            name, level = key.split("@kl", 1)
            if name not in names:
                raise ValueError(f"{where} has the column {key!r}; its row type knows {', '.join(names)} per KL level")
            levels[float(level)] = None
    for level in levels:
        missing = [name for name in names if level_key(name, level) not in data]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(level_key(n, level) for n in missing)}")
    return list(levels)


def _check_keys(data: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    """Refuse a key the row type would drop (a record from a newer version would lose it silently)."""
    unknown = [key for key in data if key not in known and "@kl" not in key]
    if unknown:
        raise ValueError(f"{where} carries {', '.join(map(repr, unknown))}, which this version does not keep; read it "
                         "with the dpn-lens version that wrote it")


def _read_row(kind: Any, row: Mapping[str, Any], table: str) -> Any:
    """``kind.from_dict(row)``, refusing a key the row type does not keep (it would be dropped silently)."""
    read = kind.from_dict(row)
    unknown = [key for key in row if key not in read.to_dict()]
    if unknown:
        raise ValueError(f"its {table} rows carry {', '.join(unknown)}, which this version's {kind.__name__} does not "
                         "keep; read it with the dpn-lens version that wrote it")
    return read


@dataclass(frozen=True)
class LevelPoint:
    """A curve at one KL level of the matched-cost table: gamma, measured KL and the shift with its 95%
    interval; all NaN where the curve never reached the level.

    Example:
        >>> LevelPoint.unreached().reached, LevelPoint(2.0, 0.05, 0.1, 0.0, 0.2).reached
        (False, True)
    """

    gamma: float
    kl: float
    shift: float
    ci_low: float
    ci_high: float

    KEYS = ("gamma", "kl", "shift", "ci_low", "ci_high")

    @classmethod
    def unreached(cls) -> "LevelPoint":
        return cls(math.nan, math.nan, math.nan, math.nan, math.nan)

    @property
    def reached(self) -> bool:
        return not math.isnan(self.shift)


@dataclass(frozen=True)
class MatchedCostRow:
    """One trait, direction and method of the matched-cost table (``matched_cost``): its point at each KL level.

    Example:
        >>> row = MatchedCostRow("openness", "increase", "caa", {0.05: LevelPoint(2.0, 0.049, 0.1, 0.02, 0.18)})
        >>> row.to_dict()["shift@kl0.05"], MatchedCostRow.from_dict(row.to_dict()) == row
        (0.1, True)
    """

    trait: str
    direction: str
    method: str
    levels: dict[float, LevelPoint]

    def at(self, level: float) -> LevelPoint:
        """The point at KL ``level`` (unreached where the table has no such level)."""
        return self.levels.get(level, LevelPoint.unreached())

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"trait": self.trait, "direction": self.direction, "method": self.method}
        for level, point in self.levels.items():
            row.update({level_key(name, level): getattr(point, name) for name in LevelPoint.KEYS})
        return row

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MatchedCostRow":
        _check_keys(data, ("trait", "direction", "method"), "a matched_cost row")
        levels = _levels_of(data, LevelPoint.KEYS, "a matched_cost row")
        return cls(data["trait"], data["direction"], data["method"],
                   {level: LevelPoint(*(data[level_key(name, level)] for name in LevelPoint.KEYS)) for level in levels})


@dataclass(frozen=True)
class LevelSummary:
    """A method at one KL level, over its trait-directions: the mean shift of those that reached the level,
    and how many reached it and had their interval above 0 (``"8/10"``)."""

    mean_shift: float
    reached: str
    ci_positive: str

    KEYS = {"mean_shift": "mean_shift", "reached": "reached", "ci_positive": "ci>0"}
    """Field -> the file's column name."""


@dataclass(frozen=True)
class MatchedSummaryRow:
    """One method of ``matched_summary``: its ``LevelSummary`` at each KL level.

    Example:
        >>> row = MatchedSummaryRow("caa", {0.05: LevelSummary(0.03, "10/10", "9/10")})
        >>> list(row.to_dict()), MatchedSummaryRow.from_dict(row.to_dict()) == row
        (['method', 'mean_shift@kl0.05', 'reached@kl0.05', 'ci>0@kl0.05'], True)
    """

    method: str
    levels: dict[float, LevelSummary]

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"method": self.method}
        for level, summary in self.levels.items():
            row.update({level_key(column, level): getattr(summary, name) for name, column in LevelSummary.KEYS.items()})
        return row

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MatchedSummaryRow":
        _check_keys(data, ("method",), "a matched_summary row")
        columns = LevelSummary.KEYS
        levels = _levels_of(data, tuple(columns.values()), "a matched_summary row")
        return cls(data["method"], {level: LevelSummary(**{name: data[level_key(column, level)]
                                                           for name, column in columns.items()}) for level in levels})


@dataclass(frozen=True)
class GoalRow:
    """A selection rule's verdict at the target KL (``goal``, ``control.goal_rows``): trait-directions that
    reached it, moved as asked (interval above 0), moved the wrong way, beat random neurons, both (each
    ``"k/n"``); the mean shift beside the reference's (CAA) on the same trait-directions; the goal (at least
    8 of 10 as asked and beating random neurons, mean shift at least the reference's).

    Example:
        >>> row = GoalRow("attribution", "10/10", "9/10", "0/10", "9/10", "9/10", 0.04, 0.03, True)
        >>> row.to_dict()["caa mean shift"], GoalRow.from_dict(row.to_dict()) == row
        (0.03, True)
    """

    rule: str
    reached: str
    as_asked: str
    wrong_way: str
    beats_random: str
    as_asked_and_beats_random: str
    mean_shift: float
    reference_mean_shift: float
    goal_met: bool
    reference: str = "caa"

    _COUNTS = {"reached": "reached", "as_asked": "as asked", "wrong_way": "wrong way", "beats_random": "beats random",
               "as_asked_and_beats_random": "as asked and beats random"}

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, **{column: getattr(self, name) for name, column in self._COUNTS.items()},
                "mean shift": self.mean_shift, f"{self.reference} mean shift": self.reference_mean_shift,
                "goal met": self.goal_met}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GoalRow":
        references = [key[: -len(" mean shift")] for key in data if key.endswith(" mean shift") and key != "mean shift"]
        if len(references) != 1:
            raise ValueError(f"a goal row names {len(references)} reference mean shifts; it should name one "
                             "(e.g. 'caa mean shift')")
        reference = references[0]
        _check_keys(data, ("rule", *cls._COUNTS.values(), "mean shift", f"{reference} mean shift", "goal met"),
                    "a goal row")
        return cls(data["rule"], **{name: data[column] for name, column in cls._COUNTS.items()},
                   mean_shift=data["mean shift"], reference_mean_shift=data[f"{reference} mean shift"],
                   goal_met=data["goal met"], reference=reference)


@dataclass(frozen=True)
class PairExample:
    """A trait's first held-out preference pair: the question and the answers the model wrote under the high
    and the low persona."""

    question: str
    high_answer: str
    low_answer: str


@dataclass(frozen=True)
class GenerationExamples:
    """The generation check's first question: the unsteered answer and each edit's (``"<method> <direction>"``)."""

    question: str
    unsteered: str
    steered: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TraitExamples:
    """A trait's example answers (``examples``; the file keys the generation check's as ``<trait>:generation``).

    Example:
        >>> examples = TraitExamples(pair=PairExample("Q?", "Yes!", "No."),
        ...                          generation=GenerationExamples("Q?", "Maybe.", {"caa increase": "Yes."}))
        >>> list(examples.to_dict("openness"))
        ['openness:generation', 'openness']
        >>> TraitExamples.from_dict(examples.to_dict("openness"), "openness") == examples
        True
    """

    pair: PairExample | None = None
    generation: GenerationExamples | None = None

    def to_dict(self, trait: str) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if self.generation is not None:
            out[f"{trait}:generation"] = {"question": self.generation.question,
                                          "unsteered": self.generation.unsteered, **self.generation.steered}
        if self.pair is not None:
            out[trait] = {"question": self.pair.question, "high_answer": self.pair.high_answer,
                          "low_answer": self.pair.low_answer}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, str]], trait: str) -> "TraitExamples":
        pair = generation = None
        if trait in data:
            _check_keys(data[trait], ("question", "high_answer", "low_answer"), f"the example of {trait}")
            pair = PairExample(**data[trait])
        if f"{trait}:generation" in data:
            answers = dict(data[f"{trait}:generation"])
            generation = GenerationExamples(answers.pop("question"), answers.pop("unsteered"), answers)
        return cls(pair, generation)


def examples_by_trait(data: Mapping[str, Mapping[str, str]]) -> dict[str, TraitExamples]:
    """The ``examples`` of a record, by trait, in the order the file names them.

    Example:
        >>> list(examples_by_trait({"openness:generation": {"question": "Q", "unsteered": "A"},
        ...                         "openness": {"question": "Q", "high_answer": "H", "low_answer": "L"}}))
        ['openness']
    """
    traits = dict.fromkeys(key.removesuffix(":generation") for key in data)
    return {trait: TraitExamples.from_dict(data, trait) for trait in traits}


@dataclass(frozen=True)
class ControlMeta:
    """A run's settings and bookkeeping (``meta``).

    Attributes:
        model, dtype: the model's name and parameter dtype (``"torch.bfloat16"``).
        config: the ``ControlConfig`` as written (``dataclasses.asdict``; older records lack later settings,
            so it stays the mapping read; ``ControlRecord.kl_levels`` and ``.target_kl`` read it).
        seconds: the run's wall seconds (summed over merged runs).
        probe_tokens: tokens of the KL probe's text.
        traits_done: the traits measured, in order (None in records from before it was written).
        maps: which neurons each selection rule edited, by trait and rule: its settings and neurons per pole
            (as written; records from before the effect rules have one map per trait).
        skipped: traits validated but not steered, with why (None in older records).
        merged_from: for a merged record, each part's traits.
        command_seconds: the command's wall seconds, model load included (written by the CLI).
        ran_with: how the command ran it (``dpn-lens evaluate`` in one pass with the comparison; None otherwise).
        engine: what generated its answers (``dpn_lens.generation.ENGINES``; None in records from before the
            engines, which generated through the bridge's loop: the tokens of ``"raw"``).
        extra: keys this version does not know, kept as read.
    """

    model: str
    dtype: str
    config: dict[str, Any]
    seconds: float
    probe_tokens: int | None = None
    traits_done: list[str] | None = None
    maps: dict[str, Any] | None = None
    skipped: dict[str, str] | None = None
    merged_from: list[list[str]] | None = None
    command_seconds: float | None = None
    ran_with: str | None = None
    engine: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _ORDER = ("model", "dtype", "config", "seconds", "merged_from", "command_seconds", "probe_tokens", "traits_done",
              "maps", "skipped", "ran_with", "engine")

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self._ORDER}
        return {**{key: value for key, value in out.items() if value is not None or key in ("model", "dtype")},
                **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ControlMeta":
        missing = [name for name in ("model", "dtype", "config", "seconds") if name not in data]
        if missing:
            raise ValueError(f"the record's meta lacks {', '.join(missing)}: it is not a control record")
        return cls(**{name: data[name] for name in cls._ORDER if name in data},
                   extra={key: value for key, value in data.items() if key not in cls._ORDER})


_OPTIONAL_TABLES = ("goal", "sweep", "generation", "stages")
"""Tables older records lack (None in the record, absent from its ``to_dict``)."""


@dataclass(frozen=True)
class ControlRecord:
    """A trait-control run's record (module note). ``control.json`` is ``to_dict()``.

    Attributes:
        validation: each trait's positive control (``ValidationRow``).
        costs: the KL/perplexity grids (``CostPoint``).
        curves: the measured dose-response points (``DosePoint``).
        matched_cost, matched_summary: the curves at each KL level, per trait-direction and per method.
        calibrated: each selection rule at the target KL beside its random-neuron control (``CalibratedRow``).
        gamma_zero: the gamma-0 check per trait.
        goal: the per-rule verdict at the target KL (None in older records; so are ``sweep``, ``generation``
            and ``stages``).
        sweep: the budget sweep (``SweepRow``).
        generation: the generation-based check (``GenerationRow``).
        stages: each trait's wall seconds per stage.
        examples: each trait's example answers.
        meta: settings and bookkeeping.
    """

    validation: list[ValidationRow]
    costs: list[CostPoint]
    curves: list[DosePoint]
    matched_cost: list[MatchedCostRow]
    matched_summary: list[MatchedSummaryRow]
    calibrated: list[CalibratedRow]
    gamma_zero: list[GammaZeroRow]
    examples: dict[str, TraitExamples]
    meta: ControlMeta
    goal: list[GoalRow] | None = None
    sweep: list[SweepRow] | None = None
    generation: list[GenerationRow] | None = None
    stages: list[StageRow] | None = None

    _ROWS = {"validation": ValidationRow, "costs": CostPoint, "curves": DosePoint, "matched_cost": MatchedCostRow,
             "matched_summary": MatchedSummaryRow, "calibrated": CalibratedRow, "goal": GoalRow, "sweep": SweepRow,
             "generation": GenerationRow, "gamma_zero": GammaZeroRow, "stages": StageRow}
    """Each table's row type, in ``control.json``'s order (``examples`` and ``meta`` follow)."""

    @property
    def kl_levels(self) -> list[float]:
        """The KL levels the curves were matched at (``--kl-levels``)."""
        return [float(level) for level in self.meta.config["kl_levels"]]

    @property
    def target_kl(self) -> float:
        """The KL level the selection rules were calibrated to (``--target-kl``)."""
        return float(self.meta.config["target_kl"])

    @property
    def traits_done(self) -> list[str]:
        """The traits measured (from the validation rows where an older record does not name them)."""
        return list(self.meta.traits_done) if self.meta.traits_done is not None else [r.trait for r in self.validation]

    def with_meta(self, **changes: Any) -> "ControlRecord":
        """The record with ``meta``'s fields replaced (the CLI adds ``command_seconds`` and ``ran_with``), as
        ``ComparisonRecord.with_meta``."""
        return dataclasses.replace(self, meta=dataclasses.replace(self.meta, **changes))

    def of_trait(self, trait: str) -> "ControlRecord":
        """The record with only ``trait``'s rows in each long table and its examples (the wide tables and
        ``meta`` as they are: they summarize the run).

        Example:
            >>> record = load_control_record("results/control-gemma-3-270m-skipbos")        # doctest: +SKIP
            >>> {row.trait for row in record.of_trait("openness").curves}                   # doctest: +SKIP
            {'openness'}
        """
        def mine(rows: list[Any] | None) -> list[Any] | None:
            return None if rows is None else [row for row in rows if row.trait == trait]

        return dataclasses.replace(self, validation=mine(self.validation), costs=mine(self.costs),
                                   curves=mine(self.curves), calibrated=mine(self.calibrated),
                                   gamma_zero=mine(self.gamma_zero), sweep=mine(self.sweep),
                                   generation=mine(self.generation), stages=mine(self.stages),
                                   examples={t: e for t, e in self.examples.items() if t == trait})

    def to_dict(self) -> dict[str, Any]:
        """``control.json``'s content (JSON-ready, NaN as JSON writes it)."""
        out: dict[str, Any] = {}
        for name in self._ROWS:
            rows = getattr(self, name)
            if rows is not None:
                out[name] = [row.to_dict() for row in rows]
        examples: dict[str, Any] = {}
        for trait, example in self.examples.items():
            examples.update(example.to_dict(trait))
        return {**out, "examples": examples, "meta": self.meta.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ControlRecord":
        """A record from ``control.json``'s content (today's or an older run's).

        Raises:
            ValueError: for something that is not a control record (no ``meta`` or ``validation``), or a
                table or column this version does not know.
        """
        if not isinstance(data, Mapping) or "meta" not in data or "validation" not in data:
            raise ValueError("not a control record: control.json has 'validation' and 'meta' (write one with "
                             "`dpn-lens control` or `dpn-lens evaluate`)")
        unknown = [key for key in data if key not in cls._ROWS and key not in ("examples", "meta")]
        if unknown:
            raise ValueError(f"the record has the table(s) {', '.join(unknown)}, which this version does not read; "
                             "read it with the dpn-lens version that wrote it")
        tables: dict[str, Any] = {}
        for name, kind in cls._ROWS.items():
            if name in data:
                tables[name] = [_read_row(kind, row, name) for row in data[name]]
            elif name in _OPTIONAL_TABLES:
                tables[name] = None
            else:
                tables[name] = []
        return cls(**tables, examples=examples_by_trait(data.get("examples", {})),
                   meta=ControlMeta.from_dict(data["meta"]))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the record as JSON to ``path`` (atomically: a temporary file, then a rename)."""
        from dpn_lens.io import write_json_atomic
        return write_json_atomic(path, self.to_dict())


def load_control_record(path: str | os.PathLike) -> ControlRecord:
    """The record in ``path`` (a ``control.json``, or a folder holding one).

    Raises:
        FileNotFoundError: when there is no such file (naming the folder to pass).
        ValueError: when the file is not a control record, or not JSON.
    """
    from dpn_lens.io import read_json_record

    path, data = read_json_record(path, CONTROL_FILE, "`dpn-lens control` or `dpn-lens evaluate`")
    try:
        return ControlRecord.from_dict(data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: a table row lacks {error}; it is not a control record this version reads") from error
