"""How stable is an attribution rule's selection across its selection pairs? Split-half agreement.

An attribution rule ranks neurons by their first-order effect on the preference margin over selection
pairs (``effect.rules``); the top ``k`` it edits are one draw of that ranking. With too few pairs the
draw is noisy, and a run's verdict can depend on which pairs it drew: on Gemma 3 270M a second seed's
agreeableness selection did not steer while seed 0's did (docs/RESULTS.md). This module measures that
noise from the selection pairs alone, before any steering run and without held-out data:

1. the per-pair attributions are computed once (one gradient pass over the pairs);
2. for each size ``m`` (pairs per half), ``splits`` times, two *disjoint* random sets of ``m`` pairs are
   drawn and every neuron is scored from each with the rule's statistic;
3. agreement of the two halves: the Spearman correlation of their scores over the neurons both may pick,
   the Jaccard overlap of their top-``k`` sets (``k``: the rule's budget), beside the Jaccard two
   random ``k``-sets of the same candidates share by chance, and how one half's top ``k`` fare on the
   other half's pairs: the share whose statistic there is positive (0.5 if the selection were noise) and
   its mean (0 if noise).

The last two see a selection that is enriched for neurons with a real effect even where the top sets
hardly overlap (many neurons with similar small effects: each half picks other ones of them).

The top-``k`` Jaccard at ``m`` pairs per half is how alike two runs that select from ``m`` pairs each
would choose. Its rise with ``m`` says whether more selection pairs (``--selection-pairs``) would settle
the set: a selection that agrees with itself at ``m = n/2`` is limited by something other than noise.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> from dpn_lens import collect_statistics, embedded_contrastive_set, locate
    >>> from dpn_lens.evaluation.preference import PreferencePair
    >>> model = build_tiny_model()
    >>> base = locate(collect_statistics(model, embedded_contrastive_set("openness", 40)), layers=[1, 2, 3], tau_d=0.0)
    >>> pairs = [PreferencePair(f"question {i} ?", "a party with friends .", "a quiet book .") for i in range(16)]
    >>> rows = selection_agreement(model, base, "attribution-t", pairs, budget=4, splits=2)
    >>> [row.pairs_per_half for row in rows], rows[0].budget
    ([8, 4], 4)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float
from scipy.stats import spearmanr
from torch import Tensor

from dpn_lens.effect.rules import (attribution_statistic, candidate_scores, per_pair_attribution, resolved_budget,
                                   rule_named, rule_scores, select_top)
from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.numbers import as_int

__all__ = ["SplitAgreement", "selection_agreement", "agreement_of_halves", "chance_jaccard", "half_sizes"]

MIN_HALF = 4
"""The smallest half: the t statistic of fewer pairs is hardly defined."""


@dataclass(frozen=True)
class SplitAgreement:
    """How alike two disjoint halves of ``pairs_per_half`` selection pairs score and select, over ``splits`` draws.

    Attributes:
        trait, rule: what was selected, by which rule.
        pairs_per_half: selection pairs in each half.
        splits: random splits averaged (each a pair of disjoint halves).
        budget: ``k``, the neurons each half's selection keeps.
        candidates: neurons both halves may pick (finite scores), averaged over splits.
        spearman: mean Spearman correlation of the two halves' scores over those candidates.
        jaccard, jaccard_min, jaccard_max: mean, smallest and largest Jaccard overlap of the halves' top-k sets.
        jaccard_chance: the Jaccard two random k-sets of the candidates share on average.
        replicated_sign: share of one half's top k whose statistic on the other half's pairs is positive
            (both ways, averaged; 0.5 for a selection of noise).
        replicated_score: their mean statistic on the other half's pairs (0 for noise; a t statistic for
            ``attribution-t``).
    """

    trait: str
    rule: str
    pairs_per_half: int
    splits: int
    budget: int
    candidates: float
    spearman: float
    jaccard: float
    jaccard_min: float
    jaccard_max: float
    jaccard_chance: float
    replicated_sign: float = math.nan
    replicated_score: float = math.nan

    def to_dict(self) -> dict[str, object]:
        """A table row.

        Example:
            >>> SplitAgreement("openness", "attribution-t", 64, 4, 80, 36000.0, .3, .2, .1, .3, .001).to_dict()["jaccard"]
            0.2
        """
        return asdict(self)


def chance_jaccard(k: int, candidates: int) -> float:
    """Expected Jaccard overlap of two independent uniform ``k``-subsets of ``candidates`` items.

    The overlap ``X`` is hypergeometric, so the expectation of ``X / (2k - X)`` is summed over its law.

    Example:
        >>> chance_jaccard(2, 2), round(chance_jaccard(1, 4), 3)
        (1.0, 0.25)
    """
    from scipy.stats import hypergeom

    k, candidates = int(k), int(candidates)
    if candidates <= 0 or k <= 0:
        return math.nan
    k = min(k, candidates)
    overlaps = np.arange(max(0, 2 * k - candidates), k + 1)
    law = hypergeom(candidates, k, k).pmf(overlaps)
    return float(np.sum(law * overlaps / (2 * k - overlaps)))


def half_sizes(n_pairs: int) -> list[int]:
    """Pairs per half measured for ``n_pairs`` selection pairs: ``n/2``, ``n/4``, ... down to ``MIN_HALF``.

    Example:
        >>> half_sizes(512), half_sizes(8), half_sizes(7)
        ([256, 128, 64, 32, 16, 8, 4], [4], [])
    """
    sizes, size = [], n_pairs // 2
    while size >= MIN_HALF:
        sizes.append(size)
        size //= 2
    return sizes


def _top_set(scores: Float[Tensor, "n_rows d_mlp"], rows: Sequence[int], k: int) -> set[int]:
    width = scores.shape[1]
    return {rows.index(row) * width + int(i) for row, indices in select_top(scores, rows, k).items() for i in indices}


def agreement_of_halves(base: NeuronMap, rule: str, first: Float[Tensor, "m n_rows d_mlp"],
                        second: Float[Tensor, "m n_rows d_mlp"], budget: int) -> tuple[float, float, int, float, float]:
    """``(spearman, jaccard, candidates, replicated_sign, replicated_score)`` of one split: the rule's
    scores from each half's per-pair attributions, compared over the neurons both may pick, and each
    half's top ``budget`` read on the other half (``SplitAgreement``).

    Example:
        >>> agreement_of_halves(dpn_map, "attribution-t", per_pair[:64], per_pair[64:128], 80)   # doctest: +SKIP
        (0.21, 0.14, 36810, 0.71, 1.3)
    """
    # Each half's statistic once: masked, it ranks that half's top k; unmasked, it reads the other half's
    # top k (a dpn-le-attribution neuron with a negative score there is a failed replication, not a
    # missing one).
    statistic = rule_named(rule).statistic
    stat_one, stat_two = attribution_statistic(first, statistic), attribution_statistic(second, statistic)
    one, two = candidate_scores(base, rule, stat_one), candidate_scores(base, rule, stat_two)
    both = torch.isfinite(one) & torch.isfinite(two)
    candidates = int(both.sum())
    if candidates < 2:
        return math.nan, math.nan, candidates, math.nan, math.nan
    rho = float(spearmanr(one[both].double().numpy(), two[both].double().numpy()).statistic)
    rows = list(base.stat_layers)
    top_one, top_two = _top_set(one, rows, budget), _top_set(two, rows, budget)
    union = top_one | top_two
    held = torch.cat([stat_two.flatten()[sorted(top_one)], stat_one.flatten()[sorted(top_two)]]).double()
    return (rho, (len(top_one & top_two) / len(union) if union else math.nan), candidates,
            float((held > 0).double().mean()) if held.numel() else math.nan,
            float(held.mean()) if held.numel() else math.nan)


def selection_agreement(model: Any, base: NeuronMap, rule: str, pairs: Sequence[Any], budget: int | None = None,
                        sizes: Sequence[int] | None = None, splits: int = 4, seed: int = 0,
                        per_pair: Tensor | None = None) -> list[SplitAgreement]:
    """Split-half agreement of ``rule``'s selection from ``pairs`` (module note), one row per half size.

    Args:
        model: the model ``base`` was located on.
        base: the trait's DPN-LE map (its ``s`` is the edit whose effect is attributed).
        rule: an attribution rule (``attribution``, ``attribution-t``, ``dpn-le-attribution``).
        pairs: the selection pairs (``effect.pairs.selection_pairs``).
        budget: ``k`` (None: the rule's default budget for ``base``, as a run selects it).
        sizes: pairs per half (None: ``half_sizes(len(pairs))``); each at most ``len(pairs) // 2``.
        splits: random splits per size.
        seed: seed of the splits.
        per_pair: the pairs' per-pair attributions, if already computed (else one gradient pass now).

    Raises:
        ValueError: for a rule that reads no selection pairs, too few pairs, or a size that does not fit.
    """
    if rule_named(rule).score != "attribution":
        raise ValueError(f"{rule!r} reads no selection pairs; split-half agreement needs an attribution rule "
                         "(attribution, attribution-t or dpn-le-attribution)")
    splits = as_int(splits, "splits", "4", minimum=1)
    n = len(pairs)
    sizes = half_sizes(n) if sizes is None else [as_int(size, "pairs per half", "64", minimum=2) for size in sizes]
    if not sizes:
        raise ValueError(f"{n} selection pairs (those kept: pairs with identical or empty answers are dropped) "
                         f"cannot be split into two halves of at least {MIN_HALF}; draw more (--selection-pairs)")
    if max(sizes) > n // 2:
        raise ValueError(f"a half of {max(sizes)} pairs needs {2 * max(sizes)} selection pairs; got {n}")
    if per_pair is None:
        per_pair = per_pair_attribution(model, base, pairs)
    if per_pair.shape[0] != n:
        raise ValueError(f"per_pair holds {per_pair.shape[0]} pairs, not the {n} given")
    full = rule_scores(base, rule, per_pair)
    k = resolved_budget(base, rule, full, budget)
    generator = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        found = []
        for _ in range(splits):
            order = generator.permutation(n)
            found.append(agreement_of_halves(base, rule, per_pair[order[:size]], per_pair[order[size:2 * size]], k))
        rhos, jaccards, counts, signs, held = (np.array(values, dtype=float) for values in zip(*found))
        rows.append(SplitAgreement(
            trait=base.trait, rule=rule, pairs_per_half=size, splits=splits, budget=k,
            candidates=float(counts.mean()), spearman=float(np.nanmean(rhos)), jaccard=float(np.nanmean(jaccards)),
            jaccard_min=float(np.nanmin(jaccards)), jaccard_max=float(np.nanmax(jaccards)),
            jaccard_chance=chance_jaccard(k, int(round(counts.mean()))),
            replicated_sign=float(np.nanmean(signs)), replicated_score=float(np.nanmean(held))))
    return rows
