"""Generation through the raw Hugging Face modules, with the active hook points translated into plain hooks.

The bridge replaces the modules of the model it wraps by its own components, which run each hook point in
Python on every forward call. Greedy generation through them ran at 0.51-0.79x the speed of a raw copy of the
model on the CPU (docs/PERFORMANCE.md, "Overhead"), while the raw copy steered by plain PyTorch hooks ran at
0.97-1.01x. ``raw_modules(model)`` swaps every bridge component of ``model.original_model`` back for the module
it wraps (``_original_component``) for the duration of a ``with`` block, and restores them on exit, also after
an exception. ``translated_hooks(model)`` moves the hooks that are active on the bridge's hook points (an
edit's ``steer``, a ``read_hooks`` reader) onto those raw modules, where a hook point has a raw counterpart:

* ``blocks.{l}.mlp.hook_post``: the input of ``layers[l].mlp.down_proj`` (a forward pre-hook);
* ``blocks.{l}.hook_resid_post``: the output of ``layers[l]`` (its first element, where it is a tuple);
* ``hook_embed``: the output of ``embed_tokens``.

A hook on any other point raises ``Untranslatable``; ``greedy_generate`` then generates through the bridge as
usual. The hook functions run unchanged: each gets the activation and the bridge's ``HookPoint`` as ``hook``,
and what it returns replaces the activation.

Attention: booting the bridge set the wrapped model's attention to "eager". Kept (``attention=None``, the
default engine ``"raw"``), the raw modules compute the bridge's logits bit for bit (float32 and bfloat16, both
embedded models and the tiny one: ``tests/test_raw_view.py``), so generation gives the bridge's tokens. With
``attention="sdpa"`` (``engine="raw-sdpa"``) they attend as a raw Hugging Face load does: faster, the same
tokens in float32, but in bfloat16 other rounding, which changes greedy answers as much as bfloat16 itself does.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> model = build_tiny_model()
    >>> with raw_modules(model) as hf:
    ...     type(hf.model.layers[0].mlp).__name__
    'LlamaMLP'
    >>> type(model.original_model.model.layers[0].mlp).__name__
    'GatedMLPBridge'
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator

import torch

__all__ = ["raw_modules", "translated_hooks", "Untranslatable", "active_hooks"]


class Untranslatable(Exception):
    """A hook is active on a hook point that has no raw counterpart (``translated_hooks``)."""


def _is_bridge(module: torch.nn.Module) -> bool:
    return "_original_component" in module._modules


@contextlib.contextmanager
def raw_modules(model: Any, attention: str | None = "sdpa") -> Iterator[Any]:
    """``model.original_model`` with every bridge component swapped for the module it wraps, inside the
    block; the bridge's components are put back on exit, also after an exception. ``attention``: the Hugging
    Face attention implementation to run inside the block (``None``: the one the model holds)."""
    root = model.original_model
    swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def unwrap(parent: torch.nn.Module) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            while _is_bridge(child):
                original = child._modules["_original_component"]
                swaps.append((parent, name, child))
                parent._modules[name] = original
                child = original
            unwrap(child)

    held = getattr(root.config, "_attn_implementation", None)
    switched = False
    try:
        if _is_bridge(root):
            raise Untranslatable("the wrapped model is itself a bridge component")
        unwrap(root)
        # Booting the bridge set the wrapped model's attention to "eager" (the bridge computes attention in its own
        # component); the raw modules attend as a raw load does, through scaled_dot_product_attention.
        if attention is not None and attention != held and hasattr(root, "set_attn_implementation"):
            try:
                root.set_attn_implementation(attention)
                switched = True
            except (ValueError, ImportError):
                pass                        # an architecture without it keeps eager attention
        yield root
    finally:
        if switched:
            root.set_attn_implementation(held)
        for parent, name, child in reversed(swaps):
            parent._modules[name] = child


def active_hooks(model: Any) -> list[tuple[list[str], Any, list[Callable]]]:
    """``(names, hook point, forward hooks)`` of each hook point with a hook on it (PyTorch's ``(module, input,
    output)`` form). One point can hold several names (``blocks.{l}.mlp.hook_post`` is also
    ``blocks.{l}.mlp.out.hook_in``): each point once, with all its names."""
    points: dict[int, tuple[list[str], Any]] = {}
    for name, point in model.hook_dict.items():
        points.setdefault(id(point), ([], point))[0].append(name)
    found = []
    for names, point in points.values():
        if point._forward_pre_hooks:
            raise Untranslatable(f"{names[0]} holds a forward pre-hook")
        if point._forward_hooks:
            found.append((names, point, list(point._forward_hooks.values())))
    return found


_MLP_POST = re.compile(r"blocks\.(\d+)\.mlp\.hook_post")
_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")


@contextlib.contextmanager
def translated_hooks(model: Any, raw: Any) -> Iterator[None]:
    """The hooks active on ``model``'s hook points, attached to the raw modules of ``raw`` (inside
    ``raw_modules(model)``) and removed on exit, also after an exception. ``Untranslatable`` (before any is
    attached) where a hook sits on a point without a raw counterpart."""
    plan: list[tuple[torch.nn.Module, str, Callable]] = []
    for names, point, functions in active_hooks(model):
        run = _chain(point, functions)
        for name in names:
            if match := _MLP_POST.fullmatch(name):
                plan.append((_module(raw, f"model.layers.{match.group(1)}.mlp.down_proj"), "pre", run))
            elif match := _RESID_POST.fullmatch(name):
                plan.append((_module(raw, f"model.layers.{match.group(1)}"), "post", run))
            elif name == "hook_embed":
                plan.append((_module(raw, "model.embed_tokens"), "post", run))
            else:
                continue
            break
        else:
            raise Untranslatable(f"a hook is active on {names[0]}, which has no raw counterpart")
    handles = []
    try:
        for module, kind, run in plan:
            handles.append(module.register_forward_pre_hook(_pre(run)) if kind == "pre"
                           else module.register_forward_hook(_post(run)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _module(raw: Any, path: str) -> torch.nn.Module:
    """The submodule of ``raw`` at the dotted ``path``; ``Untranslatable`` where an architecture names it otherwise
    (the bridge's loop then runs, whose hook points every adapter maps)."""
    module = raw
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part, None)
        if module is None:
            raise Untranslatable(f"{type(raw).__name__} has no {path}")
    return module


def _chain(point: Any, functions: list[Callable]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The hook point's hooks in order, each on what the one before returned (as the hook point runs them)."""
    def run(activation: torch.Tensor) -> torch.Tensor:
        for function in functions:
            result = function(point, (activation,), activation)
            if result is not None:
                activation = result
        return activation
    return run


def _pre(run: Callable) -> Callable:
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        return (run(args[0]), *args[1:])
    return hook


def _post(run: Callable) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (run(output[0]), *output[1:])
        return run(output)
    return hook
