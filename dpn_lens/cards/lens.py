"""What a neuron writes: the logit lens of its output direction.

A neuron ``i`` of layer ``l`` adds ``a * W_out[l][i]`` to the MLP output (``a`` its activation at
``blocks.{l}.mlp.hook_post``; in Hugging Face terms ``down_proj.weight[:, i]``). Read through the
unembedding, ``W_out[l][i] @ W_U`` says which next tokens a positive activation promotes and which it
suppresses (the neuron viewer's and Neuronpedia's "output logits").

The final norm: an RMSNorm divides by the residual's RMS (one positive number per position, shared by
every direction) and multiplies by its weight per coordinate. The division cannot change the order of
tokens, the weight can, so the lens applies the weight. It is read off the module itself, as
``norm(ones) * sqrt(1 + eps)`` (``rms(ones) = 1``), which gives ``w`` for Llama's norm and ``1 + w`` for
Gemma's without knowing which. A LayerNorm also subtracts the mean; the lens then centres the direction.

Gemma 2/3 put a norm after the MLP (``post_feedforward_layernorm``) before the residual add: a neuron's
contribution is divided by the RMS of the whole MLP output, so how much a neuron writes depends on the
other neurons. The lens applies that norm's weight too and says in ``LogitLens.note`` that the result is
a direction, not a size.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> model = build_tiny_model()
    >>> lens = logit_lens(model, layer=1, neurons=[3, 7], top=2)
    >>> len(lens), len(lens[0].promoted), lens[0].label
    (2, 2, 'L1.N3')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dpn_lens.hooked import down_proj_weight, hf_model, hf_module, post_mlp_norm

__all__ = ["LogitLens", "output_directions", "unembedding", "norm_scale", "logit_lens", "neuron_label"]


def neuron_label(layer: int, neuron: int) -> str:
    """``L12.N345``: how cards, tables and the explorer name a neuron.

    Example:
        >>> neuron_label(12, 345)
        'L12.N345'
    """
    return f"L{layer}.N{neuron}"


@dataclass
class LogitLens:
    """The tokens one neuron's output direction promotes and suppresses most.

    ``promoted``/``suppressed`` hold ``(token text, logit change per unit activation)``, strongest first.
    ``note`` says what the numbers mean on this architecture (see the module note).
    """

    layer: int
    neuron: int
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    note: str = ""
    promoted_ids: list[int] = field(default_factory=list, repr=False)
    suppressed_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def label(self) -> str:
        return neuron_label(self.layer, self.neuron)


def output_directions(model: Any, layer: int, neurons: Sequence[int]) -> Float[Tensor, "n d_model"]:
    """``W_out[layer][neurons]`` in float32: what each neuron adds to the MLP output per unit activation.

    Example:
        >>> from dpn_lens.tiny import build_tiny_model
        >>> output_directions(build_tiny_model(), 0, [0, 5]).shape
        torch.Size([2, 32])
    """
    weight = down_proj_weight(model, layer, "the logit lens")                 # [d_model, d_mlp]
    return weight[:, torch.as_tensor(list(neurons), dtype=torch.long)].T.detach().float().cpu()


def unembedding(model: Any) -> Float[Tensor, "d_model vocab"]:
    """``W_U`` (the language-model head's weight, transposed) in float32."""
    head = hf_model(model).get_output_embeddings()
    if head is None:
        raise ValueError("the model has no output embedding (lm_head); the logit lens needs one")
    return head.weight.detach().float().cpu().T


def norm_scale(norm: Any, d_model: int) -> tuple[Float[Tensor, "d_model"] | None, bool]:
    """``(per-coordinate weight, centres)`` of a norm module, read off the module (module note).

    Returns ``(None, False)`` when ``norm`` is None. ``centres`` is True for a LayerNorm (it subtracts
    the mean), False for an RMSNorm.
    """
    if norm is None:
        return None, False
    norm = hf_module(norm)
    name = type(norm).__name__.lower()
    centres = isinstance(norm, torch.nn.LayerNorm) or ("layernorm" in name and "rms" not in name)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)) or 0.0)
    parameter = next(norm.parameters(), None)
    # A float32 probe: Llama's and Gemma's norms compute in float32 and return the input's dtype, so the
    # weight is read at full precision even from a bfloat16 model.
    probe = torch.ones(1, d_model, dtype=torch.float32, device=parameter.device if parameter is not None else "cpu")
    if centres:
        # A LayerNorm of ones is all zeros (centred); its weight is the module's own parameter.
        weight = getattr(norm, "weight", None)
        scale = torch.ones(d_model) if weight is None else weight.detach().float().cpu()
        return scale, True
    with torch.no_grad():
        scale = norm(probe).float().cpu()[0] * math.sqrt(1.0 + eps)
    return scale, False


def _final_norm(model: Any) -> Any:
    return getattr(getattr(hf_model(model), "model", None), "norm", None)


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def logit_lens(model: Any, layer: int, neurons: Sequence[int], top: int = 15, apply_norm: bool = True
               ) -> list[LogitLens]:
    """For each neuron of ``layer``: the ``top`` tokens its output direction promotes and suppresses.

    Args:
        model: a ``TransformerBridge`` (or a Hugging Face causal LM).
        layer: the neurons' layer.
        neurons: neuron indices in that layer.
        top: tokens per side.
        apply_norm: apply the final norm's (and on Gemma the post-MLP norm's) weight (module note);
            False reads the raw ``W_out @ W_U``.

    Returns:
        One ``LogitLens`` per neuron, in the order given.
    """
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    directions = output_directions(model, layer, neurons)            # [n, d_model]
    d_model = directions.shape[1]
    notes = []
    if apply_norm:
        post_scale, _ = norm_scale(post_mlp_norm(model, layer), d_model)
        if post_scale is not None:
            directions = directions * post_scale
            notes.append("the post-MLP norm divides the whole MLP output by its RMS, so these logits are a "
                         "direction (which tokens, in what order), not the size of this neuron's effect")
        final_scale, centres = norm_scale(_final_norm(model), d_model)
        if final_scale is not None:
            if centres:
                directions = directions - directions.mean(dim=1, keepdim=True)
            directions = directions * final_scale
            notes.append("final norm's weight applied (its division by the residual's RMS changes every "
                         "logit by the same positive factor)")
        else:
            notes.append("no final norm found: raw W_out @ W_U")
    else:
        notes.append("raw W_out @ W_U (no norm applied)")
    logits = directions @ unembedding(model)                         # [n, vocab]
    k = min(top, logits.shape[1])
    up = torch.topk(logits, k, dim=1)
    down = torch.topk(-logits, k, dim=1)
    tokenizer = getattr(model, "tokenizer", None)
    lenses = []
    for row, neuron in enumerate(neurons):
        promoted_ids, suppressed_ids = up.indices[row].tolist(), down.indices[row].tolist()
        lenses.append(LogitLens(
            layer, int(neuron),
            [(_token_text(tokenizer, t), float(v)) for t, v in zip(promoted_ids, up.values[row].tolist())],
            [(_token_text(tokenizer, t), -float(v)) for t, v in zip(suppressed_ids, down.values[row].tolist())],
            "; ".join(notes), promoted_ids, suppressed_ids))
    return lenses
