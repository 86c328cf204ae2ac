"""Each metric on constructed cases whose answer is known without running the metric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpn_lens.evaluation import capability as cap
from dpn_lens.evaluation import trait
from dpn_lens.hooked import encode
from dpn_lens.steering import Intervention
from helpers import ForceToken, build_letter_model, token


@pytest.fixture(scope="module")
def letter_model(tmp_path_factory):
    return build_letter_model(tmp_path_factory.mktemp("letters"))


ITEMS = [trait.IPIPItem("1", "extraversion", 1, "I am the life of the party."),
         trait.IPIPItem("2", "extraversion", -1, "I am quiet."),
         trait.IPIPItem("3", "openness", 1, "I am the cat."),
         trait.IPIPItem("4", "openness", -1, "I sat on the mat.")]


@pytest.mark.parametrize("letter, raw", [("A", 5.0), ("C", 3.0), ("E", 1.0)])
def test_a_model_forced_to_one_letter_answers_it_and_reverse_keying_mirrors_it(letter_model, letter, raw):
    answers = trait.answer_items(letter_model, ITEMS, edit=ForceToken(token(letter_model, letter)))
    assert np.allclose(answers["raw"], raw, atol=1e-4)
    keys = np.array([i.key for i in ITEMS])
    assert np.allclose(answers["keyed"][keys == 1], raw, atol=1e-4)
    assert np.allclose(answers["keyed"][keys == -1], 6 - raw, atol=1e-4)
    assert np.allclose(answers["mass"], 1.0, atol=1e-4)


def test_questionnaire_scores_average_keyed_items_per_trait(letter_model):
    scores = trait.questionnaire_scores(letter_model, ITEMS, edit=ForceToken(token(letter_model, "A")))
    assert scores == pytest.approx({"extraversion": 3.0, "openness": 3.0}, abs=1e-4)  # (5 + 1) / 2 each


def test_unforced_answer_is_the_expectation_over_the_letter_distribution(letter_model):
    answers = trait.answer_items(letter_model, ITEMS[:1])
    ids = encode(letter_model, trait.questionnaire_prompt(ITEMS[0]))
    logits = letter_model(torch.tensor([ids]))[0, -1]
    letters = torch.softmax(logits[[token(letter_model, l) for l in "ABCDE"]], -1)
    assert answers["raw"][0] == pytest.approx(float((letters * torch.tensor([5., 4, 3, 2, 1])).sum()), abs=1e-5)


def test_statement_agreement_follows_a_forced_yes_or_no(letter_model):
    statements = [trait.Statement("openness", "I am the cat", "Is it ?", True),
                  trait.Statement("openness", "I am quiet", "Is it ?", False)]
    yes = trait.statement_agreement(letter_model, statements, edit=ForceToken(token(letter_model, "Yes")))
    no = trait.statement_agreement(letter_model, statements, edit=ForceToken(token(letter_model, "No")))
    assert yes["high"] == pytest.approx(1.0) and yes["low"] == pytest.approx(1.0) and yes["gap"] == pytest.approx(0.0)
    assert no["high"] == pytest.approx(0.0, abs=1e-6)


def test_statement_yes_keeps_every_statement_batched_equals_one_by_one_and_agreement_is_its_pole_means(letter_model):
    statements = [trait.Statement("openness", t, f"Is it ? {t}", high)
                  for t, high in [("I am the cat", True), ("I am quiet", False), ("the dog ran home", True),
                                  ("I sat on the mat", False), ("I am the life of the party", True)]]
    yes = trait.statement_yes(letter_model, statements, batch_tokens=64)
    alone = np.array([trait.statement_yes(letter_model, [s])[0] for s in statements])
    assert yes.shape == (5,) and np.allclose(yes, alone, atol=1e-5)
    agreement = trait.statement_agreement(letter_model, statements)
    assert agreement["high"] == pytest.approx(yes[[0, 2, 4]].mean(), abs=1e-6)
    assert agreement["low"] == pytest.approx(yes[[1, 3]].mean(), abs=1e-6)
    assert agreement == pytest.approx(trait.agreement_summary(yes, statements))


def test_raising_yes_on_high_statements_and_lowering_it_on_low_ones_is_a_positive_increase_shift():
    high = np.array([True, True, True, False])  # unequal poles: the weights must still give the gap change
    baseline = np.array([0.5, 0.4, 0.6, 0.5])
    steered = baseline + np.array([0.2, 0.1, 0.3, -0.3])
    up = trait.statement_shift_items(steered, baseline, high, sign=1)
    gap_change = (steered[high].mean() - steered[~high].mean()) - (baseline[high].mean() - baseline[~high].mean())
    assert up.mean() == pytest.approx(gap_change) and gap_change == pytest.approx(0.5)
    assert (up > 0).all()  # every statement moved towards the high pole
    assert np.allclose(trait.statement_shift_items(steered, baseline, high, sign=-1), -up)
    assert np.allclose(trait.statement_shift_items(baseline, baseline, high), 0.0)
    with pytest.raises(ValueError, match="both poles"):
        trait.statement_shift_items(steered, baseline, np.ones(4, dtype=bool))


def test_perplexity_equals_a_hand_computed_log_softmax(letter_model):
    chunk = encode(letter_model, "the cat sat on the mat . the dog ran home .", add_bos=False)
    logits = letter_model(torch.tensor([[1] + chunk]))[0].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(chunk)[:, None]).mean()
    assert cap.perplexity(letter_model, [chunk]) == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_batched_perplexity_equals_unbatched(letter_model):
    chunks = [encode(letter_model, t, add_bos=False) for t in ("the cat sat on the mat .", "the dog ran .")]
    nll = [math.log(cap.perplexity(letter_model, [c])) * len(c) for c in chunks]
    together = cap.perplexity(letter_model, chunks)
    assert together == pytest.approx(math.exp(sum(nll) / sum(map(len, chunks))), rel=1e-4)


def test_mc_accuracy_on_items_whose_answer_a_forced_token_decides(letter_model):
    items = [cap.MCItem("the cat sat on", (" yes", " no"), 0), cap.MCItem("the dog", (" no", " yes"), 1),
             cap.MCItem("the mat", (" yes", " no"), 0), cap.MCItem("I am", (" yes", " no"), 1)]
    assert cap.mc_accuracy(letter_model, items, edit=ForceToken(token(letter_model, "yes"))) == 0.75
    assert cap.mc_accuracy(letter_model, items, edit=ForceToken(token(letter_model, "no"))) == 0.25
    multi = [cap.MCItem("the cat", (" yes yes", " no no"), 0), cap.MCItem("the dog", (" no no", " yes yes"), 0)]
    assert cap.mc_accuracy(letter_model, multi, edit=ForceToken(token(letter_model, "yes"))) == 0.5


def test_lambada_counts_a_word_only_if_every_token_is_greedy(letter_model):
    texts = ["the cat sat on the yes", "the dog ran no"]
    assert cap.lambada_accuracy(letter_model, texts, edit=ForceToken(token(letter_model, "yes"))) == 0.5


def test_kl_is_zero_unedited_and_positive_when_steered(letter_model):
    chunks = [encode(letter_model, "the cat sat on the mat . the dog ran home .", add_bos=False)]
    assert cap.kl_divergence(letter_model, chunks) == pytest.approx(0.0, abs=1e-7)
    delta = torch.zeros(48)
    delta[:8] = 3.0
    steered = Intervention({0: delta, 1: delta.clone()}, positions="decode")  # evaluation runs it everywhere
    assert cap.kl_divergence(letter_model, chunks, edit=steered) > 1e-3


def test_option_tokens_that_collide_are_an_error(letter_model):
    with pytest.raises(ValueError, match="share a first token"):
        trait.option_token_ids(letter_model, ["zebra", "unicorn"])  # both unknown -> <unk>


def test_respondent_mae_and_directions_by_hand():
    train = [trait.IPIPItem("1", "extraversion", 1, "x"), trait.IPIPItem("2", "extraversion", -1, "y")]
    test = [trait.IPIPItem("3", "extraversion", 1, "z"), trait.IPIPItem("4", "extraversion", -1, "w")]
    outgoing = trait.Respondent("a", {"1": 5, "2": 1, "3": 4, "4": 2})   # keyed train mean 5 -> increase
    shy = trait.Respondent("b", {"1": 1, "2": 5, "3": 2, "4": 5})        # keyed train mean 1 -> decrease
    assert trait.respondent_directions(outgoing, train) == {"extraversion": "increase"}
    assert trait.respondent_directions(shy, train) == {"extraversion": "decrease"}
    model_answers = {"increase": np.array([5.0, 1.0]), "decrease": np.array([1.0, 5.0])}
    mae = trait.respondent_mae([outgoing, shy], train, test, lambda t, d: model_answers[d])
    assert mae == pytest.approx((1 + 1 + 1 + 0) / 4)


def test_real_data_loaders_read_every_inventory_and_task(shared_data):
    for inventory, count in (("ipip_neo_300", 300), ("ipip_neo_300_test", 180), ("mpi_120", 120),
                             ("ipip_neo_120", 120), ("ipip50", 50)):
        items = trait.load_ipip_items(shared_data, inventory)
        assert len(items) == count and {i.trait for i in items} == set(trait.TRAITS)
    suite = cap.load_capability_suite(shared_data, cap.CapabilitySizes(mc_items=5, lambada_items=3))
    assert set(suite.mc) == set(cap.MC_TASKS) and all(len(v) == 5 for v in suite.mc.values())
    statements = trait.load_statements(shared_data, "openness", 4)
    assert sum(s.high for s in statements) == 4 and len(statements) == 8
    assert len(trait.load_respondents(shared_data / "ipip" / "ipip_neo_300" / "respondents_sample10.json")) == 10


def test_missing_data_folder_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="capability"):
        cap.load_capability_suite(tmp_path)
