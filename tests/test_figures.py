"""Figures build with the expected traces, hover shows layer/neuron/d/s, files are small and PNGs render."""

from __future__ import annotations

import os
import shutil
from collections import Counter

import numpy as np
import plotly.graph_objects as go
import plotly.io
import pytest
import torch

from dpn_lens import figures
from dpn_lens.studies import NeuronSet, layer_counts, pairwise_overlap, per_layer_overlap, pole_sets
from helpers import make_map


@pytest.fixture
def maps():
    return {"openness": make_map("openness", {2: [0, 1, 2], 3: [4]}, {2: [5]}, [2, 3]),
            "extraversion": make_map("extraversion", {2: [1, 2], 3: [9]}, {3: [4]}, [2, 3])}


def test_layer_distribution_has_one_bar_trace_per_trait_and_pole(maps):
    fig = figures.layer_distribution_figure(layer_counts(maps))
    names = [t.name for t in fig.data]
    assert names == ["Openness high", "Openness low", "Extraversion high", "Extraversion low"]
    openness_low = fig.data[1]
    assert list(openness_low.x) == [2, 3] and list(openness_low.y) == [-1, 0]   # low pole drawn downwards
    assert fig.layout.title.text and fig.layout.xaxis2.title.text == "layer"


def test_d_s_scatter_highlights_selected_neurons_with_hover(maps):
    neuron_map = maps["openness"]
    fig = figures.d_s_scatter_figure(neuron_map)
    high = [t for t in fig.data if t.name == "Openness high"]
    assert len(high) == 2                                          # one per searched layer
    assert sorted(np.asarray(high[0].customdata)[:, 1].astype(int).tolist()) == [0, 1, 2]
    assert all(key in high[0].hovertemplate for key in ("layer", "neuron", "d =", "s ="))
    assert np.allclose(np.asarray(high[0].customdata)[:, 2], neuron_map.steering_value[2, [0, 1, 2]].numpy())
    # thresholds: one tau_q line and two tau_d lines per layer
    assert len(fig.layout.shapes) == 3 * len(neuron_map.layers)
    with pytest.raises(ValueError, match="not searched"):
        figures.d_s_scatter_figure(neuron_map, layers=[0])


def test_upset_bars_count_exclusive_combinations():
    a = NeuronSet("a", {0: torch.tensor([0, 1, 2, 3])}, 10)
    b = NeuronSet("b", {0: torch.tensor([2, 3, 4])}, 10)
    c = NeuronSet("c", {0: torch.tensor([3, 9])}, 10)
    fig = figures.upset_figure([a, b, c])
    bars = fig.data[0]
    got = Counter(dict(zip(bars.customdata, bars.y)))
    # only a: {0,1}; only b: {4}; only c: {9}; a&b: {2}; a&b&c: {3}
    assert got == Counter({"a": 2, "b": 1, "c": 1, "a & b": 1, "a & b & c": 1})


def test_heatmap_and_curves_carry_values(maps):
    sets = [s for m in maps.values() for s in pole_sets(m)]
    names = [s.name for s in sets]
    from dpn_lens.studies import overlap_matrix

    rows = pairwise_overlap(sets)
    fig = figures.overlap_heatmap_figure(overlap_matrix(rows, names), names, "Jaccard",
                                         pvalues=overlap_matrix(rows, names, "p_value_layer_matched"))
    assert np.allclose(np.asarray(fig.data[0].z, dtype=float), overlap_matrix(rows, names), equal_nan=True)
    assert fig.data[0].text[0][0].startswith("1.00")
    curves = figures.layer_jaccard_figure(per_layer_overlap(sets))
    assert {t.name for t in curves.data} >= {"openness high & extraversion high"}


def test_save_figure_writes_small_html_without_bundle(tmp_path, maps):
    fig = figures.layer_distribution_figure(layer_counts(maps))
    html, spec = figures.save_figure(fig, tmp_path, "dist", png=False)
    text = html.read_text()
    assert html.stat().st_size < 50_000 and "cdn.plot.ly" in text
    # The JSON twin is the same figure: read back, it draws the same traces and layout.
    assert spec == tmp_path / "dist.json"
    back = plotly.io.read_json(spec)
    assert back.to_plotly_json() == go.Figure(fig).to_plotly_json()
    html, _ = figures.save_figure(fig, tmp_path / "offline", "dist", png=False, plotlyjs="directory")
    assert (tmp_path / "offline" / "plotly.min.js").exists() and html.stat().st_size < 50_000
    with pytest.raises(ValueError, match="never a full bundle"):
        figures.save_figure(fig, tmp_path, "dist", png=False, plotlyjs=True)


# Skipped only outside CI: CI installs Chromium (scripts/install.sh --test), so there it must run.
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("google-chrome") or shutil.which("chrome"))
                    and not os.environ.get("CI"), reason="PNG export needs Chrome/Chromium")
def test_png_export_renders_an_image(tmp_path, maps):
    fig = figures.layer_distribution_figure(layer_counts(maps))
    paths = figures.save_figure(fig, tmp_path, "dist")
    assert [p.suffix for p in paths] == [".html", ".json", ".png"]
    png = paths[2].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_demo_writes_its_figures_into_its_run_folder(tiny_model, tmp_path, monkeypatch):
    """figures/ of the repository changes only through `dpn-lens study ... --out figures`, never the demo."""
    import dpn_lens.models
    from dpn_lens.demo import run_demo

    monkeypatch.chdir(tmp_path)   # a relative "figures" folder would appear here
    monkeypatch.setattr(dpn_lens.models, "load_model", lambda *args, **kwargs: tiny_model)
    summary = run_demo("tiny", out="runs/demo", n_pairs=4, max_new_tokens=1, traits=["openness"])
    assert not (tmp_path / "figures").exists()
    written = sorted((tmp_path / "runs" / "demo" / "figures").glob("layers_*"))
    assert {p.suffix for p in written} >= {".html", ".json"}
    assert summary["figures"] and all(path.startswith("runs/demo/figures/") for path in summary["figures"])
    # Where the time went, per stage (the closing notes report these).
    stages = summary["seconds_by_stage"]
    assert {"load", "locate", "calibration", "figures"} <= set(stages)  # 4 pairs: an empty map, no answers
    assert sum(stages.values()) <= summary["seconds_total"] + 0.5 and all(v >= 0 for v in stages.values())


def test_demo_says_so_when_a_map_selects_no_neurons(tiny_model, tmp_path, monkeypatch):
    """4 pairs cannot pass the chance bound: the demo reports the empty map instead of failing in steer()."""
    import dpn_lens.models
    from dpn_lens.demo import run_demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dpn_lens.models, "load_model", lambda *args, **kwargs: tiny_model)
    with pytest.warns(UserWarning, match="selects no neurons|no neurons"):
        summary = run_demo("tiny", out="runs/demo", n_pairs=4, max_new_tokens=1, traits=["openness"])
    assert summary["traits"]["openness"]["high"] + summary["traits"]["openness"]["low"] == 0
    assert "no neurons selected" in summary["generations"]["openness"][0]["note"]


def test_committed_figures_folder_is_current_output():
    """figures/ is what README's regeneration command writes today: every plotly HTML has the JSON twin
    that the report reads, and every Markdown table keeps its column count on every row (an unescaped
    `|` inside a cell, as in `top|d|`, splits the row)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "figures"
    html = sorted(folder.glob("*.html"))
    assert html, "figures/ holds no figures"
    assert [p.name for p in html if not p.with_suffix(".json").exists()] == []
    for table in folder.glob("*.md"):
        rows = [line for line in table.read_text().splitlines() if line.startswith("|")]
        cells = {len(line.replace("\\|", "").strip("|").split("|")) for line in rows}
        assert len(cells) == 1, f"{table.name}: rows with {sorted(cells)} cells"
