"""End to end on the embedded SmolLM2-135M-Instruct with PersonalityBench pairs (slow)."""

from __future__ import annotations

import torch
import pytest

from dpn_lens.collection.collect import CollectionConfig
from dpn_lens import (NeuronMap, collect_statistics, locate, personalitybench_contrastive_set, propose_settings,
                      steer, steering_intervention)
from dpn_lens.data import render_for_model


@pytest.mark.slow
def test_personalitybench_pairs_to_a_sparse_disjoint_map_that_steers_generation(smollm2, shared_data, tmp_path):
    pairs = personalitybench_contrastive_set(shared_data, "extraversion", n_pairs=24)
    stats = collect_statistics(smollm2, pairs, CollectionConfig(max_batch_size=12, progress=False))
    assert stats.high.count == stats.low.count == 24 and stats.layers == list(range(30))

    proposed = propose_settings(stats)   # no reference settings for SmolLM2: derived from the data
    assert proposed.source == "proposed" and proposed.reason and set(proposed.layers) <= set(stats.layers)
    # 24 pairs are few, so the proposed tau_d is held above the chance bound (~1.2) and may select
    # nothing; for this check take the paper's own kind of setting: the upper two thirds, tau_d 0.5.
    neuron_map = locate(stats, layers=list(range(10, 30)), q=0.995, tau_d=0.5)
    assert neuron_map.n_selected("high") > 0 and neuron_map.n_selected("low") > 0
    assert neuron_map.fraction_selected() <= 0.005   # at most 0.5% of the neurons of the chosen layers
    for layer in neuron_map.layers:
        assert not set(neuron_map.high[layer].tolist()) & set(neuron_map.low[layer].tolist())
        # |s| > quantile(|s|, 0.995) over 1536 neurons leaves at most 1535 - floor(0.995 * 1535) = 8
        assert neuron_map.high[layer].numel() + neuron_map.low[layer].numel() <= 8

    path = neuron_map.save(tmp_path / "extraversion.safetensors")
    loaded = NeuronMap.load(path, model=smollm2)
    assert loaded.config() == neuron_map.config()
    assert all(torch.equal(loaded.high[layer], neuron_map.high[layer]) for layer in neuron_map.layers)

    text = render_for_model(smollm2, "A friend invites you to a big party tonight. What do you do?")
    tokens = smollm2.to_tokens(text, prepend_bos=False)
    kwargs = dict(max_new_tokens=16, do_sample=False, verbose=False, return_type="tokens")
    unsteered = smollm2.generate(tokens, **kwargs)
    with steer(smollm2, steering_intervention(loaded, gamma=8.0, direction="decrease"), check=loaded):
        steered = smollm2.generate(tokens, **kwargs)
    assert not torch.equal(steered, unsteered)
    assert torch.equal(smollm2.generate(tokens, **kwargs), unsteered)
