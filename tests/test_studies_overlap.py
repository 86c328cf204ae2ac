"""Overlap and mutual exclusivity: exact set arithmetic, hypergeometric nulls, representation-level checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import hypergeom

from dpn_lens import locate, LocalizationSettings
from dpn_lens.studies import (
    NeuronSet, alternative_sets, jaccard, layer_matched_pvalue, overlap_coefficient, overlap_matrix, overlap_pvalue,
    pairwise_overlap, per_layer_overlap, pole_exclusivity, pole_sets, steering_correlations,
)
from helpers import make_map, make_stats, random_stats


def test_jaccard_and_overlap_coefficient_of_constructed_sets():
    a = NeuronSet("a", {0: torch.tensor([0, 1, 2, 3]), 1: torch.tensor([5, 6])}, d_mlp=10)
    b = NeuronSet("b", {0: torch.tensor([2, 3, 4]), 1: torch.tensor([6, 7, 8, 9])}, d_mlp=10)
    # shared: (0,2), (0,3), (1,6) -> 3; |a| = 6, |b| = 7, union = 10
    assert jaccard(a, b) == 3 / 10
    assert overlap_coefficient(a, b) == 3 / 6
    assert jaccard(a, b, layers=[1]) == 1 / 5           # {5,6} vs {6,7,8,9}
    assert overlap_coefficient(a, b, layers=[1]) == 1 / 2


def test_overlap_counts_only_layers_both_sets_searched():
    a = NeuronSet("a", {0: torch.tensor([1, 2]), 1: torch.tensor([3])}, d_mlp=10)
    b = NeuronSet("b", {1: torch.tensor([3, 4]), 2: torch.tensor([1, 2])}, d_mlp=10)
    row = pairwise_overlap([a, b])[1]
    assert (row["n_layers"], row["size_a"], row["size_b"], row["overlap"]) == (1, 1, 2, 1)
    assert row["jaccard"] == 1 / 2 and row["overlap_coef"] == 1.0
    assert row["p_value"] == pytest.approx(hypergeom.sf(0, 10, 1, 2))


def test_pole_sets_of_constructed_maps_give_exact_matrices():
    maps = [make_map("openness", {2: [0, 1, 2, 3]}, {2: [4, 5]}, [2, 3]),
            make_map("extraversion", {2: [2, 3, 6], 3: [1]}, {2: [0, 7]}, [2, 3])]
    sets = [s for m in maps for s in pole_sets(m)]
    names = [s.name for s in sets]
    rows = pairwise_overlap(sets)
    jac = overlap_matrix(rows, names, "jaccard")
    coef = overlap_matrix(rows, names, "overlap_coef")
    i = {n: k for k, n in enumerate(names)}
    assert jac[i["openness high"], i["openness low"]] == 0.0                     # disjoint by construction
    assert jac[i["openness high"], i["extraversion high"]] == 2 / (4 + 4 - 2)    # {2,3} shared
    assert coef[i["openness high"], i["extraversion high"]] == 2 / 4
    assert jac[i["openness high"], i["extraversion low"]] == 1 / (4 + 2 - 1)     # {0} shared
    assert coef[i["openness high"], i["extraversion low"]] == 1 / 2
    assert np.allclose(jac, jac.T, equal_nan=True) and np.all(np.diag(jac) == 1.0)


def test_pvalue_equals_scipy_hypergeometric():
    for k, population, size_a, size_b in ((3, 100, 10, 12), (0, 50, 5, 5), (5, 30, 5, 8)):
        assert overlap_pvalue(k, population, size_a, size_b) == pytest.approx(
            hypergeom.sf(k - 1, population, size_a, size_b), rel=1e-12)
    # The pairwise table uses population = shared layers x d_mlp.
    maps = [make_map("openness", {2: [0, 1, 2, 3], 3: [9]}, {}, [2, 3]),
            make_map("extraversion", {2: [2, 3, 6], 3: [9, 10]}, {}, [2, 3])]
    row = [r for r in pairwise_overlap([pole_sets(m)[0] for m in maps]) if r["set_a"] != r["set_b"]][0]
    assert row["p_value"] == pytest.approx(hypergeom.sf(3 - 1, 2 * 20, 5, 5))


def test_pvalue_matches_brute_force_enumeration():
    population, marked, draws = 9, 3, 4
    draws_with = [len(set(c) & set(range(marked))) for c in itertools.combinations(range(population), draws)]
    for k in range(marked + 1):
        expected = sum(x >= k for x in draws_with) / len(draws_with)
        assert overlap_pvalue(k, population, marked, draws) == pytest.approx(expected, rel=1e-12)


def test_layer_matched_pvalue_matches_enumeration_over_layers():
    d_mlp, sizes_a, sizes_b = 6, [2, 1], [3, 2]
    per_layer = [[len(set(c) & set(range(ka))) for c in itertools.combinations(range(d_mlp), kb)]
                 for ka, kb in zip(sizes_a, sizes_b)]
    totals = [x + y for x in per_layer[0] for y in per_layer[1]]
    for k in range(4):
        p, expected = layer_matched_pvalue(k, d_mlp, sizes_a, sizes_b)
        assert p == pytest.approx(sum(t >= k for t in totals) / len(totals), rel=1e-12)
        assert expected == pytest.approx(np.mean(totals))


def test_layer_matched_null_is_less_extreme_when_sets_crowd_the_same_layer():
    # All neurons of both sets in one of 10 layers: a pooled null calls any overlap a miracle.
    a = NeuronSet("a", {l: torch.arange(10) if l == 0 else torch.zeros(0, dtype=torch.long) for l in range(10)}, 100)
    b = NeuronSet("b", {l: torch.arange(5, 15) if l == 0 else torch.zeros(0, dtype=torch.long) for l in range(10)}, 100)
    row = pairwise_overlap([a, b])[1]
    assert row["overlap"] == 5
    assert row["p_value_layer_matched"] > row["p_value"]
    assert row["expected_layer_matched"] == pytest.approx(10 * 10 / 100)
    assert row["expected"] == pytest.approx(10 * 10 / 1000)


def test_per_layer_overlap_rows():
    maps = [make_map("openness", {2: [0, 1], 3: [4]}, {}, [2, 3]), make_map("neuroticism", {2: [1, 5], 3: [6]}, {}, [2, 3])]
    rows = per_layer_overlap([pole_sets(m)[0] for m in maps])
    by_layer = {r["layer"]: r for r in rows}
    assert by_layer[2]["overlap"] == 1 and by_layer[2]["jaccard"] == 1 / 3
    assert by_layer[3]["overlap"] == 0 and by_layer[3]["p_value"] == 1.0


def test_alternative_sets_follow_their_definitions():
    neuron_map = locate(random_stats("openness", 0), LocalizationSettings([2, 3, 4, 5], 0.95, 0.3))
    for layer in neuron_map.layers:
        row = neuron_map.stat_layers.index(layer)
        s, d = neuron_map.steering_value[row], neuron_map.effect_size[row]
        budget = neuron_map.high[layer].numel() + neuron_map.low[layer].numel()
        high, low = alternative_sets(neuron_map, "top|d|")
        chosen = torch.cat([high.neurons[layer], low.neurons[layer]])
        assert chosen.numel() == budget
        assert d[chosen].abs().min() >= torch.topk(d.abs(), budget).values.min()
        high, low = alternative_sets(neuron_map, "|s|-only")
        assert high.layer_size(layer) + low.layer_size(layer) == int((s.abs() > neuron_map.tau_q[layer]).sum())
        assert bool((s[high.neurons[layer]] > 0).all()) and bool((s[low.neurons[layer]] < 0).all())
    dense_high, dense_low = alternative_sets(neuron_map, "q=0.9")   # the map used q=0.95
    sparse_high, sparse_low = pole_sets(neuron_map)
    # A lower q lowers tau_q with the same tau_d: the sparse sets are contained in the dense ones.
    assert sparse_high.pairs() <= dense_high.pairs() and sparse_low.pairs() <= dense_low.pairs()
    with pytest.raises(ValueError, match="unknown set method"):
        alternative_sets(neuron_map, "npti")


def test_pole_exclusivity_measures_activation_beyond_the_sign():
    # Layer 0: neuron 0 fires under high prompts and is silent under low ones (exclusive);
    # neuron 1 has s > 0 only because it is *less negative* under high prompts (not exclusive).
    mean_high = torch.tensor([[2.0, -1.0, 0.0, 0.0]])
    mean_low = torch.tensor([[0.0, -3.0, 0.0, 0.0]])
    stats = make_stats("openness", mean_high, mean_low, variance=1.0)
    neuron_map = make_map("openness", {0: [0, 1]}, {}, [0], n_layers=1, d_mlp=4)
    neuron_map.steering_value = (mean_high - mean_low).float()
    neuron_map.effect_size = ((mean_high - mean_low) / math.sqrt(1.0 + 1e-8)).float()
    high_row = pole_exclusivity(neuron_map, stats, pole_sets(neuron_map))[0]
    assert high_row["n"] == 2 and high_row["frac_sign_consistent"] == 1.0
    assert high_row["frac_own_stronger"] == 0.5                        # only neuron 0
    assert high_row["mean_own"] == pytest.approx((2.0 - 1.0) / 2)
    assert high_row["mean_other"] == pytest.approx((0.0 - 3.0) / 2)
    assert high_row["median_other_over_own"] == pytest.approx(np.median([0.0, 3.0]))
    from scipy.stats import norm

    assert high_row["mean_distribution_overlap"] == pytest.approx(2 * norm.cdf(-2.0 / 2), rel=1e-6)


def test_exclusivity_refuses_statistics_of_another_trait():
    neuron_map = make_map("openness", {0: [0]}, {}, [0], n_layers=1, d_mlp=4)
    stats = make_stats("neuroticism", torch.zeros(1, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="do not belong"):
        pole_exclusivity(neuron_map, stats, pole_sets(neuron_map))


def test_steering_correlations_per_layer():
    a = make_map("openness", {}, {}, [0, 1], n_layers=2, d_mlp=5)
    b = make_map("extraversion", {}, {}, [0, 1], n_layers=2, d_mlp=5)
    base = torch.tensor([[0.1, -0.4, 0.3, 0.9, -0.2], [1.0, 2.0, 0.5, -1.0, 0.0]])
    a.steering_value = base
    b.steering_value = torch.stack([2 * base[0] + 1, -base[1]])
    rows = steering_correlations({"openness": a, "extraversion": b})
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[0]["r"] == pytest.approx(1.0) and rows[1]["r"] == pytest.approx(-1.0)
