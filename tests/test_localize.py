"""Localization: the dual criterion, its brute-force reference, and the settings around it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpn_lens.collection.collect import CollectionConfig
from dpn_lens import (ContrastiveSet, GroupStatistics, ContrastStatistics, LocalizationSettings, cohens_d,
                      collect_statistics, locate, propose_settings, select_neurons, steering_values)
from dpn_lens.localization.localize import reference_settings
from helpers import brute_force_selection, random_prompts


def synthetic_stats(seed: int = 0, n_layers: int = 3, d_mlp: int = 400, n: int = 40, signal: int = 12
                    ) -> ContrastStatistics:
    """Noise everywhere, plus ``signal`` neurons per layer whose high and low means differ."""
    rng = np.random.default_rng(seed)
    high = rng.normal(size=(n, n_layers, d_mlp)).astype(np.float32)
    low = rng.normal(size=(n, n_layers, d_mlp)).astype(np.float32)
    shift = np.zeros((n_layers, d_mlp), dtype=np.float32)
    for layer in range(n_layers):
        neurons = rng.choice(d_mlp, size=signal, replace=False)
        shift[layer, neurons] = rng.choice([-3.0, -1.0, 1.0, 3.0], size=signal)
    groups = []
    for rows in (high + shift / 2, low - shift / 2):
        stats = GroupStatistics.empty(n_layers, d_mlp)
        stats.update(torch.from_numpy(rows))
        groups.append(stats)
    return ContrastStatistics("conscientiousness", groups[0], groups[1], layers=list(range(5, 5 + n_layers)))


@pytest.fixture(scope="module")
def tiny_stats(tiny_model):
    pairs = ContrastiveSet("openness", random_prompts(10, 16), random_prompts(11, 16), source="tests")
    return collect_statistics(tiny_model, pairs, CollectionConfig(max_batch_size=8, progress=False))


@pytest.mark.parametrize("q", [0.5, 0.8, 0.9, 0.97, 0.995])
@pytest.mark.parametrize("tau_d", [0.0, 0.2, 0.5, 0.8])
def test_selection_equals_brute_force_reference(q, tau_d, tiny_stats):
    for stats in (synthetic_stats(), tiny_stats):
        s, d = steering_values(stats).numpy(), cohens_d(stats).numpy()
        for row in range(s.shape[0]):
            high, low, tau_q = select_neurons(torch.from_numpy(s[row]), torch.from_numpy(d[row]), q, tau_d)
            ref_high, ref_low, ref_tau = brute_force_selection(s[row], d[row], q, tau_d)
            assert high.tolist() == ref_high and low.tolist() == ref_low
            assert math.isclose(tau_q, ref_tau, rel_tol=1e-12)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.995])
def test_poles_are_disjoint_and_at_most_1_minus_q_of_a_layer_is_selected(q, tiny_stats):
    for stats in (synthetic_stats(seed=1), tiny_stats):
        neuron_map = locate(stats, q=q, tau_d=0.0, layers=stats.layers)
        n = neuron_map.d_mlp
        # |s| > quantile(|s|, q) with linear interpolation leaves at most n-1-floor(q(n-1)) neurons,
        # which is (1-q) of the layer up to one neuron of rounding.
        cap = n - 1 - math.floor(q * (n - 1))
        assert cap <= (1 - q) * n + 1
        for layer in neuron_map.layers:
            high, low = set(neuron_map.high[layer].tolist()), set(neuron_map.low[layer].tolist())
            assert not high & low
            assert len(high) + len(low) <= cap
            s, d = neuron_map.values_at(layer, neuron_map.high[layer])
            assert (s > 0).all() and (d > 0).all()  # the high pole: more active under the high persona
            s, d = neuron_map.values_at(layer, neuron_map.low[layer])
            assert (s < 0).all() and (d < 0).all()


def test_signal_neurons_are_found_in_synthetic_data():
    stats = synthetic_stats(seed=2, signal=4)
    neuron_map = locate(stats, q=0.99, tau_d=0.8, layers=stats.layers)
    s = steering_values(stats)
    for row, layer in enumerate(stats.layers):
        planted = set(torch.nonzero(s[row].abs() > 0.8).flatten().tolist())
        found = set(neuron_map.high[layer].tolist()) | set(neuron_map.low[layer].tolist())
        assert found and found <= planted


def test_zero_variance_neurons_give_d_zero_and_are_never_selected():
    rng = np.random.default_rng(3)
    high, low = rng.normal(size=(30, 1, 20)).astype(np.float32), rng.normal(size=(25, 1, 20)).astype(np.float32)
    high[:, 0, :4] = low[:, 0, :4] = np.array([0.0, 0.7, -2.3, 1e-3], dtype=np.float32)  # constant, e.g. dead
    groups = []
    for rows, batch in ((high, 7), (low, 4)):
        stats = GroupStatistics.empty(1, 20)
        for start in range(0, rows.shape[0], batch):
            stats.update(torch.from_numpy(rows[start:start + batch]))
        groups.append(stats)
    stats = ContrastStatistics("agreeableness", groups[0], groups[1], layers=[0])
    d = cohens_d(stats)
    assert torch.isfinite(d).all()
    assert (d[0, :4] == 0).all() and (steering_values(stats)[0, :4] == 0).all()
    for q in (0.1, 0.5, 0.9):
        neuron_map = locate(stats, q=q, tau_d=0.0, layers=[0])
        assert not {0, 1, 2, 3} & set(neuron_map.high[0].tolist() + neuron_map.low[0].tolist())


def test_neurons_held_constant_in_the_model_get_d_zero(tiny_model):
    """End to end: an upstream hook pins neurons 0-4 of layer 1 (as dead neurons are)."""
    def pin(activation, hook):
        activation = activation.clone()
        activation[..., :3] = 0.0
        activation[..., 3:5] = 0.25
        return activation

    pairs = ContrastiveSet("openness", random_prompts(12, 10), random_prompts(13, 10))
    with tiny_model.hooks(fwd_hooks=[("blocks.1.mlp.hook_post", pin)]):
        stats = collect_statistics(tiny_model, pairs, CollectionConfig(layers=[1], max_batch_size=3, progress=False))
    d = cohens_d(stats)
    assert torch.isfinite(d).all() and (d[0, :5] == 0).all() and (d[0, 5:] != 0).all()
    neuron_map = locate(stats, q=0.05, tau_d=0.0, layers=[1])
    assert not set(range(5)) & set(neuron_map.high[1].tolist() + neuron_map.low[1].tolist())


def test_cohens_d_needs_two_samples_per_pole():
    one = GroupStatistics.empty(1, 4)
    one.update(torch.ones(1, 1, 4))
    two = GroupStatistics.empty(1, 4)
    two.update(torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="at least 2 samples per pole"):
        cohens_d(ContrastStatistics("openness", one, two, layers=[0]))


def test_reference_settings_for_the_papers_models():
    llama = reference_settings("meta-llama/Meta-Llama-3-8B-Instruct")
    assert (llama.layers, llama.q, llama.tau_d) == (list(range(12, 32)), 0.995, 0.8)
    qwen = reference_settings("/models/qwen2.5-7b-instruct/")
    assert (qwen.layers[0], qwen.layers[-1], qwen.tau_d) == (14, 27, 0.3)
    assert reference_settings("gpt2") is None


def test_propose_settings_derives_layers_and_tau_d_from_data_and_says_why(tiny_stats):
    proposed = propose_settings(synthetic_stats(seed=4))
    assert proposed.source == "proposed" and proposed.layers and "tau_d" in proposed.reason
    assert set(proposed.layers) <= {5, 6, 7} and proposed.layers == list(range(proposed.layers[0], 8))
    from scipy.stats import norm

    # Never below the effect size that pure noise reaches somewhere among all tested neurons.
    chance = norm.ppf(1 - 0.05 / (len(proposed.layers) * 400)) * math.sqrt(1 / 40 + 1 / 40)
    assert proposed.tau_d >= round(chance, 3) > 0.2
    neuron_map = locate(tiny_stats)  # no reference settings for the tiny model: proposed from the data
    assert neuron_map.settings.source == "proposed"


def test_locate_overrides_and_refuses_layers_that_were_not_collected(tiny_stats):
    neuron_map = locate(tiny_stats, q=0.9, tau_d=0.3, layers=[2, 3])
    assert neuron_map.layers == [2, 3] and neuron_map.settings.q == 0.9 and neuron_map.settings.tau_d == 0.3
    with pytest.raises(ValueError, match=r"layers \[7\] were not collected"):
        locate(tiny_stats, layers=[3, 7])


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=[1], q=1.0), "q must lie strictly between 0 and 1"),
    (dict(layers=[1], q=0.0), "q must lie strictly between 0 and 1"),
    (dict(layers=[1], tau_d=float("nan")), "tau_d must be a finite number"),
    (dict(layers=[1], tau_d=-0.5), "tau_d must be a finite non-negative"),
    (dict(layers=[]), "at least one layer"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalizationSettings(**kwargs)


def test_a_fully_overridden_locate_records_the_values_used_not_a_proposal(tiny_stats, monkeypatch):
    import dpn_lens.localization.localize as localize

    def no_proposal(*args, **kwargs):
        raise AssertionError("propose_settings must not run when layers, q and tau_d are all given")

    monkeypatch.setattr(localize, "propose_settings", no_proposal)
    neuron_map = locate(tiny_stats, q=0.9, tau_d=0.2, layers=[1, 2, 3])
    assert (neuron_map.settings.layers, neuron_map.settings.q, neuron_map.settings.tau_d) == ([1, 2, 3], 0.9, 0.2)
    assert neuron_map.settings.source == "user"
    assert neuron_map.settings.reason == "set by the caller: layers=1-3, q=0.9, tau_d=0.2"


def test_reselect_at_the_maps_own_q_gives_the_same_poles(tiny_stats):
    from dpn_lens.localization.localize import reselect

    neuron_map = locate(tiny_stats, q=0.9, tau_d=0.3, layers=[1, 2, 3])
    same = reselect(neuron_map, q=0.9)
    again = reselect(neuron_map)
    for other in (same, again):
        for layer in neuron_map.layers:
            assert torch.equal(other.high[layer], neuron_map.high[layer])
            assert torch.equal(other.low[layer], neuron_map.low[layer])
            # the map keeps s in float32 (locate thresholds the float64 s): tau_q agrees to float32 precision
            assert other.tau_q[layer] == pytest.approx(neuron_map.tau_q[layer], rel=1e-6)


def test_reselect_equals_locating_again_at_the_new_thresholds(tiny_stats):
    from dpn_lens.localization.localize import reselect

    neuron_map = locate(tiny_stats, q=0.95, tau_d=0.3, layers=[1, 2, 3])
    for q, tau_d in ((0.8, None), (None, 0.1), (0.9, 0.5)):
        moved = reselect(neuron_map, q=q, tau_d=tau_d)
        fresh = locate(tiny_stats, q=q if q is not None else 0.95, tau_d=tau_d if tau_d is not None else 0.3,
                       layers=[1, 2, 3])
        assert (moved.settings.q, moved.settings.tau_d, moved.settings.source) == (
            fresh.settings.q, fresh.settings.tau_d, "user")
        for layer in neuron_map.layers:
            assert torch.equal(moved.high[layer], fresh.high[layer]) and torch.equal(moved.low[layer], fresh.low[layer])
        assert torch.equal(moved.steering_value, neuron_map.steering_value)
