"""Who writes the trait direction? The residual-stream mean difference split into MLP and attention parts.

CAA and DPN-LE read the same prompts at the same token (the last prompt token): CAA takes the mean
difference ``v`` of the residual stream (``blocks.{L}.hook_resid_post``, high minus low) at one layer, DPN-LE
the mean difference ``s`` of MLP neurons. On a pre-norm decoder the residual stream at layer ``L`` is the
embedding plus every attention and MLP output up to ``L``, and means are linear, so

    v = d_embed + sum_{l <= L} d_attn_out[l] + sum_{l <= L} d_mlp_out[l]

exactly, since ``hook_attn_out`` and ``hook_mlp_out`` are what each block adds to the residual stream (on
Gemma 2/3 the bridge reads them after the post-attention and post-feedforward norms; the remainder is
reported and is ~1e-8 on SmolLM2 and Gemma 3). This study reports each part's share of ``v`` (its
projection on ``v`` over ``|v|^2``; the shares add up to 1 with the remainder) and, for maps on models
whose MLP output is added unnormalised, the share written by DPN-LE's selected neurons:
``sum_l sum_{i in map} s[l, i] * W_out[l][i]`` (what a DPN-LE edit adds per unit gamma, up to layer ``L``;
on Gemma the norm after ``W_out`` makes that sum not the output's change, so it is left out).

If the MLPs write little of ``v``, no edit of MLP neurons (sparse or dense) can reproduce the direction
that CAA adds; docs/RESULTS-EARLIER.md (issue 11) reads these shares.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> from dpn_lens.data.contrastive import embedded_contrastive_set
    >>> share = residual_share(build_tiny_model(), embedded_contrastive_set("openness", 8), layer=2)
    >>> round(share.mlp + share.attn + share.embed + share.remainder, 6)
    1.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dpn_lens.data.contrastive import ContrastiveSet
from dpn_lens.hooked import HookedModel, last_token_batches, read_hooks
from dpn_lens.localization.neuron_map import NeuronMap

__all__ = ["ResidualShare", "residual_share", "last_token_sums"]

_HOOKS = {"resid": "blocks.{layer}.hook_resid_post", "attn": "blocks.{layer}.hook_attn_out",
          "mlp": "blocks.{layer}.hook_mlp_out", "post": "blocks.{layer}.mlp.hook_post"}
_EMBED_HOOK = "blocks.0.hook_resid_pre"


@dataclass
class ResidualShare:
    """The split of one trait's residual direction ``v`` at ``layer`` (module note).

    ``mlp``, ``attn``, ``embed``: each part's projection on ``v`` divided by ``|v|^2``; ``remainder`` =
    1 minus their sum (0 on pre-norm models without output norms). ``*_cosine``: cosine with ``v``.
    ``selected`` / ``selected_cosine``: the part written by the map's neurons (None without a map, or on a
    model that normalises its MLP output). ``per_layer``: ``{"layer", "attn", "mlp"}`` shares per layer.
    """

    trait: str
    layer: int
    n_pairs: int
    v_norm: float
    mlp: float
    attn: float
    embed: float
    remainder: float
    mlp_cosine: float
    attn_cosine: float
    selected: float | None = None
    selected_cosine: float | None = None
    selected_neurons: int = 0
    per_layer: list[dict[str, float]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """One table row (everything but ``per_layer``)."""
        return {key: value for key, value in asdict(self).items() if key != "per_layer"}


def last_token_sums(model: HookedModel, prompts: Sequence[str], batch_size: int = 8
                    ) -> tuple[Float[Tensor, "n n_layers d_model"], dict[str, Float[Tensor, "n_layers d"]],
                               Float[Tensor, "d_model"]]:
    """At the last token of every prompt: the residual stream after each layer (per prompt), and the sums
    over prompts of each layer's attention output, MLP output and MLP neurons, and of the embedding.

    Returns:
        ``(resid [n, n_layers, d_model], {"attn", "mlp", "post": [n_layers, d]}, embed [d_model])``, float64.
    """
    n_layers = int(model.cfg.n_layers)
    captured: dict[tuple[str, int], Tensor] = {}
    last: list[Tensor] = []

    def make_hook(kind: str, layer: int):
        def hook(activation: Tensor, hook: Any) -> Tensor:
            captured[(kind, layer)] = activation[torch.arange(activation.shape[0]), last[0]].to("cpu", torch.float64)
            return activation
        return hook

    hooks = [(template.format(layer=layer), make_hook(kind, layer))
             for kind, template in _HOOKS.items() for layer in range(n_layers)]
    hooks.append((_EMBED_HOOK, make_hook("embed", 0)))
    resid: list[Tensor] = []
    sums: dict[str, Tensor] = {}
    embed = torch.zeros(())
    with torch.inference_mode(), read_hooks(model, hooks):
        for ids, mask, last_index in last_token_batches(model, prompts, batch_size):
            last[:] = [last_index]
            model(ids, attention_mask=mask)
            resid.append(torch.stack([captured[("resid", layer)] for layer in range(n_layers)], dim=1))
            for kind in ("attn", "mlp", "post"):
                batch = torch.stack([captured[(kind, layer)].sum(0) for layer in range(n_layers)])
                sums[kind] = sums[kind] + batch if kind in sums else batch
            embed = embed + captured[("embed", 0)].sum(0)
    return torch.cat(resid), sums, embed


def _share(part: Tensor, v: Tensor) -> float:
    return float(part @ v / (v @ v))


def _cosine(part: Tensor, v: Tensor) -> float:
    return float(part @ v / (part.norm() * v.norm() + 1e-30))


def residual_share(model: HookedModel, contrastive_set: ContrastiveSet, neuron_map: NeuronMap | None = None,
                   layer: int | None = None, batch_size: int = 8) -> ResidualShare:
    """Split the trait's residual mean difference at ``layer`` (None: the layer CAA would steer at) into
    the attention, MLP and embedding parts, and the part the map's neurons write (module note)."""
    from dpn_lens.baselines.caa import caa_layer
    from dpn_lens.export import normalises_mlp_output, residual_vectors
    from dpn_lens.steering import Intervention

    high_resid, high, high_embed = last_token_sums(model, contrastive_set.high, batch_size)
    low_resid, low, low_embed = last_token_sums(model, contrastive_set.low, batch_size)
    n_high, n_low = len(contrastive_set.high), len(contrastive_set.low)
    n_layers = int(model.cfg.n_layers)
    if layer is None:
        layer = caa_layer(high_resid, low_resid)
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside the model's layers 0..{n_layers - 1}")
    diff = {kind: high[kind] / n_high - low[kind] / n_low for kind in high}
    v = high_resid[:, layer].mean(0) - low_resid[:, layer].mean(0)
    if float(v.norm()) == 0.0:
        raise ValueError(f"the {contrastive_set.trait} prompts give the same residual stream at layer {layer}; "
                         "the high and low prompts must differ")
    mlp, attn = diff["mlp"][: layer + 1].sum(0), diff["attn"][: layer + 1].sum(0)
    embed = high_embed / n_high - low_embed / n_low
    shares = {"mlp": _share(mlp, v), "attn": _share(attn, v), "embed": _share(embed, v)}
    result = ResidualShare(
        trait=contrastive_set.trait, layer=layer, n_pairs=min(n_high, n_low), v_norm=float(v.norm()),
        remainder=1.0 - sum(shares.values()), mlp_cosine=_cosine(mlp, v), attn_cosine=_cosine(attn, v),
        per_layer=[{"layer": l, "attn": _share(diff["attn"][l], v), "mlp": _share(diff["mlp"][l], v)}
                   for l in range(layer + 1)], **shares)
    if neuron_map is not None and not normalises_mlp_output(model):
        # s measured on these prompts, kept on the map's neurons of layers <= layer: what DPN-LE writes.
        deltas = {}
        for l in neuron_map.layers:
            if l > layer:
                continue
            chosen = torch.cat([neuron_map.high.get(l, torch.zeros(0, dtype=torch.long)),
                                neuron_map.low.get(l, torch.zeros(0, dtype=torch.long))])
            delta = torch.zeros(diff["post"].shape[1])
            delta[chosen] = diff["post"][l, chosen].float()
            deltas[l] = delta
            result.selected_neurons += int(chosen.numel())
        written = sum(residual_vectors(model, Intervention(deltas)).values(), torch.zeros(v.shape[0])).double()
        result.selected, result.selected_cosine = _share(written, v), _cosine(written, v)
    return result
