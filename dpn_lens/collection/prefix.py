"""Shared-prefix planning and key/value-cache helpers for collection (``CollectionConfig.share_prefix``).

Contrastive prompts repeat long token prefixes: the chat template and the role-play instruction
are shared by every prompt, and each persona description by every prompt drawn with it. Collection
reads one activation per prompt (the last prompt token), so the prefix tokens only need to be
computed once per group: their keys and values are kept in the model's cache and only the
remaining tokens of each prompt run, batched over the group.

``plan_prefix_tree`` groups prompts by shared token prefix (a radix tree over token ids, built from
the prompts sorted lexicographically, where every tree node is a contiguous run); a group gets its
own cached prefix only when that saves at least ``min_saving`` tokens, since each prefix costs one
extra forward call and splits the batches. ``tokens_run`` counts the tokens the plan runs.

The cache helpers work on Hugging Face ``Cache`` objects (``DynamicCache`` and its sliding-window
layers, as used by Llama and Gemma 3), which ``TransformerBridge.forward(past_key_values=...)``
hands to the underlying model.

Example:
    >>> import numpy as np
    >>> prompts = [np.array(ids, dtype=np.int32) for ids in
    ...            ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [1, 2, 3, 9, 9, 8], [1, 2, 3, 9, 9, 7])]
    >>> plan = plan_prefix_tree(prompts, min_saving=2)
    >>> plan.end, [(group.start, group.end, group.members) for group in plan.children]
    (3, [(3, 5, [0, 1]), (3, 5, [3, 2])])
    >>> tokens_run(plan, prompts), sum(len(ids) for ids in prompts)
    (11, 24)
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = ["PrefixGroup", "plan_prefix_tree", "tokens_run", "prefix_cache_unsupported", "new_prefix_cache",
           "expand_cache"]

DEFAULT_MIN_SAVING = 64
"""Tokens a group must save to get its own cached prefix: one forward call of a 135M model on a CPU
costs about as much as a few dozen tokens, and a group splits the batches."""


@dataclass
class PrefixGroup:
    """Prompts that share ``tokens[:end]``; the parent group's cache already holds ``tokens[:start]``.

    ``members`` run their own tokens ``[end:]`` from this group's cache (each has at least one);
    ``children`` are sub-groups with a longer shared prefix. ``end == 0`` (only at the root) means
    no cache: the members run as plain prompts.
    """

    start: int
    end: int
    members: list[int] = field(default_factory=list)
    children: list["PrefixGroup"] = field(default_factory=list)

    def walk(self) -> Iterator["PrefixGroup"]:
        """This group and all groups below it, parents first."""
        yield self
        for child in self.children:
            yield from child.walk()


def _shared(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def plan_prefix_tree(token_arrays: Sequence[np.ndarray], min_saving: int = DEFAULT_MIN_SAVING) -> PrefixGroup:
    """Group prompts by shared token prefix; returns the root group (its ``end`` may be 0).

    Every prompt keeps at least its last token outside the cached prefix, since the statistics
    read that token's activation. A sub-group of ``k`` prompts whose shared prefix is ``e`` tokens
    longer than its parent's gets its own cache when ``(k - 1) * e >= min_saving``; otherwise it is
    split further by the next token, and what cannot be split joins the parent's members.
    """
    if min_saving < 1:
        raise ValueError(f"min_saving must be a positive number of tokens, got {min_saving!r}")
    if not token_arrays:
        return PrefixGroup(0, 0)
    # Big-endian uint32 bytes sort like the token id sequences, at 4 bytes a token.
    order = sorted(range(len(token_arrays)), key=lambda i: np.asarray(token_arrays[i], dtype=">u4").tobytes())
    arrays = [np.asarray(token_arrays[i]) for i in order]
    lengths = np.array([len(ids) for ids in arrays])

    def shared(lo: int, hi: int) -> int:
        """Shared prefix of the sorted run [lo, hi): that of its first and last, capped so each keeps a token."""
        return min(_shared(arrays[lo], arrays[hi - 1]), int(lengths[lo:hi].min()) - 1)

    def runs(lo: int, hi: int, position: int) -> Iterator[tuple[int, int]]:
        """Sub-runs of [lo, hi) with the same token at ``position`` (contiguous, as the run is sorted)."""
        start = lo
        for index in range(lo + 1, hi + 1):
            if index == hi or arrays[index][position] != arrays[start][position]:
                yield start, index
                start = index

    root = PrefixGroup(0, max(shared(0, len(arrays)), 0))
    # Work stack of (run, group it belongs to, the position its tokens are known to agree up to).
    # Pushed in reverse, so runs are handled in sorted order (a deterministic plan).
    stack: list[tuple[int, int, PrefixGroup, int]] = [(lo, hi, root, root.end)
                                                      for lo, hi in reversed(list(runs(0, len(arrays), root.end)))]
    while stack:
        lo, hi, group, agreed = stack.pop()
        if hi - lo == 1:
            group.members.append(order[lo])
            continue
        end = shared(lo, hi)
        if end <= agreed:  # cannot be split further (a prompt ends here, or duplicates)
            group.members.extend(order[lo:hi])
        elif (hi - lo - 1) * (end - group.end) >= min_saving:
            child = PrefixGroup(group.end, end)
            group.children.append(child)
            stack.extend((a, b, child, end) for a, b in reversed(list(runs(lo, hi, end))))
        else:
            stack.extend((a, b, group, end) for a, b in reversed(list(runs(lo, hi, end))))
    return root


def tokens_run(plan: PrefixGroup, token_arrays: Sequence[np.ndarray]) -> int:
    """Tokens the plan runs through the model: each cached prefix segment once, plus every suffix."""
    return sum(group.end - group.start + sum(len(token_arrays[i]) - group.end for i in group.members)
               for group in plan.walk())


def prefix_cache_unsupported(model: Any) -> str | None:
    """Why ``model`` cannot run a prompt from a cached prefix, or None when it can.

    It can when it is a ``TransformerBridge`` over a decoder-only Hugging Face model whose forward
    takes ``past_key_values`` and whose cache keeps per-layer ``keys``/``values`` tensors.
    """
    hf_model = getattr(model, "original_model", None)
    config = getattr(hf_model, "config", None)
    if hf_model is None or config is None:
        return f"{type(model).__name__} is not a TransformerBridge over a Hugging Face model"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "the bridge's forward signature cannot be read"
    if "past_key_values" not in parameters:
        return "the bridge's forward takes no past_key_values"
    try:
        cache = new_prefix_cache(model)
    except Exception as error:  # any failure to build the model's own cache means: no sharing
        return f"its Hugging Face cache cannot be built ({error})"
    if not hasattr(cache, "layers"):
        return f"its cache {type(cache).__name__} has no per-layer tensors"
    return None


def new_prefix_cache(model: Any) -> Any:
    """An empty cache of the kind the model's ``generate`` uses (``DynamicCache`` from its config).

    The caller owns it, so it keeps the prefix even when collection stops the forward pass early.
    """
    from transformers import DynamicCache

    return DynamicCache(config=model.original_model.config)


def expand_cache(cache: Any, batch: int) -> Any:
    """A copy of a batch-1 ``cache`` for ``batch`` prompts; the prefix tensors are expanded views.

    The cache layers concatenate new keys/values onto these views (``torch.cat`` materialises
    them), so neither the prefix tensors nor ``cache`` are modified and one prefix serves every batch.
    """
    copied = copy.copy(cache)
    copied.layers = []
    for layer in cache.layers:
        layer = copy.copy(layer)
        if getattr(layer, "is_initialized", False) and getattr(layer, "keys", None) is not None:
            layer.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
            layer.values = layer.values.expand(batch, *layer.values.shape[1:])
        copied.layers.append(layer)
    return copied
