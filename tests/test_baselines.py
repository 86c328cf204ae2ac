"""Baselines: NPTI's selection and edit rules, dense and top-k steering, CAA, prompting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpn_lens.collection.collect import CollectionConfig
from dpn_lens import collect_statistics, locate
from dpn_lens.baselines import (NPTIStatistics, PersonaPrompt, ResidualIntervention,
                                caa_intervention, dense_intervention, npti_intervention, npti_select,
                                persona_prompt, scaled_top_count, topk_intervention)
from dpn_lens.localization.localize import LocalizationSettings
from dpn_lens.steering import Edit, steer
from helpers import TINY_HIGH, TINY_LOW, attached_hooks


def brute_force_select(values: list[float], top: int, min_diff: float) -> list[int]:
    ranked = sorted(range(len(values)), key=lambda i: -values[i])  # sorted() is stable, like argsort(stable)
    chosen = []
    for rank, index in enumerate(ranked):
        if rank < top or values[index] >= min_diff:
            chosen.append(index)
        else:
            break
    return chosen


@pytest.mark.parametrize("seed", range(5))
def test_npti_selection_equals_a_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    diff = torch.tensor(np.round(rng.uniform(-0.4, 0.4, size=(3, 40)), 2))  # rounded: ties happen
    for top in (0, 5, 60, 200):
        assert npti_select(diff, top, 0.1).tolist() == brute_force_select(diff.flatten().tolist(), top, 0.1)


def test_npti_top_count_keeps_the_reference_fraction():
    assert scaled_top_count(32 * 14336) == 2000
    assert scaled_top_count(30 * 1536) == round(2000 * 30 * 1536 / (32 * 14336))


def _npti_stats(model) -> NPTIStatistics:
    torch.manual_seed(0)
    shape = (model.cfg.n_layers, model.cfg.d_mlp)
    return NPTIStatistics("extraversion", torch.rand(shape), torch.rand(shape), torch.rand(shape) + 0.5,
                          torch.rand(shape) + 0.5, 10, 10)


def test_npti_edit_equals_editing_act_gate_before_the_up_multiply(tiny_model):
    stats = _npti_stats(tiny_model)
    edit = npti_intervention(tiny_model, stats, "increase", gamma=1.4, top=20, positions="all")
    assert edit.n_edited >= 40
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    _, cache = tiny_model.run_with_cache(ids)
    seen = {}
    layer = edit.layers[0]

    def read(post, hook):
        seen["post"] = post.detach().clone()
        return post

    with steer(tiny_model, edit), tiny_model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", read)]):
        tiny_model(ids)
    # Reference: the edit on act(gate(x)) by hand, times up(x), on the unedited inputs of that layer
    # (the first edited layer, so its inputs are unchanged by the edit).
    act = torch.nn.functional.silu(cache[f"blocks.{layer}.mlp.hook_pre"])
    up = cache[f"blocks.{layer}.mlp.hook_pre_linear"]
    if layer in edit.boost:
        index, value = edit.boost[layer]
        act[..., index] += value
    if layer in edit.clamp:
        act[..., edit.clamp[layer]] = act[..., edit.clamp[layer]].clamp(max=0)
    assert torch.allclose(seen["post"], act * up, atol=1e-5)


def test_npti_boosts_the_trait_pole_and_clamps_the_other(tiny_model):
    stats = _npti_stats(tiny_model)
    up = npti_intervention(tiny_model, stats, "increase", top=10)
    down = npti_intervention(tiny_model, stats, "decrease", top=10)
    flat = lambda d: {(l, int(i)) for l, v in d.items() for i in (v[0] if isinstance(v, tuple) else v)}
    assert flat(up.boost) == flat(down.clamp) and flat(up.clamp) == flat(down.boost)
    diff = (stats.p_high - stats.p_low)
    assert all(diff[l, i] > 0 for l, i in flat(up.boost)) and all(diff[l, i] < 0 for l, i in flat(up.clamp))


def test_decode_only_edits_leave_the_prompt_pass_alone(tiny_model):
    edit = npti_intervention(tiny_model, _npti_stats(tiny_model), "increase", top=20)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        base = tiny_model(ids)
        with steer(tiny_model, edit):
            assert torch.equal(tiny_model(ids), base)
            assert not torch.allclose(tiny_model(ids[:, :1]), base[:, :1])


@pytest.fixture(scope="module")
def tiny_map(tiny_model):
    from dpn_lens import ContrastiveSet

    stats = collect_statistics(tiny_model, ContrastiveSet("extraversion", TINY_HIGH, TINY_LOW),
                               CollectionConfig(progress=False))
    return locate(stats, LocalizationSettings([1, 2, 3], q=0.8, tau_d=0.2))


def test_dense_edits_every_neuron_of_the_layers_with_s(tiny_model, tiny_map):
    edit = dense_intervention(tiny_map, gamma=2.0, direction="decrease")
    row = tiny_map.stat_layers.index(2)
    assert torch.allclose(edit.deltas[2], -2.0 * tiny_map.steering_value[row])
    assert edit.n_edited == int((tiny_map.steering_value[[tiny_map.stat_layers.index(l) for l in (1, 2, 3)]] != 0).sum())


def test_topk_uses_the_dpn_budget_and_the_largest_abs_d(tiny_map):
    edit = topk_intervention(tiny_map)
    assert edit.n_edited == tiny_map.n_selected()
    rows = [tiny_map.stat_layers.index(l) for l in tiny_map.layers]
    d = tiny_map.effect_size[rows].abs()
    chosen = torch.stack([edit.deltas[l] != 0 for l in tiny_map.layers])
    assert d[chosen].min() >= d[~chosen].max()


def test_caa_adds_the_mean_difference_at_one_residual_layer(tiny_model, tiny_pairs):
    edit = caa_intervention(tiny_model, tiny_pairs, gamma=1.0, layer=1, positions="all")
    ids = torch.tensor([[1, 5, 6]])
    _, base = tiny_model.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
    seen = {}
    with steer(tiny_model, edit), tiny_model.hooks(fwd_hooks=[
            ("blocks.1.hook_resid_post", lambda r, hook: seen.setdefault("r", r.detach().clone()))]):
        tiny_model(ids)
    assert torch.allclose(seen["r"], base["blocks.1.hook_resid_post"] + edit.vector, atol=1e-5)
    assert edit.n_edited == 0 and isinstance(edit, ResidualIntervention)


def test_caa_reads_each_layers_residual_at_the_last_token_and_stops_before_the_unembedding(tiny_model, tiny_pairs):
    """``residual_means`` gives what a full forward's cache holds at each prompt's last token (left or right
    padding alike), in float64, without running the unembedding; its hooks are gone afterwards."""
    from dpn_lens.baselines.caa import RESID_HOOK, residual_means
    from dpn_lens.hooked import encode

    prompts = list(tiny_pairs.high[:5])
    mean, samples = residual_means(tiny_model, prompts, batch_size=2)
    n_layers = int(tiny_model.cfg.n_layers)
    assert samples.shape == (len(prompts), n_layers, int(tiny_model.cfg.d_model)) and samples.dtype == torch.float64
    for row, prompt in enumerate(prompts):
        _, cache = tiny_model.run_with_cache(torch.tensor([encode(tiny_model, prompt)]))
        expected = torch.stack([cache[RESID_HOOK.format(layer=layer)][0, -1] for layer in range(n_layers)])
        assert torch.allclose(samples[row], expected.double(), atol=1e-5)
    assert torch.allclose(mean, samples.mean(0))
    unembedded = []
    tiny_model.hook_dict["hook_unembed"].add_hook(lambda logits, hook: unembedded.append(1))
    residual_means(tiny_model, prompts, batch_size=2)
    tiny_model.reset_hooks()
    assert unembedded == []


def test_hooks_are_removed_after_an_exception(tiny_model):
    edit = npti_intervention(tiny_model, _npti_stats(tiny_model), "increase", top=20, positions="all")
    ids = torch.tensor([[1, 5, 6]])
    base = tiny_model(ids)
    with pytest.raises(RuntimeError):
        with steer(tiny_model, edit):
            raise RuntimeError("boom")
    assert torch.equal(tiny_model(ids), base)


def test_prompting_wraps_the_question_and_edits_nothing():
    persona = persona_prompt("extraversion", "decrease")
    assert isinstance(persona, PersonaPrompt) and not isinstance(persona, Edit)   # it edits the prompt, not the model
    assert not hasattr(persona, "fwd_hooks") and not hasattr(persona, "n_edited")
    assert persona.description in persona.wrap("What now?") and "What now?" in persona.wrap("What now?")
    with pytest.raises(ValueError, match="direction"):
        persona_prompt("extraversion", "sideways")


# ----- every baseline is an Edit: steer applies it, -edit / gamma * edit work -------------------------------
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_steer_accepts_npti_and_caa_edits_and_removes_their_hooks_after_an_exception(tiny_model, tiny_pairs, error):

    ids = torch.tensor([[1, 5, 6, 7]])
    reference = tiny_model(ids)
    before = attached_hooks(tiny_model)
    npti = npti_intervention(tiny_model, _npti_stats(tiny_model), "increase", top=20, positions="all")
    caa = caa_intervention(tiny_model, tiny_pairs, gamma=2.0, layer=1, positions="all")
    for edit in (npti, caa):
        assert isinstance(edit, Edit)
        with pytest.raises(type(error)):
            with steer(tiny_model, edit):
                assert attached_hooks(tiny_model) > before
                assert not torch.equal(tiny_model(ids), reference)
                raise error
        assert attached_hooks(tiny_model) == before
        assert torch.equal(tiny_model(ids), reference)


def test_minus_npti_edit_equals_the_decrease_edit(tiny_model):
    stats = _npti_stats(tiny_model)
    up = npti_intervention(tiny_model, stats, "increase", gamma=1.4, top=10, positions="all")
    down = npti_intervention(tiny_model, stats, "decrease", gamma=1.4, top=10, positions="all")
    negated = -up
    assert negated.label == down.label and negated.positions == "all"
    assert negated.boost.keys() == down.boost.keys() and negated.clamp.keys() == down.clamp.keys()
    for layer, (indices, values) in down.boost.items():
        assert torch.equal(negated.boost[layer][0], indices) and torch.equal(negated.boost[layer][1], values)
    for layer, indices in down.clamp.items():
        assert torch.equal(negated.clamp[layer], indices)


def test_gamma_times_npti_and_caa_edits_scales_their_additions(tiny_model, tiny_pairs):
    stats = _npti_stats(tiny_model)
    edit = npti_intervention(tiny_model, stats, "increase", gamma=1.0, top=10)
    doubled = 2.0 * edit
    for layer, (indices, values) in edit.boost.items():
        assert torch.equal(doubled.boost[layer][0], indices)
        torch.testing.assert_close(doubled.boost[layer][1], 2.0 * values)
    assert all(torch.equal(doubled.clamp[layer], indices) for layer, indices in edit.clamp.items())
    caa = caa_intervention(tiny_model, tiny_pairs, gamma=1.0, layer=1)
    assert torch.equal((caa * 3.0).vector, 3.0 * caa.vector)
    assert torch.equal((-caa).vector, caa_intervention(tiny_model, tiny_pairs, direction="decrease", layer=1).vector)
    assert caa.at_positions("all").positions == "all" and caa.positions == "decode"
