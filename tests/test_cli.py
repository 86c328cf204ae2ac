"""The command line end to end on a tiny local Hugging Face folder: locate, then steer with its map."""

from __future__ import annotations

import json

import pytest

from dpn_lens import NeuronMap
from dpn_lens.cli import main
from helpers import build_tiny_hf_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random Llama saved like a hub checkpoint, with a context long enough for role-play prompts."""
    folder = tmp_path_factory.mktemp("tiny_hf")
    hf_model, _ = build_tiny_hf_model(folder, n_layers=3, max_positions=512)
    hf_model.save_pretrained(folder)
    return folder


def test_locate_writes_maps_stats_and_a_summary_then_steer_uses_the_map(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["locate", "--model", str(tiny_folder), "--traits", "extraversion,N", "--n-pairs", "8",
                 "--layers", "0-2", "--q", "0.8", "--tau-d", "0.1", "--out", str(run), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "extra high" in printed and "neuro low" in printed and "% all MLP" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["traits"]) == {"extraversion", "neuroticism"}
    neuron_map = NeuronMap.load(run / "maps" / "extraversion.safetensors")
    assert neuron_map.layers == [0, 1, 2] and neuron_map.n_high_samples == 8
    assert summary["traits"]["extraversion"]["high"] == neuron_map.n_selected("high")
    assert (run / "stats" / "neuroticism.safetensors").exists()

    code = main(["steer", "--model", str(tiny_folder), "--map", str(run / "maps" / "extraversion.safetensors"),
                 "--prompt", "you are outgoing . what would you do ?", "--gamma", "50", "--max-new-tokens", "4"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[:4]] == ["Q", "unsteered", "increase", "decrease"]


def test_bad_input_is_one_clear_line_and_exit_code_2(tiny_folder, tmp_path, capsys):
    code = main(["locate", "--model", str(tiny_folder), "--traits", "humour", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "unknown trait 'humour'" in capsys.readouterr().err
