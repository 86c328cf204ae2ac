"""Scoring answers from cached questions: the plain path's numbers, the cache left intact, hooks removed.

``PairScorer`` runs each question once into the model's key/value cache and then only the answer
tokens for every edit (``evaluation.answer_cache``). It must give the same margins as the plain path
(whole sequences, the edit masked to the answer positions; ``tests/test_preference.py`` checks that
path against decode-only generation), whatever the edit, padding and batching.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import FailingEdit
from dpn_lens.baselines.caa import ResidualIntervention
from dpn_lens.evaluation.answer_cache import CachedAnswerScorer, answer_cache_bytes
from dpn_lens.evaluation.logprobs import kl_from_reference, log_softmax_rows, token_logprobs
from dpn_lens.evaluation.preference import PairScorer, PreferencePair, preference_margins
from dpn_lens.hooked import encode
from dpn_lens.steering import Intervention

PAIRS = [PreferencePair("what would you do on the weekend ?", "a party with everyone !", "a book at home ."),
         PreferencePair("how do you feel ?", "happy", "i feel quiet and calm today ."),
         PreferencePair("you are outgoing . what would you do on the weekend with your friends ?",
                        "go out and dance", "stay in"),
         PreferencePair("plans ?", "party party party party party", "book")]


def random_edit(model, scale: float = 3.0) -> Intervention:
    generator = torch.Generator().manual_seed(0)
    return Intervention({layer: scale * torch.randn(int(model.cfg.d_mlp), generator=generator) for layer in (1, 2)},
                        "decode", label="random test edit")


def residual_edit(model) -> ResidualIntervention:
    generator = torch.Generator().manual_seed(1)
    return ResidualIntervention(layer=1, vector=2.0 * torch.randn(int(model.cfg.d_model), generator=generator))


@pytest.mark.parametrize("batch_tokens", [4096, 40])   # one batch, and many small ones (padding differs)
def test_cached_margins_equal_the_plain_path_with_and_without_edits(tiny_model, batch_tokens):
    cached = PairScorer(tiny_model, PAIRS, batch_tokens=batch_tokens)
    plain = PairScorer(tiny_model, PAIRS, batch_tokens=batch_tokens, cached=False)
    assert cached.cached is not None and plain.cached is None   # the cached path really runs
    for edit in (None, random_edit(tiny_model), residual_edit(tiny_model)):
        expected = plain.margins(edit)
        np.testing.assert_allclose(cached.margins(edit), expected, atol=1e-5)
    # The edit does move the margins (otherwise equality would prove nothing about where it acts).
    assert np.abs(cached.margins(random_edit(tiny_model)) - cached.margins()).max() > 1e-2


def test_personas_of_different_lengths_give_the_plain_path_numbers(tiny_model):
    personas = ["you love parties .", "you are quiet and like to stay at home with a good book .", "calm .",
                "you are outgoing ."]
    cached = PairScorer(tiny_model, PAIRS, persona=personas, batch_tokens=64)
    plain = PairScorer(tiny_model, PAIRS, persona=personas, cached=False)
    np.testing.assert_allclose(cached.margins(random_edit(tiny_model)), plain.margins(random_edit(tiny_model)),
                               atol=1e-5)


def test_the_functional_api_is_the_scorer(tiny_model):
    edit = random_edit(tiny_model)
    np.testing.assert_array_equal(preference_margins(tiny_model, PAIRS, edit=edit), PairScorer(tiny_model, PAIRS).margins(edit))


def test_each_token_is_scored_and_the_first_comes_from_the_unedited_question(tiny_model):
    contexts = [encode(tiny_model, pair.question) for pair in PAIRS]
    answers = [encode(tiny_model, pair.high_answer, add_bos=False) for pair in PAIRS]
    scorer = CachedAnswerScorer(tiny_model, contexts, answers)
    base, steered = scorer.token_logprobs(), scorer.token_logprobs(random_edit(tiny_model))
    assert [len(scores) for scores in base] == [len(answer) for answer in answers]
    for before, after in zip(base, steered):
        # Decode-only steering: the question pass, which predicts the first answer token, is not edited.
        assert float(before[0]) == float(after[0])
        if len(before) > 1:   # the later tokens come from edited answer positions
            assert (before[1:] - after[1:]).abs().max() > 1e-3


def test_scoring_leaves_the_cached_questions_as_they_were(tiny_model):
    scorer = PairScorer(tiny_model, PAIRS, batch_tokens=40)
    keys = [[layer.keys.clone() for layer in batch.cache.layers] for batch in scorer.cached.batches]
    first = scorer.margins()
    scorer.margins(random_edit(tiny_model))
    scorer.margins(residual_edit(tiny_model))
    np.testing.assert_array_equal(scorer.margins(), first)
    for batch, before in zip(scorer.cached.batches, keys):
        for layer, saved in zip(batch.cache.layers, before):
            assert torch.equal(layer.keys, saved)


def test_hooks_are_removed_after_an_exception(tiny_model):
    scorer = PairScorer(tiny_model, PAIRS)
    before = scorer.margins()
    with pytest.raises(RuntimeError, match="edit failed"):
        scorer.margins(FailingEdit(RuntimeError("edit failed")))
    assert all(not point._forward_hooks for point in tiny_model.hook_dict.values())
    np.testing.assert_array_equal(scorer.margins(), before)


def test_a_model_without_a_cache_is_refused_with_the_fix_and_the_scorer_falls_back(tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="continuation_logprobs"):
        CachedAnswerScorer(object(), [[1]], [[2]])
    monkeypatch.setattr(CachedAnswerScorer, "supported", staticmethod(lambda model: False))
    scorer = PairScorer(tiny_model, PAIRS)
    assert scorer.cached is None
    np.testing.assert_allclose(scorer.margins(), PairScorer(tiny_model, PAIRS, cached=True).margins(), atol=1e-5)


def test_bad_items_are_refused(tiny_model):
    with pytest.raises(ValueError, match="one of each per item"):
        CachedAnswerScorer(tiny_model, [[1], [1]], [[2]])
    with pytest.raises(ValueError, match="non-empty"):
        CachedAnswerScorer(tiny_model, [[1]], [[]])
    with pytest.raises(ValueError, match="batch_tokens"):
        CachedAnswerScorer(tiny_model, [[1]], [[2]], batch_tokens=0)


# ----- the block-wise log-softmax every scorer uses ---------------------------------------------------

@pytest.mark.parametrize("rows", [1, 5, 16, 64])
def test_blockwise_log_softmax_equals_the_whole_tensor_in_float32(rows):
    generator = torch.Generator().manual_seed(0)
    logits = (8 * torch.randn(37, 1000, generator=generator)).to(torch.bfloat16)
    whole = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.randint(0, 1000, (37,), generator=generator)
    assert torch.equal(token_logprobs(logits, targets, rows=rows), whole.gather(1, targets[:, None]).squeeze(1))
    assert torch.equal(log_softmax_rows(logits, rows=rows), whole)
    other = torch.log_softmax((8 * torch.randn(37, 1000, generator=generator)), dim=-1)
    expected = float((other.exp() * (other - whole)).sum(-1).double().sum())
    assert kl_from_reference(other, logits, rows=rows) == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_smollm2_cached_margins_equal_the_plain_path(smollm2):
    """The embedded model in float32, its chat template and a DPN-LE-sized edit: the same margins."""
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for layer in range(10, 20):
        deltas[layer] = torch.zeros(int(smollm2.cfg.d_mlp))
        deltas[layer][torch.randperm(int(smollm2.cfg.d_mlp), generator=generator)[:8]] = 4.0
    edit = Intervention(deltas, "decode", label="test edit")
    cached, plain = PairScorer(smollm2, PAIRS), PairScorer(smollm2, PAIRS, cached=False)
    assert cached.cached is not None
    for chosen in (None, edit):
        np.testing.assert_allclose(cached.margins(chosen), plain.margins(chosen), atol=1e-4)


# ----- memory: one cache row per distinct context, and a budget ------------------------------------------

def _geometry(model) -> dict:
    config = model.original_model.config
    return dict(n_layers=config.num_hidden_layers, n_kv_heads=config.num_key_value_heads,
                head_dim=config.hidden_size // config.num_attention_heads, dtype_bytes=4)


def _stored_bytes(scorer: CachedAnswerScorer) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for batch in scorer.batches if batch.cache is not None
               for layer in batch.cache.layers)


def test_a_pairs_two_answers_share_one_stored_context_row(tiny_model):
    pairs = PairScorer(tiny_model, PAIRS)   # one batch: every pair's two answers together
    (batch,) = pairs.cached.batches
    assert all(layer.keys.shape[0] == len(PAIRS) == len(batch.items) // 2 for layer in batch.cache.layers)
    # The second answer of each pair adds no cache: the high answers alone store the same bytes (one row
    # per item, as before, stored twice as many).
    highs = CachedAnswerScorer(tiny_model, pairs.contexts[0::2], pairs.answers[0::2])
    assert pairs.cached.footprint.kept_bytes == highs.footprint.kept_bytes == _stored_bytes(highs) > 0


def test_a_pairs_two_answers_of_unequal_length_share_a_batch_and_one_run_of_its_question(tiny_model):
    """Many pairs over several batches, each pair's answers of very different lengths: sorted by their own
    lengths alone, the answers of a pair would fall in different batches and each would run the question;
    kept together, each question runs once but where a batch ends between a pair's answers. The margins are
    the plain path's."""
    from dpn_lens.evaluation.answer_cache import answer_batches

    # questions of one length, each pair a long and a one-word answer: by length alone, the long answers
    # fill the first batches and the short ones the last, every pair split
    words = "party book quiet calm work home art travel".split()      # each one token of the tiny vocabulary
    pairs = [PreferencePair(f"how about {word} ?", " ".join([word] * 6), word) for word in words]
    scorer = PairScorer(tiny_model, pairs, batch_tokens=60)
    batches = scorer.cached.batches
    runs = sum(int(batch.context_ids.shape[0]) for batch in batches)
    assert len(batches) >= 3 and runs <= len(pairs) + len(batches) - 1
    # what sorting by length alone would have run: more questions, on these pairs
    contexts, answers = list(map(len, scorer.contexts)), list(map(len, scorer.answers))
    by_length = sum(len({item // 2 for item in chunk}) for chunk in answer_batches(contexts, answers, 60))
    assert runs < by_length
    np.testing.assert_allclose(scorer.margins(random_edit(tiny_model)),
                               PairScorer(tiny_model, pairs, cached=False).margins(random_edit(tiny_model)), atol=1e-5)


@pytest.mark.parametrize("batch_tokens", [4096, 40])
@pytest.mark.parametrize("budget", [None, 0, 3000])
def test_the_predicted_footprint_is_the_measured_one(tiny_model, batch_tokens, budget):
    pair_scorer = PairScorer(tiny_model, PAIRS, batch_tokens=batch_tokens, cache_bytes=budget)
    predicted = answer_cache_bytes([len(c) for c in pair_scorer.contexts], [len(a) for a in pair_scorer.answers],
                                   batch_tokens, **_geometry(tiny_model),
                                   context_keys=[i // 2 for i in range(2 * len(PAIRS))], cache_bytes=budget)
    if budget == 0:     # nothing kept: the contexts run in the first pass that needs them, not at construction
        assert pair_scorer.cached.footprint.all_bytes == 0
        assert all(batch.first_logprobs is None for batch in pair_scorer.cached.batches)
        pair_scorer.margins()
    assert predicted == pair_scorer.cached.footprint
    assert predicted.kept_bytes == _stored_bytes(pair_scorer.cached)


@pytest.mark.parametrize("budget", [0, 3000])   # every batch recomputed, and some of them
def test_a_budget_drops_caches_and_gives_the_same_numbers_to_the_bit(tiny_model, budget):
    kept = PairScorer(tiny_model, PAIRS, batch_tokens=40)
    bounded = PairScorer(tiny_model, PAIRS, batch_tokens=40, cache_bytes=budget)
    bounded.margins()       # (with budget 0 the caches' sizes are known once the contexts ran)
    footprint = bounded.cached.footprint
    assert footprint.kept_bytes <= budget and footprint.recomputed > 0
    assert footprint.all_bytes == kept.cached.footprint.kept_bytes and kept.cached.footprint.recomputed == 0
    if budget:
        assert 0 < footprint.kept_bytes and footprint.recomputed < footprint.batches   # a real mix
    stored = [[(layer.keys.clone(), layer.values.clone()) for layer in batch.cache.layers]
              for batch in bounded.cached.batches if batch.cache is not None]
    for edit in (None, random_edit(tiny_model), residual_edit(tiny_model)):
        np.testing.assert_array_equal(bounded.margins(edit), kept.margins(edit))
        for ours, theirs in zip(bounded.cached.token_logprobs(edit), kept.cached.token_logprobs(edit)):
            assert torch.equal(ours, theirs)
    # Scoring (and recomputing) leaves the kept caches as they were.
    for batch, before in zip([b for b in bounded.cached.batches if b.cache is not None], stored):
        for layer, (keys, values) in zip(batch.cache.layers, before):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


@pytest.mark.parametrize("budget", [0, 3000])
def test_the_gradient_pass_with_a_budget_gives_the_same_gradients_to_the_bit(tiny_model, budget):
    from dpn_lens.effect.gradients import margin_gradients

    full = margin_gradients(tiny_model, PAIRS, batch_tokens=40, cache_bytes=None)      # every cache kept
    bounded = margin_gradients(tiny_model, PAIRS, batch_tokens=40, cache_bytes=budget)
    assert full.per_pair.abs().max() > 0
    assert torch.equal(bounded.per_pair, full.per_pair)


def test_the_gradient_passes_recompute_the_dropped_questions(tiny_model, monkeypatch):
    from dpn_lens.effect import gradients

    scorers = []
    real = gradients._question_cache
    monkeypatch.setattr(gradients, "_question_cache", lambda *args: scorers.append(real(*args)) or scorers[-1])
    runs = []
    real_pass = CachedAnswerScorer._context_pass
    monkeypatch.setattr(CachedAnswerScorer, "_context_pass", lambda self, *args: runs.append(1) or real_pass(self, *args))
    gradients.margin_gradients(tiny_model, PAIRS, batch_tokens=40)          # the default keeps no cache
    assert scorers[0].footprint.kept_bytes == 0 and scorers[0].footprint.recomputed == len(scorers[0].batches) > 1
    assert len(runs) == len(scorers[0].batches)           # each batch's questions ran once: in the pass, not before


def test_a_batch_that_will_not_be_kept_does_not_run_its_questions_at_construction(tiny_model, monkeypatch):
    """Under a budget, a batch's cache size is predicted from the first batch's bytes per token: the ones
    past the budget run their questions only in the passes, so building the scorer runs only the first
    batch and the kept ones, and the sizes it predicted are those the passes measure."""
    runs = []
    real_pass = CachedAnswerScorer._context_pass
    monkeypatch.setattr(CachedAnswerScorer, "_context_pass", lambda self, *args: runs.append(1) or real_pass(self, *args))
    bounded = PairScorer(tiny_model, PAIRS, batch_tokens=40, cache_bytes=3000).cached
    batches = bounded.batches
    dropped = [batch for batch in batches[1:] if batch.cache is None]
    assert dropped and any(batch.cache is not None for batch in batches)          # a real mix
    built = 1 + sum(batch.cache is not None for batch in batches[1:])
    assert len(runs) == built
    assert all(batch.first_logprobs is None and batch.cache_bytes > 0 for batch in dropped)
    predicted = [batch.cache_bytes for batch in batches]
    bounded.mean_logprobs()                                 # each batch not kept runs its questions once
    assert [batch.cache_bytes for batch in batches] == predicted
    assert len(runs) == built + sum(batch.cache is None for batch in batches)


def test_a_negative_budget_is_refused(tiny_model):
    with pytest.raises(ValueError, match="cache_bytes must be at least 0"):
        CachedAnswerScorer(tiny_model, [[1]], [[2]], cache_bytes=-1)
