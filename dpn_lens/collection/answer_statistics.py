"""Statistics at the answer tokens: the neurons that differ where a decode-time edit acts.

The paper reads ``blocks.{l}.mlp.hook_post`` at the last token of a persona-conditioned prompt. A
DPN-LE edit, however, acts while the model writes its answer (decode steps). This variant lets the
model answer each high- and each low-persona prompt (greedy), then averages every neuron's
activation over the answer tokens (teacher-forced, persona still in context) and compares the two
poles with the same s and Cohen's d. The result is an ordinary ``ContrastStatistics``
(``token_position="answer"``), so ``locate`` and everything after it are unchanged.

Example:
    >>> stats = answer_contrast_statistics(model, embedded_contrastive_set("openness", 200))   # doctest: +SKIP
    >>> neuron_map = locate(stats)                                                          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from dpn_lens.data.contrastive import ContrastiveSet
from dpn_lens.data.prompts import render_for_model
from dpn_lens.evaluation.logprobs import batched_logits
from dpn_lens.hooked import HOOK_NAME, HookedModel, check_layers, encode, hook_name, read_hooks
from dpn_lens.collection.statistics import ContrastStatistics, GroupStatistics

__all__ = ["answer_contrast_statistics", "answer_mean_activations"]

def answer_mean_activations(model: HookedModel, prompts: Sequence[list[int]], answers: Sequence[list[int]],
                            layers: Sequence[int], batch_tokens: int = 4096
                            ) -> Float[Tensor, "n n_layers d_mlp"]:
    """Per sequence, the mean ``hook_post`` activation over its answer tokens (prompt + answer teacher-forced).

    The activation at answer token t is read at the position of that token (the pass that writes the
    token after it), as a decode step of generation would compute it. Right padding keeps every real
    token at its unbatched position. Rows of empty answers are NaN.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt")
    sequences = [list(p) + list(a) for p, a in zip(prompts, answers)]
    result = torch.full((len(sequences), len(layers), int(model.cfg.d_mlp)), float("nan"), dtype=torch.float64)
    batch: dict[str, Any] = {}

    def on_batch(chunk: list[int]) -> None:
        # Per row, equal weights on the answer positions of that sequence (zero on its prompt and padding).
        positions = torch.arange(max(len(sequences[i]) for i in chunk))
        mask = torch.stack([(positions >= len(prompts[i])) & (positions < len(sequences[i])) for i in chunk])
        batch.update(chunk=chunk, weights=mask.double() / mask.sum(1, keepdim=True).clamp(min=1), means={})

    def reader(layer: int):
        def hook(activation: Tensor, hook) -> None:
            weights = batch["weights"].to(activation.device)
            batch["means"][layer] = torch.einsum("bp,bpd->bd", weights, activation.double()).cpu()
        return hook

    # The batching (longest first, right-padded to a token budget) is the log-prob scorer's own.
    with read_hooks(model, [(hook_name(layer), reader(layer)) for layer in layers]):
        # Empty spans: the logits are not needed, so none are copied off the model.
        for index, _ in batched_logits(model, sequences, batch_tokens, on_batch, spans=[(0, 0)] * len(sequences)):
            if answers[index]:
                row = batch["chunk"].index(index)
                result[index] = torch.stack([batch["means"][layer][row] for layer in layers])
    return result


def answer_contrast_statistics(model: HookedModel, contrastive_set: ContrastiveSet, max_new_tokens: int = 32,
                               batch_size: int = 16, layers: Sequence[int] | None = None) -> ContrastStatistics:
    """High/low statistics of the mean activation over each prompt's own greedy answer.

    Answers that are empty (EOS at once) are left out of their pole's statistics.
    """
    from dpn_lens.evaluation.preference import greedy_answers
    from dpn_lens.models import model_fingerprint

    chosen = check_layers(model, None if layers is None else list(layers))
    groups = {}
    for pole, texts in (("high", contrastive_set.high), ("low", contrastive_set.low)):
        prompts = [encode(model, render_for_model(model, text)) for text in texts]
        answers = greedy_answers(model, prompts, max_new_tokens, batch_size)
        means = answer_mean_activations(model, prompts, answers, chosen)
        kept = means[~torch.isnan(means[:, 0, 0])]
        if kept.shape[0] < 2:
            raise ValueError(f"{contrastive_set.trait} {pole}: only {kept.shape[0]} non-empty answers; use more pairs")
        stats = GroupStatistics.empty(len(chosen), int(model.cfg.d_mlp))
        stats.update(kept)
        groups[pole] = stats
    return ContrastStatistics(trait=contrastive_set.trait, high=groups["high"], low=groups["low"], layers=chosen,
                              hook_name=HOOK_NAME, token_position="answer", fingerprint=model_fingerprint(model).to_dict(),
                              source=f"{contrastive_set.source} (greedy answers, {max_new_tokens} tokens)")
