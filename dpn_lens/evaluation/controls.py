"""Controls for a steering comparison: does the choice of neurons matter?

``random_neuron_control`` keeps an edit's delta values, layers and per-layer counts and moves the
values onto uniformly random neurons; an effect the real edit has and this control lacks is due to
which neurons were chosen, not to how much was added where. (The other controls need no builder:
gamma 0 is ``0 * edit``, the positive control is the persona prompt.)
"""

from __future__ import annotations

import torch

from dpn_lens.effect.frozen_norm import NormAwareEdit
from dpn_lens.steering import Intervention

__all__ = ["random_neuron_control"]


def random_neuron_control(intervention: "Intervention | NormAwareEdit", seed: int = 0
                          ) -> "Intervention | NormAwareEdit":
    """The same delta values on uniformly random neurons of the same layers (same count per layer).

    Per layer, as many distinct neurons as the edit changes are drawn uniformly from all of the
    layer's neurons (so a drawn neuron may happen to be one of the original ones), and the layer's
    nonzero delta values are placed on them in their original order. Positions and hook are kept. A
    frozen-norm or token-scaled edit (``effect.frozen_norm``) gives the same kind of edit of the random neurons.

    Example:
        >>> delta = torch.zeros(8); delta[[1, 2]] = torch.tensor([0.5, -0.25])
        >>> control = random_neuron_control(Intervention({3: delta}, label="edit"), seed=0)
        >>> control.n_edited, sorted(control.deltas[3][control.deltas[3] != 0].tolist())
        (2, [-0.25, 0.5])
    """
    if isinstance(intervention, NormAwareEdit):
        return intervention.on(random_neuron_control(intervention.intervention, seed))  # type: ignore[arg-type]
    if not isinstance(intervention, Intervention):
        raise TypeError(f"random_neuron_control takes an Intervention (a neuron delta), got "
                        f"{type(intervention).__name__}")
    generator = torch.Generator().manual_seed(int(seed))
    deltas = {}
    neurons: set[tuple[int, int]] = set()
    for layer in sorted(intervention.deltas):
        delta = intervention.deltas[layer]
        edited = torch.nonzero(delta).flatten()
        moved = torch.zeros_like(delta)
        targets = torch.randperm(delta.numel(), generator=generator)[:edited.numel()].to(delta.device)
        moved[targets] = delta[edited]
        deltas[layer] = moved
        neurons.update((layer, int(index)) for index in targets)
    label = f"random neurons seed={seed} ({intervention.label or 'custom'})"
    return Intervention(deltas, intervention.positions, intervention.hook_template, label, {"random": neurons})
