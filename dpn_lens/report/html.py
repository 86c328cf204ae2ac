"""``dpn-lens report --run RUN``: one self-contained HTML page with a run's tables and figures.

The page gathers, from a run folder (``dpn-lens locate`` / ``demo``) and any figure folders given:

* the run itself: model, fingerprint, settings and neuron counts per trait (``summary.json`` and the
  maps), the neurons-per-layer table, the demo's steered generations, ``summary.md``;
* study outputs (``dpn-lens study``): every ``*.md`` table, every ``*.csv`` without a Markdown twin
  (first rows), every ``*_summary.json``, grouped by study (``layers_``, ``overlap_``, ``multifunction_``);
* comparison outputs (``dpn-lens compare``): ``comparison.md`` and its tables;
* every figure: plotly figures are read from the ``<name>.json`` that ``dpn_lens.figures.save_figure``
  writes beside each HTML file (folders written before that existed fall back to the ``Plotly.newPlot``
  call inside the HTML) and redrawn on the page, sized to the page width (many-panel grids drawn smaller,
  in a scrolling box); a figure that exists only as a PNG is inlined as base64.

The page opens with a summary: model, traits, neurons per pole, the headline comparison numbers (with
their intervals where the comparison recorded ``<metric>_ci_low`` / ``<metric>_ci_high``), and how many
steered answers are identical to the unsteered ones (each such answer is marked in the answers table).
Markdown is rendered by ``markdown-it-py`` (CommonMark with tables).

Why plotly.js inline (default) rather than PNGs: the page must work offline and from one file (mail it,
attach it to a paper's supplement), and the figures stay interactive (hover shows layer, neuron, d and
s, which is most of their value). plotly.js is inlined *once* (~4.7 MB) however many figures there are;
``plotlyjs="cdn"`` gives a ~100 kB page that needs the network instead, and ``plotlyjs="directory"``
a small page that loads ``plotly.min.js`` written beside it (offline, several pages sharing one copy).

When the page has drawn every figure, it sets ``document.title`` to end in ``[rendered N/N]`` and fills
``#dpn-report-status`` (``data-done="1"``, ``data-rendered``, ``data-total``, and the layout check
``data-viewport``, ``data-widest``, ``data-overflow``: elements reaching past the window's right edge;
``data-height``: the page's height in pixels),
so a headless browser can check that it rendered and fits.

Example:
    >>> write_report("runs/demo", figures=["figures"])          # doctest: +SKIP
    PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from markdown_it import MarkdownIt

from dpn_lens.answers import Generation
from dpn_lens.io import REPORT_GENERATOR, write_text_atomic
from dpn_lens.run import MAPS_DIR, REPORT_FILE, STATS_DIR, SUMMARY_MD_FILE, Run, read_summary
from dpn_lens.studies import STUDY_SECTIONS
from dpn_lens.studies.section import ReportSection

__all__ = ["ReportFigure", "ReportTable", "Report", "build_report", "write_report", "figure_from_html",
           "figure_from_file", "markdown_to_html", "read_generations", "save_report", "PLOTLY_FILE"]

PlotlyJs = Literal["inline", "cdn", "directory"]
PLOTLY_FILE = "plotly.min.js"
"""The shared plotly.js bundle a ``plotlyjs="directory"`` page loads from its own folder."""
GENERATOR = REPORT_GENERATOR
CSV_ROWS = 100
"""Rows of a CSV table shown on the page (the file holds them all)."""
OPEN_ROWS = 30
"""Tables longer than this are folded (``<details>``) so the figures stay in view."""
GRID_PANELS = 12
"""Figures with more subplot panels than this (the per-layer d-vs-s grids) are drawn smaller, in a scrolling box."""
HEADLINE_METRICS = ("trait_shift", "statements_shift", "judge_shift", "judge_fluency", "statements_gap", "kl", "wikitext_ppl")
"""Comparison columns the summary shows per method (those present), as means over traits and directions."""

COMPARE_SECTION = ReportSection("compare", "Method comparison",
                                names=frozenset({"comparison", "rows", "gamma_sweep", "q_sweep", "respondents",
                                                 "tradeoff"}),
                                prefixes=("comparison",))
"""The files `dpn-lens compare` writes."""
OTHER_SECTION = ReportSection("other", "Other files")
SECTIONS: tuple[ReportSection, ...] = (*STUDY_SECTIONS, COMPARE_SECTION, OTHER_SECTION)
"""The page's sections in order: each study's (as the study declares it), the comparison, the rest."""
SKIP_DIRS = {MAPS_DIR, STATS_DIR, ".ipynb_checkpoints", "__pycache__"}
# CommonMark (a maintained parser, not a hand-written subset) with GitHub pipe tables; "html": False
# escapes raw HTML in the files, so a generated answer cannot inject markup into the page.
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


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
    summary: list[str] = field(default_factory=list)
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


def figure_from_file(html_path: str | Path) -> dict[str, Any]:
    """The figure saved as ``html_path``: from its ``.json`` twin if there is one, else scraped from the HTML.

    The JSON twin is written by ``dpn_lens.figures.save_figure`` (``plotly.io.to_json``); reading the HTML
    is kept for folders written before it existed.

    Example:
        >>> figure_from_file("figures/layers_distribution.html")["layout"]["title"]["text"]   # doctest: +SKIP
        'Personality neurons per layer (bars up: high pole, down: low pole)'
    """
    html_path = Path(html_path)
    twin = html_path.with_suffix(".json")
    if twin.exists():
        try:
            spec = json.loads(twin.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{twin} is not valid JSON ({error.msg}); write the figure again with "
                             "dpn_lens.figures.save_figure") from error
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), list):
            raise ValueError(f"{twin} is not a plotly figure (no 'data' list)")
        return {"data": spec["data"], "layout": spec.get("layout") or {}, "config": spec.get("config") or {}}
    return figure_from_html(html_path)


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
    """Markdown (CommonMark with pipe tables, rendered by ``markdown-it-py``) as HTML; raw HTML is escaped.

    Headings move down ``heading_offset`` levels (a file's ``#`` title sits under the page's section
    headings) and tables are wrapped for the page's table style. A ``|`` inside a cell is written ``\\|``.

    Example:
        >>> markdown_to_html("| a | b |\\n|---|---|\\n| top\\\\|d\\\\| | 2 |").replace("\\n", "")
        '<div class="table-wrap"><table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>top|d|</td><td>2</td></tr></tbody></table></div>'
    """
    page = _MARKDOWN.render(text)

    def shift(match: re.Match) -> str:
        return f"<{match.group(1)}h{min(6, int(match.group(2)) + heading_offset)}>"

    page = re.sub(r"<(/?)h([1-6])>", shift, page)
    page = page.replace("<table>", '<div class="table-wrap"><table>').replace("</table>", "</table></div>")
    return page.replace("\n</code></pre>", "</code></pre>").strip()


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
def _candidate_files(run_dir: Path, figures: Sequence[Path], notes: list[str]) -> list[Path]:
    """Files of the folders given with ``--figures``, then of the run folder and its direct subfolders.

    One file per name: the demo writes ``runs/demo/figures/layers_*`` and ``dpn-lens study`` writes the
    same names into the ``--figures`` folder; the study's (given explicitly) is shown, the other noted.
    """
    folders = list(figures) + [run_dir] + [p for p in sorted(run_dir.iterdir()) if p.is_dir() and p.name not in SKIP_DIRS]
    seen: set[Path] = set()
    by_name: dict[str, Path] = {}
    files: list[Path] = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            resolved = path.resolve()
            if not path.is_file() or resolved in seen:
                continue
            seen.add(resolved)
            if path.name in by_name and path.suffix in (".html", ".json", ".png", ".md", ".csv"):
                if path.suffix != ".json" or path.stem.endswith("_summary"):
                    notes.append(f"{path} not shown: {by_name[path.name]} has the same name")
                continue
            by_name[path.name] = path
            files.append(path)
    return files


def _overview(run_dir: Path, summary: dict[str, Any], notes: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The run's facts, settings, neurons per layer and generations as HTML parts; and the maps read."""
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
        parts.append("<h3 id='answers'>Unsteered vs steered answers (greedy)</h3>")
        parts.append(_generations_html(generations))
    return parts, maps


def read_generations(items: Sequence[Any]) -> list[Generation | str]:
    """A trait's answers from ``summary.json``: ``Generation`` dicts (``answers.Generation.to_dict``); a run
    from before they were typed stored each as printed text, which is kept as it is (never parsed)."""
    return [item if isinstance(item, str) else Generation.from_dict(item) for item in items]


def _identical_answers(generations: dict[str, Sequence[Any]]) -> tuple[int, int]:
    """(steered answers identical to their unsteered answer, steered answers) over every trait and question."""
    same = total = 0
    for items in generations.values():
        for item in read_generations(items):
            if isinstance(item, Generation):
                total += len(item.steered())
                same += len(item.identical_to_unsteered())
    return same, total


def _generations_html(generations: dict[str, Sequence[Any]]) -> str:
    """One table: trait, question, condition, answer; a steered answer equal to the unsteered one is marked."""
    rows = []
    for trait, items in generations.items():
        for item in read_generations(items):
            if isinstance(item, str):      # an older run's printed block
                rows.append(f"<tr><td>{html.escape(trait)}</td><td colspan='3'><pre>{html.escape(item)}</pre></td></tr>")
                continue
            same_as_base = set(item.identical_to_unsteered())
            if item.note:
                rows.append(f"<tr><td>{html.escape(trait)}</td><td>{html.escape(item.question)}</td><td></td>"
                            f"<td class='answer'>{html.escape(item.note)}</td></tr>")
            for condition, text in item.answers.items():
                same = condition in same_as_base
                mark = ('<span class="same" title="this steered answer is identical to the unsteered one">'
                        "= unsteered</span> ") if same else ""
                row_class = ' class="same-row"' if same else ""
                rows.append(f"<tr{row_class}><td>{html.escape(trait)}</td>"
                            f"<td>{html.escape(item.question)}</td><td>{html.escape(condition)}</td>"
                            f'<td class="answer">{mark}{html.escape(text)}</td></tr>')
    return ('<div class="table-wrap"><table class="answers"><thead><tr><th>trait</th><th>question</th>'
            f"<th>condition</th><th>answer</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else html.escape(str(value))


def _with_interval(entry: dict[str, Any], key: str) -> str:
    """``value [low, high]`` when ``entry`` holds ``key_ci_low`` and ``key_ci_high``, else the value alone."""
    text = _number(entry[key])
    if f"{key}_ci_low" in entry and f"{key}_ci_high" in entry:
        text += f" [{_number(entry[f'{key}_ci_low'])}, {_number(entry[f'{key}_ci_high'])}]"
    return text


def _headline(comparison: Path, notes: list[str]) -> str:
    """Per method: the means of ``HEADLINE_METRICS`` over traits and directions, from ``comparison.json``."""
    from dpn_lens.evaluation.compare import summary_by_method
    from dpn_lens.evaluation.comparison_record import load_comparison_record

    try:
        record = load_comparison_record(comparison)
    except ValueError as error:
        notes.append(f"headline numbers not read from {comparison}: {error}")
        return ""
    # A comparison may record per-method summaries with intervals; otherwise the means are computed here.
    entries = [entry.to_dict() for entry in record.summary or summary_by_method(record.rows)]
    columns = [m for m in HEADLINE_METRICS if any(m in e for e in entries)]
    body = [[html.escape(str(e.get("method", ""))), str(e.get("conditions", ""))]
            + [_with_interval(e, m) if m in e else "" for m in columns] for e in entries]
    has_interval = any(f"{m}_ci_low" in e for e in entries for m in columns)
    note = ("values are means over traits and directions, [95% interval] where the comparison recorded one"
            if has_interval else "values are means over traits and directions (the comparison recorded no intervals)")
    return (f"<h3>Headline numbers ({html.escape(comparison.name)}, {html.escape(str(comparison.parent))})</h3>"
            + _table_html(body, ["method", "conditions", *columns], inline=False) + f"<p class='note'>{note}</p>")


def _evidence(summary: dict[str, Any]) -> str:
    """The demo's preference check: per trait and map, each direction's shift and the persona prompt's, with 95% CIs."""
    from dpn_lens.evaluation.shifts import PERSONA, rows_of_record

    def cell(row: Any) -> str:
        e = row.effect
        text = f"{e.shift:+.3f} [{e.ci_low:+.3f}, {e.ci_high:+.3f}] {e.verdict()}"
        return text + (f" (gamma {_number(row.gamma)})" if row.gamma is not None else "")

    rows = []
    for trait, record in (summary.get("evidence") or {}).items():
        shifts = rows_of_record(record)
        persona = next((row for row in shifts if row.neurons == PERSONA), None)
        by_map: dict[str, dict[str, Any]] = {}
        for row in shifts:
            if row.neurons != PERSONA:
                by_map.setdefault(row.neurons, {})[row.direction] = row
        for index, (neurons, directions) in enumerate(by_map.items()):
            if set(directions) >= {"increase", "decrease"}:
                rows.append([html.escape(trait), html.escape(neurons), str(directions["increase"].n_pairs)]
                            + [cell(directions[d]) for d in ("increase", "decrease")]
                            + [cell(persona) if persona is not None and index == 0 else ""])
    if not rows:
        return ""
    return ("<h3>Does the edit steer? Preference shift, nats/token</h3>"
            + _table_html(rows, ["trait", "neurons", "pairs", "increase", "decrease", "persona prompt (high-low)/2"],
                          inline=False)
            + "<p class='note'>Mean per-token log-probability margin of the high-trait over the low-trait answer to "
              "held-out questions, steered minus unsteered, signed so that positive = moved as asked; [95% "
              "bootstrap interval over pairs]. The persona prompt is the positive control.</p>")


def _summary(summary: dict[str, Any], maps: dict[str, Any], comparison: Path | None, notes: list[str]) -> list[str]:
    """The page's first block: model, traits, neurons per pole, headline numbers, identical answers."""
    from dpn_lens.evaluation.comparison_record import load_comparison_record
    from dpn_lens.run import percent_of_all_mlp

    compared = None
    if comparison is not None:  # a comparison folder alone (no summary.json) still names its model and traits
        try:
            compared = load_comparison_record(comparison)
        except ValueError:
            compared = None  # _headline notes the unreadable file
    model = (summary.get("model") or summary.get("model_name") or (compared.meta.model if compared is not None else None)
             or "(not recorded)")
    # Maps record the model's revision once helper F's NeuronMap fields exist; older maps have none.
    revisions = [getattr(m, name, None) for m in maps.values() for name in ("model_revision", "revision")]
    revision = next((r for r in revisions if r), None)
    traits = list(maps) or list(summary.get("traits") or {}) or list(dict.fromkeys(
        row.trait for row in (compared.rows if compared is not None else ())))
    facts = [("model", model + (f" (revision {revision})" if revision else "")),
             ("traits", ", ".join(traits) or "(none)")]
    for key in ("gamma", "n_pairs", "dtype"):
        if key in summary:
            facts.append((key, str(summary[key])))
    parts = [_table_html(facts, None, inline=False)]
    if maps:
        rows = [[t, str(m.n_selected("high")), str(m.n_selected("low")), f"{percent_of_all_mlp(m):.3f}"]
                for t, m in maps.items()]
    else:
        rows = [[t, str(e.get("high", "")), str(e.get("low", "")), _number(e.get("percent_of_all_mlp_neurons", ""))]
                for t, e in (summary.get("traits") or {}).items()]
    if rows:
        parts.append("<h3>Neurons per pole</h3>" +
                     _table_html(rows, ["trait", "high", "low", "% of all MLP neurons"], inline=False))
    if summary.get("evidence"):
        parts.append(_evidence(summary))
    if comparison is not None:
        parts.append(_headline(comparison, notes))
    generations = summary.get("generations") or {}
    if generations:
        same, total = _identical_answers(generations)
        parts.append(f"<p class='{'warn' if same else 'note'}'>{same} of {total} steered answers are identical to the "
                     "unsteered answer (marked <span class='same'>= unsteered</span> in "
                     "<a href='#answers'>the answers</a>).</p>")
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
    report.overview, maps = _overview(run_dir, summary, report.notes)

    files = _candidate_files(run_dir, figure_dirs, report.notes)
    stems_with_md = {(p.parent, p.stem) for p in files if p.suffix == ".md"}
    html_figures = {(p.parent, p.stem) for p in files if p.suffix == ".html"}
    for path in files:
        section = _section(path)
        if path.suffix == ".html":
            if _is_report(path):
                continue
            try:
                report.figures.append(ReportFigure(path.stem, path, section, spec=figure_from_file(path)))
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
    comparison = next((p for p in files if p.name == "comparison.json"), None)
    report.summary = _summary(summary, maps, comparison, report.notes)
    if not report.overview[1:] and not report.figures and not report.tables:
        raise FileNotFoundError(f"{run_dir} holds no maps/, summary.json, tables or figures; pass the folder written "
                                "by `dpn-lens locate` / `dpn-lens demo`, and --figures for the study/compare outputs")
    return report


# ----- rendering -------------------------------------------------------------------------------------
_STYLE = """
*{box-sizing:border-box}
body{font-family:Arial,Helvetica,sans-serif;margin:0;color:#222;background:#fafafa;overflow-wrap:anywhere}
main{max-width:1440px;margin:0 auto;padding:16px 28px 60px}
h1{font-size:24px;margin:18px 0 4px}h2{font-size:20px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
h3{font-size:16px;margin-top:22px}h4{font-size:14px;margin-bottom:4px}
.meta,.note{color:#666;font-size:12px}
.warn{color:#8a4b00;font-size:13px}
#summary{background:#fff;border:1px solid #cfd8e3;border-left:4px solid #3b6ea8;padding:4px 16px 10px;margin:12px 0}
#summary h2{margin-top:10px}
.table-wrap{max-width:100%;overflow-x:auto;margin:6px 0 12px}
table{border-collapse:collapse;font-size:12px;background:#fff;max-width:100%}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;white-space:normal;overflow-wrap:anywhere}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
table.answers{width:100%}table.answers td{text-align:left;vertical-align:top;overflow-wrap:normal}
table.answers td:nth-child(2){width:28%}table.answers td:nth-child(3),table.answers th:nth-child(3){white-space:nowrap}
table.answers td.answer{white-space:pre-wrap;overflow-wrap:anywhere}
tr.same-row td{background:#fff6e0}
.same{display:inline-block;background:#f0a500;color:#fff;font-size:11px;font-weight:bold;padding:0 5px;
      border-radius:3px;white-space:nowrap}
pre{background:#fff;border:1px solid #ddd;padding:8px;font-size:12px;overflow-x:auto;white-space:pre-wrap}
.figure{background:#fff;border:1px solid #e3e3e3;margin:12px 0;padding:6px;max-width:100%;overflow:hidden}
.figure.grid .dpn-plotly{max-height:640px;overflow-y:auto;overflow-x:hidden}
.figure .caption{font-size:11px;color:#777;margin-top:4px}
.figure img{max-width:100%;height:auto}
nav{display:flex;flex-wrap:wrap;gap:4px 14px}nav a{font-size:13px}
#dpn-report-status{font-size:12px;color:#666}
ul.reasons{font-size:12px;color:#444}
details{margin:6px 0}summary{cursor:pointer;font-size:14px;font-weight:bold}
"""

_SCRIPT = """
(function () {
  var status = document.getElementById("dpn-report-status");
  var divs = Array.prototype.slice.call(document.querySelectorAll("div.dpn-plotly"));
  function layoutCheck() {
    // Elements (drawn ones: closed <details> have no box) reaching past the window's right edge.
    var viewport = document.documentElement.clientWidth, widest = 0, over = [];
    Array.prototype.forEach.call(document.querySelectorAll("body *"), function (el) {
      var box = el.getBoundingClientRect();
      if (box.width === 0 && box.height === 0) { return; }
      // plotly's text-measuring <svg id="js-plotly-tester"> sits far off-screen on purpose.
      if (box.right <= 0 || box.bottom <= 0 || el.closest("#js-plotly-tester")) { return; }
      widest = Math.max(widest, box.right);
      if (box.right > viewport + 1 || box.width > viewport + 1) {
        over.push(el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + (el.className && el.className.baseVal === undefined ? "." + el.className : ""));
      }
    });
    status.dataset.viewport = String(viewport);
    status.dataset.widest = String(Math.round(widest));
    status.dataset.scrollwidth = String(document.documentElement.scrollWidth);
    status.dataset.height = String(document.documentElement.scrollHeight);
    status.dataset.overflow = String(over.length);
    if (over.length) { status.dataset.overflowing = over.slice(0, 10).join(" "); }
  }
  function finish(ok, error) {
    status.dataset.rendered = String(ok);
    status.dataset.total = String(divs.length);
    if (error) { status.dataset.error = error; }
    layoutCheck();
    status.dataset.done = "1";
    status.textContent = "figures drawn: " + ok + " of " + divs.length + (error ? " (" + error + ")" : "");
    document.title = document.title + " [rendered " + ok + "/" + divs.length + "]";
  }
  if (typeof Plotly === "undefined") { finish(0, "plotly.js did not load"); return; }
  var jobs = divs.map(function (div) {
    try {
      var spec = JSON.parse(document.getElementById(div.dataset.spec).textContent);
      var layout = spec.layout, width = layout.width, room = div.clientWidth;
      // The figure's own width becomes a maximum: it is drawn at the page's width, never wider, and a
      // figure drawn narrower than designed is made shorter in proportion (down to 60%).
      if (width) {
        div.style.maxWidth = width + "px";
        if (layout.height && room && room < width) {
          layout.height = Math.round(layout.height * Math.max(0.6, room / width));
        }
        delete layout.width;
      }
      layout.autosize = true;
      return Plotly.newPlot(div, spec.data, layout, spec.config).then(
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
    if plotlyjs == "directory":
        return f'<script src="{PLOTLY_FILE}"></script>'
    raise ValueError(f"plotlyjs must be 'inline' (offline, one file), 'cdn' (small page, needs the network) or "
                     f"'directory' ({PLOTLY_FILE} beside the page), got {plotlyjs!r}")


def _clean_spec(spec: dict[str, Any]) -> dict[str, Any]:
    config = dict(spec.get("config") or {})
    config.setdefault("displaylogo", False)
    config.setdefault("responsive", True)
    return {"data": spec["data"], "layout": spec["layout"], "config": config}


def _n_panels(spec: dict[str, Any]) -> int:
    """Subplot panels of a figure: its x axes (``xaxis``, ``xaxis2``, ...)."""
    return max(1, sum(1 for key in spec.get("layout", {}) if re.fullmatch(r"xaxis\d*", key)))


def _render_page(report: Report, plotlyjs: PlotlyJs) -> str:
    from dpn_lens._version import __version__

    plotly_tag = _plotly_script(plotlyjs)  # validates plotlyjs before any work
    sections: list[str] = []
    nav = ['<a href="#summary">Summary</a>', '<a href="#overview">Run</a>']
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
                grid = _n_panels(figure.spec) > GRID_PANELS
                if grid:
                    caption = caption.replace("</div>", f" ({_n_panels(figure.spec)} panels; scroll inside the box)</div>")
                body.append(f'<div class="figure{" grid" if grid else ""}"><div class="dpn-plotly" id="{element}-div" '
                            f'data-spec="{element}"></div>{_json_script(_clean_spec(figure.spec), element)}{caption}</div>')
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
        '<section id="summary"><h2>Summary</h2>', *report.summary, "</section>",
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
        plotlyjs: ``"inline"`` (default: plotly.js embedded once, works offline), ``"cdn"``, or
            ``"directory"`` (writes ``plotly.min.js`` beside the page).
        csv_rows: rows shown of each CSV table that has no Markdown version.

    Example:
        >>> write_report("runs/demo", figures=["figures"])       # doctest: +SKIP
        PosixPath('runs/demo/report.html')
    """
    return save_report(build_report(run_dir, figures, csv_rows), run_dir, out_html, plotlyjs)


def save_report(report: Report, run_dir: str | Path, out_html: str | Path | None = None,
                plotlyjs: PlotlyJs = "inline") -> Path:
    """Write a built ``report`` of ``run_dir`` as its page (default ``run_dir/report.html``), with the link
    to the run's explorer, and ``plotly.min.js`` beside it for ``plotlyjs="directory"``."""
    out = Path(out_html) if out_html is not None else Path(run_dir) / REPORT_FILE
    add_explorer_link(report, run_dir, out)
    page = report.html(plotlyjs)   # validates plotlyjs before anything is written
    if plotlyjs == "directory":
        from plotly.offline import get_plotlyjs

        write_text_atomic(out.parent / PLOTLY_FILE, get_plotlyjs())
    return write_text_atomic(out, page)


def add_explorer_link(report: Report, run_dir: str | Path, page: str | Path) -> None:
    """Start the summary with a link to the run's neuron explorer (``dpn-lens explore``), relative to the
    page, or with the command that builds it."""
    import os

    index = Path(run_dir) / "explorer" / "index.html"
    if index.is_file():
        href = os.path.relpath(index.resolve(), Path(page).resolve().parent)
        line = (f'<p><b>Neuron explorer:</b> <a href="{html.escape(href)}">{html.escape(href)}</a> '
                "(each neuron's card: what it reads, writes and does)</p>")
    else:
        line = (f"<p><b>Neuron explorer:</b> not built yet; <code>dpn-lens explore --run {html.escape(str(run_dir))}</code> "
                "writes it (each neuron's card: what it reads, writes and does)</p>")
    report.summary.insert(0, line)
