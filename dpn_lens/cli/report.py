"""``dpn-lens report --run RUN``: one self-contained HTML page with a run's tables and figures
(``dpn_lens.report.html`` builds it).

Example:
    $ dpn-lens report --run runs/demo --figures figures          # runs/demo/report.html
    $ dpn-lens report --run runs/demo --plotlyjs cdn --out page.html
"""

from __future__ import annotations

import argparse
from typing import Any

from dpn_lens.cli.options import add_out_option, add_positional_run, add_subcommand

__all__ = ["register", "run_report"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``report --run RUN [--figures DIR] [--out FILE] [--plotlyjs inline|cdn|directory]``.

    Example:
        >>> parser = argparse.ArgumentParser(); register(parser.add_subparsers(dest="command"))   # doctest: +ELLIPSIS
        ArgumentParser(...)
    """
    from dpn_lens.run import REPORT_FILE

    parser = add_subcommand(subparsers, "report", "one self-contained HTML page with a run's tables and figures")
    add_positional_run(parser, "run folder written by `dpn-lens locate` / `dpn-lens demo`")
    parser.add_argument("--figures", action="append", default=[], metavar="DIR",
                        help="folder with study or compare outputs (repeat for several), e.g. figures/")
    add_out_option(parser, f"HTML file to write (None: RUN/{REPORT_FILE})")
    parser.add_argument("--plotlyjs", choices=("inline", "cdn", "directory"), default="inline",
                        help="plotly.js embedded once (the page works offline, alone), loaded from the CDN (small "
                             "page), or written beside the page as plotly.min.js (small page, offline)")
    parser.set_defaults(handler=run_report)
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens report``."""
    from pathlib import Path

    from dpn_lens.report.html import build_report, save_report

    report = build_report(args.run, args.figures)
    out = save_report(report, args.run, args.out, plotlyjs=args.plotlyjs)
    print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB): {len(report.figures)} figures, "
          f"{len(report.tables)} tables" + (f"; {len(report.notes)} notes" if report.notes else ""))
    return 0
