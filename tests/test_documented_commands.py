"""Every `dpn-lens ...` and `python benchmarks/...` / `python scripts/...` command that README.md and docs/
name parses with today's options: a renamed option or subcommand fails here, not in a user's shell."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(prefix: str) -> list[tuple[str, list[str]]]:
    """``(doc, argv)`` of every command line starting with ``prefix`` inside the docs' fenced code blocks
    (what a reader copies), continuation lines joined, comments cut. Inline mentions in prose, such as
    `dpn-lens control`, name a command without its arguments and are not checked."""
    found = []
    for doc in DOCS:
        language, block = None, []
        for line in doc.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("```"):
                if language is None:
                    language, block = line.strip()[3:].strip() or "text", []
                    continue
                if language in ("bash", "sh", "console", "text"):
                    found += _block_commands(doc.name, "\n".join(block), prefix)
                language = None
            elif language is not None:
                block.append(line)
    return found


def _block_commands(doc: str, block: str, prefix: str) -> list[tuple[str, list[str]]]:
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        for part in line.strip().removeprefix("$ ").split(" && "):
            part = part.strip()
            if part.startswith(prefix):
                found.append((doc, shlex.split(re.split(r"\s+#", part)[0])[len(shlex.split(prefix)):]))
    return found


def test_every_dpn_lens_command_in_the_docs_parses(capsys):
    from dpn_lens.cli import build_parser

    commands = [(doc, argv) for doc, argv in _commands("dpn-lens ") if argv and not argv[0].startswith("<")]
    assert len(commands) >= 20, commands
    parser = build_parser()
    for doc, argv in commands:
        if argv[0] in ("models",):                    # handled before the parser (dpn_lens.models CLI)
            continue
        argv = [a.replace("FOLDER", "some/folder") for a in argv]
        try:
            args = parser.parse_args(argv)
        except SystemExit as error:
            if error.code not in (0, None):
                pytest.fail(f"{doc}: `dpn-lens {' '.join(argv)}` does not parse")
            continue
        # The docs show today's spellings only (--run, --n-pairs, --eval-pairs, comma lists), not the
        # earlier ones that still parse for a release.
        notes = capsys.readouterr().err
        assert "is now spelled" not in notes and getattr(args, "run_positional", None) is None, \
            f"{doc}: `dpn-lens {' '.join(argv)}` uses an earlier spelling: {notes.strip()}"
        assert not getattr(args, "space_separated", []), \
            f"{doc}: `dpn-lens {' '.join(argv)}`: write {args.space_separated} as a comma list"


@pytest.mark.parametrize("script", ["benchmarks/bench_cards.py", "benchmarks/bench_overhead.py",
                                    "benchmarks/bench_plan.py", "benchmarks/bench_real_size.py",
                                    "scripts/screenshot_explorer.py"])
def test_every_documented_script_command_parses(script, capsys):
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    commands = _commands(f"python {script} ")
    if script.startswith("benchmarks/"):
        assert commands, f"docs name no `python {script}` command; document how to run it"
        for doc, argv in commands:
            module.parser().parse_args(argv)
