"""Collect MLP activation statistics of contrastive prompts through TransformerLens hook points.

Per layer, a hook on ``blocks.{l}.mlp.hook_post`` reads one vector per prompt (the last non-pad
prompt token, or the mean over prompt tokens) and folds it into running statistics. Nothing else is
kept: memory does not grow with the number of prompts. The forward pass stops right after the
last requested layer, so later layers and the unembedding are never computed.

Performance (docs/PERFORMANCE.md): the hooks only gather one ``[batch, d_mlp]`` slice per layer on
the activation's own device, without synchronising; the slices are stacked and folded into the
float64 statistics once per batch, on ``statistics_device`` (the model's input device by default,
so a GPU run never round-trips activations through the host). Token ids are kept as compact int32
arrays, so the only memory that grows with the number of prompts is ~4 bytes per prompt token.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens.data.contrastive import ContrastiveSet
from dpn_lens.data.prompts import render_for_model
from dpn_lens.statistics import ContrastStatistics, GroupStatistics

__all__ = ["HOOK_NAME", "require_hooked_model", "input_device", "pad_token_id", "pad_token_lists", "collect_statistics",
           "collect_group_statistics", "tokenize_prompts", "check_layers", "hook_name"]

HOOK_NAME = "blocks.{layer}.mlp.hook_post"
"""The neuron activation of DPN-LE: the input of the MLP output projection."""

TokenPosition = Literal["last", "mean"]


def hook_name(layer: int, template: str = HOOK_NAME) -> str:
    """``hook_name(3)`` -> ``'blocks.3.mlp.hook_post'``."""
    return template.format(layer=layer)


def require_hooked_model(model: Any, caller: str) -> None:
    """Raise a TypeError naming the fix unless ``model`` is a TransformerLens model with hook points."""
    if not (hasattr(model, "cfg") and hasattr(model, "hooks") and hasattr(model, "hook_dict")):
        raise TypeError(f"{caller} needs a TransformerLens model with hook points (a TransformerBridge from "
                        f"dpn_lens.load_model, or a HookedTransformer); got {type(model).__name__}")


def check_layers(model: Any, layers: Sequence[int] | None, template: str = HOOK_NAME) -> list[int]:
    """Validate layer indices against the model and the presence of the hook point."""
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
    hook_dict = model.hook_dict
    missing = [hook_name(layer, template) for layer in chosen if hook_name(layer, template) not in hook_dict]
    if missing:
        raise ValueError(
            f"the model has no hook point {missing[0]!r}; dpn-lens reads the MLP hidden activation at "
            "'blocks.{layer}.mlp.hook_post'. Load the model with dpn_lens.load_model (a TransformerBridge) "
            "or pass hook_template= naming the MLP activation hook of this architecture"
        )
    return chosen


@dataclass
class _Batch:
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    indices: list[int]


def tokenize_prompts(model: Any, prompts: Sequence[str], chat: bool | None = None,
                     truncation: Literal["error", "left"] = "error") -> list[list[int]]:
    """Render each prompt for the model (chat template or raw) and tokenize it, unpadded."""
    return [ids.tolist() for ids in _tokenize_compact(model, prompts, chat, truncation)]


_TOKENIZE_CHUNK = 256
"""Prompts per call of the (Rust, batched) tokenizer: fast, and bounded in transient memory."""


def _tokenize_compact(model: Any, prompts: Sequence[str], chat: bool | None = None,
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


def _batches(token_lists: Sequence[Sequence[int]], max_batch_size: int, max_batch_tokens: int, pad_id: int,
             padding_side: str, device: Any) -> Iterator[_Batch]:
    """Batches by token budget, longest first, so padding (wasted compute) stays small."""
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    start = 0
    while start < len(order):
        longest = len(token_lists[order[start]])
        size = max(1, min(max_batch_size, max_batch_tokens // max(longest, 1)))
        chunk = order[start:start + size]
        start += size
        ids, mask = pad_token_lists([token_lists[index] for index in chunk], pad_id, padding_side)
        yield _Batch(ids.to(device), mask.to(device), chunk)


class _StopForward(Exception):
    """Raised by the last hook: everything after the last needed layer is wasted work."""


def _read_positions(activation: Float[Tensor, "batch pos d_mlp"], mask: Int[Tensor, "batch pos"],
                    token_position: TokenPosition) -> Float[Tensor, "batch d_mlp"]:
    """The vector of each prompt: its last non-pad token, or the mean over its non-pad tokens."""
    return _Readout(token_position, mask)(activation)


class _Readout:
    """Reads one vector per prompt from a layer's activation; index tensors are built once per batch.

    With a model split over several devices each layer's activation lives on its own device, so
    the positions (or mean weights) are cached per device: one small copy per device and batch,
    no copy and no host synchronisation per layer.
    """

    def __init__(self, token_position: TokenPosition, mask: Int[Tensor, "batch pos"]):
        self.token_position = token_position
        self.mask = mask
        self._cache: dict[Any, tuple[Tensor, Tensor]] = {}

    def _last_positions(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._cache:
            mask = self.mask.to(device)
            # Last non-pad token: for right padding it is at sum(mask)-1, for left padding at the
            # end; the index of the last 1 in the mask covers both.
            positions = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
            self._cache[device] = (torch.arange(mask.shape[0], device=device), positions)
        return self._cache[device]

    def _mean_weights(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in self._cache:
            weights = self.mask.to(device, dtype)
            self._cache[key] = ((weights / weights.sum(dim=1, keepdim=True)).unsqueeze(1),) * 2
        return self._cache[key][0]

    def __call__(self, activation: Float[Tensor, "batch pos d_mlp"]) -> Float[Tensor, "batch d_mlp"]:
        if self.token_position == "last":
            rows, positions = self._last_positions(activation.device)
            return activation[rows, positions]
        # Mean as one batched matmul of normalised mask weights, accumulated in at least float32
        # even for a bf16/fp16 model (a long bf16 sum loses digits).
        dtype = torch.promote_types(activation.dtype, torch.float32)
        weights = self._mean_weights(activation.device, dtype)
        return torch.bmm(weights, activation.to(dtype)).squeeze(1)


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


def input_device(model: Any) -> torch.device:
    """Where input ids go: the device of the embedding (the first device of a split model), default CPU."""
    return torch.device(getattr(model.cfg, "device", None) or "cpu")


def _check_batch_limits(max_batch_size: Any, max_batch_tokens: Any) -> None:
    for name, value in (("max_batch_size", max_batch_size), ("max_batch_tokens", max_batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def collect_group_statistics(
    model: Any,
    prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    token_position: TokenPosition = "last",
    max_batch_size: int = 16,
    max_batch_tokens: int = 4096,
    padding_side: Literal["left", "right"] = "right",
    chat: bool | None = None,
    truncation: Literal["error", "left"] = "error",
    hook_template: str = HOOK_NAME,
    progress: bool = True,
    description: str = "",
    statistics_device: str | torch.device | None = None,
) -> GroupStatistics:
    """Running statistics of the MLP activations of ``prompts`` at the chosen layers.

    Args:
        model: a ``TransformerBridge`` (see ``dpn_lens.load_model``); any dtype (a bf16 model gives
            bf16 activations, folded into float64 statistics), on one device or split over several.
        prompts: user messages; rendered through the chat template of chat models.
        layers: model layers to read (default: all); rows of the result follow this order.
        token_position: ``"last"`` (last non-pad prompt token, the paper's choice) or ``"mean"``.
        max_batch_size, max_batch_tokens: batch limits; batches are formed longest-first.
        padding_side: where pads go; results do not depend on it (tested).
        chat: force (True) or skip (False) the chat template; default: the model's own kind.
        truncation: ``"error"`` for prompts longer than the context, or ``"left"`` to keep their end.
        statistics_device: where the running float64 statistics are updated (default: the model's
            input device, so GPU activations never go through the host). The result is always
            returned on the CPU.

    Returns:
        ``GroupStatistics`` with ``[len(layers), d_mlp]`` tensors (float64, on the CPU).

    Example:
        >>> stats = collect_group_statistics(model, ["You are outgoing. Hi!"], layers=[0, 1])  # doctest: +SKIP
        >>> stats.count, stats.shape                                                          # doctest: +SKIP
        (1, (2, 1536))
    """
    from tqdm.auto import tqdm

    if token_position not in ("last", "mean"):
        raise ValueError(f"token_position must be 'last' or 'mean', got {token_position!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    _check_batch_limits(max_batch_size, max_batch_tokens)
    chosen = check_layers(model, layers, hook_template)
    device = input_device(model)
    try:
        stats_device = device if statistics_device is None else torch.device(statistics_device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"statistics_device {statistics_device!r} is not a device ({error}); pass e.g. "
                         "'cpu' or 'cuda:0', or None for the model's input device") from error
    token_arrays = _tokenize_compact(model, prompts, chat=chat, truncation=truncation)
    stats = GroupStatistics.empty(len(chosen), int(model.cfg.d_mlp), device=stats_device)
    captured: list[Tensor | None] = [None] * len(chosen)
    readout: list[_Readout] = []

    def make_hook(slot: int, is_last: bool):
        def hook(activation: Tensor, hook: Any) -> Tensor:
            # Only a [batch, d_mlp] gather on the activation's own device: no dtype conversion, no
            # transfer, no host synchronisation inside the forward pass.
            captured[slot] = readout[0](activation)
            if is_last:
                raise _StopForward
            return activation
        return hook

    fwd_hooks = [(hook_name(layer, hook_template), make_hook(slot, slot == len(chosen) - 1))
                 for slot, layer in enumerate(chosen)]
    bar = tqdm(total=len(token_arrays), desc=description or "collect", disable=not progress, leave=False)
    try:
        with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
            for batch in _batches(token_arrays, max_batch_size, max_batch_tokens, pad_token_id(model.tokenizer),
                                  padding_side, device):
                readout[:] = [_Readout(token_position, batch.attention_mask)]
                captured[:] = [None] * len(chosen)
                try:
                    model(batch.input_ids, attention_mask=batch.attention_mask)
                except _StopForward:
                    pass
                fired = sum(value is not None for value in captured)
                if fired != len(chosen):
                    raise RuntimeError(f"only {fired} of {len(chosen)} hooks fired; the model's forward "
                                       "pass does not run through its MLP hook points")
                # One stack and one float64 fold per batch (not per layer).
                stats.update(torch.stack([value.to(stats_device) for value in captured], dim=1))
                bar.update(len(batch.indices))
    finally:
        bar.close()
        captured[:] = [None] * len(chosen)
    return stats.to("cpu")


def collect_statistics(model: Any, contrastive_set: ContrastiveSet, layers: Sequence[int] | None = None,
                       token_position: TokenPosition = "last", **kwargs: Any) -> ContrastStatistics:
    """High-pole and low-pole statistics of one trait (see ``collect_group_statistics`` for options).

    Example:
        >>> pairs = embedded_contrastive_set("openness", n_pairs=100)   # doctest: +SKIP
        >>> stats = collect_statistics(model, pairs)                    # doctest: +SKIP
    """
    from dpn_lens.models import model_fingerprint

    chosen = check_layers(model, layers, kwargs.get("hook_template", HOOK_NAME))
    high = collect_group_statistics(model, contrastive_set.high, chosen, token_position,
                                    description=f"{contrastive_set.trait} high", **kwargs)
    low = collect_group_statistics(model, contrastive_set.low, chosen, token_position,
                                   description=f"{contrastive_set.trait} low", **kwargs)
    return ContrastStatistics(
        trait=contrastive_set.trait, high=high, low=low, layers=chosen,
        hook_name=kwargs.get("hook_template", HOOK_NAME), token_position=token_position,
        fingerprint=model_fingerprint(model).to_dict(), source=contrastive_set.source,
    )
