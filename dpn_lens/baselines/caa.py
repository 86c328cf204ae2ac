"""Residual-stream mean-difference steering (contrastive activation addition, CAA) at one layer.

The steering vector is ``mean(resid_high) - mean(resid_low)`` of ``blocks.{l}.hook_resid_post`` at the
last prompt token (the token DPN-LE reads), added with strength ``gamma`` at that hook point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dpn_lens.data.contrastive import ContrastiveSet
from dpn_lens.hooked import (HookedModel, forward_until_stopped, last_token_batches, read_hooks, require_fired,
                             StopForward)
from dpn_lens.steering import Maskable, Positions, check_gamma, check_positions, check_strength, direction_sign

__all__ = ["ResidualIntervention", "residual_means", "caa_intervention", "caa_layer", "RESID_HOOK", "CAA_BATCH"]

RESID_HOOK = "blocks.{layer}.hook_resid_post"

CAA_BATCH = 8
"""Prompts per forward pass of ``residual_means`` (right-padded to the batch's longest; ``dpn-lens plan``
counts its passes so)."""


@dataclass
class ResidualIntervention(Maskable):
    """``resid <- resid + vector`` at ``blocks.{layer}.hook_resid_post`` (no MLP neuron is edited).

    Example:
        >>> edit = ResidualIntervention(layer=3, vector=torch.ones(32))
        >>> edit.fwd_hooks()[0][0], edit.n_edited
        ('blocks.3.hook_resid_post', 0)
    """

    layer: int
    vector: Float[Tensor, "d_model"]
    positions: str = "decode"
    label: str = "CAA"
    _cast: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_positions(self.positions)
        if not torch.isfinite(self.vector).all():
            raise ValueError("the CAA vector holds NaN or Inf; check the contrastive data and gamma")

    @property
    def n_edited(self) -> int:
        return 0  # it edits a residual direction, not MLP neurons

    def at_positions(self, positions: Positions) -> "ResidualIntervention":
        """The same vector added at ``positions`` (``"decode"`` or ``"all"``)."""
        return self if positions == self.positions else self._with(self.vector, self.label, positions)

    def __neg__(self) -> "ResidualIntervention":
        """The opposite edit, ``-vector``: exactly ``caa_intervention(..., direction="decrease")``."""
        return self._with(-self.vector, f"-({self.label})")

    def __mul__(self, gamma: float) -> "ResidualIntervention":
        """The vector scaled by ``gamma``."""
        gamma = check_gamma(gamma)
        return self._with(gamma * self.vector, f"{gamma:g} x ({self.label})")

    __rmul__ = __mul__

    def _with(self, vector: Tensor, label: str, positions: Positions | None = None) -> "ResidualIntervention":
        # A fresh cast cache: the cached copies belong to the old vector.
        return dataclasses.replace(self, vector=vector, label=label, positions=positions or self.positions, _cast={})

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        def hook(resid: Tensor, hook: Any) -> Tensor:
            if self.positions == "decode" and resid.shape[1] != 1:
                return resid
            key = (resid.device, resid.dtype)
            if key not in self._cast:
                self._cast[key] = self.vector.to(resid.device, resid.dtype)
            return resid + self._cast[key]
        return [(RESID_HOOK.format(layer=self.layer), hook)]


def residual_means(model: HookedModel, prompts: Sequence[str], batch_size: int = CAA_BATCH
                   ) -> tuple[Float[Tensor, "n_layers d_model"], Float[Tensor, "n n_layers d_model"]]:
    """``hook_resid_post`` at the last prompt token of every prompt, every layer (float64).

    Returns:
        ``(mean [n_layers, d_model], samples [n_prompts, n_layers, d_model])``.
    """
    n_layers = int(model.cfg.n_layers)
    samples: list[Tensor] = []
    captured: dict[int, Tensor] = {}
    last: list[Tensor] = []

    def make_hook(layer: int):
        def hook(resid: Tensor, hook: Any) -> Tensor:
            captured[layer] = resid[torch.arange(resid.shape[0]), last[0]].to("cpu", torch.float64)
            if layer == n_layers - 1:
                raise StopForward              # the final norm and the unembedding are not read
            return resid
        return hook

    hooks = [(RESID_HOOK.format(layer=layer), make_hook(layer)) for layer in range(n_layers)]
    with torch.inference_mode(), read_hooks(model, hooks):
        for ids, mask, last_index in last_token_batches(model, prompts, batch_size):
            last[:] = [last_index]
            captured.clear()
            forward_until_stopped(model, ids, attention_mask=mask)
            require_fired(len(captured), n_layers, "hook_resid_post points")
            samples.append(torch.stack([captured[layer] for layer in range(n_layers)], dim=1))
    stacked = torch.cat(samples)
    return stacked.mean(0), stacked


def caa_layer(high: Float[Tensor, "n_high n_layers d_model"], low: Float[Tensor, "n_low n_layers d_model"]) -> int:
    """The layer CAA steers at: of the middle half (n/4 .. 3n/4, where CAA steers best in the CAA paper),
    the one whose samples separate best along their mean-difference direction (largest projected d).

    Example:
        >>> high, low = torch.zeros(4, 8, 3), torch.zeros(4, 8, 3)
        >>> high[:, 5, 0] = torch.tensor([1.0, 1.1, 0.9, 1.0])   # only layer 5 separates
        >>> caa_layer(high, low)
        5
    """
    n_layers = int(high.shape[1])
    candidates = range(n_layers // 4, max(3 * n_layers // 4, n_layers // 4 + 1))
    return max(candidates, key=lambda l: _projected_d(high[:, l], low[:, l]))


def _projected_d(high: Tensor, low: Tensor) -> float:
    """Cohen's d of the samples projected on the unit mean-difference direction."""
    direction = high.mean(0) - low.mean(0)
    direction = direction / (direction.norm() + 1e-12)
    a, b = high @ direction, low @ direction
    pooled = (((len(a) - 1) * a.var() + (len(b) - 1) * b.var()) / (len(a) + len(b) - 2)).sqrt()
    return float((a.mean() - b.mean()) / (pooled + 1e-8))


def caa_intervention(model: HookedModel, contrastive_set: ContrastiveSet, gamma: float = 1.0,
                     direction: Literal["increase", "decrease"] = "increase", layer: int | None = None,
                     positions: str = "decode") -> ResidualIntervention:
    """CAA edit of a trait: ``±gamma * (mean_high - mean_low)`` at one layer's residual stream.

    ``layer`` defaults to the middle-half layer (n/4 .. 3n/4, where CAA steers best in the CAA paper)
    whose samples separate best along the mean-difference direction (largest projected Cohen's d).

    Example:
        >>> edit = caa_intervention(model, embedded_contrastive_set("openness", 50))   # doctest: +SKIP
    """
    gamma = check_strength(gamma, direction)          # before the model runs: a negative gamma is refused
    sign = direction_sign(direction)
    _, high = residual_means(model, contrastive_set.high)
    _, low = residual_means(model, contrastive_set.low)
    n_layers = int(model.cfg.n_layers)
    if layer is None:
        layer = caa_layer(high, low)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside the model's layers 0..{n_layers - 1}")
    vector = (high[:, layer].mean(0) - low[:, layer].mean(0)).float()
    return ResidualIntervention(layer, sign * gamma * vector, positions,
                                f"CAA {contrastive_set.trait} {direction} L{layer} gamma={gamma:g}")
