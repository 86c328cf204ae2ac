"""Layer-wise distribution of personality neurons: counts, d and s per layer, top neurons.

Example:
    >>> run = Run.load("runs/demo")                                  # doctest: +SKIP
    >>> counts = layer_counts(run.maps)                              # doctest: +SKIP
    >>> counts[0]                                                    # doctest: +SKIP
    {'trait': 'openness', 'pole': 'high', 'layer': 12, 'n': 3, 'fraction': 0.00195}
"""

from __future__ import annotations

from typing import Sequence

import torch

from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.studies.section import ReportSection

__all__ = ["layer_counts", "layer_value_quantiles", "top_neurons", "QUANTILES", "REPORT_SECTION"]

REPORT_SECTION = ReportSection("layers", "Layer-wise study")
"""Where ``dpn-lens report`` shows this study's files (all named ``layers_*``)."""

QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)


def layer_counts(maps: dict[str, NeuronMap]) -> list[dict]:
    """One row per trait, pole and searched layer: the number of selected neurons and their fraction.

    Example:
        >>> rows = layer_counts({"openness": neuron_map})   # doctest: +SKIP
    """
    rows = []
    for trait, neuron_map in maps.items():
        for pole in ("high", "low"):
            for layer in neuron_map.layers:
                n = int(neuron_map.pole(pole)[layer].numel())
                rows.append({"trait": trait, "pole": pole, "layer": layer, "n": n, "fraction": n / neuron_map.d_mlp})
    return rows


def layer_value_quantiles(maps: dict[str, NeuronMap], quantiles: Sequence[float] = QUANTILES) -> list[dict]:
    """Per trait, collected layer and quantity (``d``, ``s``, ``|s|``): quantiles over the layer's neurons.

    Rows also carry ``tau_q`` and whether the layer was searched, so a reader sees where the
    thresholds sit in each layer's distribution.
    """
    rows = []
    probs = torch.tensor(list(quantiles), dtype=torch.float64)
    for trait, neuron_map in maps.items():
        for row, layer in enumerate(neuron_map.stat_layers):
            s, d = neuron_map.steering_value[row].double(), neuron_map.effect_size[row].double()
            for name, values in (("d", d), ("s", s), ("|s|", s.abs())):
                q = torch.quantile(values, probs).tolist()
                entry = {"trait": trait, "layer": layer, "quantity": name, "searched": layer in neuron_map.layers,
                         "tau_q": neuron_map.tau_q.get(layer, float("nan")), "mean": float(values.mean()),
                         "max_abs": float(values.abs().max())}
                entry.update({f"q{round(100 * p, 1):g}": v for p, v in zip(quantiles, q)})
                rows.append(entry)
    return rows


def top_neurons(maps: dict[str, NeuronMap], per_pole: int = 10) -> list[dict]:
    """The ``per_pole`` selected neurons of largest |d| per trait and pole: trait, pole, rank, layer, neuron, d, s."""
    if per_pole < 1:
        raise ValueError(f"per_pole must be at least 1, got {per_pole}")
    rows = []
    for trait, neuron_map in maps.items():
        for pole in ("high", "low"):
            ranked = sorted(neuron_map.neurons(pole), key=lambda r: -abs(r["d"]))[:per_pole]
            rows += [{"trait": trait, "pole": pole, "rank": rank + 1, "layer": r["layer"], "neuron": r["neuron"],
                      "d": r["d"], "s": r["s"], "tau_q": neuron_map.tau_q[r["layer"]]}
                     for rank, r in enumerate(ranked)]
    return rows
