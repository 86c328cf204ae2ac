"""The residual-share study: the trait direction split into MLP, attention and embedding parts."""

from __future__ import annotations

import json

import pytest
import torch

from dpn_lens.collection.collect import CollectionConfig, collect_statistics
from dpn_lens.data.contrastive import embedded_contrastive_set
from dpn_lens.localization.localize import locate
from dpn_lens.studies.residual_share import residual_share


@pytest.fixture(scope="module")
def pairs():
    return embedded_contrastive_set("openness", 10)


@pytest.fixture(scope="module")
def openness_map(tiny_model, pairs):
    stats = collect_statistics(tiny_model, pairs, CollectionConfig(progress=False))
    return locate(stats, q=0.5, tau_d=0.2, layers=list(range(tiny_model.cfg.n_layers)))


def test_the_parts_add_up_to_the_residual_direction_on_a_pre_norm_model(tiny_model, pairs):
    for layer in range(tiny_model.cfg.n_layers):
        share = residual_share(tiny_model, pairs, layer=layer)
        assert share.layer == layer and share.n_pairs == 10 and share.v_norm > 0
        assert abs(share.remainder) < 1e-4, share.row()   # Llama: resid = embed + attn + mlp outputs, exactly
        assert len(share.per_layer) == layer + 1
        assert sum(e["mlp"] for e in share.per_layer) == pytest.approx(share.mlp, abs=1e-9)
        assert sum(e["attn"] for e in share.per_layer) == pytest.approx(share.attn, abs=1e-9)
        assert -1 <= share.mlp_cosine <= 1 and share.selected is None


def test_a_map_of_every_neuron_writes_exactly_the_mlp_share(tiny_model, pairs, openness_map):
    import dataclasses

    d_mlp = openness_map.d_mlp
    every = dataclasses.replace(openness_map, high={l: torch.arange(d_mlp) for l in openness_map.layers}, low={})
    share = residual_share(tiny_model, pairs, every, layer=2)
    assert share.selected_neurons == 3 * d_mlp          # layers 0-2 (the split stops at layer 2)
    assert share.selected == pytest.approx(share.mlp, rel=1e-4, abs=1e-7)   # s @ W_out is the MLP output's mean difference
    partial = residual_share(tiny_model, pairs, openness_map, layer=2)
    assert 0 < partial.selected_neurons < share.selected_neurons
    assert partial.selected != pytest.approx(share.mlp, rel=1e-3)


def test_default_layer_is_where_caa_steers_and_bad_layers_are_refused(tiny_model, pairs):
    from dpn_lens.baselines.caa import caa_intervention

    share = residual_share(tiny_model, pairs)
    assert share.layer == caa_intervention(tiny_model, pairs).layer
    with pytest.raises(ValueError, match="outside the model's layers"):
        residual_share(tiny_model, pairs, layer=99)


def test_study_residual_command_writes_its_tables_and_refuses_too_few_pairs(tiny_folder, tmp_path):
    from dpn_lens.cli import main
    from dpn_lens.models import load_model

    model = load_model(str(tiny_folder))
    stats = collect_statistics(model, embedded_contrastive_set("openness", 10), CollectionConfig(progress=False))
    locate(stats, q=0.5, tau_d=0.2).save(tmp_path / "run" / "maps" / "openness.safetensors")
    out = tmp_path / "out"
    assert main(["study", "residual", "--run", str(tmp_path / "run"), "--model", str(tiny_folder),
                 "--n-pairs", "6", "--out", str(out)]) == 0
    summary = json.loads((out / "residual_share_summary.json").read_text())
    row = summary["by_trait"]["openness"]
    assert row["n_pairs"] == 6 and abs(row["remainder"]) < 1e-4 and row["selected"] is not None
    assert (out / "residual_share.md").read_text().count("\n") == 3     # header, rule, one trait
    assert (out / "residual_share_per_layer.csv").exists()
    assert main(["study", "residual", "--run", str(tmp_path / "run"), "--model", str(tiny_folder),
                 "--n-pairs", "1", "--out", str(out)]) == 2
