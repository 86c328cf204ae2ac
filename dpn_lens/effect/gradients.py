"""Gradients that effect-based selection ranks neurons by: one forward and one backward per batch.

Two first-order quantities, both with respect to the MLP neuron activation ``blocks.{l}.mlp.hook_post``
(the activation a DPN-LE edit changes):

* ``margin_gradients``: for preference pairs (a question, a high and a low answer), the gradient of the
  pair's margin ``mean_t log p(high_t) - mean_t log p(low_t)`` (the question asked without persona, as
  the evaluation asks it) with respect to each neuron, **summed over the answer positions**. A decode-time
  edit adds the same ``delta_i`` at every answer position, so ``delta_i * gradient_i`` is the first-order
  change of the margin when neuron ``i`` alone is edited (attribution patching). The first answer token is
  predicted from the unedited question pass, as in generation, and gets no gradient.
* ``write_gradients``: for prompts, the gradient of ``u_l . mlp_out_l`` at the last prompt token with
  respect to the neurons of layer ``l`` only: how much one unit of neuron ``i`` writes along a residual
  direction ``u_l`` (on a pre-norm decoder exactly ``W_out[l][i] . u_l``; on Gemma through its
  post-feedforward norm, at the activations of those prompts). The MLP output is passed on detached, so
  no later layer's path enters the gradient.

Gradients are taken with ``torch.autograd.grad`` with respect to the hooked activations only, so no
parameter's ``.grad`` is touched. The weights are frozen for the passes with gradients
(``hooked.frozen_weights``): no layer saves its input for a weight gradient, and the graph starts at the
first hooked activation. Hooks are removed and the weights' ``requires_grad`` flags restored on exit, also
after an exception.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> from dpn_lens.evaluation.preference import PreferencePair
    >>> model = build_tiny_model()
    >>> pairs = [PreferencePair("what would you do ?", "a party with a friend .", "a quiet book at home .")] * 2
    >>> margin_gradients(model, pairs).mean.shape
    torch.Size([4, 48])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dpn_lens.data.prompts import render_for_model
from dpn_lens.hooked import (HookedModel, check_layers, encode, frozen_weights, hook_name, input_device, last_token_batches,
                             leaf_hook, pad_token_id, pad_token_lists, read_hooks)

__all__ = ["MarginGradients", "margin_gradients", "write_gradients", "MLP_OUT_HOOK"]

MLP_OUT_HOOK = "blocks.{layer}.hook_mlp_out"
"""What each block's MLP adds to the residual stream (after Gemma's post-feedforward norm)."""


@dataclass
class MarginGradients:
    """Per selection pair, the margin's gradient summed over answer positions, ``[n_pairs, n_layers, d_mlp]``.

    Attributes:
        per_pair: float32 gradients, one row per pair (``layers`` give the model layer of each row).
        layers: the model layers of the second axis.
    """

    per_pair: Float[Tensor, "n_pairs n_layers d_mlp"]
    layers: list[int]

    @property
    def mean(self) -> Float[Tensor, "n_layers d_mlp"]:
        """The mean over pairs (float64): the first-order margin change per unit of each neuron."""
        return self.per_pair.double().mean(0)

    @property
    def n_pairs(self) -> int:
        return int(self.per_pair.shape[0])


def _items(model: HookedModel, pairs: Sequence[Any]) -> list[tuple[int, list[int], list[int], float]]:
    """``(pair index, question tokens, answer tokens, sign)``: +1 for the high answer, -1 for the low one."""
    items = []
    for index, pair in enumerate(pairs):
        context = encode(model, render_for_model(model, pair.question))
        for answer, sign in ((pair.high_answer, 1.0), (pair.low_answer, -1.0)):
            tokens = encode(model, answer, add_bos=False)
            if not tokens:
                raise ValueError(f"selection pair #{index} has an answer with no tokens; drop it")
            items.append((index, context, tokens, sign))
    return items


def margin_gradients(model: HookedModel, pairs: Sequence[Any], layers: Sequence[int] | None = None,
                     batch_tokens: int = 2048, through_mlps: bool = True, cached: bool | None = None,
                     cache_bytes: int | None = 0) -> MarginGradients:
    """The gradient of each pair's preference margin with respect to every neuron (module note).

    Args:
        model: a hooked model (``TransformerBridge``).
        pairs: ``PreferencePair`` objects (``question``, ``high_answer``, ``low_answer``); the question is
            rendered through the chat template without any persona.
        layers: model layers to differentiate (None: all).
        batch_tokens: padded tokens per forward and backward pass (answers batched longest first).
        through_mlps: the total gradient (True); False leaves out every path that runs through the MLP
            neurons of a later layer (of ``layers``), keeping those through attention, the residual
            stream and the unembedding: a more linear view of a neuron's effect, for large edits.
        cached: run each question once into a key/value cache and only the answers with gradients (the
            same gradient at less than half the cost; None: wherever the model supports it).
        cache_bytes: at most this many bytes of the questions' cache are kept (``CachedAnswerScorer``); the
            questions of a batch past it run, without gradients, just before its answers. The default, 0,
            keeps none: the pass is a single one, so each batch's questions run once either way, and only
            the batch in flight holds its cache (512 SmolLM2 pairs in float32 held 3.1 GiB of caches with
            all kept). None: all kept, built before the first batch.

    Returns:
        ``MarginGradients``; ``result.mean[l, i]`` times a delta ``d`` added to neuron ``i`` at every
        answer position is the first-order change of the mean margin.
    """
    if not pairs:
        raise ValueError("margin_gradients needs at least one preference pair")
    chosen = check_layers(model, None if layers is None else list(layers))
    items = _items(model, pairs)
    per_pair = torch.zeros(len(pairs), len(chosen), int(model.cfg.d_mlp), dtype=torch.float32)
    captured: dict[int, Tensor] = {}
    hooks = [(hook_name(layer), leaf_hook(captured, layer, cut=not through_mlps)) for layer in chosen]
    from dpn_lens.evaluation.answer_cache import CachedAnswerScorer   # here: evaluation imports effect

    use_cache = CachedAnswerScorer.supported(model) if cached is None else cached
    # The questions run before the weights are frozen: their pass keeps one position's logits, a slice
    # that matmul cannot fold into 2-D, and with a frozen unembedding it then copies the unembedding once
    # per row for a batched product (Gemma 3 270M: 0.31 GiB a row, 3.75 GiB for 12 questions).
    scorer = _question_cache(model, items, batch_tokens, cache_bytes) if use_cache else None
    passes = _cached_passes(model, items, scorer) if scorer is not None else _plain_passes(model, items, batch_tokens)
    # The weights are frozen and the hooks attached per pass: between passes a batch whose questions' cache
    # was not kept runs them again, for the same reason the questions ran before the weights were frozen.
    for chunk, forward, first_position in passes:
        with torch.enable_grad(), frozen_weights(model), read_hooks(model, hooks):
            logits = forward()
            objective = logits.new_zeros((), dtype=torch.float32)
            where = torch.zeros(logits.shape[:2], dtype=torch.bool)
            for row, (_, _, answer, sign) in enumerate(chunk):
                # Logits at position p predict token p + 1; the answer's first token is predicted where the
                # context ends (``first_position[row]``), unedited, and is a constant of the mean.
                start = first_position[row]
                read = logits[row, start + 1:start + len(answer)]
                if read.shape[0]:
                    logprobs = torch.log_softmax(read.float(), dim=-1)
                    target = torch.tensor(answer[1:], device=logprobs.device)[:, None]
                    objective = objective + sign * logprobs.gather(1, target).sum() / len(answer)
                # The edit acts at the answer tokens' positions (decode steps), not at the question's.
                where[row, start + 1:start + 1 + len(answer)] = True
            if objective.requires_grad:
                # The gradients go straight into ``per_pair``: none stays referenced into the next batch's
                # backward (an 8B model's: n_layers x answer tokens x d_mlp, about 1 GiB a batch in bfloat16).
                _add_gradients(per_pair, torch.autograd.grad(objective, [captured[layer] for layer in chosen],
                                                             allow_unused=True), where, chunk)
            del logits, objective
            captured.clear()
    return MarginGradients(per_pair, chosen)


def _add_gradients(per_pair: Float[Tensor, "pairs layers d_mlp"], grads: Sequence[Tensor | None],
                   where: Tensor, chunk: Sequence[tuple[int, list[int], list[int], float]]) -> None:
    """Add each row's gradient, summed over the positions ``where`` marks, to its pair's row of ``per_pair``."""
    for slot, grad in enumerate(grads):
        if grad is None:
            continue
        summed = (grad.float() * where.to(grad.device)[..., None]).sum(1).cpu()
        for row, (pair_index, _, _, _) in enumerate(chunk):
            per_pair[pair_index, slot] += summed[row]


_Pass = tuple[list[tuple[int, list[int], list[int], float]], Callable[[], Tensor], list[int]]
"""A batch's items, its forward pass (run with gradients: it returns the logits) and where each answer starts."""


def _plain_passes(model: HookedModel, items: list[tuple[int, list[int], list[int], float]], batch_tokens: int
                  ) -> Iterator[_Pass]:
    """Question and answer in one sequence per item (right-padded), longest first: the logits of every
    position; the answer's first token is predicted at ``len(question) - 1``."""
    pad, device = pad_token_id(model.tokenizer), input_device(model)
    order = sorted(range(len(items)), key=lambda i: -(len(items[i][1]) + len(items[i][2])))
    start = 0
    while start < len(order):
        longest = len(items[order[start]][1]) + len(items[order[start]][2])
        chunk = [items[i] for i in order[start:start + max(1, batch_tokens // longest)]]
        start += len(chunk)
        ids, mask = pad_token_lists([context + answer for _, context, answer, _ in chunk], pad, "right")
        yield (chunk, lambda: model(ids.to(device), attention_mask=mask.to(device)),
               [len(context) - 1 for _, context, _, _ in chunk])


def _question_cache(model: HookedModel, items: list[tuple[int, list[int], list[int], float]], batch_tokens: int,
                    cache_bytes: int | None = None) -> Any:
    """Each distinct question once, without gradients, into a key/value cache (a ``CachedAnswerScorer``)."""
    from dpn_lens.evaluation.answer_cache import CachedAnswerScorer

    return CachedAnswerScorer(model, [context for _, context, _, _ in items], [answer for _, _, answer, _ in items],
                              batch_tokens=batch_tokens, differentiable=True, cache_bytes=cache_bytes)


def _cached_passes(model: HookedModel, items: list[tuple[int, list[int], list[int], float]], scorer: Any
                   ) -> Iterator[_Pass]:
    """Each distinct question once, without gradients, into a key/value cache (``_question_cache``);
    then only the answer tokens run with gradients. A neuron at an answer position acts on later
    positions only, all of them answer positions, so the gradient is the plain path's at about half the
    tokens. The answer pass's position ``p`` holds answer token ``p``; its logits predict token ``p + 1``
    (the first answer token came from the question pass: position -1). Each pass gets a fresh per-item
    copy of the cache (``answer_pass_cache``, built here, before the pass's hooks and frozen weights)."""
    device = input_device(model)
    for batch in scorer.batches:
        chunk = [items[index] for index in batch.items]
        cache = scorer.answer_pass_cache(batch)
        yield (chunk, lambda: model(batch.answer_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                    position_ids=batch.position_ids.to(device), past_key_values=cache),
               [-1] * len(chunk))
        del cache   # a recomputed cache is freed before the next batch's questions run


def write_gradients(model: HookedModel, prompts: Sequence[str], directions: Float[Tensor, "n_layers d_model"],
                    layers: Sequence[int] | None = None, batch_size: int = 8) -> Float[Tensor, "n_layers d_mlp"]:
    """Mean over prompts of ``d(directions[l] . mlp_out_l) / d(neuron_l)`` at the last prompt token.

    Args:
        model: a hooked model.
        prompts: user messages (rendered through the chat template, as for collection).
        directions: one residual-stream direction per model layer (rows: all ``n_layers``); the write of
            layer ``l``'s neurons is measured along ``directions[l]``.
        layers: model layers to compute (None: all).

    Returns:
        ``[len(layers), d_mlp]`` float64. On a pre-norm model every row is ``W_out[l] @ directions[l]``.
    """
    if not prompts:
        raise ValueError("write_gradients needs at least one prompt")
    chosen = check_layers(model, None if layers is None else list(layers))
    n_layers = int(model.cfg.n_layers)
    if tuple(directions.shape) != (n_layers, int(model.cfg.d_model)):
        raise ValueError(f"directions must be [n_layers, d_model] = [{n_layers}, {model.cfg.d_model}], "
                         f"got {list(directions.shape)}")
    captured: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}

    def output_hook(layer: int):
        def hook(output: Tensor, hook: Any) -> Tensor:
            outputs[layer] = output
            # Detached downstream: later layers see the same values but carry no path back to this layer.
            return output.detach()
        return hook

    hooks = [(hook_name(layer), leaf_hook(captured, layer)) for layer in chosen]
    hooks += [(MLP_OUT_HOOK.format(layer=layer), output_hook(layer)) for layer in chosen]
    total = torch.zeros(len(chosen), int(model.cfg.d_mlp), dtype=torch.float64)
    count = 0
    with torch.enable_grad(), frozen_weights(model), read_hooks(model, hooks):
        for ids, mask, last in last_token_batches(model, prompts, batch_size):
            captured.clear()
            outputs.clear()
            model(ids.to(input_device(model)), attention_mask=mask.to(input_device(model)))
            rows = torch.arange(ids.shape[0])
            objective = sum((outputs[layer][rows, last.to(outputs[layer].device)].float()
                             @ directions[layer].to(outputs[layer].device, torch.float32)).sum() for layer in chosen)
            grads = torch.autograd.grad(objective, [captured[layer] for layer in chosen], allow_unused=True)
            for slot, grad in enumerate(grads):
                if grad is not None:
                    total[slot] += grad[rows, last.to(grad.device)].double().sum(0).cpu()
            count += ids.shape[0]
            del grads, objective    # none held into the next batch's backward (as margin_gradients)
            captured.clear()
            outputs.clear()
    return total / count
