"""Reliability: bad input fails loudly with the fix in the message; hooks never leak."""

from __future__ import annotations

import pytest
import torch

from dpn_lens.collection.collect import CollectionConfig
import dpn_lens.collection.collect as collect_module
import dpn_lens.hooked as hooked_module
from dpn_lens import ContrastiveSet, collect_group_statistics, collect_statistics, steer, steering_intervention
from dpn_lens.localization.localize import locate
from helpers import attached_hooks, random_prompts


@pytest.fixture(scope="module")
def tiny_map(tiny_model):
    pairs = ContrastiveSet("openness", random_prompts(60, 10), random_prompts(61, 10))
    return locate(collect_statistics(tiny_model, pairs,
                                     CollectionConfig(progress=False)), q=0.8, tau_d=0.2, layers=[1, 2, 3])


def raise_on_call(n: int, error: BaseException):
    """A forward hook on a plain module that raises ``error`` on its ``n``-th call."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        if len(calls) == n:
            raise error
    return hook


# ---------------------------------------------------------------- bad input


def test_empty_and_whitespace_prompts_are_named(tiny_model):
    with pytest.raises(ValueError, match="prompt #1 is empty or whitespace; remove it or fill in its text"):
        collect_group_statistics(tiny_model, ["you are kind", "   "], CollectionConfig(progress=False))
    with pytest.raises(ValueError, match="prompt #0 is empty"):
        collect_group_statistics(tiny_model, [""], CollectionConfig(progress=False))


def test_prompt_longer_than_the_context_is_an_error_by_default_and_truncated_on_request(tiny_model):
    n_ctx = int(tiny_model.cfg.n_ctx)
    long_prompt = " ".join(["you are kind"] * n_ctx)
    with pytest.raises(ValueError, match=rf"more than the model's context of {n_ctx}.*truncation='left'"):
        collect_group_statistics(tiny_model, [long_prompt], CollectionConfig(progress=False))
    with pytest.warns(UserWarning, match=rf"truncated on the left to the context of {n_ctx}"):
        truncated = collect_group_statistics(tiny_model, [long_prompt, "you are kind"],
                                             CollectionConfig(layers=[2], truncation="left", progress=False))
    ids = tiny_model.tokenizer(long_prompt)["input_ids"][-n_ctx:]
    _, cache = tiny_model.run_with_cache(torch.tensor([ids]), names_filter="blocks.2.mlp.hook_post")
    short = collect_group_statistics(tiny_model, ["you are kind"], CollectionConfig(layers=[2], progress=False))
    expected = (cache["blocks.2.mlp.hook_post"][0, -1].double() + short.mean[0]) / 2
    torch.testing.assert_close(truncated.mean[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers, message", [
    ([4], r"layers \[4\] are out of range: this model has layers 0..3"),
    ([-1, 2], r"layers \[-1\] are out of range"),
    ([2, 1], "must be increasing and distinct"),
    ([], "no layers given"),
])
def test_layers_out_of_range_are_named(tiny_model, tiny_pairs, layers, message):
    with pytest.raises(ValueError, match=message):
        collect_statistics(tiny_model, tiny_pairs, CollectionConfig(layers=layers, progress=False))


def test_a_model_without_the_hook_point_is_named(tiny_model, tiny_pairs):
    with pytest.raises(ValueError, match=r"no hook point 'blocks.0.mlp.hook_act'.*dpn_lens.load_model.*hook_template="):
        collect_statistics(tiny_model, tiny_pairs,
                           CollectionConfig(hook_template="blocks.{layer}.mlp.hook_act", progress=False))


def test_a_bare_torch_module_is_refused_with_a_clear_message(tiny_pairs):
    with pytest.raises((TypeError, ValueError), match="TransformerBridge|load_model"):
        collect_statistics(torch.nn.Linear(4, 4), tiny_pairs, CollectionConfig(progress=False))


def test_steering_a_bare_torch_module_is_refused_with_a_clear_message(tiny_map):
    from dpn_lens import steering_intervention

    with pytest.raises(TypeError, match="needs a TransformerLens model.*dpn_lens.load_model.*got Linear"):
        with steer(torch.nn.Linear(4, 4), steering_intervention(tiny_map)):
            pass


def test_nan_in_activations_is_refused_naming_the_fix(tiny_model, tiny_pairs):
    def inject_nan(activation, hook):
        activation = activation.clone()
        activation[0, -1, 3] = float("nan")
        return activation

    before = attached_hooks(tiny_model)
    with tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", inject_nan)]):
        with pytest.raises(FloatingPointError, match="non-finite activation.*dtype='float32'"):
            collect_statistics(tiny_model, tiny_pairs, CollectionConfig(progress=False))
    assert attached_hooks(tiny_model) == before


def test_inf_in_activations_is_refused(tiny_model, tiny_pairs):
    def inject_inf(activation, hook):
        return activation.masked_fill(torch.zeros_like(activation, dtype=torch.bool).index_fill(-1, torch.tensor([5]), True),
                                      float("inf"))

    with tiny_model.hooks(fwd_hooks=[("blocks.2.mlp.hook_post", inject_inf)]):
        with pytest.raises(FloatingPointError, match="non-finite"):
            collect_statistics(tiny_model, tiny_pairs, CollectionConfig(layers=[2, 3], progress=False))


def test_bad_collect_options_are_named(tiny_model, tiny_pairs):
    with pytest.raises(ValueError, match="token_position must be 'last' or 'mean'"):
        collect_statistics(tiny_model, tiny_pairs, CollectionConfig(token_position="first", progress=False))
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        collect_statistics(tiny_model, tiny_pairs, CollectionConfig(padding_side="middle", progress=False))


# ---------------------------------------------------------------- hooks never leak


@pytest.mark.parametrize("error", [RuntimeError("hook failed"), KeyboardInterrupt()])
def test_no_hooks_left_after_a_failure_inside_the_forward_pass_of_collect(tiny_model, error):
    before = attached_hooks(tiny_model)
    handle = tiny_model.blocks[0].register_forward_hook(raise_on_call(3, error))   # third batch
    try:
        with pytest.raises(type(error)):
            collect_group_statistics(tiny_model, random_prompts(62, 10),
                                     CollectionConfig(max_batch_size=2, progress=False))
    finally:
        handle.remove()
    assert attached_hooks(tiny_model) == before


def test_no_hooks_left_after_keyboard_interrupt_between_batches_of_collect(tiny_model, monkeypatch):
    before = attached_hooks(tiny_model)
    calls = []
    real_update = collect_module.GroupStatistics.update

    def interrupted_update(self, batch):
        calls.append(1)
        if len(calls) == 2:
            assert attached_hooks(tiny_model) > before   # collection hooks are attached right now
            raise KeyboardInterrupt
        real_update(self, batch)

    monkeypatch.setattr(collect_module.GroupStatistics, "update", interrupted_update)
    with pytest.raises(KeyboardInterrupt):
        collect_group_statistics(tiny_model, random_prompts(63, 8), CollectionConfig(max_batch_size=2, progress=False))
    assert len(calls) == 2 and attached_hooks(tiny_model) == before


def test_no_hooks_left_after_a_tokenizer_that_raises_mid_run(tiny_model, tiny_pairs, monkeypatch):
    before = attached_hooks(tiny_model)
    calls = []
    real_render = hooked_module.render_for_model

    def failing_render(model, text, chat=None):
        calls.append(1)
        if len(calls) == 9:   # in the low pole, after the high pole was collected
            raise UnicodeError("tokenizer broke")
        return real_render(model, text, chat=chat)

    monkeypatch.setattr(hooked_module, "render_for_model", failing_render)
    with pytest.raises(UnicodeError):
        collect_statistics(tiny_model, tiny_pairs, CollectionConfig(progress=False))
    assert attached_hooks(tiny_model) == before


@pytest.mark.parametrize("error", [RuntimeError("generation failed"), KeyboardInterrupt()])
def test_no_hooks_left_after_a_failure_during_steered_generation(tiny_model, tiny_map, error):
    before = attached_hooks(tiny_model)
    tokens = torch.tensor([tiny_model.tokenizer("you are kind . what would you do ?")["input_ids"]])
    reference = tiny_model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False, return_type="tokens")
    handle = tiny_model.blocks[0].register_forward_hook(raise_on_call(4, error))   # during the third decode step
    try:
        with pytest.raises(type(error)):
            with steer(tiny_model, steering_intervention(tiny_map, gamma=50.0)):
                tiny_model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False)
    finally:
        handle.remove()
    assert attached_hooks(tiny_model) == before
    again = tiny_model.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False, return_type="tokens")
    assert torch.equal(again, reference)


def test_nested_steering_and_collection_leave_the_model_as_found(tiny_model, tiny_map, tiny_pairs):
    before = attached_hooks(tiny_model)
    edit = steering_intervention(tiny_map, gamma=2.0, positions="all")
    with steer(tiny_model, edit):
        steered = collect_statistics(tiny_model, tiny_pairs,
                                     CollectionConfig(progress=False))   # statistics of the steered model
        assert attached_hooks(tiny_model) == before + len(edit.deltas)
    plain = collect_statistics(tiny_model, tiny_pairs, CollectionConfig(progress=False))
    assert attached_hooks(tiny_model) == before
    row = tiny_map.layers[-1]
    assert not torch.equal(steered.high.mean[row], plain.high.mean[row])
