"""Constructed neuron maps and statistics with known pole sets, for the studies' tests."""

from __future__ import annotations

import torch

from dpn_lens import ContrastStatistics, GroupStatistics, LocalizationSettings, NeuronMap

FINGERPRINT = {"architecture": "Constructed", "n_layers": 6, "d_mlp": 20, "d_model": 8, "tokenizer": "t", "weights": "w"}


def make_map(trait: str, high: dict[int, list[int]], low: dict[int, list[int]], layers: list[int],
             n_layers: int = 6, d_mlp: int = 20, tau_d: float = 0.5, fingerprint: dict | None = None) -> NeuronMap:
    """A map whose pole sets are exactly ``high`` / ``low``; s and d agree with them (high: +, low: -)."""
    s = torch.zeros(n_layers, d_mlp)
    d = torch.zeros(n_layers, d_mlp)
    for layer, indices in high.items():
        s[layer, indices], d[layer, indices] = 1.0, 2.0
    for layer, indices in low.items():
        s[layer, indices], d[layer, indices] = -1.0, -2.0
    return NeuronMap(
        trait=trait, settings=LocalizationSettings(layers, 0.9, tau_d),
        high={l: torch.tensor(high.get(l, []), dtype=torch.long) for l in layers},
        low={l: torch.tensor(low.get(l, []), dtype=torch.long) for l in layers},
        tau_q={l: 0.5 for l in layers}, steering_value=s, cohens_d=d, stat_layers=list(range(n_layers)),
        fingerprint=dict(fingerprint or FINGERPRINT), n_high_samples=10, n_low_samples=10)


def make_stats(trait: str, mean_high: torch.Tensor, mean_low: torch.Tensor, variance: float = 1.0, n: int = 10
               ) -> ContrastStatistics:
    """Statistics with the given per-neuron means and one shared variance."""
    m2 = torch.full_like(mean_high, variance * (n - 1), dtype=torch.float64)
    return ContrastStatistics(trait, GroupStatistics(n, mean_high.double(), m2),
                              GroupStatistics(n, mean_low.double(), m2.clone()),
                              list(range(mean_high.shape[0])), fingerprint=dict(FINGERPRINT))


def random_stats(trait: str, seed: int, n_layers: int = 6, d_mlp: int = 200, n: int = 40) -> ContrastStatistics:
    """Random statistics (for located maps with realistic s/d spreads)."""
    generator = torch.Generator().manual_seed(seed)
    mean_high = torch.randn(n_layers, d_mlp, generator=generator, dtype=torch.float64)
    mean_low = mean_high + 0.3 * torch.randn(n_layers, d_mlp, generator=generator, dtype=torch.float64)
    m2 = (n - 1) * (torch.rand(n_layers, d_mlp, generator=generator, dtype=torch.float64) + 0.05)
    fingerprint = dict(FINGERPRINT, n_layers=n_layers, d_mlp=d_mlp)
    return ContrastStatistics(trait, GroupStatistics(n, mean_high, m2), GroupStatistics(n, mean_low, m2.clone()),
                              list(range(n_layers)), fingerprint=fingerprint)
