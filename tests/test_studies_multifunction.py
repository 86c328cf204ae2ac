"""Multifunctionality: attribution gradients are right, capability sets and costs follow their definitions."""

from __future__ import annotations

import pytest
import torch

from dpn_lens import model_fingerprint
from dpn_lens.steering import steer
from dpn_lens.studies import NeuronSet
from dpn_lens.studies import multifunction as mf
from dpn_lens.studies.overlap import layer_matched_pvalue
from helpers import make_map

TEXT = ("you are a person who loves new ideas art and travel . what would you do on the weekend ? "
        "a friend invites you to a party . how feel about it ? yes i the")


def _example(model) -> mf.LossExample:
    ids = model.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:10]
    return mf.LossExample([1] + ids, [False] + [True] * len(ids), "test")


def _loss(model, example, hooks=(), edit=None):
    with model.hooks(fwd_hooks=list(hooks)):
        return mf.lm_loss(model, [example], edit)


def test_attribution_gradient_agrees_with_finite_differences(tiny_model):
    example = _example(tiny_model)
    layer, neuron = 1, 7
    # The attribution sums |a_t * dL/da_t| over positions; check dL/da_t by central differences at
    # every position of one neuron, and rebuild the attribution from them.
    acts = {}

    def grab(activation, hook):
        acts["a"] = activation.detach().clone()
        return activation

    with tiny_model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", grab)]):
        base = _loss(tiny_model, example)
    eps = 1e-2
    expected = 0.0
    for position in range(len(example.ids)):
        def bump(sign):
            def hook(activation, hook):
                activation = activation.clone()
                activation[0, position, neuron] += sign * eps
                return activation
            return [(f"blocks.{layer}.mlp.hook_post", hook)]

        gradient = (_loss(tiny_model, example, bump(+1)) - _loss(tiny_model, example, bump(-1))) / (2 * eps)
        expected += abs(float(acts["a"][0, position, neuron]) * gradient)
    scores = mf.neuron_attribution(tiny_model, [example], layers=[0, layer])
    assert scores.shape == (2, tiny_model.cfg.d_mlp)
    assert float(scores[1, neuron]) == pytest.approx(expected, rel=2e-2, abs=1e-6)
    assert base > 0
    # parameters' .grad is left untouched
    assert all(p.grad is None for p in tiny_model.parameters())


def test_attribution_is_batch_independent(tiny_model):
    example = _example(tiny_model)
    shorter = mf.LossExample(example.ids[:6], example.targets[:6], "test")
    together = mf.neuron_attribution(tiny_model, [example, shorter], layers=[2], batch_size=2)
    apart = (mf.neuron_attribution(tiny_model, [example], layers=[2]) +
             mf.neuron_attribution(tiny_model, [shorter], layers=[2])) / 2
    assert torch.allclose(together, apart, rtol=1e-4, atol=1e-8)


def test_capability_neurons_are_the_top_fraction_of_each_layer():
    attribution = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    capability = mf.capability_neurons(attribution, fraction=0.4, layers=[3, 4])
    assert capability.neurons[3].tolist() == [1, 2] and capability.neurons[4].tolist() == [0, 1]
    with pytest.raises(ValueError, match="fraction"):
        mf.capability_neurons(attribution, fraction=1.5)


def test_capability_overlap_counts_hits_against_layer_matched_chance():
    attribution = torch.arange(20, dtype=torch.float64).repeat(6, 1)       # neuron 19 is top in each layer
    capability = mf.capability_neurons(attribution, fraction=0.1)          # neurons 18, 19 of every layer
    personality = NeuronSet("p", {2: torch.tensor([19, 3]), 3: torch.tensor([18, 17, 0])}, 20)
    [row] = mf.capability_overlap([personality], capability, attribution)
    assert (row["n"], row["n_capability"]) == (5, 2)
    assert row["fraction"] == pytest.approx(2 / 5) and row["chance"] == pytest.approx(0.1)
    assert row["p_value"] == pytest.approx(layer_matched_pvalue(2, 20, [2, 3], [2, 2])[0])
    assert row["mean_percentile"] == pytest.approx((19 + 3 + 18 + 17 + 0) / 19 / 5)


def test_ablation_zeroes_exactly_the_set_and_edit_adds_gamma_s(tiny_model):
    example = _example(tiny_model)
    seen = {}

    def spy(activation, hook):
        seen["a"] = activation.detach().clone()
        return activation

    neuron_set = NeuronSet("x", {1: torch.tensor([3, 8])}, int(tiny_model.cfg.d_mlp))
    with steer(tiny_model, mf.ablation(neuron_set)):   # the spy, registered after the ablation, fires after it
        ablated = _loss(tiny_model, example, [("blocks.1.mlp.hook_post", spy)])
    assert bool((seen["a"][..., [3, 8]] == 0).all()) and bool((seen["a"][..., 0] != 0).any())
    assert _loss(tiny_model, example, edit=mf.ablation(neuron_set)) == ablated != _loss(tiny_model, example)
    s = torch.randn(4, int(tiny_model.cfg.d_mlp))
    edit = mf.edit_intervention(neuron_set, s, [0, 1, 2, 3], gamma=0.8)
    assert edit.positions == "all" and torch.equal(torch.nonzero(edit.deltas[1]).flatten(), torch.tensor([3, 8]))
    assert torch.allclose(edit.deltas[1][[3, 8]], 0.8 * s[1, [3, 8]])
    assert _loss(tiny_model, example, edit=mf.ablation(NeuronSet("empty", {1: []}, 48))) == _loss(tiny_model, example)


def test_capability_data_from_the_shared_folder(tiny_model, shared_data):
    data = mf.load_capability_data(tiny_model, shared_data, n_text=2, n_multiple_choice=4, n_held_out=2, window=16)
    assert len(data.text) == 2 and len(data.held_out) == 2 and len(data.multiple_choice) == 4
    assert all(len(e.ids) == 16 for e in data.text + data.held_out)
    assert data.text[0].ids != data.held_out[0].ids
    assert {e.source for e in data.multiple_choice} == {"mmlu", "arc"}
    assert all(sum(e.targets) >= 1 and not any(e.targets[:-sum(e.targets)]) for e in data.multiple_choice)
    with pytest.raises(FileNotFoundError, match="wikitext2_test"):
        mf.load_capability_data(tiny_model, shared_data / "personalitybench")


def test_multifunction_study_end_to_end_on_the_tiny_model(tiny_model, shared_data, tmp_path):
    from dpn_lens.run import Run
    from dpn_lens.studies.outputs import MultifunctionConfig, multifunction_study

    fingerprint = model_fingerprint(tiny_model).to_dict()
    maps = {"openness": make_map("openness", {2: [0, 1, 2]}, {3: [5]}, [2, 3], n_layers=4, d_mlp=48,
                                 fingerprint=fingerprint)}
    config = MultifunctionConfig(data_dir=shared_data, n_text=2, n_multiple_choice=2, n_held_out=2, window=16,
                                 fraction=0.1, methods=("DPN-LE", "top|d|"))
    summary = multifunction_study(Run(tmp_path, maps), tmp_path / "out", tiny_model, config, png=False, log=None)
    assert (tmp_path / "out" / "multifunction_costs.csv").exists()
    assert summary["by_method"]["DPN-LE"]["mean_set_size"] == 4
    assert summary["by_method"]["DPN-LE"]["mean_ablation_cost"] != 0.0
