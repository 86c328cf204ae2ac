"""One long result table for both evaluations: a row per trait, method, direction, metric and cost.

``dpn-lens control`` and ``dpn-lens compare`` each write their own wide tables (``matched_cost.csv``,
``calibrated.csv``, ``generation.csv``; ``rows.csv``), whose columns differ by harness and by run
settings (``shift@kl0.05``). Both also write ``results.csv``: the same numbers in one long format, so
that one filter answers any question across runs and harnesses, e.g. in a notebook::

    rows = pd.read_csv("results/control-gemma-3-270m-allrules/results.csv")
    rows.query("metric == 'preference' and kl_level == 0.05")

Metrics (``value`` signed by the direction: positive = moved as asked, except ``kl``, ``wikitext_ppl``
and accuracies, which are levels):

- ``preference``: the held-out paired-answer margin shift, nats/token (``control``);
- ``preference_vs_random``: the rule's shift minus its random-neuron draws' (``control``);
- ``generation`` and ``generation_vs_random``: the persona-likelihood shift of generated answers;
- ``kl``: the measured KL, nats/token, at the edit's γ;
- ``questionnaire_shift``, ``statements_shift`` (``compare``, against the unsteered rows), ``questionnaire``,
  ``statements_gap``, ``wikitext_ppl``, ``<task>_acc``, ``judge_trait``, ``judge_fluency``.

Method names are the registry's (``evaluation.methods``), plus ``persona`` (the positive control, whose
direction is ``both``), ``random-neurons:<rule>`` (the random-neuron control of a rule), ``gamma-0`` and
``unsteered``.

Example:
    >>> row = ResultRow("openness", "caa", "increase", "preference", 0.03, ci_low=0.01, ci_high=0.05, n=63,
    ...                 kl_level=0.05, gamma=2.5, harness="control")
    >>> ResultRow.from_dict(row.to_dict()) == row
    True
    >>> row.excludes_zero
    True
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from dpn_lens.evaluation.comparison_record import COMPARISON_FILE, ComparisonRecord, load_comparison_record
from dpn_lens.io import write_csv_atomic

if TYPE_CHECKING:
    from dpn_lens.evaluation.control_record import ControlRecord

__all__ = ["ResultRow", "control_rows", "comparison_rows", "write_result_table", "read_result_table",
           "RESULT_TABLE", "CONTROL_METHODS", "SteeringSummary", "steering_summary", "run_rows"]

RESULT_TABLE = "results.csv"
"""The long table's file name in a run folder."""
CONTROL_METHODS = ("persona", "random-neurons", "gamma-0", "unsteered")
"""Method names (prefixes) of the controls in the table, beside the methods they control for."""

_COMPARE_LEVELS = ("questionnaire", "statements_gap", "kl", "wikitext_ppl", "lambada_acc", "judge_trait",
                   "judge_fluency")
"""Per-row levels of a comparison row carried into the long table (the ``<task>_acc`` columns follow)."""


def _number(value: Any) -> float | None:
    """A finite float, or None for a missing or NaN entry (so that the CSV says nothing, not 'nan')."""
    if value is None or value == "":
        return None
    number = float(value)
    return None if math.isnan(number) else number


@dataclass(frozen=True)
class ResultRow:
    """One measured number with its interval, where and at what cost it was measured.

    Attributes:
        trait: the trait.
        method: the edit or control (see the module docstring).
        direction: ``increase``, ``decrease``, ``both`` (persona control) or ``none`` (unsteered).
        metric: what ``value`` measures (see the module docstring).
        value: the number.
        ci_low, ci_high: its 95% interval (None: none computed).
        n: the items it averages (pairs, questions, questionnaire items; None: not recorded).
        kl_level: the KL (nats/token) the edit's γ was calibrated to; None for a fixed γ.
        gamma: the edit's strength (None: no strength, e.g. the persona control).
        harness: ``control`` or ``compare``.
    """

    trait: str
    method: str
    direction: str
    metric: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    kl_level: float | None = None
    gamma: float | None = None
    harness: str = ""

    @property
    def is_control(self) -> bool:
        """Whether the row is a control (persona, random neurons, γ 0, unsteered), not a method."""
        return self.method.startswith(CONTROL_METHODS)

    def measured_at(self, metric: str, kl_level: float) -> bool:
        """Whether the row is ``metric`` at the edit calibrated to ``kl_level``."""
        return self.metric == metric and self.kl_level is not None and math.isclose(self.kl_level, kl_level)

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0 (False without an interval)."""
        if self.ci_low is None or self.ci_high is None:
            return False
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ResultRow":
        """A row from ``to_dict`` or from a CSV line (strings; empty = None)."""
        n = _number(data.get("n"))
        return cls(trait=str(data["trait"]), method=str(data["method"]), direction=str(data["direction"]),
                   metric=str(data["metric"]), value=float(data["value"]), ci_low=_number(data.get("ci_low")),
                   ci_high=_number(data.get("ci_high")), n=None if n is None else int(n),
                   kl_level=_number(data.get("kl_level")), gamma=_number(data.get("gamma")),
                   harness=str(data.get("harness") or ""))


def _row(trait: str, method: str, direction: str, metric: str, value: Any, harness: str, *,
         ci: tuple[Any, Any] = (None, None), n: Any = None, kl_level: Any = None,
         gamma: Any = None) -> ResultRow | None:
    number = _number(value)
    if number is None:
        return None                       # not measured (a curve that never reached the level)
    count = _number(n)
    return ResultRow(trait, method, direction, metric, number, ci_low=_number(ci[0]), ci_high=_number(ci[1]),
                     n=None if count is None else int(count), kl_level=_number(kl_level), gamma=_number(gamma),
                     harness=harness)


def control_rows(record: "ControlRecord") -> list[ResultRow]:
    """The long rows of a ``dpn-lens control`` record (``control.json``).

    Every method's preference shift at every KL level (``matched_cost``), the rule − random difference
    and the measured KL at the calibrated γ (``calibrated``), the persona control (``validation``), γ 0,
    and the generation-based check with its random-neuron draws (``random-neurons:<rule>``; the margin's
    random-neuron rows come from ``matched_cost``, where the run records them per KL level).

    Example:
        >>> from dpn_lens.evaluation.control_record import ControlRecord
        >>> record = ControlRecord.from_dict({"meta": {"model": "m", "dtype": "float32", "seconds": 1.0,
        ...     "config": {"kl_levels": [0.05]}}, "validation": [{"trait": "openness", "n_pairs": 60, "n_drawn": 64,
        ...     "n_identical": 0, "n_empty": 0, "base_margin": 0.0, "persona_effect": 0.04, "persona_ci_low": 0.02,
        ...     "persona_ci_high": 0.06, "persona_p": 0.01, "persona_z": 3.0, "valid": True, "high_vs_none": 0.1,
        ...     "high_vs_none_ci_low": 0.0, "high_vs_none_ci_high": 0.2, "low_vs_none": 0.1, "low_vs_none_ci_low": 0.0,
        ...     "low_vs_none_ci_high": 0.2}],
        ...     "matched_cost": [{"trait": "openness", "direction": "increase", "method": "caa", "gamma@kl0.05": 2.0,
        ...                       "kl@kl0.05": 0.05, "shift@kl0.05": 0.03, "ci_low@kl0.05": 0.01, "ci_high@kl0.05": 0.05}]})
        >>> [(r.method, r.metric, r.value, r.n) for r in control_rows(record)]
        [('persona', 'preference', 0.04, 60), ('caa', 'preference', 0.03, 60)]
    """
    levels = record.kl_levels
    pairs = {row.trait: row.n_pairs for row in record.validation}
    rows: list[ResultRow | None] = []
    for v in record.validation:
        rows.append(_row(v.trait, "persona", "both", "preference", v.persona_effect, "control",
                         ci=(v.persona_ci_low, v.persona_ci_high), n=v.n_pairs))
    for m in record.matched_cost:
        for level in levels:
            point = m.at(level)
            rows.append(_row(m.trait, m.method, m.direction, "preference", point.shift, "control",
                             ci=(point.ci_low, point.ci_high), n=pairs.get(m.trait), kl_level=level, gamma=point.gamma))
    for c in record.calibrated:
        measured, versus = c.measured, c.random
        where = dict(n=measured.effect.n if measured else None, kl_level=c.target_kl,
                     gamma=measured.gamma if measured else math.nan)
        method = c.method or "dpn-le"     # a run from before the other rules calibrated DPN-LE alone, unnamed
        rows.append(_row(c.trait, method, c.direction, "kl", measured.kl if measured else None, "control", **where))
        rows.append(_row(c.trait, method, c.direction, "preference_vs_random", versus.vs_random if versus else None,
                         "control", ci=(versus.vs_random_ci_low, versus.vs_random_ci_high) if versus else (None, None),
                         **where))
    for z in record.gamma_zero:
        rows.append(_row(z.trait, "gamma-0", "both", "preference", z.effect.shift, "control",
                         ci=(z.effect.ci_low, z.effect.ci_high), n=z.effect.n, gamma=0.0))
    for g in record.generation or []:
        persona = g.method.startswith("persona")
        method, direction = ("persona", "both") if persona else (g.method, g.direction)
        effect, versus = g.effect, g.random
        where = dict(n=effect.n if effect else None, kl_level=None if persona else g.kl_level,
                     gamma=None if persona else g.gamma)
        rows.append(_row(g.trait, method, direction, "generation", effect.shift if effect else math.nan, "control",
                         ci=(effect.ci_low, effect.ci_high) if effect else (None, None), **where))
        rows.append(_row(g.trait, method, direction, "generation_vs_random", versus.vs_random if versus else None,
                         "control", ci=(versus.vs_random_ci_low, versus.vs_random_ci_high) if versus else (None, None),
                         **where))
        rows.append(_row(g.trait, f"random-neurons:{method}", direction, "generation",
                         versus.random_shift if versus else None, "control",
                         ci=(versus.random_ci_low, versus.random_ci_high) if versus else (None, None), **where))
    return [row for row in rows if row is not None]


def comparison_rows(record: ComparisonRecord) -> list[ResultRow]:
    """The long rows of a ``dpn-lens compare`` result (``comparison.json``): each method, trait and
    direction's shifts against the unsteered model (with intervals), levels and capability scores at the
    comparison's strength.

    Example:
        >>> from dpn_lens.evaluation.comparison_record import ComparisonMeta, ComparisonRow, Interval
        >>> row = ComparisonRow(method="caa", trait="openness", direction="increase", n_edited=0, pct_edited=0.0,
        ...                     questionnaire=3.4, option_mass=0.9, statements_high=0.6, statements_low=0.4,
        ...                     statements_gap=0.2, accuracies={"mmlu_acc": 0.5}, wikitext_ppl=31.0, kl=0.01,
        ...                     trait_shift=0.2, trait_shift_interval=Interval(0.1, 0.3, 0.02), seconds=1.0)
        >>> record = ComparisonRecord(rows=(row,), meta=ComparisonMeta(model="m", n_mlp_neurons=96, config={}, seconds=1.0))
        >>> [(r.metric, r.value) for r in comparison_rows(record)][:2]
        [('questionnaire_shift', 0.2), ('questionnaire', 3.4)]
        >>> [r.metric for r in comparison_rows(record)][2:]
        ['statements_gap', 'kl', 'wikitext_ppl', 'mmlu_acc']
    """
    rows: list[ResultRow | None] = []
    for r in record.rows:
        key = (r.trait, r.method, r.direction)
        for name, metric, value, interval in (
                ("trait_shift", "questionnaire_shift", r.trait_shift, r.trait_shift_interval),
                ("statements_shift", "statements_shift", r.statements_shift, r.statements_shift_interval)):
            ci = (interval.ci_low, interval.ci_high) if interval is not None else (None, None)
            rows.append(_row(*key, metric, value, "compare", ci=ci))
        tasks = sorted(name for name in r.accuracies if name != "lambada_acc")
        for name in (*_COMPARE_LEVELS, *tasks):
            rows.append(_row(*key, name, r.number(name), "compare"))
    return [row for row in rows if row is not None]


def write_result_table(rows: Iterable[ResultRow], path: str | os.PathLike) -> Path:
    """Write ``rows`` as ``path`` (CSV with every field as a column, even with no rows; empty = None); atomic."""
    lines = [{name: ("" if value is None else value) for name, value in row.to_dict().items()} for row in rows]
    return write_csv_atomic(path, lines, columns=[f.name for f in dataclasses.fields(ResultRow)])


def read_result_table(path: str | os.PathLike) -> list[ResultRow]:
    """The rows of a ``results.csv`` written by ``write_result_table``.

    Raises:
        ValueError: when the file is not such a table (its header names the columns it lacks).
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        needed = {"trait", "method", "direction", "metric", "value"}
        missing = needed - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not a dpn-lens result table (no {', '.join(sorted(missing))} column); pass "
                             f"the {RESULT_TABLE} of a control or compare run folder")
        return [ResultRow.from_dict(line) for line in reader]


@dataclass(frozen=True)
class SteeringSummary:
    """How many trait-directions one method moved, on one metric at one KL level (``steering_summary``).

    Attributes:
        method: the method.
        trait_directions: the trait-directions it was run on (for this metric, at any level).
        measured: those with a value at this level (a curve that never reached the level has none).
        as_asked: the interval lies above 0.
        wrong_way: the interval lies below 0.
        with_random: those compared with random-neuron draws (0 for a method without them, e.g. CAA).
        beyond_random: the rule − random interval lies above 0.
        as_asked_and_beyond_random: both.
        mean_shift: the mean value over the measured trait-directions.
    """

    method: str
    trait_directions: int
    measured: int
    as_asked: int
    wrong_way: int
    with_random: int
    beyond_random: int
    as_asked_and_beyond_random: int
    mean_shift: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def steering_summary(rows: Iterable[ResultRow], metric: str = "preference", kl_level: float = 0.05
                     ) -> list[SteeringSummary]:
    """Per method (controls left out), the trait-directions ``metric`` says it moved at ``kl_level``.

    The same counts as ``control``'s goal table, read from any long table (one run, or several joined),
    for the margin (``preference``) or the generated text (``generation``).

    Example:
        >>> rows = [ResultRow("o", "caa", "increase", "generation", 0.03, 0.01, 0.05, kl_level=0.05),
        ...         ResultRow("o", "caa", "decrease", "generation", -0.01, -0.03, 0.01, kl_level=0.05)]
        >>> summary = steering_summary(rows, "generation", 0.05)[0]
        >>> summary.as_asked, summary.trait_directions, round(summary.mean_shift, 3)
        (1, 2, 0.01)
    """
    rows = list(rows)
    versus = {(r.trait, r.method, r.direction): r for r in rows if r.measured_at(f"{metric}_vs_random", kl_level)}
    result = []
    for method in dict.fromkeys(r.method for r in rows if r.metric == metric and not r.is_control):
        run_on = {(r.trait, r.direction) for r in rows if r.metric == metric and r.method == method}
        here = [r for r in rows if r.method == method and r.measured_at(metric, kl_level)]
        beyond = [r for r in here if (v := versus.get((r.trait, method, r.direction))) is not None
                  and v.ci_low is not None and v.ci_low > 0]
        asked = [r for r in here if r.ci_low is not None and r.ci_low > 0]
        result.append(SteeringSummary(
            method=method, trait_directions=len(run_on), measured=len(here), as_asked=len(asked),
            wrong_way=sum(r.ci_high is not None and r.ci_high < 0 for r in here),
            with_random=sum((r.trait, method, r.direction) in versus for r in here), beyond_random=len(beyond),
            as_asked_and_beyond_random=sum(r.ci_low is not None and r.ci_low > 0 for r in beyond),
            mean_shift=sum(r.value for r in here) / len(here) if here else math.nan))
    return result


def run_rows(folder: str | os.PathLike) -> tuple[str, list[ResultRow]]:
    """``(model, rows)`` of an evaluation run folder: its ``results.csv``, or, for a folder written before
    that table existed, the rows of its ``control.json`` and ``comparison.json``.

    Raises:
        FileNotFoundError: when the folder holds neither (naming what it looks for).
    """
    import json

    from dpn_lens.evaluation.control_record import CONTROL_FILE, ControlRecord

    folder = Path(folder)
    control_path, comparison_path = folder / CONTROL_FILE, folder / COMPARISON_FILE
    if not control_path.is_file() and not comparison_path.is_file():
        raise FileNotFoundError(f"{folder} holds no control.json or {COMPARISON_FILE}; pass the --out folder of a "
                                "`dpn-lens evaluate`, `control` or `compare` run")
    control = json.loads(control_path.read_text(encoding="utf-8")) if control_path.is_file() else None
    comparison = load_comparison_record(comparison_path) if comparison_path.is_file() else None
    # the model of the control record where there is one, as the long table lists control's rows first
    model = str(control.get("meta", {}).get("model", "")) if control is not None else comparison.meta.model  # type: ignore[union-attr]
    if (folder / RESULT_TABLE).is_file():
        return model, read_result_table(folder / RESULT_TABLE)
    rows = control_rows(ControlRecord.from_dict(control)) if control is not None else []
    rows += comparison_rows(comparison) if comparison is not None else []
    return model, rows
