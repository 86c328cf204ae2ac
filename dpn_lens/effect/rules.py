"""Selection rules: which neurons a map edits. The paper's dual criterion, and rules that rank by effect.

DPN-LE selects neurons with a large activation contrast (``|s| > tau_q`` and ``|d| > tau_d``). On the
embedded models those neurons do not steer (docs/RESULTS.md). The rules here keep DPN-LE's edit, the same
sparse additive ``±gamma * s`` (``steering_intervention``), and change only which neurons get it, so a
comparison of rules isolates the selection:

* ``attribution``: the first-order effect of the edit on the trait margin. Per neuron,
  ``s_i * g_i`` with ``g_i`` the gradient of the preference margin ``log p(high answer) - log p(low
  answer)`` summed over the answer positions and averaged over selection pairs (the model's own answers
  to the embedded training questions, ``effect.pairs``; ``effect.gradients.margin_gradients``). The top
  ``k`` over all layers are kept.
* ``attribution-t``: the same per-pair attributions, ranked by their t statistic over the selection pairs
  (mean / standard error) instead of their mean: neurons whose edit moves the margin the same way on
  every pair, not those that move a few pairs a lot. (Added because the mean's top set changed a lot
  between draws of selection pairs; docs/RESULTS.md.)
* ``write``: how much the edit writes the residual trait direction ``u`` that CAA adds: ``u`` is the
  mean difference of ``hook_resid_post`` at CAA's layer ``L`` (``baselines.caa``, 50 embedded pairs), and
  the score of a neuron of a layer up to ``L`` is ``s_i * (w_i . u) / |u|^2`` (``w_i`` the neuron's output
  direction into the residual stream, through Gemma's post-norm where there is one;
  ``effect.gradients.write_gradients``): the share of ``u`` that the neuron's edit writes per unit gamma.
* ``write-layer``: the same with each layer's own residual direction ``u_l`` (at ``hook_resid_post`` of
  the neuron's layer), over all layers.
* ``dpn-le-attribution``: the paper's dual criterion as a filter, ranked by attribution: the DPN-LE
  neurons whose edit moves the margin as asked to first order (positive attribution), best first. Does
  the paper's set hold a causal core?

The budget ``k`` defaults to the DPN-LE map's neuron count, at most 0.5% of all MLP neurons
(``default_budget``); the selected neurons are split into a high pole (``s > 0``) and a low pole
(``s < 0``), so ``mode="both"`` edits all of them. A map records its rule and scores
(``NeuronMap.rule``, ``effect_score``) and can be re-selected at another ``k`` without recomputing them
(``reselect_top``).

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> from dpn_lens import collect_statistics, embedded_contrastive_set, locate
    >>> model = build_tiny_model()
    >>> base = locate(collect_statistics(model, embedded_contrastive_set("openness", 40)), layers=[1, 2, 3], tau_d=0.0)
    >>> scores = effect_scores(model, base, "write-layer", contrastive_pairs=8)
    >>> effect_map(base, scores, budget=5).rule, effect_map(base, scores, budget=5).n_selected()
    ('write-layer', 5)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens.effect.defaults import SELECTION_PAIRS, SELECTION_TOKENS
from dpn_lens.generation import GENERATION_BATCH
from dpn_lens.localization.neuron_map import DUAL_CRITERION, NeuronMap
from dpn_lens.numbers import as_int
from dpn_lens.localization.settings import LocalizationSettings

__all__ = ["SelectionRule", "SELECTION_RULES", "attribution_statistic", "RULES_BY_NAME", "RULE_NAMES", "EFFECT_RULES", "EffectScores",
           "effect_scores", "rule_scores", "candidate_scores", "per_pair_attribution", "resolved_budget", "effect_map", "select_by_effect", "reselect_top", "select_top", "default_budget",
           "MAX_FRACTION", "CONTRASTIVE_PAIRS", "SELECTION_PAIRS", "SELECTION_TOKENS"]

MAX_FRACTION = 0.005
"""The largest share of all MLP neurons a default budget takes (the paper's 0.5%)."""
CONTRASTIVE_PAIRS = 50
"""Embedded contrastive pairs (seed 42) the write rules read the residual direction from, as CAA does."""


@dataclass(frozen=True)
class SelectionRule:
    """One way of choosing a map's neurons.

    Attributes:
        name: the name in ``locate(select=...)``, ``--select``, ``--methods`` and every table.
        score: ``"attribution"`` or ``"write"`` (what is computed), or None for the dual criterion.
        statistic: for attribution scores, what ranks the per-pair attributions: ``"mean"`` or ``"t"``.
        direction: for write scores, ``"caa"`` (CAA's direction at its layer) or ``"layer"`` (each layer's own).
        within_dual: candidates are the dual criterion's neurons only (else every neuron of every layer).
        summary: one line for tables and help texts.
    """

    name: str
    summary: str
    score: str | None = None
    statistic: str = "mean"
    direction: str | None = None
    within_dual: bool = False


SELECTION_RULES: tuple[SelectionRule, ...] = (
    SelectionRule(DUAL_CRITERION, "the paper: |s| > tau_q per layer and |d| > tau_d"),
    SelectionRule("attribution", "top k by s x d(margin)/d(neuron) on selection pairs (first-order effect)",
                  score="attribution"),
    SelectionRule("attribution-t", "top k by the t statistic of that first-order effect over the selection pairs",
                  score="attribution", statistic="t"),
    SelectionRule("write", "top k by the share of CAA's residual trait direction the edit writes", score="write",
                  direction="caa"),
    SelectionRule("write-layer", "top k by the share of each layer's residual trait direction the edit writes",
                  score="write", direction="layer"),
    SelectionRule("dpn-le-attribution", "DPN-LE's neurons with a positive attribution t statistic, best first",
                  score="attribution", statistic="t", within_dual=True),
)
RULES_BY_NAME: dict[str, SelectionRule] = {rule.name: rule for rule in SELECTION_RULES}
RULE_NAMES: tuple[str, ...] = tuple(RULES_BY_NAME)
EFFECT_RULES: tuple[str, ...] = tuple(rule.name for rule in SELECTION_RULES if rule.score is not None)


def rule_named(name: str) -> SelectionRule:
    """The rule called ``name``; a ValueError naming the choices otherwise."""
    if name not in RULES_BY_NAME:
        raise ValueError(f"unknown selection rule {name!r}; choose one of {', '.join(RULE_NAMES)}")
    return RULES_BY_NAME[name]


@dataclass
class EffectScores:
    """One effect rule's score for every neuron of the map's collected layers (``-inf``: not a candidate).

    Attributes:
        rule: the rule's name.
        scores: ``[len(stat_layers), d_mlp]`` float32, rows aligned with the base map's ``stat_layers``.
        details: what was read (pairs, seed, CAA layer, ...), recorded in the map's ``selection``.
    """

    rule: str
    scores: Float[Tensor, "n_stat_layers d_mlp"]
    details: dict[str, Any] = field(default_factory=dict)


def default_budget(neuron_map: NeuronMap) -> int:
    """The DPN-LE map's neuron count, capped at ``MAX_FRACTION`` of all the model's MLP neurons.

    Example:
        >>> from helpers import make_map                          # doctest: +SKIP
        >>> default_budget(make_map(...))                         # doctest: +SKIP
        185
    """
    cap = math.floor(MAX_FRACTION * neuron_map.n_model_layers * neuron_map.d_mlp)
    return max(1, min(neuron_map.n_selected(), cap))


def select_top(scores: Float[Tensor, "n_rows d_mlp"], rows: Sequence[int], k: int) -> dict[int, Int[Tensor, "n"]]:
    """The ``k`` finite scores that are largest, as ``{row label: sorted neuron indices}``.

    Ties are broken by position (row, then neuron), so the same scores always give the same set.

    Example:
        >>> select_top(torch.tensor([[0.1, 0.9, -1.0], [0.5, float("-inf"), 0.2]]), rows=[3, 7], k=3)
        {3: tensor([1]), 7: tensor([0, 2])}
    """
    k = as_int(k, "k (neurons to keep)", minimum=1)
    flat = scores.detach().to(torch.float64).flatten()
    candidates = torch.nonzero(torch.isfinite(flat)).flatten()
    # A stable sort on the negated score keeps the flat (row, neuron) order among equal scores.
    order = candidates[torch.sort(-flat[candidates], stable=True).indices][:k]
    width = int(scores.shape[1])
    chosen: dict[int, list[int]] = {}
    for index in order.tolist():
        chosen.setdefault(rows[index // width], []).append(index % width)
    return {row: torch.tensor(sorted(chosen[row]), dtype=torch.long) for row in rows if row in chosen}


def attribution_statistic(per_pair: Float[Tensor, "n_pairs n_rows d_mlp"], statistic: str
                          ) -> Float[Tensor, "n_rows d_mlp"]:
    """The mean over pairs (``"mean"``) or its t statistic, mean / (sd / sqrt(n)) (``"t"``; 0 where sd is 0).

    Example:
        >>> per_pair = torch.tensor([[[1.0, 2.0]], [[3.0, 2.0]]])
        >>> attribution_statistic(per_pair, "mean").tolist(), attribution_statistic(per_pair, "t").tolist()
        ([[2.0, 2.0]], [[2.0, 0.0]])
    """
    values = per_pair.double()
    mean = values.mean(0)
    if statistic == "mean":
        return mean
    if statistic != "t":
        raise ValueError(f"statistic must be 'mean' or 't', got {statistic!r}")
    if values.shape[0] < 2:
        raise ValueError("the t statistic needs at least 2 selection pairs")
    error = values.std(0) / math.sqrt(values.shape[0])
    return torch.where(error > 0, mean / error.clamp(min=1e-300), torch.zeros_like(mean))


def per_pair_attribution(model: Any, base: NeuronMap, pairs: Sequence[Any]) -> Float[Tensor, "n_pairs n_stat_layers d_mlp"]:
    """Per selection pair, each neuron's first-order effect on the margin, ``s * d(margin)/d(neuron)``.

    Example:
        >>> per_pair_attribution(model, dpn_map, pairs).shape     # doctest: +SKIP
        torch.Size([128, 18, 2048])
    """
    from dpn_lens.effect.gradients import margin_gradients

    gradients = margin_gradients(model, pairs, layers=base.stat_layers)
    return base.steering_value.float()[None] * gradients.per_pair


def _attribution(model: Any, base: NeuronMap, pairs: Sequence[Any] | None, n_pairs: int, seed: int, tokens: int,
                 batch: int, log: Callable[[str], None] | None, cache: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """Per selection pair, ``s * d(margin)/d(neuron)``: ``[n_pairs, len(stat_layers), d_mlp]``."""
    from dpn_lens.effect.pairs import selection_pairs

    drawn = pairs is None
    if drawn:
        pairs = selection_pairs(model, base.trait, n_pairs=n_pairs, seed=seed, max_new_tokens=tokens, log=log,
                                batch_size=batch, cache=cache)
    per_pair = per_pair_attribution(model, base, pairs)
    # The kept count can fall below the request (identical or empty answer pairs are dropped), so the
    # request is recorded too: a saved map is reused only for the same request (trait_maps.rule_maps).
    return per_pair, {"selection_pairs": len(pairs), "requested_pairs": n_pairs if drawn else len(pairs),
                      "pairs_seed": seed, "answer_tokens": tokens,
                      "pairs_source": "embedded questions and personas (the model's own greedy answers)"}


def _write(model: Any, base: NeuronMap, rule: SelectionRule, contrastive_pairs: int,
           log: Callable[[str], None] | None) -> tuple[Tensor, dict[str, Any]]:
    from dpn_lens.baselines.caa import caa_layer, residual_means
    from dpn_lens.data.contrastive import embedded_contrastive_set
    from dpn_lens.effect.gradients import write_gradients

    pairs = embedded_contrastive_set(base.trait, contrastive_pairs, seed=42)
    _, high = residual_means(model, pairs.high)
    _, low = residual_means(model, pairs.low)
    difference = high.mean(0) - low.mean(0)                       # [n_layers, d_model]
    layer = caa_layer(high, low)
    if rule.direction == "caa":
        directions = difference[layer].expand_as(difference)
        allowed = [row for row, l in enumerate(base.stat_layers) if l <= layer]
    else:
        directions, allowed = difference, list(range(len(base.stat_layers)))
    # u / |u|^2: a neuron's score is the share of u its edit writes per unit gamma.
    unit = directions / (directions.norm(dim=-1, keepdim=True) ** 2).clamp(min=1e-30)
    writes = write_gradients(model, pairs.high + pairs.low, unit.float(), layers=base.stat_layers)
    scores = base.steering_value.double() * writes
    blocked = torch.ones(len(base.stat_layers), dtype=torch.bool)
    blocked[allowed] = False
    scores[blocked] = -math.inf
    return scores, {"contrastive_pairs": contrastive_pairs, "direction": rule.direction, "caa_layer": layer}


def effect_scores(model: Any, base: NeuronMap, rule: str, *, pairs: Sequence[Any] | None = None,
                  n_pairs: int | None = None, seed: int = 0, contrastive_pairs: int = CONTRASTIVE_PAIRS,
                  selection_tokens: int = SELECTION_TOKENS, selection_batch: int = GENERATION_BATCH, memo: dict[Any, Any] | None = None,
                  log: Callable[[str], None] | None = None, cache_pairs: bool = True) -> EffectScores:
    """Score every neuron of ``base``'s collected layers by an effect rule (module note).

    Args:
        model: the model ``base`` was located on (checked).
        base: the trait's DPN-LE map: its ``s`` is the edit, its selection the dual filter and budget.
        rule: an effect rule (``EFFECT_RULES``).
        pairs: selection pairs for attribution rules (None: ``effect.pairs.selection_pairs`` of ``n_pairs``
            drawn with ``seed``, answered in at most ``selection_tokens`` tokens, ``selection_batch`` prompts
            at a time; cached unless ``cache_pairs`` is False).
        contrastive_pairs: embedded pairs for the write rules' residual direction.
        memo: a dict kept across calls for one map: rules that compute the same raw scores (``attribution``
            and ``dpn-le-attribution``, with drawn pairs) compute them once.

    Returns:
        ``EffectScores``; ``-inf`` marks neurons the rule may not pick (outside the dual criterion for
        ``dpn-le-attribution``, after CAA's layer for ``write``, ``s = 0`` everywhere).
    """
    chosen = rule_named(rule)
    if chosen.score is None:
        raise ValueError(f"{rule!r} is the dual criterion, not an effect rule; use dpn_lens.locate for it")
    if base.rule != DUAL_CRITERION:
        raise ValueError(f"effect rules start from the trait's DPN-LE map (its s, and its selection as filter and "
                         f"budget); got a {base.rule!r} map")
    base.check_compatible(model)
    n_pairs = SELECTION_PAIRS if n_pairs is None else as_int(n_pairs, "n_pairs", "128", minimum=2)
    seed = as_int(seed, "seed", "0")
    contrastive_pairs = as_int(contrastive_pairs, "contrastive_pairs", "50", minimum=1)
    selection_tokens = as_int(selection_tokens, "selection_tokens", "48", minimum=1)
    selection_batch = as_int(selection_batch, "selection_batch", str(GENERATION_BATCH), minimum=1)
    key = (chosen.score, chosen.direction, n_pairs, seed, selection_tokens, selection_batch, contrastive_pairs, id(base))
    if memo is not None and pairs is None and key in memo:
        raw, details = memo[key]
    elif chosen.score == "attribution":
        raw, details = _attribution(model, base, pairs, n_pairs, seed, selection_tokens, selection_batch, log,
                                    cache_pairs)
    else:
        raw, details = _write(model, base, chosen, contrastive_pairs, log)
    if memo is not None and pairs is None:
        memo[key] = (raw, details)
    details = {**details, "statistic": chosen.statistic} if chosen.score == "attribution" else dict(details)
    return EffectScores(rule, rule_scores(base, rule, raw), details)


def rule_scores(base: NeuronMap, rule: str, raw: Tensor) -> Float[Tensor, "n_stat_layers d_mlp"]:
    """``rule``'s score of every neuron from its raw values: for an attribution rule the per-pair
    attributions ``[n_pairs, n_stat_layers, d_mlp]`` (:func:`per_pair_attribution`), reduced by the rule's
    statistic; for a write rule its scores. ``-inf`` marks what the rule may not pick
    (:func:`candidate_scores`).

    Example:
        >>> rule_scores(dpn_map, "attribution-t", per_pair_attribution(model, dpn_map, pairs))   # doctest: +SKIP
    """
    chosen = rule_named(rule)
    return candidate_scores(base, rule, attribution_statistic(raw, chosen.statistic) if chosen.score == "attribution"
                            else raw)


def candidate_scores(base: NeuronMap, rule: str, scores: Float[Tensor, "n_stat_layers d_mlp"]
                     ) -> Float[Tensor, "n_stat_layers d_mlp"]:
    """``scores`` (a new float32 tensor) with ``-inf`` where ``rule`` may not pick: ``s = 0``, and for
    ``dpn-le-attribution`` outside the dual criterion or with a non-positive score.

    Example:
        >>> candidate_scores(dpn_map, "attribution-t", attribution_statistic(per_pair, "t"))   # doctest: +SKIP
    """
    blocked = base.steering_value == 0                      # an edit of +-gamma * 0 does nothing
    if rule_named(rule).within_dual:
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for layer in base.layers:
            row = base.stat_layers.index(layer)
            allowed[row, torch.cat([base.high[layer], base.low[layer]])] = True
        # Only neurons whose edit moves the margin as asked (to first order) belong to the causal core.
        blocked = blocked | ~allowed | (scores <= 0)
    return torch.where(blocked, torch.full_like(scores, -math.inf), scores).to(torch.float32)


def _layer_thresholds(steering_value: Tensor, stat_layers: Sequence[int], layers: Sequence[int], q: float
                      ) -> dict[int, float]:
    """``tau_q`` of each layer (the q-quantile of |s|), which the studies read beside a map's poles."""
    return {layer: float(torch.quantile(steering_value[stat_layers.index(layer)].abs().double(), q))
            for layer in layers}


def _map_from_scores(base: NeuronMap, rule: str, scores: Tensor, k: int, details: dict[str, Any]) -> NeuronMap:
    rows = list(base.stat_layers)
    candidate_layers = [layer for row, layer in enumerate(rows) if bool(torch.isfinite(scores[row]).any())]
    if not candidate_layers:
        raise ValueError(f"the {rule} rule has no candidate neuron for {base.trait} (every score is -inf); "
                         "for dpn-le-attribution this means no DPN-LE neuron moves the margin as asked")
    chosen = select_top(scores, rows, k)
    high, low = {}, {}
    for layer in candidate_layers:
        indices = chosen.get(layer, torch.zeros(0, dtype=torch.long))
        s = base.steering_value[rows.index(layer), indices]
        high[layer], low[layer] = indices[s > 0], indices[s < 0]
    n_chosen = sum(int(i.numel()) for i in chosen.values())
    reason = (f"{rule}: the top {n_chosen} of {int(torch.isfinite(scores).sum())} candidate neurons by effect score "
              f"(budget {k}); q and tau_d are the DPN-LE map's, kept for reference")
    settings = LocalizationSettings(candidate_layers, base.settings.q, base.settings.tau_d, "effect", reason)
    selection = {**details, "budget": k, "selected": n_chosen, "dual_criterion_neurons": base.n_selected(),
                 "base_layers": base.settings.layer_range, "base_tau_d": base.settings.tau_d}
    return dataclasses.replace(
        base, settings=settings, high=high, low=low,
        tau_q=_layer_thresholds(base.steering_value, rows, candidate_layers, base.settings.q),
        rule=rule, effect_score=scores.to(torch.float32), selection=selection)


def effect_map(base: NeuronMap, scores: EffectScores, budget: int | None = None) -> NeuronMap:
    """The map of ``scores.rule``: the ``budget`` best-scoring neurons, split into poles by the sign of ``s``.

    ``budget`` None: ``default_budget(base)`` (DPN-LE's count, at most 0.5% of the MLP neurons); for
    ``dpn-le-attribution`` every candidate (DPN-LE's neurons with positive attribution), at most that.
    """
    budget = resolved_budget(base, scores.rule, scores.scores, budget)
    return _map_from_scores(base, rule_named(scores.rule).name, scores.scores, budget, scores.details)


def resolved_budget(base: NeuronMap, rule: str, scores: Float[Tensor, "n_stat_layers d_mlp"],
                    budget: int | None = None) -> int:
    """The neuron count :func:`effect_map` keeps for ``rule``: ``budget`` when given, else
    ``default_budget(base)``, and for a rule within the dual criterion at most its candidates (finite scores).

    Example:
        >>> resolved_budget(dpn_map, "attribution-t", scores, 32)     # doctest: +SKIP
        32
    """
    if budget is not None:
        return as_int(budget, "budget (neurons to keep)", minimum=1)
    budget = default_budget(base)
    if rule_named(rule).within_dual:
        budget = max(1, min(budget, int(torch.isfinite(scores).sum())))
    return budget


def select_by_effect(model: Any, base: NeuronMap, rule: str, budget: int | None = None, **score_options: Any
                     ) -> NeuronMap:
    """``effect_map(base, effect_scores(model, base, rule, ...), budget)``: one call from a DPN-LE map to a rule's map.

    Example:
        >>> attribution_map = select_by_effect(model, dpn_map, "attribution")     # doctest: +SKIP
        >>> attribution_map.rule, attribution_map.n_selected() == dpn_map.n_selected()   # doctest: +SKIP
        ('attribution', True)
    """
    if rule == DUAL_CRITERION:
        return base
    return effect_map(base, effect_scores(model, base, rule, **score_options), budget)


def reselect_top(neuron_map: NeuronMap, k: int) -> NeuronMap:
    """An effect map re-selected at budget ``k`` from its stored scores (no model needed).

    Example:
        >>> sparser = reselect_top(attribution_map, 32)      # doctest: +SKIP
        >>> sparser.n_selected()                             # doctest: +SKIP
        32
    """
    if neuron_map.rule == DUAL_CRITERION or neuron_map.effect_score is None:
        raise ValueError("a dual-criterion (dpn-le) map is re-selected by q and tau_d (localize.reselect), not by k")
    details = {key: value for key, value in neuron_map.selection.items()
               if key not in ("budget", "selected", "dual_criterion_neurons", "base_layers", "base_tau_d")}
    result = _map_from_scores(neuron_map, neuron_map.rule, neuron_map.effect_score, k, details)
    result.selection.update({key: neuron_map.selection[key] for key in
                             ("dual_criterion_neurons", "base_layers", "base_tau_d") if key in neuron_map.selection})
    return result
