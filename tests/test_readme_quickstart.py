"""README's Python quick start runs as written on the embedded model (fewer pairs and tokens, to save time)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    """The first ```python block after README's "## Quick start" heading."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_quick_start_block_is_there_and_short():
    code = quick_start_code()
    assert "dl.steer(" in code and "select=\"attribution-t\"" in code
    assert len(code.strip().splitlines()) <= 12


@pytest.mark.slow
def test_the_readme_quick_start_runs_on_the_embedded_model():
    code = quick_start_code().replace("n_pairs=500", "n_pairs=100").replace("max_new_tokens=40", "max_new_tokens=8")
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["paper_map"].rule == "dpn-le" and namespace["effect_map"].rule == "attribution-t"
    assert namespace["effect_map"].n_selected() == namespace["paper_map"].n_selected() > 0
    assert namespace["gamma"] > 0 and printed.getvalue().strip()
