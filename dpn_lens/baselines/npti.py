"""NPTI (neuron-based personality trait induction) on TransformerLens hooks (docs/METHOD.md, "Baselines").

Neuron value: ``a = act(gate(x))`` (for non-gated MLPs ``act(W_in x)``). The bridge exposes the gate
pre-activation ``blocks.{l}.mlp.hook_pre`` (``gate(x)``), the up projection ``hook_pre_linear`` (``up(x)``)
and their product ``hook_post = act(gate(x)) * up(x)``, but no hook for ``act(gate(x))`` alone. So:

* statistics apply the MLP's own activation function to ``hook_pre``;
* the edit records ``hook_pre`` and ``hook_pre_linear`` and rewrites ``hook_post`` of the edited neurons
  as ``a' * up(x)`` with ``a' = a + gamma * p95 * sigmoid(10 (diff - 0.15))`` (boost) or ``min(a, 0)``
  (clamp): exactly the output the MLP would give had ``act(gate(x))`` itself been edited.
  (Editing ``gate(x)`` before the activation would not be equivalent: SiLU/GELU are not additive.)

Statistics come from GENERATED tokens of answers under high and low persona prompts:
``P = #(a > 0) / #tokens`` and the 95th percentile ``p95`` per neuron.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens.data.contrastive import ContrastiveSet, embedded_contrastive_set
from dpn_lens.hooked import HookedModel, pad_token_id, pad_token_lists, read_hooks, tokenize_prompts
from dpn_lens.steering import Maskable, Positions, check_gamma, check_positions, direction_sign

__all__ = ["NPTIStatistics", "NPTIIntervention", "npti_statistics", "npti_trait_statistics", "npti_select",
           "npti_pole_selection", "npti_intervention", "scaled_top_count", "REFERENCE_TOP", "REFERENCE_NEURONS"]

REFERENCE_TOP = 2000
"""NPTI keeps the top 2,000 neurons by diff before applying the diff >= 0.1 rule (LLaMA-3-8B)."""
REFERENCE_NEURONS = 32 * 14336
"""MLP neurons of LLaMA-3-8B (32 layers x 14,336): 2,000 of them are 0.436%."""


def scaled_top_count(n_neurons: int, top: int = REFERENCE_TOP, reference_neurons: int = REFERENCE_NEURONS) -> int:
    """NPTI's top-2000 scaled to a model with ``n_neurons`` MLP neurons (same fraction, at least 1).

    Example:
        >>> scaled_top_count(30 * 1536)     # SmolLM2-135M
        201
    """
    return max(1, round(top * n_neurons / reference_neurons))


def _activation(model: Any, layer: int) -> Callable[[Tensor], Tensor]:
    """The MLP's own activation function (from the wrapped Hugging Face module, else ``cfg.act_fn``)."""
    mlp = model.blocks[layer].mlp
    original = getattr(mlp, "_original_component", None)
    for name in ("act_fn", "act", "activation_fn"):
        function = getattr(original, name, None)
        if callable(function):
            return function
    table = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
             "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
             "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
    name = str(getattr(model.cfg, "act_fn", ""))
    if name not in table:
        raise ValueError(f"unknown MLP activation {name!r}; NPTI needs act(gate(x)) and supports {', '.join(table)}")
    return table[name]


def _is_gated(model: Any) -> bool:
    return "blocks.0.mlp.hook_pre_linear" in model.hook_dict


@dataclass
class NPTIStatistics:
    """Per-neuron activation probability and 95th percentile over generated tokens, per pole.

    Attributes:
        p_high, p_low: ``[n_layers, d_mlp]`` fraction of generated tokens with ``a > 0``.
        p95_high, p95_low: ``[n_layers, d_mlp]`` 95th percentile of ``a``.
        n_tokens_high, n_tokens_low: generated tokens the statistics come from.
    """

    trait: str
    p_high: Float[Tensor, "n_layers d_mlp"]
    p_low: Float[Tensor, "n_layers d_mlp"]
    p95_high: Float[Tensor, "n_layers d_mlp"]
    p95_low: Float[Tensor, "n_layers d_mlp"]
    n_tokens_high: int
    n_tokens_low: int
    gated: bool = True


def _generate(model: Any, token_lists: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy answers (new tokens only) from the wrapped Hugging Face model, left-padded batches."""
    hf_model = model.original_model
    pad = pad_token_id(model.tokenizer)
    answers: list[list[int]] = []
    for start in range(0, len(token_lists), batch_size):
        chunk = token_lists[start:start + batch_size]
        ids, mask = pad_token_lists(chunk, pad, "left")
        with torch.inference_mode():
            out = hf_model.generate(input_ids=ids.to(hf_model.device), attention_mask=mask.to(hf_model.device),
                                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        for row in range(len(chunk)):
            new = out[row, ids.shape[1]:].tolist()
            eos = model.tokenizer.eos_token_id
            answers.append(new[:new.index(eos)] if eos in new else new)
    return answers


def _answer_activations(model: Any, prompts: list[list[int]], answers: list[list[int]]
                        ) -> Float[Tensor, "n_tokens n_layers d_mlp"]:
    """``act(gate(x))`` at every answer token (teacher-forced after its prompt), all layers."""
    n_layers = int(model.cfg.n_layers)
    activations = [_activation(model, layer) for layer in range(n_layers)]
    rows: list[Tensor] = []
    captured: dict[int, Tensor] = {}

    def make_hook(layer: int):
        def hook(pre: Tensor, hook: Any) -> Tensor:
            captured[layer] = pre[0]
            return pre
        return hook

    hooks = [(f"blocks.{layer}.mlp.hook_pre", make_hook(layer)) for layer in range(n_layers)]
    with torch.inference_mode(), read_hooks(model, hooks):
        for prompt, answer in zip(prompts, answers):
            if not answer:
                continue
            model(torch.tensor([prompt + answer]))
            # The activation at an answer token is what the model computes while producing the next one;
            # NPTI's hooks fire during generation on exactly these positions.
            span = slice(len(prompt) - 1, len(prompt) + len(answer) - 1)
            rows.append(torch.stack([activations[layer](captured[layer][span].float()) for layer in range(n_layers)],
                                    dim=1).cpu())
    if not rows:
        raise ValueError("the model generated no answer tokens; raise max_new_tokens or check the prompts")
    return torch.cat(rows)


def npti_statistics(model: HookedModel, contrastive_set: ContrastiveSet, max_new_tokens: int = 32, batch_size: int = 8,
                    progress: bool = False) -> NPTIStatistics:
    """Generate answers to the high and low prompts and compute NPTI's P and p95 per neuron.

    Example:
        >>> stats = npti_statistics(model, embedded_contrastive_set("openness", 20))   # doctest: +SKIP
        >>> stats.p_high.shape                                                          # doctest: +SKIP
        torch.Size([30, 1536])
    """
    results = {}
    for pole, prompts in (("high", contrastive_set.high), ("low", contrastive_set.low)):
        token_lists = tokenize_prompts(model, prompts)
        answers = _generate(model, token_lists, max_new_tokens, batch_size)
        values = _answer_activations(model, token_lists, answers)
        results[pole] = ((values > 0).double().mean(0).float(),
                         torch.stack([torch.quantile(values[:, layer], 0.95, dim=0) for layer in range(values.shape[1])]),
                         values.shape[0])
    return NPTIStatistics(contrastive_set.trait, results["high"][0], results["low"][0], results["high"][1],
                          results["low"][1], results["high"][2], results["low"][2], _is_gated(model))


def npti_trait_statistics(model: HookedModel, trait: str, n_prompts: int = 16, new_tokens: int = 24, seed: int = 7
                          ) -> NPTIStatistics:
    """NPTI statistics of ``trait`` from ``n_prompts`` embedded high and low persona prompts.

    This is how ``dpn-lens compare`` and ``dpn-lens study --npti`` get NPTI's neurons, so both see the
    same sets for the same arguments.

    Example:
        >>> stats = npti_trait_statistics(model, "openness")                             # doctest: +SKIP
    """
    return npti_statistics(model, embedded_contrastive_set(trait, n_pairs=n_prompts, seed=seed), new_tokens)


def npti_select(diff: Float[Tensor, "..."], top: int = REFERENCE_TOP, min_diff: float = 0.1) -> Int[Tensor, "n"]:
    """NPTI's rule over all layers: sort ``diff`` descending, keep the first ``top``, then continue
    while ``diff >= min_diff``. Returns flat indices into ``diff`` in selection order.

    Example:
        >>> npti_select(torch.tensor([0.05, 0.3, 0.12, 0.2]), top=1, min_diff=0.1).tolist()
        [1, 3, 2]
    """
    if top < 0:
        raise ValueError(f"top must be non-negative, got {top}")
    flat = diff.flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    ranked = flat[order]
    extra = int((ranked[top:] >= min_diff).long().cumprod(0).sum()) if top < flat.numel() else 0
    return order[:min(top, flat.numel()) + extra]


def npti_pole_selection(stats: NPTIStatistics, top: int | None = None, min_diff: float = 0.1
                        ) -> tuple[Int[Tensor, "n_high"], Int[Tensor, "n_low"]]:
    """The neurons NPTI selects for the trait (high) and for the reversed trait (low).

    ``high = npti_select(p_high - p_low)``, ``low = npti_select(p_low - p_high)``, over all layers;
    flat indices into ``[n_layers, d_mlp]`` (``layer = i // d_mlp``, ``neuron = i % d_mlp``).
    ``top`` defaults to ``scaled_top_count`` of the model's neuron count. ``npti_intervention`` boosts one
    of the two and clamps the other, so this is the selection its edits use.

    Example:
        >>> high, low = npti_pole_selection(stats)             # doctest: +SKIP
        >>> layers, neurons = high // stats.p_high.shape[1], high % stats.p_high.shape[1]   # doctest: +SKIP
    """
    n_layers, d_mlp = stats.p_high.shape
    top = scaled_top_count(n_layers * d_mlp) if top is None else top
    diff = stats.p_high - stats.p_low
    return npti_select(diff, top, min_diff), npti_select(-diff, top, min_diff)


@dataclass
class NPTIIntervention(Maskable):
    """NPTI's edit: boost the trait's neurons, clamp the opposite pole's (``a = min(a, 0)``).

    Attributes:
        boost: ``{layer: (indices, added values)}`` (gamma already applied).
        clamp: ``{layer: indices}``.
        activations: ``{layer: activation function}`` of the edited layers.
        gated: whether ``hook_post = act(gate) * up`` (else ``hook_post = act(pre)``).
        direction, gamma: how ``npti_intervention`` built it (``None`` for a hand-built edit).
        rebuild: ``(direction, gamma, positions) -> NPTIIntervention`` from the same statistics; set by
            ``npti_intervention``. NPTI's opposite direction boosts and clamps *other* neurons, so
            ``-edit`` cannot negate values: it rebuilds the edit of the other direction.
    """

    boost: dict[int, tuple[Tensor, Tensor]]
    clamp: dict[int, Tensor]
    activations: dict[int, Callable[[Tensor], Tensor]] = field(repr=False)
    gated: bool = True
    positions: str = "decode"
    label: str = "NPTI"
    direction: str | None = None
    gamma: float | None = None
    rebuild: Callable[[str, float, str], "NPTIIntervention"] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_positions(self.positions)

    def at_positions(self, positions: Positions) -> "NPTIIntervention":
        """The same edit acting at ``positions`` (``"decode"`` or ``"all"``)."""
        return self if positions == self.positions else dataclasses.replace(self, positions=positions)

    def __neg__(self) -> "NPTIIntervention":
        """The edit of the opposite direction: exactly ``npti_intervention(..., direction=<other>)``."""
        if self.rebuild is None or self.direction is None or self.gamma is None:
            raise TypeError("this NPTI edit was not built by npti_intervention, so its opposite direction is unknown "
                            "(NPTI boosts and clamps other neurons for it); build it with npti_intervention(model, "
                            "stats, direction=...)")
        opposite = "decrease" if self.direction == "increase" else "increase"
        return self.rebuild(opposite, self.gamma, self.positions)

    def __mul__(self, gamma: float) -> "NPTIIntervention":
        """NPTI's strength scaled by ``gamma``: the boosts scale, the clamps stay (a negative factor flips)."""
        gamma = check_gamma(gamma)
        if gamma < 0:
            return (-self) * -gamma
        if self.rebuild is not None and self.direction is not None and self.gamma is not None:
            return self.rebuild(self.direction, self.gamma * gamma, self.positions)
        boost = {layer: (indices, gamma * values) for layer, (indices, values) in self.boost.items()}
        return dataclasses.replace(self, boost=boost, label=f"{gamma:g} x ({self.label})")

    __rmul__ = __mul__

    @property
    def n_edited(self) -> int:
        return sum(int(i.numel()) for i, _ in self.boost.values()) + sum(int(i.numel()) for i in self.clamp.values())

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.boost) | set(self.clamp))

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        store: dict[tuple[int, str], Tensor] = {}

        def record(layer: int, kind: str):
            def hook(value: Tensor, hook: Any) -> Tensor:
                store[(layer, kind)] = value
                return value
            return hook

        def edit(layer: int):
            boost_idx, boost_val = self.boost.get(layer, (torch.zeros(0, dtype=torch.long), torch.zeros(0)))
            clamp_idx = self.clamp.get(layer, torch.zeros(0, dtype=torch.long))

            def hook(post: Tensor, hook: Any) -> Tensor:
                if self.positions == "decode" and post.shape[1] != 1:
                    return post
                a = self.activations[layer](store[(layer, "pre")]) if self.gated else post
                new = a.clone()
                if boost_idx.numel():
                    new[..., boost_idx.to(post.device)] += boost_val.to(post.device, post.dtype)
                if clamp_idx.numel():
                    index = clamp_idx.to(post.device)
                    new[..., index] = new[..., index].clamp(max=0)
                if not self.gated:
                    return new
                up = store[(layer, "up")]
                touched = torch.cat([boost_idx, clamp_idx]).to(post.device)
                post = post.clone()
                post[..., touched] = new[..., touched] * up[..., touched]
                return post
            return hook

        hooks: list[tuple[str, Any]] = []
        for layer in self.layers:
            if self.gated:
                hooks += [(f"blocks.{layer}.mlp.hook_pre", record(layer, "pre")),
                          (f"blocks.{layer}.mlp.hook_pre_linear", record(layer, "up"))]
            hooks.append((f"blocks.{layer}.mlp.hook_post", edit(layer)))
        return hooks


def npti_intervention(model: HookedModel, stats: NPTIStatistics, direction: Literal["increase", "decrease"] = "increase",
                      gamma: float = 1.4, top: int | None = None, min_diff: float = 0.1,
                      positions: str = "decode") -> NPTIIntervention:
    """NPTI's edit of a trait: ``a += gamma * p95 * sigmoid(10 (diff - 0.15))`` on the neurons of the
    target pole, ``a = min(a, 0)`` on those of the opposite pole.

    ``top`` defaults to ``scaled_top_count`` (NPTI's 2,000 of LLaMA-3-8B's 458,752 neurons, as a
    fraction of this model's); the ``diff >= min_diff`` extension is applied unchanged.

    Example:
        >>> edit = npti_intervention(model, stats, "decrease")                    # doctest: +SKIP
        >>> with steer(model, edit):                                              # doctest: +SKIP
        ...     model.generate(prompt, max_new_tokens=40, do_sample=False)
    """
    direction_sign(direction)
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite (NPTI uses ~1.4), got {gamma!r}")
    n_layers, d_mlp = stats.p_high.shape
    if n_layers != int(model.cfg.n_layers) or d_mlp != int(model.cfg.d_mlp):
        raise ValueError(f"NPTI statistics are [{n_layers}, {d_mlp}] but the model has [{model.cfg.n_layers}, "
                         f"{model.cfg.d_mlp}] neurons: they come from another model")
    target_p, other_p = (stats.p_high, stats.p_low) if direction == "increase" else (stats.p_low, stats.p_high)
    target_p95 = stats.p95_high if direction == "increase" else stats.p95_low
    diff = target_p - other_p
    # p_low - p_high == -(p_high - p_low) exactly in floating point, so "decrease" swaps the two sets.
    high, low = npti_pole_selection(stats, top, min_diff)
    boosted, clamped = (high, low) if direction == "increase" else (low, high)
    value = gamma * target_p95.flatten() * torch.sigmoid(10 * (diff.flatten() - 0.15))
    boost: dict[int, tuple[Tensor, Tensor]] = {}
    clamp: dict[int, Tensor] = {}
    for layer in range(n_layers):
        in_layer = boosted[(boosted // d_mlp) == layer]
        if in_layer.numel():
            boost[layer] = (in_layer % d_mlp, value[in_layer].float())
        in_layer = clamped[(clamped // d_mlp) == layer]
        if in_layer.numel():
            clamp[layer] = in_layer % d_mlp
    activations = {layer: _activation(model, layer) for layer in set(boost) | set(clamp)}

    def rebuild(other_direction: str, other_gamma: float, other_positions: str) -> NPTIIntervention:
        return npti_intervention(model, stats, other_direction, other_gamma, top, min_diff,  # type: ignore[arg-type]
                                 other_positions)

    return NPTIIntervention(boost, clamp, activations, stats.gated, positions,
                            f"NPTI {stats.trait} {direction} gamma={gamma:g}", direction, gamma, rebuild)
