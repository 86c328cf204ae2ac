"""Score answers after fixed contexts many times, running each context once (a key/value cache).

The preference metric scores the same answers after the same questions under many edits: every
gamma of every method's curve. The edit acts only at the answer positions (``preference``'s module
note), so the context pass is the same unedited pass every time; only the answer tokens change.
``CachedAnswerScorer`` runs each distinct context once into the model's own key/value cache, keeps
it with the log-probability of each answer's first token (which the context's last position
predicts, unedited, as in generation), and then scores every edit by running only the answer tokens
from a copy of that cache. It also computes logits at the answer positions only, which matters most
on Gemma 3, whose unembedding (a 262k-token vocabulary) costs more than the rest of the model.

Memory: a batch's cache holds one row per distinct context (a pair's two answers share one: items that
share a context are batched next to each other, so only a batch that ends between them holds the question
twice; sorted by their own lengths, a pair's answers of unequal lengths fell in neighbouring batches and
SmolLM2 ran 79 contexts for 60 persona pairs, where it now runs 62), and each answer pass gets a fresh
copy with one row per item (``_item_cache``), so the stored tensors are never modified. ``cache_bytes``
bounds what is kept: a batch whose cache would take the kept bytes past it keeps only its tokens and runs
its contexts again in every scoring pass, in the same batch with the same padding, so the numbers are the
same to the bit. ``answer_cache_bytes`` predicts the footprint from the lengths and the model's cache
geometry (the plan), ``CachedAnswerScorer.footprint`` measures it.

Layout of a batch: contexts left-padded (so every context ends at the last cache position and the
answers follow without a gap), answers right-padded. Position ids are taken from the attention mask,
so a padded row sees the positions it has alone. ``tests/test_answer_cache.py`` checks that the
scores equal the plain teacher-forced path (``logprobs.continuation_logprobs`` with the edit masked to
the answer positions) on a tiny model, with and without an edit; ``benchmarks/scoring.py`` measures
the speed-up side by side.

Example:
    >>> scorer = CachedAnswerScorer(model, contexts, answers)      # doctest: +SKIP
    >>> base = scorer.mean_logprobs()                              # doctest: +SKIP
    >>> steered = scorer.mean_logprobs(edit=intervention)          # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens.evaluation.logprobs import scoring_edit, token_logprobs
from dpn_lens.hooked import input_device, pad_token_id, pad_token_lists
from dpn_lens.collection.prefix import expand_cache, new_prefix_cache, prefix_cache_unsupported
from dpn_lens.steering import steer

__all__ = ["CachedAnswerScorer", "CacheFootprint", "answer_batches", "answer_cache_bytes"]


def _positions(mask: Int[Tensor, "rows pos"]) -> Int[Tensor, "rows pos"]:
    """Position ids from an attention mask: each row counts only its own tokens (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class CacheFootprint:
    """What the contexts' key/value caches of a ``CachedAnswerScorer`` hold, and what each pass recomputes.

    Attributes:
        batches: forward passes per scoring pass.
        recomputed: batches whose cache did not fit ``cache_bytes``: their contexts run again in every pass.
        kept_bytes: bytes of the kept caches' keys and values.
        all_bytes: bytes every batch's cache would hold (what ``cache_bytes=None`` keeps).

    Example:
        >>> CacheFootprint(batches=4, recomputed=1, kept_bytes=3 * 2 ** 20, all_bytes=4 * 2 ** 20).kept_gib
        0.0029296875
    """

    batches: int
    recomputed: int
    kept_bytes: int
    all_bytes: int

    @property
    def kept_gib(self) -> float:
        return self.kept_bytes / 2 ** 30


@dataclass
class _AnswerBatch:
    """Items of one forward pass: their distinct contexts (left-padded, with their cache unless it was
    dropped for the budget) and their answers (right-padded).

    ``rows[k]`` is the context row of item ``items[k]``; ``attention_mask`` spans context and answer per
    item (what the answer pass attends to); ``position_ids`` are the answer tokens' positions.
    """

    items: list[int]
    rows: Int[Tensor, "items"]
    context_ids: Int[Tensor, "contexts ctx"]
    context_mask: Int[Tensor, "contexts ctx"]
    cache: Any | None
    """One row per distinct context; None when it did not fit ``cache_bytes`` (recomputed every pass)."""
    cache_bytes: int
    """Bytes of the contexts' keys and values, kept or not: measured once they ran; before that, predicted
    from the first batch's bytes per token (0 with ``cache_bytes=0``, where no batch runs before a pass)."""
    attention_mask: Int[Tensor, "items ctx_plus_ans"]
    position_ids: Int[Tensor, "items ans"]
    answer_ids: Int[Tensor, "items ans"]
    first_logprobs: Float[Tensor, "items"] | None
    """Each item's first answer token's log-prob, from its context's last position (None until it ran)."""


def _select_rows(cache: Any, rows: Int[Tensor, "n"]) -> Any:
    """A copy of ``cache`` holding the given batch rows (in that order) of every layer's keys and values."""
    selected = expand_cache(cache, cache.layers[0].keys.shape[0])
    for layer in selected.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
            layer.values = layer.values.index_select(0, rows.to(layer.values.device))
    return selected


def _item_cache(cache: Any, rows: Int[Tensor, "items"]) -> Any:
    """A fresh cache with one row per item (``cache``'s row ``rows[k]`` for item ``k``), for one answer pass.

    The answer pass appends to the cache it is given (the layers ``torch.cat`` onto their tensors and keep
    the result), so it gets new layer objects every time and ``cache`` is never modified. Items with
    distinct contexts in order need no copy: the stored tensors are passed as views.
    """
    if torch.equal(rows, torch.arange(len(rows))):
        return expand_cache(cache, len(rows))
    return _select_rows(cache, rows)


def _cache_nbytes(cache: Any) -> int:
    """Bytes of every layer's keys and values."""
    return sum(int(tensor.nbytes) for layer in cache.layers for tensor in (getattr(layer, "keys", None),
               getattr(layer, "values", None)) if tensor is not None)


def answer_batches(context_lengths: Sequence[int], answer_lengths: Sequence[int], batch_tokens: int,
                   context_keys: Sequence[Any] | None = None) -> list[list[int]]:
    """The items of each batch ``CachedAnswerScorer`` runs, from the lengths alone: longest first (as the
    plain path batches), as many items as fit ``batch_tokens`` padded tokens, counting the batch's longest
    context plus its longest answer per row (``plan_control`` models the gradient pass's batches with it).

    Items with equal ``context_keys`` (one context, e.g. a ``PairScorer``'s pair) are kept next to each other,
    ordered by their group's longest item, so that they share one run of their context unless a batch ends
    between them (None: every item its own context).

    Example:
        >>> answer_batches([10, 10, 4, 4], [6, 6, 6, 6], batch_tokens=32)
        [[0, 1], [2, 3]]
        >>> answer_batches([10, 10, 10, 10], [6, 1, 5, 2], batch_tokens=32)            # by length alone
        [[0, 2], [3, 1]]
        >>> answer_batches([10, 10, 10, 10], [6, 1, 5, 2], 32, context_keys=[0, 0, 1, 1])   # pairs together
        [[0, 1], [2, 3]]
    """
    totals = [context + answer for context, answer in zip(context_lengths, answer_lengths)]
    keys = list(range(len(totals))) if context_keys is None else list(context_keys)
    if len(keys) != len(totals):
        raise ValueError(f"{len(keys)} context_keys for {len(totals)} items; pass one per item")
    group_longest: dict[Any, int] = {}
    group_first: dict[Any, int] = {}
    for index, (key, total) in enumerate(zip(keys, totals)):
        group_longest[key] = max(group_longest.get(key, 0), total)
        group_first.setdefault(key, index)
    # Groups longest first (ties in the order given), each group's items longest first: without keys, the
    # items sorted by their own length, as before keys existed.
    order = sorted(range(len(totals)), key=lambda i: (-group_longest[keys[i]], group_first[keys[i]], -totals[i]))
    chunks, start = [], 0
    while start < len(order):
        chunk = [order[start]]
        longest_context, longest_answer = context_lengths[chunk[0]], answer_lengths[chunk[0]]
        for index in order[start + 1:]:
            widest = max(longest_context, context_lengths[index]) + max(longest_answer, answer_lengths[index])
            if (len(chunk) + 1) * widest > batch_tokens:
                break
            chunk.append(index)
            longest_context = max(longest_context, context_lengths[index])
            longest_answer = max(longest_answer, answer_lengths[index])
        start += len(chunk)
        chunks.append(chunk)
    return chunks


def answer_cache_bytes(context_lengths: Sequence[int], answer_lengths: Sequence[int], batch_tokens: int,
                       n_layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: int,
                       context_keys: Sequence[Any] | None = None, cache_bytes: int | None = None) -> CacheFootprint:
    """What ``CachedAnswerScorer``'s caches will hold, from the lengths and the model's cache geometry.

    Each batch (``answer_batches``) stores one row per distinct context, left-padded to its longest
    context: ``2 (keys, values) * n_layers * rows * n_kv_heads * width * head_dim * dtype_bytes``. Each batch,
    in order, keeps its cache when it still fits ``cache_bytes`` (as the scorer decides). Every layer is assumed to
    keep the whole context (true of full attention, and of a sliding window longer than the contexts).

    Args:
        context_lengths, answer_lengths: tokens of each item's context (BOS and template included) and answer.
        batch_tokens: the scorer's ``batch_tokens``.
        n_layers, n_kv_heads, head_dim: the model's cache geometry (``num_key_value_heads``, ``head_dim``).
        dtype_bytes: bytes of one cached number (4 in float32, 2 in bfloat16).
        context_keys: per item, anything equal for items that share a context (a ``PairScorer``'s pair
            index: ``[i // 2 for i in range(2 * n_pairs)]``); None: every item has its own.
        cache_bytes: the scorer's budget (None: keep every batch).

    Example:
        >>> footprint = answer_cache_bytes([10, 10, 4, 4], [6, 6, 6, 6], 32, n_layers=2, n_kv_heads=1, head_dim=4,
        ...                                dtype_bytes=4, context_keys=[0, 0, 1, 1], cache_bytes=400)
        >>> # batch [0, 1]: one shared context of 10 tokens, 2*2*1*10*4*4 = 640 bytes, past the budget;
        >>> # batch [2, 3]: 4 tokens, 256 bytes, kept
        >>> footprint.all_bytes, footprint.kept_bytes, footprint.recomputed
        (896, 256, 1)
    """
    keys = list(range(len(context_lengths))) if context_keys is None else list(context_keys)
    if len(keys) != len(context_lengths):
        raise ValueError(f"{len(keys)} context_keys for {len(context_lengths)} items; pass one per item")
    per_token = 2 * int(n_layers) * int(n_kv_heads) * int(head_dim) * int(dtype_bytes)
    sizes = [len({keys[i] for i in chunk}) * max(context_lengths[i] for i in chunk) * per_token
             for chunk in answer_batches(context_lengths, answer_lengths, batch_tokens, keys)]
    kept = _kept(sizes, cache_bytes)
    return CacheFootprint(len(sizes), len(sizes) - sum(kept), sum(size for size, keep in zip(sizes, kept) if keep),
                          sum(sizes))


def _kept(sizes: Sequence[int], budget: int | None) -> list[bool]:
    """Which batches keep their cache: in order, each that still fits the budget (None: all)."""
    kept, total = [], 0
    for size in sizes:
        keep = _fits(total, size, budget)
        total += size if keep else 0
        kept.append(keep)
    return kept


def _fits(kept_bytes: int, size: int, budget: int | None) -> bool:
    """Whether a batch's cache of ``size`` bytes is kept beside ``kept_bytes`` under ``budget`` (None: always);
    the rule of both the scorer and ``answer_cache_bytes``."""
    return budget is None or kept_bytes + size <= budget


class CachedAnswerScorer:
    """Mean per-token log-probability of ``answers[i]`` after ``contexts[i]``, for any number of edits.

    Args:
        model: a hooked model whose bridge runs from a key/value cache (``prefix_cache_unsupported``
            says why not; ``CachedAnswerScorer.supported`` checks it).
        contexts: token ids of each item's context (chat template and BOS applied). Items with the
            same context in one batch share one run of it and one row of its cache.
        answers: token ids of each item's answer (no BOS).
        batch_tokens: padded tokens (context plus answer) per forward pass.
        differentiable: keep the context cache usable in an autograd pass over the answers (run the
            contexts under ``no_grad`` rather than ``inference_mode``), as ``effect.margin_gradients`` does.
        cache_bytes: at most this many bytes of context caches are kept (None: every batch's); a batch
            whose cache would not fit runs its contexts again in each scoring pass (``footprint``), and not
            here (its size is predicted from the first batch's bytes per token).

    The contexts whose cache is kept run once, here, without any edit; ``mean_logprobs(edit)`` then runs the answers.

    Example:
        >>> scorer = CachedAnswerScorer(model, [ctx, ctx], [high, low])   # doctest: +SKIP
        >>> scorer.mean_logprobs()                                        # doctest: +SKIP
        array([-1.92, -2.41])
        >>> scorer.footprint                                              # doctest: +SKIP
        CacheFootprint(batches=1, recomputed=0, kept_bytes=70656, all_bytes=70656)
    """

    def __init__(self, model: Any, contexts: Sequence[list[int]], answers: Sequence[list[int]],
                 batch_tokens: int = 4096, differentiable: bool = False, cache_bytes: int | None = None):
        reason = prefix_cache_unsupported(model)
        if reason is not None:
            raise ValueError(f"answers cannot be scored from a cached context on this model: {reason}; "
                             "score them with logprobs.continuation_logprobs instead")
        if len(contexts) != len(answers):
            raise ValueError(f"{len(contexts)} contexts but {len(answers)} answers; pass one of each per item")
        if any(not context for context in contexts) or any(not answer for answer in answers):
            raise ValueError("every item needs a non-empty context (at least BOS) and a non-empty answer")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be at least 1, got {batch_tokens}")
        if cache_bytes is not None and cache_bytes < 0:
            raise ValueError(f"cache_bytes must be at least 0 (0: keep no context cache), got {cache_bytes}")
        self.model = model
        self.differentiable = differentiable
        self.cache_bytes = cache_bytes
        self.lengths = np.array([len(answer) for answer in answers])
        self.batches = self._build(list(map(list, contexts)), list(map(list, answers)), batch_tokens)

    @staticmethod
    def supported(model: Any) -> bool:
        """Whether ``model`` can score from a cached context (else use the plain path)."""
        return prefix_cache_unsupported(model) is None

    @property
    def footprint(self) -> CacheFootprint:
        """The kept caches' bytes (measured) and the batches each scoring pass recomputes."""
        return CacheFootprint(len(self.batches), sum(batch.cache is None for batch in self.batches),
                              sum(batch.cache_bytes for batch in self.batches if batch.cache is not None),
                              sum(batch.cache_bytes for batch in self.batches))

    def _build(self, contexts: list[list[int]], answers: list[list[int]], batch_tokens: int) -> list[_AnswerBatch]:
        distinct: dict[tuple[int, ...], int] = {}
        keys = [distinct.setdefault(tuple(context), len(distinct)) for context in contexts]
        chunks = answer_batches(list(map(len, contexts)), list(map(len, answers)), batch_tokens, keys)
        batches, kept, token_bytes = [], 0, 0
        for chunk in chunks:
            batch = self._batch_of(chunk, contexts, answers, run=False)
            batches.append(batch)
            # A batch's cache is its contexts' padded tokens times the bytes per token of the first batch
            # that ran. One that will not be kept runs its contexts only in the passes that need them, not
            # here as well (with nothing kept, a single pass, the gradient pass's, runs each batch once).
            predicted = token_bytes * batch.context_ids.numel()
            if self.cache_bytes == 0 or (token_bytes and not _fits(kept, predicted, self.cache_bytes)):
                batch.cache_bytes = predicted
                continue
            batch.cache = self._run_batch_contexts(batch)
            token_bytes = token_bytes or batch.cache_bytes // batch.context_ids.numel()
            # Built one at a time, so at most one dropped cache is alive beside the kept ones.
            if not _fits(kept, batch.cache_bytes, self.cache_bytes):
                batch.cache = None
            kept += batch.cache_bytes if batch.cache is not None else 0
        return batches

    def _context_pass(self, ids: Int[Tensor, "contexts ctx"], mask: Int[Tensor, "contexts ctx"]
                      ) -> tuple[Float[Tensor, "contexts 1 vocab"], Any]:
        """The contexts, unedited, into a new cache: the last position's logits and the cache."""
        model, device = self.model, input_device(self.model)
        cache = new_prefix_cache(model)
        # Inference tensors cannot enter an autograd graph; no_grad ones can (as constants).
        with torch.no_grad() if self.differentiable else torch.inference_mode():
            logits = model(ids.to(device), attention_mask=mask.to(device), position_ids=_positions(mask).to(device),
                           past_key_values=cache, logits_to_keep=1)
        if cache.get_seq_length() != ids.shape[1]:
            raise RuntimeError(f"the model's cache holds {cache.get_seq_length()} tokens after a {ids.shape[1]}-token "
                               "context: its forward pass does not fill the cache it is given")
        return logits, cache

    def _batch_of(self, chunk: list[int], contexts: list[list[int]], answers: list[list[int]], run: bool = True
                  ) -> _AnswerBatch:
        """One batch's tokens; with ``run``, its contexts, each distinct one once, into a cache and the first
        answer tokens' log-probs (else the first pass that needs them runs them: ``answer_pass_cache``)."""
        distinct: dict[tuple[int, ...], int] = {}
        row_of_item = [distinct.setdefault(tuple(contexts[i]), len(distinct)) for i in chunk]
        pad = pad_token_id(self.model.tokenizer)
        ids, mask = pad_token_lists([list(context) for context in distinct], pad, "left")
        rows = torch.tensor(row_of_item)
        answer_ids, answer_mask = pad_token_lists([answers[i] for i in chunk], pad, "right")
        attention_mask = torch.cat([mask.index_select(0, rows), answer_mask], dim=1)
        batch = _AnswerBatch(chunk, rows, ids, mask, None, 0, attention_mask, _positions(attention_mask)[:, ids.shape[1]:],
                             answer_ids, None)
        if run:
            batch.cache = self._run_batch_contexts(batch)
        return batch

    def _run_batch_contexts(self, batch: _AnswerBatch) -> Any:
        """``batch``'s contexts into a new cache (returned); its bytes and, the first time, the first answer
        tokens' log-probs are recorded on the batch."""
        logits, cache = self._context_pass(batch.context_ids, batch.context_mask)
        batch.cache_bytes = _cache_nbytes(cache)
        if batch.first_logprobs is None:
            batch.first_logprobs = token_logprobs(logits[:, -1].index_select(0, batch.rows.to(logits.device)),
                                                  batch.answer_ids[:, 0])
        return cache

    def answer_pass_cache(self, batch: _AnswerBatch) -> Any:
        """A fresh cache with one row per item of ``batch`` for one answer pass: from the kept cache, or
        its contexts run again (unedited: call it outside any edit) when the budget dropped it.

        Example:
            >>> batch = scorer.batches[0]                                          # doctest: +SKIP
            >>> logits = model(batch.answer_ids, attention_mask=batch.attention_mask,   # doctest: +SKIP
            ...                position_ids=batch.position_ids, past_key_values=scorer.answer_pass_cache(batch))
        """
        cache = batch.cache if batch.cache is not None else self._run_batch_contexts(batch)
        return _item_cache(cache, batch.rows)

    def token_logprobs(self, edit: Any = None) -> list[Float[Tensor, "n_answer"]]:
        """Per item, log p of each answer token (float32), ``edit`` applied at the answer positions."""
        results: list[Tensor | None] = [None] * len(self.lengths)
        kept = [batch for batch in self.batches if batch.cache is not None]
        dropped = [batch for batch in self.batches if batch.cache is None]
        # Every position the answer pass runs is an answer position (right pads come after the answer
        # and no real token attends to them), so the edit acts everywhere in it; a dropped batch's
        # contexts run again first, outside the edit, as they ran here.
        with torch.inference_mode():
            with steer(self.model, scoring_edit(edit)):
                for batch in kept:
                    self._score_answers(batch, self.answer_pass_cache(batch), results)
            for batch in dropped:
                cache = self.answer_pass_cache(batch)
                with steer(self.model, scoring_edit(edit)):
                    self._score_answers(batch, cache, results)
        return results  # type: ignore[return-value]

    def _score_answers(self, batch: _AnswerBatch, cache: Any, results: list[Tensor | None]) -> None:
        """Run ``batch``'s answers from ``cache`` (the current edit applied) into ``results`` by item."""
        device = input_device(self.model)
        logits = self.model(batch.answer_ids.to(device), attention_mask=batch.attention_mask.to(device),
                            position_ids=batch.position_ids.to(device), past_key_values=cache)
        for row, index in enumerate(batch.items):
            n = int(self.lengths[index])
            # Position j's logits predict answer token j + 1; the first came from the context.
            rest = token_logprobs(logits[row, :n - 1], batch.answer_ids[row, 1:n])
            results[index] = torch.cat([batch.first_logprobs[row:row + 1], rest])

    def mean_logprobs(self, edit: Any = None) -> np.ndarray:
        """``[n_items]`` mean per-token log-probability of each answer (float64), ``edit`` at the answer positions."""
        return np.array([float(scores.mean()) for scores in self.token_logprobs(edit)], dtype=np.float64)
