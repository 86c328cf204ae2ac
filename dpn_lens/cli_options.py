"""Option groups every ``dpn-lens`` subcommand spells the same way.

``--traits`` ("all" or a comma list such as ``openness,E``; space-separated values are accepted too),
``--model``/``--dtype``/``--device`` (every command that loads a model), ``--data-dir`` (default: None,
resolved by ``dpn_lens.data.contrastive.resolve_data_dir``, which falls back to ``$DPN_LENS_DATA``) and
``--out``. Each subcommand parser uses ``FORMATTER`` so ``--help`` shows the defaults.

Example:
    >>> parser = argparse.ArgumentParser(formatter_class=FORMATTER)
    >>> add_traits_option(parser); add_model_options(parser)
    >>> parser.parse_args(["--traits", "openness,E"]).traits
    ['openness,E']
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["FORMATTER", "DEFAULT_MODEL", "add_subcommand", "add_traits_option", "add_model_options",
           "add_data_dir_option", "add_out_option"]

FORMATTER = argparse.ArgumentDefaultsHelpFormatter
"""Every subcommand's help shows each option's default."""
DEFAULT_MODEL = "smollm2-135m-instruct"


def add_subcommand(subparsers: Any, name: str, help_text: str, description: str | None = None
                   ) -> argparse.ArgumentParser:
    """A subcommand parser with the shared help formatter."""
    return subparsers.add_parser(name, help=help_text, description=description or help_text,
                                 formatter_class=FORMATTER)


def add_traits_option(parser: argparse.ArgumentParser, default: str = "all") -> None:
    """``--traits``: "all" or a comma list (``openness,E``); pass the value to ``pipeline.parse_traits``."""
    parser.add_argument("--traits", nargs="+", default=default, metavar="TRAITS",
                        help="'all' or a comma list of traits, e.g. openness,E (space-separated works too)")


def add_model_options(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL,
                      default_dtype: str | None = None, model_help: str | None = None) -> None:
    """``--model``, ``--dtype`` and ``--device`` (the arguments of ``dpn_lens.models.load_model``)."""
    parser.add_argument("--model", default=default,
                        help=model_help or "embedded name (smollm2-135m-instruct, gemma-3-270m), .gguf file, "
                                           "hub name or folder")
    parser.add_argument("--dtype", default=default_dtype,
                        help="model dtype: float32, bfloat16 (about 3x faster on CPU) or float16 "
                             "(None: float32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, auto (all GPUs), ... (None: cpu)")


def add_data_dir_option(parser: argparse.ArgumentParser, holds: str) -> None:
    """``--data-dir`` (None: ``$DPN_LENS_DATA``, resolved where the data is read)."""
    parser.add_argument("--data-dir", default=None,
                        help=f"shared data folder holding {holds} (None: $DPN_LENS_DATA)")


def add_out_option(parser: argparse.ArgumentParser, help_text: str, default: str | None = None,
                   required: bool = False) -> None:
    """``--out``: where the command writes (a folder, or the report page)."""
    if required:
        parser.add_argument("--out", required=True, help=help_text)
    else:
        parser.add_argument("--out", default=default, help=help_text)
