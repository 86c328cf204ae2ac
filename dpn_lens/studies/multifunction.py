"""Multifunctionality: are personality neurons also general-capability neurons, and what does
ablating or editing them cost?

**Capability neurons.** A neuron's capability attribution is the first-order size of its
contribution to the language-modelling loss on general data:

    attribution_i = mean over examples of  sum over positions t of |a_{t,i} * dL_ex / da_{t,i}|

where ``a`` is the MLP activation at ``blocks.{l}.mlp.hook_post`` and ``L_ex`` the example's mean
next-token loss. ``a * dL/da`` is the linear estimate of the loss change when the neuron is zeroed at
that position (attribution patching); the absolute value per position keeps a neuron that helps at
one token and hurts at another from looking idle. Two kinds of general data are used, each normalised
to total 1 before they are averaged, so neither dominates by scale:

* WikiText-2 test text (``capability/wikitext2_test``), windows of ``window`` tokens, loss on every token
  (language modelling / knowledge in running text);
* multiple-choice questions from MMLU and ARC (``capability/mmlu``, ``capability/arc``), zero-shot
  ``"Question: ...\\nA. ...\\nAnswer:"``, loss on the correct letter only (knowledge and reasoning).

Capability neurons are the top ``fraction`` (default 2%) of each layer by attribution. A per-layer
threshold, not a global one, because attribution magnitudes differ by orders of magnitude between
layers: a global cut would mostly say "this neuron is in layer X", and the chance level of a
personality set would depend on its layer profile. With a per-layer cut the chance expectation of any
set is ``fraction``; the layer-matched hypergeometric p-value and the threshold-free mean within-layer
percentile of the set's attribution (chance 0.5) are reported too.

**Costs.** The LM loss on *held-out* WikiText-2 windows (from the second half of the file; attribution
uses the first half) when a set's neurons are zeroed (ablation) or edited with the DPN-LE delta
``+gamma * s`` at every position (gamma 0.8, the paper's capability setting; the prompt pass is the whole
text here, so ``positions="all"``). A random set with the same count per layer gives the ablation cost
expected by chance.

Example:
    >>> data = load_capability_data(model, "/data/shared")                       # doctest: +SKIP
    >>> attribution = capability_attribution(model, data)                        # doctest: +SKIP
    >>> capability = capability_neurons(attribution["combined"], fraction=0.02)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dpn_lens.hooked import HookedModel, frozen_weights, hook_name, input_device, leaf_hook, pad_token_id, read_hooks
from dpn_lens.data.contrastive import DATA_DIR_ENV, resolve_data_dir
from dpn_lens.data.prompts import OPTION_LETTERS, multiple_choice_prompt
from dpn_lens.io import read_jsonl
from dpn_lens.steering import Edit, Intervention, NeuronAblation, additive_intervention, steer
from dpn_lens.studies.overlap import layer_matched_pvalue
from dpn_lens.studies.section import ReportSection
from dpn_lens.studies.sets import NeuronSet, random_layer_matched_set

__all__ = [
    "REPORT_SECTION",
    "LossExample", "CapabilityData", "load_capability_data", "text_examples", "neuron_attribution",
    "capability_attribution", "capability_neurons", "capability_overlap", "lm_loss", "ablation",
    "edit_intervention", "set_costs", "DATA_ENV",
]

REPORT_SECTION = ReportSection("multifunction", "Multifunctionality")
"""Report section of the study: its files start with ``multifunction_``."""

DATA_ENV = DATA_DIR_ENV
LETTERS = OPTION_LETTERS


@dataclass
class LossExample:
    """Token ids and which of them are prediction targets (``targets[t]``: predict ``ids[t]`` from ``t-1``)."""

    ids: list[int]
    targets: list[bool]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.targets):
            raise ValueError("ids and targets must have the same length")
        if len(self.ids) < 2 or not any(self.targets[1:]):
            raise ValueError(f"example from {self.source or 'unknown'} has no target token after the first position")


@dataclass
class CapabilityData:
    """Attribution examples (text and multiple choice) and held-out evaluation windows."""

    text: list[LossExample]
    multiple_choice: list[LossExample]
    held_out: list[LossExample]
    description: dict[str, Any] = field(default_factory=dict)


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The ``capability/`` folder (``resolve_data_dir``: argument, else ``$DPN_LENS_DATA``) with its WikiText file."""
    try:
        folder = resolve_data_dir(data_dir, "capability")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; the multifunction study needs capability/wikitext2_test, capability/mmlu "
                                "and capability/arc") from None
    if not (folder / "wikitext2_test" / "test.txt").exists():
        raise FileNotFoundError(f"{folder} holds no wikitext2_test/test.txt; pass the data folder that contains "
                                "capability/wikitext2_test, capability/mmlu and capability/arc")
    return folder


def _bos(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if isinstance(bos, int) else []


def text_examples(tokenizer: Any, text: str, n_windows: int, window: int, source: str = "text") -> list[LossExample]:
    """Consecutive windows of ``window`` tokens of ``text`` (BOS first when the tokenizer has one)."""
    if n_windows < 1 or window < 2:
        raise ValueError(f"need n_windows >= 1 and window >= 2, got {n_windows} and {window}")
    # Tokenize only as much text as needed: ~6 characters per token is generous for English.
    ids = tokenizer(text[: n_windows * window * 8], add_special_tokens=False)["input_ids"]
    body = window - len(_bos(tokenizer))
    if len(ids) < body:
        raise ValueError(f"{source}: only {len(ids)} tokens, fewer than one window of {window}")
    examples = []
    for start in range(0, min(len(ids) - body + 1, n_windows * body), body):
        chunk = _bos(tokenizer) + ids[start:start + body]
        examples.append(LossExample(chunk, [False] * len(_bos(tokenizer)) + [True] * body, source))
    return examples


def _mc_example(tokenizer: Any, question: str, choices: Sequence[str], answer: int, source: str) -> LossExample:
    prompt = _bos(tokenizer) + tokenizer(multiple_choice_prompt(question, choices), add_special_tokens=False)["input_ids"]
    target = tokenizer(f" {LETTERS[answer]}", add_special_tokens=False)["input_ids"]
    return LossExample(prompt + target, [False] * len(prompt) + [True] * len(target), source)


def load_capability_data(model_or_tokenizer: Any, data_dir: str | os.PathLike | None = None, n_text: int = 8,
                         n_multiple_choice: int = 32, n_held_out: int = 8, window: int = 128, seed: int = 0
                         ) -> CapabilityData:
    """Build the attribution and evaluation examples from the shared capability data.

    Args:
        model_or_tokenizer: a bridge (its ``tokenizer`` is used) or a tokenizer.
        data_dir: the data folder (holding ``capability/``) or ``capability/`` itself; default ``$DPN_LENS_DATA``.
        n_text, n_held_out: WikiText-2 windows for attribution (first half of the file) and for the
            held-out loss (second half).
        n_multiple_choice: questions, half from MMLU (stratified test subset) and half from ARC
            (Easy + Challenge test), drawn with ``seed``.
        window: tokens per text window.
    """
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    folder = _resolve_data_dir(data_dir)
    lines = (folder / "wikitext2_test" / "test.txt").read_text(encoding="utf-8").splitlines()
    middle = len(lines) // 2
    first, second = "\n".join(lines[:middle]).strip(), "\n".join(lines[middle:]).strip()
    text = text_examples(tokenizer, first, n_text, window, "wikitext2 (first half)")
    held_out = text_examples(tokenizer, second, n_held_out, window, "wikitext2 (second half)")
    rng = random.Random(seed)
    mmlu = read_jsonl(folder / "mmlu" / "mmlu_test_stratified20.jsonl")
    arc = read_jsonl(folder / "arc" / "ARC-Easy-Test.jsonl") + read_jsonl(folder / "arc" / "ARC-Challenge-Test.jsonl")
    n_mmlu = n_multiple_choice // 2
    questions = [_mc_example(tokenizer, r["question"], r["choices"], int(r["answer"]), "mmlu")
                 for r in rng.sample(mmlu, min(n_mmlu, len(mmlu)))]
    for r in rng.sample(arc, min(n_multiple_choice - n_mmlu, len(arc))):
        if r["answerKey"] in r["labels"] and len(r["choices"]) <= len(LETTERS):
            questions.append(_mc_example(tokenizer, r["question"], r["choices"], r["labels"].index(r["answerKey"]), "arc"))
    description = {"data_dir": str(folder), "n_text": len(text), "n_multiple_choice": len(questions),
                   "n_held_out": len(held_out), "window": window, "seed": seed}
    return CapabilityData(text, questions, held_out, description)


def _pad(examples: Sequence[LossExample], pad_id: int) -> tuple[Tensor, Tensor]:
    # Right padding: with causal attention, pads after the last real token cannot change any real
    # position, and pad positions are never targets, so no attention mask is needed.
    longest = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    targets = torch.zeros((len(examples), longest), dtype=torch.bool)
    for row, example in enumerate(examples):
        ids[row, :len(example.ids)] = torch.tensor(example.ids)
        targets[row, :len(example.ids)] = torch.tensor(example.targets)
    return ids, targets


def _example_losses(logits: Float[Tensor, "batch pos vocab"], ids: Tensor, targets: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example mean NLL over target tokens, and per-example summed NLL and target counts."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = targets[:, 1:].to(nll.dtype)
    total = (nll * mask).sum(dim=1)
    count = mask.sum(dim=1)
    return total / count.clamp(min=1), total, count


def neuron_attribution(model: HookedModel, examples: Sequence[LossExample], layers: Sequence[int] | None = None,
                       batch_size: int = 4, hook_template: str = "blocks.{layer}.mlp.hook_post"
                       ) -> Float[Tensor, "n_layers d_mlp"]:
    """Mean over examples of ``sum_t |a_t * dL_ex/da_t|`` per neuron (float64, rows follow ``layers``).

    Gradients come from ``torch.autograd.grad`` with respect to the hooked activations only, so the
    model's parameter ``.grad`` fields are never touched; the weights are frozen for the pass
    (``hooked.frozen_weights``, their flags restored on exit), so no layer saves its input for a weight
    gradient.

    Example:
        >>> scores = neuron_attribution(model, data.text, layers=[0, 1])   # doctest: +SKIP
        >>> scores.shape                                                   # doctest: +SKIP
        torch.Size([2, 1536])
    """
    if not examples:
        raise ValueError("no examples to attribute over")
    layers = list(range(int(model.cfg.n_layers))) if layers is None else list(layers)
    total = torch.zeros(len(layers), int(model.cfg.d_mlp), dtype=torch.float64)
    captured: dict[int, Tensor] = {}

    hooks = [(hook_name(layer, hook_template), leaf_hook(captured, slot)) for slot, layer in enumerate(layers)]
    pad_id = pad_token_id(model.tokenizer)
    with torch.enable_grad(), frozen_weights(model), read_hooks(model, hooks):
        for start in range(0, len(examples), batch_size):
            ids, targets = _pad(examples[start:start + batch_size], pad_id)
            ids, targets = ids.to(input_device(model)), targets.to(input_device(model))
            captured.clear()
            logits = model(ids)
            mean_loss, _, _ = _example_losses(logits, ids, targets)
            # Examples do not interact, so the gradient of the sum is each example's own gradient.
            acts = [captured[slot] for slot in range(len(layers))]
            grads = torch.autograd.grad(mean_loss.sum(), acts, allow_unused=True)
            for slot, (act, grad) in enumerate(zip(acts, grads)):
                if grad is not None:
                    total[slot] += (act.detach() * grad).abs().sum(dim=(0, 1)).to("cpu", torch.float64)
            del logits, acts, grads
            captured.clear()
    return total / len(examples)


def capability_attribution(model: HookedModel, data: CapabilityData, layers: Sequence[int] | None = None, batch_size: int = 4
                           ) -> dict[str, Tensor]:
    """``{"text", "multiple_choice", "combined"}`` attributions; each part normalised to sum 1 first."""
    parts = {"text": neuron_attribution(model, data.text, layers, batch_size)}
    if data.multiple_choice:
        parts["multiple_choice"] = neuron_attribution(model, data.multiple_choice, layers, batch_size)
    normalised = [part / part.sum().clamp(min=1e-300) for part in parts.values()]
    parts["combined"] = torch.stack(normalised).mean(dim=0)
    return parts


def capability_neurons(attribution: Float[Tensor, "n_layers d_mlp"], fraction: float = 0.02,
                       layers: Sequence[int] | None = None) -> NeuronSet:
    """The top ``fraction`` of each layer by attribution (at least one neuron per layer).

    Example:
        >>> capability_neurons(torch.tensor([[0.1, 0.9, 0.5, 0.2]]), fraction=0.5).neurons
        {0: tensor([1, 2])}
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie strictly between 0 and 1 (e.g. 0.02 = top 2% per layer), got {fraction}")
    layers = list(range(attribution.shape[0])) if layers is None else list(layers)
    if len(layers) != attribution.shape[0]:
        raise ValueError(f"{len(layers)} layers given for an attribution of {attribution.shape[0]} rows")
    k = max(1, round(fraction * attribution.shape[1]))
    neurons = {layer: torch.topk(attribution[row], k).indices for row, layer in enumerate(layers)}
    return NeuronSet(f"capability top {fraction:.0%}/layer", neurons, int(attribution.shape[1]), method="capability")


def _percentiles(attribution: Tensor) -> Tensor:
    ranks = torch.argsort(torch.argsort(attribution, dim=1), dim=1).double()
    return ranks / (attribution.shape[1] - 1)


def capability_overlap(sets: Sequence[NeuronSet], capability: NeuronSet, attribution: Float[Tensor, "n_layers d_mlp"],
                       attribution_layers: Sequence[int] | None = None) -> list[dict]:
    """Per set: how many of its neurons are capability neurons, against layer-matched chance.

    Columns: ``n``, ``n_capability``, ``fraction``, ``chance`` (expected fraction for random sets
    with the same count per layer), ``enrichment`` (fraction / chance), ``p_value`` (layer-matched
    hypergeometric, P(X >= observed)), ``mean_percentile`` (mean within-layer attribution percentile
    of the set's neurons; 0.5 = chance).
    """
    attribution_layers = list(range(attribution.shape[0])) if attribution_layers is None else list(attribution_layers)
    percentiles = _percentiles(attribution)
    rows = []
    for neuron_set in sets:
        layers = [layer for layer in neuron_set.layers if layer in capability.neurons]
        if set(neuron_set.layers) - set(layers):
            raise ValueError(f"set {neuron_set.name!r} has layers without capability attribution; attribute all layers")
        n = sum(neuron_set.layer_size(l) for l in layers)
        hits = len(neuron_set.pairs(layers) & capability.pairs(layers))
        p_value, expected = layer_matched_pvalue(hits, neuron_set.d_mlp, [neuron_set.layer_size(l) for l in layers],
                                                 [capability.layer_size(l) for l in layers])
        ranks = [float(percentiles[attribution_layers.index(l), neuron_set.neurons[l]].sum()) for l in layers]
        rows.append({"set": neuron_set.name, "trait": neuron_set.trait, "pole": neuron_set.pole,
                     "method": neuron_set.method, "n": n, "n_capability": hits,
                     "fraction": hits / n if n else float("nan"), "chance": expected / n if n else float("nan"),
                     "enrichment": hits / expected if expected else float("nan"), "p_value": p_value,
                     "mean_percentile": sum(ranks) / n if n else float("nan")})
    return rows


def lm_loss(model: HookedModel, examples: Sequence[LossExample], edit: Edit | None = None, batch_size: int = 4) -> float:
    """Token-weighted mean next-token loss over ``examples``, with ``edit`` applied (``steer``; None: unedited)."""
    pad_id = pad_token_id(model.tokenizer)
    total, count = 0.0, 0.0
    with torch.inference_mode(), steer(model, edit):
        for start in range(0, len(examples), batch_size):
            ids, targets = _pad(examples[start:start + batch_size], pad_id)
            ids, targets = ids.to(input_device(model)), targets.to(input_device(model))
            _, summed, counts = _example_losses(model(ids), ids, targets)
            total += float(summed.sum())
            count += float(counts.sum())
    return total / count


def ablation(neuron_set: NeuronSet, hook_template: str = "blocks.{layer}.mlp.hook_post") -> NeuronAblation:
    """The edit that zeroes the set's neurons at every position."""
    return NeuronAblation(dict(neuron_set.neurons), positions="all", hook_template=hook_template,
                          label=f"ablate {neuron_set.name}")


def edit_intervention(neuron_set: NeuronSet, steering_value: Float[Tensor, "n_stat_layers d_mlp"],
                      stat_layers: Sequence[int], gamma: float = 0.8) -> Intervention:
    """The DPN-LE edit ``+gamma * s`` on the set's neurons, at every position."""
    neurons = {layer: indices for layer, indices in neuron_set.neurons.items() if indices.numel()}
    return additive_intervention(steering_value, stat_layers, neurons, gamma, "increase", positions="all",
                                 label=f"edit {neuron_set.name} gamma={gamma:g}")


def set_costs(model: HookedModel, examples: Sequence[LossExample], sets: Sequence[NeuronSet],
              steering: dict[str, tuple[Tensor, Sequence[int]]], gamma: float = 0.8, random_control: bool = True,
              seed: int = 0, batch_size: int = 4, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Held-out LM loss when each set is ablated or edited, and for a layer-matched random ablation.

    Args:
        steering: ``{trait: (steering_value, stat_layers)}`` giving ``s`` for each set's trait.
    """
    baseline = lm_loss(model, examples, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for neuron_set in sets:
        if progress:
            progress(neuron_set.name)
        ablated = lm_loss(model, examples, ablation(neuron_set), batch_size)
        s, stat_layers = steering[neuron_set.trait]
        with steer(model, edit_intervention(neuron_set, s, stat_layers, gamma)):
            edited = lm_loss(model, examples, batch_size=batch_size)
        row = {"set": neuron_set.name, "trait": neuron_set.trait, "method": neuron_set.method, "n": neuron_set.size,
               "baseline_loss": baseline, "ablated_loss": ablated, "ablation_cost": ablated - baseline,
               "edited_loss": edited, "edit_cost": edited - baseline, "gamma": gamma}
        if random_control:
            control = random_layer_matched_set(neuron_set, generator)
            row["random_ablation_cost"] = lm_loss(model, examples, ablation(control), batch_size) - baseline
        rows.append(row)
    return rows
