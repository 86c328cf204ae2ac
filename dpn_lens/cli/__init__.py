"""The ``dpn-lens`` command line, one thin module per verb.

``main`` (``dpn_lens.cli.app``) builds the parser from each verb's ``register`` and runs the chosen
handler; ``options`` holds the options every verb shares, spelled once (``reference`` lists them all,
docs/CLI.md). Verbs: ``locate``, ``steer`` and ``demo`` (in ``main``), ``study``, ``evaluate`` (with
``control`` and ``compare``, its two parts under their earlier names), ``summary``, ``report``
(``dpn_lens.report.html``), ``export``, ``cards`` and ``explore``, ``plan``; ``models`` is handled before the
parser (``dpn_lens.models``).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["main", "build_parser"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dpn-lens`` with ``argv`` (``dpn_lens.cli.app.main``; imported here on first use, so that a
    module importing ``dpn_lens.cli.options`` does not import every verb)."""
    from dpn_lens.cli.app import main as run

    return run(argv)


def build_parser() -> Any:
    """The ``dpn-lens`` parser with every subcommand (``dpn_lens.cli.app.build_parser``)."""
    from dpn_lens.cli.app import build_parser as build

    return build()
