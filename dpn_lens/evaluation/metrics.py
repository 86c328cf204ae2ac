"""Metrics: what an edit is scored on, each a small class with one ``score(model, edit, items)``.

Both evaluations (``control``: matched KL with controls; ``compare``: fixed γ on questionnaires,
statements, capability and the judge) measure every edit through these classes, so a metric is written
once and means the same in both. A metric takes the model, the edit (``None``: unedited; applied
through ``steering.steer`` as its method applies it) and the items it is measured on, and returns a
``Score``: one summary ``value``, the ``per_item`` values an interval is taken over (where the metric
has items), and ``details`` (answers, secondary numbers). Where a prompt can carry a persona (the
positive control, the prompting baseline), ``score`` takes it as ``persona=``.

| name | class | items | per item |
|---|---|---|---|
| ``preference`` | ``PreferenceMargin`` | ``PreferencePair`` s | log p(high answer) - log p(low answer), nats/token |
| ``kl`` | ``ProbeKL`` | token chunks of a probe text | (none: one KL over the text; ``details["ppl"]``) |
| ``generation`` | ``GenerationPersonaScore`` | questions | persona score of the generated answer |
| ``questionnaire`` | ``Questionnaire`` | ``IPIPItem`` s | keyed answer, 1-5 |
| ``statements`` | ``Statements`` | ``Statement`` s | P(Yes) / (P(Yes) + P(No)) |
| ``capability`` | ``Capability`` | a ``CapabilitySuite`` | (none: accuracies, perplexity and KL in ``details``) |
| ``judge`` | ``Judge`` | questions | the judge's trait rating, 1-5 (NaN if unparsable) |

A metric that prepares something per item set (the preference margin runs each question once, the
KL probe its unsteered distributions once) keeps it for the last items it saw, so scoring many edits on
the same items costs one preparation.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> from dpn_lens.evaluation.preference import PreferencePair
    >>> model = build_tiny_model()
    >>> pairs = [PreferencePair("what now ?", "a party !", "a book .")] * 2
    >>> score = PreferenceMargin().score(model, None, pairs)
    >>> score.metric, score.per_item.shape
    ('preference', (2,))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from dpn_lens.baselines.prompting import PersonaPrompt
from dpn_lens.evaluation import capability as cap
from dpn_lens.evaluation import trait as tr
from dpn_lens.evaluation.calibrate import KLProbe
from dpn_lens.evaluation.generation_check import generated_answers, persona_scores
from dpn_lens.evaluation.judge import JudgeConfig, judge_evaluation
from dpn_lens.evaluation.preference import PairScorer, PreferencePair
from dpn_lens.steering import Edit

__all__ = ["Score", "Metric", "PreferenceMargin", "ProbeKL", "GenerationPersonaScore", "Questionnaire",
           "Statements", "Capability", "Judge", "METRIC_CLASSES"]


@dataclass(frozen=True)
class Score:
    """One metric's measurement of one edit on one item set.

    Example:
        >>> Score("statements", 0.2, np.array([0.7, 0.5]), {"gap": 0.2}).mean_per_item
        0.6
    """

    metric: str
    value: float
    """The metric's summary: the mean over items, or its aggregate where it has no items (KL)."""
    per_item: np.ndarray | None = None
    """One value per item, in the items' order, where a shift has an interval over items."""
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mean_per_item(self) -> float:
        """The mean of ``per_item`` (NaN where there is none)."""
        return float(np.mean(self.per_item)) if self.per_item is not None and len(self.per_item) else float("nan")


class Metric(Protocol):
    """What the harnesses call: a name and ``score(model, edit, items)``."""

    name: str

    def score(self, model: Any, edit: Edit | None, items: Any) -> Score: ...


class _LastPrepared:
    """What a metric prepared for its last setting (model, items, persona), rebuilt when it changes.

    Keeping one, not one per setting, bounds memory: a prepared preference scorer holds its questions'
    key/value caches. The model is compared by identity, items and persona by value.
    """

    def __init__(self) -> None:
        self.key: Any = None
        self.value: Any = None

    def get(self, model: Any, setting: tuple, build: Callable[[], Any]) -> Any:
        key = (id(model), setting)
        if self.key is None or key != self.key:
            self.value = None            # free the old one before building the new
            self.value, self.key = build(), key
        return self.value


class PreferenceMargin:
    """The teacher-forced preference margin of paired answers (``evaluation.preference``).

    ``score(model, edit, pairs, persona=None)``: per pair, mean per-token log p(high answer) minus that of
    the low answer, with the edit at the answer positions only; ``persona`` (a description, or one per
    pair) wraps each question as the positive control does. ``cache_bytes``: the prepared scorer's budget
    for its questions' cache (``PairScorer``; None: keep all).
    """

    name = "preference"

    def __init__(self, batch_tokens: int = 4096, cache_bytes: int | None = None):
        self.batch_tokens = batch_tokens
        self.cache_bytes = cache_bytes
        self._prepared = _LastPrepared()

    def scorer(self, model: Any, pairs: Sequence[PreferencePair], persona: Any = None) -> PairScorer:
        """The prepared ``PairScorer`` of ``pairs`` (each question runs once while the pairs and persona stay)."""
        pairs, persona = list(pairs), list(persona) if isinstance(persona, (list, tuple)) else persona
        return self._prepared.get(model, (pairs, persona),
                                  lambda: PairScorer(model, pairs, persona, self.batch_tokens, cache_bytes=self.cache_bytes))

    def score(self, model: Any, edit: Edit | None, items: Sequence[PreferencePair], persona: Any = None) -> Score:
        margins = self.scorer(model, items, persona).margins(edit=edit)
        return Score(self.name, float(margins.mean()), margins)


class ProbeKL:
    """KL (nats/token) from the unsteered model and perplexity on a probe text (``calibrate.KLProbe``).

    ``items``: the probe's token chunks (``calibrate.probe_chunks``); ``edit_context`` as ``KLProbe``'s.
    """

    name = "kl"

    def __init__(self, edit_context: bool = False):
        self.edit_context = edit_context
        self._prepared = _LastPrepared()

    def probe(self, model: Any, chunks: Sequence[list[int]]) -> KLProbe:
        """The prepared ``KLProbe`` (its unsteered distributions computed once while the chunks stay)."""
        chunks = [list(chunk) for chunk in chunks]
        return self._prepared.get(model, (chunks,), lambda: KLProbe(model, chunks, edit_context=self.edit_context))

    def score(self, model: Any, edit: Edit | None, items: Sequence[list[int]]) -> Score:
        kl, ppl = self.probe(model, items)(edit)
        return Score(self.name, kl, None, {"ppl": ppl})


class GenerationPersonaScore:
    """The generation-based check (``evaluation.generation_check``): the model answers each question
    greedily under the edit (decode steps only), and the unsteered model scores each answer by
    ``log p(answer | high persona) - log p(answer | low persona)`` per token.

    ``high_personas`` / ``low_personas``: one description per question (held-out ones).
    ``details["answers"]``: the generated token ids.
    """

    name = "generation"

    def __init__(self, high_personas: Sequence[str], low_personas: Sequence[str], max_new_tokens: int = 48):
        self.high_personas, self.low_personas = list(high_personas), list(low_personas)
        self.max_new_tokens = max_new_tokens

    def texts(self, model: Any, questions: Sequence[str], answers: Sequence[list[int]]) -> np.ndarray:
        """The persona scores of given answers (token ids) to ``questions``."""
        n = len(questions)
        if n > len(self.high_personas) or n > len(self.low_personas):
            raise ValueError(f"{n} questions but {len(self.high_personas)} high and {len(self.low_personas)} low "
                             "personas; give one of each per question")
        return persona_scores(model, questions, answers, self.high_personas[:n], self.low_personas[:n])

    def score(self, model: Any, edit: Edit | None, items: Sequence[str]) -> Score:
        answers = generated_answers(model, items, edit, self.max_new_tokens)
        values = self.texts(model, items, answers)
        return Score(self.name, float(values.mean()), values, {"answers": answers})


class Questionnaire:
    """Answers to IPIP items on the A-E scale (``trait.answer_items``): per item the keyed answer (1-5);
    ``details``: ``raw`` (before keying) and ``mass`` (probability on the five letters)."""

    name = "questionnaire"

    def score(self, model: Any, edit: Edit | None, items: Sequence[tr.IPIPItem],
              persona: PersonaPrompt | None = None) -> Score:
        answers = tr.answer_items(model, items, edit, persona)
        return Score(self.name, float(answers["keyed"].mean()), answers["keyed"],
                     {"raw": answers["raw"], "mass": answers["mass"]})


class Statements:
    """Agreement with persona statements (``trait.statement_yes``): per statement P(Yes); ``value`` the
    gap between high-pole and low-pole statements; ``details``: ``high``, ``low``, ``gap``."""

    name = "statements"

    def score(self, model: Any, edit: Edit | None, items: Sequence[tr.Statement],
              persona: PersonaPrompt | None = None) -> Score:
        yes = tr.statement_yes(model, items, edit, persona)
        agreement = tr.agreement_summary(yes, items)
        return Score(self.name, agreement["gap"], yes, agreement)


class Capability:
    """General capability under the edit (``evaluation.capability``): multiple-choice accuracies, LAMBADA,
    WikiText perplexity and KL; ``light`` measures only perplexity and KL (the γ sweeps' cheap probe).

    ``value`` is the KL from the unsteered model; every number is in ``details``.
    """

    name = "capability"

    def __init__(self, light: bool = False):
        self.light = light

    def score(self, model: Any, edit: Edit | None, items: cap.CapabilitySuite,
              persona: PersonaPrompt | None = None) -> Score:
        prefix = persona.prefix if persona is not None else ""
        measure = cap.text_capability if self.light else cap.evaluate_capability
        results = measure(model, items, edit, prefix)
        return Score(self.name, float(results["kl"]), None, results)


class Judge:
    """An LLM judge's ratings of generated answers (``evaluation.judge``): per question the trait rating
    (1-5, NaN where the reply was unparsable); ``value`` the mean over parsed replies; ``details``: the
    fluency mean, the unparsable count, and every answer, rating and raw reply."""

    name = "judge"

    def __init__(self, trait: str, config: JudgeConfig):
        self.trait, self.config = trait, config

    def score(self, model: Any, edit: Edit | None, items: Sequence[str],
              persona: PersonaPrompt | None = None) -> Score:
        judged = judge_evaluation(model, self.trait, items, self.config, edit, persona)
        per_item = np.array([r.trait if r is not None else np.nan for r in judged["ratings"]], dtype=float)
        return Score(self.name, judged["judge_trait"], per_item, judged)


METRIC_CLASSES: dict[str, type] = {cls.name: cls for cls in (PreferenceMargin, ProbeKL, GenerationPersonaScore,
                                                             Questionnaire, Statements, Capability, Judge)}
"""Every metric class by its name (``dpn-lens evaluate --metrics`` names all but ``kl``, which every
matched-cost run measures)."""
