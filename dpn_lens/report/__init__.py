"""Reports rendered from typed results: the evaluation's long table (``results.csv``) as Markdown and HTML.

Example:
    >>> from dpn_lens.report import write_results_report
    >>> write_results_report("runs/evaluate_quick")        # doctest: +SKIP
    [PosixPath('runs/evaluate_quick/results.md'), PosixPath('runs/evaluate_quick/results.html')]
"""

from dpn_lens.report.results import (RESULTS_HTML, RESULTS_MARKDOWN, Table, detail_table, format_value, grid_tables,
                                     results_html, results_markdown, summary_table, write_results_report)

__all__ = ["RESULTS_HTML", "RESULTS_MARKDOWN", "Table", "detail_table", "format_value", "grid_tables", "results_html",
           "results_markdown", "summary_table", "write_results_report"]
