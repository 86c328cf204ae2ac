"""Capability preservation: does an edit keep what the model knows and how it writes?

Metrics (all from log-probabilities, no generation, no judge):

* multiple-choice log-likelihood accuracy on MMLU, ARC-Easy, ARC-Challenge, HellaSwag, PIQA, BoolQ and
  OpenBookQA: the choice with the highest log-probability wins. Choices that are single tokens (MMLU
  letters, BoolQ yes/no) are compared by their summed log-probability; longer choices by
  log-probability per character (lm-eval's ``acc_norm``), which removes the bias towards short answers;
* LAMBADA last-word accuracy: every token of the last word is the greedy prediction;
* WikiText-2 perplexity over fixed-length token chunks;
* KL(unedited || edited) of next-token distributions on neutral text (WikiText chunks not used for
  perplexity), averaged over tokens: 0 for an edit that changes nothing.

Capability prompts are raw text (no chat template) for every model, as in lm-eval. The prompting
baseline prepends its persona description to every context (``prefix``), so its cost is measured too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dpn_lens.data.contrastive import resolve_data_dir
from dpn_lens.data.prompts import OPTION_LETTERS, multiple_choice_prompt
from dpn_lens.evaluation.logprobs import continuation_logprobs, next_token_logprobs, scoring_edit
from dpn_lens.hooked import HookedModel, encode
from dpn_lens.io import read_jsonl
from dpn_lens.steering import Edit, steer

__all__ = ["MCItem", "CapabilitySizes", "CapabilitySuite", "load_capability_suite", "mc_accuracy",
           "lambada_accuracy", "perplexity", "kl_divergence", "text_capability", "evaluate_capability", "MC_TASKS",
           "CAPABILITY_METRICS"]

MC_TASKS = ("mmlu", "arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "openbookqa")
CAPABILITY_METRICS = tuple(f"{task}_acc" for task in MC_TASKS) + ("lambada_acc", "wikitext_ppl", "kl")
"""Every metric ``evaluate_capability`` returns; for all but ``wikitext_ppl`` and ``kl``, higher is better."""


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice item: the context, its choices (continuations, with leading space) and the answer.

    Example:
        >>> MCItem("Question: 2+2?\\nAnswer:", (" 4", " 5"), 0).answer
        0
    """

    context: str
    choices: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"a multiple-choice item needs at least 2 choices, got {len(self.choices)}: {self.context[:60]!r}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer index {self.answer} is outside the {len(self.choices)} choices of {self.context[:60]!r}")


@dataclass(frozen=True)
class CapabilitySizes:
    """How much of each benchmark to use (items are drawn with a fixed seed).

    ``quick()`` finishes in about a minute per condition for a 135M model on 2 CPU cores.
    """

    mc_items: int = 100
    lambada_items: int = 200
    ppl_chunks: int = 20
    ppl_chunk_tokens: int = 256
    kl_chunks: int = 8
    kl_chunk_tokens: int = 128

    @classmethod
    def quick(cls) -> "CapabilitySizes":
        return cls(mc_items=12, lambada_items=24, ppl_chunks=3, ppl_chunk_tokens=128, kl_chunks=2, kl_chunk_tokens=96)

    def __post_init__(self) -> None:
        from dpn_lens.numbers import as_int

        for name, value in list(self.__dict__.items()):
            object.__setattr__(self, name, as_int(value, f"capability size {name}", minimum=1))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the capability data folder must hold it (see ../shared/data/README.md)")
    return read_jsonl(path)


def _sample(rows: list[Any], n: int, seed: int) -> list[Any]:
    # A seeded draw rather than the first n: MMLU is sorted by subject, HellaSwag by activity.
    order = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[int(i)] for i in order]


def _letters_item(question: str, choices: Sequence[str], answer: int) -> MCItem:
    letters = OPTION_LETTERS[:len(choices)]
    return MCItem(multiple_choice_prompt(question, choices), tuple(f" {letter}" for letter in letters), answer)


def _mc_task(folder: Path, task: str) -> list[MCItem]:
    if task == "mmlu":
        return [_letters_item(r["question"], r["choices"], int(r["answer"]))
                for r in _read_jsonl(folder / "mmlu" / "mmlu_test_stratified20.jsonl")]
    if task in ("arc_easy", "arc_challenge"):
        name = "ARC-Easy-Test.jsonl" if task == "arc_easy" else "ARC-Challenge-Test.jsonl"
        return [MCItem(f"Question: {r['question']}\nAnswer:", tuple(f" {c}" for c in r["choices"]),
                       list(r["labels"]).index(r["answerKey"])) for r in _read_jsonl(folder / "arc" / name)]
    if task == "hellaswag":
        return [MCItem(f"{r['activity_label']}: {r['ctx']}", tuple(f" {e}" for e in r["endings"]), int(r["label"]))
                for r in _read_jsonl(folder / "hellaswag" / "hellaswag_val_2000.jsonl")]
    if task == "piqa":
        return [MCItem(f"Question: {r['goal']}\nAnswer:", (f" {r['sol1'].strip()}", f" {r['sol2'].strip()}"), int(r["label"]))
                for r in _read_jsonl(folder / "piqa" / "validation_1500.jsonl")]
    if task == "boolq":
        return [MCItem(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", (" no", " yes"), int(bool(r["answer"])))
                for r in _read_jsonl(folder / "boolq" / "dev.jsonl")]
    if task == "openbookqa":
        rows = _read_jsonl(folder / "openbookqa" / "test.jsonl")
        return [MCItem(f"Question: {r['question']['stem']}\nAnswer:",
                       tuple(f" {c['text']}" for c in r["question"]["choices"]),
                       [c["label"] for c in r["question"]["choices"]].index(r["answerKey"])) for r in rows]
    raise ValueError(f"unknown multiple-choice task {task!r}; use one of {', '.join(MC_TASKS)}")


@dataclass
class CapabilitySuite:
    """The items of one capability run (texts only; tokenised per model when scored)."""

    mc: dict[str, list[MCItem]]
    lambada: list[str]
    ppl_text: str
    sizes: CapabilitySizes
    _kl_reference: dict[Any, list[torch.Tensor]] = field(default_factory=dict, repr=False)


def load_capability_suite(data_dir: str | Path | None, sizes: CapabilitySizes | None = None, seed: int = 0,
                          tasks: Sequence[str] = MC_TASKS) -> CapabilitySuite:
    """Read the capability benchmarks from ``data_dir/capability`` (or ``$DPN_LENS_DATA``).

    Example:
        >>> suite = load_capability_suite("../shared/data", CapabilitySizes.quick())   # doctest: +SKIP
        >>> len(suite.mc["arc_easy"])                                                   # doctest: +SKIP
        12
    """
    sizes = sizes or CapabilitySizes()
    folder = resolve_data_dir(data_dir, "capability")
    mc = {task: _sample(_mc_task(folder, task), sizes.mc_items, seed) for task in tasks}
    lambada = [r["text"] for r in _sample(_read_jsonl(folder / "lambada" / "lambada_test.jsonl"), sizes.lambada_items, seed)]
    wikitext = folder / "wikitext2_test" / "test.txt"
    if not wikitext.exists():
        raise FileNotFoundError(f"{wikitext} is missing; the capability folder must hold wikitext2_test/test.txt")
    return CapabilitySuite(mc, lambada, wikitext.read_text(encoding="utf-8"), sizes)


def _context_ids(model: Any, text: str, prefix: str) -> list[int]:
    return encode(model, f"{prefix}{text}" if prefix else text)


def mc_accuracy(model: HookedModel, items: Sequence[MCItem], edit: Edit | None = None, prefix: str = "") -> float:
    """Fraction of items whose answer has the highest log-probability (per character if multi-token).

    Example:
        >>> mc_accuracy(model, [MCItem("Q: 2+2?\\nA:", (" 4", " 5"), 0)])   # doctest: +SKIP
        1.0
    """
    if not items:
        raise ValueError("no multiple-choice items to score")
    contexts, continuations, owner = [], [], []
    for index, item in enumerate(items):
        context = _context_ids(model, item.context, prefix)
        for choice in item.choices:
            contexts.append(context)
            continuations.append(encode(model, choice, add_bos=False))
            owner.append(index)
    with steer(model, scoring_edit(edit)):
        if all(len(c) == 1 for c in continuations):
            # Single-token choices: one forward pass per item instead of one per choice.
            unique = {tuple(c): None for c in contexts}
            keys = list(unique)
            table = next_token_logprobs(model, [list(k) for k in keys])
            row_of = {key: row for row, key in enumerate(keys)}
            totals = [float(table[row_of[tuple(c)], t[0]]) for c, t in zip(contexts, continuations)]
            normalise = False
        else:
            scores = continuation_logprobs(model, contexts, continuations)
            totals = [s.total for s in scores]
            normalise = True
    correct = 0
    cursor = 0
    for item in items:
        values = totals[cursor:cursor + len(item.choices)]
        if normalise:
            values = [v / max(len(choice), 1) for v, choice in zip(values, item.choices)]
        cursor += len(item.choices)
        correct += int(int(np.argmax(values)) == item.answer)
    return correct / len(items)


def lambada_accuracy(model: HookedModel, texts: Sequence[str], edit: Edit | None = None, prefix: str = "") -> float:
    """Fraction of passages whose last word the model predicts greedily, token by token."""
    contexts, continuations = [], []
    for text in texts:
        head, _, last = text.rstrip().rpartition(" ")
        if not head or not last:
            raise ValueError(f"a LAMBADA passage needs a context and a last word: {text[:60]!r}")
        contexts.append(_context_ids(model, head, prefix))
        continuations.append(encode(model, f" {last}", add_bos=False))
    with steer(model, scoring_edit(edit)):
        scores = continuation_logprobs(model, contexts, continuations)
    return float(np.mean([bool(s.greedy.all()) for s in scores]))


def _chunks(model: Any, text: str, n_chunks: int, chunk_tokens: int, skip_chunks: int = 0) -> list[list[int]]:
    ids = encode(model, text[: (n_chunks + skip_chunks) * chunk_tokens * 12], add_bos=False)
    needed = (n_chunks + skip_chunks) * chunk_tokens
    if len(ids) < needed:
        raise ValueError(f"the perplexity text has {len(ids)} tokens, fewer than the {needed} asked for; lower the sizes")
    return [ids[i * chunk_tokens:(i + 1) * chunk_tokens] for i in range(skip_chunks, skip_chunks + n_chunks)]


def _bos_context(model: Any, prefix: str) -> list[int]:
    return encode(model, prefix) if prefix else encode(model, "")[:1] or [_fallback_bos(model)]


def _fallback_bos(model: Any) -> int:
    tokenizer = model.tokenizer
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a perplexity chunk with")


def perplexity(model: HookedModel, chunks: Sequence[list[int]], edit: Edit | None = None, prefix: str = "") -> float:
    """``exp(mean NLL)`` of the chunk tokens, each chunk scored after BOS (or after ``prefix``).

    Example:
        >>> perplexity(model, [encode(model, "The cat sat on the mat.", add_bos=False)])   # doctest: +SKIP
        38.2
    """
    context = _bos_context(model, prefix)
    with steer(model, scoring_edit(edit)):
        scores = continuation_logprobs(model, [context] * len(chunks), list(chunks))
    nll = -torch.cat([s.token_logprobs for s in scores]).double().mean()
    return float(torch.exp(nll))


def kl_divergence(model: HookedModel, chunks: Sequence[list[int]], edit: Edit | None = None, prefix: str = "",
                  reference: list[torch.Tensor] | None = None) -> float:
    """Mean over tokens of KL(unedited || edited) between next-token distributions on ``chunks``.

    ``reference`` (the unedited log-probabilities, as returned in a previous call's cache) saves
    the unedited pass when many edits are compared on the same text.
    """
    context = _bos_context(model, "")
    if reference is None:
        reference = [s.distributions for s in continuation_logprobs(model, [context] * len(chunks), list(chunks), full=True)]
    with steer(model, scoring_edit(edit)):
        steered = continuation_logprobs(model, [_bos_context(model, prefix)] * len(chunks), list(chunks), full=True)
    total, count = 0.0, 0
    for base, other in zip(reference, steered):
        total += float((base.exp() * (base - other.distributions)).sum(-1).double().sum())
        count += base.shape[0]
    return total / count


def text_capability(model: HookedModel, suite: CapabilitySuite, edit: Edit | None = None, prefix: str = ""
                    ) -> dict[str, float]:
    """WikiText perplexity and KL from the unedited model under ``edit``: the cheap part of
    ``evaluate_capability`` (the γ sweeps' probe). The KL chunks follow the perplexity chunks in the text;
    their unedited distributions are computed once per model and kept in ``suite``.

    Example:
        >>> sorted(text_capability(model, suite))                 # doctest: +SKIP
        ['kl', 'wikitext_ppl']
    """
    sizes = suite.sizes
    results = {"wikitext_ppl": perplexity(model, _chunks(model, suite.ppl_text, sizes.ppl_chunks, sizes.ppl_chunk_tokens),
                                          edit, prefix)}
    kl_chunks = _chunks(model, suite.ppl_text, sizes.kl_chunks, sizes.kl_chunk_tokens,
                        skip_chunks=math.ceil(sizes.ppl_chunks * sizes.ppl_chunk_tokens / sizes.kl_chunk_tokens))
    key = id(model)
    if key not in suite._kl_reference:
        context = _bos_context(model, "")
        suite._kl_reference[key] = [s.distributions for s in continuation_logprobs(
            model, [context] * len(kl_chunks), kl_chunks, full=True)]
    results["kl"] = kl_divergence(model, kl_chunks, edit, prefix, reference=suite._kl_reference[key])
    return results


def evaluate_capability(model: HookedModel, suite: CapabilitySuite, edit: Edit | None = None, prefix: str = "") -> dict[str, float]:
    """Every capability metric of ``suite`` for the model under ``edit`` (and/or a persona ``prefix``).

    Example:
        >>> evaluate_capability(model, suite)["arc_easy_acc"]    # doctest: +SKIP
        0.58
    """
    results = {f"{task}_acc": mc_accuracy(model, items, edit, prefix) for task, items in suite.mc.items()}
    results["lambada_acc"] = lambada_accuracy(model, suite.lambada, edit, prefix)
    return {**results, **text_capability(model, suite, edit, prefix)}
