"""A neuron edit's write into the residual stream, held fixed: the edit with the post-MLP norm taken out.

A DPN-LE edit adds ``delta`` to ``blocks.{l}.mlp.hook_post``. On a pre-norm decoder (Llama, Qwen,
SmolLM2) the MLP output is linear in that activation, so the edit adds the fixed vector
``W_out[l] @ delta`` to the residual stream at every edited position. Gemma 3 normalises each MLP output
(``post_feedforward_layernorm``) before it joins the residual stream: the same delta then writes a
vector that depends on the token, shrinks the MLP's own output as it grows, and saturates.

:func:`residual_write` measures what the edit writes after that norm, to first order: for each edited
layer, the central difference of ``hook_mlp_out`` when ``±step * delta`` is added at ``hook_post`` of
that layer alone, averaged over every token of some prompts. :class:`ResidualWrite` adds those vectors,
scaled by ``gamma``, at ``blocks.{l}.hook_resid_post`` (where the MLP output has joined the residual
stream). On a model without a post-MLP norm it is the neuron edit itself (the same logits, up to float
rounding); on Gemma it is the neuron edit with the norm's renormalisation frozen. Comparing the two at the
same KL (method ``attribution-t-resid`` of ``dpn-lens control``) tests whether the norm is what limits
steering by MLP neurons on Gemma.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> from dpn_lens.steering import Intervention
    >>> model = build_tiny_model()
    >>> delta = torch.zeros(48); delta[5] = 1.0
    >>> write = residual_write(model, Intervention({2: delta}), ["what would you do ?"])
    >>> sorted(write.vectors), write.vectors[2].shape, write.n_edited
    ([2], torch.Size([32]), 0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dpn_lens.baselines.caa import ResidualIntervention
from dpn_lens.effect.gradients import MLP_OUT_HOOK
from dpn_lens.hooked import HookedModel, input_device, last_token_batches, read_hooks
from dpn_lens.numbers import as_float
from dpn_lens.steering import Intervention, Maskable, Positions, check_gamma, check_positions, steer

__all__ = ["ResidualWrite", "residual_write"]


@dataclass
class ResidualWrite(Maskable):
    """``resid <- resid + vectors[l]`` at ``blocks.{l}.hook_resid_post`` for every layer ``l`` it holds:
    one CAA-style ``ResidualIntervention`` per layer, which adds each vector (hook, decode check, cast).

    An ``Edit`` like the others (``steer``, ``at_positions``, ``-edit``, ``gamma * edit``); it edits no
    MLP neuron (``n_edited`` is 0), so it has no random-neuron control.

    Example:
        >>> edit = 2.0 * ResidualWrite({1: torch.ones(4)}, label="w")
        >>> edit.vectors[1].tolist(), [name for name, _ in edit.fwd_hooks()]
        ([2.0, 2.0, 2.0, 2.0], ['blocks.1.hook_resid_post'])
    """

    vectors: dict[int, Float[Tensor, "d_model"]]
    positions: Positions = "decode"
    label: str = ""
    _layers: dict[int, ResidualIntervention] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_positions(self.positions)
        for layer, vector in self.vectors.items():
            if vector.ndim != 1 or not torch.isfinite(vector).all():
                raise ValueError(f"the vector of layer {layer} must be one finite [d_model] row; "
                                 f"got shape {list(vector.shape)}")
        self._layers = {layer: ResidualIntervention(layer, vector, self.positions, self.label)
                        for layer, vector in sorted(self.vectors.items())}

    @property
    def n_edited(self) -> int:
        return 0  # it writes residual directions, not MLP neurons

    def at_positions(self, positions: Positions) -> "ResidualWrite":
        """The same vectors added at ``positions`` (``"decode"`` or ``"all"``)."""
        return self if positions == self.positions else self._with(self.vectors, self.label, positions)

    def __neg__(self) -> "ResidualWrite":
        return self._with({layer: -vector for layer, vector in self.vectors.items()}, f"-({self.label})")

    def __mul__(self, gamma: float) -> "ResidualWrite":
        gamma = check_gamma(gamma)
        return self._with({layer: gamma * vector for layer, vector in self.vectors.items()},
                          f"{gamma:g} x ({self.label})")

    __rmul__ = __mul__

    def _with(self, vectors: dict[int, Tensor], label: str, positions: Positions | None = None) -> "ResidualWrite":
        return ResidualWrite(vectors, positions or self.positions, label)

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        return [hook for edit in self._layers.values() for hook in edit.fwd_hooks()]


class _Captured(Exception):
    """Raised by the capturing hook: the rest of the forward pass is not needed."""


def residual_write(model: HookedModel, edit: Intervention, prompts: Sequence[str], step: float = 0.02,
                   batch_size: int = 8) -> ResidualWrite:
    """What ``edit`` writes into the residual stream after each edited layer's MLP, as fixed vectors.

    For each layer ``l`` that ``edit`` changes, ``(mlp_out_l(+step*delta_l) - mlp_out_l(-step*delta_l)) /
    (2*step)``, with the delta added at ``hook_post`` of layer ``l`` alone at every position, averaged over
    every token of ``prompts`` (padding excluded; each pass stops after layer ``l``). Exact for an MLP
    output that is linear in its neurons; with a post-MLP norm, the first-order write at those tokens.

    Args:
        model: a hooked model (float32 gives the cleanest differences).
        edit: a neuron edit on ``mlp.hook_post`` (e.g. ``steering_intervention(map, 1.0, "increase")``);
            the result scales with it, so ``gamma * residual_write(model, edit, ...)`` matches
            ``gamma * edit`` to first order.
        prompts: texts the write is averaged over (rendered as for collection); use selection data, not
            evaluation data.
        step: the central difference's step, as a fraction of the edit.

    Returns:
        A :class:`ResidualWrite` with ``edit``'s positions and one vector per edited layer.
    """
    if not isinstance(edit, Intervention):
        raise TypeError(f"residual_write takes a neuron edit (dpn_lens.steering.Intervention); got {type(edit).__name__}")
    if not prompts:
        raise ValueError("residual_write needs at least one prompt to average the write over")
    step = as_float(step, "step")
    if not step > 0:
        raise ValueError(f"step must be > 0 (a fraction of the edit, e.g. 0.1); got {step}")
    layers = [layer for layer, delta in sorted(edit.deltas.items()) if bool((delta != 0).any())]
    if not layers:
        raise ValueError("the edit changes no neuron, so it writes nothing; build it from a non-empty map")
    totals = {layer: torch.zeros(int(model.cfg.d_model), dtype=torch.float64) for layer in layers}
    n_tokens = 0
    for ids, mask, _ in last_token_batches(model, prompts, batch_size):
        ids, mask = ids.to(input_device(model)), mask.to(input_device(model))
        keep = mask.bool()
        for layer in layers:
            outputs = []
            for sign in (1.0, -1.0):
                nudge = Intervention({layer: sign * step * edit.deltas[layer]}, positions="all",
                                     hook_template=edit.hook_template, label=f"{sign * step:+g} x layer {layer}")

                def capture(output: Tensor, hook: Any) -> Tensor:
                    outputs.append(output.detach().double())
                    raise _Captured

                with torch.no_grad(), steer(model, nudge), read_hooks(model, [(MLP_OUT_HOOK.format(layer=layer), capture)]):
                    try:
                        model(ids, attention_mask=mask)
                    except _Captured:
                        pass
            difference = (outputs[0] - outputs[1]) / (2 * step)
            totals[layer] += difference[keep].sum(0).cpu()
        n_tokens += int(keep.sum())
    vectors = {layer: (total / n_tokens).float() for layer, total in totals.items()}
    return ResidualWrite(vectors, edit.positions, f"residual write of ({edit.label or 'custom'})")
