"""Localization: from contrast statistics to the two mutually exclusive pole sets (docs/METHOD.md, "Localization").

Per layer ``l`` and neuron ``i``:

* steering value ``s = mean(A_high) - mean(A_low)``;
* Cohen's d with pooled unbiased variances, ``+1e-8`` inside the root, NaN -> 0;
* ``tau_q = quantile(|s| over the layer, q)``;
* high-pole neurons ``|s| > tau_q and d > tau_d``; low-pole neurons ``|s| > tau_q and d < -tau_d``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.numbers import as_float
from dpn_lens.localization.settings import REFERENCE_SETTINGS, LocalizationSettings, reference_settings
from dpn_lens.collection.statistics import ContrastStatistics

__all__ = [
    "LocalizationSettings",
    "REFERENCE_SETTINGS",
    "reference_settings",
    "steering_values",
    "cohens_d",
    "select_neurons",
    "layer_separation",
    "propose_settings",
    "chance_bound",
    "pairs_for_bound",
    "locate",
    "reselect",
]

D_EPSILON = 1e-8


def steering_values(stats: ContrastStatistics) -> Float[Tensor, "n_layers d_mlp"]:
    """``s = mean(A_high) - mean(A_low)`` per neuron (float64)."""
    return stats.high.mean - stats.low.mean


def cohens_d(stats: ContrastStatistics) -> Float[Tensor, "n_layers d_mlp"]:
    """Cohen's d with pooled unbiased variances (float64); NaN -> 0.

    A neuron that never varies has ``s = 0`` and so ``d = 0``: it is never selected.
    """
    n_high, n_low = stats.high.count, stats.low.count
    if n_high < 2 or n_low < 2:
        raise ValueError(f"Cohen's d needs at least 2 samples per pole; have {n_high} high and {n_low} low")
    pooled = (stats.high.m2 + stats.low.m2) / (n_high + n_low - 2)  # (n-1)*var == m2
    d = (stats.high.mean - stats.low.mean) / torch.sqrt(pooled + D_EPSILON)
    return torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)


def _quantile(q: Any) -> float:
    """``q`` as a quantile of ``|s|``: a number in [0, 1], else a ValueError naming it."""
    q = as_float(q, "q", "0.995")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q is a quantile of |s|, between 0 and 1 (e.g. 0.995); got {q}")
    return q


def select_neurons(s: Float[Tensor, "d_mlp"], d: Float[Tensor, "d_mlp"], q: float, tau_d: float
                   ) -> tuple[Int[Tensor, "n_high"], Int[Tensor, "n_low"], float]:
    """The dual criterion on one layer: ``(high_indices, low_indices, tau_q)``.

    Example:
        >>> s = torch.tensor([0.0, 2.0, -3.0, 0.1]); d = torch.tensor([0.0, 1.0, -2.0, 0.1])
        >>> high, low, tau = select_neurons(s, d, q=0.5, tau_d=0.5)
        >>> high.tolist(), low.tolist()
        ([1], [2])
    """
    q, tau_d = _quantile(q), as_float(tau_d, "tau_d")
    magnitude = s.abs()
    tau_q = float(torch.quantile(magnitude.to(torch.float64), q))
    passes = magnitude > tau_q
    high = torch.nonzero(passes & (d > tau_d)).flatten()
    low = torch.nonzero(passes & (d < -tau_d)).flatten()
    return high, low, tau_q


def layer_separation(stats: ContrastStatistics) -> Float[Tensor, "n_layers"]:
    """How far apart high and low samples are per layer: the root-mean-square effect size above chance.

    For a neuron without any true effect, ``E[d^2] = 1/n_high + 1/n_low`` (sampling noise alone), so
    ``sqrt(max(0, mean_i d_i^2 - (1/n_high + 1/n_low)))`` estimates the typical true |d| of the
    layer's neurons without the upward bias that a plain mean of |d| has for small samples.
    """
    d = cohens_d(stats)
    noise = 1.0 / stats.high.count + 1.0 / stats.low.count
    return ((d**2).mean(dim=1) - noise).clamp(min=0.0).sqrt()


_TAU_D_LADDER = (0.8, 0.5, 0.3, 0.2)


def chance_bound(n_high: int, n_low: int, n_tests: int) -> float:
    """The |d| that chance alone exceeds somewhere among ``n_tests`` neurons with probability 5%.

    |d| of a pure-noise neuron is about N(0, 1/n_high + 1/n_low); its maximum over ``n_tests``
    neurons stays under z_{1 - 0.05 / n_tests} standard errors with 95% probability (Bonferroni).

    Example:
        >>> round(chance_bound(500, 500, 20 * 1536), 2)
        0.29
    """
    from scipy.stats import norm

    return float(norm.ppf(1 - 0.05 / n_tests) * math.sqrt(1 / n_high + 1 / n_low))


def pairs_for_bound(effect: float, n_tests: int) -> int:
    """The smallest number of pairs (``n`` per pole) whose ``chance_bound(n, n, n_tests)`` lies below ``effect``.

    Example:
        >>> n = pairs_for_bound(0.5, 1536); chance_bound(n, n, 1536) < 0.5 <= chance_bound(n - 1, n - 1, 1536)
        True
    """
    from scipy.stats import norm

    if effect <= 0:
        raise ValueError(f"effect must be positive, got {effect}")
    n = math.floor(2 * (norm.ppf(1 - 0.05 / n_tests) / effect) ** 2) + 1
    while chance_bound(n, n, n_tests) >= effect:   # floating-point edge of the closed form
        n += 1
    return max(n, 2)


def _warn_if_empty(neuron_map: NeuronMap, s: Tensor, d: Tensor, rows: list[int]) -> None:
    """Say so when the dual criterion kept no neuron, and what would give some (an empty map steers nothing)."""
    if neuron_map.n_selected() > 0:
        return
    settings = neuron_map.settings
    candidates = torch.cat([d[row][s[row].abs() > torch.quantile(s[row].abs(), settings.q)].abs() for row in rows])
    strongest = float(candidates.max()) if candidates.numel() else 0.0
    n = neuron_map.n_high_samples
    advice = f"the strongest candidate has |d| = {strongest:.3f} <= tau_d = {settings.tau_d}"
    if strongest > 0:
        needed = pairs_for_bound(strongest, len(rows) * int(s.shape[1]))
        if needed > n:
            advice += (f"; with {n} pairs the chance bound is {chance_bound(n, neuron_map.n_low_samples, len(rows) * int(s.shape[1])):.3f}, "
                       f"and it falls below {strongest:.3f} from about n_pairs={needed}: locate with at least that many")
        advice += f", or pass a tau_d below {strongest:.3f}"
    warnings.warn(f"the {neuron_map.trait} map selects no neurons (layers {settings.layer_range}, q={settings.q}, "
                  f"tau_d={settings.tau_d}): {advice}. Steering with it would change nothing",
                  UserWarning, stacklevel=3)


def propose_settings(stats: ContrastStatistics, q: float = 0.995, separation_fraction: float = 0.5
                     ) -> LocalizationSettings:
    """Derive the layer range and tau_d from the data, for models without reference settings.

    * Layer range: from the first layer whose separation (``layer_separation``) reaches
      ``separation_fraction`` of the best layer's, and after which the median separation stays
      there, to the last collected layer: "where high and low samples start to separate".
    * tau_d: the largest of Cohen's conventional thresholds 0.8 / 0.5 / 0.3 / 0.2 that at least half
      of the candidate (top-|s|) neurons of those layers pass; never below the effect size that
      chance alone would exceed (Bonferroni-corrected normal bound for the sample sizes).

    With few pairs (roughly under 200 per pole) the chance bound is high and the middle layers'
    separation is indistinguishable from zero, so the proposal becomes conservative (often only the
    last layers); pass ``layers``/``tau_d`` to ``locate`` to choose them yourself.

    Returns settings whose ``reason`` says what was chosen and why.
    """
    q = _quantile(q)
    separation_fraction = as_float(separation_fraction, "separation_fraction", "0.5")
    separation = layer_separation(stats)
    peak = float(separation.max())
    floor = separation_fraction * peak
    rows = list(range(len(stats.layers)))
    start = next((row for row in rows
                  if separation[row] >= floor and float(separation[row:].median()) >= floor), rows[-1])
    chosen = stats.layers[start:]
    s, d = steering_values(stats)[start:], cohens_d(stats)[start:]
    candidate_d = torch.cat([d[row][s[row].abs() > torch.quantile(s[row].abs(), q)].abs() for row in range(len(chosen))])
    chance = chance_bound(stats.high.count, stats.low.count, s.numel())
    tau_d = next((t for t in _TAU_D_LADDER if float((candidate_d > t).double().mean()) >= 0.5), _TAU_D_LADDER[-1])
    tau_d = max(tau_d, round(chance, 3))
    reason = (f"layers {chosen[0]}-{chosen[-1]}: separation (RMS effect size above chance) first reaches "
              f"{separation_fraction:.0%} of its peak {peak:.2f} at layer {chosen[0]}; tau_d={tau_d}: largest of "
              f"{_TAU_D_LADDER} passed by half the candidates (chance bound {chance:.3f})")
    return LocalizationSettings(chosen, q, tau_d, "proposed", reason)


def _layer_text(value: Any) -> str:
    """``[3, 4, 5]`` -> ``"3-5"`` (a contiguous range), anything else as ``str``."""
    if isinstance(value, list) and value and value == list(range(value[0], value[-1] + 1)):
        return f"{value[0]}-{value[-1]}"
    return str(value)


def locate(stats: ContrastStatistics, settings: LocalizationSettings | None = None, model_name: str | None = None,
           q: float | None = None, tau_d: float | None = None, layers: Sequence[int] | None = None,
           model_revision: str | None = None, select: str = "dpn-le", model: Any = None,
           budget: int | None = None, **effect_options: Any) -> NeuronMap:
    """Find the trait's high-pole and low-pole neurons and return a ``NeuronMap``.

    Settings are, in order of precedence: ``settings``; the reference settings of ``model_name``;
    settings proposed from the data. ``q``, ``tau_d`` and ``layers`` override single fields.
    The map records ``model_name`` and ``model_revision`` (None: ``weights:<hash>`` from the
    statistics' fingerprint; ``dpn_lens.models.model_revision(model)`` gives the hub commit or GGUF digest).

    ``select`` names the selection rule (``dpn_lens.effect.rules``): ``"dpn-le"`` (the paper's dual
    criterion, default) or an effect rule (``"attribution-t"``, the rule docs/RESULTS.md recommends,
    ``"attribution"``, ``"write"``, ``"write-layer"``, ``"dpn-le-attribution"``), which ranks
    neurons by what their edit does and needs the ``model``;
    ``budget`` is its neuron count (None: the DPN-LE count, at most 0.5% of all MLP neurons) and
    ``effect_options`` go to ``effect.rules.effect_scores`` (``n_pairs``, ``seed``, ``pairs``).

    Example:
        >>> neuron_map = locate(stats)                  # doctest: +SKIP
        >>> neuron_map.n_selected("high"), neuron_map.n_selected("low")   # doctest: +SKIP
        (52, 49)
        >>> locate(stats, select="attribution", model=model).rule          # doctest: +SKIP
        'attribution'
    """
    from dpn_lens.effect.rules import rule_named, select_by_effect

    rule_named(select)
    if select != "dpn-le" and model is None:
        raise ValueError(f"select={select!r} ranks neurons by what editing them does, so it needs the model: "
                         "pass model=... (the model the statistics were collected on)")
    if select == "dpn-le" and (budget is not None or effect_options):
        raise ValueError("budget and effect options apply to effect rules; the dual criterion is set by q and tau_d")
    q = None if q is None else as_float(q, "q", "0.995")
    tau_d = None if tau_d is None else as_float(tau_d, "tau_d", "0.5")
    overrides = {"layers": None if layers is None else list(layers), "q": q, "tau_d": tau_d}
    given = {name: value for name, value in overrides.items() if value is not None}
    if settings is None and len(given) < 3:
        settings = reference_settings(model_name) or propose_settings(stats, q if q is not None else 0.995)
    if given:
        base = settings.__dict__ if settings is not None else {}
        chosen = {name: given.get(name, base.get(name)) for name in ("layers", "q", "tau_d")}
        kept = [f"{name} from {settings.source} settings" for name in chosen if name not in given] if settings else []
        reason = "set by the caller: " + ", ".join(
            f"{name}={_layer_text(value)}" for name, value in given.items()) + (f" ({'; '.join(kept)})" if kept else "")
        settings = LocalizationSettings(chosen["layers"], chosen["q"], chosen["tau_d"], "user", reason)
    missing = [layer for layer in settings.layers if layer not in stats.layers]
    if missing:
        raise ValueError(f"layers {missing} were not collected (statistics cover {stats.layers[0]}..{stats.layers[-1]}); "
                         "collect them or choose layers inside that range")
    s, d = steering_values(stats), cohens_d(stats)
    high: dict[int, Tensor] = {}
    low: dict[int, Tensor] = {}
    thresholds: dict[int, float] = {}
    for layer in settings.layers:
        row = stats.layers.index(layer)
        high[layer], low[layer], thresholds[layer] = select_neurons(s[row], d[row], settings.q, settings.tau_d)
    neuron_map = NeuronMap(
        trait=stats.trait, settings=settings, high=high, low=low, tau_q=thresholds,
        steering_value=s.to(torch.float32), effect_size=d.to(torch.float32), stat_layers=list(stats.layers),
        hook_name=stats.hook_name, fingerprint=dict(stats.fingerprint), n_high_samples=stats.high.count,
        n_low_samples=stats.low.count, token_position=stats.token_position, data_source=stats.source,
        model_name=model_name or "",
        model_revision=model_revision or (f"weights:{stats.fingerprint['weights']}"
                                          if stats.fingerprint.get("weights") else ""),
    )
    _warn_if_empty(neuron_map, s, d, [stats.layers.index(layer) for layer in settings.layers])
    return select_by_effect(model, neuron_map, select, budget, **effect_options)


def reselect(neuron_map: NeuronMap, q: float | None = None, tau_d: float | None = None, k: int | None = None
             ) -> NeuronMap:
    """The same map with its poles re-selected at another ``q`` and/or ``tau_d``: the one way to do it.

    An effect rule's map (``neuron_map.rule != "dpn-le"``) is re-selected at another budget ``k`` instead,
    from its stored scores (``effect.rules.reselect_top``); ``q`` and ``tau_d`` do not apply to it.

    A map keeps ``s`` and ``d`` of every collected layer, so no statistics are needed: the dual
    criterion (``select_neurons``) runs again on the map's searched layers with the new thresholds
    (``None`` keeps the map's own value). The settings record ``source="user"`` and a reason naming
    the new values; everything else (s, d, layers, fingerprint) is kept. Re-selecting at the map's
    own q and tau_d gives back the same poles.

    Example:
        >>> denser = reselect(neuron_map, q=0.97)          # doctest: +SKIP
        >>> denser.n_selected() > neuron_map.n_selected()  # doctest: +SKIP
        True
    """
    if neuron_map.rule != "dpn-le" or k is not None:
        from dpn_lens.effect.rules import reselect_top

        if neuron_map.rule == "dpn-le":
            raise ValueError("k re-selects an effect rule's map; a dpn-le map is re-selected by q and tau_d")
        if q is not None or tau_d is not None or k is None:
            raise ValueError(f"this map was made by the {neuron_map.rule!r} rule, which ranks neurons by effect: "
                             "re-select it with k=<neurons> (q and tau_d belong to the dual criterion)")
        return reselect_top(neuron_map, k)
    # The settings first: they check q and tau_d (numpy and torch scalars in, bool and strings refused).
    settings = dataclasses.replace(neuron_map.settings, q=neuron_map.settings.q if q is None else q,
                                   tau_d=neuron_map.settings.tau_d if tau_d is None else tau_d, source="user")
    new_q, new_tau_d = settings.q, settings.tau_d
    high: dict[int, Tensor] = {}
    low: dict[int, Tensor] = {}
    thresholds: dict[int, float] = {}
    for layer in neuron_map.layers:
        row = neuron_map.stat_layers.index(layer)
        high[layer], low[layer], thresholds[layer] = select_neurons(
            neuron_map.steering_value[row], neuron_map.effect_size[row], new_q, new_tau_d)
    changed = ", ".join(f"{name}={value:g}" for name, value, given in (("q", new_q, q), ("tau_d", new_tau_d, tau_d))
                        if given is not None)
    settings = dataclasses.replace(settings, reason=f"re-selected from the map's s and d: {changed or 'same settings'}")
    result = dataclasses.replace(neuron_map, settings=settings, high=high, low=low, tau_q=thresholds)
    _warn_if_empty(result, neuron_map.steering_value, neuron_map.effect_size,
                   [neuron_map.stat_layers.index(layer) for layer in neuron_map.layers])
    return result
