"""Paired-answer preference: does the model (steered, without a persona) prefer the high-pole answer?

For a question, a high-pole answer and a low-pole answer; the margin of a pair is

    mean per-token log p(high answer | question) - mean per-token log p(low answer | question),

the question rendered through the chat template without any persona. A trait edit that works raises
the margins of the increase direction and lowers them in the decrease direction; the persona prompt
itself (``persona=``) is the positive control.

The edit acts only at the answer positions: the teacher-forced equivalent of decode-only steering.
During KV-cached generation a decode-only edit never touches the prompt pass, and every later token
is computed in a one-token pass where the edit is on; teacher-forced, those are exactly the positions
of the answer tokens (the logits that predict the first answer token come from the unedited prompt
pass, the same as in generation). ``tests/test_preference.py`` checks the equality of the logits.

Pairs come from a user JSONL (``load_preference_pairs``) or from the model itself
(``generate_persona_pairs``: its greedy answers under a high and under a low persona).

Because the edit never touches the question, scoring the same pairs under many edits (a gamma sweep)
needs the question pass only once: ``PairScorer`` keeps it in the model's key/value cache and runs only
the answers per edit (``evaluation.answer_cache``; the same margins as the whole-sequence path).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from dpn_lens.generation import default_engine, greedy_generate, model_dtype, same_answers_as_bridge
from dpn_lens.hooked import encode
from dpn_lens.data.prompts import render_for_model, render_roleplay_prompt
from dpn_lens.evaluation.logprobs import continuation_logprobs
from dpn_lens.io import read_jsonl
from dpn_lens.steering import MaskedEdit, steer

__all__ = ["PreferencePair", "GeneratedPairs", "AnswerScores", "load_preference_pairs", "generate_persona_pairs",
           "pairs_cache_file", "pairs_cache_path",
           "greedy_answers", "strip_template_echo", "preference_margins", "answer_scores",
           "PairScorer"]

PAIR_KEYS = ("question", "high_answer", "low_answer")


@dataclass(frozen=True)
class PreferencePair:
    """One question with a high-pole and a low-pole answer.

    Example:
        >>> PreferencePair("Plans for Saturday?", "A party with everyone!", "A quiet book at home.").question
        'Plans for Saturday?'
    """

    question: str
    high_answer: str
    low_answer: str
    source: str = ""


def _nonblank_line_numbers(path: Path) -> list[int]:
    # read_jsonl skips blank lines; map its records back to the file's line numbers for the errors.
    with open(path, encoding="utf-8") as handle:
        return [number for number, line in enumerate(handle, 1) if line.strip()]


def load_preference_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Read ``question``, ``high_answer``, ``low_answer`` records from a JSONL file (other keys ignored).

    Errors name the file and line of a record that is not an object, lacks a key or holds an empty string.

    Example:
        >>> pairs = load_preference_pairs("my_pairs.jsonl")                # doctest: +SKIP
        >>> pairs[0].high_answer                                          # doctest: +SKIP
        'I would throw a party!'
    """
    path = Path(path)
    rows = read_jsonl(path)
    pairs = []
    for line_number, row in zip(_nonblank_line_numbers(path), rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_number} is not a JSON object; each line needs the keys "
                             f"{', '.join(PAIR_KEYS)}")
        missing = [key for key in PAIR_KEYS if key not in row]
        if missing:
            raise ValueError(f"{path}:{line_number} lacks the key(s) {', '.join(missing)}; each line needs "
                             f"{', '.join(PAIR_KEYS)}")
        for key in PAIR_KEYS:
            if not isinstance(row[key], str) or not row[key].strip():
                raise ValueError(f"{path}:{line_number} has an empty or non-text {key!r}; fill it in or remove the line")
        pairs.append(PreferencePair(row["question"].strip(), row["high_answer"].strip(), row["low_answer"].strip(),
                                    f"{path.name}:{line_number}"))
    if not pairs:
        raise ValueError(f"{path} holds no preference pairs")
    return pairs


@dataclass
class GeneratedPairs:
    """The pairs ``generate_persona_pairs`` kept, and how many draws it dropped and why.

    Attributes:
        pairs: the kept pairs (iterate over this object or index it directly).
        n_drawn: (question, high description, low description) triples drawn.
        n_identical: dropped because both personas gave the same answer.
        n_empty: dropped because one answer was empty (EOS at once).
    """

    pairs: list[PreferencePair]
    n_drawn: int
    n_identical: int = 0
    n_empty: int = 0
    descriptions: list[tuple[str, str]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    def __getitem__(self, index: int) -> PreferencePair:
        return self.pairs[index]


_ECHO = re.compile(r"^\s*#+\s*(?:my\s+)?(?:response|answer)\s*:\s*", re.IGNORECASE)


def strip_template_echo(answer: str) -> str:
    """``answer`` without a leading echo of the role-play template's ``###Response:`` marker.

    Small models often start their role-play answer by repeating the marker the template ends
    with. Asked without the template (as the metric asks), no model would write it, and it is the
    same in both answers of a pair, so it only dilutes the per-token margin.

    Example:
        >>> strip_template_echo("###Response: I would go out.")
        'I would go out.'
    """
    return _ECHO.sub("", answer, count=1).strip()


def greedy_answers(model: Any, token_lists: Sequence[list[int]], max_new_tokens: int = 48, batch_size: int = 8
                   ) -> list[list[int]]:
    """Greedy answer tokens (EOS and after removed) for each prompt, batched longest-first.

    ``dpn_lens.generation.greedy_generate`` without a repetition penalty: each answer is the one the
    prompt gets alone (left padding and the attention mask; see that module).
    """
    return greedy_generate(model, token_lists, max_new_tokens, batch_size)


def generate_persona_pairs(model: Any, trait: str, questions: Sequence[str], high_descriptions: Sequence[str],
                           low_descriptions: Sequence[str], n_pairs: int, seed: int = 0, max_new_tokens: int = 48,
                           batch_size: int = 8) -> GeneratedPairs:
    """The model's own greedy answers under a high and under a low persona, as preference pairs.

    ``n_pairs`` distinct (question, high description, low description) triples are drawn with ``seed``
    (as for a contrastive set); each question is answered in the role-play template with the high and
    with the low description. A leading echo of the template's ``###Response:`` marker is removed
    (``strip_template_echo``). Pairs whose two answers are identical or empty are dropped and counted,
    so the result may hold fewer than ``n_pairs`` pairs.

    Example:
        >>> pairs = generate_persona_pairs(model, "openness", questions, highs, lows, n_pairs=32)  # doctest: +SKIP
        >>> len(pairs), pairs.n_identical                                                       # doctest: +SKIP
        (31, 1)
    """
    from dpn_lens.data.contrastive import draw_pairs

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    drawn = draw_pairs(trait, questions, high_descriptions, low_descriptions, n_pairs, seed, "persona answers")
    prompts = [encode(model, render_for_model(model, text)) for pair in drawn.pairs for text in (pair.high, pair.low)]
    answers = greedy_answers(model, prompts, max_new_tokens, batch_size)
    decode = model.tokenizer.decode
    texts = [strip_template_echo(decode(answer, skip_special_tokens=True)) for answer in answers]
    result = GeneratedPairs([], n_drawn=len(drawn.pairs))
    for index, pair in enumerate(drawn.pairs):
        high, low = texts[2 * index], texts[2 * index + 1]
        if not high or not low:
            result.n_empty += 1
        elif high == low:
            result.n_identical += 1
        else:
            result.pairs.append(PreferencePair(pair.question, high, low, f"persona answers:{drawn.trait}"))
            result.descriptions.append((pair.high_description, pair.low_description))
    return result


def pairs_cache_file(model: Any, folder: str, trait: str, batch_size: int = 16, **key: Any) -> Path:
    """Where generated pairs of ``model`` are cached: ``$DPN_LENS_CACHE/<folder>/<trait>-<digest>.json``.

    The digest covers the model's name, revision and dtype, the trait and every ``key`` field (sizes,
    seed, a digest of the data), so a cached file is only ever read back for the same model and draw.
    ``batch_size`` is the number of prompts generated together: in bfloat16 the batch can change a greedy
    answer, so it is part of the key, except at 16, under which every earlier file was written without it.
    So is the generation engine where its answers are its own (``generation.same_answers_as_bridge``: "raw-sdpa"
    in half precision).

    Example:
        >>> from dpn_lens.tiny import build_tiny_model
        >>> pairs_cache_file(build_tiny_model(), "selection_pairs", "openness", pairs=8).name.startswith("openness-")
        True
    """
    from dpn_lens.models import model_revision

    # The parameters' dtype: the bridge's cfg.dtype says float32 for a model loaded in bfloat16, so keys written
    # before session 26 from a bfloat16 model name float32 (those answers are generated again, once).
    dtype = model_dtype(model)
    return pairs_cache_path(getattr(model, "dpn_model_name", "model"), model_revision(model), str(dtype),
                            folder, trait, batch_size, engine=default_engine(dtype), **key)


def pairs_cache_path(name: str, revision: str, dtype: str, folder: str, trait: str, batch_size: int = 16,
                     engine: str | None = None, **key: Any) -> Path:
    """``pairs_cache_file`` from the model's name, revision (``models.model_revision``) and torch dtype
    (``"torch.float32"``) instead of the loaded model: the plan finds cached pairs without loading it.

    Example:
        >>> path = pairs_cache_path("m", "hub:abc", "torch.float32", "selection_pairs", "openness", pairs=8)
        >>> path.parent.name, path.name.startswith("openness-")
        ('selection_pairs', True)
    """
    import hashlib
    import json

    from dpn_lens.models import cache_dir

    material = {"model": name, "revision": revision, "dtype": dtype, "trait": trait, **key}
    if batch_size != 16:
        material["batch_size"] = batch_size
    if not same_answers_as_bridge(engine, dtype):    # the others answer as the bridge did for every earlier file
        material["engine"] = engine
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / folder / f"{trait}-{digest}.json"


@contextlib.contextmanager
def _answer_edit(model: Any, edit: Any, holder: dict[str, Tensor]) -> Iterator[None]:
    """Apply ``edit`` at the positions ``holder["mask"]`` marks; hooks removed on exit, also on errors."""
    if edit is None:
        yield
        return
    # Through steer, as every edit: its fingerprint, empty-map and double-application checks hold here too.
    with steer(model, MaskedEdit(edit, lambda: holder["mask"])):
        yield


def _context_text(model: Any, question: str, persona: Any) -> str:
    if persona is None:
        return render_for_model(model, question)
    if hasattr(persona, "wrap"):  # a PersonaPrompt
        return render_for_model(model, persona.wrap(question))
    if not isinstance(persona, str) or not persona.strip():
        raise ValueError(f"persona must be a description string or a PersonaPrompt, got {persona!r}")
    return render_for_model(model, render_roleplay_prompt(persona, question))


def _personas_per_pair(persona: Any, n_pairs: int) -> list[Any]:
    """One persona (or ``None``) per pair: a single one is shared, a list gives each pair its own."""
    if persona is None or isinstance(persona, str) or hasattr(persona, "wrap"):
        return [persona] * n_pairs
    personas = list(persona)
    if len(personas) != n_pairs:
        raise ValueError(f"{len(personas)} personas for {n_pairs} pairs; pass one persona, or one per pair")
    return personas


@dataclass
class AnswerScores:
    """Per pair, the mean per-token log-probability of each answer and its length in tokens.

    Attributes:
        high_mean, low_mean: ``[n_pairs]`` mean log p of the high / low answer's tokens.
        high_tokens, low_tokens: ``[n_pairs]`` answer lengths in tokens.
    """

    high_mean: np.ndarray
    low_mean: np.ndarray
    high_tokens: np.ndarray
    low_tokens: np.ndarray

    @property
    def margins(self) -> np.ndarray:
        """The preference margins: mean per-token log p, high minus low."""
        return self.high_mean - self.low_mean

    @property
    def sum_margins(self) -> np.ndarray:
        """Margins of the summed (total) log-probabilities, which favour the shorter answer."""
        return self.high_mean * self.high_tokens - self.low_mean * self.low_tokens


class PairScorer:
    """The scores of fixed pairs (under a fixed persona, or none) for any number of edits.

    On a model that runs from a key/value cache (every ``TransformerBridge`` over a Hugging Face
    decoder), each question runs once, here, and every ``scores(edit)`` runs only the answer tokens
    (``answer_cache.CachedAnswerScorer``): the edit acts at the answer positions only, so the
    question pass is the same for every edit. Otherwise each call scores the whole sequences
    (``logprobs.continuation_logprobs``) with the edit masked to the answer positions. Both give the
    same numbers (``tests/test_answer_cache.py``). ``cache_bytes`` bounds the questions' cache kept
    between calls (None: all of it); the questions of a batch past it run again in every call
    (``CachedAnswerScorer``, same numbers; ``scorer.cached.footprint`` says how many).

    Example:
        >>> scorer = PairScorer(model, pairs)                          # doctest: +SKIP
        >>> base = scorer.margins()                                    # doctest: +SKIP
        >>> steered = scorer.margins(edit=intervention)                # doctest: +SKIP
    """

    def __init__(self, model: Any, pairs: Sequence[PreferencePair], persona: Any = None, batch_tokens: int = 4096,
                 cached: bool | None = None, cache_bytes: int | None = None):
        from dpn_lens.evaluation.answer_cache import CachedAnswerScorer

        if not pairs:
            raise ValueError("no preference pairs given")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be at least 1, got {batch_tokens}")
        personas = _personas_per_pair(persona, len(pairs))
        self.model, self.batch_tokens = model, batch_tokens
        self.contexts, self.answers = [], []
        for index, pair in enumerate(pairs):
            context = encode(model, _context_text(model, pair.question, personas[index]))
            for answer in (pair.high_answer, pair.low_answer):
                tokens = encode(model, answer, add_bos=False)
                if not tokens:
                    raise ValueError(f"pair #{index} has an answer with no tokens; there is nothing to score")
                self.contexts.append(context)
                self.answers.append(tokens)
        lengths = np.array([len(answer) for answer in self.answers], dtype=np.float64)
        self.high_tokens, self.low_tokens = lengths[0::2], lengths[1::2]
        use_cache = CachedAnswerScorer.supported(model) if cached is None else cached
        self.cached = (CachedAnswerScorer(model, self.contexts, self.answers, batch_tokens, cache_bytes=cache_bytes)
                       if use_cache else None)

    def scores(self, edit: Any = None) -> AnswerScores:
        """The per-answer scores with ``edit`` (``None``: unedited) at the answer positions."""
        if self.cached is not None:
            means = self.cached.mean_logprobs(edit)
        else:
            means = _mean_answer_logprobs(self.model, self.contexts, self.answers, edit, self.batch_tokens)
        return AnswerScores(means[0::2], means[1::2], self.high_tokens, self.low_tokens)

    def margins(self, edit: Any = None) -> np.ndarray:
        """``[n_pairs]`` preference margins with ``edit`` at the answer positions (see ``preference_margins``)."""
        return self.scores(edit).margins


def answer_scores(model: Any, pairs: Sequence[PreferencePair], edit: Any = None, persona: Any = None,
                  batch_tokens: int = 4096) -> AnswerScores:
    """The per-answer scores behind ``preference_margins`` (same arguments); see ``AnswerScores``.

    To score the same pairs under many edits, build one ``PairScorer`` and call it per edit: the
    questions then run once.

    Example:
        >>> scores = answer_scores(model, pairs)                   # doctest: +SKIP
        >>> scores.margins.mean(), scores.sum_margins.mean()       # doctest: +SKIP
    """
    return PairScorer(model, pairs, persona, batch_tokens).scores(edit)


def preference_margins(model: Any, pairs: Sequence[PreferencePair], edit: Any = None, persona: Any = None,
                       batch_tokens: int = 4096) -> np.ndarray:
    """Per pair, mean per-token log p(high answer | question) minus the same for the low answer.

    Args:
        model: a hooked model.
        pairs: ``PreferencePair`` objects.
        edit: any edit with ``fwd_hooks()`` (``Intervention``, NPTI, CAA), applied at the answer
            positions only (module note); ``None`` scores the unedited model.
        persona: ``None`` (the question alone, the metric), or a persona description string or
            ``PersonaPrompt`` wrapped around the question in the role-play template (positive control),
            or a list of those, one per pair.
        batch_tokens: padded tokens per forward pass.

    Returns:
        ``[n_pairs]`` float64 margins (nats per token).

    Example:
        >>> base = preference_margins(model, pairs)                       # doctest: +SKIP
        >>> steered = preference_margins(model, pairs, edit=intervention)  # doctest: +SKIP
        >>> paired_effect(steered, base)                                   # doctest: +SKIP
    """
    return answer_scores(model, pairs, edit, persona, batch_tokens).margins


def _mean_answer_logprobs(model: Any, contexts: Sequence[list[int]], answers: Sequence[list[int]], edit: Any,
                          batch_tokens: int) -> np.ndarray:
    """Mean log-probability of each answer's tokens after its context, the edit on the answer positions.

    The plain path (models that cannot run from a cache; ``PairScorer(cached=False)``). Scored by
    ``logprobs.continuation_logprobs`` (batched longest-first, right-padded); before each
    batch's forward pass the answer-position mask of that batch is set for the edit's hooks.
    """
    lengths = [len(c) + len(a) for c, a in zip(contexts, answers)]
    holder: dict[str, Tensor] = {}

    def set_mask(chunk: list[int]) -> None:
        positions = torch.arange(max(lengths[i] for i in chunk))
        holder["mask"] = torch.stack([(positions >= len(contexts[i])) & (positions < lengths[i]) for i in chunk])

    with _answer_edit(model, edit, holder):
        scores = continuation_logprobs(model, contexts, answers, batch_tokens=batch_tokens, on_batch=set_mask)
    return np.array([float(score.token_logprobs.mean()) for score in scores], dtype=np.float64)
