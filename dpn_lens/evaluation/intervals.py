"""Confidence intervals and paired tests for per-item effects (a margin per question, a score per item).

Every number the trait evaluation reports comes with a 95% percentile-bootstrap interval over items
and a paired test, and can be put beside the persona prompt's own effect on the same items
(``fraction_recovered``). The bootstrap is SciPy's (``scipy.stats.bootstrap``, percentile method,
seeded), so an interval is reproducible and checkable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats

__all__ = ["Interval", "bootstrap_ci", "PairedEffect", "paired_effect", "draws_effect", "shift_verdict", "Fraction",
           "fraction_recovered"]


class Interval(NamedTuple):
    """A confidence interval ``(low, high)``."""

    low: float
    high: float


def _as_items(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one value per item (1-D), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or Inf; drop those items first")
    return array


def _check_bootstrap(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")


def bootstrap_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> Interval:
    """Percentile-bootstrap interval of the mean over items (``scipy.stats.bootstrap``, seeded).

    Fewer than two items give ``(nan, nan)``: one item says nothing about the spread.

    Example:
        >>> low, high = bootstrap_ci([0.1, 0.3, 0.2, 0.5, 0.4, 0.3])
        >>> bool(0.1 < low < 0.3 < high < 0.5)
        True
    """
    array = _as_items(values, "values")
    _check_bootstrap(confidence, n_resamples)
    if array.size < 2:
        return Interval(math.nan, math.nan)
    result = stats.bootstrap((array,), np.mean, n_resamples=n_resamples, vectorized=True, method="percentile",
                             confidence_level=confidence, rng=np.random.default_rng(seed))
    return Interval(float(result.confidence_interval.low), float(result.confidence_interval.high))


@dataclass(frozen=True)
class PairedEffect:
    """The mean per-item change ``steered - baseline`` with its interval and paired tests.

    Attributes:
        shift: mean of the per-item differences.
        ci_low, ci_high: percentile-bootstrap interval of ``shift`` (``confidence``, over items).
        p_value: two-sided Wilcoxon signed-rank test of the differences (no normality assumed;
            zero differences dropped, SciPy's default).
        p_t: two-sided paired t-test, for reference.
        n: number of items.
        z: ``shift / standard error`` (the paired t statistic).
    """

    shift: float
    ci_low: float
    ci_high: float
    p_value: float
    p_t: float
    n: int
    z: float
    confidence: float = 0.95

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return bool(self.ci_low > 0 or self.ci_high < 0)

    def __str__(self) -> str:
        return (f"{self.shift:+.4f} [{self.ci_low:+.4f}, {self.ci_high:+.4f}] "
                f"p={self.p_value:.2g} z={self.z:+.2f} n={self.n}")


def shift_verdict(ci_low: float, ci_high: float) -> str:
    """What a signed shift's interval says (positive = moved as asked).

    The verdict follows the bootstrap interval, not the paired test's p printed beside it (the two can
    disagree near p = 0.05), so an interval that includes 0 is named as such rather than "not significant".

    Example:
        >>> shift_verdict(0.01, 0.05), shift_verdict(-0.05, -0.01), shift_verdict(-0.01, 0.02)
        ('moved as asked', 'moved the wrong way', 'CI includes 0')
    """
    return "moved as asked" if ci_low > 0 else "moved the wrong way" if ci_high < 0 else "CI includes 0"


def paired_effect(steered: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                  confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> PairedEffect:
    """The effect of a change measured on the same items before (``baseline``) and after (``steered``).

    Example:
        >>> effect = paired_effect([1.2, 0.9, 1.4, 1.1, 1.3, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
        >>> round(effect.shift, 3), effect.n
        (0.15, 6)
    """
    steered, baseline = _as_items(steered, "steered"), _as_items(baseline, "baseline")
    if steered.shape != baseline.shape:
        raise ValueError(f"steered has {steered.size} items but baseline has {baseline.size}; pass the same items")
    diff = steered - baseline
    n = int(diff.size)
    if n == 0:
        raise ValueError("no items given")
    low, high = bootstrap_ci(diff, confidence, n_resamples, seed)
    shift = float(diff.mean())
    sd = float(diff.std(ddof=1)) if n > 1 else math.nan
    if n > 1 and sd > 0:
        z = shift / (sd / math.sqrt(n))
        p_t = float(stats.ttest_1samp(diff, 0.0).pvalue)
    else:
        z = math.nan if n < 2 or shift == 0 else math.copysign(math.inf, shift)
        p_t = math.nan
    p_value = float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    return PairedEffect(shift, low, high, p_value, p_t, n, z, confidence)


def draws_effect(differences: np.ndarray, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
                 ) -> PairedEffect:
    """The mean of per-item differences measured under several random draws, with an interval over draws AND items.

    ``differences[d, i]`` is item ``i``'s change under draw ``d`` (e.g. one random set of neurons). One
    draw can flip sign between seeds, so an interval over items alone says too little; this one is a
    two-level percentile bootstrap: each resample draws the draws with replacement and, independently,
    the items with replacement, and takes the mean over that cross product. ``p_value`` (Wilcoxon) and
    ``z`` read the per-item means over draws; ``n`` counts items.

    Example:
        >>> effect = draws_effect(np.array([[0.1, 0.2, 0.3, 0.2], [0.0, 0.1, 0.2, 0.1]]))
        >>> round(effect.shift, 3), effect.n
        (0.15, 4)
    """
    array = np.asarray(differences, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"differences must be [n_draws, n_items], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("differences hold NaN or Inf; drop those items first")
    _check_bootstrap(confidence, n_resamples)
    n_draws, n_items = array.shape
    per_item = array.mean(0)
    rng = np.random.default_rng(seed)
    # Resample counts instead of index arrays: the mean over a resampled cross product is
    # (draw counts) @ differences @ (item counts) / (n_draws * n_items).
    draw_counts = rng.multinomial(n_draws, np.full(n_draws, 1 / n_draws), size=n_resamples)
    item_counts = rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=n_resamples)
    means = np.einsum("bd,di,bi->b", draw_counts, array, item_counts) / (n_draws * n_items)
    alpha = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(means, [alpha, 1 - alpha])) if n_items > 1 else (math.nan, math.nan)
    shift = float(array.mean())
    spread = float(means.std(ddof=1)) if n_items > 1 else math.nan
    z = shift / spread if spread and spread > 0 else (math.nan if shift == 0 else math.copysign(math.inf, shift))
    p_t = float(stats.ttest_1samp(per_item, 0.0).pvalue) if n_items > 1 and per_item.std() > 0 else math.nan
    p_value = float(stats.wilcoxon(per_item).pvalue) if np.any(per_item != 0) else 1.0
    return PairedEffect(shift, low, high, p_value, p_t, n_items, z, confidence)


@dataclass(frozen=True)
class Fraction:
    """A ratio of mean effects with its percentile-bootstrap interval (items resampled in pairs)."""

    value: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.ci_low:.2f}, {self.ci_high:.2f}]"


def fraction_recovered(effect: Sequence[float] | np.ndarray, persona_effect: Sequence[float] | np.ndarray,
                       confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> Fraction:
    """``mean(effect) / mean(persona_effect)``: how much of the persona prompt's effect an edit recovers.

    Both are per-item differences from the same baseline on the same items (``steered - baseline`` and
    ``persona - baseline``); the bootstrap resamples items, keeping each item's two values together.
    The ratio is unstable when the persona effect's interval includes 0: check that first.

    Example:
        >>> round(fraction_recovered([0.1, 0.2, 0.3, 0.2], [0.4, 0.4, 0.6, 0.2]).value, 3)
        0.5
    """
    effect, persona_effect = _as_items(effect, "effect"), _as_items(persona_effect, "persona_effect")
    if effect.shape != persona_effect.shape:
        raise ValueError(f"effect has {effect.size} items but persona_effect has {persona_effect.size}; "
                         "pass the same items")
    _check_bootstrap(confidence, n_resamples)
    if effect.size == 0:
        raise ValueError("no items given")
    if persona_effect.mean() == 0:
        raise ValueError("the persona effect's mean is 0; a fraction of it is undefined")
    value = float(effect.mean() / persona_effect.mean())
    if effect.size < 2:
        return Fraction(value, math.nan, math.nan, confidence)

    def ratio(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(a, axis=axis) / np.mean(b, axis=axis)

    with np.errstate(divide="ignore", invalid="ignore"):
        result = stats.bootstrap((effect, persona_effect), ratio, n_resamples=n_resamples, vectorized=True,
                                 paired=True, method="percentile", confidence_level=confidence,
                                 rng=np.random.default_rng(seed))
    return Fraction(value, float(result.confidence_interval.low), float(result.confidence_interval.high), confidence)
