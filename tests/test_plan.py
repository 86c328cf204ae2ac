"""``dpn-lens plan``: the work it predicts is the work collection does (forward calls and tokens, counted
on the tiny model), the parameter count is the model's, and the plan runs from a measurement."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

from dpn_lens.collection.collect import CollectionConfig, collect_statistics
from dpn_lens.data.contrastive import embedded_contrastive_set
from dpn_lens.models import load_model, model_fingerprint
from dpn_lens.plan import MachineCosts, ModelShape, locate_work, measure_costs, model_shape, plan_locate, saved_costs

from helpers import control_costs


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


def test_the_loaders_extras_are_bytes_measured_not_scaled_to_another_models_weights(tiny_folder):
    """An 8B model measured at 16.3 GiB where SmolLM2's ratios (3.4, 1.6) planned 51: the extras beyond the weights
    are what the measured model held, in bytes. Planned on the model measured, nothing changes; a file without
    the measured model's weights scales them as before; a model of another size says its times can be several times off."""
    weights = plan_locate(str(tiny_folder), ["openness"], 10, costs=_costs()).weights_bytes
    scaled = _costs()                                              # a file from before weights_bytes was recorded
    same = _costs(weights_bytes=weights)
    small = _costs(weights_bytes=weights // 10)
    plans = {name: plan_locate(str(tiny_folder), ["openness"], 10, costs=costs)
             for name, costs in (("scaled", scaled), ("same", same), ("small", small))}
    assert [stage.peak_bytes for stage in plans["scaled"].stages] == [stage.peak_bytes for stage in plans["same"].stages]
    load, locate = plans["small"].stages
    assert load.peak_bytes == 100 * 2 ** 20 + weights + (weights // 10)          # ratio 2.0 of the small model's bytes
    expected = plans["same"].stages[1].peak_bytes - weights * 0.2 + weights // 10 * 0.2   # resident ratio 1.2
    assert locate.peak_bytes == pytest.approx(expected, abs=2)
    assert "can be several times off" in plans["small"].text() and "can be several times off" not in plans["same"].text()
    assert "can be several times off" not in plans["scaled"].text()


def test_the_plan_command_measures_on_random_weights(tiny_folder, tmp_path, monkeypatch, capsys):
    """locate's and control's costs measured on a folder without weights; without --measure it refuses."""
    import shutil

    from dpn_lens.cli import main
    from dpn_lens.plan_control import saved_control_costs

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    bare = tmp_path / "bare"
    shutil.copytree(tiny_folder, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert main(["plan", "--model", str(bare), "--traits", "openness", "--n-pairs", "6", "--measure",
                 "--random-weights"]) == 0
    out = capsys.readouterr().out
    assert f"measured on {bare}" in out and "in all" in out
    costs = saved_costs("cpu", "float32", torch.get_num_threads())
    assert costs.model == str(bare) and costs.weights_bytes == plan_locate(str(bare), ["openness"], 6).weights_bytes
    # the path of its config.json, as plan's --model also takes it, measures the same folder
    assert main(["plan", "--model", str(bare / "config.json"), "--traits", "openness", "--n-pairs", "6", "--measure",
                 "--random-weights"]) == 0
    assert saved_costs("cpu", "float32", torch.get_num_threads()).weights_bytes == costs.weights_bytes
    assert main(["plan", "--stage", "control", "--model", str(bare), "--traits", "openness", "--measure",
                 "--random-weights"]) == 0
    out = capsys.readouterr().out
    assert f"measured control's costs on {bare}" in out and "KL curves (1 traits)" in out
    control_costs = saved_control_costs("cpu", "float32", torch.get_num_threads())
    assert control_costs.model == str(bare) and control_costs.answer_flops_per_s > 0
    for stage in ("locate", "control"):
        assert main(["plan", "--model", str(bare), "--random-weights", "--stage", stage]) != 0
        assert "--random-weights says what the measurement loads: add --measure" in capsys.readouterr().err


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


def _bench_plan():
    """``benchmarks/bench_plan.py`` as a module (``benchmarks/`` is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_plan.py"
    spec = importlib.util.spec_from_file_location("bench_plan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plan_benchmark_compares_the_plan_with_a_real_locate_run(tiny_folder, tmp_path, monkeypatch):
    """benchmarks/bench_plan.py on the tiny model: it measures, plans, runs ``dpn-lens locate`` in a fresh
    process and reports both (the ratios are the benchmark's result, not checked here)."""

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    module = _bench_plan()
    result = module.main(["--model", str(tiny_folder), "--traits", "openness", "--n-pairs", "4",
                          "--measure-prompts", "4"])
    assert result["measured_seconds"] > 0 and result["predicted_seconds"] > 0
    assert result["measured_peak_gib"] > 0.1 and 0 < result["memory_ratio"] < 10


def test_the_plan_benchmark_runs_an_architecture_without_its_weights(tiny_folder, tmp_path, monkeypatch):
    """``--random-weights``: the config and tokenizer only (the weights file removed), measured in a fresh process
    and located with ``dpn-lens locate --random-weights``; ``--measure-on``: costs from another model, scaled. Each
    reports the locate stage apart from start-up and load (the run's summary.json has each trait's seconds)."""
    import shutil

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    bare = tmp_path / "bare"
    shutil.copytree(tiny_folder, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    module = _bench_plan()
    for extra in (["--random-weights"], ["--random-weights", "--measure-on", str(tiny_folder)]):
        result = module.main(["--model", str(bare), "--traits", "openness", "--n-pairs", "4", "--measure-prompts", "4",
                              *extra])
        assert result["random_weights"] and result["measured_on"] == (extra[-1] if len(extra) > 1 else str(bare))
        stages = {row["stage"]: row for row in result["stage_comparison"]}
        # the tiny model's trait can take under the 0.05 s that summary.json's rounding keeps
        assert stages["locate"]["measured s"] >= 0 and stages["locate"]["predicted s"] > 0
        assert stages["start-up and model load"]["measured s"] > 0
    with pytest.raises(RuntimeError, match="locate failed"):   # without --random-weights there is nothing to load
        module.measured_locate(str(bare), "openness", 4, "float32")
    from dpn_lens.plan import model_shape                         # --arch's folder: the architecture, no weights

    folder = module.architecture_folder("qwen2.5-7b", tiny_folder, tmp_path / "arch")
    assert model_shape(str(folder)).n_params() == pytest.approx(7.62e9, rel=0.01)
    assert not list(folder.glob("*.safetensors"))


# ----- the control stage ---------------------------------------------------------------------------------------
def test_control_work_counts_the_passes_control_makes(tiny_model, tmp_path, monkeypatch):
    """The probe, answer and persona passes ``run_control`` makes on the tiny model, counted at the calls,
    equal ``control_work`` of the run (its curves and points); the plan's bound (every grid point, every
    level) is at least that."""
    from dpn_lens.evaluation import calibrate, metrics
    from dpn_lens.evaluation.control import ControlConfig, run_control
    from dpn_lens.plan_control import ControlSettings, control_work
    from helpers import make_map, write_personalitybench

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    counted = {"probe": 0, "answers": 0, "persona": 0}
    real_probe, real_score = calibrate.KLProbe.__call__, metrics.PreferenceMargin.score

    def probe(self, edit):
        counted["probe"] += 1
        return real_probe(self, edit)

    def score(self, model, edit, items, persona=None):
        # every margin the run measures goes through the preference metric: with a persona (the positive
        # control) or without (the unsteered and every edited pass over the answers)
        counted["answers" if persona is None else "persona"] += 1
        return real_score(self, model, edit, items, persona)

    monkeypatch.setattr(calibrate.KLProbe, "__call__", probe)
    monkeypatch.setattr(metrics.PreferenceMargin, "score", score)
    config = ControlConfig(traits=["extraversion"], methods=["dpn-le", "caa"], data_dir=str(write_personalitybench(
        tmp_path / "data")), pairs=8, max_new_tokens=5, gammas=[0.125, 0.5, 2, 8], kl_levels=[0.005, 0.01],
        target_kl=0.01, random_draws=2, kl_chunks=2, kl_tokens=24, caa_pairs=6)
    neuron_map = make_map("extraversion", {1: [3, 7, 11]}, {2: [5, 9, 20]}, [1, 2], n_layers=int(tiny_model.cfg.n_layers),
                          d_mlp=int(tiny_model.cfg.d_mlp), fingerprint=model_fingerprint(tiny_model).to_dict())
    result = run_control(tiny_model, config, log=lambda line: None, progress=False, maps={"extraversion": neuron_map})
    settings = ControlSettings(config, maps_given=True, rule_maps_given=True)
    exact = control_work(settings, run=result)
    assert (counted["probe"], counted["answers"], counted["persona"]) == \
        (exact.probe_passes, exact.answer_passes, exact.persona_passes)
    bound = control_work(settings)
    assert bound.probe_passes >= exact.probe_passes and bound.answer_passes >= exact.answer_passes
    assert bound.probe_passes == 1 + 2 * 2 * (4 + 2) + 2 * 1 * (2 + 1)    # floor, 2 curves x 2 directions, draws


def test_the_control_plan_has_a_stage_per_kind_of_work_and_scales_with_it(tiny_folder):
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan_control import ControlSettings, plan_control

    methods = ["dpn-le", "attribution-t", "caa"]
    settings = ControlSettings(ControlConfig(methods=methods, pairs=16), maps_given=True)
    plan = plan_control(str(tiny_folder), ["openness", "neuroticism"], settings, costs=control_costs(),
                        machine=_costs())
    names = [stage.name for stage in plan.stages]
    assert names == ["start-up and model load", "held-out pairs (2 traits)", "selection (2 traits)",
                     "KL curves (2 traits)", "answer scoring (2 traits)", "persona control (2 traits)",
                     "method preparation (2 traits)"]
    assert all(stage.seconds > 0 for stage in plan.stages)
    # Maps of every rule and cached pairs: no selection, no generation; no maps: a locate stage.
    given = plan_control(str(tiny_folder), ["openness", "neuroticism"],
                         ControlSettings(ControlConfig(methods=methods, pairs=16), maps_given=True,
                                         rule_maps_given=True, pairs_cached=True), costs=control_costs(), machine=_costs())
    assert [s.name for s in given.stages][1:] == names[3:] and given.seconds < plan.seconds
    assert "locate (DPN-LE maps)" in [s.name for s in plan_control(
        str(tiny_folder), ["openness"], ControlSettings(ControlConfig(methods=["dpn-le"])), costs=control_costs(),
        machine=_costs()).stages]
    # Twice the pairs: twice the answer-scoring time; half the probe rate: twice the curves' time.
    double = plan_control(str(tiny_folder), ["openness", "neuroticism"],
                          ControlSettings(ControlConfig(methods=methods, pairs=32), maps_given=True),
                          costs=control_costs(probe_flops_per_s=5e8), machine=_costs())
    by_name = {s.name: s.seconds for s in plan.stages}
    doubled = {s.name: s.seconds for s in double.stages}
    assert doubled["KL curves (2 traits)"] == pytest.approx(2 * by_name["KL curves (2 traits)"])
    assert doubled["answer scoring (2 traits)"] > 1.9 * by_name["answer scoring (2 traits)"]
    # Another device's measurement gives no times, and no memory of the passes: the plan says its peaks are
    # lower bounds (an unmeasured Gemma plan once printed ~1 GiB for a selection that peaked near 10 GB).
    unmeasured = plan_control(str(tiny_folder), ["openness"], settings, device="cuda", costs=control_costs())
    assert unmeasured.seconds is None
    assert all(stage.peak_is_lower_bound for stage in unmeasured.stages[1:])
    assert "selection (1 traits): time unknown (no measurement for this device and dtype); peak memory at least" \
        in unmeasured.text()
    assert not any(stage.peak_is_lower_bound for stage in plan.stages) and "at least" not in plan.text()


def test_only_a_run_that_selects_a_rule_is_planned_to_hold_the_gradient_passs_memory(tiny_folder):
    """The gradient pass of the attribution rules is the largest on a large vocabulary (Gemma's): a run
    whose rule maps are given never makes it, and its plan once overstated Gemma's peak by half."""
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan_control import ControlSettings, plan_control

    config = ControlConfig(methods=["dpn-le", "attribution-t", "caa"], pairs=16)
    selecting = plan_control(str(tiny_folder), ["openness"], ControlSettings(config, maps_given=True),
                             costs=control_costs(), machine=_costs())
    given = plan_control(str(tiny_folder), ["openness"], ControlSettings(config, maps_given=True, rule_maps_given=True),
                         costs=control_costs(), machine=_costs())
    peaks = {stage.name: stage.peak_bytes for stage in selecting.stages}
    # 16 pairs x 2 answers x (40 question + 0.8 x 48 answer tokens) fill 2509 of the scorer's 4096-token
    # batches; 128 selection pairs fill the gradient's 2048-token batches (the sample fills both). The
    # selection holds at least the estimate of the pass over the run's own batches (``gradient_memory``).
    from dpn_lens.effect.rules import SELECTION_TOKENS
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import gradient_memory, selection_batches

    estimate = gradient_memory(model_shape(str(tiny_folder)), "float32",
                               selection_batches(str(tiny_folder), 128, SELECTION_TOKENS), 128, cpu_heap=True).total
    answer_extra, selection_extra = int(2 ** 20 * 32 * 78.4 / 4096), 2 ** 22
    # the scoring stages also hold the held-out questions' cache (``scoring_cache``), counted from the run's questions
    from dpn_lens.plan_control import prompt_tokens_of, scoring_cache

    costs = control_costs()
    questions = scoring_cache(model_shape(str(tiny_folder)), "float32", config,
                              prompt_tokens_of(str(tiny_folder), ["openness"], config, costs), costs.answer_steps)
    assert questions.kept_bytes > 0 and questions.recomputed == 0
    assert estimate > selection_extra
    assert peaks["selection (1 traits)"] - peaks["answer scoring (1 traits)"] == pytest.approx(
        estimate - answer_extra - questions.kept_bytes, abs=2)
    larger = plan_control(str(tiny_folder), ["openness"], ControlSettings(config, maps_given=True),
                          costs=control_costs(selection_extra_bytes=2 ** 30), machine=_costs())
    assert larger.peak_bytes - peaks["answer scoring (1 traits)"] == pytest.approx(
        2 ** 30 - answer_extra - questions.kept_bytes, abs=2)
    assert selecting.peak_bytes == peaks["selection (1 traits)"]
    assert given.peak_bytes == peaks["answer scoring (1 traits)"] < selecting.peak_bytes


def test_an_unmeasured_plan_still_counts_the_gradient_passs_logits_from_the_vocabulary(tiny_folder):
    """Without a measurement the selection's peak was weights and reference logits only (~1 GiB printed
    for a Gemma selection that used 10 GB); the logits' share of the gradient pass needs only the
    vocabulary, and a run whose rule maps are given does not make that pass."""
    from dpn_lens.effect.gradients import margin_gradients
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import ControlSettings, gradient_logits_bytes, plan_control

    config = ControlConfig(methods=["dpn-le", "attribution-t", "caa"], pairs=16, selection_pairs=64)
    selecting = plan_control(str(tiny_folder), ["openness"], ControlSettings(config, maps_given=True), device="cuda")
    peaks = {stage.name: stage.peak_bytes for stage in selecting.stages}
    shape = model_shape(str(tiny_folder))
    # 64 pairs x 2 answers x 48 tokens fill the pass's 2048-token batch.
    assert inspect.signature(margin_gradients).parameters["batch_tokens"].default == 2048
    assert peaks["selection (1 traits)"] - peaks["answer scoring (1 traits)"] == gradient_logits_bytes(
        shape, "float32", 2048) == 2048 * shape.vocab * 12
    assert all(stage.peak_is_lower_bound for stage in selecting.stages[1:])
    few = plan_control(str(tiny_folder), ["openness"],
                       ControlSettings(dataclasses.replace(config, selection_pairs=4), maps_given=True), device="cuda")
    assert {s.name: s.peak_bytes for s in few.stages}["selection (1 traits)"] - peaks["answer scoring (1 traits)"] == \
        gradient_logits_bytes(shape, "float32", 2 * 4 * 48)
    given = plan_control(str(tiny_folder), ["openness"],
                         ControlSettings(config, maps_given=True, rule_maps_given=True), device="cuda")
    assert given.peak_bytes == peaks["answer scoring (1 traits)"] < selecting.peak_bytes
    with pytest.raises(ValueError, match="unknown dtype"):
        gradient_logits_bytes(shape, "int8", 10)


def test_the_measured_extra_memory_scales_with_how_full_a_runs_batches_are(tiny_folder):
    """The sample's 12 pairs half-fill a scoring batch; a run of 64 pairs fills it: the extra memory of its
    answer passes is the sample's times the ratio, and no more once the batch is full."""
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import ControlSettings, plan_control, prompt_tokens_of, scoring_cache

    costs = control_costs(sample_tokens=2048.0, extra_bytes=2 ** 24)

    def peak(pairs: int, questions_cache: bool = False) -> int:
        """The plan's peak, less the held-out questions' cache (which grows with the pairs) unless asked."""
        config = ControlConfig(methods=["dpn-le", "caa"], pairs=pairs)
        planned = plan_control(str(tiny_folder), ["openness"], ControlSettings(config, maps_given=True),
                               machine=_costs(), costs=costs).peak_bytes
        cache = scoring_cache(model_shape(str(tiny_folder)), "float32", config,
                              prompt_tokens_of(str(tiny_folder), ["openness"], config, costs), costs.answer_steps)
        return planned if questions_cache else planned - cache.kept_bytes

    per_pair = 2 * 78.4                                     # two answers with their questions, tokens
    assert peak(26) - peak(13) == pytest.approx(2 ** 24 * 13 * per_pair / 2048, abs=2)
    assert peak(128) == peak(64)                            # 64 pairs already fill the 4096-token batch
    assert peak(128, questions_cache=True) > peak(64, questions_cache=True)     # the cache keeps growing


def test_greedy_generations_memory_scales_with_its_largest_prompt_pass_not_with_the_answer_batches(tiny_folder):
    """Gemma 3 270M (bfloat16): a 16-row generation after 133-token persona prompts adds 1.07 GiB, after
    238-token ones 1.84, where the sample's answer passes held 0.74; scaled as answer batches, the plan said
    5.57 GiB for a run that held 3.70. Generation's memory is counted apart: the sample's times the run's
    largest batch's rows x padded tokens over the sample's; the larger of it and the passes' counts. Nothing
    generated (the pairs cached), nothing counted; an older file, whose passes' memory held generation's,
    plans as before."""
    import dataclasses

    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.evaluation.preference import PairScorer
    from dpn_lens.plan_control import (ControlSettings, _batch_scale, control_work, generation_peak_bytes,
                                       plan_control, prompt_tokens_of)

    older = control_costs(sample_tokens=2048.0, extra_bytes=2 ** 24)
    costs = dataclasses.replace(older, generation_extra_bytes=2 ** 28, generation_batch_tokens=16 * 100.0)
    config = ControlConfig(methods=["dpn-le", "caa"], pairs=32)

    def peak(costs, **settings) -> int:
        return plan_control(str(tiny_folder), ["openness"], ControlSettings(config, maps_given=True, **settings),
                            machine=_costs(), costs=costs).peak_bytes

    prompts = prompt_tokens_of(str(tiny_folder), ["openness"], config, costs)
    work = control_work(ControlSettings(config, maps_given=True))
    largest = min(config.pair_batch, work.generated_answers) * max(prompts.held_out)
    assert generation_peak_bytes(costs, work, config, prompts) == int(2 ** 28 * largest / 1600)
    per_answer = older.prompt_tokens + older.answer_fill * config.max_new_tokens
    passes = int(older.extra_bytes * _batch_scale(PairScorer, 2 * config.pairs * per_answer, older))
    generation = generation_peak_bytes(costs, work, config, prompts)
    assert generation > passes and peak(costs) - peak(older) == generation - passes
    cached = control_work(ControlSettings(config, maps_given=True, pairs_cached=True))
    assert cached.generated_answers == 0 and generation_peak_bytes(costs, cached, config, prompts) == 0
    assert peak(costs, pairs_cached=True) == peak(older, pairs_cached=True)
    small = dataclasses.replace(costs, generation_extra_bytes=1)       # the passes' memory is the larger
    assert peak(small) == peak(older)
    assert generation_peak_bytes(older, work, config, prompts) == 0


def test_measure_control_costs_on_the_tiny_model(tiny_folder, tmp_path, monkeypatch):
    from dpn_lens.plan_control import measure_control_costs, saved_control_costs

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    costs = measure_control_costs(str(tiny_folder), n_pairs=4, max_new_tokens=6)
    assert costs.probe_flops_per_s > 0 and costs.answer_flops_per_s > 0 and costs.step_flops_per_s > 0
    assert 0 < costs.answer_fill <= 1 and costs.prompt_tokens > 0 and costs.persona_tokens > costs.prompt_tokens
    assert saved_control_costs("cpu", "float32", torch.get_num_threads()) == costs
    # generation's memory apart, with the rows x padded tokens of its largest batch (16 after the persona prompts)
    assert costs.generation_extra_bytes >= 0
    assert costs.generation_batch_tokens == 16 * costs.prefill_points[1][0]     # the persona prompts' padded length


def test_a_control_measurement_that_would_not_fit_is_refused_before_the_model_loads(tiny_folder, tmp_path, monkeypatch,
                                                                                     capsys):
    """The gradient pass over the measurement's pairs beside the weights, against the memory free: refused with 10% to
    spare, naming the most pairs that fit; enough memory, or none known (0), measures."""
    from dpn_lens.cli import main
    from dpn_lens.plan_control import check_measurement_fits, measurement_memory, question_tokens

    spec = str(tiny_folder)
    weights, gradient = measurement_memory(spec, "float32", 12, 48)
    six = sum(measurement_memory(spec, "float32", 6, 48))
    assert weights == plan_locate(spec, ["openness"], 10).weights_bytes
    assert measurement_memory(spec, "float32", 24, 48)[1] > gradient > measurement_memory(spec, "float32", 4, 48)[1]
    check_measurement_fits(spec, "cpu", "float32", 12, 48, free=int(1.1 * (weights + gradient)) + 1)
    check_measurement_fits(spec, "cpu", "float32", 12, 48, free=0)
    # the lengths, tokenized once by the caller, size the same batches as tokenizing them again
    lengths = question_tokens(spec)
    assert measurement_memory(spec, "float32", 12, 48, question_lengths=lengths[::-1]) == (weights, gradient)
    free = int(1.1 * six) + 1
    most = max(n for n in range(2, 12) if 1.1 * sum(measurement_memory(spec, "float32", n, 48)) <= free)
    assert most >= 6
    with pytest.raises(ValueError, match=rf"measure on {most} pairs \(`dpn-lens plan --stage control --measure "
                                         rf"--measure-pairs {most}`"):
        check_measurement_fits(spec, "cpu", "float32", 12, 48, free=free)
    with pytest.raises(ValueError, match=r"has 0.0 GiB free: measure on a smaller model \(--measure-on\)"):
        check_measurement_fits(spec, "cpu", "float32", 12, 48, free=1)
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("dpn_lens.plan_control.free_memory_bytes", lambda device="cpu": 1)
    assert main(["plan", "--stage", "control", "--model", spec, "--measure"]) != 0
    assert "gradient pass over 12 pairs" in capsys.readouterr().err
    assert main(["plan", "--stage", "control", "--model", spec, "--measure", "--measure-pairs", "1"]) != 0
    assert "--measure-pairs must be at least 2, got 1" in capsys.readouterr().err


def test_the_plan_command_plans_control(tiny_folder, tmp_path, monkeypatch, capsys):
    from dpn_lens.cli import main

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    assert main(["plan", "--stage", "control", "--model", str(tiny_folder), "--traits", "openness"]) == 0
    out = capsys.readouterr().out    # control's default run: every rule, so locate, selection and generation
    assert "KL curves (1 traits)" in out and "locate (DPN-LE maps)" in out and "selection (1 traits)" in out
    assert "time unknown" in out


def test_control_plan_flag_prints_the_plan_of_that_run_without_running_it(tiny_folder, tmp_path, monkeypatch, capsys):
    from dpn_lens.cli import main
    from helpers import make_map

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    maps = tmp_path / "maps"
    maps.mkdir()
    make_map("openness", {1: [1, 2]}, {2: [3]}, [1, 2], n_layers=3, d_mlp=48).save(maps / "openness.safetensors")
    assert main(["control", "--model", str(tiny_folder), "--traits", "openness", "--methods", "dpn-le,caa",
                 "--run", str(maps), "--plan", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "dpn-lens plan --stage control --measure" in out and "KL curves (1 traits)" in out
    assert "locate (DPN-LE maps)" not in out and not (tmp_path / "out").exists()   # planned, not run


@pytest.mark.slow
def test_the_plan_benchmark_plans_a_control_run(tiny_folder, tmp_path, monkeypatch):
    """benchmarks/bench_plan.py --stage control on the tiny model: it measures, plans, runs ``dpn-lens control``
    in a fresh process and reports both (the ratios are the benchmark's result, not checked here)."""

    from dpn_lens.models import load_model
    from helpers import make_map, write_personalitybench

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    model = load_model(str(tiny_folder))
    maps = tmp_path / "maps"
    maps.mkdir()
    make_map("openness", {1: [1, 2, 5]}, {2: [3, 8]}, [1, 2], n_layers=int(model.cfg.n_layers),
             d_mlp=int(model.cfg.d_mlp), fingerprint=model_fingerprint(model).to_dict()).save(maps / "openness.safetensors")
    module = _bench_plan()
    result = module.main(["--stage", "control", "--model", str(tiny_folder), "--traits", "openness", "--dtype",
                          "float32", "--methods", "dpn-le", "--eval-pairs", "12", "--run", str(maps), "--data-dir",
                          str(write_personalitybench(tmp_path / "data")), "--measure-prompts", "4",
                          "--extra", "--quick --gammas 0.5,2 --kl-levels 0.05 --random-draws 1 --k-sweep 2"])
    assert result["measured_seconds"] > 0 and result["predicted_seconds"] > 0 and result["stage"] == "control"
    # the run's own pair counts: the maps were given, so none were located; --n-pairs (locate's) is not read
    assert result["n_pairs"] is None and result["eval_pairs"] == 12
    # the sweep's points, as the run made them: its one budget in both directions
    assert [(p["k"], p["direction"]) for p in result["sweep_points"]] == [(2, "increase"), (2, "decrease")]
    # stage by stage: the run's recorded seconds beside the plan's, under one set of names
    compared = {row["stage"]: row for row in result["stage_comparison"]}
    assert {"start-up and model load", "KL curves", "answer scoring", "persona control"} <= set(compared)
    assert all(compared[name]["measured s"] > 0 and compared[name]["predicted s"] > 0
               for name in ("KL curves", "answer scoring"))
    # beside it, the plan with the passes the run made: at most the bound (a curve stops at KL 2)
    assert 0 < compared["KL curves"]["passes counted s"] <= compared["KL curves"]["predicted s"]
    # the decode costs the generation stages are planned from: steps after short and long prompts
    decoding = result["decoding"]
    assert decoding["long_step_context"] > decoding["step_context"] and len(decoding["prefill_points"]) == 2
    assert decoding["step_rows"] and decoding["long_step_rows"] and decoding["context_seconds_per_row_token"] >= 0



@pytest.mark.slow
def test_the_plan_benchmark_plans_a_control_run_on_random_weights(tiny_folder, tmp_path, monkeypatch):
    """--stage control on a folder without weights: both measurements in a fresh process, then
    ``dpn-lens control --random-weights`` (maps located on the fly), whose pairs are not cached; a control run of
    the folder without --random-weights has nothing to load."""
    import shutil

    from dpn_lens.cli import main
    from helpers import write_personalitybench

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    bare = tmp_path / "bare"
    shutil.copytree(tiny_folder, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    data = write_personalitybench(tmp_path / "data")
    module = _bench_plan()
    result = module.main(["--stage", "control", "--model", str(bare), "--traits", "openness", "--dtype", "float32",
                          "--methods", "dpn-le", "--eval-pairs", "8", "--data-dir", str(data), "--measure-prompts",
                          "4", "--control-pairs", "4", "--random-weights", "--extra", "--quick --n-pairs 6 --tau-d 0.1 --gammas 0.5,2 --kl-levels 0.05 "
                                                              "--random-draws 1"])
    assert result["random_weights"] and result["measured_on"] == str(bare) and result["stage"] == "control"
    assert result["n_pairs"] == 6 and result["eval_pairs"] == 8     # located on --extra's pairs, not --n-pairs
    compared = {row["stage"]: row for row in result["stage_comparison"]}
    assert compared["KL curves"]["measured s"] > 0 and compared["KL curves"]["predicted s"] > 0
    assert compared["locate"]["measured s"] > 0 and compared["held-out pairs"]["measured s"] > 0
    assert not list((tmp_path / "cache").rglob("*pairs*"))      # a random model's answers are never cached
    assert main(["control", "--model", str(bare), "--traits", "openness", "--data-dir", str(data), "--quick",
                 "--out", str(tmp_path / "real")]) != 0


def test_control_work_counts_the_budget_sweep_and_the_generation_check(tiny_model, tmp_path, monkeypatch):
    """With ``k_sweep`` and ``generation_questions``, the probe and answer passes ``run_control`` makes,
    and the answer sets the generation check generates and scores, counted at the calls, equal
    ``control_work`` of the run; the plan's bound is at least each."""
    from dpn_lens.evaluation import calibrate, metrics
    from dpn_lens.evaluation.control import ControlConfig, run_control
    from dpn_lens.plan_control import BRACKET_PROBES, ControlSettings, control_work
    from helpers import make_map, write_personalitybench

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    counted = {"probe": 0, "answers": 0, "generated": 0, "scored": 0}
    real = (calibrate.KLProbe.__call__, metrics.PreferenceMargin.score, metrics.generated_answers,
            metrics.persona_scores)

    def counting(key, function):
        def wrapped(*args, **kwargs):
            counted[key] += 1
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(calibrate.KLProbe, "__call__", counting("probe", real[0]))
    def answers(self, model, edit, items, persona=None):      # the answer passes without a persona
        counted["answers"] += persona is None
        return real[1](self, model, edit, items, persona)

    monkeypatch.setattr(metrics.PreferenceMargin, "score", answers)
    # the generation metric generates and scores each answer set (evaluation.metrics.GenerationPersonaScore)
    monkeypatch.setattr(metrics, "generated_answers", counting("generated", real[2]))
    monkeypatch.setattr(metrics, "persona_scores", counting("scored", real[3]))
    config = ControlConfig(traits=["extraversion"], methods=["dpn-le", "caa"], data_dir=str(write_personalitybench(
        tmp_path / "data")), pairs=8, max_new_tokens=5, gammas=[0.125, 0.5, 2, 8], kl_levels=[0.005, 0.01],
        target_kl=0.01, random_draws=2, kl_chunks=2, kl_tokens=24, caa_pairs=6, k_sweep=[2, 0],
        generation_questions=3, generation_levels=[0.005, 0.01], generation_draws=2)
    neuron_map = make_map("extraversion", {1: [3, 7, 11]}, {2: [5, 9, 20]}, [1, 2], n_layers=int(tiny_model.cfg.n_layers),
                          d_mlp=int(tiny_model.cfg.d_mlp), fingerprint=model_fingerprint(tiny_model).to_dict())
    result = run_control(tiny_model, config, log=lambda line: None, progress=False, maps={"extraversion": neuron_map})
    assert result.sweep and result.generation
    settings = ControlSettings(config, maps_given=True, rule_maps_given=True)
    exact = control_work(settings, run=result)
    assert exact.sweep_probe_passes > 0 and exact.generation_sets > 1
    assert counted == {"probe": exact.probe_passes + exact.sweep_probe_passes,
                       "answers": exact.answer_passes + exact.sweep_answer_passes,
                       "generated": exact.generation_sets, "scored": exact.generation_scored}
    bound = control_work(settings)
    # the sweep's bracket searches are estimated (BRACKET_PROBES each), its points bounded
    swept_curves = 1 * 2 * 2            # the one rule (dpn-le) at k 2 and all, both directions
    assert bound.sweep_probe_passes == swept_curves * (BRACKET_PROBES + 1)
    assert bound.sweep_answer_passes >= exact.sweep_answer_passes
    assert bound.generation_sets >= exact.generation_sets and bound.generation_questions == 3
    # dpn-le and caa at two levels and two directions; dpn-le's two random draws at the verdict level only
    assert bound.generation_sets == 1 + 2 * (2 * 2 + 2)
    # the run records its wall time per stage, under the plan's stage names, within its own wall time
    stages = {row.stage: row.seconds for row in result.stages if row.trait == "extraversion"}
    assert list(stages) == ["held-out pairs", "persona control", "method preparation", "KL curves", "answer scoring",
                            "budget sweep", "generation check", "other"]
    assert all(seconds >= 0 for seconds in stages.values()) and stages["KL curves"] > 0
    assert sum(stages.values()) <= result.meta.seconds + 1e-6


def test_the_plan_benchmark_compares_the_sample_rate_with_a_runs(tiny_folder, tmp_path, monkeypatch):
    """benchmarks/bench_plan.py --stage sample-rate on the tiny model: both sizes timed twice, a call timed."""

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    module = _bench_plan()
    result = module.main(["--stage", "sample-rate", "--model", str(tiny_folder), "--measure-prompts", "2",
                          "--eval-pairs", "4"])
    assert [row["pairs"] for row in result["rows"]] == [2, 4, 2, 4]
    assert all(row["answer tokens"] > 0 and row["seconds per pass"] > 0 for row in result["rows"])
    assert result["call_seconds"] > 0 and result["run_rate_over_sample_rate"] > 0


def test_the_plan_benchmark_repeats_the_decode_measurement(tiny_folder, tmp_path, monkeypatch):
    """benchmarks/bench_plan.py --stage decode-fit on the tiny model: each measurement's steps at every row
    count, after the questions and after the persona prompts, and its context fit, with the fits' range."""

    from dpn_lens.plan_control import CONTEXT_ROWS, STEP_ROWS

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    module = _bench_plan()
    result = module.main(["--stage", "decode-fit", "--model", str(tiny_folder), "--repeats", "2"])
    assert [row["measurement"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert all(row[f"{rows} rows"] > 0 for rows in STEP_ROWS)
        assert all(row[f"{rows} rows, long"] > 0 for rows in CONTEXT_ROWS)
        assert row["context s per row and token"] >= 0
    assert result["context_fits"] == [row["context s per row and token"] for row in result["rows"]]
    fits = result["context_fits"]
    assert result["fit_spread"] == (max(fits) / min(fits) if min(fits) > 0 else None)


def test_the_plan_benchmark_checks_the_persona_passes_count(tiny_folder, tmp_path, monkeypatch):
    """benchmarks/bench_plan.py --stage persona-padding on the tiny model: the measurement's persona sample and
    each run-like draw timed, each draw predicted from the sample's rate both ways (mean lengths, padded
    batches) on its own contexts and on the plan's spread, then questions of spread lengths against
    near-equal ones."""
    from helpers import write_personalitybench

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    module = _bench_plan()
    result = module.main(["--stage", "persona-padding", "--model", str(tiny_folder), "--traits", "openness",
                          "--control-pairs", "4", "--eval-pairs", "4", "--repeats", "2", "--new-tokens", "6",
                          "--data-dir", str(data)])
    assert len(result["sample_contexts"]) == 4 and result["sample_seconds"] > 0 and result["answer_tokens"] > 0
    assert [row["draw"] for row in result["draws"]] == [1, 2]
    ways = ("before, own contexts", "now, own contexts", "before, plan's spread", "now, plan's spread")
    assert all(row["seconds"] > 0 and all(row[way] > 0 for way in ways) for row in result["draws"])
    # the widest questions pad their batch further than near-equal ones do: only the padded count sees it
    assert result["wide_over_near_padded_flops"] > result["wide_over_near_mean_flops"]
    assert result["wide_over_near_seconds"] > 0


def test_the_plan_benchmark_checks_the_persona_passes_as_the_pairs_grow(tiny_folder, tmp_path, monkeypatch):
    """benchmarks/bench_plan.py --stage persona-scale on the tiny model: persona passes over the first n of a
    run's held-out pairs, each predicted three ways, each timed beside the order before session 31 (by
    length alone), which runs at least as many questions; sizes past the pairs there are are skipped."""
    from helpers import write_personalitybench

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    module = _bench_plan()
    result = module.main(["--stage", "persona-scale", "--model", str(tiny_folder), "--traits", "openness",
                          "--control-pairs", "4", "--scale-pairs", "2,4,1000", "--new-tokens", "6",
                          "--data-dir", str(data)])
    assert result["sample_seconds"] > 0 and 4 <= result["held_out_pairs"] < 1000
    assert [row["pairs"] for row in result["rows"]] == [2, 4]
    ways = ("the plan", "the pass's own batches", "independent draws", "together / by length")
    assert all(row["seconds"] > 0 and all(row[way] > 0 for way in ways) for row in result["rows"])
    assert all(row["pairs"] <= row["context runs"] <= row["context runs, by length"] for row in result["rows"])
    assert set(result["answer_pass_seconds"]) == {"together", "by length"}
    with pytest.raises(SystemExit, match="--scale-pairs"):
        module.main(["--stage", "persona-scale", "--model", str(tiny_folder), "--scale-pairs", "0",
                     "--data-dir", str(data)])


def test_the_plan_benchmark_checks_the_gradient_passs_memory_bound_and_estimate(tiny_folder, tmp_path, monkeypatch):
    """benchmarks/bench_plan.py --stage gradient-memory on the tiny model: the pass runs, its memory is read and
    set beside the plan's bound and the estimates: from the batches the pass made (as ``CachedAnswerScorer``
    forms them) and from those the plan models; a second run returning freed blocks beside the tensors."""

    from dpn_lens.effect.gradients import _items
    from dpn_lens.evaluation.answer_cache import CachedAnswerScorer
    from dpn_lens.models import load_model
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import gradient_logits_bytes, gradient_memory, sample_pairs

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    module = _bench_plan()
    result = module.main(["--stage", "gradient-memory", "--model", str(tiny_folder), "--eval-pairs", "3"])
    assert result["pairs"] == 3 and 0 < result["batch_tokens"] <= 2 * 3 * 48
    shape = model_shape(str(tiny_folder))
    assert result["bound_bytes"] == gradient_logits_bytes(shape, "float32", result["batch_tokens"])
    assert result["held_bytes"] >= 0 and result["held_over_bound"] == result["held_bytes"] / result["bound_bytes"]
    # the batches it counts are the ones the pass makes of the same pairs
    model = load_model(str(tiny_folder))
    items = _items(model, sample_pairs(model, 3, 48)[0])
    scorer = CachedAnswerScorer(model, [item[1] for item in items], [item[2] for item in items], batch_tokens=2048,
                                differentiable=True)
    made = [(len(b.items), b.answer_ids.shape[1], b.attention_mask.shape[1] - b.answer_ids.shape[1])
            for b in scorer.batches]
    assert [tuple(batch) for batch in result["batches"]] == made
    assert result["estimate_bytes"] == gradient_memory(shape, "float32", made, 3, cpu_heap=True).total
    assert result["held_over_estimate"] == result["held_bytes"] / result["estimate_bytes"]
    assert result["plan_estimate_bytes"] > 0 and result["tensor_bytes"] <= result["estimate_bytes"]
    assert result["live_bytes"] is None or result["live_over_tensors"] == result["live_bytes"] / result["tensor_bytes"]
    # an architecture without its weights: both runs (the second in a fresh process) draw them
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_folder, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    result = module.main(["--stage", "gradient-memory", "--model", str(bare), "--eval-pairs", "2", "--random-weights"])
    assert result["pairs"] == 2 and result["live_bytes"] is not None


# ----- the gradient pass's memory, estimated from the model's shape ---------------------------------------------
def _tiny_gemma3(dtype):
    """A random tiny Gemma 3 (norms after attention and the MLP, query and key norms) booted as a bridge."""
    import warnings

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from dpn_lens.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                              sliding_window=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf_model = Gemma3ForCausalLM(config).eval().to(dtype)
    hf_model.config.architectures = ["Gemma3ForCausalLM"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers("tiny-gemma3", hf_model=hf_model, tokenizer=tokenizer)
    bridge.dpn_is_chat_model = False
    bridge.dpn_model_name = "tiny-gemma3"
    return bridge


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_gradient_estimate_counts_what_autograd_saves(family, dtype):
    """The gradient pass's first batch run as ``margin_gradients`` runs it (weights frozen, questions cached
    without gradients, answers with): the storages autograd saves for the backward, beyond the weights (and
    vectors made of them), the per-token scalars and the rotary tables, with the hooked activations the pass
    holds as the gradients' inputs, are the bytes ``gradient_activation_bytes`` counts from the shape alone."""
    from dpn_lens.effect.gradients import _items
    from dpn_lens.hooked import leaf_hook
    from dpn_lens.evaluation.answer_cache import CachedAnswerScorer
    from dpn_lens.evaluation.preference import PreferencePair
    from dpn_lens.hooked import frozen_weights, hook_name, read_hooks
    from dpn_lens.plan import ModelShape
    from dpn_lens.plan_control import gradient_activation_bytes
    from dpn_lens.tiny import build_tiny_model

    torch_dtype = getattr(torch, dtype)
    model = build_tiny_model(n_layers=3).to(torch_dtype) if family == "llama" else _tiny_gemma3(torch_dtype)
    shape = ModelShape.from_config(model.original_model.config.to_dict())
    assert shape.family == family
    pairs = [PreferencePair("what would you do ?", "a party with a friend .", "a quiet book at home ."),
             PreferencePair("what do you like ?", "a party .", "a quiet book at home with a friend .")]
    items = _items(model, pairs)
    scorer = CachedAnswerScorer(model, [item[1] for item in items], [item[2] for item in items], differentiable=True)
    batch = scorer.batches[0]
    rows, answer = batch.answer_ids.shape
    context = batch.attention_mask.shape[1] - answer
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        # the inverse RMS per token; Gemma's 1 + weight per norm (a weight, not an activation)
        scalar = tensor.dim() <= 1 or tensor.shape[-1] == 1
        rotary = tensor.dim() == 4 and tensor.shape[1] == 1 and not tensor.requires_grad   # cos / sin tables
        if storage.data_ptr() not in weights and not scalar and not rotary:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    captured: dict[int, torch.Tensor] = {}
    hooks = [(hook_name(layer), leaf_hook(captured, layer)) for layer in range(int(model.cfg.n_layers))]
    with (torch.enable_grad(), frozen_weights(model), read_hooks(model, hooks),
          torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)):
        model(batch.answer_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              past_key_values=scorer.answer_pass_cache(batch))
    # With the weights frozen no projection saves its input, so autograd keeps no hook_post; the pass does.
    assert not saved.keys() & {activation.untyped_storage().data_ptr() for activation in captured.values()}
    held = saved | {a.untyped_storage().data_ptr(): a.untyped_storage().nbytes() for a in captured.values()}
    assert context > 0 and sum(held.values()) == gradient_activation_bytes(shape, dtype, rows, answer, context)


def test_the_gradient_estimate_adds_up_the_tensors_of_its_list():
    """The estimate's arithmetic on a tiny shape, each tensor of the list counted here in its own words."""
    from dpn_lens.plan import ModelShape
    from dpn_lens.plan_control import CPU_HEAP_RETAINED, gradient_activation_bytes, gradient_memory

    D, F, H, KV, HD, V, L = 8, 16, 2, 1, 4, 100, 2
    rows, answer, context = 3, 5, 7
    T, S = rows * answer, context + answer
    shape = ModelShape(n_layers=L, d_model=D, d_mlp=F, n_heads=H, n_kv_heads=KV, head_dim=HD, vocab=V, tied=True)
    gemma = dataclasses.replace(shape, family="gemma3")
    for s, dtype, w in ((shape, "float32", 4), (shape, "bfloat16", 2), (gemma, "bfloat16", 2)):
        g = s.family == "gemma3"
        layer = [
            ("norm before attention: float32 input", 4 * T * D),
            ("rotated queries", w * T * H * HD), ("keys repeated per query head", w * rows * H * S * HD),
            ("values repeated per query head", w * rows * H * S * HD),
            ("float32 attention probabilities", 4 * rows * H * answer * S),
            ("their cast, saved by probabilities x values", (w if w != 4 else 0) * rows * H * answer * S),
            ("norm before the MLP: float32 input", 4 * T * D),
            ("gate pre-activation", w * T * F), ("activation", w * T * F), ("up", w * T * F),
            ("hook_post, held by the pass", w * T * F)]
        if g:
            layer += [("post-attention norm: float32 input", 4 * T * D), ("post-MLP norm: the same", 4 * T * D),
                      ("query norm", 4 * T * H * HD), ("key norm", 4 * T * KV * HD)]
        first = w * T * F + (4 * T * D if g else 0)      # the first layer from its hook_post on (a leaf)
        final = 4 * T * D
        expected = (L - 1) * sum(size for _, size in layer) + first + final   # no projection inputs, no token ids
        assert gradient_activation_bytes(s, dtype, rows, answer, context) == expected
    # the whole pass: at its peak batch, the logits three times (with their gradient buffer and the next row's),
    # float32 log-probs of the predicting positions; the cache of the batch in flight (its questions', at most a
    # row per answer, and the per-answer copy)
    batches = [(3, 5, 7), (4, 5, 6)]
    memory = gradient_memory(shape, "bfloat16", batches, pairs=4)
    assert memory.batch == (4, 5, 6) and memory.activations == gradient_activation_bytes(shape, "bfloat16", 4, 5, 6)
    assert memory.logits == 3 * 2 * 4 * 5 * V + 4 * 4 * 4 * V
    assert memory.cache == 2 * (4 * 6) * 2 * KV * HD * 2 * L and memory.result == 4 * 4 * L * F
    assert memory.heap_retained == 0 and memory.total == (memory.activations + memory.logits + memory.cache
                                                          + memory.result)     # no batch's gradients held over
    on_cpu = gradient_memory(shape, "bfloat16", batches, pairs=4, cpu_heap=True)
    assert on_cpu.heap_retained == int(CPU_HEAP_RETAINED * memory.activations)
    assert gradient_memory(shape, "bfloat16", batches[:1], pairs=2, cpu_heap=True).heap_retained == 0   # a fresh heap
    with pytest.raises(ValueError, match="unknown dtype"):
        gradient_activation_bytes(shape, "int8", 1, 1, 1)


def _config_folder(tmp_path, tiny_folder, name: str, config: dict) -> str:
    """A folder holding ``config`` and the tiny model's tokenizer: a plan reads nothing else."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_folder / file).exists():
            (folder / file).write_bytes((tiny_folder / file).read_bytes())
    return str(folder / "config.json")


SMOLLM2_CONFIG = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                  "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                  "tie_word_embeddings": True, "hidden_act": "silu"}
GEMMA3_CONFIG = {"model_type": "gemma3_text", "num_hidden_layers": 18, "hidden_size": 640, "intermediate_size": 2048,
                 "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
                 "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"}


def test_an_unmeasured_plan_estimates_the_selection_beside_its_bound(tiny_folder, tmp_path):
    """Without a measurement the selection stage keeps its lower bound (weights, reference, the gradient pass's
    logits) and gets an estimate beside it: the pass's tensors from the shape and its modelled batches, at
    least the bound, for the tiny model and for the embedded models' shapes; the text says both."""
    from dpn_lens.effect.rules import SELECTION_TOKENS
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import ControlSettings, gradient_memory, plan_control, selection_batches

    config = ControlConfig(methods=["dpn-le", "attribution-t", "caa"], pairs=16, selection_pairs=64)
    specs = [str(tiny_folder), _config_folder(tmp_path, tiny_folder, "smollm2", SMOLLM2_CONFIG),
             _config_folder(tmp_path, tiny_folder, "gemma3", GEMMA3_CONFIG)]
    for spec in specs:
        plan = plan_control(spec, ["openness"], ControlSettings(config, maps_given=True), device="cuda",
                            dtype="bfloat16")
        stages = {stage.name: stage for stage in plan.stages}
        selection, scoring = stages["selection (1 traits)"], stages["answer scoring (1 traits)"]
        memory = gradient_memory(model_shape(spec), "bfloat16", selection_batches(spec, 64, SELECTION_TOKENS), 64)
        assert selection.estimate_bytes == scoring.peak_bytes + memory.total >= selection.peak_bytes
        assert all(stage.estimate_bytes is None for stage in plan.stages if stage is not selection)
        assert f"peak memory at least {selection.peak_bytes / 1024 ** 3:.2f} GiB, estimated ~" \
               f"{selection.estimate_bytes / 1024 ** 3:.2f} GiB" in plan.text()
    assert model_shape(specs[2]).family == "gemma3" and model_shape(specs[1]).family == "llama"
    # A measurement replaces both: no estimate.
    measured = plan_control(str(tiny_folder), ["openness"], ControlSettings(config, maps_given=True),
                            costs=control_costs(), machine=_costs())
    assert all(stage.estimate_bytes is None for stage in measured.stages) and "estimated" not in measured.text()


def test_the_gpu_check_uses_the_gradient_estimate(tiny_folder, tmp_path):
    """An 8B LLaMA selecting 512 pairs in bfloat16: its weights, reference and the logits bound fit 24 GiB, the
    pass's activations and its questions' cache do not; a run without selection still fits."""
    from dpn_lens.effect.rules import SELECTION_TOKENS
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan import BYTES, model_shape
    from dpn_lens.plan_control import ControlSettings, gradient_logits_bytes, plan_control

    config = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
              "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
              "tie_word_embeddings": False, "hidden_act": "silu"}
    spec = _config_folder(tmp_path, tiny_folder, "llama8b", config)
    shape = model_shape(spec)
    control = ControlConfig(methods=["attribution-t"], selection_pairs=512)
    selecting = plan_control(spec, ["openness"], ControlSettings(control, maps_given=True), device="cuda",
                             dtype="bfloat16")
    reference = control.kl_chunks * (control.kl_tokens + 1) * shape.vocab * 4
    bound = shape.n_params() * BYTES["bfloat16"] + reference + gradient_logits_bytes(
        shape, "bfloat16", min(2048, 2 * 512 * SELECTION_TOKENS))
    assert bound * 1.1 < 24 * 1024 ** 3 and selecting.fits_gpus_gib[24] is False and selecting.fits_gpus_gib[48] is True
    given = plan_control(spec, ["openness"], ControlSettings(control, maps_given=True, rule_maps_given=True),
                         device="cuda", dtype="bfloat16")
    assert given.fits_gpus_gib[24] is True


def test_a_plan_given_the_runs_record_counts_the_passes_each_trait_made(tiny_folder):
    """``plan_control(..., run=record)`` counts each trait's own curve points and measured points (the
    record's rows of that trait) where the plan alone bounds them by the whole grid: a probe pass costs the
    same either way, so the KL-curve stage scales with the passes."""
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan_control import ControlSettings, control_work, plan_control

    traits = ["openness", "neuroticism"]
    config = ControlConfig(traits=traits, methods=["dpn-le"], gammas=[0.5, 2.0, 8.0], kl_levels=[0.05],
                           target_kl=0.05, random_control=False)
    settings = ControlSettings(config, maps_given=True, rule_maps_given=True, pairs_cached=True)
    # openness: 2 grid points and a measured point per direction; neuroticism: 4 grid points, 1 measured point
    from dpn_lens.evaluation.control_record import ControlMeta, ControlRecord
    from dpn_lens.evaluation.control_rows import CostPoint, DosePoint, Effect, MeasuredEdit

    def cost(trait):
        return CostPoint(trait, "increase", "dpn-le", 1.0, 0.01, 10.0)

    def point(trait):
        return DosePoint(trait, "increase", "dpn-le", 0.05, MeasuredEdit(1.0, 6, 0.05, 10.0, Effect(0.0, 0.0, 0.0, 1.0, 8)))

    record = ControlRecord(validation=[], costs=[cost("openness")] * 2 + [cost("neuroticism")] * 4,
                           curves=[point("openness")] * 2 + [point("neuroticism")], matched_cost=[],
                           matched_summary=[], calibrated=[], gamma_zero=[], examples={},
                           meta=ControlMeta("tiny", "torch.float32", {}, 1.0, traits_done=traits))
    assert [control_work(settings, record.of_trait(t)).probe_passes for t in traits] == [1 + 2 + 2, 1 + 4 + 1]
    bound_passes = control_work(settings).probe_passes
    assert bound_passes == 1 + 2 * 3 + 2 * 1
    costs = control_costs()

    def kl_seconds(plan) -> float:
        return next(stage.seconds for stage in plan.stages if stage.name.startswith("KL curves"))

    bound = kl_seconds(plan_control(str(tiny_folder), traits, settings, costs=costs))
    counted = kl_seconds(plan_control(str(tiny_folder), traits, settings, costs=costs, run=record))
    one_pass = bound / (2 * bound_passes + 1)        # two traits' passes and the run's one reference pass
    assert counted == pytest.approx(one_pass * (5 + 6 + 1))
