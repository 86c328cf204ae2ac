"""``dpn-lens summary --run A,B``: how many trait-directions each method moved, per model, from run folders.

The count behind every "moved as asked / beyond random" table in docs/RESULTS.md, read from the runs'
long tables (``evaluation.table.steering_summary``): per model (runs of one model are joined, as
``control --merge`` joins traits), per method at one metric and KL level.

Example:
    $ dpn-lens summary --run results/control-smollm2-135m-instruct-generation --metric generation --kl-level 0.5
"""

from __future__ import annotations

import argparse
from typing import Any

from dpn_lens.cli.options import CommaList, add_out_option, add_subcommand

__all__ = ["register", "run_summary", "summary_markdown"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``summary --run A,B [--metric M] [--kl-level L] [--out FILE]``.

    Example:
        >>> parser = argparse.ArgumentParser(); register(parser.add_subparsers(dest="command"))   # doctest: +ELLIPSIS
        ArgumentParser(...)
    """
    parser = add_subcommand(subparsers, "summary", "per model and method: trait-directions moved as asked, the "
                                                   "wrong way and beyond random neurons, from evaluation run folders")
    parser.add_argument("--run", action=CommaList, required=True, metavar="DIRS",
                        help="comma list of `evaluate`/`control`/`compare` output folders (runs of one model on "
                             "different traits are joined)")
    parser.add_argument("--metric", default="preference",
                        help="preference (the held-out margin) or generation (generated text), or any metric with "
                             "intervals in results.csv")
    parser.add_argument("--kl-level", type=float, default=0.05, help="the KL level (nats/token) the edits were calibrated to")
    parser.add_argument("--detail", action="store_true",
                        help="also one row per trait and direction: each method's value with its interval and, "
                             "where drawn, rule - random with its interval")
    add_out_option(parser, "Markdown file to write (None: print)")
    parser.set_defaults(handler=run_summary)
    return parser


def summary_markdown(folders: list[str], metric: str = "preference", kl_level: float = 0.05,
                     detail: bool = False) -> str:
    """The summary of ``folders`` as Markdown: one table per model.

    Raises:
        ValueError: when two runs of one model measured the same method, trait and direction (joining
            them would count it twice), or when nothing was measured at that metric and level.
    """
    from dpn_lens.evaluation.table import run_rows
    from dpn_lens.report.results import detail_table, summary_table

    by_model: dict[str, list[Any]] = {}
    seen: dict[tuple[str, str, str, str], str] = {}
    for folder in folders:
        model, rows = run_rows(folder)
        for row in rows:
            if not row.measured_at(metric, kl_level):
                continue
            key = (model, row.method, row.trait, row.direction)
            if seen.setdefault(key, folder) != folder:
                raise ValueError(f"{seen[key]} and {folder} both measured {row.method} on {row.trait} "
                                 f"{row.direction} ({model}); pass runs of different traits or methods")
        by_model.setdefault(model, []).extend(rows)
    lines = []
    for model, rows in by_model.items():
        table = summary_table(rows, metric, kl_level)
        if table is None:
            continue
        lines += [f"## {model}: {metric} at KL {kl_level:g}", "", table.note, "", table.markdown(), ""]
        if detail:
            lines += [detail_table(rows, metric, kl_level).markdown(), ""]
    if not lines:
        raise ValueError(f"nothing in {', '.join(folders)} was measured as {metric} at KL {kl_level:g}; see the runs' "
                         "results.csv for the metrics and levels they hold")
    return "\n".join(lines)


def run_summary(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens summary``."""
    text = summary_markdown(list(args.run), args.metric, args.kl_level, args.detail)
    if args.out:
        from dpn_lens.io import write_text_atomic

        print(f"wrote {write_text_atomic(args.out, text)}")
    else:
        print(text, end="")
    return 0
