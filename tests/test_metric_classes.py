"""The metric classes of ``evaluation.metrics``: one ``score(model, edit, items)`` each, the same numbers as the
scoring code they stand in front of, and their preparation kept only while the items stay the same."""

import numpy as np
import pytest

from dpn_lens.evaluation import metrics as metrics_module
from dpn_lens.evaluation.calibrate import KLProbe, probe_chunks
from dpn_lens.evaluation.generation_check import generated_answers, persona_scores
from dpn_lens.evaluation.metrics import (METRIC_CLASSES, GenerationPersonaScore, PreferenceMargin, ProbeKL,
                                         Questionnaire, Score, Statements)
from dpn_lens.evaluation.preference import PreferencePair
from dpn_lens.evaluation.trait import IPIPItem, Statement, agreement_summary
from dpn_lens.steering import steering_intervention
from helpers import build_letter_model, make_map
from dpn_lens.models import model_fingerprint

PAIRS = [PreferencePair("what would you do on a free day ?", "a party with friends !", "a quiet book ."),
         PreferencePair("how do you plan ?", "i make a list .", "i do not plan ."),
         PreferencePair("what now ?", "we go out !", "i stay home .")]


def _edit(model, gamma=2.0):
    neuron_map = make_map("extraversion", {1: [0, 3, 5], 2: [2]}, {1: [11], 2: [4, 6]}, [1, 2],
                          n_layers=int(model.cfg.n_layers), d_mlp=int(model.cfg.d_mlp),
                          fingerprint=model_fingerprint(model).to_dict())
    return steering_intervention(neuron_map, gamma, "increase")


def test_every_metric_class_is_registered_under_its_name_and_scores():
    assert set(METRIC_CLASSES) == {"preference", "kl", "generation", "questionnaire", "statements", "capability",
                                   "judge"}
    for name, cls in METRIC_CLASSES.items():
        assert cls.name == name and callable(getattr(cls, "score"))


def test_the_preference_margin_equals_the_uncached_scorer_and_prepares_once_per_item_set(tiny_model, monkeypatch):
    edit = _edit(tiny_model)
    margin = PreferenceMargin()
    built = []
    real = metrics_module.PairScorer

    def counting(*args, **kwargs):
        built.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "PairScorer", counting)
    base, steered = margin.score(tiny_model, None, PAIRS), margin.score(tiny_model, edit, PAIRS)
    assert isinstance(steered, Score) and steered.metric == "preference" and steered.per_item.shape == (3,)
    # the questions ran once for both edits; the whole-sequence path gives the same margins
    assert len(built) == 1
    plain = real(tiny_model, PAIRS, cached=False)
    np.testing.assert_allclose(base.per_item, plain.margins(), atol=1e-5)
    np.testing.assert_allclose(steered.per_item, plain.margins(edit), atol=1e-5)
    assert steered.value == pytest.approx(steered.per_item.mean())
    assert not np.allclose(steered.per_item, base.per_item)   # the edit moved something
    # other pairs, or a persona, prepare anew; coming back to the first pairs prepares again
    margin.score(tiny_model, None, PAIRS[:2])
    personas = ["you are outgoing ."] * 3
    with_persona = margin.score(tiny_model, None, PAIRS, persona=personas)
    np.testing.assert_allclose(with_persona.per_item, real(tiny_model, PAIRS, persona=personas, cached=False).margins(),
                               atol=1e-5)
    margin.score(tiny_model, edit, PAIRS)
    assert len(built) == 4


def test_the_probe_kl_is_the_kl_probe_and_zero_for_a_zero_edit(tiny_model):
    chunks = probe_chunks(tiny_model, n_chunks=2, chunk_tokens=16)
    metric = ProbeKL()
    edit = _edit(tiny_model, 4.0)
    score = metric.score(tiny_model, edit, chunks)
    kl, ppl = KLProbe(tiny_model, chunks)(edit)
    assert score.value == pytest.approx(kl, abs=1e-7) and score.details["ppl"] == pytest.approx(ppl)
    assert score.value > 0 and score.per_item is None
    assert metric.score(tiny_model, 0.0 * edit, chunks).value == pytest.approx(0.0, abs=1e-6)
    assert metric.probe(tiny_model, chunks) is metric.probe(tiny_model, [list(c) for c in chunks])


def test_the_generation_score_scores_the_answers_generated_under_the_edit(tiny_model):
    questions = ["what would you do ?", "how do you plan ?"]
    highs, lows = ["you are outgoing ."] * 2, ["you are quiet ."] * 2
    metric = GenerationPersonaScore(highs, lows, max_new_tokens=4)
    edit = _edit(tiny_model, 8.0)
    score = metric.score(tiny_model, edit, questions)
    answers = generated_answers(tiny_model, questions, edit, 4)
    assert score.details["answers"] == answers
    np.testing.assert_allclose(score.per_item, persona_scores(tiny_model, questions, answers, highs, lows))
    with pytest.raises(ValueError, match="one of each per question"):
        GenerationPersonaScore(highs[:1], lows[:1]).score(tiny_model, None, questions)


def test_questionnaire_and_statements_give_per_item_values_and_their_summary(tmp_path):
    letter_model = build_letter_model(tmp_path / "letters")   # a vocabulary with the answer letters and Yes/No
    items = [IPIPItem("E1", "extraversion", 1, "i am the life of the party ."),
             IPIPItem("E2", "extraversion", -1, "i keep in the background .")]
    answers = Questionnaire().score(letter_model, None, items)
    assert answers.per_item.shape == (2,) and np.all((answers.per_item >= 1) & (answers.per_item <= 5))
    # a reverse-keyed item is scored 6 - raw
    assert answers.per_item[1] == pytest.approx(6 - answers.details["raw"][1])
    statements = [Statement("extraversion", "i like parties", "is this you ? i like parties", True),
                  Statement("extraversion", "i like quiet", "is this you ? i like quiet", False)]
    agreement = Statements().score(letter_model, None, statements)
    assert agreement.value == pytest.approx(agreement_summary(agreement.per_item, statements)["gap"])
    assert agreement.value == pytest.approx(agreement.per_item[0] - agreement.per_item[1])
