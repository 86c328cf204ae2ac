"""Collection of MLP activation statistics through hook points (tiny random Llama)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpn_lens.collection.collect import CollectionConfig
from dpn_lens import ContrastiveSet, cohens_d, collect_group_statistics, collect_statistics, steering_values
from helpers import attached_hooks, numpy_s_and_d, random_prompts, raw_last_token_activations

LAYERS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def varied_pairs():
    """12 pairs whose prompts range from 3 to 25 words, so every batch is padded."""
    return ContrastiveSet("openness", random_prompts(0, 12), random_prompts(1, 12), source="tests")


@pytest.fixture(scope="module")
def unbatched(tiny_model, varied_pairs):
    return collect_statistics(tiny_model, varied_pairs, CollectionConfig(max_batch_size=1, progress=False))


def test_s_and_d_equal_an_independent_numpy_computation_on_raw_activations(tiny_model, varied_pairs):
    stats = collect_statistics(tiny_model, varied_pairs, CollectionConfig(max_batch_size=4, progress=False))
    high = raw_last_token_activations(tiny_model, varied_pairs.high, LAYERS)
    low = raw_last_token_activations(tiny_model, varied_pairs.low, LAYERS)
    s, d = numpy_s_and_d(high, low)
    assert np.abs(d).max() > 0.3  # a real signal is being compared, not zeros
    np.testing.assert_allclose(steering_values(stats).numpy(), s, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cohens_d(stats).numpy(), d, rtol=0, atol=1e-6)
    np.testing.assert_allclose(stats.high.variance().numpy(), high.var(axis=0, ddof=1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [3, 12])
def test_batched_equals_unbatched(tiny_model, varied_pairs, unbatched, padding_side, batch_size):
    batched = collect_statistics(tiny_model, varied_pairs,
                                 CollectionConfig(max_batch_size=batch_size, padding_side=padding_side, progress=False))
    for group in ("high", "low"):
        a, b = getattr(batched, group), getattr(unbatched, group)
        assert a.count == b.count == 12
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.m2, b.m2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cohens_d(batched), cohens_d(unbatched), rtol=0, atol=1e-5)


def test_token_budget_batches_equal_unbatched(tiny_model, varied_pairs, unbatched):
    """Batches formed by the token budget (not the count) give the same numbers."""
    batched = collect_statistics(tiny_model, varied_pairs,
                                 CollectionConfig(max_batch_size=64, max_batch_tokens=60, progress=False))
    torch.testing.assert_close(batched.high.mean, unbatched.high.mean, rtol=0, atol=1e-6)


def test_mean_position_equals_numpy_mean_over_prompt_tokens(tiny_model):
    prompts = random_prompts(2, 5)
    stats = collect_group_statistics(tiny_model, prompts,
                                     CollectionConfig(layers=[2], token_position="mean", max_batch_size=5,
                                                      progress=False))
    rows = []
    for prompt in prompts:
        _, cache = tiny_model.run_with_cache(torch.tensor([tiny_model.tokenizer(prompt)["input_ids"]]),
                                             names_filter="blocks.2.mlp.hook_post")
        rows.append(cache["blocks.2.mlp.hook_post"][0].double().mean(dim=0).numpy())
    np.testing.assert_allclose(stats.mean[0].numpy(), np.mean(rows, axis=0), rtol=0, atol=1e-6)


def test_a_subset_of_layers_gives_the_same_rows_as_all_layers(tiny_model, varied_pairs, unbatched):
    subset = collect_statistics(tiny_model, varied_pairs,
                                CollectionConfig(layers=[1, 3], max_batch_size=1, progress=False))
    assert subset.layers == [1, 3]
    torch.testing.assert_close(subset.high.mean, unbatched.high.mean[[1, 3]], rtol=0, atol=1e-7)


def test_statistics_size_is_independent_of_the_number_of_prompts(tiny_model):
    def nbytes(stats) -> int:
        return sum(t.element_size() * t.numel() for g in (stats.high, stats.low) for t in (g.mean, g.m2))

    few = collect_statistics(tiny_model, ContrastiveSet("openness", random_prompts(3, 10), random_prompts(4, 10)),
                             CollectionConfig(max_batch_size=10, progress=False))
    many = collect_statistics(tiny_model, ContrastiveSet("openness", random_prompts(5, 200), random_prompts(6, 200)),
                              CollectionConfig(max_batch_size=50, progress=False))
    assert (few.high.count, many.high.count) == (10, 200)
    assert nbytes(few) == nbytes(many) == 2 * 2 * len(LAYERS) * int(tiny_model.cfg.d_mlp) * 8


def test_collection_records_what_produced_it(tiny_model, tiny_pairs):
    stats = collect_statistics(tiny_model, tiny_pairs, CollectionConfig(progress=False))
    assert stats.trait == "extraversion" and stats.layers == LAYERS and stats.source == "tests"
    assert stats.hook_name == "blocks.{layer}.mlp.hook_post" and stats.token_position == "last"
    assert stats.fingerprint["d_mlp"] == 48 and stats.fingerprint["n_layers"] == 4


def test_collection_leaves_no_hooks_behind(tiny_model, tiny_pairs):
    before = attached_hooks(tiny_model)
    collect_statistics(tiny_model, tiny_pairs, CollectionConfig(layers=[1, 2], progress=False))
    assert attached_hooks(tiny_model) == before


def test_a_tokenizer_without_pad_token_gives_the_same_statistics(tiny_model, tiny_pairs):
    """Pads are masked and never read, so the pad id (pad, else EOS, else 0) cannot matter."""
    tokenizer = tiny_model.tokenizer
    reference = collect_statistics(tiny_model, tiny_pairs, CollectionConfig(max_batch_size=6, progress=False))
    saved = tokenizer.pad_token, tokenizer.eos_token
    try:
        tokenizer.pad_token = None
        assert tokenizer.pad_token_id is None
        without_pad = collect_statistics(tiny_model, tiny_pairs, CollectionConfig(max_batch_size=6, progress=False))
        tokenizer.eos_token = None
        assert tokenizer.eos_token_id is None
        without_pad_or_eos = collect_statistics(tiny_model, tiny_pairs,
                                                CollectionConfig(max_batch_size=6, padding_side="left", progress=False))
    finally:
        tokenizer.pad_token, tokenizer.eos_token = saved
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)
    for other in (without_pad, without_pad_or_eos):
        torch.testing.assert_close(other.high.mean, reference.high.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(other.low.m2, reference.low.m2, rtol=1e-5, atol=1e-6)
