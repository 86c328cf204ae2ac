"""Fixtures only: a tiny random Llama (unit tests), the embedded SmolLM2 (slow, end to end), the shared
data folder. The builders behind them live in ``tests/helpers.py``.

Importing: this file puts ``tests/`` on ``sys.path`` once, so every test file imports its builders the
same way, ``from helpers import ...``; no test imports ``conftest`` or another test module.

Docstring examples: ``--doctest-modules`` (pyproject.toml) runs the examples in ``dpn_lens/``. A docstring
whose examples are ALL ``+SKIP`` (they need a real model or data) is deselected here instead of being
reported as "skipped": an example either runs or it is documentation, not a test
(``pytest_collection_modifyitems`` below).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from helpers import TINY_HIGH, TINY_LOW, build_tiny_hf_model, build_tiny_model, has_runnable_example  # noqa: E402  (tests/ on sys.path)

REPO = TESTS.parent
SHARED_DATA = Path(os.environ.get("DPN_LENS_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    """Deselect docstring examples that are all ``+SKIP``: they would only ever count as "skipped"."""
    runnable, skipped_only = [], []
    for item in items:
        if isinstance(item, pytest.DoctestItem) and item.dtest is not None and not has_runnable_example(item.dtest):
            skipped_only.append(item)
        else:
            runnable.append(item)
    if skipped_only:
        config.hook.pytest_deselected(items=skipped_only)
        items[:] = runnable


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory):
    """Same architecture and sizes, different random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_other"), seed=1)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A random Llama saved like a hub checkpoint, with a context long enough for role-play prompts
    (what the CLI tests pass as --model)."""
    folder = tmp_path_factory.mktemp("tiny_hf")
    hf_model, _ = build_tiny_hf_model(folder, n_layers=3, max_positions=512)
    hf_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (slow tests only)."""
    from dpn_lens import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared data folder {SHARED_DATA} is missing; set DPN_LENS_DATA to it")
    return SHARED_DATA


@pytest.fixture
def tiny_pairs():
    from dpn_lens import ContrastiveSet

    return ContrastiveSet("extraversion", TINY_HIGH, TINY_LOW, source="tests")
