"""``dpn-lens report``: one self-contained page holding a run's tables and every figure, drawn in a real browser."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile

import plotly.graph_objects as go
import pytest

from dpn_lens.localize import locate
from dpn_lens.io import write_json_atomic
from dpn_lens.html_report import build_report, figure_from_html, markdown_to_html, register, write_report
from dpn_lens.run import Run
from dpn_lens.studies.outputs import layers_study, overlap_study_report

from helpers import random_stats


@pytest.fixture
def run_with_studies(tmp_path):
    """A run folder (maps, stats, summary.json) with the layer and overlap studies written to figures/."""
    run_dir, figures_dir = tmp_path / "run", tmp_path / "figures"
    maps, stats = {}, {}
    for seed, trait in enumerate(["openness", "extraversion"]):
        stats[trait] = random_stats(trait, seed)
        maps[trait] = locate(stats[trait], q=0.95, tau_d=0.2, layers=[2, 3, 4, 5])
        stats[trait].save(run_dir / "stats" / f"{trait}.safetensors")
        maps[trait].save(run_dir / "maps" / f"{trait}.safetensors")
    summary = Run(run_dir, maps, stats, seconds={"openness": 1.0, "extraversion": 2.0}, model_name="constructed").summary_dict()
    summary["generations"] = {"openness": ["Q: <b>hi</b>?\n  unsteered: fine"]}
    write_json_atomic(run_dir / "summary.json", summary)
    run = Run.load(run_dir)
    layers_study(run, figures_dir, png=False, log=None)
    overlap_study_report(run, figures_dir, png=False, log=None)
    return run_dir, figures_dir


def test_figure_from_html_reads_back_the_plotly_figure(tmp_path):
    fig = go.Figure(go.Bar(x=["a", "b"], y=[3, 5], name="bars"), layout={"title": {"text": "T"}})
    fig.write_html(tmp_path / "f.html", include_plotlyjs="cdn", config={"displaylogo": False})
    spec = figure_from_html(tmp_path / "f.html")
    assert spec["data"][0]["name"] == "bars" and list(spec["data"][0]["x"]) == ["a", "b"]
    assert spec["layout"]["title"]["text"] == "T" and spec["config"]["displaylogo"] is False
    (tmp_path / "g.html").write_text("<html><body>no figure</body></html>")
    with pytest.raises(ValueError, match="no Plotly.newPlot"):
        figure_from_html(tmp_path / "g.html")


def test_markdown_tables_headings_code_and_escaping():
    page = markdown_to_html("# Title\n\n| a | b<c |\n|---|---|\n| 1 | `x` |\n\n```\n<raw>\n```\n- item **bold**")
    assert "<h3>Title</h3>" in page
    assert "<th>b&lt;c</th>" in page and "<td><code>x</code></td>" in page
    assert "<pre><code>&lt;raw&gt;</code></pre>" in page and "<li>item <strong>bold</strong></li>" in page


def test_report_gathers_every_table_and_figure(run_with_studies, tmp_path):
    run_dir, figures_dir = run_with_studies
    report = build_report(run_dir, [figures_dir])
    html_figures = sorted(figures_dir.glob("*.html"))
    assert report.n_plotly == len(html_figures) == len(report.figures)
    md_tables = {p.name for p in figures_dir.glob("*.md")}
    assert md_tables <= {t.name for t in report.tables}
    # CSVs without a Markdown twin are included (folded); those with one are not duplicated.
    assert "overlap_per_layer.csv" in {t.name for t in report.tables}
    assert "overlap_pairs.csv" not in {t.name for t in report.tables}
    out = write_report(run_dir, tmp_path / "page.html", figures=[figures_dir])
    page = out.read_text()
    assert page.count('class="dpn-plotly"') == len(html_figures)
    # Self-contained: plotly.js inlined exactly once, nothing loaded from the network.
    assert not re.search(r"<script[^>]+src=", page)
    assert page.count("Plotly.newPlot") >= 1 and len(page) > 3_000_000
    # The run's own tables: settings per trait and the neurons-per-layer table from the maps.
    maps = Run.load(run_dir).maps
    assert f"<td>{maps['openness'].n_selected('high')}</td>" in page and "% all MLP" in page
    assert "&lt;b&gt;hi&lt;/b&gt;" in page and "<b>hi</b>" not in page  # generations are escaped


def test_cdn_page_is_small_and_the_default_output_lives_in_the_run(run_with_studies):
    run_dir, figures_dir = run_with_studies
    out = write_report(run_dir, figures=[figures_dir], plotlyjs="cdn")
    assert out == run_dir / "report.html"
    page = out.read_text()
    assert len(page) < 1_500_000 and re.search(r'<script src="https://cdn.plot.ly/plotly-[\d.]+\.min.js">', page)
    # A second report does not swallow the first one as a "figure".
    assert build_report(run_dir, [figures_dir]).n_plotly == len(list(figures_dir.glob("*.html")))
    with pytest.raises(ValueError, match="inline"):
        write_report(run_dir, figures=[figures_dir], plotlyjs="png")


def test_png_only_figures_are_inlined(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 20
    (folder / "gamma_sweep.png").write_bytes(png)
    (folder / "comparison.md").write_text("# Comparison\n\n| method | kl |\n|---|---|\n| dpn-le | 0.1 |\n")
    report = build_report(folder)
    assert [f.section for f in report.figures] == ["compare"] and report.figures[0].png == png
    assert "data:image/png;base64," in report.html("cdn") and "<td>dpn-le</td>" in report.html("cdn")


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no maps/"):
        build_report(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="figures folder"):
        build_report(tmp_path / "empty", [tmp_path / "nope"])


def test_cli_report_command(run_with_studies, tmp_path, capsys):
    run_dir, figures_dir = run_with_studies
    parser = argparse.ArgumentParser(prog="dpn-lens")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run_dir), "--figures", str(figures_dir), "--out", str(tmp_path / "r.html")])
    assert args.handler(args) == 0
    assert (tmp_path / "r.html").exists() and "figures" in capsys.readouterr().out


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


# Skipped only outside CI: CI installs Chromium (scripts/install.sh --test), so there it must run.
@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"),
                    reason="needs Chromium (apt-get install chromium; scripts/install.sh --test)")
def test_every_figure_renders_in_headless_chromium(run_with_studies, tmp_path):
    run_dir, figures_dir = run_with_studies
    out = write_report(run_dir, tmp_path / "page.html", figures=[figures_dir])
    n_figures = build_report(run_dir, [figures_dir]).n_plotly
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=30000"]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(flags + [f"--user-data-dir={profile}", "--dump-dom", out.as_uri()],
                             capture_output=True, text=True, timeout=180).stdout
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(flags + [f"--user-data-dir={profile}", f"--screenshot={tmp_path / 'page.png'}",
                                "--window-size=1280,2000", out.as_uri()], capture_output=True, timeout=180)
    status = re.search(r'<span id="dpn-report-status"([^>]*)>', dom)
    assert status, "the page's status marker is missing from the DOM"
    attributes = dict(re.findall(r'data-(\w+)="([^"]*)"', status.group(1)))
    assert attributes.get("done") == "1" and "error" not in attributes, attributes
    assert int(attributes["rendered"]) == int(attributes["total"]) == n_figures
    assert f"[rendered {n_figures}/{n_figures}]" in re.search(r"<title>([^<]*)</title>", dom).group(1)
    # Each drawn figure holds plotly's SVG layers.
    drawn = re.findall(r'<div class="dpn-plotly[^"]*"[^>]*data-rendered="1"', dom)
    assert len(drawn) == n_figures
    assert dom.count('class="main-svg"') >= 2 * n_figures
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_report_sections_come_from_the_studies_declarations():
    from pathlib import Path

    from dpn_lens import html_report
    from dpn_lens.studies import STUDY_SECTIONS, layers, overlap

    assert html_report.SECTIONS[:len(STUDY_SECTIONS)] == STUDY_SECTIONS
    assert layers.REPORT_SECTION in STUDY_SECTIONS and overlap.REPORT_SECTION in STUDY_SECTIONS
    for section in STUDY_SECTIONS:
        assert html_report._section(Path(f"{section.key}_anything.csv")) == section.key
    assert html_report._section(Path("rows.csv")) == "compare" and html_report._section(Path("x.csv")) == "other"
