"""``dpn-lens report``: one self-contained page holding a run's tables and every figure, drawn in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import plotly.graph_objects as go
import pytest

from dpn_lens.answers import Generation
from dpn_lens.localization.localize import locate
from dpn_lens.report import html as report_module
from dpn_lens.figures import save_figure
from dpn_lens.io import markdown_table, write_json_atomic
from dpn_lens.report.html import (PLOTLY_FILE, build_report, figure_from_file, figure_from_html, markdown_to_html,
                                  write_report)
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
    from dpn_lens.cli import main

    run_dir, figures_dir = run_with_studies
    assert main(["report", "--run", str(run_dir), "--figures", str(figures_dir), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").exists() and "figures" in capsys.readouterr().out
    # The positional run folder of earlier releases still works, saying the new spelling.
    assert main(["report", str(run_dir), "--out", str(tmp_path / "old.html")]) == 0
    assert (tmp_path / "old.html").exists() and "--run" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path / "none.html")]) == 2
    assert "pass --run DIR" in capsys.readouterr().err


def test_report_plotlyjs_directory_writes_the_bundle_beside_the_page(run_with_studies, tmp_path):
    from plotly.offline import get_plotlyjs

    run_dir, figures_dir = run_with_studies
    out = write_report(run_dir, tmp_path / "site" / "page.html", figures=[figures_dir], plotlyjs="directory")
    page = out.read_text(encoding="utf-8")
    assert f'<script src="{PLOTLY_FILE}"></script>' in page and get_plotlyjs()[:200] not in page
    assert (out.parent / PLOTLY_FILE).read_text(encoding="utf-8") == get_plotlyjs()


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

    from dpn_lens.report import html as html_report
    from dpn_lens.studies import STUDY_SECTIONS, layers, overlap

    assert html_report.SECTIONS[:len(STUDY_SECTIONS)] == STUDY_SECTIONS
    assert layers.REPORT_SECTION in STUDY_SECTIONS and overlap.REPORT_SECTION in STUDY_SECTIONS
    for section in STUDY_SECTIONS:
        assert html_report._section(Path(f"{section.key}_anything.csv")) == section.key
    assert html_report._section(Path("rows.csv")) == "compare" and html_report._section(Path("x.csv")) == "other"


# ----- the summary, figure JSON, Markdown tables, identical answers, and the layout in a browser ----------
GENERATIONS = {"openness": [Generation("What now?", {"unsteered": "I would go.", "increase": "I would go.",
                                                     "decrease": "I stay home."}).to_dict()],
               "extraversion": [Generation("A party?", {"unsteered": "Maybe.", "increase": "Yes, with\nall my friends!",
                                                        "decrease": "No."}).to_dict()]}


def test_generations_are_read_as_data_and_identical_steered_answers_marked():
    read = report_module.read_generations(GENERATIONS["extraversion"])
    assert read == [Generation("A party?", {"unsteered": "Maybe.", "increase": "Yes, with\nall my friends!",
                                            "decrease": "No."})]
    assert report_module._identical_answers(GENERATIONS) == (1, 4)
    # A run from before the answers were typed stored printed text: shown as it is, not parsed.
    legacy = report_module._generations_html({"openness": ["Q: Hi?\n  unsteered: <b>fine</b>"]})
    assert "<pre>Q: Hi?\n  unsteered: &lt;b&gt;fine&lt;/b&gt;</pre>" in legacy
    assert report_module._identical_answers({"openness": ["Q: Hi?\n  unsteered: fine"]}) == (0, 0)
    page = report_module._generations_html(GENERATIONS)
    rows = re.findall(r"<tr[^>]*>.*?</tr>", page, re.DOTALL)
    marked = [r for r in rows if "= unsteered</span>" in r]
    assert len(marked) == 1 and "<td>openness</td>" in marked[0] and "<td>increase</td>" in marked[0]
    assert 'class="same-row"' in marked[0]


def test_markdown_is_rendered_by_markdown_it_with_escaped_pipes():
    from dpn_lens.io import markdown_table

    table = markdown_table([{"method": "top|d|", "|s|": 0.5, "n": 3}])
    page = markdown_to_html(table)
    header = re.findall(r"<th>([^<]*)</th>", page)
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert header == ["method", "|s|", "n"] and cells == ["top|d|", "0.5", "3"]
    assert "<script>" not in markdown_to_html("<script>alert(1)</script>")   # raw HTML is escaped


def test_figures_are_read_from_their_json_twin(tmp_path):
    fig = go.Figure(go.Bar(x=["a"], y=[1], name="from-json"))
    [html_path, json_path] = save_figure(fig, tmp_path, "f", png=False)
    assert figure_from_file(html_path)["data"][0]["name"] == "from-json"
    # The HTML is not what is read when the JSON exists: change the JSON alone and the report follows it.
    spec = json.loads(json_path.read_text())
    spec["data"][0]["name"] = "edited-json"
    json_path.write_text(json.dumps(spec))
    assert figure_from_file(html_path)["data"][0]["name"] == "edited-json"
    json_path.unlink()   # an old folder: the HTML is scraped instead
    assert figure_from_file(html_path)["data"][0]["name"] == "from-json"
    (tmp_path / "f.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a plotly figure"):
        figure_from_file(html_path)


def _comparison(folder, with_intervals: bool) -> dict:
    """A constructed ``comparison.json``: the unsteered row and dpn-le's two directions (shift, kl), every
    other column 0 or absent (no statements shift), with or without a recorded summary."""
    from dpn_lens.evaluation.comparison_record import (ComparisonMeta, ComparisonRecord, ComparisonRow, Interval,
                                                       MethodSummary)

    zero = dict(n_edited=0, pct_edited=0.0, questionnaire=0.0, option_mass=0.0, statements_high=0.0,
                statements_low=0.0, statements_gap=0.0, wikitext_ppl=0.0, seconds=0.0)
    rows = (ComparisonRow(method="unsteered", trait="openness", direction="none", trait_shift=0.0, kl=0.0, **zero),
            ComparisonRow(method="dpn-le", trait="openness", direction="increase", trait_shift=0.4, kl=0.02, **zero),
            ComparisonRow(method="dpn-le", trait="openness", direction="decrease", trait_shift=0.2, kl=0.04, **zero))
    summary = ((MethodSummary("dpn-le", 2, {"trait_shift": 0.3, "kl": 0.03}, {"trait_shift": Interval(0.1, 0.5, 0.01)}),)
               if with_intervals else None)
    record = ComparisonRecord(rows=rows, summary=summary, judged=None,
                              meta=ComparisonMeta(model="constructed", n_mlp_neurons=96, config={}, seconds=0.0))
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "comparison.json", record.to_dict())
    return record.to_dict()


def test_summary_comes_first_with_neurons_per_pole_and_headline_numbers(run_with_studies, tmp_path):
    run_dir, figures_dir = run_with_studies
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["generations"] = GENERATIONS
    write_json_atomic(run_dir / "summary.json", summary)
    _comparison(tmp_path / "compare", with_intervals=False)
    report = build_report(run_dir, [figures_dir, tmp_path / "compare"])
    page = report.html("cdn")
    body = page[page.index("<main>"):]
    assert body.index('<section id="summary">') < body.index('id="overview"') < body.index("dpn-plotly")
    first = re.search(r"<h1>.*?</h1>\s*(<[^>]+>)", body, re.DOTALL).group(1)
    assert first == '<section id="summary">'
    section = body[body.index('<section id="summary">'):body.index("</section>")]
    maps = Run.load(run_dir).maps
    for trait, neuron_map in maps.items():
        assert (f"<td>{trait}</td><td>{neuron_map.n_selected('high')}</td><td>{neuron_map.n_selected('low')}</td>"
                in section)
    assert "constructed" in section and "openness, extraversion" in section
    # Means per method computed from the rows: dpn-le's trait_shift (0.4 + 0.2) / 2, statements_gap 0,
    # kl (0.02 + 0.04) / 2, wikitext_ppl 0.
    dpn = re.search(r"<tr><td>dpn-le</td>(.*?)</tr>", section).group(1)
    assert re.findall(r"<td>([^<]*)</td>", dpn) == ["2", f"{0.3:.4g}", "0", f"{0.03:.4g}", "0"]
    assert "recorded no intervals" in section
    assert "1 of 4 steered answers are identical" in section


def test_headline_shows_intervals_when_the_comparison_has_them(run_with_studies, tmp_path):
    run_dir, _ = run_with_studies
    _comparison(tmp_path / "compare", with_intervals=True)
    section = build_report(run_dir, [tmp_path / "compare"]).summary
    text = "".join(section)
    assert "<td>0.3 [0.1, 0.5]</td>" in text and "<td>0.03</td>" in text and "95% interval" in text


@pytest.mark.parametrize("typed", [True, False], ids=["typed rows", "an earlier release's preference dict"])
def test_the_demos_preference_check_is_in_the_summary_with_its_intervals(run_with_studies, typed):
    from dpn_lens.evaluation.shifts import rows_of_record

    run_dir, _ = run_with_studies
    summary = json.loads((run_dir / "summary.json").read_text())
    effect = lambda shift, low, high: {"shift": shift, "ci_low": low, "ci_high": high, "p": 0.01}  # noqa: E731
    record = {"trait": "openness", "gamma": {"increase": 5.5, "decrease": 6.0}, "preference": {
        "n_pairs": 30, "increase": effect(0.02, 0.005, 0.04), "decrease": effect(-0.03, -0.05, -0.01),
        "attribution-t-increase": effect(0.05, 0.03, 0.07), "attribution-t-decrease": effect(0.01, -0.01, 0.03),
        "persona": effect(0.12, 0.08, 0.17)},
        "rules": {"attribution-t": {"gamma": {"increase": 25.0, "decrease": 30.0}}}}
    if typed:   # what the demo writes now: the same numbers as ShiftRows
        record = {"trait": "openness", "shifts": [row.to_dict() for row in rows_of_record(record)]}
    summary["evidence"] = {"openness": record}
    write_json_atomic(run_dir / "summary.json", summary)
    text = "".join(build_report(run_dir).summary)
    rows = re.findall(r"<tr><td>openness</td>(.*?)</tr>", text[text.index("Does the edit steer"):])
    assert [re.findall(r"<td>([^<]*)</td>", row) for row in rows] == [
        ["DPN-LE", "30", "+0.020 [+0.005, +0.040] moved as asked (gamma 5.5)",
         "-0.030 [-0.050, -0.010] moved the wrong way (gamma 6)", "+0.120 [+0.080, +0.170] moved as asked"],
        ["attribution-t", "30", "+0.050 [+0.030, +0.070] moved as asked (gamma 25)",
         "+0.010 [-0.010, +0.030] CI includes 0 (gamma 30)", ""]]


def test_a_comparison_folder_alone_names_its_model_and_traits(tmp_path):
    _comparison(tmp_path / "compare", with_intervals=False)
    (tmp_path / "compare" / "comparison.md").write_text("# Comparison\n")
    text = "".join(build_report(tmp_path / "compare").summary)
    assert "<td>model</td><td>constructed</td>" in text and "<td>traits</td><td>openness</td>" in text


def test_same_named_files_show_once_preferring_the_figures_folder(run_with_studies):
    run_dir, figures_dir = run_with_studies
    # The demo's own copy of the layer figures (runs/demo/figures) and the study's (--figures figures).
    layers_study(Run.load(run_dir), run_dir / "figures", png=False, log=None)
    report = build_report(run_dir, [figures_dir])
    names = [f.name for f in report.figures]
    assert len(names) == len(set(names))
    assert all(f.source.parent == figures_dir for f in report.figures)
    assert any("layers_distribution.html not shown" in note for note in report.notes)


def _browser_dump(page_uri: str, width: int, screenshot) -> str:
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             "--virtual-time-budget=30000", f"--window-size={width},1400"]
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(flags + [f"--user-data-dir={profile}", "--dump-dom", page_uri],
                             capture_output=True, text=True, timeout=180).stdout
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(flags + [f"--user-data-dir={profile}", f"--screenshot={screenshot}", page_uri],
                       capture_output=True, timeout=180)
    return dom


@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"),
                    reason="needs Chromium (apt-get install chromium; scripts/install.sh --test)")
@pytest.mark.parametrize("width", [1280, 900])
def test_page_fits_the_window_in_headless_chromium(tmp_path, width):
    """30-panel d-vs-s grids (1600 px wide as saved), a 16-column table and long answers: nothing wider than the window."""
    run_dir, figures_dir = tmp_path / "run", tmp_path / "figures"
    maps, stats = {}, {}
    for seed, trait in enumerate(["openness", "extraversion"]):
        stats[trait] = random_stats(trait, seed, n_layers=30, d_mlp=64)
        maps[trait] = locate(stats[trait], q=0.9, tau_d=0.2, layers=list(range(30)))
        stats[trait].save(run_dir / "stats" / f"{trait}.safetensors")
        maps[trait].save(run_dir / "maps" / f"{trait}.safetensors")
    summary = Run(run_dir, maps, stats, model_name="constructed").summary_dict()
    summary["generations"] = {t: [Generation("Why? " * 30, {"unsteered": "word " * 200, "increase": "word " * 200}).to_dict()]
                              for t in maps}
    write_json_atomic(run_dir / "summary.json", summary)
    layers_study(Run.load(run_dir), figures_dir, png=False, log=None)
    assert max(json.loads(p.read_text())["layout"].get("width", 0) for p in figures_dir.glob("*.json")
               if "layout" in p.read_text()) > width   # the saved figures really are wider than the window
    _comparison(tmp_path / "compare", with_intervals=True)
    (tmp_path / "compare" / "wide.md").write_text(markdown_table(
        [{f"column_number_{i}": 123456.789 * i for i in range(16)}]))
    out = write_report(run_dir, tmp_path / "page.html", figures=[figures_dir, tmp_path / "compare"])
    n_figures = build_report(run_dir, [figures_dir, tmp_path / "compare"]).n_plotly
    screenshot = Path(os.environ.get("DPN_LENS_REPORT_SCREENSHOT_DIR", tmp_path)) / f"report_{width}.png"
    dom = _browser_dump(out.as_uri(), width, screenshot)
    status = dict(re.findall(r'data-(\w+)="([^"]*)"', re.search(r'<span id="dpn-report-status"([^>]*)>', dom).group(1)))
    assert status["done"] == "1" and int(status["rendered"]) == int(status["total"]) == n_figures, status
    viewport = int(status["viewport"])
    assert width - 20 <= viewport <= width
    assert status["overflow"] == "0", status.get("overflowing")
    assert int(status["widest"]) <= viewport and int(status["scrollwidth"]) <= viewport
    # The grids are drawn at the page's width and shorter than saved, inside their scrolling box.
    assert dom.count('class="figure grid"') == 2
    # The summary is the first thing under the title in the rendered page too.
    assert re.search(r"<h1>[^<]*</h1>\s*<section id=\"summary\">", dom)
    assert screenshot.stat().st_size > 10_000
