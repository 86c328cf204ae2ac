"""Atomic file writes: an interrupted save never leaves a half-written artifact behind."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["atomic_path", "write_json_atomic", "write_text_atomic", "write_csv_atomic", "read_jsonl", "markdown_table",
           "REPORT_GENERATOR"]

REPORT_GENERATOR = "dpn-lens report"
"""The ``<meta name="generator">`` of every HTML page dpn-lens writes as a report (not a figure): a report
page found in a run folder is skipped, not embedded as a figure."""


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    The rename is atomic on POSIX and Windows (``os.replace``), so readers see either the
    old file or the complete new one, never a truncated mix. On any exception the temporary
    file is removed and ``target`` is left as it was.

    Example:
        >>> with atomic_path("/tmp/x.txt") as tmp:               # doctest: +SKIP
        ...     tmp.write_text("complete contents")
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates the file private (0600); give it the mode an ordinary open() would have
        # (0666 minus the umask), so saved artifacts stay readable in shared result folders.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb") as handle:  # data must be on disk before the rename makes it visible
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json_atomic(target: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``target`` atomically and return the path."""
    return write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv_atomic(target: str | os.PathLike, rows: "list[dict[str, Any]]",
                     columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV atomically; return the path. ``columns``: the header (None: every key, in
    first-seen order), written even when there are no rows.

    Example:
        >>> write_csv_atomic("/tmp/rows.csv", [{"a": 1}, {"a": 2, "b": 3}])   # doctest: +SKIP
    """
    columns = list(dict.fromkeys(key for row in rows for key in row)) if columns is None else list(columns)
    with atomic_path(target) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return Path(target)


def read_json_record(path: str | os.PathLike, file_name: str, written_by: str) -> tuple[Path, Any]:
    """``(file, content)`` of a JSON record: ``path`` is the file, or a run folder that holds ``file_name``.

    Raises:
        FileNotFoundError: when there is no such file (naming the folder to pass, ``written_by``).
        ValueError: when the file is not JSON.

    Example:
        >>> read_json_record("runs/eval", "control.json", "`dpn-lens control`")   # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the {file_name} (or the --out folder) of a "
                                f"{written_by} run")
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error}); it is not the {file_name} that {written_by} writes") from None


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON Lines file (blank lines skipped); a bad line raises an error naming it.

    Example:
        >>> read_jsonl("../shared/data/personalitybench/test/Openness.jsonl")[0]["question"]   # doctest: +SKIP
        'What would you do ...'
    """
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON ({error.msg}); fix or remove that line") from error
    return rows


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """``rows`` as a markdown table: floats to ``digits`` significant digits, NaN, None and missing cells empty.

    ``columns`` defaults to every key, in order of first appearance. A ``|`` inside a cell or header
    (``|d|``, ``top|d|``) is written ``\\|`` so that it does not split the cell.

    Example:
        >>> print(markdown_table([{"method": "dpn-le", "kl": 0.003212}], digits=2))
        | method | kl |
        |---|---|
        | dpn-le | 0.0032 |
        >>> print(markdown_table([{"trait": "openness", "selected": None}]).splitlines()[-1])
        | openness |  |
    """
    columns = list(dict.fromkeys(key for row in rows for key in row)) if columns is None else list(columns)

    def cell(value: Any) -> str:
        if value is None:  # not computed (e.g. a share that does not apply to this model), not the text "None"
            return ""
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
