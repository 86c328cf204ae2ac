"""Score answers after fixed contexts many times, running each context once (a key/value cache).

The preference metric scores the same answers after the same questions under many edits: every
gamma of every method's curve. The edit acts only at the answer positions (``preference``'s module
note), so the context pass is the same unedited pass every time; only the answer tokens change.
``CachedAnswerScorer`` runs each distinct context once into the model's own key/value cache, keeps
it with the log-probability of each answer's first token (which the context's last position
predicts, unedited, as in generation), and then scores every edit by running only the answer tokens
from a copy of that cache. It also computes logits at the answer positions only, which matters most
on Gemma 3, whose unembedding (a 262k-token vocabulary) costs more than the rest of the model.

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

__all__ = ["CachedAnswerScorer", "answer_batches"]


def _positions(mask: Int[Tensor, "rows pos"]) -> Int[Tensor, "rows pos"]:
    """Position ids from an attention mask: each row counts only its own tokens (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@dataclass
class _AnswerBatch:
    """Items of one forward pass: their contexts' cache (left-padded) and their answers (right-padded).

    ``attention_mask`` spans context and answer (what the answer pass attends to); ``position_ids`` are
    the answer tokens' positions.
    """

    items: list[int]
    cache: Any
    attention_mask: Int[Tensor, "rows ctx_plus_ans"]
    position_ids: Int[Tensor, "rows ans"]
    answer_ids: Int[Tensor, "rows ans"]
    first_logprobs: Float[Tensor, "rows"]


def _select_rows(cache: Any, rows: Int[Tensor, "n"]) -> Any:
    """A copy of ``cache`` holding the given batch rows (in that order) of every layer's keys and values."""
    selected = expand_cache(cache, cache.layers[0].keys.shape[0])
    for layer in selected.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
            layer.values = layer.values.index_select(0, rows.to(layer.values.device))
    return selected


def answer_batches(context_lengths: Sequence[int], answer_lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """The items of each batch ``CachedAnswerScorer`` runs, from the lengths alone: longest first (as the
    plain path batches), as many items as fit ``batch_tokens`` padded tokens, counting the batch's longest
    context plus its longest answer per row (``plan_control`` models the gradient pass's batches with it).

    Example:
        >>> answer_batches([10, 10, 4, 4], [6, 6, 6, 6], batch_tokens=32)
        [[0, 1], [2, 3]]
    """
    order = sorted(range(len(context_lengths)), key=lambda i: -(context_lengths[i] + answer_lengths[i]))
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


class CachedAnswerScorer:
    """Mean per-token log-probability of ``answers[i]`` after ``contexts[i]``, for any number of edits.

    Args:
        model: a hooked model whose bridge runs from a key/value cache (``prefix_cache_unsupported``
            says why not; ``CachedAnswerScorer.supported`` checks it).
        contexts: token ids of each item's context (chat template and BOS applied). Items with the
            same context share one run of it.
        answers: token ids of each item's answer (no BOS).
        batch_tokens: padded tokens (context plus answer) per forward pass.
        differentiable: keep the context cache usable in an autograd pass over the answers (run the
            contexts under ``no_grad`` rather than ``inference_mode``), as ``effect.margin_gradients`` does.

    The contexts run once, here, without any edit; ``mean_logprobs(edit)`` then runs the answers.

    Example:
        >>> scorer = CachedAnswerScorer(model, [ctx, ctx], [high, low])   # doctest: +SKIP
        >>> scorer.mean_logprobs()                                        # doctest: +SKIP
        array([-1.92, -2.41])
    """

    def __init__(self, model: Any, contexts: Sequence[list[int]], answers: Sequence[list[int]],
                 batch_tokens: int = 4096, differentiable: bool = False):
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
        self.model = model
        self.differentiable = differentiable
        self.lengths = np.array([len(answer) for answer in answers])
        self.batches = self._build(list(map(list, contexts)), list(map(list, answers)), batch_tokens)

    @staticmethod
    def supported(model: Any) -> bool:
        """Whether ``model`` can score from a cached context (else use the plain path)."""
        return prefix_cache_unsupported(model) is None

    def _build(self, contexts: list[list[int]], answers: list[list[int]], batch_tokens: int) -> list[_AnswerBatch]:
        chunks = answer_batches(list(map(len, contexts)), list(map(len, answers)), batch_tokens)
        return [self._run_contexts(chunk, contexts, answers) for chunk in chunks]

    def _run_contexts(self, chunk: list[int], contexts: list[list[int]], answers: list[list[int]]) -> _AnswerBatch:
        """One batch's contexts, each distinct one once, into a cache; the first answer tokens' log-probs."""
        model, device = self.model, input_device(self.model)
        distinct: dict[tuple[int, ...], int] = {}
        row_of_item = [distinct.setdefault(tuple(contexts[i]), len(distinct)) for i in chunk]
        pad = pad_token_id(model.tokenizer)
        ids, mask = pad_token_lists([list(context) for context in distinct], pad, "left")
        cache = new_prefix_cache(model)
        # Inference tensors cannot enter an autograd graph; no_grad ones can (as constants).
        with torch.no_grad() if self.differentiable else torch.inference_mode():
            logits = model(ids.to(device), attention_mask=mask.to(device), position_ids=_positions(mask).to(device),
                           past_key_values=cache, logits_to_keep=1)
        if cache.get_seq_length() != ids.shape[1]:
            raise RuntimeError(f"the model's cache holds {cache.get_seq_length()} tokens after a {ids.shape[1]}-token "
                               "context: its forward pass does not fill the cache it is given")
        rows = torch.tensor(row_of_item)
        answer_ids, answer_mask = pad_token_lists([answers[i] for i in chunk], pad, "right")
        first = token_logprobs(logits[:, -1].index_select(0, rows.to(logits.device)), answer_ids[:, 0])
        attention_mask = torch.cat([mask.index_select(0, rows), answer_mask], dim=1)
        return _AnswerBatch(chunk, _select_rows(cache, rows), attention_mask,
                            _positions(attention_mask)[:, ids.shape[1]:], answer_ids, first)

    def token_logprobs(self, edit: Any = None) -> list[Float[Tensor, "n_answer"]]:
        """Per item, log p of each answer token (float32), ``edit`` applied at the answer positions."""
        model, device = self.model, input_device(self.model)
        results: list[Tensor | None] = [None] * len(self.lengths)
        # Every position the answer pass runs is an answer position (right pads come after the answer
        # and no real token attends to them), so the edit acts everywhere in it.
        with steer(model, scoring_edit(edit)), torch.inference_mode():
            for batch in self.batches:
                logits = model(batch.answer_ids.to(device), attention_mask=batch.attention_mask.to(device),
                               position_ids=batch.position_ids.to(device),
                               past_key_values=expand_cache(batch.cache, len(batch.items)))
                for row, index in enumerate(batch.items):
                    n = int(self.lengths[index])
                    # Position j's logits predict answer token j + 1; the first came from the context.
                    rest = token_logprobs(logits[row, :n - 1], batch.answer_ids[row, 1:n])
                    results[index] = torch.cat([batch.first_logprobs[row:row + 1], rest])
        return results  # type: ignore[return-value]

    def mean_logprobs(self, edit: Any = None) -> np.ndarray:
        """``[n_items]`` mean per-token log-probability of each answer (float64), ``edit`` at the answer positions."""
        return np.array([float(scores.mean()) for scores in self.token_logprobs(edit)], dtype=np.float64)
