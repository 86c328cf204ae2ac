"""The comparison: every method x trait x direction on trait control and capability, plus sweeps.

Methods (all through the same evaluation code; one entry each in ``dpn_lens.evaluation.methods``):
``unsteered``, ``dpn-le`` (mode "both"), ``dense`` (s on all neurons of DPN-LE's layers), ``topk``
(s on DPN-LE's neuron budget, chosen by |d|), ``npti``, ``caa`` and ``prompting``.

Per row: neurons edited (count, % of all MLP neurons), questionnaire score of the trait and its change,
statement agreement (high-pole, low-pole, gap) and change, every capability metric and its change.
``trait_shift`` is the questionnaire change signed by the direction (positive = moved as asked);
``statements_shift`` is the change of the statement gap (high-pole minus low-pole agreement), signed
the same way. Both come with a 95% percentile-bootstrap interval over items and a paired Wilcoxon test
(``<name>_ci_low``, ``<name>_ci_high``, ``<name>_p``; ``dpn_lens.evaluation.intervals``); the unsteered
rows are the baseline (shift 0, no interval). ``record.summary`` holds the means per method with
intervals over the pooled items of its conditions. The result is a ``ComparisonRecord``
(``evaluation.comparison_record``: typed rows, written as ``comparison.json``).

By default every questionnaire item of the trait in the inventory and every Anthropic statement of
both poles is asked (``questionnaire_items`` / ``statements_per_pole`` ``None``); ``CompareConfig.quick``
is a few-minute run.
With a judge (``CompareConfig.judge``), rows also hold the judge's trait and fluency ratings of generated
PersonalityBench answers (``judge_trait``, ``judge_fluency``) and ``judge_shift``, signed the same way.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dpn_lens.baselines import PersonaPrompt
from dpn_lens.effect.defaults import SELECTION_PAIRS
from dpn_lens.evaluation import capability as cap
from dpn_lens.io import markdown_table
from dpn_lens.evaluation import trait as tr
from dpn_lens.evaluation.comparison_record import (COMPARISON_FILE, SHIFT_METRICS, ComparisonMeta, ComparisonRecord,
                                                   ComparisonRow, Interval, JudgedAnswer, MethodSummary, RespondentRow,
                                                   ComparisonSweepRow, capability_fields, shift_fields)
from dpn_lens.evaluation.intervals import paired_effect
from dpn_lens.evaluation.judge import JudgeConfig, load_test_questions
from dpn_lens.evaluation.metrics import Capability, Judge, Questionnaire, Statements
from dpn_lens.evaluation.preparation import MapSource, RuleSelection, TraitPreparation, method_inputs
from dpn_lens.evaluation.methods import DEFAULT_METHOD_NAMES, METHOD_NAMES, METHODS_BY_NAME, TraitContext, effect_rules_needed
from dpn_lens.evaluation.table import RESULT_TABLE, comparison_rows, write_result_table
from dpn_lens.report.results import write_results_report
from dpn_lens.localization.localize import reselect
from dpn_lens.run import percent_of_mlp
from dpn_lens.steering import Edit, direction_sign
from dpn_lens.traits import TRAITS, normalize_trait

__all__ = ["CompareConfig", "ComparisonRun", "run_comparison", "map_source", "write_outputs", "trait_effects",
           "summary_by_method", "summary_with_intervals", "SHIFT_METRICS"]

DIRECTIONS = ("increase", "decrease")


@dataclass
class CompareConfig:
    """What to compare and how much data to use.

    ``questionnaire_items`` / ``statements_per_pole``: ``None`` (default) = every item of the trait in
    ``inventory`` and every Anthropic statement of each pole; an int subsamples. Capability sizes
    default to ``CapabilitySizes.quick()``. ``CompareConfig.quick()`` is a few-minute run.

    Example:
        >>> CompareConfig(traits=["openness"], questionnaire_items=6).traits
        ['openness']
        >>> CompareConfig.quick().statements_per_pole
        20
    """

    traits: list[str] = field(default_factory=lambda: list(TRAITS))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHOD_NAMES))
    data_dir: str | None = None
    maps_dir: str | None = None
    locate_pairs: int = 100
    locate_q: float | None = None
    locate_tau_d: float | None = None
    questionnaire_items: int | None = None
    inventory: str = "ipip_neo_300_test"
    statements_per_pole: int | None = None
    respondents: str | None = None
    capability: cap.CapabilitySizes = field(default_factory=cap.CapabilitySizes.quick)
    gamma: float = 1.0
    npti_gamma: float = 1.4
    caa_gamma: float = 1.0
    npti_prompts: int = 16
    npti_new_tokens: int = 24
    caa_pairs: int = 50
    gamma_sweep: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0])
    q_sweep: list[float] = field(default_factory=lambda: [0.999, 0.995, 0.97])
    sweep_trait: str | None = None
    sweep_methods: list[str] = field(default_factory=lambda: ["dpn-le", "npti", "dense"])
    seed: int = 0
    selection_pairs: int = SELECTION_PAIRS
    """Selection pairs per trait for the effect rules' maps (``attribution-t``, ...), as in ``ControlConfig``."""
    budget: int | None = None
    """Neurons an effect rule edits (None: the DPN-LE map's count), as in ``ControlConfig``."""
    judge: JudgeConfig | None = None

    def __post_init__(self) -> None:
        from dpn_lens.numbers import as_int

        self.traits = [normalize_trait(t) for t in self.traits]
        # the attribution rules average a gradient over pairs: at least 2
        self.selection_pairs = as_int(self.selection_pairs, "selection_pairs", "128", minimum=2)
        if self.budget is not None:
            self.budget = as_int(self.budget, "budget (neurons; None: DPN-LE's count)", "100", minimum=1)
        unknown = [m for m in self.methods if m not in METHODS_BY_NAME]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHOD_NAMES)}")
        for name in ("questionnaire_items", "statements_per_pole"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, as_int(value, f"{name} (or None: all)", minimum=1))

    @classmethod
    def quick(cls, **overrides: Any) -> "CompareConfig":
        """A few-minute run: 8 items, 20 statements per pole, quick capability sizes, gamma sweep 0/1/2,
        no q sweep; ``overrides`` replace any field.

        Example:
            >>> CompareConfig.quick(traits=["openness"]).questionnaire_items
            8
        """
        settings: dict[str, Any] = dict(questionnaire_items=8, statements_per_pole=20,
                                        capability=cap.CapabilitySizes.quick(), gamma_sweep=[0.0, 1.0, 2.0], q_sweep=[])
        return cls(**{**settings, **overrides})


class _Evaluator:
    """Evaluates one condition (edit and/or persona) on trait and capability metrics, with shared data."""

    def __init__(self, model: Any, config: CompareConfig):
        self.model, self.config = model, config
        items = tr.load_ipip_items(config.data_dir, config.inventory)
        self.items = {t: [i for i in items if i.trait == t][: config.questionnaire_items] for t in config.traits}
        self.statements = {t: tr.load_statements(config.data_dir, t, config.statements_per_pole, config.seed)
                           for t in config.traits}
        self.suite = cap.load_capability_suite(config.data_dir, config.capability, config.seed)
        judge = config.judge
        self.judge_questions = ({t: load_test_questions(config.data_dir, t, judge.questions_per_trait, config.seed)
                                 for t in config.traits} if judge else {})
        self.judged: list[JudgedAnswer] = []  # every generated answer with its ratings, for inspection

    def trait_metrics(self, trait: str, edit: Edit | None, persona: PersonaPrompt | None,
                      label: Mapping[str, str | float] | None = None
                      ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """``(means, per-item values)``; the values are ``raw`` and ``keyed`` answers and statement ``yes``.

        The means are keyed by their ``ComparisonRow`` field (``questionnaire``, ..., ``judge_trait``);
        ``label`` names the condition (``method`` and its ``direction``, ``gamma`` or ``q``) of the
        judged answers."""
        answers = Questionnaire().score(self.model, edit, self.items[trait], persona)
        statements = Statements().score(self.model, edit, self.statements[trait], persona)
        metrics = {"questionnaire": answers.value, "option_mass": float(answers.details["mass"].mean()),
                   "statements_high": statements.details["high"], "statements_low": statements.details["low"],
                   "statements_gap": statements.details["gap"]}
        if self.config.judge is not None:
            questions = self.judge_questions[trait]
            judged = Judge(trait, self.config.judge).score(self.model, edit, questions, persona).details
            metrics.update(judge_trait=judged["judge_trait"], judge_fluency=judged["judge_fluency"],
                           judge_unparsable=judged["judge_unparsable"])
            # An unparsable reply keeps its row (empty ratings, the raw reply) so it can be read, not guessed.
            self.judged += [JudgedAnswer(**(label or {}), trait=trait, question=q, answer=a,
                                         judge_trait=r.trait if r else None, judge_fluency=r.fluency if r else None,
                                         judge_parsed=r is not None, judge_reply=reply)
                            for q, a, r, reply in zip(questions, judged["answers"], judged["ratings"], judged["replies"])]
        return metrics, {"raw": answers.details["raw"], "keyed": answers.per_item, "yes": statements.per_item}  # type: ignore[dict-item]

    def effects(self, trait: str, values: dict[str, np.ndarray], base: dict[str, np.ndarray], sign: int
                ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """``trait_effects`` on this evaluator's statements of ``trait``."""
        return trait_effects(values, base, np.array([s.high for s in self.statements[trait]], dtype=bool), sign)

    def capability(self, edit: Edit | None, persona: PersonaPrompt | None, light: bool = False) -> dict[str, float]:
        """Every capability number (``light``: only WikiText perplexity and KL) under the condition."""
        return dict(Capability(light).score(self.model, edit, self.suite, persona).details)


def trait_effects(values: dict[str, np.ndarray], base: dict[str, np.ndarray], high: np.ndarray, sign: int
                  ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The signed shifts of one condition with their intervals and tests, and the per-item shifts.

    ``values`` / ``base``: per-item ``keyed`` questionnaire answers and statement ``yes`` values of the
    condition and of the unsteered model (same items, same order); ``high``: which statements are of the
    high pole; ``sign``: ``direction_sign(direction)``. ``trait_shift`` is the mean keyed-answer change,
    ``statements_shift`` the gap change (``trait.statement_shift_items``), both times ``sign``.

    Returns:
        ``({"trait_shift", "trait_shift_ci_low", "trait_shift_ci_high", "trait_shift_p", "statements_shift",
        ...}, {"trait_shift": per-item shifts [n_items], "statements_shift": per-statement shifts})``.

    Example:
        >>> base = {"keyed": np.full(4, 3.0), "yes": np.full(4, 0.5)}
        >>> steered = {"keyed": np.array([3.5, 3.2, 3.4, 3.1]), "yes": np.array([0.7, 0.6, 0.4, 0.3])}
        >>> row, _ = trait_effects(steered, base, np.array([True, True, False, False]), sign=1)
        >>> round(row["trait_shift"], 3), round(row["statements_shift"], 3)
        (0.3, 0.3)
    """
    per_item = {"trait_shift": sign * (np.asarray(values["keyed"], float) - np.asarray(base["keyed"], float)),
                "statements_shift": tr.statement_shift_items(values["yes"], base["yes"], high, sign)}
    row: dict[str, float] = {}
    for name, shifts in per_item.items():
        effect = paired_effect(shifts, np.zeros_like(shifts))
        row.update({name: effect.shift, f"{name}_ci_low": effect.ci_low, f"{name}_ci_high": effect.ci_high,
                    f"{name}_p": effect.p_value})
    return row, per_item


def _prepare(model: Any, trait: str, config: CompareConfig, log, preparation: TraitPreparation | None = None
             ) -> TraitContext:
    """The trait's neuron map and the state of every method that runs on it (in registry order); what
    ``preparation`` already holds under the same settings is taken from it (None: a fresh one)."""
    preparation = TraitPreparation(trait) if preparation is None else preparation
    neuron_map = preparation.neuron_map(model, map_source(config), if_missing="locate", log=log)
    selection = RuleSelection(config.selection_pairs, config.seed, config.budget)
    context = preparation.context(neuron_map, selection, method_inputs(config))
    rules = effect_rules_needed(config.methods)
    if rules:  # the effect rules' maps, selected from the DPN-LE map (or read from --run <rule>/)
        preparation.add_rule_maps(model, context, rules, selection, maps_dir=config.maps_dir, log=log)
    for name, method in METHODS_BY_NAME.items():
        if method.prepare is not None and (name in config.methods or (method.sweepable and name in config.sweep_methods)):
            preparation.add_method_state(model, context, name, config)
    return context


def map_source(config: CompareConfig) -> MapSource:
    """Where the comparison's DPN-LE maps come from (``TraitPreparation.neuron_map``; a map missing from
    ``maps_dir`` is located).

    Example:
        >>> map_source(CompareConfig(locate_pairs=40))
        MapSource(maps_dir=None, locate_pairs=40, q=None, tau_d=None, layers=None, statistics='last')
    """
    return MapSource(config.maps_dir, config.locate_pairs, config.locate_q, config.locate_tau_d)


def _n_conditions(config: CompareConfig) -> int:
    """Trait evaluations the comparison runs (for the progress bar): baselines, rows and sweeps."""
    sweeps = 0
    if normalize_trait(config.sweep_trait or config.traits[0]) in config.traits:
        sweepable = [m for m in config.sweep_methods if m in METHODS_BY_NAME and METHODS_BY_NAME[m].sweepable]
        sweeps = len(sweepable) * len(config.gamma_sweep) + len(config.q_sweep)
    return len(config.traits) * (1 + len(DIRECTIONS) * len(config.methods)) + sweeps


def run_comparison(model: Any, config: CompareConfig, log=print) -> ComparisonRecord:
    """Run the comparison and return its ``ComparisonRecord`` (rows, summary, sweeps, respondents, judged
    answers, meta; ``write_outputs`` writes it).

    One progress bar (tqdm, shown on a terminal) counts every condition: the unsteered baseline of each
    trait, each trait x direction x method, and each sweep point. The run is ``ComparisonRun``'s steps:
    ``start``, ``run_trait`` per trait, ``finish``.

    Example:
        >>> record = run_comparison(load_model("smollm2-135m-instruct"), CompareConfig(data_dir="../shared/data"))  # doctest: +SKIP
        >>> [(entry.method, entry.conditions) for entry in record.summary][:2]                                 # doctest: +SKIP
        [('unsteered', 5), ('dpn-le', 10)]
    """
    run = ComparisonRun.start(model, config, log)
    try:
        for trait in config.traits:
            run.run_trait(trait)
        return run.finish()
    finally:
        run.close()


@dataclass
class ComparisonRun:
    """A comparison in progress (``run_comparison`` is its steps in a row): ``start`` loads the items and
    measures the unsteered model (capability, and every trait's baseline), ``run_trait`` measures one trait's
    methods x directions, ``finish`` runs the sweeps on ``sweep_trait``, the respondent matching and the
    summary, and returns the result; ``close`` closes the progress bar (also after an error).

    ``evaluation.runner.evaluate`` runs one beside a control run, trait by trait, handing both the
    trait's ``TraitPreparation`` so that what both prepare alike (the map, CAA's vector, ...) is made once.

    Example:
        >>> run = ComparisonRun.start(model, CompareConfig.quick(traits=["openness"]))  # doctest: +SKIP
        >>> run.run_trait("openness")                                                    # doctest: +SKIP
        >>> [row.method for row in run.finish().rows][:2]                                # doctest: +SKIP
        ['unsteered', 'dpn-le']
    """

    model: Any
    config: CompareConfig
    log: Callable[[str], None]
    started: float
    evaluator: _Evaluator
    bar: Any
    base_capability: dict[str, float]
    rows: list[ComparisonRow] = field(default_factory=list)
    raw_answers: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)
    base_trait: dict[str, dict[str, float]] = field(default_factory=dict)
    base_values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    item_shifts: dict[tuple[str, str, str], dict[str, np.ndarray]] = field(default_factory=dict)
    contexts: dict[str, TraitContext] = field(default_factory=dict)

    @classmethod
    def start(cls, model: Any, config: CompareConfig, log: Callable[[str], None] = print) -> "ComparisonRun":
        """A comparison of ``config`` on ``model`` with the unsteered rows of every trait measured."""
        from tqdm.auto import tqdm

        started = time.time()
        evaluator = _Evaluator(model, config)
        bar = tqdm(total=_n_conditions(config), desc="compare", unit="condition", disable=None)
        log(f"{sum(len(i) for i in evaluator.items.values())} questionnaire items and "
            f"{sum(len(s) for s in evaluator.statements.values())} statements over {len(config.traits)} traits")
        log("unsteered capability")
        run = cls(model, config, log, started, evaluator, bar, evaluator.capability(None, None))
        for trait in config.traits:
            run.base_trait[trait], run.base_values[trait] = evaluator.trait_metrics(trait, None, None,
                                                                                    {"method": "unsteered"})
            bar.update()
            for direction in DIRECTIONS:
                run.raw_answers[("unsteered", trait, direction)] = run.base_values[trait]["raw"]
            run.rows.append(ComparisonRow(method="unsteered", trait=trait, direction="none", n_edited=0, pct_edited=0.0,
                                          **run.base_trait[trait], **capability_fields(run.base_capability),
                                          trait_shift=0.0, statements_shift=0.0, seconds=0.0,
                                          judge_shift=0.0 if config.judge else None))
        return run

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()

    def run_trait(self, trait: str, preparation: TraitPreparation | None = None) -> None:
        """Measure every method in both directions on ``trait`` (one of ``config.traits``) into ``rows``;
        ``preparation``: what another run made for this trait (None: a fresh one)."""
        model, config, log, evaluator = self.model, self.config, self.log, self.evaluator
        n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
        t0 = time.time()
        context = self.contexts[trait] = _prepare(model, trait, config, log, preparation)
        log(f"{trait}: map {context.neuron_map.n_selected()} neurons; baselines prepared in {time.time() - t0:.0f}s")
        for direction in DIRECTIONS:
            sign = direction_sign(direction)
            for method in config.methods:
                t0 = time.time()
                edit, persona = METHODS_BY_NAME[method].condition(model, context, direction, config)
                metrics, values = evaluator.trait_metrics(trait, edit, persona, {"method": method, "direction": direction})
                self.raw_answers[(method, trait, direction)] = values["raw"]
                effects, self.item_shifts[(method, trait, direction)] = evaluator.effects(
                    trait, values, self.base_values[trait], sign)
                capability = evaluator.capability(edit, persona)
                n_edited = edit.n_edited if edit is not None else 0
                measured, base = {**metrics, **capability}, {**self.base_trait[trait], **self.base_capability}
                judge_shift = (sign * (metrics["judge_trait"] - base["judge_trait"]) if "judge_trait" in metrics
                               else None)
                row = ComparisonRow(method=method, trait=trait, direction=direction, n_edited=n_edited,
                                    pct_edited=percent_of_mlp(n_edited, n_layers, d_mlp), **metrics,
                                    **capability_fields(capability), **shift_fields(effects),
                                    seconds=time.time() - t0, judge_shift=judge_shift,
                                    deltas={key: value - base[key] for key, value in measured.items()})
                self.rows.append(row)
                self.bar.update()
                log(f"{trait} {direction} {method}: q={row.questionnaire:.3f} "
                    f"shift={_with_ci(row.trait_shift, row.trait_shift_interval)} "
                    f"statements={_with_ci(row.statements_shift, row.statements_shift_interval)} "
                    f"kl={row.kl:.4f} ppl={row.wikitext_ppl:.2f} ({row.seconds:.0f}s)")

    def finish(self) -> ComparisonRecord:
        """The respondent matching, the gamma and q sweeps (on ``sweep_trait``, when it ran) and the summary
        of the traits run: the comparison's result."""
        model, config, log, evaluator, bar = self.model, self.config, self.log, self.evaluator, self.bar
        n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
        respondents = _respondent_rows(evaluator, config, self.raw_answers)
        sweep_trait = normalize_trait(config.sweep_trait or config.traits[0])
        gamma_rows: list[ComparisonSweepRow] = []
        q_rows: list[ComparisonSweepRow] = []
        if sweep_trait in self.contexts and (config.gamma_sweep or config.q_sweep):
            context = self.contexts[sweep_trait]
            base = self.base_values[sweep_trait]
            for method in [m for m in config.sweep_methods if m in METHODS_BY_NAME and METHODS_BY_NAME[m].sweepable]:
                for gamma in config.gamma_sweep:
                    edit, _ = METHODS_BY_NAME[method].condition(model, context, "increase", config, gamma)
                    metrics, values = evaluator.trait_metrics(sweep_trait, edit, None,
                                                              {"method": method, "gamma": gamma})
                    point = ComparisonSweepRow(method=method, trait=sweep_trait, gamma=gamma, n_edited=edit.n_edited, **metrics,
                                     **shift_fields(evaluator.effects(sweep_trait, values, base, 1)[0]),
                                     **_text_capability(evaluator.capability(edit, None, light=True)))
                    gamma_rows.append(point)
                    bar.update()
                    log(f"gamma sweep {method} {gamma}: shift={_with_ci(point.trait_shift, point.trait_shift_interval)} "
                        f"kl={point.kl:.4f}")
            for q in config.q_sweep:
                neuron_map = reselect(context.neuron_map, q=q)
                edit, _ = METHODS_BY_NAME["dpn-le"].condition(model, TraitContext(sweep_trait, neuron_map), "increase",
                                                              config)
                metrics, values = evaluator.trait_metrics(sweep_trait, edit, None, {"method": "dpn-le", "q": q})
                point = ComparisonSweepRow(method="dpn-le", trait=sweep_trait, q=q, n_edited=edit.n_edited,
                                 pct_edited=percent_of_mlp(edit.n_edited, n_layers, d_mlp), **metrics,
                                 **shift_fields(evaluator.effects(sweep_trait, values, base, 1)[0]),
                                 **_text_capability(evaluator.capability(edit, None, light=True)))
                q_rows.append(point)
                bar.update()
                log(f"q sweep {q}: n={edit.n_edited} shift={_with_ci(point.trait_shift, point.trait_shift_interval)} "
                    f"kl={point.kl:.4f}")
        bar.close()
        with_judge = config.judge is not None  # replies that were not a rating: reported, never guessed
        meta = ComparisonMeta(
            model=getattr(model, "dpn_model_name", "model"), n_mlp_neurons=n_layers * d_mlp,
            n_questionnaire_items={t: len(i) for t, i in evaluator.items.items()},
            n_statements={t: len(s) for t, s in evaluator.statements.items()},
            config={k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                    for k, v in dataclasses.asdict(config).items()},
            seconds=time.time() - self.started, judge_replies=len(evaluator.judged) if with_judge else None,
            judge_unparsable=sum(not j.judge_parsed for j in evaluator.judged) if with_judge else None)
        return ComparisonRecord(rows=tuple(self.rows), summary=tuple(summary_with_intervals(self.rows, self.item_shifts)),
                                gamma_sweep=tuple(gamma_rows), q_sweep=tuple(q_rows), respondents=tuple(respondents),
                                judged=tuple(evaluator.judged), meta=meta)


def _text_capability(capability: Mapping[str, float]) -> dict[str, float]:
    """The light capability probe's numbers (``wikitext_ppl``, ``kl``) as ``ComparisonSweepRow`` keyword arguments."""
    return {key: capability[key] for key in ("wikitext_ppl", "kl")}


def _respondent_rows(evaluator: _Evaluator, config: CompareConfig, raw: dict) -> list[RespondentRow]:
    """Respondent-matching MAE per method (only when the questionnaire is IPIP-NEO-300's test split)."""
    if config.inventory != "ipip_neo_300_test" or set(config.traits) != set(TRAITS):
        return []
    from dpn_lens.data.contrastive import resolve_data_dir

    folder = resolve_data_dir(config.data_dir, "ipip") / "ipip_neo_300"
    path = Path(config.respondents) if config.respondents else folder / "respondents_sample10.json"
    respondents = tr.load_respondents(path)
    train_ids = {str(i) for i in json.loads((folder / "split.json").read_text())["train_index"]}
    train = [i for i in tr.load_ipip_items(config.data_dir, "ipip_neo_300") if i.id in train_ids]
    test = [i for t in TRAITS for i in evaluator.items[t]]
    result = []
    for method in ["unsteered", *config.methods]:
        mae = tr.respondent_mae(respondents, train, test, lambda t, d: raw[(method, t, d)])
        result.append(RespondentRow(method, mae, len(respondents), len(test)))
    return result


def _with_ci(value: float | None, interval: Interval | None) -> str:
    """``+0.012 [-0.003, +0.027]`` for a shift with a finite interval, else ``+0.012``.

    Example:
        >>> _with_ci(0.012, Interval(-0.003, 0.027, 0.4)), _with_ci(0.0, None)
        ('+0.012 [-0.003, +0.027]', '+0.000')
    """
    if interval is None or not (np.isfinite(interval.ci_low) and np.isfinite(interval.ci_high)):
        return f"{value:+.3f}"
    return f"{value:+.3f} [{interval.ci_low:+.3f}, {interval.ci_high:+.3f}]"


def _ci_column(name: str) -> str:
    return f"{name} [95% CI]"


def _markdown(rows: Sequence[ComparisonRow | ComparisonSweepRow | MethodSummary | RespondentRow], columns: Sequence[str]) -> str:
    """``columns`` of the rows as ``comparison.json`` holds them; a column named ``_ci_column(shift)`` shows
    the shift with its interval."""
    shown = []
    for row in rows:
        cells = row.to_dict()
        shown.append({**cells, **{_ci_column(name): _with_ci(cells[name], Interval.from_columns(cells, name))
                                  for name in SHIFT_METRICS if name in cells}})
    return markdown_table(shown, columns, digits=3)


def _shift_columns(names: Sequence[str] = SHIFT_METRICS) -> list[str]:
    return [c for name in names for c in (_ci_column(name), f"{name}_p")]


def summary_by_method(rows: Sequence[ComparisonRow]) -> list[MethodSummary]:
    """Mean over traits and directions of the main columns, per method (a column the rows lack is left out).

    Example:
        >>> row = ComparisonRow(method="caa", trait="openness", direction="increase", n_edited=0, pct_edited=0.0,
        ...                     questionnaire=3.4, option_mass=0.9, statements_high=0.6, statements_low=0.4,
        ...                     statements_gap=0.2, wikitext_ppl=31.0, kl=0.01, trait_shift=0.2, seconds=1.0)
        >>> summary = summary_by_method([row, dataclasses.replace(row, direction="decrease", trait_shift=0.4)])
        >>> summary[0].conditions, round(summary[0].means["trait_shift"], 3), "statements_shift" in summary[0].means
        (2, 0.3, False)
    """
    columns = ("n_edited", "pct_edited", "trait_shift", "statements_shift", "judge_shift", "judge_fluency",
               "statements_gap", "kl", "wikitext_ppl", *[m for m in cap.CAPABILITY_METRICS if m not in ("kl", "wikitext_ppl")])
    result = []
    for method in dict.fromkeys(row.method for row in rows):
        chosen = [r for r in rows if r.method == method]
        means = {}
        for column in columns:
            values = [value for r in chosen if (value := r.number(column)) is not None]
            if values:
                means[column] = float(np.mean(values))
        result.append(MethodSummary(method, len(chosen), means))
    return result


def _pooled(per_condition: Sequence[np.ndarray]) -> np.ndarray:
    """The per-item values of several conditions as one array whose mean is the mean of their means.

    Each condition's values are scaled by ``n_total / (k * n_condition)``, so a condition with more
    items does not weigh more in the mean than one with fewer.
    """
    total = sum(len(v) for v in per_condition)
    return np.concatenate([np.asarray(v, float) * total / (len(per_condition) * len(v)) for v in per_condition])


def summary_with_intervals(rows: Sequence[ComparisonRow], item_shifts: dict[tuple[str, str, str], dict[str, np.ndarray]]
                           ) -> list[MethodSummary]:
    """``summary_by_method`` with a 95% interval and a paired test of each method's mean shifts.

    ``item_shifts[(method, trait, direction)][shift]`` are the per-item shifts of one condition
    (``trait_effects``); a method's items are pooled over its conditions (``_pooled``) and resampled
    together, and the pooled mean replaces the mean of the rows. The unsteered baseline has no interval.
    """
    result = []
    for entry in summary_by_method(rows):
        keys = [k for k in item_shifts if k[0] == entry.method]
        means, intervals = dict(entry.means), {}
        for name in SHIFT_METRICS if keys else ():
            pooled = _pooled([item_shifts[k][name] for k in keys])
            effect = paired_effect(pooled, np.zeros_like(pooled))
            means[name] = effect.shift
            intervals[name] = Interval(effect.ci_low, effect.ci_high, effect.p_value)
        result.append(dataclasses.replace(entry, means=means, intervals=intervals))
    return result


def write_outputs(record: ComparisonRecord, out: str | Path, make_png: bool = True) -> list[Path]:
    """``comparison.json`` (``record.to_dict()``), CSV of every table, a markdown report, the long table
    (``results.csv``) with its report, and plotly figures (HTML, and PNG if kaleido works); all atomic.

    Returns the paths written.
    """
    from dpn_lens.io import write_csv_atomic, write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json_atomic(out / COMPARISON_FILE, record.to_dict()),
               write_result_table(comparison_rows(record), out / RESULT_TABLE), *write_results_report(out)]
    tables = {"rows": record.rows, "gamma_sweep": record.gamma_sweep, "q_sweep": record.q_sweep,
              "respondents": record.respondents, "judged": record.judged}
    for name, rows in tables.items():
        if rows:
            written.append(write_csv_atomic(out / f"{name}.csv", [row.to_dict() for row in rows]))
    summary = record.summary or summary_by_method(record.rows)
    written.append(write_text_atomic(out / "comparison.md", _report(record, summary)))
    written += _figures(record, out, make_png)
    return written


def _report(record: ComparisonRecord, summary: Sequence[MethodSummary]) -> str:
    """``comparison.md``: the means per method, every condition, respondent matching and the sweeps."""
    meta = record.meta
    judge = ["judge_trait", "judge_shift", "judge_fluency"] if record.judged else []
    main = ["method", "trait", "direction", "n_edited", "pct_edited", "questionnaire", *_shift_columns(["trait_shift"]),
            *judge, "statements_gap", *_shift_columns(["statements_shift"]), "kl", "wikitext_ppl", "lambada_acc", *[f"{t}_acc" for t in cap.MC_TASKS]]
    text = [f"# Comparison on {meta.model}", "",
            f"Run time: {meta.seconds:.0f} s. Neurons: {meta.n_mlp_neurons} MLP neurons.", "",
            *([f"Judge: {meta.judge_unparsable} of {meta.judge_replies} replies were not a "
               "rating (counted in judge_unparsable, left out of the means; the raw replies are in judged.csv).", ""]
              if meta.judge_unparsable is not None else []),
            "Shifts are signed by the direction (positive = moved as asked): trait_shift is the questionnaire "
            "change (1..5 scale), statements_shift the change of the statement gap (high-pole minus low-pole "
            "P(Yes)); [95% CI] is a percentile bootstrap over items, _p a paired Wilcoxon test; the unsteered "
            "rows are the baseline. Items: " + ", ".join(f"{t} {n}" for t, n in
                                                         (meta.n_questionnaire_items or {}).items())
            + "; statements: " + ", ".join(f"{t} {n}" for t, n in (meta.n_statements or {}).items())
            + ".", "",
            "## Mean per method (over traits and directions)", "",
            _markdown(summary, ["method", "conditions", "n_edited", "pct_edited", *_shift_columns(),
                                *[c for c in judge if c != "judge_trait"], "statements_gap", "kl", "wikitext_ppl",
                                "lambada_acc", *[f"{t}_acc" for t in cap.MC_TASKS]]), "",
            "## Every condition", "", _markdown(record.rows, main), ""]
    if record.respondents:
        text += ["## Respondent matching (IPIP-NEO-300, MAE, lower is better)", "",
                 _markdown(record.respondents, ["method", "respondent_mae", "n_respondents", "n_test_items"]), ""]
    if record.gamma_sweep:
        text += ["## Gamma sweep", "", _markdown(record.gamma_sweep, ["method", "gamma", "n_edited", "questionnaire",
                                                                     *_shift_columns(), "kl", "wikitext_ppl"]), ""]
    if record.q_sweep:
        text += ["## q sweep (DPN-LE)", "", _markdown(record.q_sweep, ["q", "n_edited", "pct_edited", "questionnaire",
                                                                      *_shift_columns(), "kl", "wikitext_ppl"]), ""]
    return "\n".join(text)


def _figures(record: ComparisonRecord, out: Path, make_png: bool) -> list[Path]:
    import plotly.graph_objects as go

    from dpn_lens.figures import save_figure, style

    figures = {}
    rows = [r for r in record.rows if r.method != "unsteered"]
    scatter = go.Figure()
    for method in dict.fromkeys(r.method for r in rows):
        chosen = [r for r in rows if r.method == method]
        scatter.add_trace(go.Scatter(x=[r.kl for r in chosen], y=[r.trait_shift for r in chosen], mode="markers",
                                     name=method, text=[f"{r.trait} {r.direction}" for r in chosen]))
    figures["tradeoff"] = style(scatter, "Trait control vs capability cost (each point: trait x direction)",
                                "KL(unsteered || steered), nats/token", "questionnaire shift (as asked)")
    if record.gamma_sweep:
        sweep = go.Figure()
        for method in dict.fromkeys(r.method for r in record.gamma_sweep):
            chosen = [r for r in record.gamma_sweep if r.method == method]
            sweep.add_trace(go.Scatter(x=[r.kl for r in chosen], y=[r.trait_shift for r in chosen],
                                       mode="lines+markers", name=method, text=[f"gamma={r.gamma}" for r in chosen]))
        figures["gamma_sweep"] = style(sweep, f"Gamma sweep ({record.gamma_sweep[0].trait}, increase)",
                                       "KL nats/token", "questionnaire shift")
    if record.q_sweep:
        q = record.q_sweep
        labels = [f"q={r.q} ({r.n_edited} neurons)" for r in q]
        qfig = go.Figure([go.Bar(x=labels, y=[r.trait_shift for r in q], name="questionnaire shift"),
                          go.Bar(x=labels, y=[r.kl for r in q], name="KL (nats/token)")])
        qfig.update_layout(barmode="group")
        figures["q_sweep"] = style(qfig, "q sweep (DPN-LE, increase)")
    written = []
    for name, figure in figures.items():
        figure.update_layout(width=800, height=500)
        try:
            written += save_figure(figure, out, name, png=make_png)
        except RuntimeError as error:  # no Chromium: save_figure wrote the HTML before the PNG failed; keep it
            print(f"PNG of {name} skipped: {error}")
            written.append(out / f"{name}.html")
    return written
