"""Judge-free check of steering in generation: do the edited model's own answers read like the persona's?

The preference margin of ``evaluation.preference`` is teacher-forced: it scores two fixed answers, so it
cannot see an effect that builds up over a long generation (or one that generation washes out). This
check generates instead, as a user would steer:

1. For held-out questions (those of ``dpn-lens control``'s preference pairs), the model answers greedily
   without any persona, unedited and under each edit (decode steps only, as in use;
   ``generation.greedy_generate`` inside ``steer``).
2. Each answer ``x`` is scored by the **unsteered** model: ``persona_score(x) = mean per-token
   log p(x | high persona, question) - log p(x | low persona, question)``, with the held-out persona
   descriptions of the positive control (never the ones the pairs were generated with). A text a
   high-trait persona would write scores higher.
3. The **shift** of an edit is, per question, ``sign * (persona_score(steered answer) -
   persona_score(unsteered answer))`` (positive = moved as asked), with a 95% interval over questions
   (``intervals.paired_effect``); for random-neuron draws, over draws and questions (``draws_effect``).
4. The **persona reference**: ``(persona_score(high answer) - persona_score(low answer)) / 2`` of the
   pairs' own answers, which the model wrote under a high and a low persona; the same scale as a shift.

An empty answer (EOS at once) is scored as the EOS token, the text the model chose.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> model = build_tiny_model()
    >>> scores = persona_scores(model, ["what would you do ?"], [[5, 6]], ["you are outgoing ."], ["you are quiet ."])
    >>> scores.shape
    (1,)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dpn_lens.data.prompts import render_for_model, render_roleplay_prompt
from dpn_lens.generation import GENERATION_BATCH, greedy_generate
from dpn_lens.hooked import encode
from dpn_lens.steering import Edit, steer

__all__ = ["generated_answers", "persona_scores", "answer_token_logprobs"]


def answer_token_logprobs(model: Any, contexts: Sequence[list[int]], answers: Sequence[list[int]],
                          batch_tokens: int = 4096) -> np.ndarray:
    """Mean per-token log p of each answer after its context, unedited (from a key/value cache where the
    model allows it, else whole sequences)."""
    from dpn_lens.evaluation.answer_cache import CachedAnswerScorer
    from dpn_lens.evaluation.preference import _mean_answer_logprobs

    if CachedAnswerScorer.supported(model):
        return CachedAnswerScorer(model, contexts, answers, batch_tokens).mean_logprobs()
    return _mean_answer_logprobs(model, contexts, answers, None, batch_tokens)


def generated_answers(model: Any, questions: Sequence[str], edit: Edit | None = None, max_new_tokens: int = 48,
                      batch_size: int = GENERATION_BATCH) -> list[list[int]]:
    """Greedy answer token ids to ``questions`` (chat template, no persona) with ``edit`` as its method applies it."""
    prompts = [encode(model, render_for_model(model, question)) for question in questions]
    with steer(model, edit):
        return greedy_generate(model, prompts, max_new_tokens, batch_size)


def persona_scores(model: Any, questions: Sequence[str], answers: Sequence[list[int]], high_personas: Sequence[str],
                   low_personas: Sequence[str]) -> np.ndarray:
    """Per answer: mean per-token log p(answer | high persona, question) - log p(answer | low persona, question).

    ``answers`` are token ids (no BOS); an empty one is scored as the EOS token. The model is unedited.
    """
    if not (len(questions) == len(answers) == len(high_personas) == len(low_personas)):
        raise ValueError("persona_scores needs one answer and one high and one low persona per question")
    eos = int(model.tokenizer.eos_token_id)
    contexts, tokens = [], []
    for question, answer, high, low in zip(questions, answers, high_personas, low_personas):
        for persona in (high, low):
            contexts.append(encode(model, render_for_model(model, render_roleplay_prompt(persona, question))))
            tokens.append(list(answer) or [eos])
    means = answer_token_logprobs(model, contexts, tokens)
    return means[0::2] - means[1::2]
