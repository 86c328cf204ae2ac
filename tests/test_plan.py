"""``dpn-lens plan``: the work it predicts is the work collection does (forward calls and tokens, counted
on the tiny model), the parameter count is the model's, and the plan runs from a measurement."""

from __future__ import annotations

import json

import pytest
import torch

from dpn_lens.collect import CollectionConfig, collect_statistics
from dpn_lens.data.contrastive import embedded_contrastive_set
from dpn_lens.models import load_model
from dpn_lens.plan import MachineCosts, ModelShape, locate_work, measure_costs, model_shape, plan_locate, saved_costs


def test_the_shape_counts_the_models_matrix_parameters(tiny_folder):
    model = load_model(str(tiny_folder))
    hf = model.original_model
    matrices = sum(p.numel() for name, p in hf.named_parameters() if p.ndim == 2)
    shape = model_shape(str(tiny_folder))
    assert shape.n_params() == matrices
    assert (shape.n_layers, shape.d_mlp) == (model.cfg.n_layers, model.cfg.d_mlp)


@pytest.mark.parametrize("share", [False, True])
def test_locate_work_is_the_work_collection_does(tiny_folder, share):
    """Forward calls and tokens run (padding included, shared prefixes once) counted at the first block."""
    model = load_model(str(tiny_folder))
    pairs = embedded_contrastive_set("openness", n_pairs=12, seed=3)
    config = CollectionConfig(progress=False, share_prefix=share, max_batch_size=5)
    counted = {"calls": 0, "tokens_run": 0}

    def count(activation, hook):
        counted["calls"] += 1
        counted["tokens_run"] += activation.shape[0] * activation.shape[1]
        return activation

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", count)]):
        collect_statistics(model, pairs, config)
    work = locate_work(model, model_shape(str(tiny_folder)), [pairs], config)
    assert {key: work[key] for key in counted} == counted
    assert work["flops"] > 0 and work["tokens_in_prompts"] <= work["tokens_run"] + (work["tokens_in_prompts"] if share else 0)


def _costs(**changes) -> MachineCosts:
    values = dict(device="cpu", dtype="float32", threads=1, model="m", flops_per_s=1e9, seconds_per_call=0.01,
                  tokens_per_s=100.0, runtime_bytes=100 * 2 ** 20, startup_seconds=3.0, load_bytes_per_s=1e8,
                  load_peak_ratio=2.0, resident_ratio=1.2, locate_extra_bytes=2 ** 20, trait_seconds=0.5, measured="now")
    values.update(changes)
    return MachineCosts(**values)


def test_the_plan_adds_its_stages_from_the_measured_costs(tiny_folder):
    costs = _costs()
    plan = plan_locate(str(tiny_folder), ["openness", "neuroticism"], 10, costs=costs)
    load, locate = plan.stages
    weights = plan.shape.n_params() * 4
    assert load.seconds == pytest.approx(3.0 + weights / 1e8)
    assert locate.seconds > 2 * 0.5 and plan.seconds == pytest.approx(load.seconds + locate.seconds)
    assert load.peak_bytes == 100 * 2 ** 20 + 2 * weights and plan.peak_bytes == max(load.peak_bytes, locate.peak_bytes)
    # the locate stage: runtime, the weights as the loaded model keeps them, the batch, and the measured extra
    bare = plan_locate(str(tiny_folder), ["openness", "neuroticism"], 10, costs=None).stages[1].peak_bytes
    assert locate.peak_bytes == 100 * 2 ** 20 + bare + int(weights * 0.2) + 2 ** 20
    assert "in all" in plan.text() and "2 traits x 10 pairs" in plan.text()
    # Twice the pairs: more work, the same load.
    bigger = plan_locate(str(tiny_folder), ["openness", "neuroticism"], 20, costs=costs)
    assert bigger.stages[0].seconds == load.seconds and bigger.stages[1].seconds > locate.seconds
    # A measurement of another dtype says nothing about this one.
    assert plan_locate(str(tiny_folder), ["openness"], 10, dtype="bfloat16", costs=costs).seconds is None


def test_an_8b_config_alone_gives_a_memory_plan(tmp_path, tiny_folder):
    config = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
              "hidden_act": "silu"}
    shape = ModelShape.from_config(config)
    assert shape.n_params() == pytest.approx(8.03e9, rel=0.01)   # LLaMA-3-8B: 8.03B parameters
    folder = tmp_path / "llama8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_folder / name).exists():
            (folder / name).write_bytes((tiny_folder / name).read_bytes())
    plan = plan_locate(str(folder / "config.json"), ["openness"], 50, dtype="bfloat16")
    assert plan.seconds is None and plan.fits_gpus_gib[16] is False and plan.fits_gpus_gib[24] is True


def test_measure_costs_on_the_tiny_model_and_bad_input(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    costs = measure_costs(str(tiny_folder), n_prompts=6)
    assert costs.flops_per_s > 0 and costs.startup_seconds > 0 and costs.load_bytes_per_s > 0
    assert costs.trait_seconds >= 0 and costs.load_peak_ratio >= 0
    assert saved_costs("cpu", "float32", torch.get_num_threads()) == costs
    with pytest.raises(ValueError, match="unknown dtype"):
        plan_locate(str(tiny_folder), ["openness"], 10, dtype="int8")
    with pytest.raises(ValueError, match="n_pairs"):
        plan_locate(str(tiny_folder), ["openness"], 0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        plan_locate(str(tmp_path / "nowhere"), ["openness"], 10)


def test_the_plan_command_prints_a_plan(tiny_folder, tmp_path, monkeypatch, capsys):
    from dpn_lens.cli import main

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    assert main(["plan", "--model", str(tiny_folder), "--traits", "openness", "--n-pairs", "10"]) == 0
    out = capsys.readouterr().out
    assert "no measurement of this machine" in out and "1 traits x 10 pairs" in out and "fits on one GPU" in out


def test_the_plan_benchmark_compares_the_plan_with_a_real_locate_run(tiny_folder, tmp_path, monkeypatch):
    """benchmarks/bench_plan.py on the tiny model: it measures, plans, runs ``dpn-lens locate`` in a fresh
    process and reports both (the ratios are the benchmark's result, not checked here)."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_plan.py"
    spec = importlib.util.spec_from_file_location("bench_plan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--model", str(tiny_folder), "--traits", "openness", "--n-pairs", "4",
                          "--measure-prompts", "4"])
    assert result["measured_seconds"] > 0 and result["predicted_seconds"] > 0
    assert result["measured_peak_gib"] > 0.1 and 0 < result["memory_ratio"] < 10
