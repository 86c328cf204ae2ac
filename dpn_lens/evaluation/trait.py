"""Trait control without a judge model: questionnaires, statement agreement, respondent matching.

* Questionnaire: each IPIP item is asked on the A-E scale (A = very accurate .. E = very inaccurate);
  the answer is the expected score under the model's distribution over the five option letters
  (A=5 .. E=1, renormalised over the letters), reverse-keyed items are scored ``6 - x``; a trait's score
  is the mean over its items (1..5). The expectation rather than the argmax makes small shifts visible.
* Statement agreement: ``P(Yes) / (P(Yes) + P(No))`` for Anthropic persona statements, separately for
  statements a high-trait persona would say and those it would not. ``statement_yes`` keeps the value
  of every statement, and ``statement_shift_items`` turns two such arrays into per-statement shifts whose
  mean is the change of the high-minus-low gap (for intervals over statements).
* Respondent matching (IPIP-NEO-300; docs/METHOD.md, "Evaluation"): a respondent's train items
  decide the direction of each trait (mean > 2.8 -> increase); the model answers the held-out items
  under that direction; metric = mean absolute error against the respondent's answers.

All scores read the next-token distribution at the last prompt token, so edits are applied through
``logprobs.scoring_edit`` (at all positions; its docstring says why). ``persona`` (a ``PersonaPrompt``)
is not an edit: it rewrites the question instead.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dpn_lens.baselines.prompting import PersonaPrompt
from dpn_lens.data.contrastive import resolve_data_dir
from dpn_lens.data.prompts import multiple_choice_prompt
from dpn_lens.evaluation.logprobs import next_token_logprobs, render, scoring_edit
from dpn_lens.hooked import HookedModel, encode
from dpn_lens.io import read_jsonl
from dpn_lens.steering import Edit, steer
from dpn_lens.traits import TRAITS, normalize_trait

__all__ = ["IPIPItem", "load_ipip_items", "questionnaire_prompt", "option_token_ids", "answer_items",
           "questionnaire_scores", "Statement", "load_statements", "statement_yes", "statement_agreement",
           "agreement_summary", "statement_shift_items", "Respondent",
           "load_respondents", "respondent_directions", "respondent_mae", "INVENTORIES"]

INVENTORIES = ("ipip_neo_300_test", "ipip_neo_300", "mpi_120", "ipip_neo_120", "ipip50")
OPTIONS = ("Very Accurate", "Moderately Accurate", "Neither Accurate Nor Inaccurate", "Moderately Inaccurate",
           "Very Inaccurate")
LETTERS = "ABCDE"
_OCEAN = {"O": "openness", "C": "conscientiousness", "E": "extraversion", "A": "agreeableness", "N": "neuroticism"}


@dataclass(frozen=True)
class IPIPItem:
    """One questionnaire item: ``key`` +1 if agreeing means a higher trait, -1 if reverse keyed."""

    id: str
    trait: str
    key: int
    text: str

    def __post_init__(self) -> None:
        if self.key not in (1, -1):
            raise ValueError(f"item {self.id}: key must be +1 or -1, got {self.key!r}")


def _statement(text: str) -> str:
    """MPI stems ("Worry about things") become first-person statements ("I worry about things.")."""
    text = text.strip()
    if text.split()[0] in ("I", "I'm", "I've", "My", "Am"):
        return text if text.endswith(".") else text + "."
    return f"I {text[0].lower()}{text[1:]}{'' if text.endswith('.') else '.'}"


def load_ipip_items(data_dir: str | Path | None, inventory: str = "ipip_neo_300_test") -> list[IPIPItem]:
    """Items of an IPIP inventory under ``data_dir/ipip``.

    Inventories: ``ipip_neo_300`` (300 items), ``ipip_neo_300_test`` (its 180 held-out items, the ones
    respondent matching scores), ``mpi_120``, ``ipip_neo_120``, ``ipip50``.

    Example:
        >>> items = load_ipip_items("../shared/data", "ipip50")   # doctest: +SKIP
        >>> items[0]                                             # doctest: +SKIP
        IPIPItem(id='E1', trait='extraversion', key=1, text='I am the life of the party.')
    """
    folder = resolve_data_dir(data_dir, "ipip")
    if inventory in ("ipip_neo_300", "ipip_neo_300_test"):
        with open(folder / "ipip_neo_300" / "item_key.csv", encoding="utf-8") as handle:
            items = [IPIPItem(row["item"], _OCEAN[row["facet_code"][0]], 1 if row["sign"].startswith("+") else -1,
                              _statement(row["text"])) for row in csv.DictReader(handle)]
        if inventory == "ipip_neo_300_test":
            test = {str(i) for i in json.loads((folder / "ipip_neo_300" / "split.json").read_text())["test_index"]}
            items = [item for item in items if item.id in test]
        return items
    if inventory == "mpi_120":
        with open(folder / "mpi" / "mpi_120.csv", encoding="utf-8") as handle:
            return [IPIPItem(str(i), _OCEAN[row["label_ocean"]], int(row["key"]), _statement(row["text"]))
                    for i, row in enumerate(csv.DictReader(handle)) if int(row["key"]) != 0]
    if inventory == "ipip_neo_120":
        rows = json.loads((folder / "ipip_neo_120" / "questions_en.json").read_text(encoding="utf-8"))
        return [IPIPItem(row["id"], _OCEAN[row["domain"]], 1 if row["keyed"] == "plus" else -1, _statement(row["text"]))
                for row in rows]
    if inventory == "ipip50":
        with open(folder / "ipip50" / "ipip50.csv", encoding="utf-8") as handle:
            return [IPIPItem(row["id"], normalize_trait(row["trait"]), int(row["key"]), row["text"].strip())
                    for row in csv.DictReader(handle)]
    raise ValueError(f"unknown inventory {inventory!r}; use one of {', '.join(INVENTORIES)}")


def questionnaire_prompt(item: IPIPItem | str) -> str:
    """The user message asking for one item on the A-E scale (MPI's wording)."""
    text = item.text if isinstance(item, IPIPItem) else item
    return multiple_choice_prompt(
        f"Given a statement of you: \"{text}\"\nPlease choose from the following options to identify how "
        "accurately this statement describes you.", OPTIONS, question_prefix="", option_format="({letter}). {choice}",
        options_header="Options:", instruction="Answer with a single letter.")


def option_token_ids(model: HookedModel, words: Sequence[str]) -> list[list[int]]:
    """For each option word, the first token of its spellings ``"W"`` and ``" W"`` (deduplicated).

    Chat models start the answer right after the assistant header (no space); base models continue
    "Answer:" with a space; the probability of an option is the sum over both spellings.
    """
    result = []
    for word in words:
        ids = {encode(model, spelling, add_bos=False)[0] for spelling in (word, f" {word}")}
        result.append(sorted(ids))
    flat = [i for ids in result for i in ids]
    if len(flat) != len(set(flat)):
        raise ValueError(f"the options {list(words)} share a first token in this tokenizer; they cannot be told apart")
    return result


def _option_probabilities(logprobs: torch.Tensor, options: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities renormalised over the options [n, k], total option mass [n])``."""
    per_option = torch.stack([torch.logsumexp(logprobs[:, ids], dim=-1) for ids in options], dim=-1)
    return torch.softmax(per_option, dim=-1), per_option.exp().sum(-1)


def _prompt_ids(model: HookedModel, questions: Sequence[str], persona: PersonaPrompt | None) -> list[list[int]]:
    wrapped = [persona.wrap(q) if persona is not None else q for q in questions]
    return [encode(model, render(model, text)) for text in wrapped]


def answer_items(model: HookedModel, items: Sequence[IPIPItem], edit: Edit | None = None,
                 persona: PersonaPrompt | None = None) -> dict[str, np.ndarray]:
    """The model's answers to ``items`` on the A-E scale.

    Returns:
        ``raw``: expected answer 1..5 (5 = very accurate, before keying); ``keyed``: reverse-keyed items
        scored ``6 - raw``; ``mass``: probability the model puts on the five letters at all.
    """
    if not items:
        raise ValueError("no questionnaire items to answer")
    options = option_token_ids(model, list(LETTERS))
    with steer(model, scoring_edit(edit)):
        logprobs = next_token_logprobs(model, _prompt_ids(model, [questionnaire_prompt(i) for i in items], persona))
    probabilities, mass = _option_probabilities(logprobs, options)
    raw = (probabilities * torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])).sum(-1).numpy()
    keys = np.array([item.key for item in items])
    return {"raw": raw, "keyed": np.where(keys == 1, raw, 6 - raw), "mass": mass.numpy()}


def questionnaire_scores(model: HookedModel, items: Sequence[IPIPItem], edit: Edit | None = None,
                         persona: PersonaPrompt | None = None) -> dict[str, float]:
    """Mean keyed score (1..5) per trait present in ``items``.

    Example:
        >>> questionnaire_scores(model, load_ipip_items(data, "ipip50"))["extraversion"]   # doctest: +SKIP
        3.12
    """
    answers = answer_items(model, items, edit, persona)
    traits = np.array([item.trait for item in items])
    return {trait: float(answers["keyed"][traits == trait].mean()) for trait in TRAITS if (traits == trait).any()}


@dataclass(frozen=True)
class Statement:
    """An Anthropic persona statement; ``high`` if a high-trait persona would say it."""

    trait: str
    text: str
    question: str
    high: bool


def load_statements(data_dir: str | Path | None, trait: str, n_per_pole: int | None = None, seed: int = 0
                    ) -> list[Statement]:
    """``n_per_pole`` high-pole and as many low-pole statements of ``trait`` (seeded draw)."""
    trait = normalize_trait(trait)
    path = resolve_data_dir(data_dir, "anthropic_persona") / f"{trait}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the anthropic_persona folder must hold <trait>.jsonl")
    rows = read_jsonl(path)
    result = []
    for high in (True, False):
        pool = [r for r in rows if (r["answer_matching_behavior"].strip() == "Yes") == high]
        order = np.random.default_rng(seed).permutation(len(pool))[: n_per_pole or len(pool)]
        result += [Statement(trait, pool[i]["statement"], pool[i]["question"], high) for i in order]
    return result


def statement_yes(model: HookedModel, statements: Sequence[Statement], edit: Edit | None = None,
                  persona: PersonaPrompt | None = None, batch_tokens: int = 2048) -> np.ndarray:
    """``P(Yes) / (P(Yes) + P(No))`` of every statement, ``[n_statements]`` (in ``statements`` order).

    The prompts go through ``next_token_logprobs`` in batches of about ``batch_tokens`` tokens, so
    hundreds of statements cost a few forward passes, not one each.

    Example:
        >>> yes = statement_yes(model, load_statements(data, "openness", 20))   # doctest: +SKIP
        >>> yes.shape                                                             # doctest: +SKIP
        (40,)
    """
    if not statements:
        raise ValueError("no statements to score")
    options = option_token_ids(model, ["Yes", "No"])
    prompts = [f"{s.question}\nAnswer Yes or No." for s in statements]
    with steer(model, scoring_edit(edit)):
        logprobs = next_token_logprobs(model, _prompt_ids(model, prompts, persona), batch_tokens)
    return _option_probabilities(logprobs, options)[0][:, 0].numpy()


def agreement_summary(yes: np.ndarray, statements: Sequence[Statement]) -> dict[str, float]:
    """``{"high", "low", "gap"}``: mean ``yes`` over high-pole and low-pole statements, and high - low."""
    is_high = np.array([s.high for s in statements], dtype=bool)
    high = float(yes[is_high].mean()) if is_high.any() else float("nan")
    low = float(yes[~is_high].mean()) if (~is_high).any() else float("nan")
    return {"high": high, "low": low, "gap": high - low}


def statement_agreement(model: HookedModel, statements: Sequence[Statement], edit: Edit | None = None,
                        persona: PersonaPrompt | None = None) -> dict[str, float]:
    """Mean ``P(Yes) / (P(Yes) + P(No))`` over high-pole and over low-pole statements, and their gap.

    Returns ``{"high": ..., "low": ..., "gap": high - low}``; steering towards the high pole should
    raise ``high`` and lower ``low``. ``statement_yes`` gives the per-statement values.
    """
    return agreement_summary(statement_yes(model, statements, edit, persona), statements)


def statement_shift_items(steered: np.ndarray, baseline: np.ndarray, high: Sequence[bool] | np.ndarray,
                          sign: int = 1) -> np.ndarray:
    """Per-statement shifts whose mean is ``sign`` times the change of the high-minus-low gap.

    A high-pole statement contributes ``+change * n / n_high``, a low-pole one ``-change * n / n_low``
    (``change = steered - baseline`` of its P(Yes)); the weights make the mean over all ``n`` statements
    equal ``(mean high change) - (mean low change)`` exactly, even when the poles differ in size, so an
    interval of the mean over statements (``intervals.paired_effect(items, zeros)``) is an interval of
    the gap change. ``sign`` is ``direction_sign(direction)``: positive = moved as asked.

    Example:
        >>> np.round(statement_shift_items(np.array([0.9, 0.2]), np.array([0.5, 0.5]), [True, False]), 3).tolist()
        [0.8, 0.6]
    """
    steered, baseline = np.asarray(steered, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    high = np.asarray(high, dtype=bool)
    if not steered.shape == baseline.shape == high.shape:
        raise ValueError(f"steered {steered.shape}, baseline {baseline.shape} and high {high.shape} must be one "
                         "value per statement")
    n_high, n_low = int(high.sum()), int((~high).sum())
    if n_high == 0 or n_low == 0:
        raise ValueError(f"the gap needs statements of both poles; got {n_high} high and {n_low} low")
    weights = np.where(high, high.size / n_high, -high.size / n_low)
    return sign * weights * (steered - baseline)


@dataclass(frozen=True)
class Respondent:
    """A human respondent of IPIP-NEO-300: ``answers[item id] = 1..5`` (unanswered items absent)."""

    case: str
    answers: dict[str, int]


def load_respondents(path: str | Path) -> list[Respondent]:
    """Respondents in the PAlign/PAPI JSON format (records with ``case`` and ``i1``..``i300``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a PAlign/PAPI respondent JSON file "
                                "(a 10-respondent sample is ipip/ipip_neo_300/respondents_sample10.json)")
    rows = json.loads(path.read_text(encoding="utf-8"))
    respondents = []
    for index, row in enumerate(rows):
        answers = {key[1:]: int(value) for key, value in row.items() if key.startswith("i") and key[1:].isdigit()}
        bad = [k for k, v in answers.items() if not 0 <= v <= 5]
        # 0 marks an unanswered item in the PAlign files: treated as missing, not as an answer.
        answers = {k: v for k, v in answers.items() if v != 0}
        if bad:
            raise ValueError(f"{path}: respondent #{index} has answers outside 1..5 for items {bad[:5]}")
        respondents.append(Respondent(str(row.get("case", index)), answers))
    return respondents


def respondent_directions(respondent: Respondent, train_items: Sequence[IPIPItem], threshold: float = 2.8
                          ) -> dict[str, str]:
    """Per trait: ``"increase"`` if the respondent's keyed train-item mean exceeds ``threshold``."""
    directions = {}
    for trait in TRAITS:
        scores = [respondent.answers[i.id] if i.key == 1 else 6 - respondent.answers[i.id]
                  for i in train_items if i.trait == trait and i.id in respondent.answers]
        if scores:
            directions[trait] = "increase" if float(np.mean(scores)) > threshold else "decrease"
    return directions


def respondent_mae(respondents: Sequence[Respondent], train_items: Sequence[IPIPItem], test_items: Sequence[IPIPItem],
                   answers: Callable[[str, str], np.ndarray]) -> float:
    """Mean absolute error between the model's raw answers and each respondent's, on ``test_items``.

    ``answers(trait, direction)`` returns the model's raw answers (1..5) to that trait's test items (in
    ``test_items`` order) under the edit for that direction; results are typically cached.
    """
    errors = []
    for respondent in respondents:
        directions = respondent_directions(respondent, train_items)
        for trait, direction in directions.items():
            items = [i for i in test_items if i.trait == trait]
            predicted = answers(trait, direction)
            answered = np.array([i.id in respondent.answers for i in items], dtype=bool)
            truth = np.array([respondent.answers.get(i.id, 0) for i in items], dtype=float)
            errors.append(np.abs(np.asarray(predicted) - truth)[answered])
    if not errors:
        raise ValueError("no respondent answered any test item; check that item ids match the respondent file")
    return float(np.concatenate(errors).mean())
