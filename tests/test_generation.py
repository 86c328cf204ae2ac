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
