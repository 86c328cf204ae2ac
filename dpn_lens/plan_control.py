"""How long ``dpn-lens control`` will take, before running it (``dpn-lens plan --stage control``).

``control`` spends its time in five kinds of work, each counted from the run's settings
(``control_work``) and each with a cost measured once on this machine (``measure_control_costs``):

* **KL probe passes**: one forward pass over the probe text (``kl_chunks`` x ``kl_tokens``) per γ of
  every curve (method x direction x grid), per calibrated level, per random-neuron draw;
* **answer passes**: the held-out answers under one edit (their questions run once, kept in the KV
  cache), per level and per random draw, plus the unsteered and γ-0 margins;
* **persona passes**: the positive control scores every pair under its high persona, then under its low
  one (two passes, each over both answers after the question with that persona);
* **generation**: the held-out pairs, each question answered greedily under a high and a low persona
  (skipped when the pairs are cached), and an effect rule's selection pairs: per batch a prompt pass
  and decode steps until its longest answer ends (``generation_seconds``);
* **the gradient pass** of the attribution rules (forward and backward over the selection answers).

A cost is a rate, FLOPs per second of that kind of work (decode steps: a fixed cost per step plus a
rate, bent by the seconds measured at each row count, plus what the context adds per row beyond its
FLOPs, timed at a second context, ``decode_step_seconds``), so the same measurement
plans a larger model's run on this machine; the prompts are counted in
tokens from the run's own material (``prompt_tokens_of``: PersonalityBench's persona prompts are about
twice the length of a bare question); a GPU's run needs a
measurement on that GPU. Curves are counted over the whole γ grid: a curve stops early once its KL
passes 2 nats/token, so the time is an upper bound there. The budget sweep (``--k-sweep``) is counted as
bracket searches (``BRACKET_PROBES`` probe passes each, an estimate) and points, the generation check
(``--generation``) as decode steps and persona-scored answer sets. Pairs an earlier run cached are not
generated again; the plan finds them for an embedded or GGUF model (``cached_pairs``). The scoring stages
hold the held-out questions' key/value cache (``scoring_cache``). Not planned: NPTI's preparation.

Example:
    >>> from dpn_lens.evaluation.control import ControlConfig
    >>> config = ControlConfig(methods=["dpn-le", "caa"], kl_levels=[0.05], gammas=[1, 2, 4], random_draws=2)
    >>> work = control_work(ControlSettings(config))
    >>> work.probe_passes, work.answer_passes    # per trait
    (21, 10)
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dpn_lens.generation import GENERATION_BATCH, default_engine
from dpn_lens.plan import (BYTES, GPU_SIZES_GIB, MachineCosts, ModelShape, RunPlan, StagePlan, costs_file, read_costs,
                           model_shape, status_bytes, timed)

if TYPE_CHECKING:
    from dpn_lens.evaluation.answer_cache import CacheFootprint
    from dpn_lens.evaluation.control_record import ControlRecord

__all__ = ["ControlSettings", "ControlWork", "ControlCosts", "control_work", "measure_control_costs", "sample_pairs",
           "saved_control_costs", "plan_control", "plan_control_run", "gradient_logits_bytes", "caa_flops",
           "gradient_activation_bytes", "GradientMemory", "gradient_memory", "selection_batches", "batch_tokens_default",
           "CPU_HEAP_RETAINED", "PromptTokens", "prompt_tokens_of", "generation_seconds", "expected_longest",
           "answer_steps", "CachedPairs", "cached_pairs", "scoring_cache", "persona_pass_flops",
           "persona_scoring_flops", "spread_of_draw", "decode_step_seconds", "DecodeCosts", "STEP_ROWS",
           "CONTEXT_ROWS", "prefill_seconds_per_flop", "sample_persona_prompts", "generation_peak_bytes"]

DIRECTIONS = 2


def _default_config() -> Any:
    from dpn_lens.evaluation.control import ControlConfig

    return ControlConfig()


@dataclass
class ControlSettings:
    """A ``control`` run's ``ControlConfig`` (its settings decide the work) and what the run finds ready."""

    config: Any = field(default_factory=_default_config)
    """The ``evaluation.control.ControlConfig`` of the run."""
    maps_given: bool = False
    """The maps folder holds each trait's DPN-LE map: no locate."""
    rule_maps_given: bool = False
    """It also holds the effect rules' maps: no selection."""
    pairs_cached: bool = False
    """The held-out pairs are in the cache (``--pairs-cached``, or found there: ``cached``): none generated."""
    selection_cached: bool = False
    """The effect rules' selection pairs are in the cache: their gradient pass runs, their generation not."""
    cached: "CachedPairs | None" = None
    """Which traits' pairs the cache holds (``cached_pairs``); ``of_trait`` applies it to one trait."""

    def of_trait(self, trait: str) -> "ControlSettings":
        """These settings for one trait: its pairs cached where ``cached`` found them.

        Example:
            >>> found = CachedPairs(held_out=["openness"], selection=[])
            >>> settings = ControlSettings(cached=found)
            >>> settings.of_trait("openness").pairs_cached, settings.of_trait("neuroticism").pairs_cached
            (True, False)
        """
        found = self.cached
        if found is None:
            return self
        return replace(self, pairs_cached=self.pairs_cached or trait in found.held_out,
                       selection_cached=self.selection_cached or trait in found.selection, cached=None)


@dataclass
class CachedPairs:
    """Which traits' generated pairs ``$DPN_LENS_CACHE`` already holds for a planned run (``cached_pairs``)."""

    held_out: list[str]
    """Traits whose held-out pairs (``evaluation.control.held_out_pairs``) are cached."""
    selection: list[str]
    """Traits whose selection pairs (``effect.pairs.selection_pairs``) are cached."""
    unknown: str | None = None
    """Why the cache could not be looked up (then both lists are empty and every pair is planned)."""


def cached_pairs(spec: str, dtype: str, traits: Sequence[str], config: Any) -> CachedPairs:
    """The traits whose held-out and selection pairs a ``control`` run of ``spec`` in ``dtype`` with ``config``
    would read from the cache, found without loading the model: the cache files are keyed by the model's
    name, revision and dtype (``models.spec_revision`` finds the revision) and the run's sizes, seed and
    material (``held_out_pairs_key``, ``selection_pairs_key``).

    Example:
        >>> from dpn_lens.evaluation.control import ControlConfig
        >>> cached_pairs("/no/such/folder", "float32", ["openness"], ControlConfig()).unknown
        'the revision of /no/such/folder is known only once its weights are loaded (a hub model or a folder), or it is not on this machine'
    """
    import torch

    from dpn_lens.effect.pairs import selection_material, selection_pairs_key
    from dpn_lens.effect.rules import SELECTION_TOKENS
    from dpn_lens.evaluation.control import held_out_pairs_key, personalitybench_material
    from dpn_lens.evaluation.preference import pairs_cache_path
    from dpn_lens.models import spec_revision
    from dpn_lens.traits import normalize_trait

    if not config.cache_pairs:
        return CachedPairs([], [])       # the run generates every pair again (--no-cache)
    revision = spec_revision(spec)
    if revision is None:
        return CachedPairs([], [], f"the revision of {spec} is known only once its weights are loaded (a hub model "
                                   "or a folder), or it is not on this machine")
    torch_dtype = str(getattr(torch, dtype))
    engine = default_engine(dtype)          # the run's answers: the cache key holds an engine whose answers differ
    held_out, selection = [], []
    for trait in traits:
        trait = normalize_trait(trait)
        try:
            material = personalitybench_material(config.data_dir, trait)
        except (OSError, KeyError, ValueError):
            material = None        # the run itself will say what is missing
        if material is not None and pairs_cache_path(
                str(spec), revision, torch_dtype, "preference_pairs", trait, config.pair_batch, engine=engine,
                **held_out_pairs_key(config, *material)).exists():
            held_out.append(trait)
        if pairs_cache_path(str(spec), revision, torch_dtype, "selection_pairs", trait, engine=engine,
                            **selection_pairs_key(*selection_material(trait), config.selection_pairs, config.seed,
                                                  SELECTION_TOKENS)).exists():
            selection.append(trait)
    return CachedPairs(held_out, selection)


@dataclass
class ControlWork:
    """What one trait of ``control`` runs (counts), from ``control_work``."""

    probe_passes: int
    answer_passes: int
    persona_passes: int
    generated_answers: int
    selection_answers: int
    locates: bool
    selection_generated: int = 0
    """Of ``selection_answers``, those generated (0 where the selection pairs are cached)."""
    sweep_probe_passes: int = 0
    """The budget sweep's (``--k-sweep``): a bracket search per rule, budget and direction, then its point."""
    sweep_answer_passes: int = 0
    generation_sets: int = 0
    """The generation check's (``--generation``): answer sets generated, ``generation_questions`` answers each
    (the unsteered set, each method at each level, the rules' random draws at the verdict level)."""
    generation_scored: int = 0
    """Answer sets scored under a high and a low persona (the generated sets and the two reference sets)."""
    generation_questions: int = 0


def control_work(settings: ControlSettings, run: "ControlRecord | None" = None) -> ControlWork:
    """The passes one trait of ``control`` runs, counted as ``evaluation.control.run_control`` makes them.

    Without ``run``, every curve covers the whole γ grid and reaches every KL level (the plan's bound).
    With ``run`` (a ``control`` result of one trait), the curves and points that run measured are counted
    instead: the passes it made, exactly (``tests/test_plan.py`` counts them on the tiny model).
    """
    from dpn_lens.evaluation.methods import effect_rules_needed, neuron_methods

    config = settings.config
    levels = config.kl_levels          # sorted, the target among them (ControlConfig)
    randomized = neuron_methods(config.methods) if config.random_control else []
    if run is None:
        curves = DIRECTIONS * len(config.methods)
        grid_points = curves * len(config.gammas)
        points = curves * len(levels)
        draws = DIRECTIONS * len(randomized) * sum(
            config.random_draws if level == config.target_kl else config.random_draws_off_target for level in levels)
    else:
        grid_points = len(run.costs)
        points = sum(not point.method.startswith("random-neurons") for point in run.curves)
        draws = sum(point.measured.draws or 1 for point in run.curves if point.method.startswith("random-neurons"))
    rules = [] if settings.rule_maps_given else [r for r in effect_rules_needed(config.methods) if r != "dpn-le"]
    attribution = any(r.startswith("attribution") or r == "dpn-le-attribution" for r in rules)
    sweep_probe, sweep_answer = _sweep_passes(config, run)
    generation_sets = _generation_sets(config, run)
    # The rounding floor, every grid point, every measured point and random draw (a probe and an answer pass
    # each); the unsteered and the γ-0 margins.
    return ControlWork(probe_passes=1 + grid_points + points + draws, answer_passes=2 + points + draws,
                       persona_passes=2, generated_answers=0 if settings.pairs_cached else 2 * config.pairs,
                       selection_answers=2 * config.selection_pairs if attribution else 0,
                       selection_generated=2 * config.selection_pairs if attribution and not settings.selection_cached
                       else 0,
                       locates=not settings.maps_given, sweep_probe_passes=sweep_probe, sweep_answer_passes=sweep_answer,
                       generation_sets=generation_sets, generation_scored=generation_sets + 2 if generation_sets else 0,
                       generation_questions=_generation_questions(config, run))


def _generation_questions(config: Any, run: "ControlRecord | None") -> int:
    """Questions the generation check asks: ``--generation``, at most the pairs (a run: as many as it asked)."""
    asked = [int(row.effect.n) for row in (run.generation or [] if run is not None else [])
             if row.method.startswith("persona") and row.effect is not None]
    return max(asked) if asked else min(config.generation_questions, config.pairs)


BRACKET_PROBES = 4
"""Probe passes a budget point's bracket search (``calibrate._kl_bracket``) makes when its γ lies inside the
grid from 4 up (the effect rules' edits need γ 15-60 on the embedded models): γ = 1, γ = 2, the grid point
the KL-grows-like-γ^2 prediction names and its neighbour above, which bracket the target. Counted on KL
curves that grow like γ^1.5 to γ^2.5 (``tests/test_plan_costs.py``): 4 from γ = 4 to 128, 2-3 below 4,
3 where the target lies beyond the grid."""


def _sweep_passes(config: Any, run: "ControlRecord | None") -> tuple[int, int]:
    """Probe and answer passes of the budget sweep: per rule, budget and direction a bracket search of the
    γ grid around the target KL (``BRACKET_PROBES``) and one measured point (a probe and an answer pass);
    from a run, the passes it made. A bound in the answer passes: a budget whose edit does not reach the
    target KL on the grid makes none (the smallest budgets often do not), and an answer pass costs several
    probes (SmolLM2, 32 pairs: 8 s against 1.3 s)."""
    from dpn_lens.evaluation.control import swept_rules

    if not config.k_sweep:
        return 0, 0
    if run is not None:
        rows = run.sweep or []
        reached = sum(row.reached for row in rows)
        return sum(row.curve_points or 0 for row in rows) + reached, reached
    curves = len(swept_rules(config.methods)) * len(config.k_sweep) * DIRECTIONS
    return curves * (min(len(config.gammas), BRACKET_PROBES) + 1), curves


def _generation_sets(config: Any, run: "ControlRecord | None") -> int:
    """Answer sets the generation check generates: the unsteered one, then per direction each check of
    ``evaluation.control.generation_checks`` and its random-neuron draws."""
    from dpn_lens.evaluation.control import generation_checks

    if not config.generation_questions:
        return 0
    if run is not None:
        measured = [row for row in run.generation or []
                    if not row.method.startswith("persona") and row.effect is not None and not math.isnan(row.effect.shift)]
        return 1 + sum(1 + (row.random.draws if row.random is not None else 0) for row in measured)
    return 1 + DIRECTIONS * sum(1 + draws for _, _, draws in generation_checks(config))


@dataclass
class ControlCosts:
    """This machine's measured speed at each kind of ``control`` work, on ``model``."""

    device: str
    dtype: str
    threads: int
    model: str
    probe_flops_per_s: float
    answer_flops_per_s: float
    persona_flops_per_s: float
    gradient_flops_per_s: float
    step_seconds: float
    """Fixed cost of one greedy decode step (Python, cache handling), beside ``step_flops_per_s``."""
    step_flops_per_s: float
    answer_fill: float
    """Greedy answers' mean length as a share of ``max_new_tokens`` (answers end early at EOS)."""
    prompt_tokens: float
    """Mean rendered question length (chat template included) of the sample, tokens."""
    persona_tokens: float
    """Mean rendered question-with-persona length, tokens."""
    trait_seconds: float
    """Per trait beyond the counted passes (intervals, CAA's direction, building edits), per pair."""
    probe_reference_bytes: int
    extra_bytes: int
    """Peak memory of the sample's passes (probe, answers, personas) beyond the loaded model and the probe's
    reference; in a file measured before ``generation_extra_bytes``, its greedy generation too."""
    selection_extra_bytes: int
    """The same for the attribution rules' gradient pass, which only a run that selects a rule makes (its
    backward through the logits makes it the largest on a large vocabulary: Gemma's 262k)."""
    sample_tokens: float
    """Tokens of the sample's answers with their questions: both extras grow with the tokens of a batch,
    and a run's batches are fuller than the sample's (``_batch_scale``)."""
    measured: str
    machine: str = field(default_factory=platform.node)
    answer_steps: list[float] = field(default_factory=list)
    """Decode steps each of the sample's greedy answers took (its tokens and the EOS that ended it), as a
    share of ``max_new_tokens``: a batch decodes until its longest row stops, so a batch of ``b`` rows costs
    the expected longest of ``b`` of them (``expected_longest``). Empty in a file measured before it was
    recorded: every batch is charged ``max_new_tokens`` steps, as then."""
    prefill_flops_per_s: float = 0.0
    """Rate of a generation batch's prompt pass (the whole padded prompts at once), timed apart from its
    decode steps. 0 in a file measured before: the prompt pass is not charged apart (the decode steps were
    then timed with it)."""
    persona_answer_steps: list[float] = field(default_factory=list)
    """``answer_steps`` of greedy answers under a persona, as the held-out and the selection pairs are
    generated (SmolLM2 ends many of those early, few of its bare answers). Empty in an older file:
    ``answer_steps`` (and the selection's answers ``answer_fill`` long) stand in."""
    gradient_seconds: float = 0.0
    """The gradient pass's cost beyond its FLOPs, paid once a pass: its first run took this much longer
    than its second (the first batch's memory, fresh from the system). ``gradient_flops_per_s`` is the
    second run's rate; in an older file (0 here) the first run's."""
    persona_context_once: bool = False
    """``persona_flops_per_s`` counts each distinct persona context once, without logits, and each answer
    with its logits (``persona_pass_flops``), as the scorer runs them. False in an older file, whose rate
    counted every answer's context: a pair's two answers share theirs, so that rate was 1.7x too high for
    the generation check's scoring, where each answer has its own context (planned at 0.5 of its time)."""
    persona_padded: bool = False
    """``persona_flops_per_s`` counts each scorer batch's contexts at its longest context's length
    (``persona_scoring_flops``), as a left-padded batch runs them. False in an older file, whose rate counted
    them at their mean: a run whose persona prompts vary more than the sample's was planned short (LLaMA-3-8B,
    8 pairs: 0.83)."""
    step_rows: list[list[float]] = field(default_factory=list)
    """``[rows, seconds]`` of one decode step at each row count of ``STEP_ROWS``, as measured. A step's cost is
    not linear in its rows on a CPU (SmolLM2 float32, 1 thread: 0.077 s at 2 rows, 0.147 at 8, 0.171 at 10,
    0.165 at 16), so the line (``step_seconds``, ``step_flops_per_s``) is corrected by these points
    (``decode_step_seconds``). Empty in an older file: the line alone."""
    step_token_flops: float = 0.0
    """FLOPs of one row's decode step in the measurement (the sample's model and context): the line's value
    at each of ``step_rows``, which the correction divides by."""
    step_context: float = 0.0
    """The context, in tokens, of the ``step_rows`` measurement (its questions and half its decode steps)."""
    step_context_seconds: float = 0.0
    """What a decode step costs beyond its FLOPs per row, per token of context and per number each token
    keeps in the key/value cache (``ModelShape.cache_values_per_token``): fitted to the steps timed after
    longer prompts (``long_step_rows``). On a CPU the cache's reads and copies, not the attention's FLOPs,
    make a step slower with context (SmolLM2 float32, 1 thread, 16 rows: 0.181 s after 66 tokens, 0.230 s
    after 172, +27% where the FLOPs grow 3%). 0 in an older file: the FLOPs alone."""
    long_step_rows: list[list[float]] = field(default_factory=list)
    """``[rows, seconds]`` of a decode step after the longer prompts, at ``CONTEXT_ROWS``: the step after the
    short prompts times the long step's ratio to it, timed side by side (``_decode_costs``)."""
    long_step_context: float = 0.0
    """Their context in tokens."""
    prefill_points: list[list[float]] = field(default_factory=list)
    """``[padded tokens, FLOPs per second]`` of a 16-row prompt pass at the short and the long prompts: the
    seconds per FLOP grow with the padded length (``prefill_seconds_per_flop``). Empty in an older file:
    ``prefill_flops_per_s`` at every length."""
    generation_extra_bytes: int = 0
    """Peak memory one greedy batch of 16 rows after the sample's persona prompts added to what the process
    held as it began (its prompt pass: rows x padded tokens of logits, on Gemma 3's 262k vocabulary the
    largest of the sample's work). It grows with a batch's rows and padded length, not with the answer batches' tokens, so
    it is counted apart from ``extra_bytes`` (``generation_peak_bytes``). 0 in an older file, whose
    ``extra_bytes`` holds it. Gemma 3 270M (bfloat16): 16 rows x 133 tokens added 1.07 GiB, 16 x 238 1.84."""
    generation_batch_tokens: float = 0.0
    """Rows x padded tokens of that batch (16 rows after the sample's persona prompts)."""
    engine: str = "bridge"
    """The generation engine the decode steps and the generation memory were measured with
    (``generation.ENGINES``). "bridge" in a file measured before the engines: its loop was then the only one,
    1.3-2x slower per token than the default ``"raw"`` and holding a prompt pass's logits at every position."""


def persona_pass_flops(shape: ModelShape, contexts: int, context_tokens: float, answers: int,
                       answer_tokens: float) -> float:
    """FLOPs of scoring ``answers`` answers of ``answer_tokens`` after ``contexts`` distinct persona prompts of
    ``context_tokens`` (``CachedAnswerScorer``): each context once, keeping its last position's logits only,
    then every answer from its context's cache with its logits.

    Example:
        >>> shape = ModelShape(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=2, head_dim=4, vocab=1000,
        ...                    tied=True)
        >>> shared, apart = persona_pass_flops(shape, 4, 100, 8, 20), persona_pass_flops(shape, 8, 100, 8, 20)
        >>> apart - shared == 4 * 100 * shape.forward_flops_per_token(context=50)    # 4 more contexts
        True
    """
    return (contexts * context_tokens * shape.forward_flops_per_token(context=int(context_tokens / 2))
            + answers * answer_tokens * shape.forward_flops_per_token(context=int(context_tokens + answer_tokens / 2),
                                                                      logits=True))


def persona_scoring_flops(shape: ModelShape, contexts: Sequence[int], answers_per_context: int,
                          answer_tokens: float) -> float:
    """FLOPs of scoring ``answers_per_context`` answers of ``answer_tokens`` after each of ``contexts`` (their
    lengths) as ``CachedAnswerScorer`` batches them (``answer_batches``, longest first): in each batch, its
    distinct contexts left-padded to its longest, then its answers (``persona_pass_flops`` per batch). A
    padded position costs at least what a token does: on LLaMA-3-8B (bfloat16, 8 pairs, one persona) a pass
    after questions of spread lengths took 1.39x as long as after near-equal ones, where their mean lengths
    say 1.08x and their padded batches 1.19x (``benchmarks/bench_plan.py --stage persona-padding``).

    Example:
        >>> shape = ModelShape(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=2, head_dim=4, vocab=1000,
        ...                    tied=True)
        >>> even = persona_scoring_flops(shape, [100, 100], 2, 20)
        >>> uneven = persona_scoring_flops(shape, [50, 150], 2, 20)
        >>> even == persona_pass_flops(shape, 2, 100, 4, 20) and uneven > even   # one batch, padded to 150
        True
    """
    from dpn_lens.evaluation.answer_cache import answer_batches
    from dpn_lens.evaluation.preference import PairScorer

    owner = [index for index in range(len(contexts)) for _ in range(answers_per_context)]
    lengths = [int(contexts[index]) for index in owner]
    answer = max(round(answer_tokens), 1)
    flops = 0.0
    for chunk in answer_batches(lengths, [answer] * len(lengths), batch_tokens_default(PairScorer), owner):
        distinct = len({owner[item] for item in chunk})
        flops += persona_pass_flops(shape, distinct, max(lengths[item] for item in chunk), len(chunk), answer_tokens)
    return flops


def spread_of_draw(lengths: Sequence[int], n: int) -> list[int]:
    """``n`` lengths standing for a draw of ``n`` from ``lengths``: the k-th shortest of a draw falls, on
    average, at the ``k / (n + 1)`` quantile of what it is drawn from, so a batch of all ``n`` pads to about
    the longest of ``n`` draws.

    Example:
        >>> spread_of_draw(list(range(100)), 4)
        [20, 40, 60, 80]
    """
    ordered = sorted(lengths)
    return [ordered[(i + 1) * len(ordered) // (n + 1)] for i in range(n)]


def saved_control_costs(device: str, dtype: str, threads: int) -> ControlCosts | None:
    return read_costs(ControlCosts, costs_file(device, dtype, threads, "control"))


def sample_pairs(model: Any, n: int, max_new_tokens: int) -> tuple[list[Any], list[list[int]], list[int]]:
    """``n`` pairs whose answers are the model's own greedy answers to embedded questions (for timing, any
    two answers make a pair), their questions as rendered token ids, and the tokens of each of the ``n + 1``
    greedy answers (EOS excluded; ``max_new_tokens`` where none came)."""
    from dpn_lens.data.contrastive import embedded_questions
    from dpn_lens.data.prompts import render_for_model
    from dpn_lens.evaluation.preference import PreferencePair, greedy_answers
    from dpn_lens.hooked import encode

    questions = embedded_questions()[:n + 1]
    prompts = [encode(model, render_for_model(model, q)) for q in questions]
    answers = greedy_answers(model, prompts, max_new_tokens, GENERATION_BATCH)
    lengths = [len(answer) for answer in answers]
    mean = sum(lengths) / len(lengths)
    # An empty answer (EOS at once) cannot be scored; a fixed text of the answers' mean length stands in.
    texts = [model.tokenizer.decode(a) if a else " ok" * max(1, round(mean)) for a in answers]
    return [PreferencePair(questions[i], texts[i], texts[i + 1]) for i in range(n)], prompts[:n], lengths


def sample_persona_prompts(model: Any, pairs: Sequence[Any]) -> tuple[list[str], list[list[int]]]:
    """A high and a low persona, and each sample pair's question under one of them in turn (the role-play
    template), as rendered token ids: the longer prompts of a persona pass and of the held-out generation.

    The descriptions are the shipped ones, of a run's length (PersonalityBench's are a little longer, which
    the plan counts from the data, ``prompt_tokens_of``).
    """
    from dpn_lens.data.contrastive import embedded_personas
    from dpn_lens.data.prompts import render_for_model, render_roleplay_prompt
    from dpn_lens.hooked import encode

    highs, lows = embedded_personas("openness")
    personas = [highs[0], lows[0]]
    return personas, [encode(model, render_for_model(model, render_roleplay_prompt(personas[i % 2], pair.question)))
                      for i, pair in enumerate(pairs)]


def answer_steps(lengths: Sequence[int], max_new_tokens: int) -> list[float]:
    """The decode steps each greedy answer of ``lengths`` tokens took, as a share of ``max_new_tokens``: its
    tokens and the EOS that ended it, or ``max_new_tokens`` where it ran to the limit.

    Example:
        >>> answer_steps([3, 47, 48], 48)      # 4 of 48 steps, then 48 (the EOS is the 48th), 48
        [0.08333333333333333, 1.0, 1.0]
    """
    return [min(int(length) + 1, max_new_tokens) / max_new_tokens for length in lengths]


def expected_longest(shares: Sequence[float], rows: int) -> float:
    """The expected largest of ``rows`` draws (with replacement) from ``shares``: the decode steps, as a share
    of ``max_new_tokens``, of a batch of ``rows`` greedy answers, which runs until its longest row stops
    (``generation.greedy_generate``). With no shares (costs measured before they were recorded): 1, every
    batch runs to ``max_new_tokens``.

    The j-th smallest of n shares is the largest of the draws with probability (j/n)^rows - ((j-1)/n)^rows.

    Example:
        >>> expected_longest([0.5, 1.0], 1), expected_longest([0.5, 1.0], 2)    # 1 row: the mean; 2: 3/4 reach 1
        (0.75, 0.875)
        >>> expected_longest([], 16)
        1.0
    """
    if not shares:
        return 1.0
    ordered, n = sorted(shares), len(shares)
    return sum(share * ((j / n) ** rows - ((j - 1) / n) ** rows) for j, share in enumerate(ordered, start=1))


MEASURE_TOKENS = 48
"""Greedy tokens of each answer ``measure_control_costs`` generates and times (a run's ``max_new_tokens``)."""


def free_memory_bytes(device: str = "cpu") -> int:
    """Memory this process could still take on ``device``: ``MemAvailable`` of ``/proc/meminfo`` on the CPU,
    the free memory of the current GPU on ``cuda``; 0 where it cannot be read (no check is then made)."""
    if device == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0
    import torch

    return int(torch.cuda.mem_get_info()[0]) if device.startswith("cuda") and torch.cuda.is_available() else 0


def measurement_memory(model_spec: str, dtype: str, n_pairs: int, max_new_tokens: int, device: str = "cpu",
                       question_lengths: Sequence[int] | None = None) -> tuple[int, int]:
    """``(weights, gradient pass)`` bytes that ``measure_control_costs`` holds at its peak, from the model's
    shape alone: its gradient pass differentiates ``n_pairs`` pairs of answers up to ``max_new_tokens`` long
    (``gradient_memory`` of ``selection_batches``), beside the loaded weights and the KL probe's reference.
    ``question_lengths``: ``question_tokens(model_spec)``, when the caller already has them (None: tokenized).

    Example:
        >>> import tempfile
        >>> from dpn_lens.tiny import build_tiny_hf_model
        >>> folder = tempfile.mkdtemp()
        >>> build_tiny_hf_model(folder)[0].config.save_pretrained(folder)   # a config.json and a tokenizer
        >>> weights, gradient = measurement_memory(folder, "float32", 12, 48)
        >>> weights == model_shape(folder).n_params() * 4 and gradient > 0
        True
    """
    from dpn_lens.evaluation.calibrate import PROBE_CHUNK_TOKENS, PROBE_CHUNKS

    shape = model_shape(model_spec)
    weights = shape.n_params() * BYTES[dtype]
    batches = selection_batches(model_spec, n_pairs, max_new_tokens, question_lengths)
    gradient = gradient_memory(shape, dtype, batches, n_pairs, cpu_heap=device == "cpu")
    return weights, gradient.total + probe_reference_bytes(shape, PROBE_CHUNKS, PROBE_CHUNK_TOKENS)


def probe_reference_bytes(shape: ModelShape, n_chunks: int, chunk_tokens: int) -> int:
    """Bytes of the KL probe's unsteered reference: float32 log-probabilities over the vocabulary at each of
    ``n_chunks`` chunks' ``chunk_tokens`` tokens and their BOS, held for the whole run.

    Example:
        >>> probe_reference_bytes(ModelShape(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=2,
        ...                                  head_dim=4, vocab=1000, tied=True), 4, 128)
        2064000
    """
    return n_chunks * (chunk_tokens + 1) * shape.vocab * 4


def check_measurement_fits(model_spec: str, device: str, dtype: str, n_pairs: int, max_new_tokens: int,
                           free: int | None = None) -> None:
    """Refuse, before the model loads, a control measurement whose gradient pass would not fit the memory
    ``device`` has free (``free``; None: ``free_memory_bytes``), with 10% to spare: a run killed for memory
    after minutes of measuring tells a user less than this. The error names the most pairs that fit."""
    if free is None:
        from dpn_lens.models import free_dropped_models

        free_dropped_models()       # a model dropped but not yet collected is not in use
        free = free_memory_bytes(device)
    if not free:
        return
    lengths = question_tokens(model_spec)     # tokenized once: the search below sizes up to n_pairs batchings

    def gradient_bytes(n: int) -> int:
        return measurement_memory(model_spec, dtype, n, max_new_tokens, device, question_lengths=lengths)[1]

    weights, gradient = measurement_memory(model_spec, dtype, n_pairs, max_new_tokens, device, lengths)
    if 1.1 * (weights + gradient) <= free:
        return
    most = next((n for n in range(n_pairs - 1, 1, -1) if 1.1 * (weights + gradient_bytes(n)) <= free), None)
    gib = 1024 ** 3
    fix = (f"measure on {most} pairs (`dpn-lens plan --stage control --measure --measure-pairs {most}`) "
           "or on a smaller model (--measure-on)") if most else "measure on a smaller model (--measure-on)"
    raise ValueError(f"measuring control's costs on {model_spec} ({dtype}) holds about "
                     f"{(weights + gradient) / gib:.1f} GiB ({weights / gib:.1f} of weights, {gradient / gib:.1f} in "
                     f"its gradient pass over {n_pairs} pairs), and {device} has {free / gib:.1f} GiB free: {fix}")


def measure_control_costs(model_spec: str, device: str = "cpu", dtype: str = "float32", n_pairs: int = 12,
                          max_new_tokens: int = MEASURE_TOKENS, save: bool = True, random_weights: bool = False
                          ) -> ControlCosts:
    """Time each kind of ``control`` work on ``model_spec`` here: the KL probe, answer passes, persona
    passes, greedy decode steps at two batch sizes, and the attribution gradient pass, on ``n_pairs`` of the
    model's own answers; a rate per FLOP each (decode steps: a fixed cost and a rate).

    ``random_weights``: ``model_spec``'s config and tokenizer with seeded random weights, for an architecture
    whose weights are not at hand; it plans ``dpn-lens control --random-weights``, whose answers are as long as
    that random model's (a real model's end earlier: its answer lengths differ)."""
    import torch

    from dpn_lens.effect.gradients import margin_gradients
    from dpn_lens.evaluation.calibrate import KLProbe, probe_chunks
    from dpn_lens.evaluation.intervals import paired_effect
    from dpn_lens.evaluation.preference import PairScorer, greedy_answers, preference_margins
    from dpn_lens.models import load_model
    from dpn_lens.plan import reset_peak
    from dpn_lens.steering import Intervention

    check_measurement_fits(model_spec, device, dtype, n_pairs, max_new_tokens)
    shape = model_shape(model_spec)
    model = load_model(model_spec, dtype=dtype, device=None if device == "cpu" else device,
                       random_weights=random_weights)
    loaded = status_bytes("VmRSS")
    pairs, prompts, lengths = sample_pairs(model, n_pairs, max_new_tokens)
    fill = sum(lengths) / len(lengths) / max_new_tokens
    personas, persona_prompts = sample_persona_prompts(model, pairs)
    question = sum(map(len, prompts)) / len(prompts)
    persona = sum(map(len, persona_prompts)) / len(persona_prompts)
    answer = fill * max_new_tokens
    delta = torch.zeros(int(model.cfg.d_mlp))
    delta[:16] = 0.5
    edit = Intervention({int(model.cfg.n_layers) // 2: delta}, positions="all")
    reset_peak()

    probe = KLProbe(model, probe_chunks(model))
    probe(edit)                                                             # warm-up
    probe_seconds = min(timed(lambda: probe(edit), device) for _ in range(2))
    probe_tokens = sum(len(chunk) + 1 for chunk in probe.chunks)
    probe_flops = probe_tokens * shape.forward_flops_per_token(context=probe_tokens // len(probe.chunks) // 2,
                                                               logits=True)
    scorer = PairScorer(model, pairs)
    scorer.margins(edit)
    answer_seconds = min(timed(lambda: scorer.margins(edit), device) for _ in range(2))
    answer_flops = 2 * len(pairs) * answer * shape.forward_flops_per_token(context=int(question + answer / 2),
                                                                           logits=True)
    personas_of = [personas[i % 2] for i in range(len(pairs))]
    persona_seconds = timed(lambda: preference_margins(model, pairs, persona=personas_of), device)
    # what the scorer ran: each pair's question with its persona once (its last position's logits only), then
    # both answers from that cache
    persona_flops = persona_scoring_flops(shape, list(map(len, persona_prompts)), 2, answer)
    # Beyond the loaded model and the probe's reference: the answer batches, the caches, allocator slack;
    # then, apart, greedy generation's and the gradient pass's (a run without an effect rule to select
    # never makes it).
    reference = probe_tokens * shape.vocab * 4
    extra = max(status_bytes("VmHWM") - loaded - reference, 0)
    # Generation's own: one batch of a run's size (16 rows after the persona prompts), beyond what the
    # process holds as it starts. The heap the passes left (Gemma 3 270M: 0.7 GiB) does not grow with a
    # generation batch, so it is not scaled; nor is what the many batches of the decode timing leave.
    rows = max(CONTEXT_ROWS)
    largest = (persona_prompts * rows)[:rows]
    reset_peak()
    before_generation = status_bytes("VmRSS")
    greedy_answers(model, largest, 2, rows)
    generation_extra = max(status_bytes("VmHWM") - before_generation, 0)
    generation_tokens = rows * max(map(len, largest))
    persona_lengths = [len(answer) for answer in greedy_answers(model, persona_prompts, max_new_tokens,
                                                                GENERATION_BATCH)]
    decoding = _decode_costs(model, shape, prompts, lengths, device, long_prompts=persona_prompts,
                             long_lengths=persona_lengths)
    reset_peak()
    first_gradient = timed(lambda: margin_gradients(model, pairs), device)
    gradient_seconds = timed(lambda: margin_gradients(model, pairs), device)
    selection_extra = max(status_bytes("VmHWM") - loaded - reference, 0)
    gradient_flops = 3 * answer_flops
    # What a trait spends beyond its passes: intervals and building edits, per pair.
    import numpy as np

    margins = np.asarray(scorer.margins())
    overhead = timed(lambda: [paired_effect(margins + 0.01, margins) for _ in range(20)], "cpu") / 20
    costs = ControlCosts(device=device, dtype=dtype, threads=torch.get_num_threads(), model=model_spec,
                         probe_flops_per_s=probe_flops / probe_seconds, answer_flops_per_s=answer_flops / answer_seconds,
                         persona_flops_per_s=persona_flops / persona_seconds,
                         gradient_flops_per_s=gradient_flops / gradient_seconds, step_seconds=decoding.step_seconds,
                         step_flops_per_s=decoding.step_flops_per_s, answer_fill=fill, prompt_tokens=question,
                         persona_tokens=persona, trait_seconds=overhead,
                         probe_reference_bytes=reference, extra_bytes=int(extra),
                         selection_extra_bytes=int(selection_extra),
                         sample_tokens=2 * len(pairs) * (question + answer),
                         measured=time.strftime("%Y-%m-%d %H:%M"),
                         answer_steps=answer_steps(lengths, max_new_tokens), prefill_flops_per_s=decoding.prefill_flops_per_s,
                         persona_answer_steps=answer_steps(persona_lengths, max_new_tokens),
                         gradient_seconds=max(first_gradient - gradient_seconds, 0.0),
                         step_rows=decoding.step_rows, step_token_flops=decoding.step_token_flops,
                         persona_context_once=True, persona_padded=True, step_context=decoding.context,
                         engine=default_engine(dtype),
                         step_context_seconds=decoding.context_seconds, long_step_rows=decoding.long_step_rows,
                         long_step_context=decoding.long_context, prefill_points=decoding.prefill_points,
                         generation_extra_bytes=int(generation_extra), generation_batch_tokens=generation_tokens)
    if save:
        from dpn_lens.io import write_json_atomic

        path = costs_file(device, dtype, costs.threads, "control")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, asdict(costs))
    return costs


DECODE_STEPS = 33
"""Tokens the decode timing generates per batch (``_stamped_generation``): a prompt pass and 32 decode steps,
of which the 31 timed ones give their median. When a step was the generation's time beyond a prompt pass
timed apart, that pass's jitter fell on every step: with 8 steps after 150-token prompts, six repeats put
a 16-row step between 0.129 and 0.217 s (SmolLM2 float32, 1 thread)."""

STEP_ROWS = (1, 2, 4, 8, 12, 16)
"""Row counts ``_decode_costs`` times a decode step at: a run's batches have 16 rows (``pair_batch``, the
selection's and the generation check's batch) and a last, partial one of any size."""

CONTEXT_ROWS = (4, 8, 16)
"""Row counts ``_decode_costs`` also times a step at after longer prompts, for what context adds to a step.
At 1 and 2 rows it adds nothing measurable (SmolLM2 float32, 1 thread, 8 steps, 106 more tokens: -0.001 s at 1 and 2
rows, +0.007 at 4, +0.032 at 8, +0.049 at 16), so those are not timed twice."""


@dataclass
class DecodeCosts:
    """Greedy generation's measured costs (``_decode_costs``): a decode step's line in its rows, the points it
    was fitted to, what context adds, and the prompt pass's rate at two lengths."""

    step_seconds: float
    """The line's fixed seconds per step (Python, cache handling)."""
    step_flops_per_s: float
    """The line's rate per row: one row's step FLOPs over the line's seconds per row."""
    prefill_flops_per_s: float
    """The short prompts' 16-row prompt pass."""
    step_rows: list[list[float]]
    """``[rows, seconds per step]`` as measured."""
    step_token_flops: float
    context: float = 0.0
    """The short prompts' decode context, tokens (their mean and half the decode steps)."""
    context_seconds: float = 0.0
    """``ControlCosts.step_context_seconds``; 0 without long prompts."""
    long_step_rows: list[list[float]] = field(default_factory=list)
    long_context: float = 0.0
    prefill_points: list[list[float]] = field(default_factory=list)
    """``[padded tokens, FLOPs per second]`` of the prompt pass, short prompts then long ones."""


def _stamped_generation(model: Any, chosen: Sequence[list[int]], device: str) -> tuple[float, list[float]]:
    """One greedy batch of ``DECODE_STEPS`` tokens on ``chosen``, timed call by call: the seconds to the start
    of the first decode step (the prompt pass, its sampling and the call's set-up) and the seconds of each
    decode step but the last.

    A hook on the embedding (``hook_embed``, the first hook point of a forward call) stamps the start of
    every forward call, so a step is the time between two starts: its forward and the sampling after it. A
    step is read directly, not as a whole generation's time beyond a prompt pass timed apart, whose jitter
    would fall on every step. On a GPU the hook synchronises first, so a stamp falls after the queued work.

    Example:
        >>> from dpn_lens.tiny import build_tiny_model
        >>> prompt_pass, steps = _stamped_generation(build_tiny_model(), [[1, 2, 3]], "cpu")
        >>> prompt_pass > 0 and len(steps) <= DECODE_STEPS - 2
        True
    """
    import torch

    from dpn_lens.evaluation.preference import greedy_answers
    from dpn_lens.hooked import read_hooks

    stamps: list[float] = []

    def stamp(activation: Any, hook: Any) -> Any:
        if device != "cpu":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return activation

    if device != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with read_hooks(model, [("hook_embed", stamp)]):
        greedy_answers(model, chosen, DECODE_STEPS, len(chosen))
    if len(stamps) < 3:
        raise ValueError(f"the sample's answers ended after {len(stamps)} forward calls, before a decode step could be "
                         "timed; measure on a model whose greedy answers run longer (one that ends every answer "
                         "at once is not one a control run can score)")
    return stamps[1] - started, [later - earlier for earlier, later in zip(stamps[1:], stamps[2:])]


@dataclass
class StepTimings:
    """Decode steps of one prompt set as ``_step_points`` timed them."""

    points: list[list[float]]
    """``[rows, seconds of one decode step]``: per row count, the median over repeats of each repeat's median step."""
    repeats: dict[int, list[float]]
    """Rows -> each repeat's median step, in the order timed (the other set's run at the same rows between)."""
    prefill: list[float]
    """``[padded tokens, FLOPs per second]`` of the largest batch's prompt pass (a run's batches are full)."""


def _step_points(model: Any, shape: ModelShape, prompt_sets: Sequence[tuple[Sequence[list[int]], Sequence[int],
                                                                               Sequence[int]]],
                 device: str, repeats: int) -> list[StepTimings]:
    """The decode steps of each ``(prompts, answer lengths, rows)`` set at each of its row counts, ``repeats``
    times, the sets interleaved: at each row count every set runs once per repeat, in turn (the order
    alternating between repeats), so a drift of this machine's speed falls alike on the sets compared.

    A repeat's step is the median of its batch's decode steps (``_stamped_generation``). The prompts whose
    answers ran longest go first, so a batch's rows rarely stop early.
    """
    import statistics

    from dpn_lens.evaluation.preference import greedy_answers

    greedy_answers(model, list(prompt_sets[0][0][:1]), 2, 1)                        # warm-up
    ordered = [[prompts[i] for i in sorted(range(len(prompts)), key=lambda i: -lengths[i])]
               for prompts, lengths, _ in prompt_sets]
    timings = [StepTimings([], {}, [0.0, 0.0]) for _ in prompt_sets]
    prompt_passes: list[dict[int, list[float]]] = [{} for _ in prompt_sets]
    for batch in sorted({int(r) for _, _, rows in prompt_sets for r in rows}):
        taking = [index for index, (_, _, rows) in enumerate(prompt_sets) if batch in {int(r) for r in rows}]
        for repeat in range(max(int(repeats), 1)):
            for index in (taking if repeat % 2 == 0 else taking[::-1]):
                chosen = (ordered[index] * batch)[:batch]
                prompt_pass, steps = _stamped_generation(model, chosen, device)
                timings[index].repeats.setdefault(batch, []).append(statistics.median(steps))
                prompt_passes[index].setdefault(batch, []).append(prompt_pass)
        for index in taking:
            chosen = (ordered[index] * batch)[:batch]
            padded = max(map(len, chosen))
            timings[index].points.append([batch, statistics.median(timings[index].repeats[batch])])
            timings[index].prefill = [padded, batch * padded * shape.forward_flops_per_token(context=padded // 2,
                                                                                            logits=True)
                                      / statistics.median(prompt_passes[index][batch])]
    return timings


def _decode_costs(model: Any, shape: ModelShape, prompts: Sequence[list[int]], lengths: Sequence[int],
                  device: str, rows: Sequence[int] = STEP_ROWS, repeats: int = 3,
                  long_prompts: Sequence[list[int]] = (), long_lengths: Sequence[int] = ()) -> DecodeCosts:
    """Greedy generation's costs on the sample's ``prompts`` (whose answers had ``lengths`` tokens): seconds
    of one decode step at each of ``rows`` (``_step_points``), the line fitted to them by least squares (a
    fixed cost and a rate per row), and the prompt pass's FLOP rate. With ``long_prompts`` (the sample's
    persona prompts, about 2.5x the questions' length), the steps at ``CONTEXT_ROWS`` and the prompt pass
    again after them, each long batch timed next to the short one of its rows: what context adds
    (``_context_seconds``) and the prompt pass's rate at a second length.

    A long point is the short point at its rows times the median over repeats of the long step's ratio to
    the short one timed next to it: a ratio measured side by side, which the machine's drift between row
    counts does not move.
    """
    import statistics

    context_rows = [r for r in CONTEXT_ROWS if r in {int(row) for row in rows}] if long_prompts else []
    sets = [(prompts, lengths, rows)] + ([(long_prompts, long_lengths, context_rows)] if long_prompts else [])
    timings = _step_points(model, shape, sets, device, repeats)
    short = timings[0]
    question = sum(map(len, prompts)) / len(prompts)
    context = question + DECODE_STEPS / 2
    token_flops = shape.forward_flops_per_token(context=int(context), logits=True)
    fixed, per_row = _line(short.points)
    costs = DecodeCosts(fixed, token_flops / max(per_row, 1e-9), short.prefill[1], short.points, token_flops,
                        context, prefill_points=[short.prefill])
    if long_prompts:
        long = timings[1]
        at = dict((int(r), seconds) for r, seconds in short.points)
        costs.long_step_rows = [[r, at[r] * statistics.median(longer / shorter for longer, shorter
                                                              in zip(long.repeats[r], short.repeats[r]))]
                                for r in context_rows]
        costs.long_context = sum(map(len, long_prompts)) / len(long_prompts) + DECODE_STEPS / 2
        costs.context_seconds = _context_seconds(shape, costs)
        costs.prefill_points.append(long.prefill)
    return costs


def _context_seconds(shape: ModelShape, costs: DecodeCosts) -> float:
    """What a decode step costs beyond its FLOPs per row, context token and cached number: the least-squares
    slope, through 0, of the long steps' seconds beyond the short steps' at the same rows (scaled by the
    line to the long context's FLOPs), over ``rows * (long context - short context)``; at least 0.

    Example:
        >>> shape = ModelShape(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=2, head_dim=4, vocab=1000,
        ...                    tied=True)
        >>> token = shape.forward_flops_per_token(context=10, logits=True)
        >>> costs = DecodeCosts(1.0, 1e30, 0.0, [[4, 1.0], [8, 2.0]], token, context=10,   # FLOPs: nothing
        ...                     long_step_rows=[[4, 1.4], [8, 2.8]], long_context=110)   # +0.001 s per row-token
        >>> round(_context_seconds(shape, costs) * shape.cache_values_per_token(), 9)
        0.001
    """
    short = {int(rows): seconds for rows, seconds in costs.step_rows}
    long_token = shape.forward_flops_per_token(context=int(costs.long_context), logits=True)
    span = costs.long_context - costs.context
    if span <= 0:
        return 0.0
    beyond = [(rows, seconds - short[int(rows)] * _line_seconds(costs, rows, long_token)
               / _line_seconds(costs, rows, costs.step_token_flops))
              for rows, seconds in costs.long_step_rows]
    slope = sum(rows * extra for rows, extra in beyond) / sum(rows * rows for rows, _ in beyond) / span
    return max(slope, 0.0) / shape.cache_values_per_token()


def _line_seconds(costs: DecodeCosts | ControlCosts, rows: float, token_flops: float) -> float:
    """The decode line's seconds per step over ``rows`` rows of ``token_flops`` each: its fixed cost and
    the rows' FLOPs at its rate."""
    return costs.step_seconds + rows * token_flops / costs.step_flops_per_s


def _line(points: Sequence[Sequence[float]]) -> tuple[float, float]:
    """The least-squares line ``seconds = fixed + per_row * rows`` through ``[rows, seconds]`` points, its
    fixed cost at least 0 (one point: all of it per row).

    Example:
        >>> _line([[2, 3.0], [4, 5.0], [8, 9.0]])
        (1.0, 1.0)
    """
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    n = len(points)
    mean_rows = sum(r for r, _ in points) / n
    mean_seconds = sum(s for _, s in points) / n
    spread = sum((r - mean_rows) ** 2 for r, _ in points)
    per_row = sum((r - mean_rows) * (s - mean_seconds) for r, s in points) / spread
    fixed = mean_seconds - per_row * mean_rows
    if fixed < 0:      # refit through the origin: a step never costs less than nothing
        return 0.0, sum(r * s for r, s in points) / sum(r * r for r, _ in points)
    return fixed, per_row


def decode_step_seconds(shape: ModelShape, costs: ControlCosts, rows: int, context: int) -> float:
    """Seconds of one greedy decode step over ``rows`` rows at ``context`` tokens, on ``shape``'s model.

    The line (``costs.step_seconds`` and a row's FLOPs at ``costs.step_flops_per_s``) times the measured
    points' ratio to the line at these rows (``costs.step_rows``, interpolated linearly in the rows and
    held at the nearest point beyond them). On the measured model the line's value cancels: the step
    costs what was measured at those rows. On another model (the same machine) the measured row curve is
    taken to bend the same way: an assumption, which a measurement on that model replaces.

    Then what the context adds beyond its FLOPs: ``rows * (context - costs.step_context)`` times
    ``costs.step_context_seconds`` per cached number of ``shape``'s tokens (none in an older file). It is
    linear in the context, as the cache's reads and copies are, and negative below the measured context.

    Example:
        >>> shape = ModelShape(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=2, head_dim=4, vocab=1000,
        ...                    tied=True)
        >>> token = shape.forward_flops_per_token(context=20, logits=True)
        >>> costs = type("Costs", (), {"step_seconds": 1.0, "step_flops_per_s": token, "step_token_flops": token,
        ...                            "step_rows": [[2, 3.0], [4, 4.0]],       # line: 3 s at 2 rows, 5 at 4
        ...                            "step_context": 20, "step_context_seconds": 0.0})()
        >>> [round(decode_step_seconds(shape, costs, rows, 20), 3) for rows in (1, 2, 3, 4, 8)]
        [2.0, 3.0, 3.6, 4.0, 7.2]
        >>> costs.step_context_seconds = 0.01 / shape.cache_values_per_token()   # 0.01 s per row and token
        >>> [round(decode_step_seconds(shape, costs, 4, context), 3) for context in (20, 30)]  # 30: +0.057 FLOPs, +0.4
        [4.0, 4.457]
    """
    import numpy as np

    token = shape.forward_flops_per_token(context=context, logits=True)
    line = _line_seconds(costs, rows, token)
    if not costs.step_rows or not costs.step_token_flops:
        return line
    measured_rows, seconds = zip(*sorted(costs.step_rows))
    ratios = [s / _line_seconds(costs, r, costs.step_token_flops) for r, s in zip(measured_rows, seconds)]
    bent = line * float(np.interp(rows, measured_rows, ratios))
    # the cache's reads and copies, linear in the context (and below the measured context, less than measured;
    # none in an older file, whose step_context_seconds is 0)
    cache = rows * (context - costs.step_context) * costs.step_context_seconds * shape.cache_values_per_token()
    return max(bent + cache, 0.0)


@dataclass
class PromptTokens:
    """The rendered prompts a ``control`` run generates from and scores under personas, in tokens (chat
    template and BOS included), from ``prompt_tokens_of``.

    Example:
        >>> prompts = PromptTokens(held_out=[180, 150], persona=165.0, question=58.0, selection=[150, 140])
        >>> prompts.questions, prompts.contrastive, prompts.personas    # each filled from the data when found
        ([], [], [])
    """

    held_out: list[int]
    """The held-out pairs' generating prompts (a question with a persona of PersonalityBench's first half),
    a spread of them, longest first."""
    persona: float
    """Mean question with a persona of the second half: the persona control's (and the generation check's)
    contexts."""
    question: float
    """Mean held-out question alone: the generation check's prompts."""
    selection: list[int]
    """The selection pairs' generating prompts (embedded questions with embedded personas), longest first."""
    questions: list[int] = field(default_factory=list)
    """A spread of the held-out questions alone: the contexts the answers are scored after (``PairScorer``).
    Empty without the data: ``question`` stands in."""
    contrastive: list[list[int]] = field(default_factory=list)
    """Each prompt set CAA reads its direction from (a trait's high prompts, its low prompts, the next
    trait's ...), every prompt's tokens in the order run. Empty: two sets of ``persona``-long prompts."""
    personas: list[int] = field(default_factory=list)
    """The persona control's contexts (``persona``'s), a spread of them, sorted: a scorer batch pads to its
    longest. Empty: every context ``persona`` long."""


PROMPT_SPREAD = 64
"""Prompts ``prompt_tokens_of`` renders per kind and trait: a spread of lengths, not every combination."""


def prompt_tokens_of(spec: str, traits: Sequence[str], config: Any, costs: ControlCosts) -> PromptTokens:
    """The prompts ``control`` will run for ``traits``, counted with ``spec``'s tokenizer without loading the
    model: the held-out ones from PersonalityBench in ``config.data_dir`` (its persona descriptions are
    about 60 words, its questions 34), the selection's from the embedded material. Where the data cannot be
    found, the sample's measured lengths (``costs.persona_tokens``, ``costs.prompt_tokens``) stand in.
    """
    from dpn_lens.data.contrastive import embedded_personas, embedded_questions
    from dpn_lens.evaluation.control import personalitybench_material
    from dpn_lens.evaluation.methods import caa_prompts
    from dpn_lens.hooked import tokenize_prompts
    from dpn_lens.plan import rendering_stub

    stub = rendering_stub(spec)
    selection: list[int] = []
    held_out: list[int] = []
    persona: list[int] = []
    question: list[int] = []
    contrastive: list[list[int]] = []
    for trait in traits:
        highs, lows = embedded_personas(trait)
        selection += _persona_prompts(stub, embedded_questions(), highs, lows)
        if "caa" in config.methods:
            prompts = caa_prompts(trait, config)
            contrastive += [list(map(len, tokenize_prompts(stub, pole))) for pole in (prompts.high, prompts.low)]
        try:
            questions, highs, lows = personalitybench_material(config.data_dir, trait)
        except (OSError, KeyError, ValueError):
            continue
        half = len(highs) // 2     # the pairs come from the first half, the control's personas from the second
        held_out += _persona_prompts(stub, questions, highs[:half], lows[:half])
        persona += _persona_prompts(stub, questions, highs[half:], lows[half:])
        question += [_prompt_tokens(stub, q) for q in _spread(questions)]
    return PromptTokens(held_out=sorted(held_out, reverse=True) or [round(costs.persona_tokens)],
                        persona=sum(persona) / len(persona) if persona else costs.persona_tokens,
                        question=sum(question) / len(question) if question else costs.prompt_tokens,
                        selection=sorted(selection, reverse=True), questions=question, contrastive=contrastive,
                        personas=sorted(persona))


def scoring_cache(shape: ModelShape, dtype: str, config: Any, prompts: PromptTokens,
                  shares: Sequence[float] = ()) -> "CacheFootprint":
    """What the held-out answers' scorer (``PairScorer``, kept for a trait's whole run) holds of its questions'
    key/value cache, and how many of its batches run their questions again in every pass
    (``config.score_cache_gib``): ``answer_cache_bytes`` over the run's questions (a spread of
    ``prompts.questions``) and answers ``shares`` of ``max_new_tokens`` long (all of it without shares).

    Example:
        >>> from dpn_lens.evaluation.control import ControlConfig
        >>> shape = ModelShape(n_layers=2, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=1, head_dim=4, vocab=100,
        ...                    tied=True)
        >>> prompts = PromptTokens(held_out=[90], persona=90.0, question=40.0, selection=[90], questions=[40])
        >>> footprint = scoring_cache(shape, "float32", ControlConfig(pairs=8), prompts)
        >>> footprint.kept_bytes == 8 * 40 * 2 * 2 * 1 * 4 * 4     # one row per question, keys and values
        True
    """
    from dpn_lens.evaluation.answer_cache import answer_cache_bytes
    from dpn_lens.evaluation.metrics import PreferenceMargin

    pairs = int(config.pairs)
    questions = _spread(sorted(prompts.questions or [round(prompts.question)]), pairs)
    answers = [max(1, round(share * config.max_new_tokens)) for share in _spread(list(shares), 2 * pairs)] \
        if shares else [int(config.max_new_tokens)] * (2 * pairs)
    return answer_cache_bytes([q for q in questions for _ in (0, 1)], answers, PreferenceMargin().batch_tokens,
                              shape.n_layers, shape.n_kv_heads, shape.head_dim, BYTES[dtype],
                              context_keys=[i // 2 for i in range(2 * pairs)], cache_bytes=config.score_cache_bytes)


def _spread(items: Sequence[Any], n: int = PROMPT_SPREAD) -> list[Any]:
    """``n`` of ``items`` spread evenly over them (all of them, cycled, when fewer).

    Example:
        >>> _spread(list(range(10)), 4), _spread([1, 2], 3)
        ([0, 2, 5, 7], [1, 2, 1])
    """
    return [items[i * len(items) // n] if len(items) >= n else items[i % len(items)] for i in range(n)]


def _prompt_tokens(stub: Any, user_text: str) -> int:
    from dpn_lens.data.prompts import render_for_model
    from dpn_lens.hooked import encode

    return len(encode(stub, render_for_model(stub, user_text)))


def _persona_prompts(stub: Any, questions: Sequence[str], highs: Sequence[str], lows: Sequence[str]) -> list[int]:
    """Tokens of a spread of role-play prompts: questions with high and with low descriptions."""
    from dpn_lens.data.prompts import render_roleplay_prompt

    return [_prompt_tokens(stub, render_roleplay_prompt(description, q))
            for q, high, low in zip(_spread(questions), _spread(highs), _spread(lows[::-1]))
            for description in (high, low)]


def prefill_seconds_per_flop(costs: ControlCosts, padded: int) -> float:
    """Seconds per FLOP of a prompt pass over prompts padded to ``padded`` tokens: linear in the padded
    length through the two measured passes (``costs.prefill_points``), extended beyond them, and never below
    the faster one's (a longer pass is not faster per FLOP); ``1 / costs.prefill_flops_per_s`` in an older
    file.

    Example:
        >>> costs = type("Costs", (), {"prefill_flops_per_s": 1e11, "prefill_points": [[60, 1e11], [180, 0.5e11]]})()
        >>> [round(prefill_seconds_per_flop(costs, padded) * 1e11, 6) for padded in (60, 120, 180, 300, 10)]
        [1.0, 1.5, 2.0, 3.0, 1.0]
    """
    if len(costs.prefill_points) < 2:
        return 1.0 / costs.prefill_flops_per_s
    points = sorted(costs.prefill_points)
    (short, short_rate), (long, long_rate) = points[0], points[-1]
    if long <= short:
        return 1.0 / costs.prefill_flops_per_s
    slope = (1.0 / long_rate - 1.0 / short_rate) / (long - short)
    return max(1.0 / short_rate + (padded - short) * slope, min(1.0 / short_rate, 1.0 / long_rate))


def generation_seconds(shape: ModelShape, costs: ControlCosts, prompts: Sequence[int], rows: int, batch: int,
                       max_new_tokens: int, shares: Sequence[float] | None = None) -> float:
    """Seconds of ``rows`` greedy answers of at most ``max_new_tokens`` tokens in batches of ``batch``, their
    prompts spread like ``prompts`` (tokens), as ``generation.greedy_generate`` makes them: longest prompt
    first, each batch left-padded to its longest prompt.

    A batch costs its prompt pass (its rows at the padded length, at ``costs.prefill_flops_per_s``; not
    charged where that is 0, the costs of an older measurement) and its decode steps, each at the cost of a
    step over its rows, finished or not (``decode_step_seconds``); and it decodes until its longest answer
    ends, so its steps are
    the expected longest of its rows' (``expected_longest`` of ``shares``, by default ``costs.answer_steps``)
    times ``max_new_tokens``.

    Example:
        >>> shape = ModelShape(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=2, head_dim=4, vocab=1000,
        ...                    tied=True)
        >>> costs = type("Costs", (), {"step_seconds": 1.0, "step_flops_per_s": 1e30, "prefill_flops_per_s": 0.0,
        ...                            "answer_steps": [0.5, 0.5], "step_rows": [], "step_token_flops": 0.0})()
        >>> generation_seconds(shape, costs, [10], rows=4, batch=2, max_new_tokens=8)  # 2 batches of 4 steps
        8.0
    """
    if rows <= 0:
        return 0.0
    lengths = sorted(_spread(list(prompts), rows), reverse=True)
    seconds = 0.0
    for start in range(0, rows, batch):
        chunk = lengths[start:start + batch]
        padded, n = max(chunk), len(chunk)
        steps = expected_longest(costs.answer_steps if shares is None else shares, n) * max_new_tokens
        context = int(padded + steps / 2)
        if costs.prefill_flops_per_s:
            # the prompt pass makes the first token; each later token is a decode step
            seconds += n * padded * shape.forward_flops_per_token(context=padded // 2, logits=True) \
                * prefill_seconds_per_flop(costs, padded)
            steps = max(steps - 1, 0.0)
        seconds += steps * decode_step_seconds(shape, costs, n, context)
    return seconds


def caa_flops(shape: ModelShape, sets: Sequence[Sequence[int]]) -> float:
    """FLOPs per trait of CAA's direction: each prompt set of ``sets`` (``PromptTokens.contrastive``, two a
    trait) in batches of ``CAA_BATCH``, each batch right-padded to its longest prompt, without logits (the
    pass stops after the last layer).

    Example:
        >>> shape = ModelShape(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=2, head_dim=4, vocab=1000,
        ...                    tied=True)
        >>> padded = caa_flops(shape, [[10] * 7 + [30], [10] * 8])   # one long prompt pads its batch
        >>> round(padded / caa_flops(shape, [[10] * 8, [10] * 8]), 2)
        2.33
    """
    from dpn_lens.baselines.caa import CAA_BATCH

    flops = 0.0
    for lengths in sets:
        for start in range(0, len(lengths), CAA_BATCH):
            batch = lengths[start:start + CAA_BATCH]
            padded = max(batch)
            flops += len(batch) * padded * shape.forward_flops_per_token(context=padded // 2)
    return flops * 2 / max(len(sets), 1)


def _probe_flops(shape: ModelShape, config: Any) -> float:
    """FLOPs of one KL probe pass: ``kl_chunks`` chunks of ``kl_tokens`` (and BOS), logits included."""
    return config.kl_chunks * (config.kl_tokens + 1) * shape.forward_flops_per_token(
        context=(config.kl_tokens + 1) // 2, logits=True)


def _seconds(shape: ModelShape, work: ControlWork, settings: ControlSettings, costs: ControlCosts,
             prompts: PromptTokens | None = None) -> dict[str, float]:
    """Seconds per trait for each kind of work; ``prompts``: the run's prompt lengths (``prompt_tokens_of``;
    None: the sample's, ``costs.persona_tokens`` and ``costs.prompt_tokens``)."""
    from dpn_lens.effect.rules import SELECTION_TOKENS

    config = settings.config
    answer = costs.answer_fill * config.max_new_tokens
    question = costs.prompt_tokens
    if prompts is None:
        prompts = PromptTokens([round(costs.persona_tokens)], costs.persona_tokens, costs.prompt_tokens,
                               [round(costs.persona_tokens)])
    persona = prompts.persona
    probe = _probe_flops(shape, config)
    answers = 2 * config.pairs * answer * shape.forward_flops_per_token(context=int(question + answer / 2),
                                                                          logits=True)
    # The questions run once per trait into the KV cache (``PairScorer``).
    questions = config.pairs * question * shape.forward_flops_per_token(context=int(question / 2))
    # Where ``score_cache_gib`` keeps part of their cache, the other batches' questions run in every pass too.
    cache = scoring_cache(shape, costs.dtype, config, prompts, costs.persona_answer_steps or costs.answer_steps)
    rerun = questions * cache.recomputed / max(cache.batches, 1)
    caa = caa_flops(shape, prompts.contrastive or [[round(persona)] * config.caa_pairs] * 2) \
        if "caa" in config.methods else 0

    def persona_scoring(contexts: int, answers: int) -> float:
        """FLOPs of scoring ``answers`` answers after ``contexts`` distinct persona prompts, counted as the
        rate was measured (padded batches; an older file's rate: mean lengths, or a context per answer)."""
        if not contexts:
            return 0.0
        if costs.persona_padded:
            return persona_scoring_flops(shape, spread_of_draw(prompts.personas or [round(persona)], contexts),
                                         answers // contexts, answer)
        if costs.persona_context_once:
            return persona_pass_flops(shape, contexts, persona, answers, answer)
        return answers * (persona + answer) * shape.forward_flops_per_token(context=int((persona + answer) / 2),
                                                                            logits=True)

    # One persona pass: every pair's question with a persona once, then its two answers.
    personas = persona_scoring(config.pairs, 2 * config.pairs)

    # The held-out and selection pairs are answers under a persona; the generation check's are not.
    under_persona = costs.persona_answer_steps or costs.answer_steps

    def generation(lengths: Sequence[int], rows: int, tokens: int, batch: int,
                   shares: Sequence[float] | None = None) -> float:
        return generation_seconds(shape, costs, lengths, rows, batch, tokens, shares)

    selection_fill = (sum(costs.persona_answer_steps) / len(costs.persona_answer_steps)
                      if costs.persona_answer_steps else costs.answer_fill)
    selection_answer = selection_fill * SELECTION_TOKENS
    gradient = 3 * work.selection_answers * selection_answer * shape.forward_flops_per_token(
        context=int(question + selection_answer / 2), logits=True)
    # The generation check scores each answer set under a high and a low persona (contexts and answers,
    # as the persona control does), after generating it without a persona.
    # Its contexts differ per answer (each answer after its question with each persona): one each.
    asked = work.generation_questions
    scored = persona_scoring(2 * asked, 2 * asked)
    asking = [round(prompts.question)]
    return {"held-out pairs": generation(prompts.held_out, work.generated_answers, config.max_new_tokens,
                                         config.pair_batch, under_persona),
            "selection": (generation(prompts.selection, work.selection_generated, SELECTION_TOKENS, GENERATION_BATCH,
                                     under_persona)
                          + gradient / costs.gradient_flops_per_s + costs.gradient_seconds)
            if work.selection_answers else 0.0,
            "KL curves": work.probe_passes * probe / costs.probe_flops_per_s,
            "answer scoring": (work.answer_passes * (answers + rerun) + questions) / costs.answer_flops_per_s
            + costs.trait_seconds * work.answer_passes,
            "persona control": work.persona_passes * personas / costs.persona_flops_per_s,
            "method preparation": caa / costs.persona_flops_per_s,
            "budget sweep": work.sweep_probe_passes * probe / costs.probe_flops_per_s
            + (work.sweep_answer_passes * answers / costs.answer_flops_per_s if work.sweep_answer_passes else 0.0),
            "generation check": (work.generation_sets * generation(asking, asked, config.max_new_tokens,
                                                                   GENERATION_BATCH)
                                 + work.generation_scored * scored / costs.persona_flops_per_s)
            if work.generation_sets else 0.0}


def plan_control(spec: str, traits: Sequence[str], settings: ControlSettings, device: str = "cpu",
                 dtype: str = "float32", costs: ControlCosts | None = None,
                 machine: MachineCosts | None = None, run: "ControlRecord | None" = None) -> RunPlan:
    """The plan of ``dpn-lens control`` for ``traits`` with ``settings``: start-up and load, locate (without
    maps, from ``plan_locate``), then per trait the counted work at ``costs``' rates.

    With ``run`` (that run's ``control`` result), each trait's passes are those it made
    (``control_work(settings, run.of_trait(trait))``) instead of the settings' bound: the plan's
    per-pass costs checked apart from its pass counts.
    """
    from dpn_lens.plan import plan_locate

    if dtype not in BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(BYTES)}")
    if not traits:
        raise ValueError("no traits to plan")
    shape = model_shape(spec)
    config = settings.config
    of_trait = {trait: settings.of_trait(trait) for trait in traits}
    # With ``run``, the passes each trait made; else the settings' bound (each trait's cached pairs apart).
    works = {trait: control_work(of_trait[trait], run.of_trait(trait) if run is not None else None)
             for trait in traits}
    work = works[traits[0]]
    located = plan_locate(spec, traits, config.locate_pairs, device, dtype, machine)
    stages = [located.stages[0]]
    if work.locates:
        stages.append(StagePlan("locate (DPN-LE maps)", located.stages[1].seconds, located.stages[1].peak_bytes,
                                located.stages[1].detail))
    weights = shape.n_params() * BYTES[dtype]
    usable = costs is not None and costs.device == device and costs.dtype == dtype
    prompts = prompt_tokens_of(spec, traits, config, costs) if usable else None
    # seconds of each kind of work, summed over the traits
    per_kind: dict[str, float] = {}
    for trait in traits if usable else []:
        for kind, seconds in _seconds(shape, works[trait], of_trait[trait], costs, prompts).items():
            per_kind[kind] = per_kind.get(kind, 0.0) + seconds
    # one probe pass: the unsteered reference, once per run
    reference_seconds = _probe_flops(shape, config) / costs.probe_flops_per_s if usable else 0.0
    reference = probe_reference_bytes(shape, config.kl_chunks, config.kl_tokens)
    runtime = machine.runtime_bytes if machine is not None and device == "cpu" else 0
    resident = machine.resident_extra_bytes(weights) if machine is not None else 0
    base = runtime + weights + resident + reference
    peak, selection_peak = base, base
    # The gradient pass's logits are known from the vocabulary: without a measurement they still raise the
    # selection's lower bound towards the truth (an unmeasured Gemma plan printed ~1 GiB where 10 GB were used).
    from dpn_lens.effect.rules import SELECTION_TOKENS

    logits_bytes = gradient_logits_bytes(shape, dtype, _gradient_batch_tokens(config.selection_pairs, SELECTION_TOKENS))
    # Beside that bound, an estimate of the whole pass from the model's shape and the batches it will make:
    # its activations, logits, the questions' cache (``gradient_memory``); the GPU check uses it.
    gradient = gradient_memory(shape, dtype, selection_batches(spec, config.selection_pairs, SELECTION_TOKENS),
                               config.selection_pairs, cpu_heap=device == "cpu") if work.selection_answers else None
    scoring = scoring_cache(shape, dtype, config, prompts, costs.persona_answer_steps or costs.answer_steps) \
        if usable else None
    selection_estimate = None
    if gradient is not None and not usable:
        selection_peak += logits_bytes
        selection_estimate = base + gradient.total
    if usable:
        from dpn_lens.effect.gradients import margin_gradients
        from dpn_lens.evaluation.preference import PairScorer

        per_answer = costs.prompt_tokens + costs.answer_fill * config.max_new_tokens
        peak += max(int(costs.extra_bytes * _batch_scale(PairScorer, 2 * config.pairs * per_answer, costs)),
                    max(generation_peak_bytes(costs, w, config, prompts) for w in works.values()))
        # The held-out questions' cache, kept for the trait's run: it grows with the pairs (the sample's 12
        # measured it for a few MiB), so it is counted from the run's questions and answers.
        peak += scoring.kept_bytes
        selection_peak += int(costs.selection_extra_bytes
                              * _batch_scale(margin_gradients, 2 * config.selection_pairs * per_answer, costs))
        if gradient is not None:
            # The sample's pass (2 batches) scaled to a run's fuller batches missed what the run's later
            # batches add (glibc's heap keeps the earlier ones' blocks; the cache of every batch): SmolLM2,
            # 128 pairs, 4.15 GiB planned where 5.38 were held. The estimate counts the run's own batches.
            selection_peak = max(selection_peak, base + gradient.total)
    counts = {"held-out pairs": f"{max(w.generated_answers for w in works.values())} greedy answers of <= "
                                f"{config.max_new_tokens} tokens" + _cached_note(settings, traits, "held_out"),
              "selection": f"{work.selection_answers} selection answers, "
                           + ("generated and differentiated" if any(w.selection_generated for w in works.values())
                              else "differentiated (the pairs are cached)") + _cached_note(settings, traits, "selection")
                           + ("" if usable or gradient is None else
                              f"; the bound counts the gradient pass's logits, {logits_bytes / 1024 ** 3:.2f} GiB; the "
                              f"estimate the whole pass, {gradient.total / 1024 ** 3:.2f} GiB: "
                              f"{_gradient_parts(gradient)}"),
              "KL curves": f"{work.probe_passes} probe passes of {config.kl_chunks}x{config.kl_tokens} tokens "
                           "(at most: a curve stops at KL 2)",
              "answer scoring": f"{work.answer_passes} passes over {2 * config.pairs} answers"
                                + (_cache_note(scoring) if scoring is not None else ""),
              "persona control": f"{work.persona_passes} persona passes over {2 * config.pairs} answers",
              "method preparation": f"CAA's direction from {config.caa_pairs} pairs of persona prompts"
                                    + (f" (mean {_mean_tokens(prompts.contrastive):.0f} tokens)"
                                       if prompts is not None and prompts.contrastive else ""),
              "budget sweep": f"{work.sweep_probe_passes} probe passes and {work.sweep_answer_passes} answer passes "
                              f"(about {BRACKET_PROBES} probes per budget point; at most: a budget that does not "
                              "reach the target KL makes no answer pass)",
              "generation check": f"{work.generation_sets} sets of {work.generation_questions} greedy answers of <= "
                                  f"{config.max_new_tokens} tokens, {work.generation_scored} scored under two personas"}
    absent = {"held-out pairs": not any(w.generated_answers for w in works.values()),
              "selection": not work.selection_answers,
              "method preparation": "caa" not in config.methods,
              "budget sweep": not work.sweep_probe_passes, "generation check": not work.generation_sets}
    if usable and costs.engine != default_engine(dtype):
        stale = (f"; its decode costs were measured with engine {costs.engine!r}, this run generates with "
                 f"{default_engine(dtype)!r}: `dpn-lens plan --measure` again for its times")
        counts["held-out pairs"] += stale
        counts["generation check"] += stale
    for kind, detail in counts.items():
        if absent.get(kind, False):
            continue
        seconds = per_kind[kind] if usable else None
        if seconds is not None and kind == "KL curves":   # and once per run, the unsteered reference
            seconds += reference_seconds
        stages.append(StagePlan(f"{kind} ({len(traits)} traits)", seconds,
                                selection_peak if kind == "selection" else peak, f"per trait: {detail}",
                                peak_is_lower_bound=not usable,
                                estimate_bytes=selection_estimate if kind == "selection" else None))
    gib = 1024 ** 3
    # A GPU holds the pass's tensors (its caching allocator, not glibc's heap: the 10% below).
    needed = weights + reference + max(gradient.total - gradient.heap_retained if gradient is not None else 0,
                                       scoring.kept_bytes if scoring is not None else 0)
    fits = {size: needed * 1.1 < size * gib for size in GPU_SIZES_GIB}
    return RunPlan(spec, shape, device, dtype, weights, stages, machine, fits)


def _cache_note(footprint: "CacheFootprint") -> str:
    """The plan's word on the answer scorer's questions' cache (``scoring_cache``).

    Example:
        >>> from dpn_lens.evaluation.answer_cache import CacheFootprint
        >>> _cache_note(CacheFootprint(batches=4, recomputed=0, kept_bytes=2 ** 30, all_bytes=2 ** 30))
        "; the questions' cache holds 1.00 GiB (--score-cache-gib bounds it)"
        >>> _cache_note(CacheFootprint(batches=4, recomputed=3, kept_bytes=2 ** 28, all_bytes=2 ** 30))
        "; the questions' cache holds 0.25 of 1.00 GiB (--score-cache-gib): 3 of 4 batches' questions run again each pass"
    """
    gib = 1024 ** 3
    if footprint.recomputed:
        return (f"; the questions' cache holds {footprint.kept_bytes / gib:.2f} of {footprint.all_bytes / gib:.2f} GiB "
                f"(--score-cache-gib): {footprint.recomputed} of {footprint.batches} batches' questions run again "
                "each pass")
    return f"; the questions' cache holds {footprint.kept_bytes / gib:.2f} GiB (--score-cache-gib bounds it)"


def _mean_tokens(sets: Sequence[Sequence[int]]) -> float:
    """Mean prompt length over prompt sets: ``_mean_tokens([[10, 20], [30]]) == 20.0``."""
    return sum(map(sum, sets)) / max(sum(map(len, sets)), 1)


def _cached_note(settings: ControlSettings, traits: Sequence[str], kind: str) -> str:
    """The plan's word on which traits' pairs of ``kind`` (``held_out``, ``selection``) the cache holds.

    Example:
        >>> settings = ControlSettings(cached=CachedPairs(held_out=["openness"], selection=[]))
        >>> _cached_note(settings, ["openness", "neuroticism"], "held_out")
        '; cached for openness (not generated)'
        >>> _cached_note(settings, ["openness"], "selection"), _cached_note(ControlSettings(), ["openness"], "selection")
        ('', '')
    """
    found = settings.cached
    if found is None:
        return ""
    if found.unknown:
        return f"; the cache was not looked up: {found.unknown}"
    cached = [trait for trait in traits if trait in getattr(found, kind)]
    if not cached or len(cached) == len(traits) and kind == "selection":
        return ""
    return f"; cached for {', '.join(cached)} (not generated)"


def _gradient_parts(memory: "GradientMemory") -> str:
    """``GradientMemory``'s parts in GiB, for the plan's text."""
    rows, answer, context = memory.batch
    parts = [f"activations {memory.activations / 1024 ** 3:.2f}", f"logits {memory.logits / 1024 ** 3:.2f}",
             f"the questions' cache {memory.cache / 1024 ** 3:.2f}"]
    if memory.heap_retained:
        parts.append(f"glibc's heap {memory.heap_retained / 1024 ** 3:.2f}")
    return ", ".join(parts) + f" (fullest batch: {rows} answers of {answer} tokens after {context} question tokens)"


def gradient_logits_bytes(shape: ModelShape, dtype: str, tokens: int) -> int:
    """A lower bound on the memory the attribution rules' gradient pass holds at once for the logits of
    one batch of ``tokens`` answer tokens, known from the vocabulary alone (no measurement needed).

    When the backward pass forms the logits' gradient, three tensors of the batch's full size coexist:
    the logits in the model's dtype (held until the batch ends), the float32 log-probabilities saved for
    the backward, and the logits' gradient in their dtype: ``(2 * dtype + 4)`` bytes per token and
    vocabulary entry. The activations saved for the backward, the questions' cache and per-row temporaries
    come on top, so a run needs more (``gradient_memory`` estimates it all): with the weights frozen,
    SmolLM2-135M-Instruct in float32, 32 pairs, held 2.5x the bound at 2048 tokens beyond the loaded model,
    Gemma 3 270M in bfloat16, 16 pairs, 1.3x (``benchmarks/bench_plan.py --stage gradient-memory``,
    docs/PERFORMANCE.md). On the cached path
    the questions share a batch's ``batch_tokens`` with the answers, so a batch holds fewer answer tokens
    than ``tokens`` and the logits alone stay below this.

    Example:
        >>> shape = ModelShape(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=2, head_dim=4, vocab=1000,
        ...                    tied=True)
        >>> gradient_logits_bytes(shape, "bfloat16", 10)    # 10 x 1000 x (2 x 2 + 4)
        80000
    """
    if dtype not in BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(BYTES)}")
    return int(tokens) * shape.vocab * (2 * BYTES[dtype] + 4)


def gradient_activation_bytes(shape: ModelShape, dtype: str, rows: int, answer: int, context: int) -> int:
    """What the backward of one batch of the attribution rules' gradient pass needs held: the tensors autograd
    saves and the hooked activations the gradients are taken with respect to, for ``rows`` answers padded
    to ``answer`` tokens, after questions of (padded) ``context`` tokens run without gradients into a
    key/value cache (``effect.gradients``' cached path), estimated from the model's shape.

    The pass freezes the weights (``hooked.frozen_weights``) and hooks every layer's ``hook_post``, so the
    graph starts at the first layer's ``hook_post`` (a leaf) and no projection saves its input (that is
    kept for a weight gradient only). Each count below is a tensor the backward needs, ``w`` the dtype's
    bytes; ``tokens = rows x answer`` positions run with gradients and each attends to ``context +
    answer`` keys. Per layer after the first:

    * each norm: its input in float32 (RMSNorm upcasts; on float32 the input itself); the normalised
      values and the norm's output are kept for the weight's gradient only. Gemma 3 has four per layer
      (before and after attention and the MLP) and its query and key norms the same per head;
    * attention: the rotated queries (``w``), the keys and values repeated for every query head
      (``repeat_kv``'s copies, context included: ``2 w``), the float32 probabilities (saved by the
      softmax; below float32 also their cast to ``w``, saved by the product with the values);
    * a gated MLP: the gate's pre-activation, the activation and the up projection (saved by the
      activation function and their product), ``w`` each, and their product ``hook_post``, which the pass
      holds as the gradient's input; an ungated one: pre and post;

    in the first layer ``hook_post`` only (and on Gemma 3 the float32 input of the norm after the MLP);
    then the final norm's float32 input. Per-token scalars (the norms' inverse RMS) and the rotary
    tables (shared by the layers) are left out: below 0.1% on the embedded models.

    Example:
        >>> shape = ModelShape(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=1, head_dim=4, vocab=1000,
        ...                    tied=True)
        >>> gradient_activation_bytes(shape, "float32", 2, 3, 5)   # one layer: hook_post 6x16x4, final norm 6x8x4
        576
    """
    if dtype not in BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(BYTES)}")
    w, f32 = BYTES[dtype], 4
    rows, answer, context = int(rows), int(answer), int(context)
    tokens, keys = rows * answer, context + answer
    heads = shape.n_heads * shape.head_dim
    gemma = shape.family == "gemma3"
    # A norm: its float32 input (the frozen weight needs neither the normalised values nor the output).
    norm = f32 * tokens * shape.d_model
    norms = (4 if gemma else 2) * norm
    if gemma:
        norms += f32 * tokens * (shape.n_heads + shape.n_kv_heads) * shape.head_dim   # query, key norms
    probabilities = rows * shape.n_heads * answer * keys
    attention = (w * tokens * heads                                           # rotated queries
                 + 2 * w * rows * shape.n_heads * keys * shape.head_dim        # keys, values per query head
                 + (f32 + (w if w != f32 else 0)) * probabilities)             # softmax output, its cast
    hook_post = w * tokens * shape.d_mlp                                       # held by the pass, not autograd
    mlp = (3 if shape.gated else 1) * w * tokens * shape.d_mlp + hook_post     # gate, activation, up; hook_post
    first = hook_post + (norm if gemma else 0)                                 # the graph starts at hook_post
    return (shape.n_layers - 1) * (norms + attention + mlp) + first + norm     # and the final norm


@dataclass
class GradientMemory:
    """An estimate of what the attribution rules' gradient pass holds at its peak, by what holds it
    (``gradient_memory``), in bytes. The peak comes as the backward starts, in the fullest batch: the
    forward's saved activations and logits are all held while the rows' logit gradients add up."""

    activations: int
    """What autograd saves for that batch's backward and the hooked activations the gradients are taken
    with respect to (``gradient_activation_bytes``)."""
    logits: int
    """That batch's logits, the logits' gradient twice (the buffer the rows' gradients add into and the
    next row's, full-size, being added) and the float32 log-probabilities of its answer positions."""
    cache: int
    """The questions' key/value cache of the fullest batch: its questions' and the copy per answer row."""
    result: int
    """The float32 gradients per pair, layer and neuron that the pass returns."""
    batch: tuple[int, int, int]
    """The fullest batch: rows, answer tokens, context tokens."""
    heap_retained: int = 0
    """On the CPU, the freed blocks of the batches before that glibc's heap still holds
    (``CPU_HEAP_RETAINED`` of the activations; none in the first batch, none on a GPU)."""

    @property
    def total(self) -> int:
        return self.activations + self.logits + self.cache + self.result + self.heap_retained


CPU_HEAP_RETAINED = 0.69
"""On the CPU, glibc's heap keeps freed blocks of the gradient pass's earlier batches: its per-layer tensors
(a few MB, below glibc's 32 MiB mmap threshold) come from the heap, and the next batch's are slightly
larger (more rows: the batches run longest question first), so they do not fit the holes and the heap
grows. The one measured constant of the estimate, as a share of the fullest batch's saved activations:
SmolLM2-135M-Instruct float32, 32 pairs: VmHWM 3.33 GiB beyond the loaded model, 2.36 GiB with glibc
made to return freed blocks (``MALLOC_MMAP_THRESHOLD_``), the difference 0.97 GiB of 1.40 GiB of
activations (fitted while the pass left the weights requiring grad). Checked on Gemma 3 270M and
SmolLM2 in bfloat16, and again with the weights frozen (SmolLM2: 0.80 and 0.46 GiB kept in float32 and
bfloat16 where 0.75 and 0.48 are estimated), by ``benchmarks/bench_plan.py --stage gradient-memory``
(docs/PERFORMANCE.md). With the pass keeping only its batch in flight's questions' cache, what glibc keeps
varies from run to run of the same command: 0.18 and 0.53 of the activations (SmolLM2 float32, 32 pairs),
0.57 (bfloat16), 0.72 (Gemma 3 270M, 32 pairs). The constant stays near the top of that range, so a memory
plan errs toward more, not less."""


def gradient_memory(shape: ModelShape, dtype: str, batches: Sequence[tuple[int, int, int]], pairs: int,
                    cpu_heap: bool = False) -> GradientMemory:
    """The peak memory of the gradient pass (``effect.margin_gradients``, cached path) over ``pairs``
    selection pairs run in ``batches`` of ``(rows, answer tokens, context tokens)`` (padded), in the order
    they run: estimated from the model's shape, beyond the loaded model.

    The tensors are counted from the architecture; with ``cpu_heap`` (a run on the CPU) the estimate adds
    what glibc's heap keeps of the batches before (``CPU_HEAP_RETAINED``), the allocator's share, measured.

    Example:
        >>> shape = ModelShape(n_layers=1, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=1, head_dim=4, vocab=1000,
        ...                    tied=True)
        >>> memory = gradient_memory(shape, "float32", [(2, 3, 5), (2, 3, 4)], pairs=2)
        >>> memory.batch     # the fullest batch: the first (more context)
        (2, 3, 5)
        >>> memory.logits == 3 * 4 * 6 * 1000 + 4 * 2 * 2 * 1000     # 3 x logits, log-probs of 2 x 2 positions
        True
    """
    if dtype not in BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(BYTES)}")
    if not batches:
        raise ValueError("no batches: the gradient pass needs at least one")
    w = BYTES[dtype]
    best: tuple[int, int, int, tuple[int, int, int]] | None = None
    for index, (rows, answer, context) in enumerate(batches):
        # (the batch's gradients go into the result as they come: none is held into the next batch)
        held = (gradient_activation_bytes(shape, dtype, rows, answer, context),
                # logits, the gradient buffer and the next row's full-size gradient; float32 log-probs of the
                # positions that predict an answer token (at the peak one row's are freed and that row's own
                # gradient temporaries take their place)
                3 * w * rows * answer * shape.vocab + 4 * rows * (answer - 1) * shape.vocab,
                index, (rows, answer, context))
        if best is None or sum(held[:2]) > sum(best[:2]):
            best = held
    activations, logits, index, batch = best
    # The questions' cache of the batch in flight alone (the pass keeps no other batch's: ``margin_gradients``'
    # ``cache_bytes=0``): its distinct questions and the per-answer copy the answers run from, at most a row
    # per answer each; keys and values of every layer.
    rows, _, context = batch
    cache = 2 * rows * context * 2 * shape.n_kv_heads * shape.head_dim * w * shape.n_layers
    # glibc's heap holds the freed blocks of the batches before the fullest (none when it is the first)
    heap = int(CPU_HEAP_RETAINED * activations) if cpu_heap and index > 0 else 0
    return GradientMemory(activations, logits, cache, 4 * int(pairs) * shape.n_layers * shape.d_mlp, batch, heap)


def selection_batches(spec: str, selection_pairs: int, answer: int, question_lengths: Sequence[int] | None = None
                      ) -> list[tuple[int, int, int]]:
    """The batches ``(rows, answer tokens, context tokens)`` the gradient pass makes for ``selection_pairs``
    pairs, modelled before any answer exists: the questions are the embedded ones (the selection pairs'
    source, ``effect.pairs``) rendered for ``spec``, spread over their lengths as a draw would be, each
    asked twice (the high and the low answer), every answer ``answer`` tokens (greedy answers mostly
    reach the limit, and a batch pads to its longest); batched as the pass batches them
    (``answer_cache.answer_batches`` at ``margin_gradients``' ``batch_tokens``). ``question_lengths``:
    ``question_tokens(spec)``, when the caller has them (None: tokenized here).
    """
    from dpn_lens.effect.gradients import margin_gradients
    from dpn_lens.evaluation.answer_cache import answer_batches

    lengths = sorted(question_lengths) if question_lengths is not None else question_tokens(spec)
    n = max(int(selection_pairs), 1)
    contexts = [length for i in range(n) for length in [lengths[i * len(lengths) // n]] * 2]
    answers = [int(answer)] * len(contexts)
    return [(len(chunk), max(answers[i] for i in chunk), max(contexts[i] for i in chunk))
            for chunk in answer_batches(contexts, answers, batch_tokens_default(margin_gradients),
                                        [i // 2 for i in range(len(contexts))])]


def question_tokens(spec: str) -> list[int]:
    """The embedded questions' lengths (chat template and BOS included) for ``spec``'s tokenizer, sorted.

    Example:
        >>> import tempfile
        >>> from dpn_lens.data.contrastive import embedded_questions
        >>> from dpn_lens.tiny import build_tiny_hf_model
        >>> folder = tempfile.mkdtemp()
        >>> build_tiny_hf_model(folder)[0].config.save_pretrained(folder)   # a config.json beside its tokenizer
        >>> lengths = question_tokens(folder)
        >>> len(lengths) == len(embedded_questions()) and lengths == sorted(lengths) and lengths[0] > 1
        True
    """
    from dpn_lens.data.contrastive import embedded_questions
    from dpn_lens.data.prompts import render_for_model
    from dpn_lens.hooked import encode
    from dpn_lens.plan import rendering_stub

    stub = rendering_stub(spec)
    return sorted(len(encode(stub, render_for_model(stub, question))) for question in embedded_questions())


def _gradient_batch_tokens(selection_pairs: int, max_new_tokens: int) -> int:
    """Answer tokens in the gradient pass's fullest batch: its ``batch_tokens`` default, or all the answers
    of a selection too small to fill one (two answers of at most ``max_new_tokens`` per pair).

    Example:
        >>> _gradient_batch_tokens(512, 48), _gradient_batch_tokens(4, 48)
        (2048, 384)
    """
    from dpn_lens.effect.gradients import margin_gradients

    return min(batch_tokens_default(margin_gradients), 2 * int(selection_pairs) * int(max_new_tokens))


def batch_tokens_default(batched: Any) -> int:
    """The ``batch_tokens`` default of a batched pass (``PairScorer``, ``margin_gradients``): the plan reads
    the code's own batch size, so a change there changes the plan.

    Example:
        >>> def batched(items, batch_tokens=4096): ...
        >>> batch_tokens_default(batched)
        4096
    """
    import inspect

    return int(inspect.signature(batched).parameters["batch_tokens"].default)


def generation_peak_bytes(costs: ControlCosts, work: ControlWork, config: Any, prompts: PromptTokens) -> int:
    """Memory of a run's greedy generation beyond the loaded model and the probe's reference: the sample's
    (``costs.generation_extra_bytes``) scaled by how many more rows x padded tokens the run's largest batch
    prompt-passes than the sample's largest. The held-out and the selection pairs are generated in batches
    of ``config.pair_batch`` and ``GENERATION_BATCH`` after persona prompts, the generation check's sets as many at a time after
    their questions alone. 0 for a file measured before it, or a run that generates nothing.

    Example:
        >>> costs = type("Costs", (), {"generation_extra_bytes": 1000, "generation_batch_tokens": 16 * 100})()
        >>> work = type("Work", (), {"generated_answers": 64, "selection_generated": 0, "generation_questions": 0})()
        >>> config = type("Config", (), {"pair_batch": 16})()
        >>> generation_peak_bytes(costs, work, config, PromptTokens([150, 120], 140.0, 50.0, [90]))
        1500
    """
    if not costs.generation_extra_bytes or not costs.generation_batch_tokens:
        return 0
    batches = [min(config.pair_batch, work.generated_answers) * max(prompts.held_out, default=0),
               min(GENERATION_BATCH, work.selection_generated) * max(prompts.selection, default=0),
               min(GENERATION_BATCH, work.generation_questions) * prompts.question]
    return int(costs.generation_extra_bytes * max(batches) / costs.generation_batch_tokens)


def _batch_scale(batched: Any, run_tokens: float, costs: ControlCosts) -> float:
    """How much fuller the run's batches of ``batched`` (``PairScorer``, ``margin_gradients``: batches of at
    most their ``batch_tokens`` default) are than the sample's: the measured extra memory scales with it.

    Example:
        >>> def batched(items, batch_tokens=4096): ...
        >>> costs = type("Costs", (), {"sample_tokens": 2048.0})()
        >>> _batch_scale(batched, 9000.0, costs), _batch_scale(batched, 1024.0, costs)
        (2.0, 0.5)
    """
    limit = batch_tokens_default(batched)
    return min(limit, run_tokens) / max(min(limit, costs.sample_tokens), 1.0)


def plan_control_run(spec: str, config: Any, device: str = "cpu", dtype: str = "float32",
                     costs: ControlCosts | None = None, machine: MachineCosts | None = None,
                     pairs_cached: bool = False, run: "ControlRecord | None" = None,
                     look_up_cache: bool = True) -> RunPlan:
    """The plan of ``dpn-lens control`` run with ``config`` (a ``ControlConfig``): which maps its maps folder
    already holds (``run.find_map``), which traits' pairs the cache holds (``cached_pairs``, unless
    ``look_up_cache`` is False; ``pairs_cached``: assume every trait's held-out pairs are), this machine's
    saved costs when ``costs``/``machine`` are None; ``run``: that run's result, to count the passes it made
    (``plan_control``)."""
    import torch

    from dpn_lens.evaluation.methods import effect_rules_needed
    from dpn_lens.plan import saved_costs
    from dpn_lens.run import find_map

    rules = [rule for rule in effect_rules_needed(config.methods) if rule != "dpn-le"]
    folder = config.maps_dir
    given = {"maps_given": bool(folder) and all(find_map(folder, trait) for trait in config.traits),
             "rule_maps_given": bool(folder) and all(find_map(folder, trait, rule) for trait in config.traits
                                                     for rule in rules),
             "pairs_cached": pairs_cached,
             "cached": cached_pairs(spec, dtype, config.traits, config) if look_up_cache else None}
    threads = torch.get_num_threads()
    costs = costs or saved_control_costs(device, dtype, threads)
    machine = machine or saved_costs(device, dtype, threads)
    return plan_control(spec, config.traits, ControlSettings(config, **given), device, dtype, costs, machine, run)
