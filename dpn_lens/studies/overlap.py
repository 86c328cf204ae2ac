"""Overlap and mutual exclusivity of personality neuron sets.

Three views:

* **Set overlap** between pole sets (e.g. the ten sets of 5 traits x high/low): Jaccard
  ``|A & B| / |A | B|`` and overlap coefficient ``|A & B| / min(|A|, |B|)``, overall and per layer.
  Only the layers both sets were searched in count (a set cannot overlap another in a layer the other
  never looked at).
* **Significance** against size-matched random sets. ``p_value`` is the hypergeometric tail
  ``P(X >= observed)`` with population = all neurons of the shared layers, ``K = |A|``, draws ``|B|``
  (``scipy.stats.hypergeom``). Because DPN-LE takes at most a fraction (1 - q) of *each* layer, sets are
  not uniform over layers; ``p_value_layer_matched`` therefore also gives the exact tail of the sum of
  independent per-layer hypergeometrics (random sets with the same count in every layer), by convolving
  the per-layer distributions. When two sets crowd into the same layers the pooled p-value is too small;
  the layer-matched one is the honest null.
* **Representation-level exclusivity** within a trait, from the contrast statistics: where a pole's
  neurons sit under the other pole's prompts (mean activation under high vs low prompts, d), for DPN-LE
  and for sets chosen without the dual criterion (``sets.alternative_sets``). And across traits, the
  Pearson correlation of the steering vectors ``s`` per layer.

Example:
    >>> sets = [s for m in run.maps.values() for s in pole_sets(m)]     # doctest: +SKIP
    >>> rows = pairwise_overlap(sets)                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy.stats import hypergeom, norm

from dpn_lens.localization.localize import select_neurons
from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.collection.statistics import ContrastStatistics
from dpn_lens.studies.section import ReportSection
from dpn_lens.studies.sets import NeuronSet

__all__ = [
    "shared_layers", "jaccard", "overlap_coefficient", "overlap_pvalue", "layer_matched_pvalue",
    "pairwise_overlap", "per_layer_overlap", "overlap_matrix", "pole_exclusivity", "exclusivity_points",
    "steering_correlations", "REPORT_SECTION",
]

REPORT_SECTION = ReportSection("overlap", "Overlap and mutual exclusivity")
"""Where ``dpn-lens report`` shows this study's files (all named ``overlap_*``)."""


def shared_layers(a: NeuronSet, b: NeuronSet) -> list[int]:
    """Layers present in both sets (the layers both were searched in)."""
    if a.d_mlp != b.d_mlp:
        raise ValueError(f"sets {a.name!r} and {b.name!r} come from models of different widths ({a.d_mlp} vs {b.d_mlp})")
    return sorted(set(a.layers) & set(b.layers))


def _sizes(a: NeuronSet, b: NeuronSet, layers: Sequence[int]) -> tuple[int, int, int]:
    pa, pb = a.pairs(layers), b.pairs(layers)
    return len(pa), len(pb), len(pa & pb)


def jaccard(a: NeuronSet, b: NeuronSet, layers: Sequence[int] | None = None) -> float:
    """``|A & B| / |A | B|`` over ``layers`` (default: the shared layers); NaN when both are empty.

    Example:
        >>> a = NeuronSet("a", {0: torch.tensor([1, 2, 3])}, 8); b = NeuronSet("b", {0: torch.tensor([3, 4])}, 8)
        >>> jaccard(a, b)
        0.25
    """
    layers = shared_layers(a, b) if layers is None else layers
    n_a, n_b, n_ab = _sizes(a, b, layers)
    union = n_a + n_b - n_ab
    return n_ab / union if union else float("nan")


def overlap_coefficient(a: NeuronSet, b: NeuronSet, layers: Sequence[int] | None = None) -> float:
    """``|A & B| / min(|A|, |B|)`` over ``layers`` (default: the shared layers); NaN when one is empty."""
    layers = shared_layers(a, b) if layers is None else layers
    n_a, n_b, n_ab = _sizes(a, b, layers)
    smaller = min(n_a, n_b)
    return n_ab / smaller if smaller else float("nan")


def overlap_pvalue(overlap: int, population: int, size_a: int, size_b: int) -> float:
    """``P(X >= overlap)`` for ``X ~ Hypergeometric(population, size_a, size_b)``.

    Example:
        >>> round(overlap_pvalue(2, 10, 3, 3), 4)       # P(X >= 2) drawing 3 of 10 with 3 marked
        0.1833
    """
    if not 0 <= size_a <= population or not 0 <= size_b <= population:
        raise ValueError(f"set sizes {size_a}, {size_b} must lie within the population {population}")
    return float(hypergeom.sf(overlap - 1, population, size_a, size_b))


def layer_matched_pvalue(overlap: int, d_mlp: int, sizes_a: Sequence[int], sizes_b: Sequence[int]
                         ) -> tuple[float, float]:
    """``(P(X >= overlap), E[X])`` for X = sum over layers of independent hypergeometrics.

    Layer ``l`` contributes ``Hypergeometric(d_mlp, sizes_a[l], sizes_b[l])``: random sets with the same
    number of neurons per layer as the observed ones. The distribution of the sum is the convolution
    of the per-layer distributions (exact, no simulation).
    """
    if len(sizes_a) != len(sizes_b):
        raise ValueError("sizes_a and sizes_b need one entry per layer")
    pmf = np.ones(1)
    expected = 0.0
    for k_a, k_b in zip(sizes_a, sizes_b):
        support = np.arange(min(k_a, k_b) + 1)
        pmf = np.convolve(pmf, hypergeom.pmf(support, d_mlp, k_a, k_b))
        expected += k_a * k_b / d_mlp
    tail = float(min(1.0, pmf[overlap:].sum())) if overlap < pmf.size else 0.0
    return tail, expected


def pairwise_overlap(sets: Sequence[NeuronSet]) -> list[dict]:
    """One row per unordered pair (and each set with itself): sizes, overlap, Jaccard, overlap
    coefficient, expected overlap and p-values under the pooled and the layer-matched null.

    ``p_bonferroni`` multiplies the layer-matched p-value by the number of distinct pairs tested.
    """
    rows = []
    n_pairs = len(sets) * (len(sets) - 1) // 2
    for i, a in enumerate(sets):
        for b in sets[i:]:
            layers = shared_layers(a, b)
            n_a, n_b, n_ab = _sizes(a, b, layers)
            population = len(layers) * a.d_mlp
            row = {"set_a": a.name, "set_b": b.name, "n_layers": len(layers), "size_a": n_a, "size_b": n_b,
                   "overlap": n_ab, "jaccard": jaccard(a, b, layers), "overlap_coef": overlap_coefficient(a, b, layers)}
            if a is b or not layers:
                row.update(expected=float("nan"), p_value=float("nan"), expected_layer_matched=float("nan"),
                           p_value_layer_matched=float("nan"), p_bonferroni=float("nan"))
            else:
                p_matched, expected_matched = layer_matched_pvalue(
                    n_ab, a.d_mlp, [a.layer_size(l) for l in layers], [b.layer_size(l) for l in layers])
                row.update(expected=n_a * n_b / population, p_value=overlap_pvalue(n_ab, population, n_a, n_b),
                           expected_layer_matched=expected_matched, p_value_layer_matched=p_matched,
                           p_bonferroni=min(1.0, p_matched * max(n_pairs, 1)))
            rows.append(row)
    return rows


def per_layer_overlap(sets: Sequence[NeuronSet]) -> list[dict]:
    """Per distinct pair and shared layer: sizes, overlap, Jaccard, overlap coefficient, p-value."""
    rows = []
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            for layer in shared_layers(a, b):
                n_a, n_b, n_ab = _sizes(a, b, [layer])
                rows.append({"set_a": a.name, "set_b": b.name, "layer": layer, "size_a": n_a, "size_b": n_b,
                             "overlap": n_ab, "jaccard": n_ab / (n_a + n_b - n_ab) if n_a + n_b - n_ab else float("nan"),
                             "overlap_coef": n_ab / min(n_a, n_b) if min(n_a, n_b) else float("nan"),
                             "p_value": overlap_pvalue(n_ab, a.d_mlp, n_a, n_b)})
    return rows


def overlap_matrix(rows: Sequence[dict], names: Sequence[str], key: str = "jaccard") -> np.ndarray:
    """Symmetric ``[len(names), len(names)]`` matrix of ``key`` from ``pairwise_overlap`` rows."""
    index = {name: i for i, name in enumerate(names)}
    matrix = np.full((len(names), len(names)), np.nan)
    for row in rows:
        if row["set_a"] in index and row["set_b"] in index:
            i, j = index[row["set_a"]], index[row["set_b"]]
            matrix[i, j] = matrix[j, i] = row[key]
    return matrix


def _check_pair(neuron_map: NeuronMap, stats: ContrastStatistics) -> None:
    if neuron_map.trait != stats.trait or list(neuron_map.stat_layers) != list(stats.layers):
        raise ValueError(f"the statistics ({stats.trait}, layers {stats.layers[0]}..{stats.layers[-1]}) do not belong "
                         f"to the {neuron_map.trait} map (layers {neuron_map.stat_layers[0]}..{neuron_map.stat_layers[-1]}); "
                         "load both from the same run folder")


def exclusivity_points(neuron_map: NeuronMap, stats: ContrastStatistics, sets: Sequence[NeuronSet]) -> list[dict]:
    """One row per neuron of each set: its mean activation under high and under low prompts, d and s."""
    _check_pair(neuron_map, stats)
    rows = []
    for neuron_set in sets:
        for layer, indices in neuron_set.neurons.items():
            row = neuron_map.stat_layers.index(layer)
            mu_h, mu_l = stats.high.mean[row, indices].tolist(), stats.low.mean[row, indices].tolist()
            s, d = neuron_map.values_at(layer, indices)
            rows += [{"trait": neuron_set.trait, "method": neuron_set.method, "pole": neuron_set.pole,
                      "layer": layer, "neuron": int(i), "d": float(di), "s": float(si), "mean_high": h, "mean_low": l}
                     for i, si, di, h, l in zip(indices.tolist(), s.tolist(), d.tolist(), mu_h, mu_l)]
    return rows


def _tau_q(neuron_map: NeuronMap, layers: Sequence[int]) -> dict[int, float]:
    """The map's |s| threshold per layer. Sets chosen over all layers (NPTI) reach layers the map did not
    search; there it is the threshold the map's q would have given (``select_neurons`` on that layer)."""
    result = {}
    for layer in layers:
        if layer in neuron_map.tau_q:
            result[layer] = float(neuron_map.tau_q[layer])
        else:
            row = neuron_map.stat_layers.index(layer)
            result[layer] = select_neurons(neuron_map.steering_value[row].double(), neuron_map.effect_size[row].double(),
                                           neuron_map.settings.q, neuron_map.settings.tau_d)[2]
    return result


def pole_exclusivity(neuron_map: NeuronMap, stats: ContrastStatistics, sets: Sequence[NeuronSet]) -> list[dict]:
    """Per set: how exclusively its neurons respond to their own pole (the paper's claim 3, measured).

    Columns (``own`` = the set's pole, ``other`` = the opposite pole's prompts):

    * ``mean_own``, ``mean_other``: mean activation of the set's neurons under each pole's prompts;
    * ``frac_sign_consistent``: fraction whose d points to the set's pole (1 for DPN-LE by construction);
    * ``frac_own_stronger``: fraction with ``|mean_own| > |mean_other|``, i.e. the neuron is more active
      (not merely less negative) under its own pole: *not* implied by the selection;
    * ``median_other_over_own``: median of ``|mean_other| / |mean_own|`` (0 = silent under the other pole);
    * ``median_abs_d``, ``frac_weak_d`` (``|d| <= tau_d``), ``frac_small_s`` (``|s| <= tau_q``; in a layer
      the map did not search, tau_q is its q-quantile of |s| there);
    * ``mean_distribution_overlap``: mean of ``2 * Phi(-|d| / 2)``, the overlap of two normal
      distributions d apart (1 = indistinguishable, 0 = fully separated).
    """
    rows = []
    points = exclusivity_points(neuron_map, stats, sets)
    thresholds = _tau_q(neuron_map, sorted({p["layer"] for p in points}))
    for neuron_set in sets:
        mine = [p for p in points if p["method"] == neuron_set.method and p["pole"] == neuron_set.pole]
        sign = 1.0 if neuron_set.pole == "high" else -1.0
        row = {"trait": neuron_set.trait, "method": neuron_set.method, "pole": neuron_set.pole, "n": len(mine)}
        if not mine:
            rows.append(row | {k: float("nan") for k in ("mean_own", "mean_other", "frac_sign_consistent",
                                                         "frac_own_stronger", "median_other_over_own", "median_abs_d",
                                                         "frac_weak_d", "frac_small_s", "mean_distribution_overlap")})
            continue
        own = np.array([p["mean_high"] if sign > 0 else p["mean_low"] for p in mine])
        other = np.array([p["mean_low"] if sign > 0 else p["mean_high"] for p in mine])
        d = np.array([p["d"] for p in mine])
        s = np.array([p["s"] for p in mine])
        tau_q = np.array([thresholds[p["layer"]] for p in mine])
        row.update(mean_own=float(own.mean()), mean_other=float(other.mean()),
                   frac_sign_consistent=float((sign * d > 0).mean()),
                   frac_own_stronger=float((np.abs(own) > np.abs(other)).mean()),
                   median_other_over_own=float(np.median(np.abs(other) / np.maximum(np.abs(own), 1e-12))),
                   median_abs_d=float(np.median(np.abs(d))),
                   frac_weak_d=float((np.abs(d) <= neuron_map.settings.tau_d).mean()),
                   frac_small_s=float((np.abs(s) <= tau_q).mean()),
                   mean_distribution_overlap=float((2 * norm.cdf(-np.abs(d) / 2)).mean()))
        rows.append(row)
    return rows


def steering_correlations(maps: dict[str, NeuronMap]) -> list[dict]:
    """Pearson correlation of the steering vectors ``s`` of two traits, per layer both collected."""
    rows = []
    traits = list(maps)
    for i, a in enumerate(traits):
        for b in traits[i + 1:]:
            map_a, map_b = maps[a], maps[b]
            for layer in sorted(set(map_a.stat_layers) & set(map_b.stat_layers)):
                s_a = map_a.steering_value[map_a.stat_layers.index(layer)].double()
                s_b = map_b.steering_value[map_b.stat_layers.index(layer)].double()
                r = torch.corrcoef(torch.stack([s_a, s_b]))[0, 1].item()
                rows.append({"trait_a": a, "trait_b": b, "layer": layer, "r": r if math.isfinite(r) else float("nan"),
                             "searched": layer in map_a.layers and layer in map_b.layers})
    return rows
