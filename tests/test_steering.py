"""Steering: h <- h + gamma * delta on exactly the selected neurons, at decode steps by default."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from dpn_lens.collection.collect import CollectionConfig
from dpn_lens import (ContrastiveSet, Intervention, apply_intervention, collect_statistics, combine_interventions,
                      locate, steer, steering_intervention)
from dpn_lens.steering import dpn_weights
from helpers import attached_hooks, random_prompts

PROMPT = "you are a person who loves new ideas . what would you do on the weekend ?"


@pytest.fixture(scope="module")
def tiny_map(tiny_model):
    pairs = ContrastiveSet("extraversion", random_prompts(40, 12), random_prompts(41, 12), source="tests")
    stats = collect_statistics(tiny_model, pairs, CollectionConfig(max_batch_size=6, progress=False))
    neuron_map = locate(stats, q=0.8, tau_d=0.2, layers=[1, 2, 3])
    assert neuron_map.n_selected("high") >= 3 and neuron_map.n_selected("low") >= 3
    return neuron_map


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return torch.tensor([tiny_model.tokenizer(PROMPT)["input_ids"]])


def hook_names(intervention):
    return [f"blocks.{layer}.mlp.hook_post" for layer in sorted(intervention.deltas)]


def before_and_after(model, intervention, tokens):
    """Activations of the edited layers just before and just after the steering hook, same forward."""
    before, after = {}, {}

    def recorder(store, name):
        def hook(activation, hook):
            store[name] = activation.detach().clone()
            return activation
        return hook

    names = hook_names(intervention)
    with model.hooks(fwd_hooks=[(name, recorder(before, name)) for name in names]):   # registered first: fires first
        with steer(model, intervention):
            with model.hooks(fwd_hooks=[(name, recorder(after, name)) for name in names]):   # fires after the edit
                logits = model(tokens)
    return before, after, logits


def selected(neuron_map, layer):
    return torch.cat([neuron_map.high[layer], neuron_map.low[layer]])


def test_decode_mode_changes_exactly_the_selected_neurons_by_gamma_delta(tiny_model, tiny_map, tokens):
    gamma = 1.7
    edit = steering_intervention(tiny_map, gamma=gamma)
    before, after, _ = before_and_after(tiny_model, edit, tokens[:, :1])   # a single-token (decode-step) forward
    for layer in tiny_map.layers:
        name, indices = f"blocks.{layer}.mlp.hook_post", selected(tiny_map, layer)
        expected = torch.zeros(tiny_map.d_mlp)
        expected[indices] = gamma * tiny_map.steering_value[tiny_map.stat_layers.index(layer), indices]
        changed = torch.nonzero(after[name] != before[name])[:, -1].unique()
        assert set(changed.tolist()) == set(indices.tolist())
        assert torch.equal(after[name], before[name] + expected)   # h + gamma * delta, bitwise
        untouched = torch.ones(tiny_map.d_mlp, dtype=torch.bool)
        untouched[indices] = False
        assert torch.equal(after[name][..., untouched], before[name][..., untouched])


def test_decode_mode_leaves_the_prompt_pass_unchanged(tiny_model, tiny_map, tokens):
    edit = steering_intervention(tiny_map, gamma=5.0)
    before, after, logits = before_and_after(tiny_model, edit, tokens)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(logits, tiny_model(tokens))


def test_all_positions_mode_changes_every_position(tiny_model, tiny_map, tokens):
    edit = steering_intervention(tiny_map, gamma=1.0, positions="all")
    before, after, logits = before_and_after(tiny_model, edit, tokens)
    for layer in tiny_map.layers:
        name = f"blocks.{layer}.mlp.hook_post"
        torch.testing.assert_close(after[name] - before[name], edit.deltas[layer].expand_as(before[name]),
                                   rtol=0, atol=1e-6)
        assert (after[name] != before[name]).any(dim=-1).all()   # every position of the sequence
    assert not torch.equal(logits, tiny_model(tokens))


def test_increase_and_decrease_are_opposite_on_the_union_of_both_poles(tiny_map):
    up = steering_intervention(tiny_map, gamma=0.8, direction="increase")
    down = steering_intervention(tiny_map, gamma=0.8, direction="decrease")
    for layer in tiny_map.layers:
        assert torch.equal(up.deltas[layer], -down.deltas[layer])
        assert set(torch.nonzero(up.deltas[layer]).flatten().tolist()) == set(selected(tiny_map, layer).tolist())
    assert up.n_edited == tiny_map.n_selected()


def test_directional_mode_uses_only_one_pole(tiny_map):
    up = steering_intervention(tiny_map, gamma=1.0, direction="increase", mode="directional")
    down = steering_intervention(tiny_map, gamma=1.0, direction="decrease", mode="directional")
    assert up.n_edited == tiny_map.n_selected("high") and down.n_edited == tiny_map.n_selected("low")
    for layer, delta in up.edited_neurons().items():
        assert set(delta.tolist()) == set(tiny_map.high[layer].tolist())
        assert (up.deltas[layer][tiny_map.high[layer]] > 0).all()      # +s on high neurons, s > 0
    for layer, delta in down.edited_neurons().items():
        assert set(delta.tolist()) == set(tiny_map.low[layer].tolist())
        assert (down.deltas[layer][tiny_map.low[layer]] > 0).all()     # -s on low neurons, s < 0


def test_weighted_variant_scales_each_delta_by_its_rank_of_abs_d_within_its_layer(tiny_map):
    gamma = 1.3
    plain = steering_intervention(tiny_map, gamma=gamma)
    weighted = steering_intervention(tiny_map, gamma=gamma, weighted=True)
    for layer in [layer for layer in tiny_map.layers if selected(tiny_map, layer).numel()]:
        indices = selected(tiny_map, layer)
        abs_d = tiny_map.values_at(layer, indices)[1].abs().numpy()
        n = abs_d.size
        weights = np.ones(n) if n == 1 else 0.75 + 0.25 * (rankdata(abs_d, method="ordinal") - 1) / (n - 1)
        w = torch.from_numpy(weights).float()
        torch.testing.assert_close(weighted.deltas[layer][indices], plain.deltas[layer][indices] * w, rtol=1e-6, atol=0)
    assert dpn_weights(torch.tensor([2.0])).tolist() == [1.0]


def test_weighted_ranks_are_per_layer_on_a_constructed_two_layer_map():
    """Layer 0's |d| are all below layer 1's: ranked over both layers, layer 0 would get only low weights;
    ranked per layer (the reference), each layer's strongest neuron gets 1.0 and its weakest 0.75."""
    from helpers import make_map

    neuron_map = make_map("openness", high={0: [0, 1, 2], 1: [0, 1, 2]}, low={}, layers=[0, 1], n_layers=2, d_mlp=8)
    neuron_map.steering_value[:] = torch.where(neuron_map.steering_value > 0, 0.1, 0.0)
    neuron_map.effect_size[0, :3] = torch.tensor([0.5, 0.6, 0.7])
    neuron_map.effect_size[1, :3] = torch.tensor([2.0, 3.0, 4.0])
    edit = steering_intervention(neuron_map, gamma=1.0, weighted=True)
    for layer in (0, 1):
        torch.testing.assert_close(edit.deltas[layer][:3], torch.tensor([0.75, 0.875, 1.0]) * 0.1, rtol=1e-6, atol=0)


def test_spread_variant_moves_each_neuron_by_gamma_of_its_own_standard_deviation(tiny_map):
    """DPN-LE_sd: delta_i = ±gamma * sign(s_i) * sigma_i, sigma_i = |s_i / d_i| (pooled SD, d = s / sigma)."""
    gamma = 0.7
    for direction, sign in (("increase", 1.0), ("decrease", -1.0)):
        edit = steering_intervention(tiny_map, gamma=gamma, direction=direction, scale="spread")
        assert edit.label.startswith("DPN-LE_sd")
        for layer in tiny_map.layers:
            indices = selected(tiny_map, layer)
            if not indices.numel():
                continue
            s, d = tiny_map.values_at(layer, indices)
            expected = sign * gamma * torch.sign(s) * (s / d).abs()
            torch.testing.assert_close(edit.deltas[layer][indices], expected.float(), rtol=1e-6, atol=0)
            assert (edit.deltas[layer] != 0).sum() == indices.numel()
    with pytest.raises(ValueError, match="scale must be 's' or 'spread'"):
        steering_intervention(tiny_map, scale="sd")


def test_combining_traits_adds_deltas_and_warns_naming_shared_neurons(tiny_map):
    other = dataclasses.replace(tiny_map, trait="openness")
    a, b = steering_intervention(tiny_map, gamma=1.0), steering_intervention(other, gamma=0.5)
    layer = tiny_map.layers[0]
    first = int(selected(tiny_map, layer).sort().values[0])
    with pytest.warns(UserWarning, match=rf"extraversion and openness edit {a.n_edited} shared neuron\(s\) "
                                         rf"\(L{layer}\.N{first}"):
        both = combine_interventions(a, b)
    for layer in tiny_map.layers:
        torch.testing.assert_close(both.deltas[layer], a.deltas[layer] + b.deltas[layer])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        directional = combine_interventions(steering_intervention(tiny_map, mode="directional"),
                                            steering_intervention(other, mode="directional", direction="decrease"))
    assert directional.n_edited == tiny_map.n_selected()   # high and low poles are disjoint: no warning
    with pytest.raises(ValueError, match="different positions"):
        combine_interventions(a, steering_intervention(other, positions="all"))


def test_steering_works_with_run_with_hooks_and_run_with_cache(tiny_model, tiny_map, tokens):
    edit = steering_intervention(tiny_map, gamma=2.0, positions="all")
    with steer(tiny_model, edit):
        steered = tiny_model(tokens)
        cached_logits, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_post"))
    by_hooks = tiny_model.run_with_hooks(tokens, fwd_hooks=edit.fwd_hooks())
    plain_logits, plain_cache = tiny_model.run_with_cache(tokens)
    assert not torch.equal(steered, plain_logits)
    assert torch.equal(cached_logits, steered) and torch.equal(by_hooks, steered)
    layer = tiny_map.layers[-1]
    name, indices = f"blocks.{layer}.mlp.hook_post", selected(tiny_map, layer)
    assert not torch.equal(cache[name][..., indices], plain_cache[name][..., indices])   # the cache sees the edit
    assert torch.equal(tiny_model(tokens), plain_logits)   # nothing left behind


def test_generate_with_kv_cache_is_steered_and_unsteered_after_the_context(tiny_model, tiny_map, tokens):
    kwargs = dict(max_new_tokens=8, do_sample=False, verbose=False, use_past_kv_cache=True, return_type="tokens")
    unsteered = tiny_model.generate(tokens, **kwargs)
    with steer(tiny_model, steering_intervention(tiny_map, gamma=50.0)):
        steered = tiny_model.generate(tokens, **kwargs)
    after = tiny_model.generate(tokens, **kwargs)
    n = tokens.shape[1]
    assert torch.equal(steered[:, :n + 1], unsteered[:, :n + 1])   # the prompt pass (first new token) is untouched
    assert not torch.equal(steered, unsteered)                     # later decode steps are steered
    assert torch.equal(after, unsteered)


def test_a_steering_hook_fires_exactly_once_per_forward(tiny_model, tiny_map, tokens, monkeypatch):
    calls = []
    original = Intervention._delta_like

    def counting(self, layer, activation):
        calls.append(layer)
        return original(self, layer, activation)

    monkeypatch.setattr(Intervention, "_delta_like", counting)
    edit = steering_intervention(tiny_map, gamma=1.0, positions="all")
    with steer(tiny_model, edit):
        tiny_model(tokens)
        assert sorted(calls) == sorted(edit.deltas)
        calls.clear()
        tiny_model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False)
    assert sorted(calls) == sorted(list(edit.deltas) * 3)   # one prompt pass + two decode steps


def test_applying_the_same_intervention_twice_is_refused(tiny_model, tiny_map):
    edit = steering_intervention(tiny_map)
    with steer(tiny_model, edit):
        with pytest.raises(RuntimeError, match="already applied.*double"):
            with steer(tiny_model, edit):
                pass
        with pytest.raises(RuntimeError, match="already applied"):
            apply_intervention(tiny_model, edit)
    with pytest.raises(RuntimeError, match="already applied"):
        with steer(tiny_model, edit, edit):
            pass
    handle = apply_intervention(tiny_model, edit)   # refused attempts left no trace: it applies again
    handle.remove()


def test_applying_the_same_map_twice_warns_naming_shared_neurons(tiny_model, tiny_map):
    before = attached_hooks(tiny_model)
    first = apply_intervention(tiny_model, steering_intervention(tiny_map))
    try:
        with pytest.warns(RuntimeWarning, match=r"edits \d+ neuron\(s\) that .* already edits \(L\d+\.N\d+.*handle\.remove"):
            second = apply_intervention(tiny_model, steering_intervention(tiny_map))
        second.remove()
    finally:
        first.remove()
    assert attached_hooks(tiny_model) == before


def test_handle_remove_detaches_hooks_and_is_idempotent(tiny_model, tiny_map, tokens):
    before, reference = attached_hooks(tiny_model), tiny_model(tokens)
    handle = apply_intervention(tiny_model, steering_intervention(tiny_map, gamma=3.0, positions="all"))
    assert handle.active and attached_hooks(tiny_model) == before + len(tiny_map.layers)
    assert not torch.equal(tiny_model(tokens), reference)
    handle.remove()
    handle.remove()
    assert not handle.active and attached_hooks(tiny_model) == before
    assert torch.equal(tiny_model(tokens), reference)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_hooks_are_gone_after_an_exception_inside_steer(tiny_model, tiny_map, tokens, error):
    before, reference = attached_hooks(tiny_model), tiny_model(tokens)
    edit = steering_intervention(tiny_map, gamma=3.0, positions="all")
    with pytest.raises(type(error)):
        with steer(tiny_model, edit):
            assert attached_hooks(tiny_model) > before
            raise error
    assert attached_hooks(tiny_model) == before
    assert torch.equal(tiny_model(tokens), reference)
    with steer(tiny_model, edit):   # and it is no longer registered as active
        pass


@pytest.mark.parametrize("gamma", [float("nan"), float("inf"), "1.0", True, None])
def test_bad_gamma_is_refused(tiny_map, gamma):
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        steering_intervention(tiny_map, gamma=gamma)


def test_bad_options_are_refused(tiny_model, tiny_map):
    with pytest.raises(ValueError, match="direction must be 'increase' or 'decrease'"):
        steering_intervention(tiny_map, direction="up")
    with pytest.raises(ValueError, match="mode must be 'both' or 'directional'"):
        steering_intervention(tiny_map, mode="all")
    with pytest.raises(ValueError, match="positions must be 'decode' or 'all'"):
        steering_intervention(tiny_map, positions="prompt")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Intervention({1: torch.full((48,), float("nan"))})
    with pytest.raises(ValueError, match=r"layers \[9\], but the model has layers 0..3"):
        with steer(tiny_model, Intervention({9: torch.ones(48)})):
            pass
    with pytest.raises(ValueError, match="d_mlp is 48: the neuron map comes from another model"):
        with steer(tiny_model, Intervention({1: torch.ones(64)})):
            pass
    with pytest.raises(TypeError, match="takes Intervention objects"):
        with steer(tiny_model, tiny_map):
            pass


def test_steer_can_check_the_map_belongs_to_the_model(other_tiny_model, tiny_map):
    from dpn_lens.localization.neuron_map import IncompatibleModelError

    before = attached_hooks(other_tiny_model)
    with pytest.raises(IncompatibleModelError, match="weights"):
        with steer(other_tiny_model, steering_intervention(tiny_map), check=tiny_map):
            pass
    assert attached_hooks(other_tiny_model) == before


# ----- the Edit protocol: one edit concept, applied only through steer / apply_intervention ------------------
def test_minus_edit_equals_the_decrease_edit(tiny_map):
    up = steering_intervention(tiny_map, gamma=0.8, direction="increase")
    down = steering_intervention(tiny_map, gamma=0.8, direction="decrease")
    negated = -up
    assert sorted(negated.deltas) == sorted(down.deltas)
    for layer in down.deltas:
        assert torch.equal(negated.deltas[layer], down.deltas[layer])
    assert negated.n_edited == down.n_edited and negated.positions == up.positions
    assert negated.neurons_by_source == up.neurons_by_source


def test_gamma_times_edit_scales_every_delta(tiny_map):
    edit = steering_intervention(tiny_map, gamma=1.0, positions="all")
    for scaled in (0.5 * edit, edit * 0.5):
        assert isinstance(scaled, Intervention) and scaled.positions == "all"
        for layer, delta in edit.deltas.items():
            assert torch.equal(scaled.deltas[layer], 0.5 * delta)
    # gamma * (the gamma=1 edit) is the edit built with that gamma (s times gamma, bitwise)
    built = steering_intervention(tiny_map, gamma=0.5, positions="all")
    assert all(torch.equal((0.5 * edit).deltas[layer], built.deltas[layer]) for layer in built.deltas)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        float("nan") * edit


def test_steer_with_none_leaves_logits_unchanged(tiny_model, tokens):
    before = attached_hooks(tiny_model)
    reference = tiny_model(tokens)
    with steer(tiny_model, None):
        assert attached_hooks(tiny_model) == before
        assert torch.equal(tiny_model(tokens), reference)
    handle = apply_intervention(tiny_model, None)
    assert torch.equal(tiny_model(tokens), reference)
    handle.remove()
    assert attached_hooks(tiny_model) == before


def test_at_positions_all_acts_on_the_prompt_pass(tiny_model, tiny_map, tokens):
    decode_only = steering_intervention(tiny_map, gamma=3.0)
    everywhere = decode_only.at_positions("all")
    assert everywhere.positions == "all" and decode_only.positions == "decode"
    assert decode_only.at_positions("decode") is decode_only
    reference = tiny_model(tokens)
    with steer(tiny_model, decode_only):
        assert torch.equal(tiny_model(tokens), reference)        # the prompt pass is untouched
    with steer(tiny_model, everywhere):
        assert not torch.equal(tiny_model(tokens), reference)    # every position is edited


def test_direction_sign_validates_the_word():
    from dpn_lens.steering import direction_sign

    assert direction_sign("increase") == 1.0 and direction_sign("decrease") == -1.0
    with pytest.raises(ValueError, match="direction must be 'increase' or 'decrease'"):
        direction_sign("up")


def test_additive_intervention_is_the_dpn_le_edit_on_the_given_neurons(tiny_map):
    from dpn_lens.steering import additive_intervention

    neurons = {layer: torch.cat([tiny_map.high[layer], tiny_map.low[layer]]) for layer in tiny_map.layers}
    neurons = {layer: indices for layer, indices in neurons.items() if indices.numel()}
    built = additive_intervention(tiny_map.steering_value, tiny_map.stat_layers, neurons, 0.7, "decrease")
    reference = steering_intervention(tiny_map, gamma=0.7, direction="decrease")
    assert all(torch.equal(built.deltas[layer], reference.deltas[layer]) for layer in reference.deltas)
    with pytest.raises(ValueError, match="have no steering values"):
        additive_intervention(tiny_map.steering_value, tiny_map.stat_layers, {99: torch.tensor([0])})


def test_row_edits_give_each_row_the_answer_its_edit_gives_alone(tiny_model):
    """One batched generation with an edit per row equals one generation per edit (the demo's answers)."""
    from dpn_lens.generation import greedy_generate
    from dpn_lens.hooked import encode
    from dpn_lens.steering import RowEdits

    prompt = encode(tiny_model, "you are outgoing . what would you do on the weekend ?")
    generator = torch.Generator().manual_seed(0)
    edits = []
    for _ in range(3):
        delta = torch.zeros(tiny_model.cfg.d_mlp)
        delta[torch.randperm(tiny_model.cfg.d_mlp, generator=generator)[:6]] = 30 * torch.randn(6, generator=generator)
        edits.append(Intervention({1: delta.clone(), 2: delta.clone()}))
    alone = []
    for edit in [None, *edits]:
        with steer(tiny_model, edit):
            alone.append(greedy_generate(tiny_model, [prompt], 8)[0])
    assert len({tuple(answer) for answer in alone}) > 1, "the edits should change the answer"
    with steer(tiny_model, RowEdits([None, *edits])):
        together = greedy_generate(tiny_model, [prompt] * 4, 8, batch_size=4)
    assert together == alone
    with pytest.raises(ValueError, match="holds 4 rows but the forward pass has 2"):
        with steer(tiny_model, RowEdits([None, *edits])):
            greedy_generate(tiny_model, [prompt] * 2, 2, batch_size=2)
