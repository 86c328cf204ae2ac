"""One call for "does this edit move the trait, and at what cost?": metrics in, one typed result table out.

``evaluate(model, metrics, ...)`` is ``dpn-lens evaluate`` for a notebook: it runs, on the one loaded
model, the harness that measures each named metric, and returns an ``Evaluation`` whose ``rows`` are the
long result table (``evaluation.table.ResultRow``) of both:

* ``preference`` and ``generation``: ``evaluation.control`` (every method at matched KL, with the
  persona, random-neuron and γ-0 controls; ``generation`` adds the generated-text check);
* ``questionnaire``, ``statements``, ``capability`` (measured together) and ``judge``:
  ``evaluation.compare`` (fixed γ).

The two harnesses run in one pass over the traits (``trait_schedule``): for each trait its control
steps, then its comparison steps, which share what they prepare alike (the trait's map, its effect rules'
maps, CAA's vector and NPTI's statistics: ``evaluation.preparation``); the records are those
``run_control`` and ``run_comparison`` return with the same configs, assembled at the end.

With ``out`` it writes what the CLI writes: each harness's tables and figures, the joined
``results.csv`` and its report (``results.md``, ``results.html``).

Example:
    >>> result = evaluate(model, ["preference", "capability"], traits=["openness"],                 # doctest: +SKIP
    ...                   control=ControlConfig.quick(data_dir="../shared/data"),
    ...                   compare=CompareConfig.quick(data_dir="../shared/data"), out="runs/eval")
    >>> [(s.method, s.as_asked) for s in result.steering("preference", 0.05)]                          # doctest: +SKIP
    [('dpn-le', 0), ('caa', 2)]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from dpn_lens.evaluation.comparison_record import COMPARISON_FILE, ComparisonRecord, load_comparison_record
from dpn_lens.evaluation.control_record import CONTROL_FILE

if TYPE_CHECKING:
    from dpn_lens.evaluation.control_record import ControlRecord
from dpn_lens.evaluation.table import (RESULT_TABLE, ResultRow, SteeringSummary, comparison_rows, control_rows,
                                       steering_summary, write_result_table)

__all__ = ["HARNESS_OF", "METRICS", "GENERATION_QUESTIONS", "Evaluation", "EvaluationConfig", "evaluate",
           "harnesses_for", "join_results", "trait_schedule"]

HARNESS_OF = {"preference": "control", "generation": "control", "questionnaire": "compare",
              "statements": "compare", "capability": "compare", "judge": "compare"}
"""Which harness measures each metric (the ``dpn-lens`` command of the same name)."""
METRICS = tuple(HARNESS_OF)
GENERATION_QUESTIONS = 20
"""Held-out questions of the generation metric when the control config asks for none."""
RECORDS = {"control": CONTROL_FILE, "compare": COMPARISON_FILE}
"""Each harness's record in a run folder."""


def harnesses_for(metrics: Sequence[str]) -> list[str]:
    """The harnesses that measure ``metrics``, in the order they run.

    Raises:
        ValueError: for an unknown metric (naming the known ones) or none at all.

    Example:
        >>> harnesses_for(["capability", "preference"])
        ['control', 'compare']
    """
    unknown = [m for m in metrics if m not in HARNESS_OF]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}" if unknown
                         else f"no metric given; choose from {', '.join(METRICS)}")
    return [harness for harness in RECORDS if any(HARNESS_OF[m] == harness for m in metrics)]


@dataclass(frozen=True)
class EvaluationConfig:
    """One evaluation's settings: the metrics, and the config of each harness they need (``ControlConfig``
    for ``preference``/``generation``, ``CompareConfig`` for the rest), with the traits of both set alike.

    ``EvaluationConfig.of`` builds one as ``evaluate`` did from its arguments, checking it before anything
    loads: an unknown metric, ``judge`` without a judge endpoint; ``generation`` asks for
    ``GENERATION_QUESTIONS`` questions where the control config asks for none. A harness no metric needs
    has no config (None).

    Example:
        >>> config = EvaluationConfig.of(["preference", "generation"], traits=["openness"])
        >>> config.harnesses, config.control.traits, config.control.generation_questions, config.compare
        (['control'], ['openness'], 20, None)
        >>> EvaluationConfig.of(["margin"])
        Traceback (most recent call last):
        ...
        ValueError: unknown metrics ['margin']; choose from preference, generation, questionnaire, statements, capability, judge
    """

    metrics: tuple[str, ...]
    control: Any = None
    """The ``ControlConfig`` (None: no control metric)."""
    compare: Any = None
    """The ``CompareConfig`` (None: no comparison metric)."""

    @classmethod
    def of(cls, metrics: Sequence[str], traits: Sequence[str] | None = None, control: Any = None,
           compare: Any = None) -> "EvaluationConfig":
        """The config of ``metrics`` from each harness's config (None: its default run) and ``traits`` for
        both (None: each config's own).

        Raises:
            ValueError: for an unknown metric, or ``judge`` without a judge endpoint.
        """
        from dpn_lens.evaluation.compare import CompareConfig
        from dpn_lens.evaluation.control import ControlConfig

        wanted = harnesses_for(metrics)
        if "judge" in metrics and (compare is None or compare.judge is None):   # refused before anything runs
            raise ValueError("the judge metric needs a judge endpoint: compare=CompareConfig(judge=JudgeConfig(url=..., "
                             "model=...)) (dpn-lens evaluate: --judge-url and --judge-model)")
        overrides = {} if traits is None else {"traits": list(traits)}
        control_config = compare_config = None
        if "control" in wanted:
            control_config = dataclasses.replace(control or ControlConfig(), **overrides)
            if "generation" in metrics and not control_config.generation_questions:
                control_config = dataclasses.replace(control_config, generation_questions=GENERATION_QUESTIONS)
        if "compare" in wanted:
            compare_config = dataclasses.replace(compare or CompareConfig(), **overrides)
        return cls(tuple(metrics), control_config, compare_config)

    @property
    def harnesses(self) -> list[str]:
        """The harnesses that run, in order (``harnesses_for``)."""
        return harnesses_for(self.metrics)

    def schedule(self) -> list[tuple[str, tuple[str, ...]]]:
        """``(trait, harnesses)`` in the order the one pass runs them (``trait_schedule``)."""
        return trait_schedule(self.control.traits if self.control else [], self.compare.traits if self.compare else [])

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data (each harness's config as its record writes it)."""
        return {"metrics": list(self.metrics),
                "control": dataclasses.asdict(self.control) if self.control is not None else None,
                "compare": dataclasses.asdict(self.compare) if self.compare is not None else None}


@dataclass(frozen=True)
class Evaluation:
    """What ``evaluate`` measured: the long table, each harness's own record (None where it did not run) and
    the settings it ran with."""

    rows: tuple[ResultRow, ...]
    control: "ControlRecord | None" = None
    comparison: ComparisonRecord | None = None
    config: EvaluationConfig | None = None

    def steering(self, metric: str = "preference", kl_level: float = 0.05) -> list[SteeringSummary]:
        """Per method, the trait-directions ``metric`` says it moved at ``kl_level`` (``steering_summary``)."""
        return steering_summary(self.rows, metric, kl_level)

    def markdown(self, title: str = "Results") -> str:
        """The report of ``rows`` (``dpn_lens.report.results_markdown``)."""
        from dpn_lens.report.results import results_markdown

        return results_markdown(self.rows, title)


def join_results(out: str | Path, harnesses: Sequence[str]) -> list[ResultRow]:
    """Join the records the ``harnesses`` left in ``out`` into one ``results.csv`` and render its report.

    Returns the joined rows (``[]``, writing nothing, when no harness left a record: a ``--plan`` run).
    """
    out = Path(out)
    from dpn_lens.evaluation.control_record import load_control_record

    found = [harness for harness in harnesses if (out / RECORDS[harness]).is_file()]
    if not found:
        return []
    control = load_control_record(out / RECORDS["control"]) if "control" in found else None
    comparison = load_comparison_record(out / RECORDS["compare"]) if "compare" in found else None
    rows = _rows(control, comparison)
    _write_table(out, rows)
    return rows


def _write_table(out: str | Path, rows: Sequence[ResultRow]) -> None:
    """``results.csv`` of ``rows`` in ``out``, and its report (``results.md``, ``results.html``)."""
    from dpn_lens.report.results import write_results_report

    write_result_table(rows, Path(out) / RESULT_TABLE)
    write_results_report(out)


def _rows(control: "ControlRecord | None", comparison: ComparisonRecord | None) -> list[ResultRow]:
    """The long rows of a control record, then of a comparison record (either may be None)."""
    return (control_rows(control) if control else []) + (comparison_rows(comparison) if comparison is not None else [])


def trait_schedule(control: Sequence[str], compare: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``(trait, harnesses)`` in the order ``evaluate`` runs them: one pass over the traits of both runs that
    keeps each run's own order (so each record lists its traits as the run alone would).

    Where no such order exists (the runs list shared traits in other orders, or a trait twice), the
    control traits come first, then the comparison's.

    Example:
        >>> trait_schedule(["openness", "extraversion"], ["openness", "neuroticism", "extraversion"])
        [('openness', ('control', 'compare')), ('neuroticism', ('compare',)), ('extraversion', ('control', 'compare'))]
        >>> trait_schedule(["openness", "extraversion"], ["extraversion", "openness"])[2:]   # orders that disagree
        [('extraversion', ('compare',)), ('openness', ('compare',))]
    """
    separately = [(t, ("control",)) for t in control] + [(t, ("compare",)) for t in compare]
    if len(set(control)) != len(control) or len(set(compare)) != len(compare):
        return separately
    schedule: list[tuple[str, tuple[str, ...]]] = []
    i = j = 0
    while i < len(control) or j < len(compare):
        if i < len(control) and j < len(compare) and control[i] == compare[j]:
            schedule.append((control[i], ("control", "compare")))
            i, j = i + 1, j + 1
        elif i < len(control) and control[i] not in compare:
            schedule.append((control[i], ("control",)))
            i += 1
        elif j < len(compare) and compare[j] not in control:
            schedule.append((compare[j], ("compare",)))
            j += 1
        else:   # both next traits are shared, but not the same one: the orders disagree
            return separately
    return schedule


def evaluate(model: Any, metrics: "Sequence[str] | EvaluationConfig", *, traits: Sequence[str] | None = None,
             control: Any = None,
             compare: Any = None, out: str | Path | None = None, log: Callable[[str], None] = print,
             progress: bool = True, png: bool = False,
             on_trait: "Callable[[ControlRecord], None] | None" = None,
             on_located: Callable[[str, Any], None] | None = None) -> Evaluation:
    """Measure ``metrics`` on ``model`` with each harness's config (defaults: the full runs); see the module note.

    One pass over the traits (``trait_schedule``): each trait's control steps, then its comparison steps
    (``ControlRun.run_trait``, ``ComparisonRun.run_trait``), both asking one ``TraitPreparation`` for the
    trait's map, effect-rule maps and method state, so what both runs set alike is made once (a piece
    either run sets otherwise is made for it alone). The records equal those of ``run_control`` and
    ``run_comparison`` with the same configs.

    Args:
        model: a loaded model (``models.load_model``).
        metrics: an ``EvaluationConfig``, or names from ``METRICS`` with ``traits``, ``control`` and
            ``compare`` as ``EvaluationConfig.of`` takes them:
        traits: the traits of both runs (None: each config's own).
        control: a ``ControlConfig`` (None: the default run); ``generation`` asks for
            ``GENERATION_QUESTIONS`` questions where it asks for none.
        compare: a ``CompareConfig`` (None: the default run); ``judge`` needs its ``judge`` endpoint.
        out: a folder to write every table, figure and the joined report into (None: write nothing).
        png: also write PNG figures (needs Chromium).
        on_trait, on_located: the control run's callbacks (``run_control``'s): after each trait, and for
            each map made on the fly (the CLI saves both as it goes).

    Raises:
        ValueError: for an unknown metric, or ``judge`` without a judge endpoint.
    """
    from dpn_lens.evaluation.compare import ComparisonRun, write_outputs
    from dpn_lens.evaluation.control import ControlRun
    from dpn_lens.evaluation.preparation import TraitPreparation
    from dpn_lens.report.control import write_control_outputs

    if isinstance(metrics, EvaluationConfig):
        if traits is not None or control is not None or compare is not None:
            raise ValueError("evaluate takes an EvaluationConfig alone: set traits and each harness's config in it "
                             "(EvaluationConfig.of(metrics, traits, control, compare))")
        config = metrics
    else:
        config = EvaluationConfig.of(metrics, traits, control, compare)
    wanted, control_config, compare_config = config.harnesses, config.control, config.compare
    control_run = comparison_run = None
    preparations: dict[str, TraitPreparation] = {}
    try:
        if control_config is not None:
            control_run = ControlRun.start(model, control_config, log=log, progress=progress, on_trait=on_trait,
                                             on_located=on_located)
        if compare_config is not None:
            comparison_run = ComparisonRun.start(model, compare_config, log=log)
        for trait, harnesses in config.schedule():
            preparation = preparations.setdefault(trait, TraitPreparation(trait))
            if "control" in harnesses:
                control_run.run_trait(trait, preparation)      # type: ignore[union-attr]
            if "compare" in harnesses:
                comparison_run.run_trait(trait, preparation)   # type: ignore[union-attr]
            if len(wanted) > 1:
                shared = preparation.shared()
                log(f"{trait}: {' and '.join(harnesses)} done; "
                    + (f"made once for both: {', '.join(shared)}" if shared else "nothing prepared alike"))
    except BaseException:
        # The traits control finished are kept, as the CLI keeps them (an interrupted comparison used to
        # leave them written, when control ran to the end first).
        finished = control_run.result() if out is not None and control_run is not None else None
        if finished is not None and finished.traits_done:
            write_control_outputs(finished, out, png=False)
            log(f"control's finished traits written to {out} before the error")
        raise
    finally:
        for run in (control_run, comparison_run):
            if run is not None:
                run.close()
    control_result = control_run.finish() if control_run is not None else None
    comparison = comparison_run.finish() if comparison_run is not None else None
    if out is not None:
        if control_result is not None:
            write_control_outputs(control_result, out, png=png)
        if comparison is not None:
            write_outputs(comparison, out, make_png=png)
    rows = _rows(control_result, comparison)
    if out is not None:      # the joined table beside each harness's own files
        _write_table(out, rows)
    return Evaluation(tuple(rows), control_result, comparison, config)
