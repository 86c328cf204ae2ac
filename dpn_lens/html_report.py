"""Moved to ``dpn_lens.report.html`` (a run folder's HTML page); this name forwards to it for one release.

Example:
    >>> from dpn_lens.html_report import build_report
    >>> from dpn_lens.report import html
    >>> build_report is html.build_report
    True
"""

from typing import Any

from dpn_lens.report import html as _moved


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
