"""Reports: what a run's results look like to a reader, in one package.

* ``report.results``: the evaluation's long table (``results.csv``) as Markdown and HTML;
* ``report.control``: a control run's tables, ``control.md`` and figures (``write_control_outputs``);
* ``report.html``: a run folder's self-contained HTML page (``dpn-lens report``).

Example:
    >>> from dpn_lens.report import write_results_report
    >>> write_results_report("runs/evaluate_quick")        # doctest: +SKIP
    [PosixPath('runs/evaluate_quick/results.md'), PosixPath('runs/evaluate_quick/results.html')]
"""

from dpn_lens.report.results import (RESULTS_HTML, RESULTS_MARKDOWN, Table, detail_table, format_value, grid_tables,
                                     results_html, results_markdown, summary_table, write_results_report)

__all__ = ["RESULTS_HTML", "RESULTS_MARKDOWN", "Table", "detail_table", "format_value", "grid_tables", "results_html",
           "results_markdown", "summary_table", "write_results_report"]
