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

Shared prefixes (``share_prefix``, the default): prompts are grouped by shared token prefix
(``dpn_lens.collection.prefix``); each shared prefix runs once into a key/value cache and only the remaining
tokens of each prompt run, batched over the group, from that cache. The last prompt token's
activation is the same as in a full pass (tested to 1e-5 relative in float32), so the statistics
are the same; the embedded prompts (template, instruction, persona description, question) share
most of their tokens, so far fewer tokens run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import warnings
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens.data.contrastive import ContrastiveSet
from dpn_lens.hooked import (HOOK_NAME, HookedModel, check_layers, hook_name, input_device, pad_token_id, read_hooks,
                             pad_token_lists, require_fired, StopForward, forward_until_stopped, tokenize_compact)
from dpn_lens.collection.prefix import (DEFAULT_MIN_SAVING, PrefixGroup, expand_cache, new_prefix_cache, plan_prefix_tree,
                             prefix_cache_unsupported)
from dpn_lens.collection.statistics import ContrastStatistics, GroupStatistics

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
        share_prefix: run each token prefix shared by several prompts once, keep its key/value
            cache, and run only the rest of each prompt from it (same statistics, fewer tokens run;
            see ``dpn_lens.collection.prefix``). Used for ``token_position="last"`` on models whose bridge
            forward takes a cache; otherwise every prompt runs in full (with a one-line warning when
            the model is the reason). ``"auto"`` (the default) shares prefixes when the model runs
            on the CPU and not on a GPU: on an H200 the shared path, which runs one small forward per
            prefix group, took 4-5x the plain path's time on both embedded models, while on 2 CPU
            cores it takes about 0.4x (docs/PERFORMANCE.md). ``True`` or ``False`` forces it.
        prefix_min_saving: tokens a group of prompts must save to get its own cached prefix (each
            prefix costs one extra forward call and splits the batches).

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
    share_prefix: bool | Literal["auto"] = "auto"
    prefix_min_saving: int = DEFAULT_MIN_SAVING

    def __post_init__(self) -> None:
        if self.token_position not in ("last", "mean"):
            raise ValueError(f"token_position must be 'last' or 'mean', got {self.token_position!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.share_prefix not in (True, False, "auto"):
            raise ValueError(f"share_prefix must be True, False or 'auto', got {self.share_prefix!r}")
        from dpn_lens.numbers import as_int

        for name in ("max_batch_size", "max_batch_tokens", "prefix_min_saving"):
            # numpy / torch integers are integers; bool, 2.5 and strings are refused, naming the field
            object.__setattr__(self, name, as_int(getattr(self, name), name, minimum=1))   # a frozen dataclass

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
             padding_side: str, device: Any, cached: int = 0) -> Iterator[_Batch]:
    """Batches by token budget, longest first, so padding (wasted compute) stays small.

    ``cached`` tokens of a shared prefix count towards each prompt's length in the budget: every
    prompt of the batch attends to them.
    """
    for chunk in batch_chunks([len(tokens) for tokens in token_lists], max_batch_size, max_batch_tokens, cached):
        ids, mask = pad_token_lists([token_lists[index] for index in chunk], pad_id, padding_side)
        yield _Batch(ids.to(device), mask.to(device), chunk)


def batch_chunks(lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int, cached: int = 0
                 ) -> Iterator[list[int]]:
    """The prompt indices of each batch collection forms, longest first (what ``dpn_lens.plan`` counts).

    Example:
        >>> list(batch_chunks([3, 9, 5], max_batch_size=2, max_batch_tokens=100))
        [[1, 2], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    start = 0
    while start < len(order):
        longest = lengths[order[start]] + cached
        size = max(1, min(max_batch_size, max_batch_tokens // max(longest, 1)))
        yield order[start:start + size]
        start += size


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
    readout: list[_Readout | None] = [None]
    pad_id = pad_token_id(model.tokenizer)

    def make_hook(slot: int, is_last: bool):
        def hook(activation: Tensor, hook: Any) -> Tensor:
            # Only a [batch, d_mlp] gather on the activation's own device: no dtype conversion, no
            # transfer, no host synchronisation inside the forward pass. A prefix pass (readout
            # None) reads nothing: it only fills the cache.
            if readout[0] is not None:
                captured[slot] = readout[0](activation)
            if is_last:
                raise StopForward
            return activation
        return hook

    def forward(input_ids: Tensor, attention_mask: Tensor, reader: _Readout | None, cache: Any = None) -> None:
        readout[0] = reader
        captured[:] = [None] * len(chosen)
        extra = {} if cache is None else {"past_key_values": cache}
        forward_until_stopped(model, input_ids, attention_mask=attention_mask, **extra)

    def fold(n_prompts: int) -> None:
        require_fired(sum(value is not None for value in captured), len(chosen))
        # One stack and one float64 fold per batch (not per layer).
        stats.update(torch.stack([value.to(stats_device) for value in captured], dim=1))
        bar.update(n_prompts)

    def run_plain(arrays: Sequence[np.ndarray]) -> None:
        for batch in _batches(arrays, config.max_batch_size, config.max_batch_tokens, pad_id,
                              config.padding_side, device):
            forward(batch.input_ids, batch.attention_mask, _Readout(config.token_position, batch.attention_mask))
            fold(len(batch.indices))

    fwd_hooks = [(hook_name(layer, config.hook_template), make_hook(slot, slot == len(chosen) - 1))
                 for slot, layer in enumerate(chosen)]
    bar = tqdm(total=len(token_arrays), desc=description or "collect", disable=not config.progress, leave=False)
    try:
        with torch.inference_mode(), read_hooks(model, fwd_hooks):
            if _shares_prefix(model, config):
                plan = plan_prefix_tree(token_arrays, config.prefix_min_saving)
                _run_prefix_plan(plan, token_arrays, model, config, device, pad_id, forward, fold, run_plain)
            else:
                run_plain(token_arrays)
    finally:
        bar.close()
        captured[:] = [None] * len(chosen)
        readout[0] = None
    return stats.to("cpu")


def _shares_prefix(model: HookedModel, config: CollectionConfig) -> bool:
    """Whether collection runs shared prefixes once (see ``CollectionConfig.share_prefix``)."""
    if not config.share_prefix or config.token_position != "last":
        # The mean over prompt tokens would need every prefix token's activation too: full prompts.
        return False
    if config.share_prefix == "auto" and input_device(model).type != "cpu":
        # Measured: on a GPU the many small per-group forwards cost more than the tokens they save.
        return False
    reason = prefix_cache_unsupported(model)
    if reason is not None:
        warnings.warn(f"shared-prefix collection is off for this model ({reason}); every prompt runs in full "
                      "(same statistics, slower). Pass CollectionConfig(share_prefix=False) to silence this.")
        return False
    return True


def _run_prefix_plan(plan: PrefixGroup, token_arrays: Sequence[np.ndarray], model: HookedModel,
                     config: CollectionConfig, device: torch.device, pad_id: int, forward: Any, fold: Any,
                     run_plain: Any) -> None:
    """Run every group of ``plan`` depth-first: its prefix segment once, then its members' suffixes.

    A group's batch-1 cache lives while the group and its sub-groups run and is dropped after
    (nothing else refers to it), so memory holds at most one prefix per level of the tree.
    """
    # (group, its parent's cache: None at the root or below a root that caches nothing)
    pending: list[tuple[PrefixGroup, Any]] = [(plan, None)]
    while pending:
        group, parent_cache = pending.pop()
        cache = None
        if group.end > 0:
            # Any prompt of the group carries the shared tokens [start:end].
            example = token_arrays[next(i for member in group.walk() for i in member.members)]
            cache = new_prefix_cache(model) if parent_cache is None else expand_cache(parent_cache, 1)
            segment = torch.as_tensor(example[group.start:group.end], dtype=torch.long, device=device)[None]
            forward(segment, torch.ones((1, group.end), dtype=torch.long, device=device), None, cache)
            if cache.get_seq_length() != group.end:
                raise RuntimeError(
                    f"the model's cache holds {cache.get_seq_length()} tokens after a {group.end}-token prefix: "
                    "its forward pass does not fill the cache it is given; pass "
                    "CollectionConfig(share_prefix=False)")
        if group.members and cache is None:
            run_plain([token_arrays[i] for i in group.members])
        elif group.members:
            suffixes = [token_arrays[i][group.end:] for i in group.members]
            for batch in _batches(suffixes, config.max_batch_size, config.max_batch_tokens, pad_id,
                                  config.padding_side, device, cached=group.end):
                size = batch.input_ids.shape[0]
                mask = torch.cat([torch.ones((size, group.end), dtype=batch.attention_mask.dtype, device=device),
                                  batch.attention_mask], dim=1)
                # The read-out looks at the suffix tokens only: the last prompt token is among them.
                forward(batch.input_ids, mask, _Readout("last", batch.attention_mask), expand_cache(cache, size))
                fold(size)
        pending.extend((child, cache) for child in reversed(group.children))


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
