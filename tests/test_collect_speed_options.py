"""Behaviour of the speed-related parts of collection: batched tokenization, compact token storage,
the statistics device, reduced-precision models, and input checks. No timings (see benchmarks/)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dpn_lens import collect_group_statistics
from dpn_lens import hooked as hooked_module
from dpn_lens.collection.collect import CollectionConfig
from dpn_lens.hooked import tokenize_compact as _tokenize_compact, tokenize_prompts
from dpn_lens.data.prompts import render_for_model

from helpers import TINY_HIGH, TINY_LOW, TINY_WORDS, build_tiny_hf_model, build_tiny_model


def random_prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(2, 15))) for _ in range(n)]


def one_by_one(model, prompts: list[str]) -> list[list[int]]:
    """The reference: render and tokenize each prompt alone."""
    tokenizer = model.tokenizer
    result = []
    for prompt in prompts:
        text = render_for_model(model, prompt)
        result.append(tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token))["input_ids"])
    return result


def test_batched_tokenization_equals_one_prompt_at_a_time_across_chunks(tiny_model, monkeypatch):
    prompts = random_prompts(0, 11)
    monkeypatch.setattr(hooked_module, "_TOKENIZE_CHUNK", 4)  # 11 prompts -> chunks of 4, 4, 3
    assert tokenize_prompts(tiny_model, prompts) == one_by_one(tiny_model, prompts)


def test_prompts_that_already_start_with_bos_do_not_get_a_second_one(tiny_model):
    prompts = ["<s> you are kind", "you are kind"]
    ids = tokenize_prompts(tiny_model, prompts)
    bos = tiny_model.tokenizer.bos_token_id
    assert ids[0] == ids[1] and ids[0].count(bos) == 1 and ids == one_by_one(tiny_model, prompts)


def test_token_ids_are_stored_compactly(tiny_model):
    arrays = _tokenize_compact(tiny_model, TINY_HIGH)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.int32 for a in arrays)
    assert [a.tolist() for a in arrays] == tokenize_prompts(tiny_model, TINY_HIGH)


def test_an_empty_prompt_is_named_by_its_index_even_past_the_first_chunk(tiny_model, monkeypatch):
    monkeypatch.setattr(hooked_module, "_TOKENIZE_CHUNK", 2)
    with pytest.raises(ValueError, match="prompt #3 is empty"):
        tokenize_prompts(tiny_model, ["you", "are", "kind", "  "])


def test_statistics_come_back_on_the_cpu_whatever_statistics_device(tiny_model):
    default = collect_group_statistics(tiny_model, TINY_HIGH, CollectionConfig(progress=False))
    explicit = collect_group_statistics(tiny_model, TINY_HIGH,
                                        CollectionConfig(progress=False, statistics_device="cpu"))
    assert default.mean.device.type == "cpu" and default.mean.dtype == torch.float64
    assert torch.equal(default.mean, explicit.mean) and torch.equal(default.m2, explicit.m2)


def test_a_bad_statistics_device_is_an_error_naming_it(tiny_model):
    with pytest.raises(ValueError, match="statistics_device 'gpu-please'"):
        collect_group_statistics(tiny_model, TINY_HIGH,
                                 CollectionConfig(progress=False, statistics_device="gpu-please"))


@pytest.mark.parametrize("name, value", [("max_batch_size", 0), ("max_batch_size", 2.5), ("max_batch_tokens", -4),
                                         ("max_batch_size", True)])
def test_bad_batch_limits_are_errors_naming_them(tiny_model, name, value):
    with pytest.raises(ValueError, match=name):
        collect_group_statistics(tiny_model, TINY_HIGH, CollectionConfig(progress=False, **{name: value}))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_mean_position_batched_equals_unbatched_for_both_padding_sides(tiny_model, padding_side):
    prompts = random_prompts(1, 9)
    unbatched = collect_group_statistics(tiny_model, prompts,
                                         CollectionConfig(token_position="mean", max_batch_size=1, progress=False))
    batched = collect_group_statistics(tiny_model, prompts,
                                       CollectionConfig(token_position="mean", max_batch_size=4,
                                                        padding_side=padding_side, progress=False))
    torch.testing.assert_close(batched.mean, unbatched.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(batched.m2, unbatched.m2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("token_position", ["last", "mean"])
def test_a_bfloat16_model_gives_float64_statistics_close_to_float32(tmp_path, token_position):
    """Reduced model precision: activations are bf16, the statistics stay float64 and close."""
    full = build_tiny_model(tmp_path / "fp32", seed=3)
    half = build_tiny_model(tmp_path / "bf16", seed=3).to(torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    prompts = TINY_HIGH + TINY_LOW
    config = CollectionConfig(token_position=token_position, max_batch_size=4, progress=False)
    reference = collect_group_statistics(full, prompts, config)
    reduced = collect_group_statistics(half, prompts, config)
    assert reduced.mean.dtype == torch.float64 and reduced.count == reference.count
    # bf16 keeps ~3 significant digits; the scale is that of the activations themselves.
    scale = reference.mean.abs().max()
    assert (reduced.mean - reference.mean).abs().max() < 0.02 * scale
    # Not identical: the bf16 model really ran in bf16 (so this test cannot pass vacuously).
    assert not torch.equal(reduced.mean, reference.mean)


def test_hooks_are_removed_when_a_batch_fails_mid_run(tiny_model, monkeypatch):
    """A failure in the statistics update (after some batches) still removes every hook."""
    from dpn_lens.collection.statistics import GroupStatistics

    calls = []
    original = GroupStatistics.update

    def attached() -> int:
        return sum(len(module._forward_hooks) for module in tiny_model.modules())

    def failing_update(self, batch):
        calls.append(attached())
        if len(calls) == 2:
            raise FloatingPointError("injected")
        return original(self, batch)

    before = attached()
    monkeypatch.setattr(GroupStatistics, "update", failing_update)
    with pytest.raises(FloatingPointError, match="injected"):
        collect_group_statistics(tiny_model, random_prompts(2, 8), CollectionConfig(max_batch_size=2, progress=False))
    assert calls[0] == before + 4  # the four layer hooks were attached during the run ...
    assert attached() == before  # ... and are gone after the failure


def test_a_model_dispatched_with_a_device_map_collects_and_steers_the_same(tmp_path):
    """Placement through accelerate's device_map (here one layer offloaded to disk, the only split a
    CPU machine can make) leaves collection and steering unchanged: inputs go to the embedding's
    device, read-outs and deltas follow each layer's activation."""
    import warnings

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    from dpn_lens import Intervention, steer

    hf_model, tokenizer = build_tiny_hf_model(tmp_path)
    hf_model.save_pretrained(tmp_path / "hf")

    def boot(**placement):
        hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", **placement).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf_model, tokenizer=tokenizer)
        bridge.dpn_is_chat_model = False
        return bridge

    plain = boot()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "cpu", "model.layers.3": "disk"}
    placed = boot(device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert placed.original_model.hf_device_map["model.layers.3"] == "disk" and placed.cfg.n_devices == 2

    for token_position in ("last", "mean"):
        config = CollectionConfig(token_position=token_position, max_batch_size=4, progress=False)
        reference = collect_group_statistics(plain, TINY_HIGH, config)
        dispatched = collect_group_statistics(placed, TINY_HIGH, config)
        torch.testing.assert_close(dispatched.mean, reference.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(dispatched.m2, reference.m2, rtol=1e-5, atol=1e-6)

    delta = torch.zeros(48)
    delta[[3, 17]] = 1.5
    ids = tokenizer("you are kind . what would you do ?", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        unsteered = placed(ids)
        with steer(placed, Intervention({1: delta.clone(), 3: delta.clone()}, positions="all")):
            steered_placed = placed(ids)
        with steer(plain, Intervention({1: delta.clone(), 3: delta.clone()}, positions="all")):
            steered_plain = plain(ids)
    torch.testing.assert_close(steered_placed, steered_plain, rtol=0, atol=1e-5)
    assert (steered_placed - unsteered).abs().max() > 1e-3  # the edit did something
