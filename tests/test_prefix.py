"""Shared-prefix collection: the plan covers every prompt once, and the statistics equal the plain path."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import dpn_lens.collection.collect as collect_module
from dpn_lens import ContrastiveSet, collect_group_statistics, collect_statistics, embedded_contrastive_set, locate
from dpn_lens.collection.collect import CollectionConfig
from dpn_lens.hooked import tokenize_compact
from dpn_lens.collection.prefix import expand_cache, new_prefix_cache, plan_prefix_tree, prefix_cache_unsupported, tokens_run
from helpers import attached_hooks, build_tiny_model, random_prompts

CHAT_TEMPLATE = ("{% for message in messages %}<s> you are a kind person : {{ message['content'] }} ? "
                 "{% endfor %}{% if add_generation_prompt %}yes :{% endif %}")
"""A chat template in the tiny model's vocabulary: a shared header and a shared answer cue."""


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with room for the embedded role-play prompts and a chat template."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_model(tmp_path_factory.mktemp("tiny_prefix"), max_positions=512)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    return model


@pytest.fixture(scope="module")
def roleplay_pairs():
    """Embedded role-play prompts: 24 pairs, so persona descriptions repeat across prompts."""
    return embedded_contrastive_set("openness", n_pairs=24)


def _check_plan(plan, arrays):
    seen = []
    for group in plan.walk():
        assert 0 <= group.start <= group.end
        for child in group.children:
            assert child.start == group.end < child.end
        for index in group.members:
            seen.append(index)
            assert len(arrays[index]) > group.end  # the last token is always run
        members = [i for sub in group.walk() for i in sub.members]
        for index in members:  # every prompt below the group shares its cached tokens
            np.testing.assert_array_equal(arrays[index][:group.end], arrays[members[0]][:group.end])
    assert sorted(seen) == list(range(len(arrays)))


def test_the_plan_runs_every_prompt_once_and_shares_the_role_play_prefixes(chat_model, roleplay_pairs):
    for chat in (True, False):
        arrays = tokenize_compact(chat_model, roleplay_pairs.high, chat=chat)
        plan = plan_prefix_tree(arrays, min_saving=16)
        _check_plan(plan, arrays)
        total = sum(len(ids) for ids in arrays)
        assert plan.end > 10 and plan.children  # the instruction, then persona descriptions
        assert tokens_run(plan, arrays) < 0.7 * total


def test_the_plan_of_prompts_sharing_nothing_is_one_group_of_plain_prompts():
    arrays = [np.array(ids, dtype=np.int32) for ids in ([5, 1], [6, 1, 2], [7], [8, 8, 8])]
    plan = plan_prefix_tree(arrays)
    assert (plan.end, plan.children, sorted(plan.members)) == (0, [], [0, 1, 2, 3])
    assert tokens_run(plan, arrays) == sum(len(ids) for ids in arrays)  # nothing saved, nothing lost


def test_duplicates_and_prompts_that_are_prefixes_of_others_keep_their_last_token():
    arrays = [np.array(ids, dtype=np.int32) for ids in
              ([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9])]
    plan = plan_prefix_tree(arrays, min_saving=1)
    _check_plan(plan, arrays)
    assert plan.end == 2 and tokens_run(plan, arrays) < sum(map(len, arrays))


def test_min_saving_must_be_positive():
    with pytest.raises(ValueError, match="min_saving"):
        plan_prefix_tree([np.array([1, 2])], min_saving=0)
    with pytest.raises(ValueError, match="prefix_min_saving"):
        CollectionConfig(prefix_min_saving=0)


def test_expand_cache_leaves_the_prefix_cache_untouched(chat_model):
    assert prefix_cache_unsupported(chat_model) is None
    cache = new_prefix_cache(chat_model)
    with torch.inference_mode():
        chat_model(torch.tensor([[1, 4, 5, 6]]), past_key_values=cache)
        keys = cache.layers[0].keys.clone()
        batch = expand_cache(cache, 3)
        chat_model(torch.tensor([[7, 8], [9, 10], [11, 12]]), past_key_values=batch)
    assert batch.get_seq_length() == 6 and batch.layers[0].keys.shape[0] == 3
    assert cache.get_seq_length() == 4 and torch.equal(cache.layers[0].keys, keys)


def _assert_same_statistics(a, b):
    assert a.count == b.count
    scale = b.mean.abs().max()
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-5 * float(scale))
    torch.testing.assert_close(a.m2, b.m2, rtol=1e-5, atol=1e-5 * float(b.m2.abs().max()))


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_shared_prefix_statistics_equal_the_plain_path(chat_model, roleplay_pairs, chat, padding_side):
    base = dict(chat=chat, padding_side=padding_side, max_batch_size=5, progress=False)
    plain = collect_statistics(chat_model, roleplay_pairs, CollectionConfig(share_prefix=False, **base))
    before = attached_hooks(chat_model)
    shared = collect_statistics(chat_model, roleplay_pairs, CollectionConfig(prefix_min_saving=16, **base))
    assert attached_hooks(chat_model) == before
    for group in ("high", "low"):
        _assert_same_statistics(getattr(shared, group), getattr(plain, group))
    # The comparison is not vacuous: the plan really shares prefixes here, and activations differ.
    arrays = tokenize_compact(chat_model, roleplay_pairs.high, chat=chat)
    assert tokens_run(plan_prefix_tree(arrays, 16), arrays) < 0.7 * sum(map(len, arrays))
    assert float(plain.high.variance().max()) > 0


def test_shared_prefix_equals_plain_on_varied_prompts_and_layer_subsets(tiny_model):
    """Random word prompts share short prefixes only; a layer subset stops the prefix pass early."""
    pairs = ContrastiveSet("openness", ["you are kind . " + p for p in random_prompts(3, 10)],
                           ["you are blunt . " + p for p in random_prompts(4, 10)], source="tests")
    for layers in ([0, 1, 2, 3], [1, 2]):
        base = dict(layers=layers, max_batch_size=3, progress=False)
        plain = collect_statistics(tiny_model, pairs, CollectionConfig(share_prefix=False, **base))
        shared = collect_statistics(tiny_model, pairs, CollectionConfig(prefix_min_saving=1, **base))
        _assert_same_statistics(shared.high, plain.high)
        _assert_same_statistics(shared.low, plain.low)


def test_mean_position_runs_full_prompts(chat_model, roleplay_pairs):
    """The mean over prompt tokens needs every token's activation: share_prefix does not change it."""
    config = CollectionConfig(token_position="mean", progress=False)
    shared = collect_group_statistics(chat_model, roleplay_pairs.high[:6], config)
    plain = collect_group_statistics(chat_model, roleplay_pairs.high[:6],
                                     CollectionConfig(token_position="mean", share_prefix=False, progress=False))
    torch.testing.assert_close(shared.mean, plain.mean, rtol=0, atol=0)


def test_a_model_without_a_usable_cache_warns_once_and_runs_full_prompts(chat_model, roleplay_pairs, monkeypatch):
    monkeypatch.setattr(collect_module, "prefix_cache_unsupported", lambda model: "no cache here")
    prompts = roleplay_pairs.high[:4]
    with pytest.warns(UserWarning, match=r"shared-prefix collection is off for this model \(no cache here\)"):
        stats = collect_group_statistics(chat_model, prompts, CollectionConfig(progress=False))
    plain = collect_group_statistics(chat_model, prompts, CollectionConfig(share_prefix=False, progress=False))
    torch.testing.assert_close(stats.mean, plain.mean, rtol=0, atol=0)


def test_prefix_cache_unsupported_names_the_reason_for_a_model_that_is_not_a_bridge():
    class NotABridge:
        cfg = None
    assert "not a TransformerBridge" in prefix_cache_unsupported(NotABridge())


@pytest.mark.slow
def test_smollm2_float32_shared_prefix_gives_the_same_statistics_and_neuron_map(smollm2):
    pairs = embedded_contrastive_set("extraversion", n_pairs=12)
    base = dict(max_batch_size=16, progress=False)
    plain = collect_statistics(smollm2, pairs, CollectionConfig(share_prefix=False, **base))
    shared = collect_statistics(smollm2, pairs, CollectionConfig(**base))
    arrays = tokenize_compact(smollm2, pairs.high)
    assert tokens_run(plan_prefix_tree(arrays), arrays) < 0.8 * sum(map(len, arrays))
    for group in ("high", "low"):
        _assert_same_statistics(getattr(shared, group), getattr(plain, group))
    # The data-driven settings, and fixed settings that select neurons even from 12 pairs.
    for settings in ({}, dict(q=0.99, tau_d=0.3, layers=range(30))):
        a, b = locate(shared, **settings), locate(plain, **settings)
        for pole in ("high", "low"):
            assert getattr(a, pole).keys() == getattr(b, pole).keys()
            assert all(torch.equal(getattr(a, pole)[layer], getattr(b, pole)[layer]) for layer in getattr(b, pole))
    assert a.n_selected("high") + a.n_selected("low") > 0


@pytest.mark.slow
def test_gemma3_float32_shared_prefix_gives_the_same_statistics():
    """Gemma 3 mixes sliding-window and global attention layers; the cached prefix must still match."""
    from dpn_lens import load_model

    from dpn_lens.collection.prefix import prefix_cache_unsupported

    gemma = load_model("gemma-3-270m", dtype="float32")
    assert prefix_cache_unsupported(gemma) is None   # the shared path really runs (no silent fallback)
    pairs = embedded_contrastive_set("extraversion", n_pairs=6)
    base = dict(max_batch_size=16, progress=False)
    plain = collect_statistics(gemma, pairs, CollectionConfig(share_prefix=False, **base))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # a fallback to the plain path would warn
        shared = collect_statistics(gemma, pairs, CollectionConfig(**base))
    arrays = tokenize_compact(gemma, pairs.high)
    assert tokens_run(plan_prefix_tree(arrays), arrays) < 0.8 * sum(map(len, arrays))
    for group in ("high", "low"):
        _assert_same_statistics(getattr(shared, group), getattr(plain, group))


def test_auto_shares_prefixes_on_the_cpu_and_not_on_a_gpu(tiny_model, monkeypatch):
    """``share_prefix="auto"`` (the default): measured faster on CPU cores, slower on an H200."""
    import dpn_lens.collection.collect as collect

    auto, forced = CollectionConfig(progress=False), CollectionConfig(share_prefix=True, progress=False)
    assert auto.share_prefix == "auto"
    assert collect._shares_prefix(tiny_model, auto) and collect._shares_prefix(tiny_model, forced)
    monkeypatch.setattr(collect, "input_device", lambda model: torch.device("cuda", 0))
    assert not collect._shares_prefix(tiny_model, auto)
    assert collect._shares_prefix(tiny_model, forced), "True forces sharing on a GPU too"
    assert not collect._shares_prefix(tiny_model, CollectionConfig(share_prefix=False))
    with pytest.raises(ValueError, match="share_prefix must be True, False or 'auto'"):
        CollectionConfig(share_prefix="yes")
