"""Greedy KV-cached generation in left-padded batches, with the answers of one prompt at a time.

Every greedy generation through the bridge goes through ``greedy_generate``: the persona answers of
``evaluation.preference``, the answer statistics, the judge's answers (``evaluation.judge``) and the
demo. Prompts are sorted longest first and cut into batches; each batch is left-padded, so every
prompt's last token sits at the final position and one decode step serves the whole batch, and the
attention mask keeps the pads out of attention and out of the position ids.

Two details keep every row's answer the one it gets alone (``tests/test_generation.py``):

* The repetition penalty of the bridge's ``generate`` penalises every id in a row, pads included.
  A pad id the prompt lacks (or one equal to EOS, as on SmolLM2, where ``<|im_end|>`` pads) would be
  penalised in a padded row and not in the same prompt alone. So a row is padded with its own first
  token: its set of ids, which is all the penalty reads, is the prompt's own. The pads are masked,
  so which id they hold changes nothing else.
* Generation stops, and answers are cut, at one set of ids (``eos_ids``), passed to ``generate``.

Rows of one batch are independent (the mask), so a row that finished early does not change the
others; its remaining steps are filled with EOS and cut away. Batched matrix products may round
differently from single-row ones, so a near-tie between two tokens could in principle resolve
differently; the tests find identical answers on the tiny model.

An active ``steer`` context applies to every batch. A decode-only edit still acts only on decode
steps: the prompt pass of a batch has as many positions as its longest prompt, every decode step one.

What generates is the ``engine`` (``ENGINES``). By default Hugging Face's own ``generate`` runs through the
modules the bridge wraps, with the hooks moved onto them (``dpn_lens.raw_view``): without the bridge's per-call
Python, and with only the last position's logits in the prompt pass. The bridge's own loop
(``engine="bridge"``) gives the same tokens, slower.

Example:
    >>> prompts = [encode(model, render_for_model(model, q)) for q in questions]   # doctest: +SKIP
    >>> answers = greedy_generate(model, prompts, max_new_tokens=40)               # doctest: +SKIP
    >>> model.tokenizer.decode(answers[0], skip_special_tokens=True)               # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens.hooked import input_device

__all__ = ["eos_ids", "left_pad_with_own_token", "greedy_generate", "hf_greedy_batch", "GENERATION_BATCH", "ENGINES",
           "generation_engine", "default_engine", "same_answers_as_bridge", "model_dtype", "PenaltyInLogitsDtype"]

GENERATION_BATCH = 16
"""Prompts a run generates together where no setting names a batch: the selection pairs
(``effect.pairs.selection_pairs``, ``effect_scores``' ``selection_batch``) and the generation check
(``evaluation.generation_check.generated_answers``). ``dpn-lens plan`` counts their batches from here."""


def eos_ids(model: Any) -> list[int]:
    """The ids generation stops at: the tokenizer's EOS, the bridge's and the wrapped model's (Gemma's
    ``<end_of_turn>`` too), sorted.

    Example:
        >>> eos_ids(model)   # doctest: +SKIP
        [2]
    """
    ids: set[int] = set()
    config = getattr(getattr(model, "original_model", None), "generation_config", None)
    for eos in (getattr(model.tokenizer, "eos_token_id", None), getattr(getattr(model, "cfg", None), "eos_token_id", None),
                getattr(config, "eos_token_id", None)):
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(token) for token in eos)
    return sorted(ids)


def left_pad_with_own_token(token_lists: Sequence[Sequence[int]]
                            ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """``(input_ids, attention_mask)``, left-padded, each row padded with its own first token.

    A padded row then holds no id its prompt lacks, so a repetition penalty (which reads the ids of the
    whole row, pads included) penalises exactly what it penalises for the prompt alone.

    Example:
        >>> ids, mask = left_pad_with_own_token([[5, 6, 7], [8, 9]])
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [8, 8, 9]], [[1, 1, 1], [0, 1, 1]])
    """
    if any(len(tokens) == 0 for tokens in token_lists):
        raise ValueError("a prompt has no tokens; there is nothing to generate from")
    longest = max(len(tokens) for tokens in token_lists)
    ids = torch.empty((len(token_lists), longest), dtype=torch.long)
    mask = torch.zeros((len(token_lists), longest), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        start = longest - len(tokens)
        ids[row, :start] = int(tokens[0])
        ids[row, start:] = torch.as_tensor(list(tokens), dtype=torch.long)
        mask[row, start:] = 1
    return ids, mask


ENGINES = ("raw", "raw-sdpa", "bridge")
"""What generates (``greedy_generate``'s ``engine``):

* ``"raw"``: Hugging Face's ``generate`` through the raw modules the bridge wraps, with the attention the bridge
  set ("eager") and the active hooks moved onto the modules (``dpn_lens.raw_view``). Its logits are bit for bit
  the bridge's (float32 and bfloat16, both embedded models), and so are its greedy tokens.
* ``"raw-sdpa"``: the same with ``scaled_dot_product_attention``, as a raw Hugging Face load attends: faster at
  larger batches. In float32 its logits differ from the bridge's in the last bits (1e-4) and its greedy tokens
  were the same in every comparison (docs/PERFORMANCE.md); in bfloat16 its rounding changes greedy answers as
  much as bfloat16 itself does.
* ``"bridge"``: TransformerLens's generation loop through the bridge's components (every hook point runs; the
  prompt pass computes the logits of every position). The only engine before session 26.

Where none is named the dtype chooses (``default_engine``): ``"raw-sdpa"`` in float32, ``"raw"`` otherwise, so a
run gives the answers it gave before, at the raw model's speed. Where a hook is active on a hook point without a
raw counterpart, both raw engines generate through the bridge."""

_ENGINE: ContextVar[str | None] = ContextVar("dpn_lens_generation_engine", default=None)


@contextmanager
def generation_engine(engine: str | None) -> Iterator[str | None]:
    """Every ``greedy_generate`` inside the block that names no engine uses ``engine`` (the CLI's ``--engine``;
    ``None``: the dtype chooses, as outside any block).

    Example:
        >>> with generation_engine("bridge"):
        ...     default_engine("float32")
        'bridge'
        >>> default_engine("float32"), default_engine("torch.bfloat16")
        ('raw-sdpa', 'raw')
    """
    token = _ENGINE.set(None if engine is None else _checked_engine(engine))
    try:
        yield engine
    finally:
        _ENGINE.reset(token)


def default_engine(dtype: Any = None) -> str:
    """The engine ``greedy_generate`` uses where none is named, for a model computing in ``dtype`` (a torch dtype or
    its name): the one a ``generation_engine`` block set, else ``"raw-sdpa"`` in float32 (the same tokens as the
    bridge) and ``"raw"`` in any other dtype or where it is not known (the bridge's tokens bit for bit)."""
    chosen = _ENGINE.get()
    if chosen is not None:
        return chosen
    return "raw-sdpa" if _is_float32(dtype) else "raw"


def same_answers_as_bridge(engine: str | None, dtype: Any) -> bool:
    """Whether ``engine`` gives the bridge's greedy answers in ``dtype``: all but ``"raw-sdpa"`` in half precision
    (``None``, an older record's, is the bridge's loop). Cached answers and merged runs are told apart by it.

    Example:
        >>> same_answers_as_bridge("raw-sdpa", "torch.float32"), same_answers_as_bridge("raw-sdpa", "bfloat16")
        (True, False)
    """
    return engine != "raw-sdpa" or _is_float32(dtype)


def _is_float32(dtype: Any) -> bool:
    return dtype is not None and str(dtype).removeprefix("torch.") == "float32"


def model_dtype(model: Any) -> torch.dtype:
    """The dtype ``model`` computes in: its first floating parameter's. (The bridge's ``cfg.dtype`` says float32
    for a model loaded in bfloat16, so it is not read.)"""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _checked_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown generation engine {engine!r}; use one of {', '.join(ENGINES)} "
                         "(dpn_lens.generation.ENGINES says what each runs)")
    return engine


def _greedy_batch(model: Any, token_lists: Sequence[Sequence[int]], max_new_tokens: int,
                  repetition_penalty: float, engine: str) -> list[list[int]]:
    """Greedy new tokens of each prompt, one left-padded KV-cached batch, cut before the first EOS."""
    stop = eos_ids(model)
    if engine != "bridge":
        from dpn_lens.raw_view import Untranslatable, raw_modules, translated_hooks

        try:
            with raw_modules(model, attention="sdpa" if engine == "raw-sdpa" else None) as raw, \
                    translated_hooks(model, raw):
                return hf_greedy_batch(raw, token_lists, max_new_tokens, stop, repetition_penalty)
        except Untranslatable:
            pass                # a hook point without a raw counterpart: the bridge's own loop below
    ids, mask = left_pad_with_own_token(token_lists)
    device = input_device(model)
    # Without padding the mask is all ones: leave it out, so a single prompt runs exactly as it always has.
    attention = mask.to(device) if not bool(mask.all()) else None
    with torch.inference_mode():
        output = model.generate(ids.to(device), attention_mask=attention, max_new_tokens=max_new_tokens,
                                do_sample=False, use_past_kv_cache=True, stop_at_eos=bool(stop),
                                eos_token_id=stop or None, repetition_penalty=repetition_penalty, verbose=False,
                                return_type="tokens")
    return _cut(output[:, ids.shape[1]:].tolist(), stop)


class PenaltyInLogitsDtype:
    """Hugging Face logits processor: the repetition penalty (positive logits of every id in the row divided by
    ``penalty``, negative ones multiplied) rounded in the model's logits dtype, as TransformerLens's loop applies
    it, where Hugging Face's own processor computes on the float32 copy. In bfloat16 the two can round a near-tie
    apart; this keeps the raw engines' answers the bridge's.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[2.0, -2.0, 1.0]])
        >>> PenaltyInLogitsDtype(2.0, torch.float32)(torch.tensor([[0, 1]]), scores).tolist()
        [[1.0, -4.0, 1.0]]
    """

    def __init__(self, penalty: float, dtype: torch.dtype) -> None:
        self.penalty, self.dtype = penalty, dtype

    def __call__(self, input_ids: Int[Tensor, "batch pos"], scores: Float[Tensor, "batch vocab"]
                 ) -> Float[Tensor, "batch vocab"]:
        logits = scores.to(self.dtype)     # exact: the scores are the model's logits, upcast by generate
        seen = logits.gather(1, input_ids)
        penalised = torch.where(seen > 0, seen / self.penalty, seen * self.penalty)
        return logits.scatter(1, input_ids, penalised).to(scores.dtype)


def hf_greedy_batch(hf_model: Any, token_lists: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[int],
                    repetition_penalty: float = 1.0) -> list[list[int]]:
    """Hugging Face's own greedy ``generate`` on one batch padded as ``_greedy_batch`` pads it (left, each row with
    its own first token), each answer cut before its first ``stop`` id: the raw engines and the benchmarks' raw
    model run this. A repetition penalty is rounded in the model's dtype (``PenaltyInLogitsDtype``)."""
    from transformers import LogitsProcessorList

    ids, mask = left_pad_with_own_token(token_lists)
    processors = LogitsProcessorList(
        [PenaltyInLogitsDtype(repetition_penalty, hf_model.dtype)] if repetition_penalty != 1.0 else [])
    with torch.inference_mode():
        output = hf_model.generate(ids.to(hf_model.device), attention_mask=mask.to(hf_model.device),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop) or None,
                                   pad_token_id=stop[0] if stop else int(ids[0, 0]), logits_processor=processors)
    return _cut(output[:, ids.shape[1]:].tolist(), stop)


def _cut(rows: list[list[int]], stop: Sequence[int]) -> list[list[int]]:
    """Each row up to its first stop id."""
    return [row[:next((index for index, token in enumerate(row) if token in stop), len(row))] for row in rows]


def greedy_generate(model: Any, token_lists: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 8,
                    repetition_penalty: float = 1.0, engine: str | None = None) -> list[list[int]]:
    """Greedy answer tokens (EOS and after removed) of each prompt, in left-padded batches, longest first.

    Args:
        model: a hooked model (``TransformerBridge``); an active ``steer`` context applies.
        token_lists: the prompts' token ids (chat template and BOS already applied).
        max_new_tokens: at most this many tokens per answer.
        batch_size: prompts per batch; ``1`` generates one prompt at a time, with the same answers.
        repetition_penalty: Hugging Face-style penalty on every id already in the row (1.0: none).
        engine: what generates (``ENGINES``): ``"raw"``, Hugging Face's ``generate`` through the raw modules
            with the bridge's attention (the bridge's tokens, faster: docs/PERFORMANCE.md), ``"raw-sdpa"``
            (with sdpa attention: faster still; other answers in bfloat16) or ``"bridge"`` (TransformerLens's
            loop). ``None``: ``default_engine`` of the model's dtype, unless a ``generation_engine`` block names one.

    Returns:
        One list of token ids per prompt, in the order given.

    Example:
        >>> greedy_generate(model, [encode(model, "Hi!")], max_new_tokens=5)   # doctest: +SKIP
        [[9906, 0, 1837, 339, 1326]]
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    engine = default_engine(model_dtype(model)) if engine is None else _checked_engine(engine)
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    answers: list[list[int] | None] = [None] * len(token_lists)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = _greedy_batch(model, [token_lists[i] for i in chunk], max_new_tokens, repetition_penalty, engine)
        for index, answer in zip(chunk, batch):
            answers[index] = answer
    return answers  # type: ignore[return-value]
