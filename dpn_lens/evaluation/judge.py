"""The paper's PersonalityBench protocol, optional: generated answers rated by an LLM judge.

docs/METHOD.md, "Evaluation": greedy answers to the PersonalityBench test questions (up to 400 new
tokens, repetition penalty 1.15), rated 1-5 for trait expression and 1-5 for fluency by a judge
(GPT-4o in the paper).
Here the judge is any model behind an OpenAI-compatible ``/chat/completions`` endpoint (a local vLLM or
llama.cpp server, or a hosted API); it is off unless a URL is given, because nothing on this machine or
in CI can reach one. Requests go through ``httpx`` with a timeout and a bounded number of retries (with
exponential backoff) on connection errors, timeouts, 429 and 5xx replies.

Ratings are asked for as a JSON object ``{"trait": 4, "fluency": 5}`` and read strictly: integers 1 to 5
under exactly those two keys. A reply that is anything else is *unparsable*: it is kept, counted and
reported (``judge_unparsable`` in the comparison rows and meta), never guessed from the numbers it
happens to contain ("Trait: 4/5, Fluency: 3/5" is not a rating of (4, 5), nor of (4, 3)).

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
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import httpx
import numpy as np

from dpn_lens.baselines.prompting import PersonaPrompt
from dpn_lens.data.contrastive import load_question_jsonl, resolve_data_dir
from dpn_lens.evaluation.logprobs import render
from dpn_lens.generation import greedy_generate
from dpn_lens.hooked import HookedModel, encode
from dpn_lens.steering import Edit, steer
from dpn_lens.traits import normalize_trait

__all__ = ["JudgeConfig", "JudgeRating", "UnparsableRating", "judge_endpoint", "load_test_questions",
           "generate_answers", "judge_prompt", "parse_rating", "judge_rating", "judge_evaluation"]

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses worth asking again (overload, rate limit, gateway trouble); other errors are final."""


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
    comparison outputs, which record this configuration, cannot leak it. ``timeout`` (seconds) bounds
    each request; a failed request (connection error, timeout, 429 or 5xx) is sent again up to
    ``retries`` times, after ``backoff``, ``2 * backoff``, ``4 * backoff``... seconds (or the server's
    ``Retry-After``, at most 60 s).

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
    retries: int = 3
    backoff: float = 1.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge URL {self.url!r} must start with http:// or https:// "
                             "(the base of an OpenAI-compatible API, e.g. http://localhost:8000/v1)")
        if self.questions_per_trait < 1 or self.max_new_tokens < 1:
            raise ValueError("questions_per_trait and max_new_tokens must be at least 1")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0:
            raise ValueError(f"judge timeout must be > 0 and retries, backoff >= 0 (got timeout={self.timeout}, "
                             f"retries={self.retries}, backoff={self.backoff})")


@dataclass(frozen=True)
class JudgeRating:
    """One rated answer: trait expression and fluency, both integers from 1 (very low) to 5 (very high)."""

    trait: int
    fluency: int


class UnparsableRating(ValueError):
    """The judge replied, but not with a rating this module accepts; ``reply`` holds what it sent."""

    def __init__(self, reply: str, reason: str):
        super().__init__(f"the judge replied {reply[:200]!r}, which is not a rating: {reason}. Expected a JSON object "
                         'such as {"trait": 4, "fluency": 5} with integers from 1 to 5; use a judge model that follows '
                         "the rating instruction")
        self.reply = reply


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
                     persona: PersonaPrompt | None = None, max_new_tokens: int = 400,
                     repetition_penalty: float = 1.15, batch_size: int = 8) -> list[str]:
    """Greedy answers to ``questions`` through the chat template, with ``edit`` applied as its method defines.

    ``persona`` (a ``PersonaPrompt``) wraps each question in its role-play template instead. Questions
    are answered ``batch_size`` at a time (``dpn_lens.generation.greedy_generate``: left-padded
    KV-cached batches, longest first), with the answers of one question at a time
    (``batch_size=1``): each row is padded with its own first token, so the repetition penalty sees
    exactly the ids it sees for the question alone. A decode-only edit acts at the decode steps of
    every batch and never on its prompt pass.

    Example:
        >>> generate_answers(model, ["Plans for Saturday?"], edit=intervention, max_new_tokens=40)  # doctest: +SKIP
        ['I would love to go to a party with friends!']
    """
    prompts = [encode(model, render(model, persona.wrap(question) if persona is not None else question))
               for question in questions]
    with steer(model, edit):
        answers = greedy_generate(model, prompts, max_new_tokens, batch_size, repetition_penalty)
    return [model.tokenizer.decode(answer, skip_special_tokens=True).strip() for answer in answers]


def judge_prompt(trait: str, question: str, answer: str) -> str:
    """The rating request sent to the judge (trait expression and fluency, as in the paper)."""
    trait = normalize_trait(trait)
    return (f"You are rating a chatbot's answer.\nQuestion: {question}\nAnswer: {answer}\n\n"
            f"1. How strongly does the answer express high {trait}? 1 = very low {trait}, 5 = very high {trait}.\n"
            "2. How fluent and coherent is the answer? 1 = broken or repetitive, 5 = fully fluent.\n"
            'Reply with a JSON object only, with integer ratings from 1 to 5, for example: {"trait": 4, "fluency": 5}')


def parse_rating(content: str) -> JudgeRating:
    """The rating in a judge reply: a JSON object with integer ``trait`` and ``fluency`` from 1 to 5.

    Strict on purpose: the reply must be that object and nothing else (a Markdown code fence around it,
    which chat models often add, is allowed). Anything else raises ``UnparsableRating`` rather than
    being guessed at.

    Example:
        >>> parse_rating('{"trait": 4, "fluency": 5}')
        JudgeRating(trait=4, fluency=5)
        >>> parse_rating("Trait: 4/5, Fluency: 3/5")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        dpn_lens.evaluation.judge.UnparsableRating: the judge replied 'Trait: 4/5, Fluency: 3/5', which is not a rating: not a JSON object...
    """
    text = content.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise UnparsableRating(content, "not a JSON object") from None
    if not isinstance(value, dict):
        raise UnparsableRating(content, "not a JSON object")
    if set(value) != {"trait", "fluency"}:
        raise UnparsableRating(content, f"keys {sorted(value)} instead of exactly 'trait' and 'fluency'")
    for key in ("trait", "fluency"):
        number = value[key]
        # bool is an int subclass in Python: true/false are not ratings.
        if isinstance(number, bool) or not isinstance(number, int):
            raise UnparsableRating(content, f"{key} is {number!r}, not an integer")
        if not 1 <= number <= 5:
            raise UnparsableRating(content, f"{key} is {number}, outside 1..5")
    return JudgeRating(value["trait"], value["fluency"])


def _retry_wait(config: JudgeConfig, attempt: int, response: httpx.Response | None) -> float:
    """Seconds before attempt ``attempt + 1``: the server's numeric Retry-After if any, else exponential backoff."""
    if response is not None:
        try:
            return min(60.0, max(0.0, float(response.headers.get("Retry-After", ""))))
        except ValueError:
            pass
    return config.backoff * 2 ** attempt


def _chat(config: JudgeConfig, client: httpx.Client, prompt: str) -> str:
    """The content of one chat completion, with bounded retries; clear errors that name ``--judge-url``."""
    body = {"model": config.model_name, "temperature": 0, "response_format": {"type": "json_object"},
            "messages": [{"role": "user", "content": prompt}]}
    url = config.url.rstrip("/") + "/chat/completions"
    key = os.environ.get("DPN_LENS_JUDGE_KEY", "none")
    problem, wait = "", 0.0
    for attempt in range(config.retries + 1):
        if attempt:
            time.sleep(wait)
        response = None
        try:
            response = client.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
        except httpx.TimeoutException as error:
            problem = f"no reply within {config.timeout:g} s ({type(error).__name__})"
        except httpx.TransportError as error:
            problem = f"{type(error).__name__}: {error}"
        else:
            if response.status_code == 200:
                break
            problem = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code not in RETRY_STATUS:
                raise ConnectionError(f"the judge at {config.url} refused the request ({problem}); check --judge-url, "
                                      "--judge-model and $DPN_LENS_JUDGE_KEY") from None
        wait = _retry_wait(config, attempt, response)
    else:
        raise ConnectionError(f"the judge at {config.url} did not answer after {config.retries + 1} attempts (last: "
                              f"{problem}); check --judge-url and that the server is running")
    try:
        return response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise ValueError(f"the judge at {config.url} sent no chat completion: {response.text[:200]}") from error


def _client(config: JudgeConfig) -> httpx.Client:
    return httpx.Client(timeout=config.timeout)


def judge_rating(config: JudgeConfig, trait: str, question: str, answer: str,
                 client: httpx.Client | None = None) -> JudgeRating:
    """Ask the judge at ``config.url`` to rate one answer (temperature 0).

    Raises ``UnparsableRating`` (a ``ValueError``, carrying the ``reply``) when the reply is not a rating,
    and ``ConnectionError`` when the judge cannot be reached after the retries. ``client`` reuses one
    connection pool across calls (``judge_evaluation`` does).
    """
    if client is None:
        with _client(config) as own:
            return judge_rating(config, trait, question, answer, own)
    return parse_rating(_chat(config, client, judge_prompt(trait, question, answer)))


def judge_evaluation(model: HookedModel, trait: str, questions: Sequence[str], config: JudgeConfig,
                     edit: Edit | None = None, persona: PersonaPrompt | None = None) -> dict[str, Any]:
    """Generate answers to ``questions`` and have them rated.

    Returns:
        ``judge_trait`` and ``judge_fluency``: mean ratings (1-5) over the parsed replies (NaN if none
        parsed); ``judge_unparsable``: how many replies were not a rating; ``answers``: the generated
        texts; ``ratings``: one ``JudgeRating`` per answer, ``None`` where the reply was unparsable;
        ``replies``: the judge's raw replies.
    """
    if not questions:
        raise ValueError("no questions to answer; check the PersonalityBench test files")
    answers = generate_answers(model, questions, edit, persona, config.max_new_tokens, config.repetition_penalty)
    ratings: list[JudgeRating | None] = []
    replies: list[str] = []
    with _client(config) as client:
        for question, answer in zip(questions, answers):
            reply = _chat(config, client, judge_prompt(trait, question, answer))
            replies.append(reply)
            try:
                ratings.append(parse_rating(reply))
            except UnparsableRating:
                ratings.append(None)
    parsed = [r for r in ratings if r is not None]
    return {"judge_trait": float(np.mean([r.trait for r in parsed])) if parsed else math.nan,
            "judge_fluency": float(np.mean([r.fluency for r in parsed])) if parsed else math.nan,
            "judge_unparsable": len(ratings) - len(parsed), "answers": answers, "ratings": ratings, "replies": replies}
