"""Bootstrap intervals, paired tests, fraction recovered and the random-neuron control."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from dpn_lens.evaluation.controls import random_neuron_control
from dpn_lens.evaluation.intervals import bootstrap_ci, fraction_recovered, paired_effect
from dpn_lens.steering import Intervention

VALUES = np.array([0.31, -0.12, 0.45, 0.08, 0.27, 0.19, -0.05, 0.52, 0.11, 0.33, 0.02, 0.24])


# (d) the interval is SciPy's percentile bootstrap

@pytest.mark.parametrize("confidence, n_resamples, seed", [(0.95, 2000, 0), (0.9, 500, 7)])
def test_bootstrap_ci_equals_scipy(confidence, n_resamples, seed):
    reference = stats.bootstrap((VALUES,), np.mean, method="percentile", vectorized=True, n_resamples=n_resamples,
                                confidence_level=confidence, random_state=np.random.default_rng(seed))
    low, high = bootstrap_ci(VALUES, confidence, n_resamples, seed)
    assert (low, high) == (reference.confidence_interval.low, reference.confidence_interval.high)


def test_bootstrap_ci_equals_a_hand_written_percentile_bootstrap():
    # SciPy draws the resample indices with rng.integers(0, n, (n_resamples, n)), then takes percentiles.
    rng = np.random.default_rng(3)
    means = VALUES[rng.integers(0, VALUES.size, (1000, VALUES.size))].mean(axis=1)
    expected = np.percentile(means, [2.5, 97.5])
    np.testing.assert_allclose(bootstrap_ci(VALUES, n_resamples=1000, seed=3), expected, rtol=1e-12)


def test_bootstrap_ci_edge_cases():
    assert all(math.isnan(x) for x in bootstrap_ci([0.4]))
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.1, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(VALUES, confidence=95)


def test_paired_effect():
    baseline = np.linspace(-1, 1, VALUES.size)
    effect = paired_effect(baseline + VALUES, baseline)
    assert effect.n == VALUES.size
    assert effect.shift == pytest.approx(VALUES.mean())
    assert (effect.ci_low, effect.ci_high) == tuple(bootstrap_ci(VALUES))
    assert effect.p_value == pytest.approx(stats.wilcoxon(VALUES).pvalue)
    assert effect.p_t == pytest.approx(stats.ttest_rel(baseline + VALUES, baseline).pvalue)
    assert effect.z == pytest.approx(VALUES.mean() / (VALUES.std(ddof=1) / math.sqrt(VALUES.size)))
    assert effect.significant and effect.ci_low > 0
    none = paired_effect(baseline, baseline)
    assert (none.shift, none.p_value, none.significant) == (0.0, 1.0, False)
    with pytest.raises(ValueError, match="same items"):
        paired_effect(VALUES, VALUES[:-1])


def test_fraction_recovered():
    persona = VALUES + 0.3
    half = fraction_recovered(persona / 2, persona)
    assert half.value == pytest.approx(0.5) and half.ci_low == pytest.approx(0.5) and half.ci_high == pytest.approx(0.5)
    effect = VALUES
    result = fraction_recovered(effect, persona, n_resamples=1000, seed=2)
    assert result.value == pytest.approx(effect.mean() / persona.mean())
    # The same items resampled for both: one index draw, the ratio of the two resampled means.
    rng = np.random.default_rng(2)
    index = rng.integers(0, VALUES.size, (1000, VALUES.size))
    ratios = effect[index].mean(axis=1) / persona[index].mean(axis=1)
    np.testing.assert_allclose([result.ci_low, result.ci_high], np.percentile(ratios, [2.5, 97.5]), rtol=1e-12)
    with pytest.raises(ValueError, match="mean is 0"):
        fraction_recovered(VALUES, np.zeros(VALUES.size))


# (e) the random-neuron control

def test_random_neuron_control_keeps_counts_and_values():
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for layer, count in ((2, 5), (4, 1), (6, 0)):
        delta = torch.zeros(64)
        delta[torch.randperm(64, generator=generator)[:count]] = torch.randn(count, generator=generator)
        deltas[layer] = delta
    edit = Intervention(deltas, positions="decode", label="DPN-LE test")
    original = {layer: delta.clone() for layer, delta in deltas.items()}
    control = random_neuron_control(edit, seed=1)
    assert isinstance(control, Intervention) and "random" in control.label
    assert control.positions == edit.positions and control.hook_template == edit.hook_template
    assert sorted(control.deltas) == sorted(edit.deltas)
    moved_somewhere = False
    for layer, delta in edit.deltas.items():
        new = control.deltas[layer]
        assert int((new != 0).sum()) == int((delta != 0).sum())
        assert Counter(new[new != 0].tolist()) == Counter(delta[delta != 0].tolist())
        moved_somewhere |= not torch.equal(torch.nonzero(new), torch.nonzero(delta))
    assert moved_somewhere
    assert torch.equal(control.deltas[2], random_neuron_control(edit, seed=1).deltas[2])  # seeded
    assert not torch.equal(control.deltas[2], random_neuron_control(edit, seed=2).deltas[2])
    assert all(torch.equal(edit.deltas[layer], original[layer]) for layer in original)  # the original is kept
    with pytest.raises(TypeError, match="Intervention"):
        random_neuron_control("not an edit")


def test_an_interval_over_draws_and_pairs_widens_when_draws_disagree():
    """One random draw can flip sign between seeds: the two-level bootstrap must carry that spread."""
    import numpy as np

    from dpn_lens.evaluation.intervals import draws_effect, paired_effect

    rng = np.random.default_rng(0)
    pairs = rng.normal(0.0, 1.0, size=60)
    one = draws_effect(pairs[None, :])
    alone = paired_effect(pairs, np.zeros_like(pairs))
    assert one.shift == alone.shift and one.n == 60
    assert abs((one.ci_high - one.ci_low) - (alone.ci_high - alone.ci_low)) < 0.1 * (alone.ci_high - alone.ci_low)
    # Five draws that agree per pair vs five that differ by a per-draw offset: same mean, wider interval.
    agree = np.tile(pairs, (5, 1))
    offsets = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])[:, None]
    disagree = agree + offsets
    narrow, wide = draws_effect(agree), draws_effect(disagree)
    assert narrow.shift == pytest.approx(wide.shift, abs=1e-12)
    assert (wide.ci_high - wide.ci_low) > 1.5 * (narrow.ci_high - narrow.ci_low)
    with pytest.raises(ValueError, match="NaN"):
        draws_effect(np.array([[0.1, float("nan")]]))
