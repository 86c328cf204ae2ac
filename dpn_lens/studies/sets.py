"""The neuron sets the studies compare, built from a run's maps (``dpn_lens.run.Run``).

A ``NeuronSet`` is one named set of ``(layer, neuron)`` pairs, e.g. the high pole of Openness. Besides
the DPN-LE pole sets read from the maps, ``alternative_sets`` builds sets chosen *without* the dual
criterion from the same s and d, so the studies can show what the criterion changes:

* ``top|d|``: per layer, the ``k`` neurons of largest |d| (``k`` = that layer's DPN-LE budget, high + low),
  split into poles by the sign of d; no magnitude criterion.
* ``|s|-only``: per layer, all neurons with ``|s| > tau_q`` (the same q), split by the sign of s; no
  effect-size criterion.
* ``q=0.97``: the dual criterion with the denser q of the paper's ablation (3% per layer).

The ``NPTI`` sets (``npti_sets``, ``npti_sets_for_run``) are the neurons the NPTI baseline edits: chosen
by activation probability over generated answers under persona prompts, with no sign or magnitude
criterion on s or d. They need the model (the answers are generated), so they cannot come from a run
folder alone; the studies take them as ``extra_sets={"NPTI": ...}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from dpn_lens.baselines.npti import NPTIStatistics, npti_pole_selection, npti_trait_statistics
from dpn_lens.localization.localize import reselect
from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.run import Run

__all__ = ["NeuronSet", "pole_sets", "alternative_sets", "SET_METHODS", "NPTI", "random_layer_matched_set",
           "npti_sets", "npti_sets_for_run"]

SET_METHODS: tuple[str, ...] = ("DPN-LE", "top|d|", "|s|-only", "q=0.97")
"""Set-selection methods the studies compare from a run folder; ``DPN-LE`` is the paper's dual criterion.
(The comparison's edit methods are another list: ``dpn_lens.evaluation.methods``.)"""
NPTI = "NPTI"
"""Method name of the NPTI sets (``npti_sets``); not in ``SET_METHODS`` because they need the model."""


@dataclass
class NeuronSet:
    """A named set of MLP neurons: ``neurons[layer]`` holds sorted neuron indices of that layer.

    Example:
        >>> a = NeuronSet("a", {3: torch.tensor([1, 5])}, d_mlp=8, trait="openness", pole="high")
        >>> a.size, sorted(a.pairs())
        (2, [(3, 1), (3, 5)])
    """

    name: str
    neurons: dict[int, Int[Tensor, "n"]]
    d_mlp: int
    trait: str = ""
    pole: str = ""
    method: str = "DPN-LE"

    def __post_init__(self) -> None:
        cleaned = {}
        for layer, indices in self.neurons.items():
            indices = torch.as_tensor(indices, dtype=torch.long).flatten().unique(sorted=True)
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.d_mlp):
                raise ValueError(f"set {self.name!r}: layer {layer} has neuron indices outside 0..{self.d_mlp - 1}")
            cleaned[int(layer)] = indices
        self.neurons = dict(sorted(cleaned.items()))

    @property
    def layers(self) -> list[int]:
        return list(self.neurons)

    @property
    def size(self) -> int:
        return sum(int(indices.numel()) for indices in self.neurons.values())

    def layer_size(self, layer: int) -> int:
        return int(self.neurons[layer].numel()) if layer in self.neurons else 0

    def pairs(self, layers: Iterable[int] | None = None) -> set[tuple[int, int]]:
        """``{(layer, neuron)}``, optionally restricted to ``layers``."""
        keep = None if layers is None else set(layers)
        return {(layer, int(i)) for layer, indices in self.neurons.items()
                if keep is None or layer in keep for i in indices.tolist()}

    def mask(self, layer: int) -> Tensor:
        """Boolean ``[d_mlp]`` membership of one layer."""
        result = torch.zeros(self.d_mlp, dtype=torch.bool)
        if layer in self.neurons:
            result[self.neurons[layer]] = True
        return result

    def __repr__(self) -> str:
        return f"NeuronSet({self.name!r}, size={self.size}, layers={len(self.neurons)})"


def pole_sets(neuron_map: NeuronMap) -> list[NeuronSet]:
    """The DPN-LE high and low sets of a map, named ``"<trait> high"`` / ``"<trait> low"``."""
    return [NeuronSet(f"{neuron_map.trait} {pole}", neuron_map.pole(pole), neuron_map.d_mlp,
                      neuron_map.trait, pole, "DPN-LE") for pole in ("high", "low")]


def _rows(neuron_map: NeuronMap) -> list[tuple[int, int]]:
    return [(layer, neuron_map.stat_layers.index(layer)) for layer in neuron_map.layers]


def _reselected_poles(neuron_map: NeuronMap, q: float) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """High and low poles of the dual criterion at another ``q`` (``localize.reselect``).

    The studies have always re-selected on s and d upcast to float64 (the maps store float32), so
    the map is upcast before ``reselect``: the q sets, and the tables built from them, stay the same.
    """
    as_float64 = dataclasses.replace(neuron_map, steering_value=neuron_map.steering_value.double(),
                                     effect_size=neuron_map.effect_size.double())
    reselected = reselect(as_float64, q=q)
    return dict(reselected.high), dict(reselected.low)


def alternative_sets(neuron_map: NeuronMap, method: str) -> list[NeuronSet]:
    """High and low sets of ``neuron_map``'s trait chosen by ``method`` (see the module docstring).

    ``method`` is one of ``SET_METHODS``, or ``"q=<value>"`` for the dual criterion at another q.

    Example:
        >>> high, low = alternative_sets(neuron_map, "top|d|")   # doctest: +SKIP
    """
    if method == "DPN-LE":
        return pole_sets(neuron_map)
    if method.upper() == NPTI:
        raise ValueError(f"unknown set method {method!r} for a run folder alone: the NPTI sets need the model "
                         "(generated answers); build them with npti_sets_for_run(model, run)")
    if method not in ("top|d|", "|s|-only") and not method.startswith("q="):
        raise ValueError(f"unknown set method {method!r}; use one of {', '.join(SET_METHODS)}")
    if method.startswith("q="):
        return _named_sets(neuron_map, method, *_reselected_poles(neuron_map, float(method[2:])))
    high: dict[int, Tensor] = {}
    low: dict[int, Tensor] = {}
    for layer, row in _rows(neuron_map):
        s, d = neuron_map.steering_value[row].double(), neuron_map.effect_size[row].double()
        if method == "top|d|":
            budget = int(neuron_map.high[layer].numel() + neuron_map.low[layer].numel())
            top = torch.argsort(d.abs(), descending=True, stable=True)[:budget]
            high[layer], low[layer] = top[d[top] > 0], top[d[top] < 0]
        else:  # |s|-only
            passes = s.abs() > neuron_map.tau_q[layer]
            high[layer] = torch.nonzero(passes & (s > 0)).flatten()
            low[layer] = torch.nonzero(passes & (s < 0)).flatten()
    return _named_sets(neuron_map, method, high, low)


def _named_sets(neuron_map: NeuronMap, method: str, high: dict[int, Tensor], low: dict[int, Tensor]
                ) -> list[NeuronSet]:
    return [NeuronSet(f"{neuron_map.trait} {pole} [{method}]", sets, neuron_map.d_mlp, neuron_map.trait, pole, method)
            for pole, sets in (("high", high), ("low", low))]


def random_layer_matched_set(reference: NeuronSet, generator: torch.Generator, name: str = "") -> NeuronSet:
    """A uniformly random set with the same number of neurons in each layer as ``reference``."""
    neurons = {layer: torch.randperm(reference.d_mlp, generator=generator)[:indices.numel()]
               for layer, indices in reference.neurons.items()}
    return NeuronSet(name or f"random ~ {reference.name}", neurons, reference.d_mlp, reference.trait,
                     reference.pole, "random")


def npti_sets(stats: NPTIStatistics, layers: Sequence[int] | None = None, top: int | None = None,
              min_diff: float = 0.1) -> list[NeuronSet]:
    """The high and low NPTI sets of ``stats.trait``: the neurons ``npti_intervention`` boosts when it
    increases the trait (high) and when it decreases it (low), method ``"NPTI"``.

    The selection (``npti_pole_selection``: top ``scaled_top_count`` by ``P_high - P_low`` over *all*
    layers, extended while the difference is >= ``min_diff``) is NPTI's own; ``layers`` only restricts
    the result afterwards to those layers (each kept as a key, empty or not), e.g. to the layers a run
    collected statistics at, which the exclusivity and edit-cost studies need. The neurons NPTI picks
    in other layers are dropped, not replaced.

    Args:
        stats: ``npti_statistics`` of the trait, ``p_high`` etc. ``[n_layers, d_mlp]`` over all layers.
        layers: model layers to keep (default: all ``n_layers``).
        top, min_diff: as in ``npti_intervention`` (defaults: the scaled top-2000 and 0.1).

    Example:
        >>> stats = NPTIStatistics("openness", torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([[0.1, 0.8, 0.5]]),
        ...                        torch.ones(1, 3), torch.ones(1, 3), 10, 10)
        >>> high, low = npti_sets(stats, top=1)
        >>> high.pairs(), low.pairs(), high.method
        ({(0, 0)}, {(0, 1)}, 'NPTI')
    """
    n_layers, d_mlp = stats.p_high.shape
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the NPTI statistics cover layers 0..{n_layers - 1}")
    result = []
    for pole, flat in zip(("high", "low"), npti_pole_selection(stats, top, min_diff)):
        neurons = {layer: flat[flat // d_mlp == layer] % d_mlp for layer in layers}
        result.append(NeuronSet(f"{stats.trait} {pole} [{NPTI}]", neurons, int(d_mlp), stats.trait, pole, NPTI))
    return result


def npti_sets_for_run(model: Any, run: Run, n_prompts: int = 16, new_tokens: int = 24, seed: int = 7,
                      top: int | None = None, log: Callable[[str], None] | None = None) -> list[NeuronSet]:
    """NPTI high and low sets of every trait of ``run``, from answers ``model`` generates.

    The statistics are ``npti_trait_statistics(model, trait, n_prompts, new_tokens, seed)``, as in
    ``dpn-lens compare``. Each trait's sets keep only the layers its map
    collected statistics at (``stat_layers``; all layers unless the run was located with fewer), where
    the studies can look up the neurons' d, s and mean activations.

    Returns:
        ``[<trait 1> high, <trait 1> low, <trait 2> high, ...]``, method ``"NPTI"``; pass them to the
        studies as ``extra_sets={"NPTI": sets}``.

    Example:
        >>> sets = npti_sets_for_run(model, Run.load("runs/demo"), n_prompts=16)        # doctest: +SKIP
        >>> overlap_study_report(run, "figures", extra_sets={"NPTI": sets})             # doctest: +SKIP
    """
    for neuron_map in run.maps.values():
        neuron_map.check_compatible(model)
    sets: list[NeuronSet] = []
    for trait, neuron_map in run.maps.items():
        if log:
            log(f"NPTI: generating {n_prompts} + {n_prompts} answers of {new_tokens} tokens for {trait}")
        stats = npti_trait_statistics(model, trait, n_prompts, new_tokens, seed)
        sets += npti_sets(stats, neuron_map.stat_layers, top)
    return sets
