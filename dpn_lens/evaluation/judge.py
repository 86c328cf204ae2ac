"""The paper's PersonalityBench protocol, optional: generated answers rated by an LLM judge.

docs/METHOD.md, "Evaluation": greedy answers to the PersonalityBench test questions (up to 400 new
tokens, repetition penalty 1.15), rated 1-5 for trait expression and 1-5 for fluency by a judge
(GPT-4o in the paper).
Here the judge is any model behind an OpenAI-compatible ``/chat/completions`` endpoint (a local vLLM or
llama.cpp server, or a hosted API); it is off unless a URL is given, because nothing on this machine or
in CI can reach one.

Unlike the log-probability metrics of ``trait``, generation applies each edit exactly as its method
defines it (DPN-LE acts at decode steps only, the paper's default), so this is the paper's protocol.

Example:
    >>> judge = JudgeConfig(url="http://localhost:8000/v1", model_name="qwen2.5-7b-instruct")   # doctest: +SKIP
    >>> questions = load_test_questions("../shared/data", "openness", n=10)                    # doctest: +SKIP
    >>> judge_evaluation(model, "openness", questions, judge, edit=intervention)["judge_trait"]  # doctest: +SKIP
    3.9
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dpn_lens.baselines.prompting import PersonaPrompt
from dpn_lens.data.contrastive import load_question_jsonl, resolve_data_dir
from dpn_lens.evaluation.logprobs import render
from dpn_lens.hooked import HookedModel, encode, input_device
from dpn_lens.steering import Edit, steer
from dpn_lens.traits import normalize_trait

__all__ = ["JudgeConfig", "JudgeRating", "judge_endpoint", "load_test_questions", "generate_answers", "judge_prompt",
           "parse_rating", "judge_rating", "judge_evaluation"]


def judge_endpoint(url: str | None = None) -> str | None:
    """The OpenAI-compatible judge URL (argument or ``$DPN_LENS_JUDGE_URL``), or ``None`` if not configured.

    Example:
        >>> judge_endpoint("http://localhost:8000/v1")
        'http://localhost:8000/v1'
    """
    return url or os.environ.get("DPN_LENS_JUDGE_URL") or None


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge is and how much to generate (defaults: the paper's generation settings, 10 questions).

    The API key is read from ``$DPN_LENS_JUDGE_KEY`` (sent as a bearer token), never stored, so that
    comparison outputs, which record this configuration, cannot leak it.

    Example:
        >>> JudgeConfig("http://localhost:8000/v1").max_new_tokens
        400
    """

    url: str
    model_name: str = "gpt-4o"
    questions_per_trait: int = 10
    max_new_tokens: int = 400
    repetition_penalty: float = 1.15
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge URL {self.url!r} must start with http:// or https:// "
                             "(the base of an OpenAI-compatible API, e.g. http://localhost:8000/v1)")
        if self.questions_per_trait < 1 or self.max_new_tokens < 1:
            raise ValueError("questions_per_trait and max_new_tokens must be at least 1")


@dataclass(frozen=True)
class JudgeRating:
    """One rated answer: trait expression and fluency, both 1 (very low) to 5 (very high)."""

    trait: float
    fluency: float


def load_test_questions(data_dir: str | Path | None, trait: str, n: int | None = None, seed: int = 0) -> list[str]:
    """``n`` PersonalityBench test questions of ``trait`` (all if ``None``), drawn with ``seed``.

    Example:
        >>> len(load_test_questions("../shared/data", "openness", n=3))     # doctest: +SKIP
        3
    """
    trait = normalize_trait(trait)
    path = resolve_data_dir(data_dir, "personalitybench") / "test" / f"{trait.capitalize()}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no PersonalityBench test questions at {path}; pass the data folder that holds "
                                "personalitybench/test/<Trait>.jsonl (--data-dir or $DPN_LENS_DATA)")
    questions = load_question_jsonl([path])
    if n is None or n >= len(questions):
        return questions
    return random.Random(seed).sample(questions, n)


def generate_answers(model: HookedModel, questions: Sequence[str], edit: Edit | None = None,
                     persona: PersonaPrompt | None = None,
                     max_new_tokens: int = 400, repetition_penalty: float = 1.15) -> list[str]:
    """Greedy answers to ``questions`` through the chat template, with ``edit`` applied as its method defines.

    ``persona`` (a ``PersonaPrompt``) wraps each question in its role-play template instead. One question
    at a time, so no padding enters the prompt: unbatched greedy decoding is what the test of bridge
    against Hugging Face generation checks.
    """
    answers = []
    with steer(model, edit):
        for question in questions:
            text = persona.wrap(question) if persona is not None else question
            ids = torch.tensor([encode(model, render(model, text))], device=input_device(model))
            output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, verbose=False,
                                    repetition_penalty=repetition_penalty)
            answers.append(model.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def judge_prompt(trait: str, question: str, answer: str) -> str:
    """The rating request sent to the judge (trait expression and fluency, as in the paper)."""
    trait = normalize_trait(trait)
    return (f"You are rating a chatbot's answer.\nQuestion: {question}\nAnswer: {answer}\n\n"
            f"1. How strongly does the answer express high {trait}? 1 = very low {trait}, 5 = very high {trait}.\n"
            "2. How fluent and coherent is the answer? 1 = broken or repetitive, 5 = fully fluent.\n"
            "Reply with the two numbers only, separated by a space, for example: 4 5")


def parse_rating(content: str) -> JudgeRating:
    """The two 1-5 numbers of a judge reply; a clear error if the reply has fewer.

    Example:
        >>> parse_rating("Trait: 4, fluency: 5")
        JudgeRating(trait=4.0, fluency=5.0)
    """
    numbers = [float(n) for n in re.findall(r"(?<![\d.])[1-5](?:\.\d+)?(?![\d.])", content)]
    if len(numbers) < 2:
        raise ValueError(f"the judge replied {content!r}, not two numbers from 1 to 5 (trait, fluency); "
                         "use a judge model that follows the rating instruction")
    return JudgeRating(numbers[0], numbers[1])


def judge_rating(config: JudgeConfig, trait: str, question: str, answer: str) -> JudgeRating:
    """Ask the judge at ``config.url`` to rate one answer (temperature 0)."""
    body = json.dumps({"model": config.model_name, "temperature": 0,
                       "messages": [{"role": "user", "content": judge_prompt(trait, question, answer)}]})
    key = os.environ.get("DPN_LENS_JUDGE_KEY", "none")
    request = urllib.request.Request(config.url.rstrip("/") + "/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=config.timeout) as response:
            reply = json.loads(response.read())
    except urllib.error.URLError as error:
        raise ConnectionError(f"the judge at {config.url} did not answer ({error}); check --judge-url and that the "
                              "server is running") from error
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(f"the judge at {config.url} sent no chat completion: {str(reply)[:200]}") from error
    return parse_rating(content)


def judge_evaluation(model: HookedModel, trait: str, questions: Sequence[str], config: JudgeConfig,
                     edit: Edit | None = None, persona: PersonaPrompt | None = None) -> dict[str, Any]:
    """Generate answers to ``questions`` and have them rated.

    Returns:
        ``judge_trait`` and ``judge_fluency``: mean ratings (1-5); ``answers``: the generated texts;
        ``ratings``: one ``JudgeRating`` per answer.
    """
    if not questions:
        raise ValueError("no questions to answer; check the PersonalityBench test files")
    answers = generate_answers(model, questions, edit, persona, config.max_new_tokens, config.repetition_penalty)
    ratings = [judge_rating(config, trait, q, a) for q, a in zip(questions, answers)]
    return {"judge_trait": float(np.mean([r.trait for r in ratings])),
            "judge_fluency": float(np.mean([r.fluency for r in ratings])), "answers": answers, "ratings": ratings}
