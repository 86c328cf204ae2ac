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

from dataclasses import dataclass, replace
from typing import Any, Iterator, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens.data.contrastive import ContrastiveSet
from dpn_lens.hooked import (HOOK_NAME, HookedModel, check_layers, hook_name, input_device, pad_token_id,
                             pad_token_lists, tokenize_compact)
from dpn_lens.statistics import ContrastStatistics, GroupStatistics

__all__ = ["CollectionConfig", "collect_statistics", "collect_group_statistics"]

TokenPosition = Literal["last", "mean"]


@dataclass(frozen=True)
class CollectionConfig:
    """How activations are read and batched; the defaults are the paper's choices.

    Attributes:
        layers: model layers to read (default: all); rows of the statistics follow this order.
        token_position: ``"last"`` (last non-pad prompt token, the paper's choice) or ``"mean"``.
        max_batch_size, max_batch_tokens: batch limits; batches are formed longest-first.
        padding_side: where pads go; results do not depend on it (tested).
        chat: force (True) or skip (False) the chat template; default: the model's own kind.
        truncation: ``"error"`` for prompts longer than the context, or ``"left"`` to keep their end.
        hook_template: the hook point of the neuron activation, ``"blocks.{layer}.mlp.hook_post"``.
        progress: show a progress bar.
        statistics_device: where the running float64 statistics are updated (default: the model's
            input device, so GPU activations never go through the host). Results are always returned
            on the CPU.

    Example:
        >>> CollectionConfig(layers=[0, 1], max_batch_size=4).token_position
        'last'
    """

    layers: Sequence[int] | None = None
    token_position: TokenPosition = "last"
    max_batch_size: int = 16
    max_batch_tokens: int = 4096
    padding_side: Literal["left", "right"] = "right"
    chat: bool | None = None
    truncation: Literal["error", "left"] = "error"
    hook_template: str = HOOK_NAME
    progress: bool = True
    statistics_device: str | torch.device | None = None

    def __post_init__(self) -> None:
        if self.token_position not in ("last", "mean"):
            raise ValueError(f"token_position must be 'last' or 'mean', got {self.token_position!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        for name in ("max_batch_size", "max_batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def resolved_statistics_device(self, model: HookedModel) -> torch.device:
        """``statistics_device`` as a device; ``None`` means the model's input device."""
        if self.statistics_device is None:
            return input_device(model)
        try:
            return torch.device(self.statistics_device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"statistics_device {self.statistics_device!r} is not a device ({error}); pass e.g. "
                             "'cpu' or 'cuda:0', or None for the model's input device") from error


@dataclass
class _Batch:
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    indices: list[int]


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


def collect_group_statistics(model: HookedModel, prompts: Sequence[str], config: CollectionConfig | None = None,
                             description: str = "") -> GroupStatistics:
    """Running statistics of the MLP activations of ``prompts`` at the configured layers.

    Args:
        model: a ``TransformerBridge`` (see ``dpn_lens.load_model``); any dtype (a bf16 model gives
            bf16 activations, folded into float64 statistics), on one device or split over several.
        prompts: user messages; rendered through the chat template of chat models.
        config: layers, token position, batching and the rest (``CollectionConfig``; default: its defaults).
        description: the progress bar's label.

    Returns:
        ``GroupStatistics`` with ``[len(layers), d_mlp]`` tensors (float64, on the CPU).

    Example:
        >>> config = CollectionConfig(layers=[0, 1])
        >>> stats = collect_group_statistics(model, ["You are outgoing. Hi!"], config)  # doctest: +SKIP
        >>> stats.count, stats.shape                                                  # doctest: +SKIP
        (1, (2, 1536))
    """
    from tqdm.auto import tqdm

    config = CollectionConfig() if config is None else config
    chosen = check_layers(model, config.layers, config.hook_template)
    device = input_device(model)
    stats_device = config.resolved_statistics_device(model)
    token_arrays = tokenize_compact(model, prompts, chat=config.chat, truncation=config.truncation)
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

    fwd_hooks = [(hook_name(layer, config.hook_template), make_hook(slot, slot == len(chosen) - 1))
                 for slot, layer in enumerate(chosen)]
    bar = tqdm(total=len(token_arrays), desc=description or "collect", disable=not config.progress, leave=False)
    try:
        with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
            for batch in _batches(token_arrays, config.max_batch_size, config.max_batch_tokens,
                                  pad_token_id(model.tokenizer), config.padding_side, device):
                readout[:] = [_Readout(config.token_position, batch.attention_mask)]
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


def collect_statistics(model: HookedModel, contrastive_set: ContrastiveSet, config: CollectionConfig | None = None
                       ) -> ContrastStatistics:
    """High-pole and low-pole statistics of one trait (see ``CollectionConfig`` for the options).

    Example:
        >>> pairs = embedded_contrastive_set("openness", n_pairs=100)                   # doctest: +SKIP
        >>> stats = collect_statistics(model, pairs, CollectionConfig(max_batch_size=8))  # doctest: +SKIP
    """
    from dpn_lens.models import model_fingerprint

    config = CollectionConfig() if config is None else config
    chosen = check_layers(model, config.layers, config.hook_template)
    config = replace(config, layers=chosen)
    high = collect_group_statistics(model, contrastive_set.high, config, description=f"{contrastive_set.trait} high")
    low = collect_group_statistics(model, contrastive_set.low, config, description=f"{contrastive_set.trait} low")
    return ContrastStatistics(
        trait=contrastive_set.trait, high=high, low=low, layers=chosen, hook_name=config.hook_template,
        token_position=config.token_position, fingerprint=model_fingerprint(model).to_dict(),
        source=contrastive_set.source,
    )
