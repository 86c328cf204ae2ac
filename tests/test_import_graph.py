"""The package's import graph: no module imports the package root, and localize / neuron_map form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpn_lens"


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("dpn_lens",) + path.relative_to(PACKAGE).with_suffix("").parts)
        trees[name.removesuffix(".__init__")] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return trees


def _imported(tree: ast.Module) -> set[str]:
    """Every dpn_lens module a module imports, at top level or inside functions."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("dpn_lens")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpn_lens"):
            names.add(node.module)
    return names


def test_no_module_imports_the_package_root():
    offenders = []
    for name, tree in _modules().items():
        if name == "dpn_lens":
            continue   # the root itself gathers the public names
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(alias.name == "dpn_lens" for alias in node.names):
                offenders.append(f"{name}: import dpn_lens")
            if isinstance(node, ast.ImportFrom) and node.module == "dpn_lens" and node.level == 0:
                offenders.append(f"{name}: from dpn_lens import {', '.join(a.name for a in node.names)}")
    assert not offenders, "modules inside the package import the package root: " + "; ".join(offenders)


def test_localize_and_neuron_map_do_not_import_each_other_in_a_cycle():
    trees = _modules()
    assert "dpn_lens.localization.localize" not in _imported(trees["dpn_lens.localization.neuron_map"])
    assert "dpn_lens.localization.neuron_map" in _imported(trees["dpn_lens.localization.localize"])   # at module top: no lazy import needed
    assert "dpn_lens.localization.settings" in _imported(trees["dpn_lens.localization.neuron_map"])


def test_no_module_outside_collect_takes_model_helpers_from_collect():
    helpers = {"hook_name", "HOOK_NAME", "require_hooked_model", "check_layers", "pad_token_id", "pad_token_lists",
               "input_device", "tokenize_prompts", "encode"}
    offenders = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "dpn_lens.collection.collect":
                taken = helpers & {alias.name for alias in node.names}
                if taken:
                    offenders.append(f"{name}: {sorted(taken)}")
    assert not offenders, "import these from dpn_lens.hooked: " + "; ".join(offenders)
