"""``greedy_generate(..., engine="raw")`` (``dpn_lens.raw_view``): Hugging Face's ``generate`` through the raw
modules with the active hooks moved onto them gives the bridge's tokens, steered or not; a hook on a point
without a raw counterpart falls back to the bridge; the bridge's components and the hooks are back afterwards,
also after an exception."""

from __future__ import annotations

import pytest
import torch

from dpn_lens import Intervention, steer
from dpn_lens.baselines.caa import ResidualIntervention
from dpn_lens.generation import greedy_generate
from dpn_lens.hooked import read_hooks
from dpn_lens.raw_view import Untranslatable, raw_modules, translated_hooks

PROMPTS = [[1, 5, 9, 12, 7], [1, 30, 4], [1, 22, 23, 24, 25, 26, 27], [1, 8]]


def _edits(model):
    d_mlp, d_model = int(model.cfg.d_mlp), int(model.cfg.d_model)
    return {"none": None,
            "decode-only neurons": Intervention({2: torch.full((d_mlp,), 0.5), 3: torch.linspace(-1, 1, d_mlp)}),
            "neurons at every position": Intervention({1: torch.linspace(-2, 2, d_mlp)}, positions="all"),
            "CAA residual": ResidualIntervention(1, torch.linspace(-2, 2, d_model), "all")}


@pytest.mark.parametrize("penalty", [1.0, 1.15])
def test_the_raw_engine_gives_the_bridges_tokens(tiny_model, monkeypatch, penalty):
    for name, edit in _edits(tiny_model).items():
        with steer(tiny_model, edit):
            bridge = greedy_generate(tiny_model, PROMPTS, 12, batch_size=4, repetition_penalty=penalty)
            with monkeypatch.context() as patch:      # the raw engine must not fall back to the bridge's loop
                patch.setattr(type(tiny_model), "generate", lambda *a, **k: pytest.fail("the bridge's loop ran"))
                raw = greedy_generate(tiny_model, PROMPTS, 12, batch_size=4, repetition_penalty=penalty,
                                      engine="raw")
        assert raw == bridge, name
    unsteered = greedy_generate(tiny_model, PROMPTS, 12, batch_size=4, engine="raw")
    with steer(tiny_model, _edits(tiny_model)["decode-only neurons"]):
        assert greedy_generate(tiny_model, PROMPTS, 12, batch_size=4, engine="raw") != unsteered   # it steers


def test_a_translated_reader_sees_every_forward_call(tiny_model):
    """``hook_embed`` moves onto ``embed_tokens``: one call for the prompt pass, one per later token."""
    counts = {}
    for engine in ("bridge", "raw"):
        calls = []
        with read_hooks(tiny_model, [("hook_embed", lambda activation, hook: calls.append(activation.shape[1]))]):
            greedy_generate(tiny_model, [[1, 5, 9, 12]], 6, engine=engine)
        counts[engine] = calls
    assert counts["raw"] == counts["bridge"] and counts["raw"][0] == 4 and len(counts["raw"]) >= 2


def test_a_hook_without_a_raw_counterpart_falls_back_to_the_bridge(tiny_model):
    seen = []
    with read_hooks(tiny_model, [("blocks.0.attn.hook_pattern", lambda pattern, hook: seen.append(1))]):
        with pytest.raises(Untranslatable, match="blocks.0.attn.hook_pattern"):
            with raw_modules(tiny_model) as raw, translated_hooks(tiny_model, raw):
                pass
        raw_tokens = greedy_generate(tiny_model, PROMPTS, 5, batch_size=4, engine="raw")
    assert seen                                         # the bridge ran, so its hook point fired
    assert raw_tokens == greedy_generate(tiny_model, PROMPTS, 5, batch_size=4)
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        greedy_generate(tiny_model, PROMPTS, 5, engine="fast")


def test_the_components_and_hooks_are_back_after_an_exception(tiny_model):
    edit = _edits(tiny_model)["decode-only neurons"]
    down_proj = None
    with steer(tiny_model, edit), pytest.raises(RuntimeError, match="inside"):
        with raw_modules(tiny_model) as raw, translated_hooks(tiny_model, raw):
            down_proj = raw.model.layers[2].mlp.down_proj
            assert type(raw.model.layers[0].mlp).__name__ == "LlamaMLP"
            assert down_proj._forward_pre_hooks
            raise RuntimeError("inside")
    assert type(tiny_model.original_model.model.layers[0].mlp).__name__ == "GatedMLPBridge"
    assert not down_proj._forward_pre_hooks
    assert not any(type(module).__name__ == "LlamaMLP" and module is tiny_model.original_model.model.layers[0].mlp
                   for module in tiny_model.original_model.modules())


@pytest.mark.slow
def test_the_raw_engine_gives_the_bridges_tokens_on_smollm2(smollm2):
    """The embedded model, steered, in a padded batch of 8 role-play prompts (float32)."""
    from dpn_lens import embedded_contrastive_set
    from dpn_lens.data.prompts import render_for_model
    from dpn_lens.hooked import encode

    prompts = [encode(smollm2, render_for_model(smollm2, q)) for q in embedded_contrastive_set("openness", 8).high]
    edit = Intervention({layer: torch.zeros(1536).index_fill_(0, torch.arange(0, 1536, 97), 2.0)
                         for layer in range(15, 30)})
    for condition in (None, edit):
        with steer(smollm2, condition):
            bridge = greedy_generate(smollm2, prompts, 24, batch_size=8)
            assert greedy_generate(smollm2, prompts, 24, batch_size=8, engine="raw") == bridge
