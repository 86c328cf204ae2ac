"""The raw engines of ``greedy_generate`` (``dpn_lens.raw_view``): Hugging Face's ``generate`` through the raw
modules with the active hooks moved onto them. The default, ``"raw"``, computes the bridge's logits bit for bit
and gives the bridge's tokens, steered or not, in float32 and bfloat16, with and without a repetition penalty;
``"raw-sdpa"`` gives them in float32. A hook on a point without a raw counterpart falls back to the bridge; the
bridge's components and the hooks are back afterwards, also after an exception."""

from __future__ import annotations

import pytest
import torch

from dpn_lens import Intervention, steer
from dpn_lens.baselines.caa import ResidualIntervention
from dpn_lens.generation import ENGINES, PenaltyInLogitsDtype, default_engine, generation_engine, greedy_generate
from dpn_lens.hooked import read_hooks
from dpn_lens.raw_view import Untranslatable, raw_modules, translated_hooks
from dpn_lens.tiny import build_tiny_model

PROMPTS = [[1, 5, 9, 12, 7], [1, 30, 4], [1, 22, 23, 24, 25, 26, 27], [1, 8]]


def _edits(model):
    d_mlp, d_model = int(model.cfg.d_mlp), int(model.cfg.d_model)
    return {"none": None,
            "decode-only neurons": Intervention({2: torch.full((d_mlp,), 0.5), 3: torch.linspace(-1, 1, d_mlp)}),
            "neurons at every position": Intervention({1: torch.linspace(-2, 2, d_mlp)}, positions="all"),
            "CAA residual": ResidualIntervention(1, torch.linspace(-2, 2, d_model), "all")}


@pytest.fixture(scope="module")
def tiny_bfloat16(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bf16")).to(torch.bfloat16)


def _bridges_loop_must_not_run(patch, model):
    patch.setattr(type(model), "generate", lambda *a, **k: pytest.fail("the bridge's loop ran"))


@pytest.mark.parametrize("penalty", [1.0, 1.15])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_raw_engine_gives_the_bridges_tokens(tiny_model, tiny_bfloat16, monkeypatch, penalty, dtype):
    model = tiny_model if dtype == "float32" else tiny_bfloat16
    engines = ["raw", "raw-sdpa"] if dtype == "float32" else ["raw"]
    for name, edit in _edits(model).items():
        with steer(model, edit):
            bridge = greedy_generate(model, PROMPTS, 12, batch_size=4, repetition_penalty=penalty, engine="bridge")
            for engine in engines:
                with monkeypatch.context() as patch:
                    _bridges_loop_must_not_run(patch, model)
                    raw = greedy_generate(model, PROMPTS, 12, batch_size=4, repetition_penalty=penalty, engine=engine)
                assert raw == bridge, (name, engine)
    unsteered = greedy_generate(model, PROMPTS, 12, batch_size=4)
    with steer(model, _edits(model)["decode-only neurons"]):
        assert greedy_generate(model, PROMPTS, 12, batch_size=4) != unsteered   # it steers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_raw_modules_compute_the_bridges_logits_bit_for_bit(tiny_model, tiny_bfloat16, dtype):
    """With the bridge's attention (the default engine) the raw modules are the same arithmetic; with sdpa
    they round differently (which is why ``"raw-sdpa"`` is an opt-in)."""
    from dpn_lens.generation import left_pad_with_own_token

    model = tiny_model if dtype == "float32" else tiny_bfloat16
    ids, mask = left_pad_with_own_token(PROMPTS)
    with torch.inference_mode():
        bridge = model.original_model(input_ids=ids, attention_mask=mask).logits
        with raw_modules(model, attention=None) as raw:
            same = raw(input_ids=ids, attention_mask=mask).logits
        with raw_modules(model, attention="sdpa") as raw:
            assert raw.config._attn_implementation == "sdpa"
            sdpa = raw(input_ids=ids, attention_mask=mask).logits
    assert model.original_model.config._attn_implementation == "eager"      # put back
    real = mask.bool()
    assert torch.equal(same[real], bridge[real])
    assert not torch.equal(sdpa[real], bridge[real])
    assert torch.allclose(sdpa[real].float(), bridge[real].float(), atol=0.1 if dtype == "bfloat16" else 1e-4)


def test_the_penalty_is_rounded_as_the_bridges_loop_rounds_it():
    """In bfloat16 a penalised logit can round onto its neighbour: 1.0 / 1.15 is 0.8696 in float32 (below
    0.8711) but 0.8711 in bfloat16 (a tie, which argmax gives to the first id). TransformerLens's loop
    penalises in the logits' dtype; Hugging Face's own processor in float32."""
    from transformer_lens.utilities.logits_utils import _apply_repetition_penalty
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[1.0, 0.87109375, -3.0, 0.5]], dtype=torch.bfloat16)
    seen = torch.tensor([[0, 2, 0]])
    bridges = _apply_repetition_penalty(logits, seen, 1.15)
    ours = PenaltyInLogitsDtype(1.15, torch.bfloat16)(seen, logits.float())
    assert torch.equal(ours, bridges.float())
    assert ours.argmax(-1).item() == 0
    assert RepetitionPenaltyLogitsProcessor(1.15)(seen, logits.float()).argmax(-1).item() == 1
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):                           # and on random logits, ids repeated
        logits = torch.randn(3, 50, generator=generator).to(torch.bfloat16)
        seen = torch.randint(0, 50, (3, 30), generator=generator)
        assert torch.equal(PenaltyInLogitsDtype(1.15, torch.bfloat16)(seen, logits.float()),
                           _apply_repetition_penalty(logits, seen, 1.15).float())


def test_the_dtype_chooses_the_default_engine_and_a_block_another(tiny_model, tiny_bfloat16, monkeypatch):
    """sdpa where it gives the bridge's tokens (float32), the bridge's own attention where it would not."""
    from dpn_lens.generation import same_answers_as_bridge

    from dpn_lens.generation import model_dtype

    assert model_dtype(tiny_bfloat16) == torch.bfloat16 and model_dtype(tiny_model) == torch.float32
    assert default_engine(torch.float32) == default_engine("float32") == "raw-sdpa"
    assert default_engine(torch.bfloat16) == default_engine("torch.float16") == default_engine() == "raw"
    attentions = []
    monkeypatch.setattr("dpn_lens.raw_view.raw_modules",
                        lambda model, attention="sdpa": attentions.append(attention) or raw_modules(model, attention))
    greedy_generate(tiny_model, PROMPTS, 3, batch_size=4)
    greedy_generate(tiny_bfloat16, PROMPTS, 3, batch_size=4)
    assert attentions == ["sdpa", None]
    with generation_engine("bridge"):
        attentions.clear()
        greedy_generate(tiny_model, PROMPTS, 3, batch_size=4)
        assert attentions == [] and default_engine("float32") == "bridge"
        with generation_engine(None):                       # the CLI without --engine
            assert default_engine("float32") == "raw-sdpa"
    assert default_engine("float32") == "raw-sdpa"
    assert [same_answers_as_bridge(engine, "torch.bfloat16") for engine in (None, "bridge", "raw", "raw-sdpa")] == [
        True, True, True, False]
    with pytest.raises(ValueError, match="unknown generation engine 'fast'"):
        with generation_engine("fast"):
            pass


def test_cached_answers_are_keyed_by_an_engine_only_where_its_answers_differ():
    """Earlier files (the bridge's loop) stay valid for every engine that answers as it did."""
    from dpn_lens.evaluation.preference import pairs_cache_path

    def path(engine, dtype):
        return pairs_cache_path("m", "r", dtype, "selection_pairs", "openness", engine=engine, pairs=8)

    for dtype in ("torch.float32", "torch.bfloat16"):
        assert path(None, dtype) == path("bridge", dtype) == path("raw", dtype)
    assert path("raw-sdpa", "torch.float32") == path(None, "torch.float32")
    assert path("raw-sdpa", "torch.bfloat16") != path(None, "torch.bfloat16")


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
    from dpn_lens.raw_view import _module

    with raw_modules(tiny_model) as raw:           # an architecture that names its modules otherwise
        assert _module(raw, "model.layers.1.mlp.down_proj") is raw.model.layers[1].mlp.down_proj
        with pytest.raises(Untranslatable, match="has no model.layers.1.mlp.c_proj"):
            _module(raw, "model.layers.1.mlp.c_proj")
    assert raw_tokens == greedy_generate(tiny_model, PROMPTS, 5, batch_size=4, engine="bridge")
    with pytest.raises(ValueError, match="unknown generation engine 'fast'"):
        greedy_generate(tiny_model, PROMPTS, 5, engine="fast")


def test_a_model_placed_by_accelerate_steers_the_same_through_its_hooks(tiny_model, tmp_path, monkeypatch):
    """``--device auto`` and ``device_map`` loads leave accelerate's hooks (``AlignDevicesHook``) on the raw
    modules; the raw engines run through them. Offloading two layers to disk puts such hooks on every module
    (weights on the meta device until a layer runs) on a machine without GPUs; the steered tokens must be the
    plain model's, with every engine."""
    from accelerate import dispatch_model
    from transformer_lens.model_bridge import TransformerBridge

    from dpn_lens.tiny import build_tiny_hf_model

    hf_model, tokenizer = build_tiny_hf_model(tmp_path / "tokenizer")      # the same weights as tiny_model
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                 "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                 "lm_head": "cpu"}
    hf_model = dispatch_model(hf_model, device_map=placement, offload_dir=str(tmp_path / "offload"))
    assert hf_model.model.layers[3].mlp.down_proj.weight.device.type == "meta"
    placed = TransformerBridge.boot_transformers("tiny-placed", hf_model=hf_model, tokenizer=tokenizer)
    placed.dpn_is_chat_model = False
    for name, edit in _edits(tiny_model).items():
        with steer(tiny_model, edit):
            expected = greedy_generate(tiny_model, PROMPTS, 12, batch_size=4, engine="bridge")
        with steer(placed, edit):
            for engine in ENGINES:
                with monkeypatch.context() as patch:
                    if engine != "bridge":
                        _bridges_loop_must_not_run(patch, placed)
                    tokens = greedy_generate(placed, PROMPTS, 12, batch_size=4, engine=engine)
                assert tokens == expected, (name, engine)
    assert hf_model.model.layers[3].mlp.down_proj.weight.device.type == "meta"   # still placed by accelerate


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
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_raw_engine_gives_the_bridges_tokens_on_smollm2(smollm2, dtype):
    """The embedded model, steered, in a padded batch of 8 role-play prompts, with the judge's repetition
    penalty. In bfloat16, where sdpa rounds answers apart, the default engine still gives the bridge's."""
    from dpn_lens import embedded_contrastive_set, load_model
    from dpn_lens.data.prompts import render_for_model
    from dpn_lens.hooked import encode

    from dpn_lens.generation import model_dtype

    model = smollm2 if dtype == "float32" else load_model("smollm2-135m-instruct", dtype=dtype)
    assert model_dtype(model) == getattr(torch, dtype)          # the bridge's cfg.dtype says float32 for both
    prompts = [encode(model, render_for_model(model, q)) for q in embedded_contrastive_set("openness", 8).high]
    edit = Intervention({layer: torch.zeros(1536).index_fill_(0, torch.arange(0, 1536, 97), 2.0)
                         for layer in range(15, 30)})
    for condition in (None, edit):
        with steer(model, condition):
            bridge = greedy_generate(model, prompts, 24, batch_size=8, repetition_penalty=1.15, engine="bridge")
            assert greedy_generate(model, prompts, 24, batch_size=8, repetition_penalty=1.15) == bridge
