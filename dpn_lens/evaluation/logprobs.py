"""Log-probabilities of continuations and next tokens, batched, with or without an edit applied.

Every metric of ``dpn_lens.evaluation`` is a function of these two primitives: the log-probability
of given continuation tokens after a context, and the next-token distribution after a prompt. Edits
are applied with ``dpn_lens.steer``, after ``scoring_edit`` (which says why every edit acts at all
positions when log-probabilities are scored).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens.data.prompts import render_for_model
from dpn_lens.hooked import HookedModel, input_device, pad_token_id, pad_token_lists
from dpn_lens.steering import Edit

__all__ = ["scoring_edit", "render", "continuation_logprobs", "next_token_logprobs", "ContinuationScore",
           "token_logprobs", "log_softmax_rows", "kl_from_reference", "batched_logits", "LOG_SOFTMAX_ROWS"]

LOG_SOFTMAX_ROWS = 16
"""Rows per block when a log-softmax is taken in float32: 16 rows of a 262k-token vocabulary (Gemma 3)
are 16 MB, which stays in the CPU's cache. One float32 copy of a whole batch's logits went through
memory several times and took most of the time of scoring an answer on Gemma 3
(``benchmarks/bench_perf.py --sections scoring``)."""


def _float32_log_softmax_blocks(logits: Float[Tensor, "n vocab"], rows: int
                                ) -> Iterator[tuple[slice, Float[Tensor, "rows vocab"]]]:
    """``(rows of logits, their float32 log-softmax)``, ``rows`` rows at a time, on the logits' device.

    Each block is converted inside ``log_softmax`` (``dtype=float32``), which gives the same values as
    converting the whole tensor first, without a float32 copy of all of it. Callers move to the CPU
    only what they keep (on a GPU, one value per row for ``token_logprobs``, not the whole block).
    """
    for start in range(0, logits.shape[0], rows):
        block = slice(start, start + rows)
        yield block, torch.log_softmax(logits[block], dim=-1, dtype=torch.float32)


def token_logprobs(logits: Float[Tensor, "n vocab"], targets: Int[Tensor, "n"], rows: int = LOG_SOFTMAX_ROWS
                   ) -> Float[Tensor, "n"]:
    """``log_softmax(logits)[i, targets[i]]`` in float32, one block of ``rows`` rows at a time.

    The logits may be bfloat16 (see ``_float32_log_softmax_blocks``).

    Example:
        >>> logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
        >>> [round(v, 4) for v in token_logprobs(logits, torch.tensor([0, 0])).tolist()]   # log 1/2, log e^2/(e^2+1)
        [-0.6931, -0.1269]
    """
    out = torch.empty(len(targets), dtype=torch.float32)
    for block, logprobs in _float32_log_softmax_blocks(logits, rows):
        out[block] = logprobs.gather(1, targets[block, None].to(logprobs.device)).squeeze(1).cpu()
    return out


def log_softmax_rows(logits: Float[Tensor, "n vocab"], rows: int = LOG_SOFTMAX_ROWS) -> Float[Tensor, "n vocab"]:
    """``log_softmax(logits, -1)`` as float32 on the CPU, computed ``rows`` rows at a time (see ``token_logprobs``).

    Example:
        >>> log_softmax_rows(torch.tensor([[0.0, 0.0]])).exp().tolist()
        [[0.5, 0.5]]
    """
    out = torch.empty(logits.shape, dtype=torch.float32)
    for block, logprobs in _float32_log_softmax_blocks(logits, rows):
        out[block] = logprobs.cpu()
    return out


def render(model: HookedModel, user_text: str, chat: bool | None = None) -> str:
    """The prompt as the model sees it: chat template for chat models (see ``render_for_model``)."""
    return render_for_model(model, user_text, chat=chat)


def scoring_edit(edit: Edit | None) -> Edit | None:
    """``edit`` as log-probability metrics apply it: at every position (``None`` stays ``None``).

    Why: the DPN-LE edit acts at decode steps by default (forward passes over one new token). A
    log-probability metric reads the distribution at the last *prompt* token (or at teacher-forced
    continuation tokens), which a decode-only edit never touches; scoring with it would measure the
    unsteered model. This is the one place that rule lives; evaluation code applies edits as
    ``with steer(model, scoring_edit(edit)):``.

    Example:
        >>> with steer(model, scoring_edit(intervention)):       # doctest: +SKIP
        ...     logprobs = next_token_logprobs(model, [ids])
    """
    return None if edit is None else edit.at_positions("all")


def kl_from_reference(reference: Float[Tensor, "n vocab"], logits: Float[Tensor, "n vocab"],
                      rows: int = LOG_SOFTMAX_ROWS) -> float:
    """``sum_i KL(reference_i || softmax(logits_i))`` in nats (float64 sum), ``rows`` rows at a time.

    ``reference`` holds float32 log-probabilities; ``logits`` may be bfloat16 (see ``token_logprobs``).

    Example:
        >>> reference = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> round(kl_from_reference(reference, torch.tensor([[0.0, 0.0]])), 6)
        0.0
    """
    total = 0.0
    for block, steered in _float32_log_softmax_blocks(logits, rows):
        steered, base = steered.cpu(), reference[block]
        total += float((base.exp() * (base - steered)).sum(-1).double().sum())
    return total


def batched_logits(model: HookedModel, token_lists: Sequence[list[int]], batch_tokens: int,
                   on_batch: Callable[[list[int]], None] | None = None,
                   spans: Sequence[tuple[int, int]] | None = None
                   ) -> Iterator[tuple[int, Float[Tensor, "pos vocab"]]]:
    """``(index, logits of that sequence)`` for every sequence, batched longest-first, right-padded.

    Right padding keeps every real token at the position it has unbatched, so results do not depend
    on the batch (pads come after the tokens and causal attention never looks forward). ``on_batch``
    is called with each batch's indices before its forward pass (e.g. to set the positions a hook edits).
    ``spans[i] = (start, stop)`` keeps only those positions of sequence ``i`` (default: all of them),
    in the model's dtype; callers convert them to float32 block by block (``token_logprobs``).
    """
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    device = input_device(model)
    start = 0
    while start < len(order):
        longest = len(token_lists[order[start]])
        chunk = order[start:start + max(1, batch_tokens // max(longest, 1))]
        start += len(chunk)
        ids, mask = pad_token_lists([token_lists[index] for index in chunk], pad_token_id(model.tokenizer), "right")
        if on_batch is not None:
            on_batch(chunk)
        with torch.inference_mode():
            logits = model(ids.to(device), attention_mask=mask.to(device))
        for row, index in enumerate(chunk):
            first, stop = (0, len(token_lists[index])) if spans is None else spans[index]
            yield index, logits[row, first:stop]


@dataclasses.dataclass
class ContinuationScore:
    """Log-probabilities of one continuation's tokens (teacher-forced after its context).

    Attributes:
        token_logprobs: ``[n_cont]`` log P(token_t | context, tokens_<t).
        greedy: ``[n_cont]`` whether each token is the argmax of its distribution.
        distributions: ``[n_cont, vocab]`` full log-softmax (only when asked for).
    """

    token_logprobs: Float[Tensor, "n_cont"]
    greedy: Tensor
    distributions: Float[Tensor, "n_cont vocab"] | None = None

    @property
    def total(self) -> float:
        return float(self.token_logprobs.sum())


def continuation_logprobs(model: HookedModel, contexts: Sequence[list[int]], continuations: Sequence[list[int]],
                          full: bool = False, batch_tokens: int = 2048,
                          on_batch: Callable[[list[int]], None] | None = None) -> list[ContinuationScore]:
    """Score ``continuations[i]`` after ``contexts[i]`` (token ids) in one batched pass.

    ``on_batch`` (optional) is called with the item indices of each batch before its forward pass.

    Example:
        >>> ctx, cont = encode(model, "The sky is"), encode(model, " blue", add_bos=False)   # doctest: +SKIP
        >>> continuation_logprobs(model, [ctx], [cont])[0].total                            # doctest: +SKIP
        -2.31
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations; pass one of each per item")
    for index, (context, continuation) in enumerate(zip(contexts, continuations)):
        if not context:
            raise ValueError(f"item #{index} has an empty context; it needs at least a BOS token to condition on")
        if not continuation:
            raise ValueError(f"item #{index} has an empty continuation; there is nothing to score")
    sequences = [list(c) + list(t) for c, t in zip(contexts, continuations)]
    results: list[ContinuationScore | None] = [None] * len(sequences)
    # The logits at position p predict token p+1, so the continuation is read one step earlier.
    spans = [(len(c) - 1, len(c) + len(t) - 1) for c, t in zip(contexts, continuations)]
    for index, logits in batched_logits(model, sequences, batch_tokens, on_batch, spans):
        target = torch.tensor(continuations[index])
        # argmax of the logits is argmax of their log-softmax (a per-row shift), without the conversion.
        results[index] = ContinuationScore(token_logprobs(logits, target), logits.argmax(-1).cpu() == target,
                                           log_softmax_rows(logits) if full else None)
    return results  # type: ignore[return-value]


def next_token_logprobs(model: HookedModel, prompts: Sequence[list[int]], batch_tokens: int = 2048
                        ) -> Float[Tensor, "n vocab"]:
    """Log-softmax of the next token after each prompt (token ids), ``[n_prompts, vocab]``."""
    if not prompts:
        raise ValueError("no prompts given")
    rows: list[Tensor | None] = [None] * len(prompts)
    for index, logits in batched_logits(model, prompts, batch_tokens, spans=[(len(p) - 1, len(p)) for p in prompts]):
        rows[index] = log_softmax_rows(logits)[0]
    return torch.stack(rows)  # type: ignore[arg-type]
