"""Selection by effect: attribution is the margin's first-order change, the write score is W_out . u,
selection is deterministic, and a map says which rule made it and is never taken for another rule's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import attached_hooks

from dpn_lens import NeuronMap, WrongRuleError, collect_statistics, embedded_contrastive_set, locate, reselect
from dpn_lens.effect.gradients import margin_gradients, write_gradients
from dpn_lens.effect.rules import default_budget, effect_map, effect_scores, select_top
from dpn_lens.evaluation.preference import PreferencePair, preference_margins
from dpn_lens.export import residual_vectors
from dpn_lens.steering import Intervention

PAIRS = [
    PreferencePair("what would you do on the weekend ?", "a party with a friend . i am outgoing !", "a book at home ."),
    PreferencePair("how would you feel about work ?", "i love new ideas and travel .", "i prefer routine and quiet ."),
    PreferencePair("what would you do at a party ?", "talk to everyone !", "stay calm and quiet , reserved ."),
]


@pytest.fixture(scope="module")
def base_map(tiny_model):
    stats = collect_statistics(tiny_model, embedded_contrastive_set("openness", 40))
    return locate(stats, layers=[1, 2, 3], tau_d=0.0)


def test_attribution_equals_the_finite_difference_effect_of_each_neurons_edit(tiny_model):
    # float32 tiny model and float32 log-probabilities; central difference. The step balances the O(h^2)
    # term against rounding, which the difference divides by 2h: the margins carry ~1e-7 to 1e-6 of float32
    # rounding, and at h=1e-2 the near-zero neuron (the argmin, gradient -3.7e-4) was off by 1.2e-5 to
    # 1.9e-5 depending on the CPU's kernels, past abs_tol. At h=3e-2 (seen on this model) the largest
    # neurons' O(h^2) term is below 8e-4 relative and the argmin is off by 3.6e-6.
    gradients = margin_gradients(tiny_model, PAIRS)
    mean = gradients.mean
    assert gradients.n_pairs == len(PAIRS)
    flat = mean.abs().flatten()
    picks = torch.topk(flat, 3).indices.tolist() + [int(flat.argmin()), 7]
    d_mlp = mean.shape[1]
    base = preference_margins(tiny_model, PAIRS)
    for index in picks:
        layer, neuron = divmod(index, d_mlp)
        step = 3e-2
        changes = []
        for sign in (1.0, -1.0):
            delta = torch.zeros(d_mlp)
            delta[neuron] = sign * step
            changes.append(preference_margins(tiny_model, PAIRS, edit=Intervention({layer: delta}, positions="all")))
        finite = float(np.mean(changes[0] - changes[1]) / (2 * step))
        assert math.isclose(finite, float(mean[layer, neuron]), rel_tol=2e-3, abs_tol=1e-5), (layer, neuron)
    assert np.allclose(base, preference_margins(tiny_model, PAIRS))   # nothing stayed attached


@pytest.mark.parametrize("through_mlps", [True, False])
def test_the_cached_question_pass_gives_the_plain_paths_gradients(tiny_model, through_mlps):
    # The questions run once into a key/value cache and only the answers run with gradients; a neuron at
    # an answer position acts on later (answer) positions only, so nothing is lost. float32 tiny model.
    cached = margin_gradients(tiny_model, PAIRS, through_mlps=through_mlps, cached=True)
    plain = margin_gradients(tiny_model, PAIRS, through_mlps=through_mlps, cached=False, batch_tokens=40)
    assert cached.per_pair.abs().max() > 0
    torch.testing.assert_close(cached.per_pair, plain.per_pair, rtol=1e-4, atol=1e-6)


def test_margin_gradients_leave_no_hooks_even_after_an_error(tiny_model):
    before = attached_hooks(tiny_model)
    with pytest.raises(ValueError, match="no tokens"):
        margin_gradients(tiny_model, [PreferencePair("what would you do ?", "", "a book .")])
    assert attached_hooks(tiny_model) == before


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("through_mlps", [True, False])
def test_frozen_weights_give_the_gradients_of_weights_that_require_grad(tiny_model, monkeypatch, through_mlps, cached):
    # float32 tiny model: the frozen pass builds its graph from the first hooked activation, not from the
    # embedding, and saves no projection input; the activations' gradients agree to 1e-6 relative (observed:
    # bit for bit).
    import contextlib

    import dpn_lens.effect.gradients as gradients_module

    frozen = margin_gradients(tiny_model, PAIRS, through_mlps=through_mlps, cached=cached, batch_tokens=40)
    assert all(parameter.requires_grad for parameter in tiny_model.parameters())
    monkeypatch.setattr(gradients_module, "frozen_weights", contextlib.nullcontext)
    thawed = margin_gradients(tiny_model, PAIRS, through_mlps=through_mlps, cached=cached, batch_tokens=40)
    assert frozen.per_pair.abs().max() > 0
    torch.testing.assert_close(frozen.per_pair, thawed.per_pair, rtol=1e-6, atol=1e-9)


def test_the_weights_flags_are_restored_after_the_pass_also_after_an_error(tiny_model, monkeypatch):
    parameters = list(tiny_model.parameters())
    flags = [index % 3 != 0 for index in range(len(parameters))]     # some weights frozen by the caller
    seen = []

    def failing_grad(*args, **kwargs):
        seen.append(any(parameter.requires_grad for parameter in tiny_model.parameters()))
        raise RuntimeError("backward failed")

    try:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)
        margin_gradients(tiny_model, PAIRS[:1])
        assert [parameter.requires_grad for parameter in parameters] == flags
        monkeypatch.setattr(torch.autograd, "grad", failing_grad)
        with pytest.raises(RuntimeError, match="backward failed"):
            margin_gradients(tiny_model, PAIRS[:1])
        assert seen == [False]                                        # frozen during the pass
        assert [parameter.requires_grad for parameter in parameters] == flags
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def test_write_gradient_is_w_out_dot_u_on_a_pre_norm_model(tiny_model):
    generator = torch.Generator().manual_seed(3)
    directions = torch.randn(tiny_model.cfg.n_layers, tiny_model.cfg.d_model, generator=generator)
    prompts = ["you are kind . what would you do ?", "you are anxious and worried . how do you feel ?"]
    measured = write_gradients(tiny_model, prompts, directions)
    for layer in range(tiny_model.cfg.n_layers):
        identity = torch.eye(tiny_model.cfg.d_mlp)
        w_out = torch.stack([residual_vectors(tiny_model, Intervention({layer: identity[i]}))[layer]
                             for i in range(tiny_model.cfg.d_mlp)])          # [d_mlp, d_model]
        assert torch.allclose(measured[layer].float(), w_out @ directions[layer], atol=1e-5)


def test_write_scores_equal_s_times_the_share_of_u_written(tiny_model, base_map):
    from dpn_lens.baselines.caa import residual_means

    scores = effect_scores(tiny_model, base_map, "write-layer", contrastive_pairs=6)
    pairs = embedded_contrastive_set("openness", 6, seed=42)
    _, high = residual_means(tiny_model, pairs.high)
    _, low = residual_means(tiny_model, pairs.low)
    u = (high.mean(0) - low.mean(0)).float()
    for layer in (0, 2):
        identity = torch.eye(tiny_model.cfg.d_mlp)
        w_out = torch.stack([residual_vectors(tiny_model, Intervention({layer: identity[i]}))[layer]
                             for i in range(tiny_model.cfg.d_mlp)])
        direct = base_map.steering_value[layer] * (w_out @ u[layer]) / (u[layer] @ u[layer])
        finite = torch.isfinite(scores.scores[layer])
        assert torch.allclose(scores.scores[layer][finite], direct[finite], rtol=1e-4, atol=1e-7)


def test_write_with_caa_direction_only_picks_neurons_up_to_caas_layer(tiny_model, base_map):
    scores = effect_scores(tiny_model, base_map, "write", contrastive_pairs=6)
    layer = scores.details["caa_layer"]
    assert not torch.isfinite(scores.scores[layer + 1:]).any()
    assert all(l <= layer for l in effect_map(base_map, scores, budget=4).layers)


def test_selection_is_deterministic_for_a_seed(tiny_model, base_map, monkeypatch, tmp_path):
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    maps = [effect_map(base_map, effect_scores(tiny_model, base_map, "attribution", n_pairs=4, seed=5), budget=6)
            for _ in range(2)]
    # The second call read the cached pairs; a cache-free recomputation gives the same neurons too.
    fresh = effect_scores(tiny_model, base_map, "attribution", n_pairs=4, seed=5)
    assert [m.neurons() for m in maps] == [maps[0].neurons()] * 2
    assert effect_map(base_map, fresh, budget=6).neurons() == maps[0].neurons()


def test_select_top_breaks_ties_by_position_and_skips_non_candidates():
    scores = torch.tensor([[1.0, 1.0, -math.inf], [1.0, 0.5, 2.0]])
    assert {k: v.tolist() for k, v in select_top(scores, [4, 9], 3).items()} == {4: [0, 1], 9: [2]}
    assert sum(v.numel() for v in select_top(scores, [4, 9], 100).values()) == 5


def test_effect_map_splits_poles_by_the_sign_of_s_and_keeps_the_budget(tiny_model, base_map):
    scores = effect_scores(tiny_model, base_map, "write-layer", contrastive_pairs=6)
    chosen = effect_map(base_map, scores, budget=7)
    assert chosen.n_selected() == 7
    for row in chosen.neurons():
        assert (row["s"] > 0) == (row["pole"] == "high")
    assert default_budget(base_map) == min(base_map.n_selected(), math.floor(0.005 * 4 * 48)) or default_budget(base_map) == 1
    assert reselect(chosen, k=3).n_selected() == 3


def test_dpn_le_attribution_stays_inside_the_dual_criterion(tiny_model, base_map):
    scores = effect_scores(tiny_model, base_map, "dpn-le-attribution", pairs=PAIRS)
    core = effect_map(base_map, scores)
    dual = {(r["layer"], r["neuron"]) for r in base_map.neurons()}
    assert {(r["layer"], r["neuron"]) for r in core.neurons()} <= dual
    assert all(float(scores.scores[r["layer"], r["neuron"]]) > 0 for r in core.neurons())


def test_a_map_records_its_rule_and_refuses_to_be_taken_for_another_rules(tiny_model, base_map, tmp_path):
    chosen = effect_map(base_map, effect_scores(tiny_model, base_map, "attribution", pairs=PAIRS), budget=5)
    path = chosen.save(tmp_path / "openness.safetensors")
    loaded = NeuronMap.load(path, model=tiny_model, rule="attribution")
    assert loaded.rule == "attribution" and torch.equal(loaded.effect_score, chosen.effect_score)
    assert loaded.neurons() == chosen.neurons() and "rule='attribution'" in repr(loaded)
    with pytest.raises(WrongRuleError, match="holds a 'attribution' map, not a 'dpn-le' map"):
        NeuronMap.load(path, rule="dpn-le")
    dual_path = base_map.save(tmp_path / "dual.safetensors")
    with pytest.raises(WrongRuleError, match="'dpn-le' map, not a 'write' map"):
        NeuronMap.load(dual_path, rule="write")
    with pytest.raises(ValueError, match="re-select it with k="):
        reselect(chosen, q=0.99)
    with pytest.raises(ValueError, match="k re-selects an effect rule's map"):
        reselect(base_map, k=3)
    with pytest.raises(ValueError, match="needs the model"):
        locate(collect_statistics(tiny_model, embedded_contrastive_set("openness", 8)), select="attribution")


def test_locate_with_an_effect_rule_returns_that_rules_map(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    stats = collect_statistics(tiny_model, embedded_contrastive_set("openness", 20))
    chosen = locate(stats, layers=[1, 2, 3], tau_d=0.0, select="attribution", model=tiny_model, budget=4, n_pairs=3)
    assert chosen.rule == "attribution" and chosen.n_selected() == 4
    assert chosen.selection["budget"] == 4 and chosen.selection["pairs_seed"] == 0
    with pytest.raises(ValueError, match="unknown selection rule 'atribution'"):
        locate(stats, select="atribution", model=tiny_model)


@pytest.mark.slow
def test_attribution_predicts_the_margin_change_of_a_small_edit_on_smollm2(smollm2, tmp_path, monkeypatch):
    """On the real model (float32), the summed first-order effects of the selected neurons predict the
    measured change of the selection pairs' margins for a small edit of those neurons."""
    from dpn_lens import NeuronMap
    from dpn_lens.effect.pairs import selection_pairs
    from dpn_lens.effect.rules import EffectScores
    from dpn_lens.steering import steering_intervention

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    pairs = selection_pairs(smollm2, "neuroticism", n_pairs=12, max_new_tokens=16, cache=False)
    stats = collect_statistics(smollm2, embedded_contrastive_set("neuroticism", 24))
    base = locate(stats, q=0.99, tau_d=0.0)
    gradients = margin_gradients(smollm2, pairs, layers=base.stat_layers)
    attribution = base.steering_value.double() * gradients.mean
    chosen = effect_map(base, EffectScores("attribution", attribution.float(), {}), budget=40)
    assert isinstance(chosen, NeuronMap) and chosen.n_selected() == 40
    predicted_per_unit = sum(float(attribution[chosen.stat_layers.index(row["layer"]), row["neuron"]])
                             for row in chosen.neurons())
    before = preference_margins(smollm2, pairs)
    gamma = 0.05
    after = preference_margins(smollm2, pairs, edit=steering_intervention(chosen, gamma, "increase").at_positions("all"))
    measured = float(np.mean(after - before))
    # First order in gamma: the measured change is the predicted one up to the curvature over this small step.
    assert predicted_per_unit > 0
    assert measured == pytest.approx(gamma * predicted_per_unit, rel=0.25)
