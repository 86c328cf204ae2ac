"""Trait control: does an edit make the model, asked without a persona, prefer what the persona would say?

For every trait, on preference pairs the model itself wrote under a high- and a low-trait persona
(held-out PersonalityBench questions and descriptions; localization uses the embedded data), this
measures with 95% bootstrap intervals and paired tests:

* the **positive control**, fixed before any result was seen: the persona effect per pair is
  ``(margin under a high persona - margin under a low persona) / 2``, with descriptions the pairs were
  not generated with. Any persona context raises the log-probability of both answers, so a persona vs
  no persona difference is dominated by that shared shift; high minus low cancels it. The metric is
  valid for a trait only if this interval excludes 0 on the positive side;
* the **dose-response** of every method (DPN-LE, DPN-LE_w, directional, top-|d|, dense, NPTI, CAA)
  and of the **random-neuron control** (DPN-LE's deltas on random neurons of the same layers): the
  preference shift (signed by direction; positive = moved as asked) against KL from the unsteered
  model and perplexity of the probe text (``calibrate.KLProbe``), on a log grid of gammas;
* **gamma 0** (the DPN-LE edit scaled to zero through the same hooks: must shift nothing);
* the **matched-cost** comparison: each curve's shift at KL 0.01, 0.05 and 0.1 (interpolated);
* at the **calibrated gamma** (DPN-LE reaching the target KL): shift, fraction of the persona effect
  recovered, the random-neuron control at the same gamma, and KL.

The edit acts only at the answer positions (``steering.MaskedEdit``, applied by ``steer``): the teacher-forced
equivalent of decode-only steering.

The run builds its rows as typed dataclasses (``evaluation.control_rows``: ``DosePoint``, ``CalibratedRow``, ...)
and returns them as a ``ControlRecord`` (``evaluation.control_record``), whose ``to_dict`` is ``control.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from dpn_lens.effect.rules import EFFECT_RULES, RULE_NAMES, SELECTION_PAIRS, reselect_top
from dpn_lens.evaluation.calibrate import (DEFAULT_TARGET_KL, GAMMA_GRID, MAX_KL, PROBE_CHUNK_TOKENS, PROBE_CHUNKS,
                                          calibrate_gamma, gamma_at, probe_chunks, sweep_edit)
from dpn_lens.evaluation.control_record import (ControlMeta, ControlRecord, GenerationExamples, GoalRow, LevelPoint,
                                                LevelSummary, MatchedCostRow, MatchedSummaryRow, PairExample,
                                                TraitExamples)
from dpn_lens.evaluation.control_rows import (CalibratedRow, CostPoint, DosePoint, Effect, GammaZeroRow,
                                              GenerationRandomComparison, GenerationRow, MeasuredEdit,
                                              RandomComparison, SweepRow, ValidationRow)
from dpn_lens.evaluation.controls import random_neuron_control
from dpn_lens.evaluation.intervals import PairedEffect, draws_effect, fraction_recovered, paired_effect
from dpn_lens.evaluation.metrics import GenerationPersonaScore, PreferenceMargin, ProbeKL
from dpn_lens.evaluation.methods import METHODS_BY_NAME, TraitContext, effect_rules_needed, neuron_methods
from dpn_lens.evaluation.stage_times import StageClock, StageRow
from dpn_lens.evaluation.preparation import MapSource, RuleSelection, TraitPreparation, method_inputs
from dpn_lens.generation import default_engine, model_dtype, same_answers_as_bridge
from dpn_lens.evaluation.preference import GeneratedPairs, PreferencePair, generate_persona_pairs, pairs_cache_file
from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.steering import Edit, direction_sign, steering_intervention
from dpn_lens.traits import TRAITS, normalize_trait, trait_title

__all__ = ["ControlConfig", "ControlRun", "map_source", "SWEEP_METHODS", "DEFAULT_METHODS", "RANDOM_CONTROL",
           "ALL_NEURONS", "random_curve", "held_out_pairs", "HeldOutPairs", "persona_control", "run_control",
           "matched_cost_rows", "goal_rows", "merge_control_results", "swept_rules", "generation_checks",
           "personalitybench_material"]

SWEEP_METHODS = ("dpn-le", "dpn-le-w", "directional", "topk", "dense", *EFFECT_RULES, "attribution-t-resid",
                 "attribution-t-frozen", "dpn-le-frozen", "attribution-t-scaled", "dpn-le-scaled", "npti", "caa")
"""Every method the dose-response can sweep, in table order (names of ``evaluation.methods``)."""
DEFAULT_METHODS = ("dpn-le", *EFFECT_RULES, "caa")
"""What ``control`` sweeps by default: every selection rule (the paper's and the effect rules) and CAA."""
RANDOM_CONTROL = "random-neurons"
"""The name of the random-neuron control's curve for DPN-LE (its deltas on random neurons of the same
layers); an effect rule's control is ``random-neurons:<rule>`` (``random_curve``)."""
DIRECTIONS = ("increase", "decrease")
ALL_NEURONS = 0
"""In ``ControlConfig.k_sweep``: every candidate neuron of the rule (written ``all`` on the command line)."""
DEFAULT_SCORE_CACHE_GIB: float | None = None
"""``ControlConfig.score_cache_gib``: keep the whole cache, the fastest. It grows with the pairs (SmolLM2-135M
in float32 on PersonalityBench questions, ``answer_cache_bytes``: 0.29 GiB for 64 pairs, 3.1 GiB for 512);
``dpn-lens plan`` prints it, and a bound of 1 GiB on 512 pairs (a third kept) made each scoring pass 1.6x
slower (204 s against 123 s, 2026-12-06, this 2-core Intel Xeon, 1 thread)."""


def random_curve(rule: str) -> str:
    """The name of the random-neuron control of a selection rule's curve.

    Example:
        >>> random_curve("dpn-le"), random_curve("attribution")
        ('random-neurons', 'random-neurons:attribution')
    """
    return RANDOM_CONTROL if rule == "dpn-le" else f"{RANDOM_CONTROL}:{rule}"


@dataclass
class ControlConfig:
    """What the trait-control evaluation runs (defaults: the full run; on 2 CPU cores 24 min for SmolLM2-135M
    with its pairs cached, 56 min for Gemma 3 270M with everything included; docs/RESULTS-EARLIER.md).

    Every curve's KL and perplexity are measured on the whole ``gammas`` grid (one cheap pass each);
    the preference shift, which needs the pairs, is measured at the gammas where the curve reaches
    each of ``kl_levels`` (read off the grid in log-log space, then measured exactly there), so
    methods are compared at matched cost directly. ``target_kl`` (calibration) is always a level.

    Example:
        >>> ControlConfig.quick().pairs
        24
    """

    traits: list[str] = field(default_factory=lambda: list(TRAITS))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    data_dir: str | None = None
    maps_dir: str | None = None
    locate_pairs: int = 500
    statistics: str = "last"
    locate_q: float | None = None
    locate_tau_d: float | None = None
    locate_layers: list[int] | None = None
    pairs: int = 64
    max_new_tokens: int = 48
    gammas: list[float] = field(default_factory=lambda: list(GAMMA_GRID))
    kl_levels: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1])
    target_kl: float = DEFAULT_TARGET_KL
    kl_chunks: int = PROBE_CHUNKS
    kl_tokens: int = PROBE_CHUNK_TOKENS
    kl_skip_context: bool = True
    """The KL probe leaves its context token (BOS) unedited, as decode-only use leaves the prompt
    (``KLProbe(edit_context=False)``, the default); False edits it too, as every run before 2026-12-05
    did (``--kl-edit-context`` reproduces those)."""
    random_control: bool = True
    random_draws: int = 5
    random_draws_off_target: int = 1
    seed: int = 0
    cache_pairs: bool = True
    npti_prompts: int = 16
    npti_new_tokens: int = 24
    caa_pairs: int = 50
    pair_batch: int = 16
    """Held-out pairs generated at a time (in bfloat16 the batch can change a greedy answer, so a batch
    other than 16, the one every committed run used, is part of the pairs' cache key)."""
    selection_pairs: int = SELECTION_PAIRS
    budget: int | None = None
    k_sweep: list[int] = field(default_factory=list)
    generation_questions: int = 0
    generation_levels: list[float] | None = None
    generation_methods: list[str] | None = None
    generation_draws: int = 5
    score_cache_gib: float | None = DEFAULT_SCORE_CACHE_GIB
    """GiB of the held-out questions' key/value cache the preference scorer keeps between edits (None: all);
    the questions of batches past it run again for every edit (``CachedAnswerScorer``; the numbers do
    not change; ``DEFAULT_SCORE_CACHE_GIB`` has the sizes)."""

    def __post_init__(self) -> None:
        self.traits = [normalize_trait(t) for t in self.traits]
        unknown = [m for m in self.methods if m not in METHODS_BY_NAME or not METHODS_BY_NAME[m].sweepable]
        if unknown:
            raise ValueError(f"unknown or unsweepable methods {unknown}; choose from {', '.join(SWEEP_METHODS)}")
        if self.statistics not in ("last", "answer"):
            raise ValueError(f"statistics must be 'last' (the paper: last prompt token) or 'answer' (mean over the "
                             f"model's own answer tokens), got {self.statistics!r}")
        from dpn_lens.numbers import as_float, as_int

        # numpy / torch numbers are numbers (and become plain ones: the result is written as JSON)
        self.pairs = as_int(self.pairs, "pairs (an interval needs at least 4 items)", "64", minimum=4)
        self.seed = as_int(self.seed, "seed", "0")
        for name in ("random_draws", "random_draws_off_target", "selection_pairs", "generation_questions",
                     "generation_draws"):
            setattr(self, name, as_int(getattr(self, name), name, minimum=0))
        if self.random_control and self.random_draws < 1:
            raise ValueError("random_draws must be at least 1 with the random-neuron control (or turn it off)")
        if self.score_cache_gib is not None:
            self.score_cache_gib = as_float(self.score_cache_gib, "score_cache_gib (GiB of the questions' cache kept "
                                            "while scoring; 0: none, None: all)", "1.0", minimum=0)
        if self.budget is not None:
            self.budget = as_int(self.budget, "budget (neurons; None: DPN-LE's count)", "100", minimum=1)
        self.k_sweep = [as_int(k, "each k_sweep budget (0 = all neurons)", "128", minimum=0) for k in self.k_sweep]
        self.target_kl = as_float(self.target_kl, "target_kl", "0.05")
        self.kl_levels = [as_float(level, "each KL level", "0.05") for level in self.kl_levels]
        self.gammas = [as_float(gamma, "each gamma of the grid", "1.0") for gamma in self.gammas]
        unknown = [m for m in (self.generation_methods or []) if m not in self.methods]
        if unknown:
            raise ValueError(f"generation_methods {unknown} are not among the swept methods {self.methods}")
        self.generation_levels = [float(level) for level in (self.generation_levels or [self.target_kl])]
        if self.generation_questions and any(level not in self.kl_levels and level != self.target_kl
                                             for level in self.generation_levels):
            raise ValueError(f"generation_levels {self.generation_levels} must be among kl_levels {self.kl_levels}")
        if not self.gammas or min(self.gammas) <= 0:
            raise ValueError(f"gammas must be positive (a log grid), got {self.gammas}")
        if self.target_kl <= 0 or not self.kl_levels or any(t <= 0 for t in self.kl_levels):
            raise ValueError("target_kl and kl_levels must be positive (nats/token)")
        # The calibrated gamma is one of the measured levels.
        self.kl_levels = sorted(set(float(t) for t in self.kl_levels) | {float(self.target_kl)})

    @property
    def score_cache_bytes(self) -> int | None:
        """``score_cache_gib`` in bytes, the ``cache_bytes`` of the preference scorers (None: keep all).

        Example:
            >>> ControlConfig(score_cache_gib=0.5).score_cache_bytes
            536870912
        """
        return None if self.score_cache_gib is None else int(self.score_cache_gib * 2 ** 30)

    @classmethod
    def quick(cls, **overrides: Any) -> "ControlConfig":
        """A few-minute run: 24 pairs, 3 methods, 2 KL levels, smaller probe text."""
        settings = dict(pairs=24, methods=["dpn-le", "dense", "caa"], kl_levels=[0.05, 0.5], kl_chunks=2)
        settings.update(overrides)
        return cls(**settings)


# ----- held-out preference pairs -----------------------------------------------------------------------
@dataclass
class HeldOutPairs:
    """A trait's preference pairs and, per pair, the persona descriptions of the positive control.

    ``pairs`` were generated with descriptions ``0..n/2-1`` of PersonalityBench; ``high_personas`` and
    ``low_personas`` come from the other half, so the control does not replay the generating prompt.
    """

    trait: str
    pairs: list[PreferencePair]
    high_personas: list[str]
    low_personas: list[str]
    n_drawn: int
    n_identical: int
    n_empty: int
    cache_file: str | None = None


def personalitybench_material(data_dir: str | None, trait: str) -> tuple[list[str], list[str], list[str]]:
    """``(questions, high personas, low personas)`` of ``trait`` in PersonalityBench (``data_dir``, else
    ``$DPN_LENS_DATA``): the held-out material of the control run (and of the plan's prompt lengths).

    Example:
        >>> questions, highs, lows = personalitybench_material("../shared/data", "openness")   # doctest: +SKIP
    """
    from dpn_lens.data.contrastive import load_question_jsonl, resolve_data_dir
    from dpn_lens.io import read_jsonl

    folder = resolve_data_dir(data_dir, "personalitybench")
    title = trait_title(trait)
    rows = read_jsonl(folder / "description.jsonl")
    highs = [row[title] for row in rows]
    lows = [row[f"{title}_reversed"] for row in rows]
    questions = load_question_jsonl([folder / "test" / f"{title}.jsonl"])
    return questions, highs, lows


def held_out_pairs_key(config: ControlConfig, questions: Sequence[str], highs: Sequence[str],
                       lows: Sequence[str]) -> dict[str, Any]:
    """What the held-out pairs' cache file is keyed by beside the model, the trait and the batch size: the
    sizes, the seed and a digest of the PersonalityBench material (``personalitybench_material``), whose
    first half of the descriptions the pairs are generated under (``preference.pairs_cache_path``)."""
    material = hashlib.sha256(json.dumps([list(questions), list(highs), list(lows)]).encode()).hexdigest()[:16]
    return {"pairs": config.pairs, "seed": config.seed, "max_new_tokens": config.max_new_tokens,
            "material": (material, len(highs) // 2), "format": 1}


def held_out_pairs(model: Any, trait: str, config: ControlConfig, log: Callable[[str], None] = print) -> HeldOutPairs:
    """The model's own greedy answers under high and low PersonalityBench personas, cached per model.

    Generating them is the slowest step on a CPU (about 40 s per 64 pairs for a 135M model), so the
    result is kept in ``$DPN_LENS_CACHE/preference_pairs/`` under a key of the model's revision, dtype,
    trait, sizes, seed and the data's digest; a second run reads it.
    """
    trait = normalize_trait(trait)
    questions, highs, lows = personalitybench_material(config.data_dir, trait)
    half = len(highs) // 2
    path = pairs_cache_file(model, "preference_pairs", trait, batch_size=config.pair_batch,
                            **held_out_pairs_key(config, questions, highs, lows))
    if config.cache_pairs and path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        pairs = [PreferencePair(**row) for row in stored["pairs"]]
        log(f"{trait}: {len(pairs)} preference pairs from the cache ({path})")
        return HeldOutPairs(trait, pairs, stored["high_personas"], stored["low_personas"], stored["n_drawn"],
                            stored["n_identical"], stored["n_empty"], str(path))
    started = time.time()
    generated: GeneratedPairs = generate_persona_pairs(model, trait, questions, highs[:half], lows[:half], config.pairs,
                                                       seed=config.seed, max_new_tokens=config.max_new_tokens,
                                                       batch_size=config.pair_batch)
    rng = np.random.default_rng(config.seed + 1)
    high_personas = [highs[half + int(i)] for i in rng.integers(0, len(highs) - half, len(generated))]
    low_personas = [lows[half + int(i)] for i in rng.integers(0, len(lows) - half, len(generated))]
    result = HeldOutPairs(trait, list(generated.pairs), high_personas, low_personas, generated.n_drawn,
                          generated.n_identical, generated.n_empty, str(path) if config.cache_pairs else None)
    log(f"{trait}: generated {len(generated)} of {generated.n_drawn} pairs in {time.time() - started:.0f}s "
        f"({generated.n_identical} identical and {generated.n_empty} empty dropped)")
    if config.cache_pairs:
        from dpn_lens.io import write_json_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"pairs": [dataclasses.asdict(p) for p in result.pairs],
                                 "high_personas": high_personas, "low_personas": low_personas,
                                 "n_drawn": result.n_drawn, "n_identical": result.n_identical,
                                 "n_empty": result.n_empty})
    return result


# ----- matched cost ---------------------------------------------------------------------------------------
def matched_cost_rows(points: Sequence[DosePoint], kl_levels: Sequence[float]) -> list[MatchedCostRow]:
    """Per trait, direction and method: the measured shift (with its interval) at each KL level (unreached:
    NaN), from the measured dose-response points.

    Example:
        >>> from dpn_lens.evaluation.control_rows import Effect, MeasuredEdit
        >>> measured = MeasuredEdit(4.0, 12, 0.049, 11.2, Effect(0.1, 0.02, 0.18, 0.01, 64))
        >>> row = matched_cost_rows([DosePoint("openness", "increase", "dpn-le", 0.05, measured)], [0.05, 0.1])[0]
        >>> row.at(0.05).shift, row.at(0.1).reached
        (0.1, False)
    """
    groups: dict[tuple[str, str, str], dict[float, DosePoint]] = {}
    for point in points:
        groups.setdefault((point.trait, point.direction, point.method), {})[point.kl_level] = point
    rows = []
    for (trait, direction, method), by_level in groups.items():
        levels = {}
        for level in kl_levels:
            point = by_level.get(level)
            levels[level] = (LevelPoint.unreached() if point is None else
                             LevelPoint(point.measured.gamma, point.measured.kl, point.measured.effect.shift,
                                        point.measured.effect.ci_low, point.measured.effect.ci_high))
        rows.append(MatchedCostRow(trait, direction, method, levels))
    return rows


def _mean_at_cost(rows: Sequence[MatchedCostRow], methods: Sequence[str], kl_levels: Sequence[float]
                  ) -> list[MatchedSummaryRow]:
    summary = []
    for method in methods:
        chosen = [r for r in rows if r.method == method]
        levels = {}
        for level in kl_levels:
            values = [r.at(level).shift for r in chosen if r.at(level).reached]
            levels[level] = LevelSummary(mean_shift=float(np.mean(values)) if values else math.nan,
                                         reached=f"{len(values)}/{len(chosen)}",
                                         ci_positive=f"{sum(r.at(level).ci_low > 0 for r in chosen)}/{len(chosen)}")
        summary.append(MatchedSummaryRow(method, levels))
    return summary


# ----- the run ------------------------------------------------------------------------------------------
def _effect(steered: np.ndarray, base: np.ndarray, sign: float, persona_items: np.ndarray) -> Effect:
    """Shift (signed; ``steered`` may be ``[n_draws, n_pairs]`` for random draws) with its interval, and the
    fraction of the persona effect it recovers (only when that effect is positive: a ratio to it means nothing
    otherwise)."""
    if steered.ndim == 2:   # several random draws: intervals over draws and pairs
        effect = draws_effect(sign * (steered - base[None, :]))
        mean_steered = steered.mean(0)
    else:
        effect = paired_effect(sign * steered, sign * base)
        mean_steered = steered
    recovered = fraction_recovered(sign * (mean_steered - base), persona_items) if persona_items.mean() > 0 else None
    return Effect.of(effect, recovered)


class _Progress:
    """One tqdm bar over every planned evaluation; a curve that stops early advances it by what it skipped."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="trait control", unit="eval", disable=not enabled)

    def step(self, n: int = 1, note: str | None = None) -> None:
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _cost_curve(edit_at: Callable[[float], Edit], probe: Callable[[Edit], tuple[float, float]], config: ControlConfig,
                trait: str, direction: str, method: str) -> list[CostPoint]:
    """KL and perplexity over the gamma grid (one pass of the probe text each), halving below the grid
    while even its smallest gamma costs more than the lowest KL level (so every level can be read off)."""
    grid = sorted(config.gammas)
    costs: dict[float, tuple[float, float]] = {}
    for gamma in grid:
        costs[gamma] = probe(sweep_edit(edit_at, gamma))
        if costs[gamma][0] > max(MAX_KL, max(config.kl_levels)):
            break   # capability is gone: larger gammas only cost time
    gamma, extra = grid[0], 0
    while costs[gamma][0] > min(config.kl_levels) and extra < 4:
        gamma /= 2
        costs[gamma] = probe(sweep_edit(edit_at, gamma))
        extra += 1
    return [CostPoint(trait, direction, method, gamma=g, kl=costs[g][0], ppl=costs[g][1]) for g in sorted(costs)]


def _level_gammas(cost: Sequence[CostPoint], kl_levels: Sequence[float]) -> dict[float, float]:
    """The gamma at which a cost curve first reaches each KL level (levels it never reaches are left out)."""
    gammas, kls = [p.gamma for p in cost], [p.kl for p in cost]
    found = {level: gamma_at(gammas, kls, level) for level in kl_levels}
    return {level: gamma for level, gamma in found.items() if not math.isnan(gamma)}


def swept_rules(methods: Sequence[str]) -> list[str]:
    """The selection rules among ``methods`` that the budget sweep re-selects (``--k-sweep``)."""
    return [name for name in neuron_methods(methods) if name in RULE_NAMES]


def generation_checks(config: ControlConfig) -> list[tuple[str, float, int]]:
    """``(method, KL level, random-neuron draws)`` of each answer set the generation check generates per
    direction: every generation method at every generation level; a rule's random draws only where the
    verdict is read (the target KL, or the only level checked).

    Example:
        >>> config = ControlConfig(methods=["dpn-le", "caa"], generation_questions=4, kl_levels=[0.05, 0.5],
        ...                        generation_levels=[0.05, 0.5], generation_draws=2)
        >>> generation_checks(config)
        [('dpn-le', 0.05, 2), ('dpn-le', 0.5, 0), ('caa', 0.05, 0), ('caa', 0.5, 0)]
    """
    rules = neuron_methods(config.methods)
    levels = config.generation_levels or [config.target_kl]
    return [(name, level, config.generation_draws if name in rules and (level == config.target_kl or len(levels) == 1)
             else 0)
            for name in config.generation_methods or [m for m in config.methods if m in rules or m == "caa"]
            for level in levels]


def _random_seed(config: ControlConfig, draw: int) -> int:
    """Seed of random-neuron draw ``draw``: draw 0 of ``--seed s`` is seed ``s`` (the one draw of earlier runs)."""
    return config.seed + 1000 * draw


@dataclass
class _TraitRun:
    """What one trait's evaluation shares: the model, the metrics and their items (the KL probe's text,
    the held-out pairs), the unsteered margins and the persona items."""

    model: Any
    config: ControlConfig
    kl: ProbeKL
    probe_text: list[list[int]]
    margin: PreferenceMargin
    pairs: list[PreferencePair]
    base: np.ndarray
    persona_items: np.ndarray
    context: TraitContext
    bar: _Progress
    clock: StageClock = field(default_factory=StageClock)

    def cost(self, edit: Edit | None) -> tuple[float, float]:
        """``(KL, perplexity)`` of ``edit`` on the probe text."""
        with self.clock.stage("KL curves"):
            score = self.kl.score(self.model, edit, self.probe_text)
        return score.value, score.details["ppl"]

    def margins(self, edit: Edit | None) -> np.ndarray:
        """``[n_pairs]`` preference margins under ``edit``."""
        with self.clock.stage("answer scoring"):
            return self.margin.score(self.model, edit, self.pairs).per_item  # type: ignore[return-value]

    def edit_at(self, method: str, direction: str) -> Callable[[float], Edit]:
        """``gamma -> edit`` of ``method`` in ``direction`` (a rule's map, NPTI, CAA, ...)."""
        def build(gamma: float) -> Edit:
            return METHODS_BY_NAME[method].condition(self.model, self.context, direction, self.config, gamma)[0]  # type: ignore[arg-type, return-value]
        return build

    def measure(self, edit_at: Callable[[float], Edit], gamma: float, sign: float
                ) -> tuple[MeasuredEdit, np.ndarray]:
        """KL, perplexity and the signed shift of ``edit_at``'s edit at ``gamma``; and its ``[n_pairs]`` margins."""
        edit = sweep_edit(edit_at, gamma)
        kl, ppl = self.cost(edit)
        margins = self.margins(edit)
        return MeasuredEdit(gamma, edit.n_edited, kl, ppl, _effect(margins, self.base, sign, self.persona_items)), margins

    def random_draws(self, rule: str, direction: str, gamma: float, sign: float, draws: int
                     ) -> tuple[MeasuredEdit, np.ndarray]:
        """The rule's deltas at ``gamma`` on random neurons of the same layers, ``draws`` times: one point
        (KL and perplexity averaged over draws, the shift's interval over draws and pairs) and ``[draws, pairs]`` margins."""
        edit = sweep_edit(self.edit_at(rule, direction), gamma)
        kls, ppls, margins = [], [], []
        for draw in range(draws):
            control = random_neuron_control(edit, seed=_random_seed(self.config, draw))  # type: ignore[arg-type]
            kl, ppl = self.cost(control)
            kls.append(kl)
            ppls.append(ppl)
            margins.append(self.margins(control))
        stacked = np.stack(margins)
        return MeasuredEdit(gamma, edit.n_edited, float(np.mean(kls)), float(np.mean(ppls)),
                            _effect(stacked, self.base, sign, self.persona_items), draws=draws), stacked


@dataclass
class _Parts:
    """A run's rows so far, one list per long table of ``control.json`` (``evaluation.control_rows``);
    ``stages`` are ``StageClock.rows`` (wall seconds per stage)."""

    validation: list[ValidationRow] = field(default_factory=list)
    costs: list[CostPoint] = field(default_factory=list)
    curves: list[DosePoint] = field(default_factory=list)
    calibrated: list[CalibratedRow] = field(default_factory=list)
    gamma_zero: list[GammaZeroRow] = field(default_factory=list)
    sweep: list[SweepRow] = field(default_factory=list)
    generation: list[GenerationRow] = field(default_factory=list)
    stages: list[StageRow] = field(default_factory=list)

    @classmethod
    def of_records(cls, records: Sequence[ControlRecord]) -> "_Parts":
        """The rows of several control records, joined in order (a table an older record lacks adds none)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: [row for record in records for row in (getattr(record, name) or [])] for name in names})


def run_control(model: Any, config: ControlConfig, log: Callable[[str], None] = print,
                progress: bool = True, maps: dict[str, NeuronMap] | None = None,
                on_trait: Callable[[ControlRecord], None] | None = None,
                on_located: Callable[[str, NeuronMap], None] | None = None) -> ControlRecord:
    """Run the trait-control evaluation (``maps``: DPN-LE maps by trait, else ``config.maps_dir`` or located).

    ``on_trait`` is called with the result so far after each trait (the CLI saves it, so an
    interrupted run keeps its finished traits); ``on_located`` with each map made on the fly, DPN-LE's
    and each effect rule's (the CLI saves them under ``--out``/maps, so another run can reuse them with
    ``--run``). The run is ``ControlRun``'s steps: ``start``, ``run_trait`` per trait, ``finish``.

    Returns the run's ``ControlRecord`` (``to_dict``: ``control.json``): ``costs`` are the KL/perplexity grids,
    ``curves`` the measured points (one per method, direction and reached KL level; a selection rule's
    random-neuron control is the curve ``random_curve(rule)``), ``calibrated`` each selection rule at
    ``target_kl`` beside its random-neuron control at the same gamma, ``goal`` the per-rule verdict at
    ``target_kl``, ``sweep`` the shift at ``target_kl`` per budget ``k`` (``k_sweep``), ``generation``
    the generation-based check (``generation_questions``), ``stages`` each trait's wall seconds per stage
    (``evaluation.stage_times``: the plan's stages, to compare with ``dpn-lens plan``).

    Example:
        >>> result = run_control(load_model("smollm2-135m-instruct"), ControlConfig.quick(data_dir="../shared/data"))  # doctest: +SKIP
        >>> result.validation[0].valid                                                                         # doctest: +SKIP
        True
    """
    run = ControlRun.start(model, config, log=log, progress=progress, on_trait=on_trait, on_located=on_located)
    try:
        for trait in config.traits:
            run.run_trait(trait, neuron_map=maps.get(trait) if maps else None)
    finally:
        run.close()
    return run.finish()


def map_source(config: ControlConfig) -> MapSource:
    """Where the control run's DPN-LE maps come from (``TraitPreparation.neuron_map``; a map missing from
    ``maps_dir`` is an error).

    Example:
        >>> map_source(ControlConfig(locate_pairs=40, locate_layers=[1, 2])).layers
        (1, 2)
    """
    return MapSource(config.maps_dir, config.locate_pairs, config.locate_q, config.locate_tau_d,
                     config.locate_layers, config.statistics)  # type: ignore[arg-type]


@dataclass
class ControlRun:
    """A trait-control run in progress (``run_control`` is its steps in a row): ``start`` makes what every
    trait shares (the KL probe's text, the metrics, the progress bar), ``run_trait`` measures one trait into
    ``parts``, ``close`` closes the bar and ``finish`` assembles the result (``result``: the result so far).

    ``evaluation.runner.evaluate`` runs one beside a comparison run, trait by trait, handing both the
    trait's ``TraitPreparation`` so that what both prepare alike (the map, CAA's vector, ...) is made once.

    Example:
        >>> run = ControlRun.start(model, ControlConfig.quick(traits=["openness"]), progress=False)  # doctest: +SKIP
        >>> run.run_trait("openness"); run.close()                                                   # doctest: +SKIP
        >>> run.finish().traits_done                                                                 # doctest: +SKIP
        ['openness']
    """

    model: Any
    config: ControlConfig
    log: Callable[[str], None]
    on_trait: Callable[[ControlRecord], None] | None
    on_located: Callable[[str, NeuronMap], None] | None
    started: float
    kl_metric: ProbeKL
    margin: PreferenceMargin
    probe_text: list[list[int]]
    per_trait: int
    """Evaluations the progress bar counts per trait."""
    bar: _Progress
    parts: _Parts = field(default_factory=_Parts)
    examples: dict[str, TraitExamples] = field(default_factory=dict)
    map_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each trait's ``NeuronMap.selection_summary`` by rule (``ControlMeta.maps``)."""
    skipped: dict[str, str] = field(default_factory=dict)
    clock: StageClock = field(default_factory=StageClock)
    """Wall seconds per stage and trait (``stages``), to check the plan stage by stage."""

    @classmethod
    def start(cls, model: Any, config: ControlConfig, log: Callable[[str], None] = print, progress: bool = True,
              on_trait: Callable[[ControlRecord], None] | None = None,
              on_located: Callable[[str, NeuronMap], None] | None = None) -> "ControlRun":
        """A run of ``config`` on ``model`` with nothing measured yet (``run_control`` has the arguments)."""
        started = time.time()
        kl_metric = ProbeKL(edit_context=not config.kl_skip_context)
        margin = PreferenceMargin(cache_bytes=config.score_cache_bytes)
        probe_text = probe_chunks(model, config.kl_chunks, config.kl_tokens)
        methods = list(config.methods)
        n_random = len(neuron_methods(methods)) if config.random_control else 0
        n_levels = len(config.kl_levels)
        per_trait = (4 + len(methods) * len(DIRECTIONS) * n_levels + n_random * len(DIRECTIONS) * n_levels
                     + len(swept_rules(methods)) * len(config.k_sweep) * len(DIRECTIONS)
                     + (len(DIRECTIONS) if config.generation_questions else 0))
        bar = _Progress(len(config.traits) * per_trait, progress)
        return cls(model, config, log, on_trait, on_located, started, kl_metric, margin, probe_text, per_trait, bar)

    def result(self) -> ControlRecord:
        """The control result of the traits run so far (what ``run_control`` returns, and ``on_trait`` gets)."""
        return _result(self.model, self.config, self.started, self.parts, self.examples, self.map_settings,
                       self.skipped)

    def close(self) -> None:
        """Close the progress bar (also after an error)."""
        self.bar.close()

    def finish(self) -> ControlRecord:
        """The result of every trait run.

        Raises:
            ValueError: when no trait was steered (every map selects no neurons).
        """
        if len(self.skipped) == len(self.config.traits):
            raise ValueError(f"no trait was steered: every map selects no neurons ({'; '.join(self.skipped)}); "
                             "locate with more pairs or a lower tau_d")
        return self.result()

    def run_trait(self, trait: str, preparation: TraitPreparation | None = None,
                  neuron_map: NeuronMap | None = None) -> None:
        """Measure ``trait`` (``neuron_map``: its DPN-LE map, else ``config.maps_dir``'s or located), adding its
        rows to ``parts``; ``preparation``: what another run made for this trait (None: a fresh one)."""
        model, config, log, clock, bar, parts = self.model, self.config, self.log, self.clock, self.bar, self.parts
        preparation = TraitPreparation(trait) if preparation is None else preparation
        methods = list(config.methods)
        rules = neuron_methods(methods)   # the selection rules, and edits of their neurons (``<rule>-frozen``)
        randomized = rules if config.random_control else []
        t0 = time.time()
        with clock.stage("held-out pairs"):
            held = held_out_pairs(model, trait, config, log)
        pairs = held.pairs
        if len(pairs) < 4:
            raise RuntimeError(f"{trait}: only {len(pairs)} usable preference pairs of {held.n_drawn} drawn; "
                               "raise --eval-pairs")
        # The questions run once per trait; every edit below runs only the answers (the margin's PairScorer).
        base, high, low, persona = persona_control(model, held, self.margin, clock)
        bar.step(3, f"{trait} controls")
        persona_items = (high - low) / 2
        parts.validation.append(_validation_row(held, base, high, low, persona))
        log(f"{trait}: {len(pairs)} pairs; persona effect (high-low)/2 {persona}"
            f"{'' if persona.ci_low > 0 else '  -- positive control FAILS: the metric cannot judge this trait'}")
        if neuron_map is None:
            with clock.stage("locate"):
                neuron_map = preparation.neuron_map(model, map_source(config), if_missing="raise", log=log)
            if self.on_located is not None and not config.maps_dir:
                self.on_located(trait, neuron_map)
        if neuron_map.n_selected() == 0:
            # A result, not bad input (e.g. answer-token statistics from few pairs): this trait has nothing
            # to edit, the other traits of the run still count.
            self.map_settings[trait] = {"dpn-le": neuron_map.selection_summary()}
            self.skipped[trait] = (f"the map selects no neurons (layers {neuron_map.settings.layer_range}, "
                                   f"q={neuron_map.settings.q:g}, tau_d={neuron_map.settings.tau_d:g}), so DPN-LE "
                                   "has nothing to edit; locate with more pairs or a lower tau_d")
            log(f"{trait}: not steered: {self.skipped[trait]}")
            bar.step(self.per_trait - 3, f"{trait} skipped")
            parts.stages += clock.rows(trait, time.time() - t0)
            if self.on_trait is not None:
                self.on_trait(self.result())
            return
        selection = RuleSelection(config.selection_pairs, config.seed, config.budget, cache_pairs=config.cache_pairs)
        context = preparation.context(neuron_map, selection, method_inputs(config))
        needed = effect_rules_needed(methods)
        with clock.stage("selection") if any(rule != "dpn-le" for rule in needed) else contextlib.nullcontext():
            chosen = preparation.add_rule_maps(model, context, needed, selection, maps_dir=config.maps_dir, log=log)
        for rule_map, loaded in chosen.values():
            if self.on_located is not None and not loaded:
                self.on_located(trait, rule_map)
        # which neurons each rule edited: its settings and neurons per pole
        self.map_settings[trait] = {rule: context.rule_map(rule).selection_summary()
                                    for rule in dict.fromkeys(METHODS_BY_NAME[name].neurons_of for name in rules)
                                    or ["dpn-le"]}
        for name in methods:
            if METHODS_BY_NAME[name].prepare is not None:
                with clock.stage("method preparation"):
                    preparation.add_method_state(model, context, name, config)  # type: ignore[arg-type]
        run = _TraitRun(model, config, self.kl_metric, self.probe_text, self.margin, list(pairs), base, persona_items,
                        context, bar, clock)
        zero = run.margins(0.0 * steering_intervention(neuron_map, 1.0, "increase"))
        # KL of a negligible edit (gamma 0.001): what rounding alone costs in this dtype (bf16: ~0.002).
        floor, _ = run.cost(steering_intervention(neuron_map, 1e-3, "increase"))
        parts.gamma_zero.append(GammaZeroRow(trait, _effect(zero, base, 1, persona_items), kl_floor=floor))
        bar.step(1)
        level_gammas: dict[tuple[str, str], dict[float, float]] = {}
        for direction in DIRECTIONS:
            sign = direction_sign(direction)
            margins_at: dict[tuple[str, float], np.ndarray] = {}
            for name in methods:
                cost = _cost_curve(run.edit_at(name, direction), run.cost, config, trait, direction, name)
                parts.costs += cost
                levels = level_gammas[(name, direction)] = _level_gammas(cost, config.kl_levels)
                for level in config.kl_levels:
                    if level in levels:
                        measured, margins_at[(name, level)] = run.measure(run.edit_at(name, direction),
                                                                          levels[level], sign)
                        parts.curves.append(DosePoint(trait, direction, name, level, measured))
                    bar.step(1, f"{trait} {direction} {name} KL {level:g}")
                if name not in randomized:
                    continue
                # The same deltas on random neurons, at the rule's gammas: does the choice of neurons matter?
                control = random_curve(name)
                for level in config.kl_levels:
                    # Several draws where the verdict is read (the target KL); fewer elsewhere, to save time.
                    draws = config.random_draws if level == config.target_kl else config.random_draws_off_target
                    if level in levels and draws:
                        measured, margins_at[(control, level)] = run.random_draws(
                            name, direction, levels[level], sign, draws)
                        parts.curves.append(DosePoint(trait, direction, control, level, measured))
                    bar.step(1, f"{trait} {direction} {control} KL {level:g}")
            parts.calibrated += [_calibrated_row(trait, direction, sign, parts.curves, margins_at, config, rule)
                                 for rule in rules]
        if config.k_sweep:
            with clock.stage("budget sweep"):
                parts.sweep += _budget_sweep(run, swept_rules(methods), config, log)
        generation = None
        if config.generation_questions:
            with clock.stage("generation check"):
                rows, generation = _generation_check(run, held, level_gammas, config, log)
            parts.generation += rows
        self.examples[trait] = TraitExamples(PairExample(pairs[0].question, pairs[0].high_answer, pairs[0].low_answer),
                                             generation)
        parts.stages += clock.rows(trait, time.time() - t0)
        lead = rules[0] if rules else None
        log(f"{trait}: done in {time.time() - t0:.0f}s; at KL {config.target_kl:g}: " + "; ".join(
            f"{r.method} " + _calibrated_line(r, config.target_kl) for r in parts.calibrated
            if r.trait == trait and lead is not None))
        if self.on_trait is not None:
            self.on_trait(self.result())


def _budget_maps(context: TraitContext, rule: str, budgets: Sequence[int]) -> list[tuple[int, NeuronMap | None]]:
    """``(k, the rule's map with about k neurons)`` per budget (``ALL_NEURONS``: every candidate); None when empty.

    An effect rule re-selects its top ``k`` (``reselect_top``). DPN-LE's dual criterion has no ``k``: its
    ``q`` is set so that its searched layers offer ``k`` candidates by ``|s|`` (``q = 1 - k / neurons``), and
    ``|d| > tau_d`` keeps what it keeps (the edited count is recorded); ``all`` is every neuron of its
    layers that passes ``|d| > tau_d``.
    """
    from dpn_lens.localization.localize import reselect

    result: list[tuple[int, NeuronMap | None]] = []
    base = context.rule_map(rule)
    for k in budgets:
        if rule == "dpn-le":
            searched = len(base.layers) * base.d_mlp
            q = 1.0 - k / searched if 0 < k < searched else 1e-9   # q must lie inside (0, 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # an empty re-selection is recorded as such, not warned about
                chosen = reselect(base, q=max(q, 1e-9))
        else:
            candidates = int(np.isfinite(base.effect_score.numpy()).sum())   # type: ignore[union-attr]
            chosen = reselect_top(base, candidates if k == ALL_NEURONS else min(k, candidates))
        result.append((k, chosen if chosen.n_selected() else None))
    return result


def _budget_sweep(run: _TraitRun, rules: Sequence[str], config: ControlConfig, log: Callable[[str], None]
                  ) -> list[SweepRow]:
    """Per rule, budget and direction: the shift where the edit on that many neurons reaches ``target_kl``."""
    from dpn_lens.steering import steering_intervention as edit_of

    rows = []
    trait = run.context.trait
    for rule in rules:
        for k, chosen in _budget_maps(run.context, rule, config.k_sweep):
            budget = "all" if k == ALL_NEURONS else k
            for direction in DIRECTIONS:
                if chosen is None:
                    rows.append(SweepRow(trait, direction, rule, budget, n_edited=0))
                    run.bar.step(1)
                    continue

                def edit_at(gamma: float, chosen: NeuronMap = chosen, direction: str = direction) -> Edit:
                    return edit_of(chosen, gamma, direction, "both")

                # A budget point needs the gamma at the target KL only, not the whole dose-response: the
                # calibration's bracket search probes the few grid points around it (the whole grid's gamma
                # on a KL curve that rises with gamma, in about a third of the probe passes).
                calibration = calibrate_gamma(run.model, edit_at=edit_at, probe=run.cost, target_kl=config.target_kl,
                                              gammas=config.gammas)
                searched = len(calibration.points)   # probe passes of its search (the plan counts them)
                if not calibration.reached:
                    rows.append(SweepRow(trait, direction, rule, budget, n_edited=chosen.n_selected(),
                                         curve_points=searched, max_kl=max(p.kl for p in calibration.points)))
                else:
                    measured, _ = run.measure(edit_at, calibration.gamma, direction_sign(direction))
                    rows.append(SweepRow(trait, direction, rule, budget, n_edited=measured.n_edited,
                                         curve_points=searched, measured=measured))
                run.bar.step(1, f"{trait} sweep {rule} k={budget} {direction}")
    log(f"{trait}: budget sweep done ({len(rows)} points)")
    return rows


def _generation_check(run: _TraitRun, held: HeldOutPairs, level_gammas: dict[tuple[str, str], dict[float, float]],
                      config: ControlConfig, log: Callable[[str], None]
                      ) -> tuple[list[GenerationRow], GenerationExamples]:
    """The generation-based check (``evaluation.generation_check``) of every generation method at each
    generation level, with random-neuron draws for the rules, beside the persona reference."""
    from dpn_lens.hooked import encode

    model, trait = run.model, run.context.trait
    n = min(config.generation_questions, len(held.pairs))
    questions = [pair.question for pair in held.pairs[:n]]
    metric = GenerationPersonaScore(held.high_personas[:n], held.low_personas[:n], config.max_new_tokens)

    def generated(edit: Edit | None) -> tuple[np.ndarray, list[list[int]]]:
        score = metric.score(model, edit, questions)
        return score.per_item, score.details["answers"]  # type: ignore[return-value]

    def tokens(texts: Sequence[str]) -> list[list[int]]:
        return [encode(model, text, add_bos=False) for text in texts]

    def answer_of(answers: list[list[int]]) -> str:
        return model.tokenizer.decode(answers[0], skip_special_tokens=True).strip()

    base, unsteered = generated(None)
    reference = (metric.texts(model, questions, tokens([p.high_answer for p in held.pairs[:n]]))
                 - metric.texts(model, questions, tokens([p.low_answer for p in held.pairs[:n]]))) / 2
    persona = paired_effect(reference, np.zeros_like(reference))
    rows = [GenerationRow(trait, "both", "persona (high-low)/2", kl_level=math.nan, gamma=math.nan,
                          effect=_generation_effect(persona))]
    examples = GenerationExamples(questions[0], answer_of(unsteered))
    for direction in DIRECTIONS:
        sign = direction_sign(direction)
        for name, level, draws in generation_checks(config):
            gamma = level_gammas.get((name, direction), {}).get(level)
            if gamma is None:   # the method's curve never reaches this level: nothing to generate at
                rows.append(GenerationRow(trait, direction, name, kl_level=level, gamma=math.nan))
                continue
            edit = sweep_edit(run.edit_at(name, direction), gamma)
            steered, answers = generated(edit)
            effect = _generation_effect(paired_effect(sign * steered, sign * base))
            changed = float(np.mean([a != b for a, b in zip(answers, unsteered)]))
            if level == config.generation_levels[0]:
                examples.steered[f"{name} {direction}"] = answer_of(answers)
            random = None
            if draws:   # a rule, at the level where the verdict is read (generation_checks)
                drawn = []
                for draw in range(draws):
                    control = random_neuron_control(edit, seed=_random_seed(config, draw))  # type: ignore[arg-type]
                    drawn.append(generated(control)[0])
                stacked = np.stack(drawn)
                alone = draws_effect(sign * (stacked - base[None, :]))
                versus = draws_effect(sign * (steered[None, :] - stacked))
                random = GenerationRandomComparison(alone.shift, alone.ci_low, alone.ci_high, versus.shift,
                                                    versus.ci_low, versus.ci_high, draws=draws)
            rows.append(GenerationRow(trait, direction, name, kl_level=level, gamma=gamma, effect=effect,
                                      changed=changed, random=random))
        run.bar.step(1, f"{trait} generation {direction}")
    log(f"{trait}: generation check done on {n} questions")
    return rows, examples


def _generation_effect(effect: PairedEffect) -> Effect:
    """A generation row's effect: shift, interval, p and n (the generation check has never recorded z)."""
    return Effect(shift=effect.shift, ci_low=effect.ci_low, ci_high=effect.ci_high, p=effect.p_value, n=effect.n)


def _result(model: Any, config: ControlConfig, started: float, parts: _Parts, examples: dict[str, TraitExamples],
            map_settings: dict[str, dict[str, Any]], skipped: dict[str, str]) -> ControlRecord:
    dtype = model_dtype(model)
    meta = ControlMeta(model=getattr(model, "dpn_model_name", "model"), dtype=str(dtype),
                       config=dataclasses.asdict(config), seconds=time.time() - started,
                       engine=default_engine(dtype))
    return _assemble(config, meta, parts, examples, map_settings, skipped)


def _assemble(config: ControlConfig, meta: ControlMeta, parts: _Parts, examples: dict[str, TraitExamples],
              map_settings: dict[str, dict[str, Any]], skipped: dict[str, str]) -> ControlRecord:
    """A control record from its per-trait parts: the matched-cost tables and the goal are derived here."""
    matched = matched_cost_rows(parts.curves, config.kl_levels)
    rules = neuron_methods(config.methods)
    curve_methods = list(config.methods) + ([random_curve(rule) for rule in rules] if config.random_control else [])
    meta = dataclasses.replace(meta, probe_tokens=config.kl_chunks * config.kl_tokens,
                               traits_done=[row.trait for row in parts.validation],
                               # which neurons each selection rule edited: its settings and neurons per pole
                               maps=dict(map_settings),
                               # traits validated but not steered, with why (a map that selects no neurons)
                               skipped=dict(skipped))
    return ControlRecord(validation=list(parts.validation), costs=list(parts.costs), curves=list(parts.curves),
                         matched_cost=matched, matched_summary=_mean_at_cost(matched, curve_methods, config.kl_levels),
                         calibrated=list(parts.calibrated), gamma_zero=list(parts.gamma_zero), examples=dict(examples),
                         meta=meta, goal=goal_rows(parts.calibrated, matched, config.target_kl),
                         sweep=list(parts.sweep), generation=list(parts.generation), stages=list(parts.stages))


def _check_mergeable(index: int, record: ControlRecord) -> None:
    """Refuse a record from before control recorded each row's method and the traits it finished: the
    merge would misread it (its rows cannot be told apart). Rows of older records that lack a method
    (curves, matched cost) or carry keys the row types do not keep are refused where they are read
    (``ControlRecord.from_dict``)."""
    missing = ["traits_done"] if record.meta.traits_done is None else []
    missing += ["calibrated rows' method"] if any(row.method is None for row in record.calibrated) else []
    if missing:
        raise ValueError(f"result #{index} is a control record from an earlier version (it lacks {', '.join(missing)}); "
                         "the merge joins records that name each row's method and their finished traits: run "
                         "`dpn-lens control` again on its traits, then merge")


def merge_control_results(records: Sequence[ControlRecord]) -> ControlRecord:
    """One control record from runs of the same settings on different traits (e.g. traits split over
    processes or machines): the per-trait rows are joined and the matched-cost tables and the goal are
    derived again from all of them, as one run over every trait would have.

    Each run's random draws, pairs and maps depend on the trait and ``seed`` only, not on which other
    traits ran, so the merge equals the single run. Refuses runs whose settings (other than the traits),
    model or dtype differ, and runs that share a trait.

    Example:
        >>> merged = merge_control_results([load_control_record("a"), load_control_record("b")])  # doctest: +SKIP
        >>> merged.traits_done                                                                  # doctest: +SKIP
        ['openness', 'conscientiousness', 'extraversion', 'agreeableness', 'neuroticism']
    """
    if not records:
        raise ValueError("merge_control_results needs at least one control result")
    for index, record in enumerate(records):
        _check_mergeable(index, record)
    # A run from before the probe's setting was recorded edited the BOS token (as --kl-edit-context does).
    configs = [{"kl_skip_context": False, **record.meta.config} for record in records]
    first = records[0].meta
    for index, record in enumerate(records[1:], 1):
        for key in ("model", "dtype"):
            if getattr(record.meta, key) != getattr(first, key):
                raise ValueError(f"result #{index} was run with {key} {getattr(record.meta, key)!r}, result #0 with "
                                 f"{getattr(first, key)!r}: merge only runs of one model and dtype")
        if (same_answers_as_bridge(record.meta.engine, record.meta.dtype)
                != same_answers_as_bridge(first.engine, first.dtype)):
            raise ValueError(f"result #{index} generated with engine {record.meta.engine!r}, result #0 with "
                             f"{first.engine!r}, whose answers differ: merge only runs of one --engine")
        # The scorer's cache budget changes the time and memory of a run, not its numbers.
        differing = sorted(key for key in set(configs[index]) | set(configs[0])
                           if key not in ("traits", "score_cache_gib") and configs[index].get(key) != configs[0].get(key))
        if differing:
            raise ValueError(f"result #{index} differs from result #0 in {', '.join(differing)}: merge only runs "
                             "whose settings differ in --traits alone")
    done: list[str] = []
    for record in records:
        shared = sorted(set(done) & set(record.traits_done))
        if shared:
            raise ValueError(f"more than one result has the trait(s) {', '.join(shared)}: each trait must come "
                             "from one run")
        done += record.traits_done
    config = ControlConfig(**{**configs[0], "traits": done})
    parts = _Parts.of_records(records)
    examples = {trait: example for record in records for trait, example in record.examples.items()}
    map_settings = {trait: value for record in records for trait, value in (record.meta.maps or {}).items()}
    skipped = {trait: why for record in records for trait, why in (record.meta.skipped or {}).items()}
    seconds = [record.meta.command_seconds for record in records]
    meta = ControlMeta(model=first.model, dtype=first.dtype, config=dataclasses.asdict(config),
                       seconds=sum(record.meta.seconds for record in records), engine=first.engine,
                       merged_from=[record.traits_done for record in records],
                       command_seconds=None if None in seconds else sum(seconds))  # type: ignore[arg-type]
    return _assemble(config, meta, parts, examples, map_settings, skipped)


def goal_rows(calibrated: Sequence[CalibratedRow], matched: Sequence[MatchedCostRow], level: float,
              reference: str = "caa") -> list[GoalRow]:
    """Per selection rule at KL ``level``: trait-directions moved as asked (interval above 0), moved the
    wrong way, beating random neurons, both; the mean shift beside ``reference``'s (CAA) on the same
    trait-directions; and whether the issue's goal is met (at least 8 of 10 as asked and beating random
    neurons, mean shift at least CAA's).

    Example:
        >>> from dpn_lens.evaluation.control_rows import Effect, MeasuredEdit, RandomComparison
        >>> measured = MeasuredEdit(4.0, 12, 0.05, 11.0, Effect(0.04, 0.02, 0.06, 0.01, 64))
        >>> versus = RandomComparison(0.0, -0.01, 0.01, 0.05, 0.04, 0.01, 0.07)
        >>> calibrated = [CalibratedRow("attribution", "o", "increase", 0.05, measured, versus)]
        >>> matched = [MatchedCostRow("o", "increase", "caa", {0.05: LevelPoint(2.0, 0.05, 0.02, 0.0, 0.04)})]
        >>> row = goal_rows(calibrated, matched, 0.05)[0]
        >>> row.as_asked, row.as_asked_and_beats_random, row.mean_shift, row.reference_mean_shift
        ('1/1', '1/1', 0.04, 0.02)
    """
    caa = {(r.trait, r.direction): r.at(level).shift for r in matched if r.method == reference}
    rows = []
    for rule in dict.fromkeys(r.method for r in calibrated):
        mine = [r for r in calibrated if r.method == rule]
        reached = [r for r in mine if r.measured is not None]
        asked = [r for r in reached if r.measured.effect.ci_low > 0]        # type: ignore[union-attr]
        wrong = [r for r in reached if r.measured.effect.ci_high < 0]       # type: ignore[union-attr]
        beats = [r for r in reached if r.random is not None and r.random.beats_random]
        both = [r for r in asked if r.random is not None and r.random.beats_random]
        shifts = [r.measured.effect.shift for r in reached]                 # type: ignore[union-attr]
        paired = [caa[(r.trait, r.direction)] for r in reached
                  if not math.isnan(caa.get((r.trait, r.direction), math.nan))]
        mean = float(np.mean(shifts)) if shifts else math.nan
        caa_mean = float(np.mean(paired)) if paired else math.nan
        rows.append(GoalRow(str(rule), reached=f"{len(reached)}/{len(mine)}", as_asked=f"{len(asked)}/{len(mine)}",
                            wrong_way=f"{len(wrong)}/{len(mine)}", beats_random=f"{len(beats)}/{len(mine)}",
                            as_asked_and_beats_random=f"{len(both)}/{len(mine)}", mean_shift=mean,
                            reference_mean_shift=caa_mean, reference=reference,
                            goal_met=bool(len(mine) and len(both) >= 0.8 * len(mine) and not math.isnan(caa_mean)
                                          and mean >= caa_mean)))
    return rows


def persona_control(model: Any, held: HeldOutPairs, margin: PreferenceMargin | None = None,
                    clock: StageClock | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, PairedEffect]:
    """The positive control of one trait's pairs: margins without a persona, under the high and under the
    low personas, and the persona effect ``(high - low) / 2`` with its interval (module note).

    ``margin``: the metric that will score the edits; the unsteered margins are measured last, so it is
    left prepared for ``held.pairs`` without a persona (each question runs once for all the edits).
    ``clock``: the persona passes count as ``persona control``, the unsteered pass, which prepares the
    questions every edit reuses, as ``answer scoring`` (as the plan counts them)."""
    margin = PreferenceMargin() if margin is None else margin
    clock = StageClock() if clock is None else clock
    with clock.stage("persona control"):
        high = margin.score(model, None, held.pairs, persona=held.high_personas).per_item
        low = margin.score(model, None, held.pairs, persona=held.low_personas).per_item
    with clock.stage("answer scoring"):
        base = margin.score(model, None, held.pairs).per_item
    return base, high, low, paired_effect(high / 2, low / 2)  # type: ignore[operator]


def _validation_row(held: HeldOutPairs, base: np.ndarray, high: np.ndarray, low: np.ndarray,
                    persona: PairedEffect) -> ValidationRow:
    """The positive control of one trait: the persona effect (high - low)/2, and each persona vs none."""
    vs_high, vs_low = paired_effect(high, base), paired_effect(-low, -base)
    return ValidationRow(held.trait, len(held.pairs), held.n_drawn, held.n_identical, held.n_empty,
                         base_margin=float(base.mean()), persona_effect=persona.shift, persona_ci_low=persona.ci_low,
                         persona_ci_high=persona.ci_high, persona_p=persona.p_value, persona_z=persona.z,
                         high_vs_none=vs_high.shift, high_vs_none_ci_low=vs_high.ci_low,
                         high_vs_none_ci_high=vs_high.ci_high, low_vs_none=vs_low.shift,
                         low_vs_none_ci_low=vs_low.ci_low, low_vs_none_ci_high=vs_low.ci_high)


def _calibrated_line(row: CalibratedRow, target_kl: float) -> str:
    """One direction of a trait's progress line: a rule's calibrated shift, and its random neurons' when run.

    Example:
        >>> _calibrated_line(CalibratedRow("dpn-le", "openness", "increase", 0.05), 0.05)
        'increase: KL 0.05 not reached'
        >>> effect = Effect(shift=0.01, ci_low=-0.01, ci_high=0.03, p=0.4, n=24, z=0.8)
        >>> measured = MeasuredEdit(gamma=2.0, n_edited=8, kl=0.05, ppl=11.0, effect=effect)
        >>> _calibrated_line(CalibratedRow("dpn-le", "openness", "decrease", 0.05, measured), 0.05)
        'decrease gamma 2 shift +0.010 [-0.010, +0.030]'
    """
    if row.measured is None:
        return f"{row.direction}: KL {target_kl:g} not reached"
    effect = row.measured.effect
    line = (f"{row.direction} gamma {row.measured.gamma:.3g} shift {effect.shift:+.3f} "
            f"[{effect.ci_low:+.3f}, {effect.ci_high:+.3f}]")
    return line + (f" random {row.random.random_shift:+.3f}" if row.random is not None else "")


def _calibrated_row(trait: str, direction: str, sign: float, curves: Sequence[DosePoint],
                    margins_at: dict[tuple[str, float], np.ndarray], config: ControlConfig,
                    rule: str = "dpn-le") -> CalibratedRow:
    """A selection rule at its calibrated gamma (where its curve reaches ``target_kl``) beside its
    random-neuron control at the same gamma, and their paired difference over draws and pairs (does the
    choice of neurons matter?)."""
    level = config.target_kl

    def point_of(method: str) -> DosePoint | None:
        return next((p for p in curves if p.trait == trait and p.direction == direction and p.method == method
                     and p.kl_level == level), None)

    point = point_of(rule)
    if point is None:
        return CalibratedRow(rule, trait, direction, level)
    control = random_curve(rule)
    random = point_of(control)
    if random is None:
        return CalibratedRow(rule, trait, direction, level, point.measured)
    draws = np.atleast_2d(margins_at[(control, level)])
    versus = draws_effect(sign * (margins_at[(rule, level)][None, :] - draws))
    alone = random.measured.effect
    comparison = RandomComparison(alone.shift, alone.ci_low, alone.ci_high, random_kl=random.measured.kl,
                                  vs_random=versus.shift, vs_random_ci_low=versus.ci_low,
                                  vs_random_ci_high=versus.ci_high, random_draws=int(draws.shape[0]))
    return CalibratedRow(rule, trait, direction, level, point.measured, comparison)
