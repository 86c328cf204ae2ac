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


def _package_of(name: str, trees: dict[str, ast.Module]) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to the package itself)."""
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return name if path.is_dir() else name.rsplit(".", 1)[0]


def _absolute(node: ast.ImportFrom, importer_package: str) -> str:
    if not node.level:
        return node.module or ""
    base = importer_package.split(".")[: len(importer_package.split(".")) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_private_name_is_imported_across_a_package_boundary():
    """A leading underscore means "this package's own": another package that needs it needs a public name."""
    trees = _modules()
    offenders = []
    for name, tree in trees.items():
        home = _package_of(name, trees)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = _absolute(node, home)
            if not source.startswith("dpn_lens") or source not in trees:
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and _package_of(source, trees) != home:
                    offenders.append(f"{name} imports {source}.{alias.name}")
    assert not offenders, "make these public where they are defined: " + "; ".join(offenders)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle_even_through_imports_inside_functions():
    """Every import counts (top level, inside functions, under TYPE_CHECKING): a lazy import that closes a
    cycle hides a layering error. A module importing its own parent package (a sibling through the
    package's ``__init__``) is the one edge left out, as is the package root, which gathers public names."""
    trees = _modules()
    graph = {}
    for name, tree in trees.items():
        if name == "dpn_lens":
            continue
        home = _package_of(name, trees)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(node, home)
                targets.add(source)
                targets |= {f"{source}.{alias.name}" for alias in node.names}   # from package import module
        graph[name] = {t for t in targets if t in trees and t != "dpn_lens" and not name.startswith(t + ".")}
    assert _cycles(graph) == [], f"import cycles: {_cycles(graph)}"


def test_the_cycle_check_finds_a_cycle_made_by_a_lazy_import():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
