"""The report of an evaluation's long result table (``results.csv``), as Markdown and as HTML.

Every evaluation run (``dpn-lens evaluate``, ``control``, ``compare``, a ``control --merge``) writes
``results.csv`` (``evaluation.table.ResultRow``); this renders those typed rows, never the run's own
printed text, into ``results.md`` and a self-contained ``results.html`` beside it:

1. **which methods steer**: per steering metric (the preference margin, the generated text) and KL
   level, how many trait-directions each method moved as asked, the wrong way and beyond its random
   neurons, and its mean shift (``evaluation.table.steering_summary``);
2. **every number**: per metric and cost (KL level, or the compare run's fixed γ), a grid of methods
   (controls last) × trait-directions, each cell the value with its 95% interval; a signed shift whose
   interval excludes 0 is marked ``*``.

``dpn-lens summary`` prints (1) for several runs at once; ``dpn-lens report --run DIR`` renders any run.

Example:
    >>> from dpn_lens.evaluation.table import ResultRow
    >>> rows = [ResultRow("openness", "caa", "increase", "preference", 0.03, 0.01, 0.05, n=60, kl_level=0.05),
    ...         ResultRow("openness", "dpn-le", "increase", "preference", 0.001, -0.004, 0.006, n=60, kl_level=0.05)]
    >>> print(grid_tables(rows)[0].markdown())
    | method | openness increase |
    |---|---|
    | caa | +0.030 [+0.010, +0.050] * |
    | dpn-le | +0.001 [-0.004, +0.006] |
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from dpn_lens.evaluation.table import RESULT_TABLE, ResultRow, read_result_table, steering_summary
from dpn_lens.io import REPORT_GENERATOR, markdown_table, write_text_atomic

__all__ = ["Table", "is_signed", "format_value", "summary_table", "detail_table", "grid_tables", "results_markdown",
           "results_html", "write_results_report", "RESULTS_MARKDOWN", "RESULTS_HTML", "STEERING_METRICS"]

RESULTS_MARKDOWN = "results.md"
RESULTS_HTML = "results.html"
STEERING_METRICS = ("preference", "generation")
"""Metrics measured at matched KL with random-neuron draws: the ones ``steering_summary`` counts."""


@dataclass(frozen=True)
class Table:
    """A titled table of text cells, rendered as Markdown or HTML.

    Example:
        >>> print(Table("t", ("a", "b"), (("1", "x|y"),)).markdown())
        | a | b |
        |---|---|
        | 1 | x\\|y |
    """

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""

    def markdown(self) -> str:
        """The table alone (no title), a ``|`` inside a cell escaped (``io.markdown_table``)."""
        return markdown_table([dict(zip(self.header, row)) for row in self.rows], columns=self.header)

    def html(self) -> str:
        """The table alone as an HTML ``<table>`` (every cell escaped)."""
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def is_signed(metric: str) -> bool:
    """Whether ``metric`` is a shift signed by the direction (positive = moved as asked), not a level.

    Example:
        >>> is_signed("preference"), is_signed("statements_shift"), is_signed("kl"), is_signed("mmlu_acc")
        (True, True, False, False)
    """
    return metric in STEERING_METRICS or metric.endswith(("_vs_random", "_shift"))


def format_value(row: ResultRow | None) -> str:
    """A cell: the value, its interval where there is one, and ``*`` where a shift's interval excludes 0.

    Example:
        >>> format_value(ResultRow("o", "caa", "increase", "preference", 0.03, 0.01, 0.05))
        '+0.030 [+0.010, +0.050] *'
        >>> format_value(ResultRow("o", "caa", "increase", "kl", 0.0512))
        '0.0512'
    """
    if row is None:
        return ""
    if not is_signed(row.metric):
        text = f"{row.value:.3g}"
        return text if row.ci_low is None or row.ci_high is None else f"{text} [{row.ci_low:.3g}, {row.ci_high:.3g}]"
    text = f"{row.value:+.3f}"
    if row.ci_low is None or row.ci_high is None:
        return text
    return f"{text} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]" + (" *" if row.excludes_zero else "")


def _cost(kl_level: float | None, rows: Sequence[ResultRow]) -> str:
    """How a group's edits were set: at a KL level, at a fixed γ, or (controls only: persona, γ 0) neither."""
    if kl_level is not None:
        return f"KL {kl_level:g}"
    return "controls" if all(row.is_control for row in rows) else "fixed γ"


def summary_table(rows: Iterable[ResultRow], metric: str = "preference", kl_level: float = 0.05) -> Table | None:
    """Which methods moved how many trait-directions on ``metric`` at ``kl_level`` (None: nothing measured there).

    Columns: trait-directions run, measured at this level, as asked (interval above 0), the wrong way
    (below 0), beyond random (the rule - random interval above 0; blank without random draws), both, and
    the mean shift over those measured.
    """
    summary = [s for s in steering_summary(rows, metric, kl_level) if s.measured]
    if not summary:
        return None
    header = ("method", "trait-directions", "measured", "as asked", "wrong way", "beyond random",
              "as asked and beyond random", "mean shift")
    return Table(f"{metric} at KL {kl_level:g}", header, tuple(
        (s.method, str(s.trait_directions), str(s.measured), str(s.as_asked), str(s.wrong_way),
         str(s.beyond_random) if s.with_random else "", str(s.as_asked_and_beyond_random) if s.with_random else "",
         f"{s.mean_shift:.3g}") for s in summary),
        note="Trait-directions moved as asked (95% interval above 0), the wrong way (below 0), beyond random "
             "neurons (rule - random interval above 0; blank: no random draws); mean shift over those measured.")


def detail_table(rows: Iterable[ResultRow], metric: str = "preference", kl_level: float = 0.05) -> Table:
    """Per trait, direction and method (controls left out): the value and the rule - random difference."""
    rows = list(rows)
    versus = {(r.trait, r.method, r.direction): r for r in rows if r.measured_at(f"{metric}_vs_random", kl_level)}
    return Table(f"{metric} at KL {kl_level:g}, per trait-direction", ("trait", "direction", "method", metric,
                                                                        "rule - random"),
                 tuple((r.trait, r.direction, r.method, format_value(r), format_value(versus.get((r.trait, r.method,
                                                                                                 r.direction))))
                       for r in rows if r.measured_at(metric, kl_level) and not r.is_control))


def grid_tables(rows: Iterable[ResultRow]) -> list[Table]:
    """Per metric and cost, methods (controls last) × trait-directions, each cell ``format_value``.

    A method measured at several γ under one cost (a compare run's γ sweep) gets a line per γ.
    """
    rows = list(rows)
    groups: dict[tuple[str, float | None], list[ResultRow]] = {}
    for row in rows:
        groups.setdefault((row.metric, row.kl_level), []).append(row)
    metric_order = list(dict.fromkeys(row.metric for row in rows))
    tables = []
    for metric, level in sorted(groups, key=lambda key: (metric_order.index(key[0]),
                                                         -math.inf if key[1] is None else key[1])):
        group = groups[(metric, level)]
        columns = list(dict.fromkeys((row.trait, row.direction) for row in group))
        gammas_of: dict[str, set[float | None]] = {}
        for row in group:
            gammas_of.setdefault(row.method, set()).add(row.gamma)
        lines: dict[str, dict[tuple[str, str], ResultRow]] = {}
        for row in sorted(group, key=lambda r: r.is_control):        # methods first, controls last (stable)
            several = level is None and len(gammas_of[row.method]) > 1
            name = f"{row.method} γ={row.gamma:g}" if several and row.gamma is not None else row.method
            lines.setdefault(name, {})[(row.trait, row.direction)] = row
        header = ("method", *(f"{trait} {direction}" for trait, direction in columns))
        tables.append(Table(f"{metric}, {_cost(level, group)}", header, tuple(
            (name, *(format_value(cells.get(column)) for column in columns)) for name, cells in lines.items())))
    return tables


def _sections(rows: Sequence[ResultRow]) -> list[tuple[str, list[Table]]]:
    """The report's sections: which methods steer (per steering metric and level), then every number."""
    levels = sorted({row.kl_level for row in rows if row.metric in STEERING_METRICS and row.kl_level is not None})
    steering = [table for metric in STEERING_METRICS for level in levels
                if (table := summary_table(rows, metric, level)) is not None]
    sections = [("Which methods steer", steering)] if steering else []
    return sections + [("Every number", grid_tables(rows))]


def _intro(rows: Sequence[ResultRow]) -> str:
    traits = ", ".join(dict.fromkeys(row.trait for row in rows))
    methods = ", ".join(dict.fromkeys(row.method for row in rows if not row.is_control))
    return (f"{len(rows)} rows of `{RESULT_TABLE}`; traits: {traits}; methods: {methods}. A shift is signed by the "
            "direction (positive = moved as asked); `*`: its 95% interval excludes 0. KL in nats/token.")


def results_markdown(rows: Sequence[ResultRow], title: str = "Results") -> str:
    """The whole report as Markdown."""
    if not rows:
        raise ValueError("the result table is empty; there is nothing to report (was the run interrupted "
                         "before its first trait finished?)")
    lines = [f"# {title}", "", _intro(rows), ""]
    for heading, tables in _sections(rows):
        lines += [f"## {heading}", ""]
        notes = list(dict.fromkeys(table.note for table in tables if table.note))   # a section's note once
        lines += [note + "\n" for note in notes]
        for table in tables:
            lines += [f"### {table.title}", "", table.markdown(), ""]
    return "\n".join(lines)


_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:90em}table{border-collapse:collapse;"
          "margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right;white-space:nowrap}"
          "th:first-child,td:first-child{text-align:left}code{background:#f4f4f4}")


def results_html(rows: Sequence[ResultRow], title: str = "Results") -> str:
    """The whole report as one self-contained HTML page (no script, no external file)."""
    if not rows:
        raise ValueError("the result table is empty; there is nothing to report")
    # The generator tag tells `dpn-lens report` that this page is a report, not a figure to embed.
    parts = [f'<!doctype html><html><head><meta charset="utf-8"><meta name="generator" content="{REPORT_GENERATOR}">'
             f"<title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(_intro(rows).replace('`', ''))}</p>"]
    for heading, tables in _sections(rows):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts += [f"<p>{html.escape(note)}</p>" for note in dict.fromkeys(table.note for table in tables if table.note)]
        for table in tables:
            parts += [f"<h3>{html.escape(table.title)}</h3>", table.html()]
    return "".join(parts) + "</body></html>\n"


def write_results_report(folder: str | Path, title: str | None = None) -> list[Path]:
    """Write ``results.md`` and ``results.html`` of ``folder``'s ``results.csv`` (each written whole, then renamed);
    an empty table (a run stopped before any number) writes nothing and returns ``[]``.

    Raises:
        FileNotFoundError: when the folder has no ``results.csv``.
    """
    folder = Path(folder)
    table = folder / RESULT_TABLE
    if not table.is_file():
        raise FileNotFoundError(f"{table} is missing; pass the --out folder of a `dpn-lens evaluate`, `control` or "
                                "`compare` run")
    rows = read_result_table(table)
    if not rows:
        return []
    title = title or f"Results: {folder.name}"
    return [write_text_atomic(folder / RESULTS_MARKDOWN, results_markdown(rows, title)),
            write_text_atomic(folder / RESULTS_HTML, results_html(rows, title))]
