"""One gate for edits: hooks reach a model only through ``steering.steer`` (edits) or ``hooked.read_hooks``.

``steer`` is where an edit's fingerprint, empty-map and double-application checks live; a module that
attached an edit's ``fwd_hooks()`` through ``model.hooks`` itself would skip them (the preference
scorer and the KL probe once did).
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import dpn_lens

PACKAGE = Path(dpn_lens.__file__).parent
HOOK_OWNERS = {"steering.py", "hooked.py", "raw_view.py"}
"""The modules that may call ``model.hooks``: ``steer`` for edits, ``read_hooks`` for readers, and
``raw_view.translated_hooks``, which only moves the hooks those two attached onto the raw modules for one
generation (it attaches nothing of its own)."""
RAW_HOOK_CALLS = {"hooks", "run_with_hooks", "add_hook", "add_perma_hook", "register_forward_hook",
                  "register_forward_pre_hook"}


def _calls(tree: ast.AST) -> list[tuple[ast.Call, str | None]]:
    """Every call in ``tree`` with the name of the function it sits in (None at module level)."""
    found: list[tuple[ast.Call, str | None]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                found.append((child, function))
            visit(child, inner)

    visit(tree, None)
    return found


def gate_violations(package: Path = PACKAGE) -> list[str]:
    """``path:line what`` for each call that attaches hooks outside the gate."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        for call, function in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(call.func, ast.Attribute):
                continue
            name = call.func.attr
            if name in RAW_HOOK_CALLS and relative not in HOOK_OWNERS:
                problems.append(f"{relative}:{call.lineno} calls .{name}(): read with hooked.read_hooks, "
                                "edit with steering.steer")
            # An edit's hooks are attached by steer; only another edit's own fwd_hooks may compose them.
            if name == "fwd_hooks" and relative != "steering.py" and function != "fwd_hooks":
                problems.append(f"{relative}:{call.lineno} attaches an edit's fwd_hooks() itself: apply the edit "
                                "with steering.steer (edit.masked(mask) for some positions only)")
    return problems


def test_no_module_attaches_hooks_outside_steer_and_read_hooks():
    assert gate_violations() == []


def test_the_gate_check_finds_a_bypass(tmp_path):
    """The check itself can fail: a module that attaches an edit's hooks directly is reported."""
    (tmp_path / "bypass.py").write_text(
        "def score(model, edit):\n"
        "    with model.hooks(fwd_hooks=edit.fwd_hooks()):\n"
        "        return model('x')\n", encoding="utf-8")
    (tmp_path / "composed.py").write_text(
        "class Wrapper:\n"
        "    def fwd_hooks(self):\n"
        "        return self.inner.fwd_hooks()\n", encoding="utf-8")
    problems = gate_violations(tmp_path)
    assert len(problems) == 2 and all(p.startswith("bypass.py:2") for p in problems)


def test_scoring_through_steer_refuses_an_edit_that_is_already_applied(tiny_model):
    """The double-application guard now covers the masked scoring path too."""
    import pytest

    from dpn_lens.evaluation.preference import PreferencePair, preference_margins
    from dpn_lens.steering import Intervention, steer

    delta = torch.zeros(int(tiny_model.cfg.d_mlp))
    delta[3] = 1.0
    edit = Intervention({1: delta}, positions="all")
    pair = PreferencePair("how are you ?", "fine", "bad")
    with steer(tiny_model, edit):
        with pytest.raises(RuntimeError, match="already applied"):
            preference_margins(tiny_model, [pair], edit=edit)
