"""Bridge greedy generation equals Hugging Face greedy generation.

This guards the ``transformers<5.24`` pin: 5.24.0's KV-cached generate through TransformerBridge
emits wrong tokens. The reference is ``transformers``' own ``generate`` on an independently loaded
model, so a regression on either side shows up as a token mismatch.
"""

from __future__ import annotations

import pytest
import torch

from helpers import build_tiny_hf_model

N_NEW = 20


def bridge_greedy(bridge, input_ids: torch.Tensor, n_new: int) -> list[int]:
    with torch.inference_mode():
        out = bridge.generate(input_ids, max_new_tokens=n_new, do_sample=False, use_past_kv_cache=True,
                              stop_at_eos=False, verbose=False, return_type="tokens")
    return out[0, input_ids.shape[1]:].tolist()


def hf_greedy(hf_model, input_ids: torch.Tensor, n_new: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n_new,
                                do_sample=False, num_beams=1, repetition_penalty=1.0)
    return out[0, input_ids.shape[1]:].tolist()


def assert_same_greedy_tokens(bridge_tokens: list[int], hf_tokens: list[int], eos_ids: set[int]) -> None:
    # HF stops at EOS; the bridge was told not to. Everything up to HF's stop must agree.
    assert len(hf_tokens) >= 10 or (hf_tokens and hf_tokens[-1] in eos_ids)
    assert bridge_tokens[:len(hf_tokens)] == hf_tokens


def test_tiny_model_bridge_greedy_equals_hf_greedy(tiny_model, tmp_path):

    # An independent HF copy of the tiny model's weights (the same builder and seed as the fixture).
    hf_model, _ = build_tiny_hf_model(tmp_path)
    input_ids = torch.tensor([tiny_model.tokenizer("you are outgoing . what would you do ?")["input_ids"]])
    hf_tokens = hf_greedy(hf_model, input_ids, N_NEW)
    assert_same_greedy_tokens(bridge_greedy(tiny_model, input_ids, N_NEW), hf_tokens, {2})


@pytest.mark.slow
def test_smollm2_bridge_greedy_equals_hf_greedy(smollm2):
    from dpn_lens.data import render_for_model
    from dpn_lens.models import load_hf_model

    hf_model, tokenizer, _ = load_hf_model("smollm2-135m-instruct")
    text = render_for_model(smollm2, "What would you do on a free Saturday afternoon?")
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    hf_tokens = hf_greedy(hf_model, input_ids, N_NEW)
    eos = {tokenizer.eos_token_id, *([hf_model.generation_config.eos_token_id]
                                      if isinstance(hf_model.generation_config.eos_token_id, int)
                                      else hf_model.generation_config.eos_token_id or [])}
    assert_same_greedy_tokens(bridge_greedy(smollm2, input_ids, N_NEW), hf_tokens, eos)


# Batched generation (dpn_lens.generation) gives every prompt the answer it gets alone.

QUESTIONS = ["you are outgoing . what would you do on the weekend ?", "how do you plan money ?", "yes",
             "a friend invites you to a party . how would you feel about it ?", "what would you do at home ?"]


def old_one_at_a_time(model, questions, persona, max_new_tokens, repetition_penalty) -> list[str]:
    """The reference: ``generate_answers`` as it was, one unpadded ``generate`` per question."""
    from dpn_lens.evaluation.logprobs import render
    from dpn_lens.hooked import encode

    answers = []
    for question in questions:
        ids = torch.tensor([encode(model, render(model, persona.wrap(question) if persona else question))])
        output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, verbose=False,
                                repetition_penalty=repetition_penalty)
        answers.append(model.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def decode_edit(model) -> "Intervention":
    from dpn_lens.steering import Intervention

    generator = torch.Generator().manual_seed(0)
    d_mlp = int(model.cfg.d_mlp)
    return Intervention({layer: 3.0 * torch.randn(d_mlp, generator=generator) for layer in (1, 2)}, "decode",
                        label="random decode-only edit")


@pytest.mark.parametrize("repetition_penalty", [1.15, 1.0])
@pytest.mark.parametrize("condition", ["none", "edit", "persona"])
def test_batched_answers_equal_one_at_a_time(tiny_model, condition, repetition_penalty):
    from dpn_lens.baselines.prompting import PersonaPrompt
    from dpn_lens.evaluation.judge import generate_answers
    from dpn_lens.steering import steer

    edit = decode_edit(tiny_model) if condition == "edit" else None
    persona = PersonaPrompt("extraversion", "increase", "you are outgoing and kind .") if condition == "persona" else None
    kwargs = dict(edit=edit, persona=persona, max_new_tokens=12, repetition_penalty=repetition_penalty)
    batched = generate_answers(tiny_model, QUESTIONS, batch_size=3, **kwargs)
    one_by_one = generate_answers(tiny_model, QUESTIONS, batch_size=1, **kwargs)
    assert batched == one_by_one
    with steer(tiny_model, edit):
        assert batched == old_one_at_a_time(tiny_model, QUESTIONS, persona, 12, repetition_penalty)
    assert sum(len(answer.split()) for answer in batched) > 20   # real answers, not EOS at once
    if condition == "edit":  # the edit acts (at decode steps) in the batched path too
        assert batched != generate_answers(tiny_model, QUESTIONS, max_new_tokens=12,
                                           repetition_penalty=repetition_penalty)


def favour_the_pad_token(pad_id: int):
    """Logits all positive, the pad id just ahead of the rest: a penalty on it changes the argmax."""
    def hook(logits, hook):
        logits = logits - logits.min(-1, keepdim=True).values + 10.0
        logits[..., pad_id] = logits.max(-1).values + 0.5
        return logits
    return [("unembed.hook_out", hook)]


def test_repetition_penalty_does_not_see_the_padding(tiny_model):
    # A pad id in a padded row would be penalised there and not for the same prompt alone. Here the
    # model prefers the pad id by a small margin, so a penalised pad changes the answer at once.
    from dpn_lens.generation import eos_ids, greedy_generate
    from dpn_lens.hooked import encode, pad_token_lists

    pad = tiny_model.tokenizer.pad_token_id
    assert pad not in eos_ids(tiny_model)
    prompts = [encode(tiny_model, q) for q in QUESTIONS]
    with tiny_model.hooks(fwd_hooks=favour_the_pad_token(pad)):
        batched = greedy_generate(tiny_model, prompts, max_new_tokens=4, batch_size=5, repetition_penalty=1.15)
        one_by_one = greedy_generate(tiny_model, prompts, max_new_tokens=4, batch_size=1, repetition_penalty=1.15)
        # The naive batch, padded with the tokenizer's pad id, gives other answers in its padded rows.
        ids, mask = pad_token_lists(prompts, pad, "left")
        naive = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, verbose=False,
                                    repetition_penalty=1.15, return_type="tokens")[:, -1]
    assert batched == one_by_one and all(answer[0] == pad for answer in one_by_one)
    padded = ~mask.bool().all(1)
    assert (naive[padded] != pad).all() and (naive[~padded] == pad).all()
