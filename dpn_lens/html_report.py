"""``dpn-lens report RUN_DIR``: one self-contained HTML page with a run's tables and figures.

The page gathers, from a run folder (``dpn-lens locate`` / ``demo``) and any figure folders given:

* the run itself: model, fingerprint, settings and neuron counts per trait (``summary.json`` and the
  maps), the neurons-per-layer table, the demo's steered generations, ``summary.md``;
* study outputs (``dpn-lens study``): every ``*.md`` table, every ``*.csv`` without a Markdown twin
  (first rows), every ``*_summary.json``, grouped by study (``layers_``, ``overlap_``, ``multifunction_``);
* comparison outputs (``dpn-lens compare``): ``comparison.md`` and its tables;
* every figure: plotly figures are read back out of their HTML files (the ``Plotly.newPlot`` call that
  ``plotly.io.write_html`` writes) and redrawn on the page; a figure that exists only as a PNG is
  inlined as base64.

Why plotly.js inline (default) rather than PNGs: the page must work offline and from one file (mail it,
attach it to a paper's supplement), and the figures stay interactive (hover shows layer, neuron, d and
s, which is most of their value). plotly.js is inlined *once* (~4.7 MB) however many figures there are;
``plotlyjs="cdn"`` gives a ~100 kB page that needs the network instead.

When the page has drawn every figure, it sets ``document.title`` to end in ``[rendered N/N]`` and fills
``#dpn-report-status`` (``data-done="1"``, ``data-rendered``, ``data-total``), so a headless browser
can check that it rendered.

Example:
    >>> write_report("runs/demo", figures=["figures"])          # doctest: +SKIP
    PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from dpn_lens.cli_options import FORMATTER, add_out_option
from dpn_lens.io import write_text_atomic
from dpn_lens.run import MAPS_DIR, REPORT_FILE, STATS_DIR, SUMMARY_FILE, SUMMARY_MD_FILE, Run, read_summary
from dpn_lens.studies import STUDY_SECTIONS
from dpn_lens.studies.section import ReportSection

__all__ = ["ReportFigure", "ReportTable", "Report", "build_report", "write_report", "figure_from_html",
           "markdown_to_html", "register", "run_report"]

PlotlyJs = Literal["inline", "cdn"]
GENERATOR = "dpn-lens report"
CSV_ROWS = 100
"""Rows of a CSV table shown on the page (the file holds them all)."""
OPEN_ROWS = 30
"""Tables longer than this are folded (``<details>``) so the figures stay in view."""

COMPARE_SECTION = ReportSection("compare", "Method comparison",
                                names=frozenset({"comparison", "rows", "gamma_sweep", "q_sweep", "respondents",
                                                 "tradeoff"}),
                                prefixes=("comparison",))
"""The files `dpn-lens compare` writes."""
OTHER_SECTION = ReportSection("other", "Other files")
SECTIONS: tuple[ReportSection, ...] = (*STUDY_SECTIONS, COMPARE_SECTION, OTHER_SECTION)
"""The page's sections in order: each study's (as the study declares it), the comparison, the rest."""
SKIP_DIRS = {MAPS_DIR, STATS_DIR, ".ipynb_checkpoints", "__pycache__"}


@dataclass
class ReportFigure:
    """One figure of the page: plotly JSON (``spec``) or, failing that, a PNG (``png``)."""

    name: str
    source: Path
    section: str
    spec: dict[str, Any] | None = None
    png: bytes | None = None


@dataclass
class ReportTable:
    """One table (or JSON summary) of the page, already as HTML."""

    name: str
    source: Path
    section: str
    html: str
    collapsed: bool = False


@dataclass
class Report:
    """Everything the page shows; ``html`` renders it."""

    run_dir: Path
    title: str
    overview: list[str] = field(default_factory=list)
    figures: list[ReportFigure] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def n_plotly(self) -> int:
        return sum(1 for f in self.figures if f.spec is not None)

    def html(self, plotlyjs: PlotlyJs = "inline") -> str:
        return _render_page(self, plotlyjs)


# ----- reading figures ------------------------------------------------------------------------------
def figure_from_html(path: str | Path) -> dict[str, Any]:
    """The ``{"data", "layout", "config"}`` of the first ``Plotly.newPlot`` call in a plotly HTML file.

    Raises ``ValueError`` when the file holds no such call (not written by plotly's ``write_html``).

    Example:
        >>> spec = figure_from_html("figures/layers_distribution.html")   # doctest: +SKIP
        >>> go.Figure(spec["data"], spec["layout"])                       # doctest: +SKIP
    """
    text = Path(path).read_text(encoding="utf-8")
    start = text.find("Plotly.newPlot(")
    if start < 0:
        raise ValueError(f"{path} holds no Plotly.newPlot call; is it a figure written by plotly's write_html?")
    decoder = json.JSONDecoder()
    position = start + len("Plotly.newPlot(")
    parts = []
    # The arguments are the div id, data, layout and config, each a JSON value separated by commas.
    for _ in range(4):
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            if len(parts) >= 3:  # config is optional
                break
            raise ValueError(f"{path}: could not read the Plotly.newPlot arguments ({error.msg})") from error
        parts.append(value)
    if len(parts) < 3 or not isinstance(parts[1], list) or not isinstance(parts[2], dict):
        raise ValueError(f"{path}: Plotly.newPlot arguments are not (id, data, layout[, config])")
    config = parts[3] if len(parts) > 3 and isinstance(parts[3], dict) else {}
    return {"data": parts[1], "layout": parts[2], "config": config}


def _is_report(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return f'content="{GENERATOR}"' in handle.read(2000)


def _section(path: Path) -> str:
    """The key of the first section that claims the file (``other`` if none does)."""
    return next((section.key for section in SECTIONS if section.matches(path.stem)), OTHER_SECTION.key)


# ----- Markdown and tables --------------------------------------------------------------------------
def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _table_html(rows: Sequence[Sequence[str]], header: Sequence[str] | None, inline: bool = True) -> str:
    cell = _inline if inline else (lambda value: html.escape(str(value), quote=False))
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{cell(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="table-wrap"><table>{head}<tbody>{body}</tbody></table></div>'


def markdown_to_html(text: str, heading_offset: int = 2) -> str:
    """The Markdown subset the runs write (headings, pipe tables, fenced code, lists, paragraphs) as HTML.

    Example:
        >>> markdown_to_html("| a | b |\\n|---|---|\\n| 1 | 2 |")
        '<div class="table-wrap"><table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>2</td></tr></tbody></table></div>'
    """
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append("<p>" + _inline(" ".join(paragraph)) + "</p>")
            paragraph.clear()

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            block = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                block.append(lines[i])
                i += 1
            out.append("<pre><code>" + html.escape("\n".join(block), quote=False) + "</code></pre>")
            i += 1
            continue
        if stripped.startswith("|"):
            flush()
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            is_rule = len(block) > 1 and all(re.fullmatch(r":?-+:?", c) for c in block[1] if c)
            out.append(_table_html(block[2:], block[0]) if is_rule else _table_html(block, None))
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", stripped)
        if heading:
            flush()
            level = min(6, len(heading.group(1)) + heading_offset)
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif re.match(r"[-*]\s+", stripped):
            flush()
            items = []
            while i < len(lines) and re.match(r"\s*[-*]\s+", lines[i]):
                items.append("<li>" + _inline(re.sub(r"^\s*[-*]\s+", "", lines[i])) + "</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif not stripped:
            flush()
        else:
            paragraph.append(stripped)
        i += 1
    flush()
    return "\n".join(out)


def _csv_html(path: Path, max_rows: int = CSV_ROWS) -> str:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return "<p>(empty table)</p>"
    header, body = rows[0], rows[1:]

    def fmt(value: str) -> str:
        try:
            number = float(value)
        except ValueError:
            return value
        return value if number.is_integer() and "." not in value else f"{number:.4g}"

    shown = [[fmt(v) for v in row] for row in body[:max_rows]]
    note = f"<p class='note'>first {max_rows} of {len(body)} rows; all in {html.escape(path.name)}</p>" \
        if len(body) > max_rows else ""
    return _table_html(shown, header, inline=False) + note


# ----- gathering -------------------------------------------------------------------------------------
def _candidate_files(run_dir: Path, figures: Sequence[Path]) -> list[Path]:
    folders = [run_dir] + [p for p in sorted(run_dir.iterdir()) if p.is_dir() and p.name not in SKIP_DIRS]
    folders += list(figures)
    seen: set[Path] = set()
    files: list[Path] = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            resolved = path.resolve()
            if path.is_file() and resolved not in seen:
                seen.add(resolved)
                files.append(path)
    return files


def _overview(run_dir: Path, summary: dict[str, Any], notes: list[str]) -> list[str]:
    from dpn_lens.pipeline import neuron_table
    from dpn_lens.run import percent_of_all_mlp

    parts: list[str] = []
    model = summary.get("model") or summary.get("model_name") or ""
    fingerprint = summary.get("fingerprint") or {}
    maps = {}
    if (run_dir / MAPS_DIR).is_dir():
        from dpn_lens.run import check_run_folder

        check_run_folder(run_dir)   # an unfinished or mixed run is refused, not rendered as a finished one
        try:
            maps = Run.load(run_dir, check=False).maps
        except (FileNotFoundError, ValueError) as error:
            notes.append(f"neuron maps not read: {error}")
    if maps and not fingerprint:
        fingerprint = next(iter(maps.values())).fingerprint
    facts = [("run folder", str(run_dir)), ("model", model or "(not recorded)")]
    facts += [(key, str(value)) for key, value in fingerprint.items()]
    for key in ("n_pairs", "gamma", "seconds_locate", "seconds_total"):
        if key in summary:
            facts.append((key, str(summary[key])))
    parts.append(_table_html([[k, v] for k, v in facts], ["", ""], inline=False))

    traits = summary.get("traits") or {}
    rows, reasons = [], []
    for trait, neuron_map in maps.items():
        entry = traits.get(trait, {})
        rows.append([trait, str(neuron_map.n_selected("high")), str(neuron_map.n_selected("low")),
                     f"{100 * neuron_map.fraction_selected():.3f}", f"{percent_of_all_mlp(neuron_map):.3f}",
                     neuron_map.settings.layer_range, f"{neuron_map.settings.q:g}", f"{neuron_map.settings.tau_d:g}",
                     neuron_map.settings.source, str(neuron_map.n_high_samples), neuron_map.data_source,
                     str(entry.get("seconds", ""))])
        reasons.append(f"{trait}: {neuron_map.settings.reason}")
    if not maps:  # a summary without maps (copied elsewhere): show what it recorded
        for trait, entry in traits.items():
            rows.append([trait, str(entry.get("high", "")), str(entry.get("low", "")),
                         f"{entry.get('percent_of_searched_layers', float('nan')):.3f}",
                         f"{entry.get('percent_of_all_mlp_neurons', float('nan')):.3f}", str(entry.get("layers", "")),
                         str(entry.get("q", "")), str(entry.get("tau_d", "")), str(entry.get("settings_source", "")),
                         str(entry.get("n_pairs", "")), str(entry.get("data_source", "")), str(entry.get("seconds", ""))])
            if entry.get("settings_reason"):
                reasons.append(f"{trait}: {entry['settings_reason']}")
    if rows:
        parts.append("<h3>Settings and selected neurons per trait</h3>")
        parts.append(_table_html(rows, ["trait", "high", "low", "% of searched layers", "% of all MLP neurons",
                                        "layers", "q", "tau_d", "settings", "pairs", "data", "seconds"], inline=False))
        parts.append("<ul class='reasons'>" + "".join(f"<li>{html.escape(r)}</li>" for r in reasons) + "</ul>")
    if maps:
        parts.append("<h3>Neurons per layer (high / low per trait)</h3>")
        parts.append(markdown_to_html(neuron_table(maps)))
    generations = summary.get("generations") or {}
    if generations:
        parts.append("<h3>Unsteered vs steered answers (greedy)</h3>")
        for trait, blocks in generations.items():
            parts.append(f"<h4>{html.escape(trait)}</h4><pre>{html.escape(chr(10).join(blocks))}</pre>")
    return parts


def build_report(run_dir: str | Path, figures: Sequence[str | Path] = (), csv_rows: int = CSV_ROWS) -> Report:
    """Gather what the page of ``run_dir`` (and the extra ``figures`` folders) shows, without writing it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; pass the folder written by "
                                "`dpn-lens locate --out` / `dpn-lens demo --out`")
    figure_dirs = [Path(f) for f in figures]
    for folder in figure_dirs:
        if not folder.is_dir():
            raise FileNotFoundError(f"figures folder {folder} does not exist; pass the --out folder of "
                                    "`dpn-lens study` / `dpn-lens compare` (or the demo's --figures)")
    summary = read_summary(run_dir)
    model = summary.get("model") or summary.get("model_name") or ""
    report = Report(run_dir, f"dpn-lens report: {run_dir.name}" + (f" ({model})" if model else ""))
    report.overview = _overview(run_dir, summary, report.notes)

    files = _candidate_files(run_dir, figure_dirs)
    stems_with_md = {(p.parent, p.stem) for p in files if p.suffix == ".md"}
    html_figures = {(p.parent, p.stem) for p in files if p.suffix == ".html"}
    for path in files:
        section = _section(path)
        if path.suffix == ".html":
            if _is_report(path):
                continue
            try:
                report.figures.append(ReportFigure(path.stem, path, section, spec=figure_from_html(path)))
            except ValueError as error:
                png = path.with_suffix(".png")
                if png.exists():
                    report.figures.append(ReportFigure(path.stem, png, section, png=png.read_bytes()))
                else:
                    report.notes.append(f"figure {path} skipped: {error}")
        elif path.suffix == ".png" and (path.parent, path.stem) not in html_figures:
            report.figures.append(ReportFigure(path.stem, path, section, png=path.read_bytes()))
        elif path.suffix == ".md" and path.parent == run_dir and path.name == SUMMARY_MD_FILE:
            report.tables.append(ReportTable(SUMMARY_MD_FILE, path, "other", markdown_to_html(path.read_text("utf-8")),
                                             collapsed=True))
        elif path.suffix == ".md":
            report.tables.append(ReportTable(path.name, path, section, markdown_to_html(path.read_text("utf-8"))))
        elif path.suffix == ".csv" and (path.parent, path.stem) not in stems_with_md and section != "compare":
            report.tables.append(ReportTable(path.name, path, section, _csv_html(path, csv_rows), collapsed=True))
        elif path.suffix == ".csv" and section == "compare" and not any(
                p.name == "comparison.md" and p.parent == path.parent for p in files):
            report.tables.append(ReportTable(path.name, path, section, _csv_html(path, csv_rows)))
        elif path.suffix == ".json" and path.stem.endswith("_summary"):
            text = json.dumps(json.loads(path.read_text("utf-8")), indent=2)
            report.tables.append(ReportTable(path.name, path, section, f"<pre>{html.escape(text)}</pre>",
                                             collapsed=True))
    # Overview figures (counts, heatmaps) before the many-panel per-trait scatters.
    report.figures.sort(key=lambda f: ("d_vs_s" in f.name, f.name))
    if not report.overview[1:] and not report.figures and not report.tables:
        raise FileNotFoundError(f"{run_dir} holds no maps/, summary.json, tables or figures; pass the folder written "
                                "by `dpn-lens locate` / `dpn-lens demo`, and --figures for the study/compare outputs")
    return report


# ----- rendering -------------------------------------------------------------------------------------
_STYLE = """
body{font-family:Arial,Helvetica,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1440px;margin:0 auto;padding:16px 28px 60px}
h1{font-size:24px;margin:18px 0 4px}h2{font-size:20px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{font-size:16px;margin-top:22px}h4{font-size:14px;margin-bottom:4px}
.meta,.note{color:#666;font-size:12px}
.table-wrap{overflow-x:auto;margin:6px 0 12px}
table{border-collapse:collapse;font-size:12px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
pre{background:#fff;border:1px solid #ddd;padding:8px;font-size:12px;overflow-x:auto;white-space:pre-wrap}
.figure{background:#fff;border:1px solid #e3e3e3;margin:12px 0;padding:6px;overflow-x:auto}
.figure .caption{font-size:11px;color:#777;margin-top:4px}
.figure img{max-width:100%}
nav a{margin-right:14px;font-size:13px}
#dpn-report-status{font-size:12px;color:#666}
ul.reasons{font-size:12px;color:#444}
details{margin:6px 0}summary{cursor:pointer;font-size:14px;font-weight:bold}
"""

_SCRIPT = """
(function () {
  var status = document.getElementById("dpn-report-status");
  var divs = Array.prototype.slice.call(document.querySelectorAll("div.dpn-plotly"));
  function finish(ok, error) {
    status.dataset.rendered = String(ok);
    status.dataset.total = String(divs.length);
    if (error) { status.dataset.error = error; }
    status.dataset.done = "1";
    status.textContent = "figures drawn: " + ok + " of " + divs.length + (error ? " (" + error + ")" : "");
    document.title = document.title + " [rendered " + ok + "/" + divs.length + "]";
  }
  if (typeof Plotly === "undefined") { finish(0, "plotly.js did not load"); return; }
  var jobs = divs.map(function (div) {
    try {
      var spec = JSON.parse(document.getElementById(div.dataset.spec).textContent);
      return Plotly.newPlot(div, spec.data, spec.layout, spec.config).then(
        function () { div.dataset.rendered = "1"; return true; },
        function (e) { div.dataset.error = String(e); return false; });
    } catch (e) { div.dataset.error = String(e); return Promise.resolve(false); }
  });
  Promise.all(jobs).then(function (results) {
    finish(results.filter(function (r) { return r; }).length, "");
  });
})();
"""


def _json_script(obj: Any, element_id: str) -> str:
    # "</" inside a <script> would end it; "<\\/" is the same string in JSON.
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _plotly_script(plotlyjs: PlotlyJs) -> str:
    if plotlyjs == "inline":
        from plotly.offline import get_plotlyjs

        return "<script type=\"text/javascript\">" + get_plotlyjs().replace("</script", "<\\/script") + "</script>"
    if plotlyjs == "cdn":
        from plotly.offline import get_plotlyjs_version

        return f'<script src="https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"></script>'
    raise ValueError(f"plotlyjs must be 'inline' (offline, one file) or 'cdn' (small page, needs the network), "
                     f"got {plotlyjs!r}")


def _clean_spec(spec: dict[str, Any]) -> dict[str, Any]:
    config = dict(spec.get("config") or {})
    config.setdefault("displaylogo", False)
    config.setdefault("responsive", True)
    return {"data": spec["data"], "layout": spec["layout"], "config": config}


def _render_page(report: Report, plotlyjs: PlotlyJs) -> str:
    from dpn_lens._version import __version__

    plotly_tag = _plotly_script(plotlyjs)  # validates plotlyjs before any work
    sections: list[str] = []
    nav = ['<a href="#overview">Run</a>']
    figure_index = 0
    for section in SECTIONS:
        key, title = section.key, section.title
        figures = [f for f in report.figures if f.section == key]
        tables = [t for t in report.tables if t.section == key]
        if not figures and not tables:
            continue
        nav.append(f'<a href="#{key}">{html.escape(title)}</a>')
        body = [f'<h2 id="{key}">{html.escape(title)}</h2>']
        for figure in figures:
            caption = f'<div class="caption">{html.escape(str(figure.source))}</div>'
            if figure.spec is not None:
                element = f"dpn-fig-{figure_index}"
                body.append(f'<div class="figure"><div class="dpn-plotly" id="{element}-div" data-spec="{element}"></div>'
                            f"{_json_script(_clean_spec(figure.spec), element)}{caption}</div>")
                figure_index += 1
            else:
                encoded = base64.b64encode(figure.png or b"").decode("ascii")
                body.append(f'<div class="figure"><img alt="{html.escape(figure.name)}" '
                            f'src="data:image/png;base64,{encoded}">{caption}</div>')
        # Figures first: a long table would push them out of sight. Long tables fold away.
        for table in (t for t in tables if not t.collapsed):
            if table.html.count("<tr>") > OPEN_ROWS:
                body.append(f"<details><summary>{html.escape(table.name)}</summary>{table.html}</details>")
            else:
                body.append(f"<h3>{html.escape(table.name)}</h3>{table.html}")
        for table in (t for t in tables if t.collapsed):
            body.append(f"<details><summary>{html.escape(table.name)}</summary>{table.html}</details>")
        sections.append("\n".join(body))
    notes = "" if not report.notes else (
        "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in report.notes) + "</ul>")
    created = datetime.datetime.now().isoformat(timespec="seconds")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta name="generator" content="{GENERATOR}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(report.title)}</title><style>{_STYLE}</style>", plotly_tag, "</head><body><main>",
        f"<h1>{html.escape(report.title)}</h1>",
        f'<div class="meta">dpn-lens {html.escape(__version__)}, written {created}; '
        f"{len(report.figures)} figures ({report.n_plotly} interactive), {len(report.tables)} tables. "
        f'<span id="dpn-report-status" data-done="0">figures not drawn yet (JavaScript needed)</span></div>',
        "<nav>" + "".join(nav) + "</nav>",
        '<h2 id="overview">Run</h2>', *report.overview, *sections, notes,
        f"<script>{_SCRIPT}</script>", "</main></body></html>"])


def write_report(run_dir: str | Path, out_html: str | Path | None = None, figures: Sequence[str | Path] = (),
                 plotlyjs: PlotlyJs = "inline", csv_rows: int = CSV_ROWS) -> Path:
    """Write the report page of ``run_dir`` and return its path (default ``run_dir/report.html``).

    Args:
        run_dir: folder written by ``dpn-lens locate`` / ``demo`` (maps/, stats/, summary.json); study and
            comparison outputs inside it (or in its direct subfolders) are included too.
        out_html: the page to write.
        figures: more folders with study / comparison outputs (``dpn-lens study --out``, ``compare --out``).
        plotlyjs: ``"inline"`` (default: plotly.js embedded once, works offline) or ``"cdn"``.
        csv_rows: rows shown of each CSV table that has no Markdown version.

    Example:
        >>> write_report("runs/demo", figures=["figures"])       # doctest: +SKIP
        PosixPath('runs/demo/report.html')
    """
    report = build_report(run_dir, figures, csv_rows)
    out = Path(out_html) if out_html is not None else Path(run_dir) / REPORT_FILE
    return write_text_atomic(out, report.html(plotlyjs))


# ----- command line ----------------------------------------------------------------------------------
def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report RUN_DIR [--figures DIR] [--out FILE]`` to a subparsers object."""
    parser = subparsers.add_parser("report", help="one self-contained HTML page with a run's tables and figures",
                                   description=__doc__.split("\n\n")[0], formatter_class=FORMATTER)
    parser.add_argument("run_dir", help="run folder written by `dpn-lens locate` / `dpn-lens demo`")
    parser.add_argument("--figures", action="append", default=[], metavar="DIR",
                        help="folder with study or compare outputs (repeat for several), e.g. figures/")
    add_out_option(parser, f"HTML file to write (None: RUN_DIR/{REPORT_FILE})")
    parser.add_argument("--plotlyjs", choices=("inline", "cdn"), default="inline",
                        help="embed plotly.js once so the page works offline, or load it from the CDN")
    parser.set_defaults(handler=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens report``."""
    report = build_report(args.run_dir, args.figures)
    out = Path(args.out) if args.out else Path(args.run_dir) / REPORT_FILE
    write_text_atomic(out, report.html(args.plotlyjs))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {len(report.figures)} figures, "
          f"{len(report.tables)} tables" + (f"; {len(report.notes)} notes" if report.notes else ""))
    return 0
