"""Exports: each format, run in the runtime's own way, gives the logits of the hook edit at all positions."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from dpn_lens.cli import main
from dpn_lens.export import (export_bias_model, export_control_vector, export_edit, export_steering_vector,
                             exported_edit, load_steering_vector, residual_vectors)
from dpn_lens.hooked import encode
from dpn_lens.models import model_fingerprint
from dpn_lens.steering import Intervention, steer, steering_intervention
from dpn_lens.tiny import build_tiny_hf_model
from helpers import make_map

PROMPTS = ["you are a person who loves new ideas and travel .", "what would you do on the weekend ?"]


def _input_ids(model) -> torch.Tensor:
    ids = [encode(model, prompt) for prompt in PROMPTS]
    width = min(len(row) for row in ids)
    return torch.tensor([row[:width] for row in ids])


@contextlib.contextmanager
def _add_to_layer_outputs(hf_model, vectors: dict[int, torch.Tensor]):
    """What llama.cpp (control vectors) and steering-vectors (decoder_block) do: add to a block's output."""
    def make_hook(vector):
        def hook(_module, _inputs, output):
            if isinstance(output, tuple):
                return (output[0] + vector.to(output[0].dtype),) + tuple(output[1:])
            return output + vector.to(output.dtype)
        return hook

    handles = [hf_model.model.layers[layer].register_forward_hook(make_hook(vector))
               for layer, vector in vectors.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        output = model(ids)
    return (output.logits if hasattr(output, "logits") else output).float()


@pytest.fixture(scope="module")
def tiny_setup(tiny_model, tmp_path_factory):
    """The tiny bridge, a plain HF copy with the same weights, a map edit and the hook-edit logits."""
    plain, _ = build_tiny_hf_model(tmp_path_factory.mktemp("plain"))
    neuron_map = make_map("openness", {1: [3, 7], 3: [10]}, {2: [5], 3: [40]}, [1, 2, 3], n_layers=4, d_mlp=48,
                          fingerprint=model_fingerprint(tiny_model).to_dict())
    edit = steering_intervention(neuron_map, 4.0, "increase", positions="all")
    ids = _input_ids(tiny_model)
    with steer(tiny_model, edit):
        steered = _logits(tiny_model, ids)
    unsteered = _logits(tiny_model, ids)
    return tiny_model, plain.eval(), neuron_map, edit, ids, steered, unsteered


def test_the_plain_copy_and_the_bridge_agree_and_the_edit_moves_the_logits(tiny_setup):
    model, plain, _map, _edit, ids, steered, unsteered = tiny_setup
    assert (_logits(plain, ids) - unsteered).abs().max() < 1e-5
    assert (steered - unsteered).abs().max() > 0.05   # else the equivalence checks below prove nothing


def test_residual_vector_is_down_proj_times_delta(tiny_setup):
    model, plain, _map, edit, *_ = tiny_setup
    vectors = residual_vectors(model, edit)
    assert sorted(vectors) == [1, 2, 3]
    for layer, vector in vectors.items():
        expected = plain.model.layers[layer].mlp.down_proj.weight @ edit.deltas[layer]
        torch.testing.assert_close(vector, expected.detach())


def test_control_vector_reads_back_with_gguf_and_reproduces_the_edit(tiny_setup, tmp_path):
    import gguf

    model, plain, _map, edit, ids, steered, _ = tiny_setup
    path = export_control_vector(model, exported_edit(model, edit, trait="openness", gamma=4.0), tmp_path / "o.gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {name: field for name, field in reader.fields.items()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert bytes(fields["dpn_lens.positions"].parts[-1]).decode() == "all"
    assert int(fields["controlvector.layer_count"].parts[-1][0]) == 3
    vectors = {}
    for tensor in reader.tensors:
        assert tensor.name.startswith("direction.") and tensor.tensor_type == gguf.GGMLQuantizationType.F32
        vectors[int(tensor.name.split(".")[1])] = torch.from_numpy(tensor.data.copy())
    assert sorted(vectors) == [1, 2, 3]
    # llama.cpp adds direction.<l> to the output of layer l (0-based)
    with _add_to_layer_outputs(plain, vectors):
        exported = _logits(plain, ids)
    assert (exported - steered).abs().max() < 1e-4


def test_steering_vector_file_gives_steering_vectors_kwargs_that_reproduce_the_edit(tiny_setup, tmp_path):
    model, plain, _map, edit, ids, steered, _ = tiny_setup
    path = export_steering_vector(model, exported_edit(model, edit), tmp_path / "o.safetensors")
    loaded = load_steering_vector(path)
    kwargs = loaded if isinstance(loaded, dict) else {"layer_activations": loaded.layer_activations,
                                                      "layer_type": loaded.layer_type}
    assert kwargs["layer_type"] == "decoder_block" and sorted(kwargs["layer_activations"]) == [1, 2, 3]
    with _add_to_layer_outputs(plain, kwargs["layer_activations"]):
        exported = _logits(plain, ids)
    assert (exported - steered).abs().max() < 1e-4


def test_bias_model_reloads_with_from_pretrained_and_reproduces_the_edit(tiny_setup, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _plain, _map, edit, ids, steered, unsteered = tiny_setup
    out = export_bias_model(model, exported_edit(model, edit, trait="openness"), tmp_path / "biased")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.mlp_bias is True
    assert reloaded.model.layers[0].mlp.down_proj.bias.abs().max() == 0
    assert (_logits(reloaded, ids) - steered).abs().max() < 1e-4
    assert json.loads((out / "dpn_lens_edit.json").read_text())["positions"] == "all"
    # the bridge itself is untouched by the export
    assert (_logits(model, ids) - unsteered).abs().max() == 0


def test_exports_refuse_what_they_cannot_reproduce(tiny_setup, tmp_path):
    model, *_ = tiny_setup
    delta = torch.zeros(48)
    delta[2] = 1.0
    with pytest.raises(ValueError, match="cannot steer layer 0"):
        export_control_vector(model, exported_edit(model, Intervention({0: delta})), tmp_path / "zero.gguf")
    with pytest.raises(ValueError, match="changes no neuron"):
        export_edit(model, Intervention({1: torch.zeros(48)}), "steering-vectors", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export_edit(model, Intervention({1: delta}), "onnx", tmp_path / "x")
    with pytest.raises(ValueError, match="has 16 neurons but down_proj takes 48"):
        residual_vectors(model, Intervention({1: torch.ones(16)}))


def test_a_model_that_normalises_its_mlp_output_is_refused(tmp_path):
    """Gemma 3 adds a norm between the MLP and the residual sum: a layer-output vector is not the edit."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    gemma = Gemma3ForCausalLM(config)
    edit = Intervention({1: torch.ones(48)})
    for write, name in ((export_control_vector, "g.gguf"), (export_steering_vector, "g.safetensors")):
        with pytest.raises(ValueError, match="post_feedforward_layernorm"):
            write(gemma, exported_edit(gemma, edit), tmp_path / name)
    with pytest.raises(ValueError, match="no `mlp_bias` option"):
        export_bias_model(gemma, exported_edit(gemma, edit), tmp_path / "g")


def _tiny_without_mlp_bias(arch: str, **options):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **options)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
        with torch.no_grad():  # Qwen2's own q/k/v biases, non-zero, so that keeping them is checked
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return model.eval()
    return MistralForCausalLM(MistralConfig(**common)).eval()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_models_without_mlp_bias_are_saved_as_the_same_network_in_llama_form(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_without_mlp_bias(arch, **({"sliding_window": None} if arch == "mistral" else {}))
    generator = torch.Generator().manual_seed(1)
    edit = Intervention({1: torch.randn(48, generator=generator), 2: torch.randn(48, generator=generator)},
                        positions="all")
    exported = exported_edit(model, edit, trait="openness")
    ids = torch.randint(0, 64, (2, 12), generator=generator)
    unsteered = _logits(model, ids)
    # The edit's definition: its residual vector added to the MLP output of each edited layer.
    handles = [model.model.layers[layer].mlp.register_forward_hook(lambda _m, _i, out, v=vector: out + v)
               for layer, vector in exported.vectors.items()]
    try:
        steered = _logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()

    out = export_bias_model(model, exported, tmp_path / arch)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.mlp_bias is True
    assert (steered - unsteered).abs().max() > 0.05   # else the equality below proves nothing
    assert (_logits(reloaded, ids) - steered).abs().max() < 1e-5
    record = json.loads((out / "dpn_lens_edit.json").read_text())
    assert record["architecture"].endswith({"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[arch])
    assert (_logits(model, ids) - unsteered).abs().max() == 0   # the original is untouched


@pytest.mark.parametrize("arch, options", [("qwen2", {"use_sliding_window": True, "sliding_window": 8}),
                                           ("mistral", {"sliding_window": 8})])
def test_a_sliding_window_config_is_not_saved_as_llama(arch, options, tmp_path):
    model = _tiny_without_mlp_bias(arch, **options)
    with pytest.raises(ValueError, match="sliding-window attention \\(window 8\\)"):
        export_bias_model(model, exported_edit(model, Intervention({1: torch.ones(48)})), tmp_path / "x")


def test_cli_export_writes_each_format_and_says_all_positions(tiny_model, tmp_path, capsys, monkeypatch):
    neuron_map = make_map("openness", {1: [3]}, {2: [5]}, [1, 2], n_layers=4, d_mlp=48,
                          fingerprint=model_fingerprint(tiny_model).to_dict())
    map_path = neuron_map.save(tmp_path / "openness.safetensors")
    monkeypatch.setattr("dpn_lens.cli.export._load", lambda args: tiny_model)
    # The model is swapped in above, so --model's config (the default model's) is not the one that loads.
    monkeypatch.setattr("dpn_lens.models.check_map_before_loading", lambda neuron_map, spec: None)
    for fmt, out in (("gguf", "o.gguf"), ("steering-vectors", "o.safetensors"), ("hf-bias", "o-model")):
        status = main(["export", "--map", str(map_path), "--gamma", "2", "--direction", "decrease",
                       "--format", fmt, "--out", str(tmp_path / out)])
        assert status == 0 and (tmp_path / out).exists()
        assert "all-positions form" in capsys.readouterr().out
    assert main(["export", "--map", str(map_path), "--format", "gguf", "--out", str(tmp_path / "o.txt")]) == 2
    assert "a control vector is a .gguf file" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_exports_match_the_hook_edit(tmp_path):
    """SmolLM2-135M (float32): every format against the hook edit at all positions."""
    import gguf
    from transformers import AutoModelForCausalLM

    from dpn_lens.models import load_hf_model, load_model

    model = load_model("smollm2-135m-instruct")
    plain, _tokenizer, _ = load_hf_model("smollm2-135m-instruct")
    generator = torch.Generator().manual_seed(0)
    layers = list(range(12, 20))
    high = {layer: torch.randperm(1536, generator=generator)[:8].tolist() for layer in layers}
    low = {layer: torch.randperm(1536, generator=generator)[8:16].tolist() for layer in layers}
    neuron_map = make_map("openness", high, low, layers, n_layers=30, d_mlp=1536,
                          fingerprint=model_fingerprint(model).to_dict())
    edit = steering_intervention(neuron_map, 1.0, "increase", positions="all")
    ids = torch.tensor([encode(model, "What would you do on a free weekend? Tell me about it.")])
    with steer(model, edit):
        steered = _logits(model, ids)
    exported = exported_edit(model, edit)
    reader = gguf.GGUFReader(str(export_control_vector(model, exported, tmp_path / "o.gguf")))
    gguf_vectors = {int(t.name.split(".")[1]): torch.from_numpy(t.data.copy()) for t in reader.tensors}
    with _add_to_layer_outputs(plain, gguf_vectors):
        gguf_logits = _logits(plain, ids)
    sv = load_steering_vector(export_steering_vector(model, exported, tmp_path / "o.safetensors"))
    sv_vectors = sv["layer_activations"] if isinstance(sv, dict) else sv.layer_activations
    with _add_to_layer_outputs(plain, sv_vectors):
        sv_logits = _logits(plain, ids)
    biased = AutoModelForCausalLM.from_pretrained(export_bias_model(model, exported, tmp_path / "m")).eval()
    bias_logits = _logits(biased, ids)
    diffs = {name: float((logits - steered).abs().max())
             for name, logits in (("gguf", gguf_logits), ("steering-vectors", sv_logits), ("hf-bias", bias_logits))}
    print("max |logit diff| vs hook edit:", diffs, "| edit moves logits by",
          float((steered - _logits(plain, ids)).abs().max()))
    assert float((steered - _logits(plain, ids)).abs().max()) > 0.1
    assert all(diff < 2e-3 for diff in diffs.values()), diffs


def test_cli_export_refuses_a_negative_gamma_and_an_empty_map_before_loading_the_model(tiny_model, tmp_path, capsys,
                                                                                     monkeypatch):
    def no_load(args):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("dpn_lens.cli.export._load", no_load)
    neuron_map = make_map("openness", {1: [3]}, {2: [5]}, [1, 2], n_layers=4, d_mlp=48,
                          fingerprint=model_fingerprint(tiny_model).to_dict())
    map_path = neuron_map.save(tmp_path / "openness.safetensors")
    assert main(["export", "--map", str(map_path), "--gamma", "-2", "--direction", "increase",
                 "--format", "gguf", "--out", str(tmp_path / "o.gguf")]) == 2
    assert "direction='decrease'" in capsys.readouterr().err
    empty = make_map("openness", {}, {}, [1, 2], n_layers=4, d_mlp=48).save(tmp_path / "empty.safetensors")
    assert main(["export", "--map", str(empty), "--format", "gguf", "--out", str(tmp_path / "o.gguf")]) == 2
    assert "selects no neurons" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()
