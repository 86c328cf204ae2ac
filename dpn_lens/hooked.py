"""What dpn-lens needs from a TransformerLens model: hook names, devices, padding and tokenizing.

Every module that talks to a model imports these helpers from here (not from ``collect``), so the
model-facing rules live in one place: which hook point is "the neuron activation", which device
input ids go to, which id pads a batch, and how a prompt becomes token ids.

Hooks reach a model two ways only: ``read_hooks`` here, for hooks that read what the model computes
(caching activations, stopping a pass early, making gradient leaves), and ``steering.steer``, for every
edit. ``tests/test_hook_gate.py`` checks that no other module calls ``model.hooks`` or attaches an
edit's ``fwd_hooks()`` itself, so an edit always passes ``steer``'s checks.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from dpn_lens.data.prompts import render_for_model

__all__ = ["HookedModel", "HOOK_NAME", "hook_name", "read_hooks", "frozen_weights", "leaf_hook", "hf_model", "hf_module", "decoder_layers", "down_proj_weight",
           "post_mlp_norm", "require_hooked_model", "check_layers", "pad_token_id",
           "pad_token_lists", "input_device", "tokenize_prompts", "last_token_batches", "encode", "StopForward",
           "forward_until_stopped", "require_fired"]

HOOK_NAME = "blocks.{layer}.mlp.hook_post"
"""The neuron activation of DPN-LE: the input of the MLP output projection."""


@runtime_checkable
class HookedModel(Protocol):
    """The part of a TransformerLens model (``TransformerBridge`` or ``HookedTransformer``) dpn-lens uses.

    ``cfg`` gives ``n_layers``, ``d_mlp``, ``n_ctx`` and ``device``; ``hooks(fwd_hooks=...)`` is a
    context manager that removes its hooks on exit; ``__call__(input_ids, attention_mask=...)`` returns
    logits ``[batch, pos, vocab]``.
    """

    cfg: Any
    tokenizer: Any

    def hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def hook_name(layer: int, template: str = HOOK_NAME) -> str:
    """``hook_name(3)`` -> ``'blocks.3.mlp.hook_post'``."""
    return template.format(layer=layer)


class StopForward(Exception):
    """Raised by a reading hook once the pass has given all it is read for: the later layers and the
    unembedding (on Gemma 3, 262k logits per position: most of a small model's forward) would be wasted
    work. The caller catches it around the forward call.

    Example:
        >>> from dpn_lens.tiny import build_tiny_model
        >>> model, seen = build_tiny_model(), []
        >>> def last(activation, hook):
        ...     seen.append(tuple(activation.shape))
        ...     raise StopForward
        >>> with read_hooks(model, [(hook_name(0), last)]):
        ...     forward_until_stopped(model, torch.tensor([[1, 2, 3]]))
        >>> seen                     # layer 0 was read; the others and the unembedding did not run
        [(1, 3, 48)]
    """


def forward_until_stopped(model: HookedModel, input_ids: Tensor, **kwargs: Any) -> None:
    """``model(input_ids, **kwargs)`` for its hooks' sake: a ``StopForward`` a hook raises ends the pass here
    (the output, if the pass runs to its end, is dropped)."""
    try:
        model(input_ids, **kwargs)
    except StopForward:
        pass


def require_fired(fired: int, expected: int, points: str = "MLP hook points") -> None:
    """A reading pass's check that each of its ``expected`` hooks fired: a model whose forward pass skips
    ``points`` would otherwise give statistics of nothing.

    Example:
        >>> require_fired(3, 3)
        >>> require_fired(2, 3)
        Traceback (most recent call last):
        ...
        RuntimeError: only 2 of 3 hooks fired; the model's forward pass does not run through its MLP hook points
    """
    if fired != expected:
        raise RuntimeError(f"only {fired} of {expected} hooks fired; the model's forward pass does not run "
                           f"through its {points}")


@contextlib.contextmanager
def read_hooks(model: HookedModel, hooks: Sequence[tuple[str, Callable]]) -> Iterator[HookedModel]:
    """Attach forward hooks that read the model without changing what it computes; removed on exit,
    also after an exception.

    A reading hook returns its activation's values unchanged: it may cache them, raise to end the
    pass early, or return them detached or as a gradient leaf. A hook that changes values is an edit:
    build an ``Edit`` and apply it with ``steering.steer`` instead, which checks it.

    Example:
        >>> from dpn_lens.tiny import build_tiny_model
        >>> model, seen = build_tiny_model(), []
        >>> with read_hooks(model, [(hook_name(0), lambda a, hook: seen.append(a.shape[-1]))]):
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> seen
        [48]
    """
    require_hooked_model(model, "read_hooks()")
    with model.hooks(fwd_hooks=list(hooks)):
        yield model


@contextlib.contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Turn ``requires_grad`` off on every parameter that has it, for a pass that needs gradients with
    respect to activations only; each parameter's flag is restored on exit, also after an exception.

    With the weights requiring grad, autograd builds the graph from the embedding on and every linear
    layer saves its input for a weight gradient nobody asks for; frozen, the graph starts at the first
    activation made a leaf, and the gradients with respect to the activations are the same.

    Example:
        >>> from dpn_lens.tiny import build_tiny_model
        >>> model = build_tiny_model()
        >>> with frozen_weights(model):
        ...     print(any(p.requires_grad for p in model.parameters()))
        False
        >>> all(p.requires_grad for p in model.parameters())
        True
    """
    thawed = [parameter for parameter in model.parameters() if parameter.requires_grad]
    try:
        for parameter in thawed:
            parameter.requires_grad_(False)
        yield model
    finally:
        for parameter in thawed:
            parameter.requires_grad_(True)


def leaf_hook(store: dict[Any, Tensor], key: Any, cut: bool = False) -> Callable[[Tensor, Any], Tensor]:
    """A hook that keeps the activation in ``store[key]``, made a leaf that requires grad when it has no
    graph yet: for gradients with respect to hooked activations (``effect.gradients``, the
    multifunctionality study's attribution).

    The passes run with the weights frozen (``frozen_weights``), so the first hooked activation carries no
    graph; it becomes a leaf, and every later activation depends on it and so has one: each layer's
    gradient is the total one. With ``cut`` every activation becomes a leaf, so a layer's gradient leaves
    out the paths that run through a later hooked layer (it keeps the residual stream, attention and the
    unembedding).

    Example:
        >>> store = {}
        >>> out = leaf_hook(store, 0)(torch.ones(2), None)
        >>> out.requires_grad, store[0] is out
        (True, True)
    """
    def hook(activation: Tensor, hook: Any) -> Tensor:
        if cut or not activation.requires_grad:
            activation = activation.detach().requires_grad_(True)
        store[key] = activation
        return activation
    return hook


def require_hooked_model(model: Any, caller: str) -> None:
    """Raise a TypeError naming the fix unless ``model`` is a TransformerLens model with hook points."""
    if not (hasattr(model, "cfg") and hasattr(model, "hooks") and hasattr(model, "hook_dict")):
        raise TypeError(f"{caller} needs a TransformerLens model with hook points (a TransformerBridge from "
                        f"dpn_lens.load_model, or a HookedTransformer); got {type(model).__name__}")


def check_layers(model: HookedModel, layers: Sequence[int] | None, template: str = HOOK_NAME) -> list[int]:
    """Validate layer indices against the model and the presence of the hook point.

    Returns the chosen layers (all layers for ``None``), increasing and distinct.
    """
    require_hooked_model(model, "collecting statistics")
    n_layers = int(model.cfg.n_layers)
    chosen = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if not chosen:
        raise ValueError("no layers given; pass layers=None for all layers or a non-empty list")
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: this model has layers 0..{n_layers - 1}")
    if sorted(set(chosen)) != chosen:
        raise ValueError(f"layers must be increasing and distinct, got {chosen}")
    hook_dict = model.hook_dict  # type: ignore[attr-defined]
    missing = [hook_name(layer, template) for layer in chosen if hook_name(layer, template) not in hook_dict]
    if missing:
        raise ValueError(
            f"the model has no hook point {missing[0]!r}; dpn-lens reads the MLP hidden activation at "
            "'blocks.{layer}.mlp.hook_post'. Load the model with dpn_lens.load_model (a TransformerBridge) "
            "or pass hook_template= naming the MLP activation hook of this architecture"
        )
    return chosen


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad batches with: the tokenizer's pad token, else EOS, else 0.

    Padded positions are masked out of attention and never read, so any id works; tokenizers without
    a pad token are fine.

    Example:
        >>> class NoPad: pad_token_id, eos_token_id = None, 2
        >>> pad_token_id(NoPad())
        2
    """
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return 0


def pad_token_lists(token_lists: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
                    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Stack token lists into ``(input_ids, attention_mask)``, padded on the left or the right.

    Example:
        >>> ids, mask = pad_token_lists([[5, 6, 7], [8]], pad_id=0, padding_side="left")
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    longest = max(len(tokens) for tokens in token_lists)
    ids = torch.full((len(token_lists), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), longest), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        span = slice(longest - len(tokens), longest) if padding_side == "left" else slice(0, len(tokens))
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask


def last_token_batches(model: HookedModel, prompts: Sequence[str], batch_size: int = 8
                       ) -> Iterator[tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, "batch"]]]:
    """The prompts tokenized (``tokenize_prompts``) and right-padded in batches of ``batch_size``, as
    ``(input_ids, attention_mask, last)``, ``last`` holding each row's last-token position (where hooks
    that read "the last prompt token" index)."""
    token_lists = tokenize_prompts(model, prompts)
    pad = pad_token_id(model.tokenizer)
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start:start + batch_size]
        ids, mask = pad_token_lists(chunk, pad, "right")
        yield ids, mask, torch.tensor([len(tokens) - 1 for tokens in chunk])


def input_device(model: HookedModel) -> torch.device:
    """Where input ids go: the device of the embedding (the first device of a split model), default CPU."""
    return torch.device(getattr(model.cfg, "device", None) or "cpu")


def encode(model: HookedModel, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of ``text``; a BOS token is added once (never twice after a chat template)."""
    tokenizer = model.tokenizer
    bos = getattr(tokenizer, "bos_token", None)
    add_special = add_bos and not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


_TOKENIZE_CHUNK = 256
"""Prompts per call of the (Rust, batched) tokenizer: fast, and bounded in transient memory."""


def tokenize_prompts(model: HookedModel, prompts: Sequence[str], chat: bool | None = None,
                     truncation: Literal["error", "left"] = "error") -> list[list[int]]:
    """Render each prompt for the model (chat template or raw) and tokenize it, unpadded."""
    return [ids.tolist() for ids in tokenize_compact(model, prompts, chat, truncation)]


def tokenize_compact(model: HookedModel, prompts: Sequence[str], chat: bool | None = None,
                     truncation: Literal["error", "left"] = "error") -> list[np.ndarray]:
    """Like ``tokenize_prompts`` but int32 arrays: 4 bytes a token instead of ~36 for a Python int."""
    tokenizer = model.tokenizer
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    bos = getattr(tokenizer, "bos_token", None)
    token_arrays: list[np.ndarray] = []
    for start in range(0, len(prompts), _TOKENIZE_CHUNK):
        texts = []
        for index in range(start, min(start + _TOKENIZE_CHUNK, len(prompts))):
            prompt = prompts[index]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt #{index} is empty or whitespace; remove it or fill in its text")
            texts.append(render_for_model(model, prompt, chat=chat))
        # A chat template already wrote the BOS token; adding special tokens again would double it.
        # Texts are tokenized in one batched call per value of that flag.
        with_bos = [not (bos and text.startswith(bos)) for text in texts]
        ids_by_row: list[Any] = [None] * len(texts)
        for flag in (True, False):
            rows = [row for row, value in enumerate(with_bos) if value == flag]
            if rows:
                encoded = tokenizer([texts[row] for row in rows], add_special_tokens=flag)["input_ids"]
                for row, ids in zip(rows, encoded):
                    ids_by_row[row] = ids
        for offset, ids in enumerate(ids_by_row):
            index = start + offset
            if n_ctx and len(ids) > n_ctx:
                if truncation == "error":
                    raise ValueError(
                        f"prompt #{index} has {len(ids)} tokens, more than the model's context of {n_ctx}; shorten "
                        "it or pass truncation='left' (keeps the last tokens, where the answer starts)"
                    )
                warnings.warn(f"prompt #{index}: {len(ids)} tokens truncated on the left to the context of {n_ctx}")
                ids = ids[-n_ctx:]
            token_arrays.append(np.asarray(ids, dtype=np.int32))
    return token_arrays


# ----- the Hugging Face modules under a TransformerBridge (the weights exports and the logit lens read) -----
def hf_model(model: Any) -> Any:
    """The Hugging Face model a TransformerBridge wraps (or ``model`` itself when it is one)."""
    return getattr(model, "original_model", model)


def hf_module(module: Any) -> Any:
    """The Hugging Face module a TransformerBridge component wraps (or the module itself)."""
    return getattr(module, "original_component", module)


def decoder_layers(model: Any, purpose: str = "this") -> Any:
    """``model.layers`` of the wrapped decoder; a ValueError naming ``purpose`` where there is none.

    Example:
        >>> from dpn_lens.tiny import build_tiny_model
        >>> len(decoder_layers(build_tiny_model()))
        4
    """
    hf = hf_model(model)
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{purpose} needs a decoder with `model.layers[i].mlp.down_proj` (LLaMA, Qwen2, Mistral, "
                         f"Gemma); {type(hf).__name__} has no `model.layers`")
    return layers


def down_proj_weight(model: Any, layer: int, purpose: str = "this") -> Tensor:
    """``W_out`` of ``layer``: the ``down_proj`` weight ``[d_model, d_mlp]`` whose input is ``hook_post``."""
    down = getattr(hf_module(hf_module(decoder_layers(model, purpose)[layer]).mlp), "down_proj", None)
    if down is None:
        raise ValueError(f"layer {layer}'s MLP has no `down_proj`; {purpose} supports LLaMA-style gated MLPs")
    return hf_module(down).weight


def post_mlp_norm(model: Any, layer: int) -> Any:
    """The norm between ``layer``'s MLP and the residual add (Gemma 2/3's ``post_feedforward_layernorm``), or None."""
    return getattr(hf_module(decoder_layers(model)[layer]), "post_feedforward_layernorm", None)
