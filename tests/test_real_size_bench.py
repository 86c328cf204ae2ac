"""The GPU evidence script for real-size architectures (issue 25, ``benchmarks/bench_real_size.py``): its
architectures are LLaMA-3-8B's and Qwen2.5-7B's, and a tiny-scale run on the CPU goes through every section
(its timings mean nothing; the agreements it prints are checked). ``scripts/prepare_gpu_carry.py`` names what
the GPU image lacks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_real_size", ROOT / "benchmarks" / "bench_real_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch, billions", [("llama-3-8b", 8.03), ("qwen2.5-7b", 7.62)])
def test_the_architectures_are_the_papers_models(arch, billions, tiny_folder, tmp_path):
    """Written as a folder, each config has the published model's parameter count (LLaMA-3-8B 8.03B,
    Qwen2.5-7B 7.62B) and the borrowed tokenizer's special ids."""
    from transformers import AutoTokenizer

    from dpn_lens.plan import model_shape

    folder = _bench().architecture_folder(arch, Path(tiny_folder), tmp_path)
    shape = model_shape(str(folder))
    assert shape.n_params() == pytest.approx(billions * 1e9, rel=0.005)
    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"] == AutoTokenizer.from_pretrained(tiny_folder).eos_token_id


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_folder, tmp_path, monkeypatch):
    bench = _bench()
    monkeypatch.setitem(bench.ARCHITECTURES, "small", dict(bench.ARCHITECTURES["llama-3-8b"], vocab_size=10))
    with pytest.raises(ValueError, match="more than small's 10"):
        bench.architecture_folder("small", Path(tiny_folder), tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        bench.architecture_folder("llama-3-8b", tmp_path / "empty", tmp_path)


def test_a_tiny_run_goes_through_every_section(tiny_folder, tmp_path):
    out = tmp_path / "real_size.json"
    results = _bench().main(["--scale", "tiny", "--tokenizer", str(tiny_folder), "--device", "cpu",
                             "--dtype", "float32", "--pairs", "3", "--fit-pairs", "2", "--repeats", "1",
                             "--new-tokens", "3", "--batches", "1,2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert set(results["architectures"]) == {"llama-3-8b", "qwen2.5-7b"}
    for arch in results["architectures"].values():
        collection = arch["collection"]
        # the plain and the shared-prefix path give the same statistics (float32)
        assert collection["max_abs_mean_difference"] < 1e-5
        for path in collection["paths"].values():
            assert path["prompts_per_s"] > 0 and path["tflops"] > 0 and path["predicted_seconds"] > 0
        assert collection["paths"]["shared"]["calls"] > collection["paths"]["plain"]["calls"]
        for batch in ("1", "2"):
            row = json.loads(out.read_text())["architectures"][arch["arch"]]["generation"]["batches"][batch]
            assert row["same_tokens_as_hf"] is True and row["same_tokens_raw_and_bridge"] is True
            assert set(row["tokens_per_s"]) == {"hf", "default", "raw_steered", "raw_sdpa_steered", "bridge_steered"}
            assert row["default_engine"] == "raw-sdpa"                          # float32's
        # a DPN-LE-sized edit: about 0.5% of the neurons, on the later half of the layers
        assert arch["generation"]["edited_neurons"] == pytest.approx(0.005 * 2 * 192, abs=1)


def test_the_carry_names_transformer_lens(monkeypatch):
    """With only torch, transformers and numpy on the image, TransformerLens is among what must travel."""
    result = subprocess.run([sys.executable, "scripts/prepare_gpu_carry.py", "--list-only",
                             "--present", "torch,transformers,numpy"], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    carried = result.stdout.split("to carry:", 1)[1].split()
    assert any(pin.startswith("transformer-lens==") for pin in carried)
    assert not any(pin.startswith(("torch==", "transformers==", "numpy==")) for pin in carried)
