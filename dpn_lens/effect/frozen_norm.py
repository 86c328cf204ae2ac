"""Neuron edits shaped by the post-MLP norm: the frozen-norm write and the token-scaled edit.

Gemma 3 normalises each MLP output before it joins the residual stream:
``mlp_out = g * x / rms(x)`` with ``x = W_out @ a`` (``a`` = ``mlp.hook_post``). Adding ``delta`` to ``a``
(the DPN-LE edit) then changes ``mlp_out`` by about ``g * (W_out @ delta) / rms(x)``, less its projection on
the token's own output direction, and by less and less as ``rms(x + W_out @ delta)`` grows
(``effect.residual_write`` measured that it loses about three quarters of what attribution-t's neurons
write on Gemma). ``rms(x)`` differs from token to token: on Gemma 3 270M by 2x between the 5th and 95th
percentile and up to 100x overall, so the same delta writes 100x more at some tokens than at others.

* :class:`FrozenNormEdit` writes the neuron edit with the norm's scale frozen: at each edited position it
  adds ``g * (W_out @ delta) / rms(x)`` to ``hook_mlp_out``, ``rms(x)`` being the token's own unedited
  MLP output scale. Not an activation edit (no activation change produces it through the norm).
* :class:`TokenScaledEdit` is an activation edit of the same neurons: each position's delta is scaled
  by ``rms(x) / reference`` at ``hook_post``, so through the norm the edit writes about the same vector
  at every token, ``g * (W_out @ delta) / reference`` to first order (less its projection on the token's
  own output).

Both edit only the chosen neurons' output weights' directions, so their random-neuron control is the
same kind of edit of random neurons (``evaluation.controls.random_neuron_control``). On a model without
a post-MLP norm (Llama, Qwen, SmolLM2) :func:`frozen_norm_edit` and :func:`token_scaled_edit` return the
neuron edit itself.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> from dpn_lens.steering import Intervention
    >>> model = build_tiny_model()     # Llama-style: no post-MLP norm
    >>> delta = torch.zeros(48); delta[5] = 1.0
    >>> edit = Intervention({2: delta})
    >>> frozen_norm_edit(model, edit) is edit
    True
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dpn_lens.effect.gradients import MLP_OUT_HOOK
from dpn_lens.hooked import HOOK_NAME, down_proj_weight, hook_name, post_mlp_norm, read_hooks
from dpn_lens.steering import Intervention, Maskable, Positions

__all__ = ["FrozenNorm", "NormAwareEdit", "FrozenNormEdit", "TokenScaledEdit", "frozen_norm_edit", "frozen_norms",
           "reference_scales", "token_scales", "token_scaled_edit"]


@dataclass(frozen=True)
class FrozenNorm:
    """One layer's post-MLP RMS norm, as the frozen write needs it.

    Attributes:
        down: ``W_out``, the ``down_proj`` weight ``[d_model, d_mlp]`` (the model's own tensor, not a copy).
        gain: the norm's per-channel gain ``g`` (``1 + weight`` on Gemma), float32.
        eps: the norm's epsilon, inside the square root.
    """

    down: Float[Tensor, "d_model d_mlp"]
    gain: Float[Tensor, "d_model"]
    eps: float

    def inverse_scale(self, activation: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... 1"]:
        """``1 / rms(W_out @ a)`` per position: the factor the norm applies to this token's MLP output."""
        output = torch.nn.functional.linear(activation.float(), self.down.to(activation.device, torch.float32))
        return torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + self.eps)


def _norm_of(norm: Any, down: Tensor, layer: int) -> FrozenNorm:
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    if eps is None:
        raise ValueError(f"layer {layer}'s post-MLP norm ({type(norm).__name__}) has no `eps` or `variance_epsilon`; "
                         "the frozen-norm edit supports RMS norms (Gemma 2/3)")
    with torch.no_grad():
        # ones have rms 1, so norm(ones) = g / sqrt(1 + eps), whatever the gain's parametrisation (Gemma: 1 + w).
        ones = torch.ones(1, down.shape[0], device=down.device, dtype=down.dtype)
        gain = norm(ones)[0].float() * math.sqrt(1.0 + float(eps))
    return FrozenNorm(down, gain.detach(), float(eps))


def frozen_norms(model: Any, layers: list[int]) -> dict[int, FrozenNorm]:
    """``{layer: FrozenNorm}`` for those of ``layers`` whose MLP output passes a post-MLP norm (none on Llama)."""
    norms = {}
    for layer in layers:
        norm = post_mlp_norm(model, layer)
        if norm is not None:
            norms[layer] = _norm_of(norm, down_proj_weight(model, layer, "the frozen-norm edit"), layer)
    return norms


@dataclass
class NormAwareEdit(Maskable):
    """A neuron edit shaped by the post-MLP norm of its layers: the common part of :class:`FrozenNormEdit`
    and :class:`TokenScaledEdit`. Positions, fingerprint and the neuron count are the intervention's;
    ``gamma * edit``, ``-edit``, ``at_positions`` and ``on`` (another intervention, e.g. random neurons)
    act on it and keep the norms."""

    intervention: Intervention
    norms: dict[int, FrozenNorm]

    kind = "norm-aware"

    def __post_init__(self) -> None:
        if not isinstance(self.intervention, Intervention):
            raise TypeError(f"{type(self).__name__} takes a neuron edit (dpn_lens.steering.Intervention); got "
                            f"{type(self.intervention).__name__}")
        if self.norms and self.intervention.hook_template != HOOK_NAME:
            raise ValueError(f"a {self.kind} edit needs deltas on {HOOK_NAME} (the down projection's input); "
                             f"this edit hooks {self.intervention.hook_template}")

    # the intervention's identity: steer's checks (fingerprint, empty map) and the tables read these
    @property
    def label(self) -> str:
        return f"{self.kind} ({self.intervention.label or 'custom'})"

    @property
    def positions(self) -> Positions:
        return self.intervention.positions

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.intervention.fingerprint

    @property
    def map_neurons(self) -> int | None:
        return self.intervention.map_neurons

    @property
    def n_edited(self) -> int:
        return self.intervention.n_edited

    def on(self, intervention: Intervention) -> Any:
        """The same edit around another neuron edit (e.g. its random-neuron control)."""
        return dataclasses.replace(self, intervention=intervention)

    def at_positions(self, positions: Positions) -> Any:
        return self if positions == self.positions else self.on(self.intervention.at_positions(positions))

    def __neg__(self) -> Any:
        return self.on(-self.intervention)

    def __mul__(self, gamma: float) -> Any:
        return self.on(gamma * self.intervention)

    __rmul__ = __mul__

    def _edits_here(self, activation: Tensor) -> bool:
        """Whether this pass is one the edit changes (a decode-only edit leaves the prompt pass alone)."""
        return not (self.positions == "decode" and activation.shape[1] != 1)


@dataclass
class FrozenNormEdit(NormAwareEdit):
    """``intervention`` written through the post-MLP norm with the norm's scale frozen at each token.

    On each layer in ``norms`` it adds ``gain * (W_out @ delta) / rms(W_out @ a)`` to ``hook_mlp_out``,
    ``a`` being that position's unedited ``hook_post``; on other edited layers it adds ``delta`` to
    ``hook_post`` as the neuron edit does. Positions, label, fingerprint and the neuron count are the
    intervention's; ``gamma * edit``, ``-edit`` and ``at_positions`` act on it.

    Example:
        >>> delta = torch.zeros(48); delta[5] = 1.0
        >>> norm = FrozenNorm(torch.ones(32, 48), torch.ones(32), 1e-6)
        >>> edit = 2.0 * FrozenNormEdit(Intervention({2: delta}, label="e"), {2: norm})
        >>> edit.n_edited, edit.write(2)[:2].tolist(), [name for name, _ in edit.fwd_hooks()]
        (1, [2.0, 2.0], ['blocks.2.mlp.hook_post', 'blocks.2.hook_mlp_out'])
    """

    _writes: dict[tuple[int, Any], Tensor] = field(default_factory=dict, init=False, repr=False)
    kind = "frozen-norm"

    def write(self, layer: int) -> Float[Tensor, "d_model"]:
        """``gain * (W_out @ delta)`` of ``layer``, float32: what the edit adds there, before the 1/rms."""
        norm, delta = self.norms[layer], self.intervention.deltas[layer]
        return norm.gain * (norm.down.float() @ delta.to(norm.down.device, torch.float32))

    def _write_like(self, layer: int, device: Any) -> Tensor:
        key = (layer, device)
        if key not in self._writes:
            with torch.no_grad():
                self._writes[key] = self.write(layer).to(device)
        return self._writes[key]

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        """``hook_post`` reads each position's scale; ``hook_mlp_out`` adds the frozen write with it."""
        hooks = []
        # Intervention.fwd_hooks gives one hook per layer, in sorted layer order.
        for layer, (name, hook) in zip(sorted(self.intervention.deltas), self.intervention.fwd_hooks()):
            if layer not in self.norms:
                hooks.append((name, hook))   # no post-MLP norm here: the neuron edit itself
                continue
            scales: list[Tensor] = []   # the scale of the pass in flight, read by the hook_mlp_out hook

            def read_scale(activation: Tensor, hook: Any, layer: int = layer, scales: list = scales) -> Tensor:
                scales.clear()
                if self._edits_here(activation):
                    scales.append(self.norms[layer].inverse_scale(activation))
                return activation

            def add_write(output: Tensor, hook: Any, layer: int = layer, scales: list = scales) -> Tensor:
                if not scales:   # a pass the edit leaves alone (the prompt pass of a decode-only edit)
                    return output
                scale = scales.pop()
                return output + (scale * self._write_like(layer, output.device)).to(output.dtype)

            hooks += [(hook_name(layer, self.intervention.hook_template), read_scale),
                      (MLP_OUT_HOOK.format(layer=layer), add_write)]
        return hooks


@dataclass
class TokenScaledEdit(NormAwareEdit):
    """``intervention`` with each position's delta scaled by its MLP output's own scale: an activation edit.

    On each layer in ``norms`` it adds ``delta * rms(W_out @ a) / reference[layer]`` to ``hook_post`` (``a``
    that position's unedited activation). Through the post-MLP norm, which divides by about that rms,
    the edit then writes about the same vector at every token, ``g * (W_out @ delta) / reference`` to first
    order (less its projection on the token's own output), where the plain edit writes ``1 / rms`` times
    it: 100x more at some tokens than at others on Gemma 3 270M. ``reference`` (a typical rms per layer,
    :func:`reference_scales`) keeps the layers' balance that of the plain edit at a typical token. Other
    edited layers get the plain delta.

    Example:
        >>> delta = torch.zeros(48); delta[5] = 1.0
        >>> norm = FrozenNorm(torch.ones(32, 48), torch.ones(32), 0.0)
        >>> edit = TokenScaledEdit(Intervention({2: delta}, positions="all"), {2: norm}, {2: 4.0})
        >>> hook = edit.fwd_hooks()[0][1]
        >>> hook(torch.ones(1, 1, 48), None)[0, 0, 5].item()     # rms(W_out @ 1) = 48, so 1 + 48 / 4
        13.0
    """

    reference: dict[int, float] = field(default_factory=dict)
    kind = "token-scaled"

    def __post_init__(self) -> None:
        super().__post_init__()
        missing = [layer for layer in self.norms if not self.reference.get(layer, 0) > 0]
        if missing:
            raise ValueError(f"no positive reference scale for layers {missing}; measure them with reference_scales")

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        hooks = []
        for layer, (name, hook) in zip(sorted(self.intervention.deltas), self.intervention.fwd_hooks()):
            if layer not in self.norms:
                hooks.append((name, hook))
                continue

            def scaled(activation: Tensor, hook: Any, layer: int = layer) -> Tensor:
                if not self._edits_here(activation):
                    return activation
                scale = 1.0 / (self.norms[layer].inverse_scale(activation) * self.reference[layer])
                delta = self.intervention._delta_like(layer, activation)
                return activation + (scale.to(activation.dtype) * delta)

            hooks.append((name, scaled))
        return hooks


def token_scales(model: Any, layers: Sequence[int], prompts: Sequence[str], batch_size: int = 8
                 ) -> dict[int, Float[Tensor, "tokens"]]:
    """``rms(W_out @ a)`` at every token of ``prompts`` (padding excluded), per layer with a post-MLP norm:
    the factor that layer's norm divides each token's MLP output by.

    Example:
        >>> scales = token_scales(load_model("gemma-3-270m"), range(18), ["How do you spend Friday night?"])  # doctest: +SKIP
        >>> float(scales[9].quantile(0.95) / scales[9].quantile(0.05))                                       # doctest: +SKIP
        1.7
    """
    from dpn_lens.hooked import input_device, last_token_batches

    if not prompts:
        raise ValueError("token_scales needs at least one prompt to measure the MLP output scale on")
    norms = frozen_norms(model, list(layers))
    seen: dict[int, list[Tensor]] = {layer: [] for layer in norms}
    keep: list[Tensor] = []

    def read(layer: int) -> Any:
        def hook(activation: Tensor, hook: Any) -> Tensor:
            seen[layer].append((1.0 / norms[layer].inverse_scale(activation))[..., 0][keep[-1]].cpu())
            return activation
        return hook

    hooks = [(hook_name(layer), read(layer)) for layer in norms]
    for ids, mask, _ in last_token_batches(model, list(prompts), batch_size):
        keep.append(mask.bool().to(input_device(model)))
        with torch.no_grad(), read_hooks(model, hooks):
            model(ids.to(input_device(model)), attention_mask=mask.to(input_device(model)))
    return {layer: torch.cat(values) for layer, values in seen.items()}


def reference_scales(model: Any, layers: Sequence[int], prompts: Sequence[str], batch_size: int = 8
                     ) -> dict[int, float]:
    """The median of :func:`token_scales` per layer: a typical MLP output scale, the reference of
    :class:`TokenScaledEdit`. Layers without a post-MLP norm are left out.

    Use selection data (e.g. embedded contrastive prompts), not evaluation data.
    """
    return {layer: float(scales.median()) for layer, scales in token_scales(model, layers, prompts, batch_size).items()}


def _edited_norms(model: Any, intervention: Intervention, caller: str) -> dict[int, FrozenNorm]:
    """The post-MLP norms of the layers ``intervention`` edits; a TypeError if it is not a neuron edit."""
    if not isinstance(intervention, Intervention):
        raise TypeError(f"{caller} takes a neuron edit (dpn_lens.steering.Intervention); got "
                        f"{type(intervention).__name__}")
    return frozen_norms(model, sorted(intervention.deltas))


def token_scaled_edit(model: Any, intervention: Intervention, reference: dict[int, float]
                      ) -> "TokenScaledEdit | Intervention":
    """``intervention`` with each token's delta scaled by its MLP output's scale over ``reference``
    (:class:`TokenScaledEdit`); the intervention itself on a model whose MLPs have no post-MLP norm."""
    norms = _edited_norms(model, intervention, "token_scaled_edit")
    return TokenScaledEdit(intervention, norms, dict(reference)) if norms else intervention


def frozen_norm_edit(model: Any, intervention: Intervention) -> "FrozenNormEdit | Intervention":
    """``intervention`` with the post-MLP norm's scale frozen (:class:`FrozenNormEdit`); the intervention
    itself on a model whose MLPs have no post-MLP norm.

    Args:
        model: the hooked model the edit will run on (its ``down_proj`` weights and post-MLP norms are read).
        intervention: a neuron edit on ``mlp.hook_post`` (e.g. ``steering_intervention(map, gamma)``).
    """
    norms = _edited_norms(model, intervention, "frozen_norm_edit")
    return FrozenNormEdit(intervention, norms) if norms else intervention
