"""Running statistics: exact merges, numerical stability, O(n_layers x d_mlp) memory.

The reference everywhere is numpy on the raw rows (``mean`` and ``var(ddof=...)`` in float64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dpn_lens.collection.statistics import ContrastStatistics, GroupStatistics

N_LAYERS, D_MLP = 2, 3


def one_pass(rows: np.ndarray) -> GroupStatistics:
    stats = GroupStatistics.empty(*rows.shape[1:])
    stats.update(torch.from_numpy(rows))
    return stats


def variance_atol(rows: np.ndarray) -> float:
    """Rounding floor of any float64 variance of these rows.

    Means are known to a few ulps of the largest value; that error enters the variance once per
    unit of spread (cross terms of Chan's merge) and once squared.
    """
    ulp = 16 * np.finfo(np.float64).eps * float(np.abs(rows).max())
    return ulp * float(np.ptp(rows)) + ulp**2


def assert_matches_numpy(stats: GroupStatistics, rows: np.ndarray) -> None:
    assert stats.count == rows.shape[0]
    scale = float(np.abs(rows).max())
    np.testing.assert_allclose(stats.mean.numpy(), rows.mean(axis=0), rtol=1e-12, atol=1e-14 * scale)
    if rows.shape[0] >= 2:
        reference = rows.var(axis=0, ddof=1)
        np.testing.assert_allclose(stats.variance().numpy(), reference, rtol=1e-7, atol=variance_atol(rows))


def split_points(n: int, cuts: list[int]) -> list[int]:
    return sorted({0, n, *[c % (n + 1) for c in cuts]})


def test_update_in_batches_equals_numpy_mean_and_unbiased_variance():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(37, N_LAYERS, D_MLP))
    stats = GroupStatistics.empty(N_LAYERS, D_MLP)
    for start in range(0, 37, 5):
        stats.update(torch.from_numpy(rows[start:start + 5]))
    assert_matches_numpy(stats, rows)
    np.testing.assert_allclose(stats.variance(unbiased=False).numpy(), rows.var(axis=0, ddof=0), rtol=1e-12)


def test_merge_of_two_shards_equals_one_pass():
    rng = np.random.default_rng(1)
    rows = rng.normal(3.0, 2.0, size=(50, N_LAYERS, D_MLP))
    merged = one_pass(rows[:17]).merge(one_pass(rows[17:]))
    single = one_pass(rows)
    assert merged.count == single.count
    torch.testing.assert_close(merged.mean, single.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.m2, single.m2, rtol=1e-10, atol=1e-10)


def test_merging_with_an_empty_shard_changes_nothing():
    rows = np.random.default_rng(2).normal(size=(8, N_LAYERS, D_MLP))
    stats = one_pass(rows)
    empty = GroupStatistics.empty(N_LAYERS, D_MLP)
    for merged in (stats.merge(empty), empty.merge(stats)):
        assert merged.count == 8
        torch.testing.assert_close(merged.mean, stats.mean, rtol=0, atol=1e-15)
        torch.testing.assert_close(merged.m2, stats.m2, rtol=1e-14, atol=1e-14)


def test_contrast_statistics_merge_equals_one_pass_and_refuses_mismatched_shards():
    rng = np.random.default_rng(3)
    high, low = rng.normal(1, 1, size=(20, N_LAYERS, D_MLP)), rng.normal(0, 1, size=(30, N_LAYERS, D_MLP))
    shard_a = ContrastStatistics("openness", one_pass(high[:7]), one_pass(low[:11]), layers=[0, 1])
    shard_b = ContrastStatistics("openness", one_pass(high[7:]), one_pass(low[11:]), layers=[0, 1])
    merged = shard_a.merge(shard_b)
    assert_matches_numpy(merged.high, high)
    assert_matches_numpy(merged.low, low)
    other_layers = ContrastStatistics("openness", one_pass(high), one_pass(low), layers=[1, 2])
    with pytest.raises(ValueError, match="differ in layers"):
        shard_a.merge(other_layers)


def test_statistics_size_does_not_grow_with_the_number_of_samples():
    def nbytes(stats: GroupStatistics) -> int:
        return sum(t.element_size() * t.numel() for t in (stats.mean, stats.m2))

    rng = np.random.default_rng(4)
    small, large = GroupStatistics.empty(4, 48), GroupStatistics.empty(4, 48)
    small.update(torch.from_numpy(rng.normal(size=(10, 4, 48))))
    for _ in range(10):
        large.update(torch.from_numpy(rng.normal(size=(100, 4, 48))))
    assert (small.count, large.count) == (10, 1000)
    assert nbytes(small) == nbytes(large) == 2 * 4 * 48 * 8
    assert [f for f in vars(large)] == ["count", "mean", "m2"]  # no hidden buffer of rows


def test_update_refuses_nan_and_inf_naming_the_fix():
    stats = GroupStatistics.empty(N_LAYERS, D_MLP)
    for bad in (float("nan"), float("inf")):
        rows = torch.zeros(4, N_LAYERS, D_MLP)
        rows[2, 1, 0] = bad
        with pytest.raises(FloatingPointError, match="non-finite.*float32"):
            stats.update(rows)
    assert stats.count == 0  # a refused batch leaves the statistics as they were


def test_update_refuses_wrong_shapes():
    stats = GroupStatistics.empty(N_LAYERS, D_MLP)
    with pytest.raises(ValueError, match=r"expected activations of shape \[batch, 2, 3\]"):
        stats.update(torch.zeros(4, D_MLP))
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(GroupStatistics.empty(N_LAYERS, D_MLP + 1))


def test_variance_needs_two_samples():
    stats = one_pass(np.ones((1, N_LAYERS, D_MLP)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.variance()


def test_contrast_statistics_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    stats = ContrastStatistics("neuroticism", one_pass(rng.normal(size=(5, N_LAYERS, D_MLP))),
                               one_pass(rng.normal(size=(6, N_LAYERS, D_MLP))), layers=[3, 4],
                               fingerprint={"n_layers": 8}, source="unit test")
    loaded = ContrastStatistics.load(stats.save(tmp_path / "stats.safetensors"))
    assert (loaded.trait, loaded.layers, loaded.fingerprint, loaded.source) == ("neuroticism", [3, 4], {"n_layers": 8}, "unit test")
    for group in ("high", "low"):
        a, b = getattr(stats, group), getattr(loaded, group)
        assert a.count == b.count and torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)


# ---------------------------------------------------------------- property-based tests (hypothesis)

row_counts = st.integers(min_value=2, max_value=40)


@st.composite
def activation_rows(draw, offset_choices=(0.0, 1e6, -1e6, 3.5), scale_choices=(1.0, 1e-3, 1e-6, 50.0)):
    """Random activations, including a large common offset and a tiny spread (the hard case)."""
    n = draw(row_counts)
    offset = draw(st.sampled_from(offset_choices))
    scale = draw(st.sampled_from(scale_choices))
    noise = draw(arrays(np.float64, (n, N_LAYERS, D_MLP),
                        elements=st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False)))
    return offset + scale * noise


@settings(max_examples=60, deadline=None)
@given(rows=activation_rows(), cuts=st.lists(st.integers(0, 1000), max_size=6))
def test_property_agrees_with_numpy_for_any_batching(rows, cuts):
    points = split_points(rows.shape[0], cuts)
    stats = GroupStatistics.empty(N_LAYERS, D_MLP)
    for start, stop in zip(points, points[1:]):
        stats.update(torch.from_numpy(rows[start:stop]))
    assert_matches_numpy(stats, rows)


@settings(max_examples=60, deadline=None)
@given(rows=activation_rows(), cuts=st.lists(st.integers(0, 1000), max_size=6), seed=st.integers(0, 2**32 - 1))
def test_property_merging_shards_in_any_order_equals_one_pass(rows, cuts, seed):
    points = split_points(rows.shape[0], cuts)
    shards = [one_pass(rows[a:b]) if b > a else GroupStatistics.empty(N_LAYERS, D_MLP) for a, b in zip(points, points[1:])]
    order = np.random.default_rng(seed).permutation(len(shards))
    merged = GroupStatistics.empty(N_LAYERS, D_MLP)
    for index in order:
        merged = merged.merge(shards[index])
    single = one_pass(rows)
    assert merged.count == single.count
    torch.testing.assert_close(merged.mean, single.mean, rtol=1e-12, atol=1e-14 * float(np.abs(rows).max()))
    torch.testing.assert_close(merged.variance(), single.variance(), rtol=1e-7, atol=variance_atol(rows))


@settings(max_examples=40, deadline=None)
@given(rows=activation_rows(), seed=st.integers(0, 2**32 - 1), batch_size=st.integers(1, 9))
def test_property_invariant_to_sample_order_and_batch_size(rows, seed, batch_size):
    shuffled = rows[np.random.default_rng(seed).permutation(rows.shape[0])]
    stats = GroupStatistics.empty(N_LAYERS, D_MLP)
    for start in range(0, shuffled.shape[0], batch_size):
        stats.update(torch.from_numpy(shuffled[start:start + batch_size]))
    single = one_pass(rows)
    torch.testing.assert_close(stats.mean, single.mean, rtol=1e-12, atol=1e-14 * float(np.abs(rows).max()))
    torch.testing.assert_close(stats.variance(), single.variance(), rtol=1e-7, atol=variance_atol(rows))


def test_large_offset_tiny_variance_where_the_naive_formula_fails():
    """Offset 1e6, spread 1e-6: E[x^2]-E[x]^2 loses every digit; the running statistics do not."""
    rng = np.random.default_rng(6)
    rows = 1e6 + 1e-6 * rng.normal(size=(200, N_LAYERS, D_MLP))
    stats = GroupStatistics.empty(N_LAYERS, D_MLP)
    for start in range(0, 200, 7):
        stats.update(torch.from_numpy(rows[start:start + 7]))
    reference = rows.var(axis=0, ddof=1)
    naive = (rows**2).mean(axis=0) - rows.mean(axis=0) ** 2
    assert np.abs(naive - reference * 199 / 200).max() > 1e3 * reference.max()  # the naive way is useless here
    np.testing.assert_allclose(stats.variance().numpy(), reference, rtol=1e-7, atol=variance_atol(rows))
    np.testing.assert_allclose(stats.variance().numpy(), reference, rtol=1e-3)  # 0.1%, where naive is off 1000x
