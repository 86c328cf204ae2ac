"""The benchmark script cannot rot: every section runs on the tiny model, and it imports only public names.

``benchmarks/bench_perf.py`` is a script, not part of the package, so nothing imported it and a rename
in ``dpn_lens`` broke it unnoticed. Here it is imported from its path and every section runs with
minimal sizes (seconds); the full-size run is ``python benchmarks/bench_perf.py`` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_perf.py"

TINY_ARGS = ["--model", "tiny", "--repeats", "1", "--threads", "1",
             "--collect-prompts", "3", "--collect-dtypes", "float32,bfloat16", "--batch-size", "2",
             "--memory-sizes", "2", "--memory-naive-sizes", "2", "--memory-repeats", "1", "--memory-batch-size", "2",
             "--steer-prompts", "1", "--steer-tokens", "2", "--steer-neurons", "3",
             "--locate-plan", "float32:2", "--locate-threads", "1", "--locate-batch-size", "4",
             "--locate-target-pairs", "10",
             "--prefix-traits", "1", "--prefix-pairs", "6", "--prefix-dtype", "float32", "--prefix-batch-size", "4",
             "--scoring-pairs", "3", "--scoring-dtype", "float32",
             "--eval-questions", "5", "--eval-tokens", "4", "--eval-batch-size", "3",
             "--attribution-pairs", "3", "--attribution-dtype", "float32"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_perf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_script_imports_only_public_names_of_the_package():
    imported = []
    for path in [SCRIPT, *sorted((SCRIPT.parent / "perf").glob("*.py"))]:  # the script and its sections' modules
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpn_lens"):
                imported += [(node.module, alias.name) for alias in node.names]
    assert imported, "the benchmark should exercise dpn_lens"
    private = [f"{module}.{name}" for module, name in imported if name.startswith("_")
               or any(part.startswith("_") for part in module.split("."))]
    assert not private, f"the benchmark imports private names {private}; use public ones so renames stay visible"


def test_every_section_runs_on_the_tiny_model(bench, tmp_path, capsys):
    out = tmp_path / "perf.json"
    results = bench.main(["--sections", ",".join(bench.SECTIONS), *TINY_ARGS, "--json", str(out)])

    assert set(bench.SECTIONS) == {"collect", "memory", "steering", "locate", "prefix", "scoring", "evaluation",
                                   "attribution"}
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    printed = capsys.readouterr().out
    for tag in ("[collect float32]", "[collect bfloat16]", "[memory bfloat16]", "[steering]", "[locate float32]",
                "[prefix float32]", "[scoring float32]", "[evaluation float32]", "[attribution float32]"):
        assert tag in printed

    collect = {row["dtype"]: row for row in results["collect"]}
    assert set(collect) == {"float32", "bfloat16"}
    # The naive route (run_with_cache, stack, mean) and collect_group_statistics agree.
    assert collect["float32"]["naive_vs_collect_max_abs_diff_of_mean"] < 1e-5
    assert collect["float32"]["n_prompts"] == 3 and collect["float32"]["n_batches"] == 2
    assert all(math.isfinite(v) for row in collect.values() for v in row["ratio_wall"].values())
    assert results["bfloat16_vs_float32_mean_activation"]["correlation"] > 0.99

    memory = results["memory"]
    # One fresh process per run (two here: the slowest part of this test is starting them).
    assert [(run["mode"], run["n"]) for run in memory["runs"]] == [("collect", 2), ("naive", 2)]
    assert memory["naive/collect_peak_extra_at_n"]["n"] == 2 and memory["model_footprint_mib"] > 0

    steering = results["steering"]
    assert set(steering["tokens_per_s_wall"]) == {"unsteered", "steered_decode", "steered_all"}
    assert steering["edited_layers"] == "2-3" and steering["neurons_per_layer"] == 3

    located = results["locate"]["by_dtype"]["float32"]
    assert located["pairs_per_trait"] == 2 and located["prompts"] == 2 * 5 * 2
    assert len(located["selected_neurons"]) == 5

    # Shared-prefix collection runs fewer tokens and, in float32, gives the plain path's numbers and neurons.
    prefix = results["prefix"]
    assert prefix["prompts"] == 2 * 6 and prefix["tokens_run_shared"] < prefix["tokens_in_prompts"]
    assert prefix["max_mean_error_over_max_mean"] < 1e-5 and prefix["same_neurons"]
    assert math.isfinite(prefix["ratio_wall"]) and prefix["ratio_cpu"] > 0

    # Scoring from cached questions gives the plain path's margins (float32) and the block-wise KL the old one.
    scoring = results["scoring"]
    assert scoring["pairs"] == 3 and scoring["cached_used"] and scoring["edited_neurons"] > 0
    assert scoring["max_abs_margin_difference"] < 1e-4
    assert scoring["kl"]["kl_blockwise"] == pytest.approx(scoring["kl"]["kl_whole_tensor"], rel=1e-5, abs=1e-9)
    assert scoring["kl"]["kl_blockwise"] > 0 and math.isfinite(scoring["ratio_wall"]) and scoring["ratio_cpu"] > 0

    # Batched judge answers are the one-at-a-time answers; both variants are timed.
    evaluation = results["evaluation"]
    assert evaluation["questions"] == 5 and evaluation["batch_size"] == 3 and evaluation["answers_identical"]
    assert set(evaluation["questions_per_s_wall"]) == {"one_at_a_time", "batched"}
    assert math.isfinite(evaluation["speedup_wall"]) and evaluation["speedup_cpu"] > 0

    # Attribution's gradient pass and collection, timed on as many pairs; the answers' generation beside.
    attribution = results["attribution"]
    assert attribution["pairs"] >= 2 and attribution["generation_s"] > 0
    assert set(attribution["median_wall_s"]) == {"collect", "attribution"}
    assert attribution["ratio_with_generation"] > attribution["ratio_wall"] > 0


def test_sections_are_selectable_and_unknown_ones_are_refused(bench, capsys):
    results = bench.main(["--sections", "steering", *TINY_ARGS])
    assert "steering" in results and not {"collect", "memory", "locate"} & set(results)
    with pytest.raises(SystemExit):
        bench.main(["--sections", "collect,speed", *TINY_ARGS])
    assert "unknown sections ['speed']" in capsys.readouterr().err



def test_random_weights_time_a_model_from_its_config_and_tokenizer_alone(bench, tmp_path, capsys):
    # A folder like the one a GPU machine gets when the weights cannot travel: config + tokenizer only.
    from dpn_lens.tiny import build_tiny_hf_model

    hf_model, _ = build_tiny_hf_model(tmp_path / "skeleton", n_layers=3, d_mlp=24, max_positions=512)
    hf_model.config.save_pretrained(tmp_path / "skeleton")
    assert not any(path.suffix in {".safetensors", ".bin"} for path in (tmp_path / "skeleton").iterdir())

    results = bench.main(["--model", str(tmp_path / "skeleton"), "--random-weights", "--sections",
                          "collect,memory,steering", *TINY_ARGS[2:]])

    printed = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in printed and "[collect float32]" in printed and "[steering]" in printed
    assert results["random_weights"] is True and results["device"] == "cpu"
    assert results["collect"][0]["layers"] == "0-2"  # the folder's architecture, not the tiny default
    assert results["collect"][0]["naive_vs_collect_max_abs_diff_of_mean"] < 1e-5
    # The memory children load the same random model (they would fail on a folder without weights).
    assert [run["mode"] for run in results["memory"]["runs"]] == ["collect", "naive"]
    assert bench.LOAD_OPTIONS.random_weights is False  # main() restores the module's options


def test_the_memory_section_is_skipped_off_the_cpu(bench, capsys):
    bench.LOAD_OPTIONS.device = "cuda"
    try:
        assert "skipped" in bench.run_memory(bench.parser().parse_args(TINY_ARGS))
    finally:
        bench.LOAD_OPTIONS.device = "cpu"
    assert "[memory] skipped on cuda" in capsys.readouterr().out


def test_every_benchmark_command_in_the_docs_parses(bench):
    """README and docs/ name bench_perf commands; a renamed option or section must fail here, not there."""
    import re
    import shlex

    root = SCRIPT.parents[1]
    commands = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for match in re.finditer(r"python benchmarks/bench_perf\.py([^`\n#]*)", doc.read_text()):
            commands.append((doc.name, shlex.split(match.group(1).replace("FOLDER", "some/folder"))))
    assert len(commands) >= 8, commands
    for doc, argv in commands:
        args = bench.parser().parse_args(argv)
        sections = [s for s in args.sections.split(",") if s]
        assert sections and set(sections) <= set(bench.SECTIONS), (doc, argv)


def test_every_other_benchmarks_documented_command_parses():
    """The other scripts under benchmarks/ that README and docs/ name: each command's options parse."""
    import re
    import shlex

    root = SCRIPT.parents[1]
    found: dict[str, list[tuple[str, list[str]]]] = {}
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text().replace("\\\n", " ")              # a command continued over lines is one
        for match in re.finditer(r"python benchmarks/(bench_\w+)\.py([^`\n#|]*)", text):
            if match.group(1) != "bench_perf":
                found.setdefault(match.group(1), []).append(
                    (doc.name, shlex.split(match.group(2).replace("FOLDER", "some/folder"))))
    assert {"bench_overhead", "bench_engines", "bench_plan"} <= set(found), sorted(found)
    for name, commands in found.items():
        spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        for doc, argv in commands:
            module.parser().parse_args(argv)        # an unknown or renamed option exits here


def test_the_overhead_benchmark_runs_and_the_bridge_matches_the_raw_model(capsys):
    """benchmarks/bench_overhead.py on the tiny model: the bridge's greedy tokens equal the raw HF model's (a
    second copy, no bridge component in it), unsteered and steered by the same edit through plain PyTorch hooks,
    one prompt at a time and in a padded batch; and its statistics equal raw hooks'."""
    spec = importlib.util.spec_from_file_location("bench_overhead", SCRIPT.parent / "bench_overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    results = module.main(["--model", "tiny", "--repeats", "1", "--prompts", "2", "--new-tokens", "6",
                           "--collect-prompts", "6", "--batch-size", "4", "--neurons", "12", "--batches", "1,4"])
    generation, collection = results["generation"], results["collection"]
    for batch in (1, 4):
        row = generation["batches"][batch]
        assert row["same_tokens_unsteered"] and row["same_tokens_steered"]
        assert row["same_tokens_raw_and_bridge"] and row["same_tokens_all_engines_steered"]
        assert row["steering_changed_tokens"]               # the edit is strong enough to be seen
        assert row["default_engine"] == "raw-sdpa"          # float32's
        assert set(row["median_wall_s"]) == {"hf", "hf_steered", "hf_eager_steered", "default", "raw_steered",
                                             "raw_sdpa_steered", "bridge_steered", "default_steered"}
    assert generation["batches"][4]["rows"] == 4
    assert collection["max_abs_mean_difference"] < 1e-5
    # with the bridge's attention the raw forward is the bridge's arithmetic
    assert collection["max_abs_mean_difference_eager"] <= collection["max_abs_mean_difference"]
    assert "[generation tiny" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engines_benchmark_finds_the_bridges_answers(dtype, capsys):
    """benchmarks/bench_engines.py on the tiny model: the default engine answers as the bridge's loop does,
    steered and not, with the repetition penalty; raw-sdpa too in float32."""
    spec = importlib.util.spec_from_file_location("bench_engines", SCRIPT.parent / "bench_engines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    results = module.main(["--model", "tiny", "--dtype", dtype, "--prompts", "6", "--new-tokens", "6", "--batch", "4",
                           "--repeats", "1"])
    engines = results["engines"]
    assert set(engines) == {f"{engine} {condition}" for engine in ("raw", "raw-sdpa", "bridge")
                            for condition in ("unsteered", "steered")}
    for condition in ("unsteered", "steered"):
        assert engines[f"raw {condition}"]["identical"] == 6 == engines[f"raw {condition}"]["of"]
        if dtype == "float32":
            assert engines[f"raw-sdpa {condition}"]["identical"] == 6
    assert results["steering_changed_answers"]
    assert "[engines tiny " + dtype in capsys.readouterr().out
