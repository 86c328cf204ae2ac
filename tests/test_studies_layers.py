"""Layer-wise distribution: counts per layer, d/s quantiles, top neurons, and the study CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from dpn_lens import LocalizationSettings, locate
from dpn_lens.studies import Run, layer_counts, layer_value_quantiles, top_neurons
from helpers import make_map, random_stats


def test_layer_counts_of_a_constructed_map():
    neuron_map = make_map("openness", {2: [0, 1, 2], 4: [7]}, {3: [5, 6]}, [2, 3, 4])
    rows = layer_counts({"openness": neuron_map})
    table = {(r["pole"], r["layer"]): r["n"] for r in rows}
    assert table == {("high", 2): 3, ("high", 3): 0, ("high", 4): 1, ("low", 2): 0, ("low", 3): 2, ("low", 4): 0}
    assert sum(r["fraction"] for r in rows) == pytest.approx(6 / 20)


def test_value_quantiles_match_torch():
    neuron_map = locate(random_stats("openness", 1), LocalizationSettings([3, 4, 5], 0.95, 0.3))
    rows = layer_value_quantiles({"openness": neuron_map}, quantiles=(0.5, 0.95))
    row = next(r for r in rows if r["layer"] == 4 and r["quantity"] == "d")
    d = neuron_map.effect_size[4].double()
    assert row["q50"] == pytest.approx(float(torch.quantile(d, 0.5)))
    assert row["q95"] == pytest.approx(float(torch.quantile(d, 0.95)))
    assert row["searched"] and not next(r for r in rows if r["layer"] == 0)["searched"]


def test_top_neurons_are_the_largest_abs_d_of_each_pole():
    neuron_map = locate(random_stats("openness", 2), LocalizationSettings([3, 4, 5], 0.95, 0.3))
    rows = top_neurons({"openness": neuron_map}, per_pole=3)
    high = [r for r in rows if r["pole"] == "high"]
    all_high = sorted((abs(r["d"]) for r in neuron_map.neurons("high")), reverse=True)
    assert [abs(r["d"]) for r in high] == pytest.approx(all_high[:3])
    for r in high:
        s, d = neuron_map.values_at(r["layer"], torch.tensor([r["neuron"]]))
        assert (float(s), float(d)) == pytest.approx((r["s"], r["d"]))
    with pytest.raises(ValueError, match="per_pole"):
        top_neurons({"openness": neuron_map}, per_pole=0)


@pytest.fixture
def run_dir(tmp_path):
    for seed, trait in enumerate(("openness", "extraversion")):
        stats = random_stats(trait, seed)
        locate(stats, LocalizationSettings([2, 3, 4, 5], 0.95, 0.3)).save(tmp_path / "maps" / f"{trait}.safetensors")
        stats.save(tmp_path / "stats" / f"{trait}.safetensors")
    return tmp_path


def test_load_run_reads_maps_and_statistics_in_big_five_order(run_dir):
    run = Run.load(run_dir)
    assert run.traits == ["openness", "extraversion"] and set(run.stats) == set(run.traits)
    with pytest.raises(FileNotFoundError, match="no neuron maps"):
        Run.load(run_dir / "nowhere")


def test_study_cli_writes_tables_and_figures(run_dir, tmp_path):
    from dpn_lens.cli.study import register

    parser = argparse.ArgumentParser(prog="dpn-lens")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "figs"
    for study in ("layers", "overlap"):
        args = parser.parse_args(["study", study, "--run", str(run_dir), "--out", str(out), "--no-png"])
        assert args.handler(args) == 0
    for name in ("layers_counts.csv", "layers_counts.md", "layers_top_neurons.csv", "layers_distribution.html",
                 "layers_d_vs_s_openness.html", "overlap_pairs.csv", "overlap_jaccard_heatmap.html",
                 "overlap_upset.html", "overlap_exclusivity.csv", "overlap_steering_correlation.html"):
        assert (out / name).exists(), name
    summary = json.loads((out / "overlap_summary.json").read_text())
    assert summary["within_trait_overlap"] == {"openness": 0, "extraversion": 0}
    for html in out.glob("*.html"):
        assert html.stat().st_size < 300_000, f"{html.name} is {html.stat().st_size} bytes: a plotly bundle got in"
    with pytest.raises(SystemExit):
        parser.parse_args(["study", "bogus", "--run", str(run_dir)])
