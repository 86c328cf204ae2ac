"""Dense steering baselines built from a DPN-LE neuron map's statistics (no dual criterion)."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from einops import rearrange

from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.steering import Intervention, Positions, additive_intervention, direction_sign

__all__ = ["dense_intervention", "topk_intervention"]


def dense_intervention(neuron_map: NeuronMap, gamma: float = 1.0,
                       direction: Literal["increase", "decrease"] = "increase",
                       layers: Sequence[int] | None = None, positions: Positions = "decode") -> Intervention:
    """``h += ±gamma * s`` on every neuron of ``layers`` (default: the map's layers).

    Example:
        >>> edit = dense_intervention(neuron_map, gamma=1.0)   # doctest: +SKIP
        >>> edit.n_edited == len(neuron_map.layers) * model.cfg.d_mlp   # doctest: +SKIP
        True
    """
    direction_sign(direction)
    chosen = list(neuron_map.layers if layers is None else layers)
    missing = [layer for layer in chosen if layer not in neuron_map.stat_layers]
    if missing:
        raise ValueError(f"layers {missing} have no statistics in the map (it covers {neuron_map.stat_layers})")
    every_neuron = torch.arange(neuron_map.d_mlp)
    return additive_intervention(neuron_map.steering_value, neuron_map.stat_layers,
                                 {layer: every_neuron for layer in chosen}, gamma, direction, positions=positions,
                                 hook_template=neuron_map.hook_name,
                                 label=f"dense {neuron_map.trait} {direction} gamma={gamma:g}")


def topk_intervention(neuron_map: NeuronMap, gamma: float = 1.0,
                      direction: Literal["increase", "decrease"] = "increase", k: int | None = None,
                      positions: Positions = "decode") -> Intervention:
    """``h += ±gamma * s`` on the ``k`` neurons of the map's layers with the largest |Cohen's d|.

    ``k`` defaults to the number of neurons DPN-LE edits (both poles), so the two differ only in
    which neurons they pick: one criterion (|d|) instead of the dual one (|s| quantile and d).

    Example:
        >>> topk_intervention(neuron_map).n_edited == neuron_map.n_selected()   # doctest: +SKIP
        True
    """
    direction_sign(direction)
    layers = list(neuron_map.layers)
    rows = [neuron_map.stat_layers.index(layer) for layer in layers]
    k = neuron_map.n_selected() if k is None else int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1 (the DPN-LE map selects {neuron_map.n_selected()} neurons)")
    d = rearrange(neuron_map.effect_size[rows].abs(), "layer neuron -> (layer neuron)")
    if k > d.numel():
        raise ValueError(f"k={k} exceeds the {d.numel()} neurons of layers {layers[0]}-{layers[-1]}")
    # One global top-k over all searched layers, then back to a (layer, neuron) mask.
    chosen = torch.zeros(d.numel(), dtype=torch.bool)
    chosen[torch.topk(d, k).indices] = True
    chosen = rearrange(chosen, "(layer neuron) -> layer neuron", layer=len(layers))
    neurons = {layer: torch.nonzero(chosen[row]).flatten() for row, layer in enumerate(layers)}
    return additive_intervention(neuron_map.steering_value, neuron_map.stat_layers, neurons, gamma, direction,
                                 positions=positions, hook_template=neuron_map.hook_name,
                                 label=f"top-{k} |d| {neuron_map.trait} {direction} gamma={gamma:g}")
