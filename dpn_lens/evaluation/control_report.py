"""Moved to ``dpn_lens.report.control`` (a control run's tables and figures); this name forwards to it for
one release.

Example:
    >>> from dpn_lens.evaluation.control_report import write_control_outputs
    >>> from dpn_lens.report import control
    >>> write_control_outputs is control.write_control_outputs
    True
"""

from typing import Any

from dpn_lens.report import control as _moved


def __getattr__(name: str) -> Any:
    return getattr(_moved, name)
