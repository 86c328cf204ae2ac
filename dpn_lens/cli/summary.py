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


def _interval(row: Any) -> str:
    if row is None:
        return ""
    if row.ci_low is None or row.ci_high is None:
        return f"{row.value:+.3f}"
    return f"{row.value:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]"


def _detail_rows(rows: list[Any], metric: str, kl_level: float) -> list[dict[str, str]]:
    """Per trait, direction and method (controls left out): the value and rule - random, with intervals."""
    versus = {(r.trait, r.method, r.direction): r for r in rows if r.measured_at(f"{metric}_vs_random", kl_level)}
    return [{"trait": r.trait, "direction": r.direction, "method": r.method, metric: _interval(r),
             "rule - random": _interval(versus.get((r.trait, r.method, r.direction)))}
            for r in rows if r.measured_at(metric, kl_level) and not r.is_control]


def summary_markdown(folders: list[str], metric: str = "preference", kl_level: float = 0.05,
                     detail: bool = False) -> str:
    """The summary of ``folders`` as Markdown: one table per model.

    Raises:
        ValueError: when two runs of one model measured the same method, trait and direction (joining
            them would count it twice), or when nothing was measured at that metric and level.
    """
    from dpn_lens.evaluation.table import run_rows, steering_summary
    from dpn_lens.io import markdown_table

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
        summary = steering_summary(rows, metric, kl_level)
        if not any(s.measured for s in summary):
            continue
        lines += [f"## {model}: {metric} at KL {kl_level:g}", "",
                  "Trait-directions moved as asked (95% interval above 0), the wrong way (below 0), beyond "
                  "random neurons (rule - random interval above 0; blank: no random draws); mean shift over "
                  "those measured.", "",
                  markdown_table([{"method": s.method, "trait-directions": s.trait_directions, "measured": s.measured,
                                   "as asked": s.as_asked, "wrong way": s.wrong_way,
                                   "beyond random": s.beyond_random if s.with_random else None,
                                   "as asked and beyond random": s.as_asked_and_beyond_random
                                   if s.with_random else None, "mean shift": s.mean_shift}
                                  for s in summary if s.measured], digits=3), ""]
        if detail:
            lines += [markdown_table(_detail_rows(rows, metric, kl_level)), ""]
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
