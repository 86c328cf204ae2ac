"""``dpn-lens plan`` against the run it plans (issue 25): predicted and measured wall time and peak memory of
``dpn-lens locate``, side by side in one run on this machine.

1. Measure this machine's costs on the model (``dpn_lens.plan.measure_costs``: start-up, load, forward
   FLOP/s and per-call cost, locate's per-trait cost), as ``dpn-lens plan --measure`` does.
2. Plan the locate run (``plan_locate``).
3. Run ``dpn-lens locate`` with those settings in a fresh process (``python -m dpn_lens.cli``), timing its
   wall clock and reading its peak resident memory (``getrusage(RUSAGE_CHILDREN)``, kept apart from the
   measurement's own children by running locate in a child of a child).

It prints predicted, measured and predicted/measured for time and memory (target: within 25%).

``--stage control`` does the same for ``dpn-lens control``: it measures control's costs
(``dpn_lens.plan_control.measure_control_costs``), plans the run (``plan_control``) and times
``dpn-lens control`` with those settings (``--run`` and ``--pairs-cached`` as the run will find them).
It prints the plan beside the run's recorded seconds, stage by stage.

``--stage sample-rate`` checks one suspect of the control plan's error, side by side in one process: the
answer-scoring rate (answer tokens/s) on the plan's sample size (``--measure-prompts``, control's
measurement uses 12) and on a run's (``--eval-pairs``), and the time of a 1-token forward call.

``--stage decode-fit`` repeats control's measurement of greedy decode steps (``--repeats`` times, one
process): each time's seconds per step by rows, after the sample's questions and after its persona prompts,
and the fit of what context adds (``ControlCosts.step_context_seconds``), with the fits' spread.

``--stage gradient-memory`` checks what an unmeasured control plan says of a selection's memory: it runs
the attribution rules' gradient pass (``margin_gradients``) on ``--eval-pairs`` of the model's own answers
and prints the memory it held beyond the loaded model (``VmHWM``) beside the plan's lower bound
(``plan_control.gradient_logits_bytes``, at least 1) and its estimate (``plan_control.gradient_memory``),
from the batches the pass made and from those the plan models for as many pairs (target: within 25%).
It then runs the pass again in a fresh process whose glibc returns freed blocks, and sets that peak
beside the estimate's tensors (without ``CPU_HEAP_RETAINED``, the allocator's share).

``--stage persona-padding`` checks the persona passes' count (session 30): it times the control
measurement's persona sample (``--control-pairs``) and ``--repeats`` run-like persona passes (``--eval-pairs``
PersonalityBench questions, each with a random persona), and prints each pass predicted from the sample's rate
over its measured time, counted at mean context lengths and in padded batches; then how much longer a pass
over questions of widely different lengths takes than one over near-equal ones.

``--stage persona-scale`` checks the same count as the pairs grow (session 31): it times a persona pass over
the first n of a run's own held-out pairs for each n of ``--scale-pairs`` and predicts each from the sample's
rate, with answers at their mean length (before) and in the scorer's own batches (now), where a pair whose
two answers fall in neighbouring batches runs its context in both.

Usage::

    python benchmarks/bench_plan.py --model smollm2-135m-instruct --traits openness,neuroticism --n-pairs 100
    python benchmarks/bench_plan.py --model gemma-3-270m --traits openness,neuroticism --n-pairs 100
    python benchmarks/bench_plan.py --model path/to/tiny-folder --traits openness --n-pairs 4 --measure-prompts 4   # smoke run
    python benchmarks/bench_plan.py --arch llama-3-8b --dtype bfloat16 --traits openness --n-pairs 16 --measure-on smollm2-135m-instruct
    python benchmarks/bench_plan.py --arch llama-3-8b --dtype bfloat16 --traits openness --n-pairs 16 --measure-prompts 8

The last two plan an 8B architecture without its weights: ``--arch`` writes its ``config.json`` beside SmolLM2's
tokenizer (``bench_real_size.architecture_folder``) and implies ``--random-weights``. The costs are measured on
SmolLM2, then on the 8B itself (in a fresh process); the run is ``dpn-lens locate --random-weights`` (about
16 GiB of memory in bfloat16).

The other stages::

    python benchmarks/bench_plan.py --stage control --model smollm2-135m-instruct --traits openness --methods dpn-le,attribution-t,caa --run results/control-smollm2-135m-instruct-rules/maps --data-dir ../shared/data
    python benchmarks/bench_plan.py --stage control --arch llama-3-8b --dtype bfloat16 --traits openness --methods dpn-le,caa --eval-pairs 8 --measure-prompts 8 --control-pairs 6 --extra "--quick --n-pairs 16 --tau-d 0.1 --no-random-control"
    python benchmarks/bench_plan.py --stage sample-rate --model smollm2-135m-instruct --measure-prompts 12 --eval-pairs 64
    python benchmarks/bench_plan.py --stage gradient-memory --model smollm2-135m-instruct --eval-pairs 32
    python benchmarks/bench_plan.py --stage gradient-memory --arch llama-3-8b --dtype bfloat16 --eval-pairs 4
    python benchmarks/bench_plan.py --stage decode-fit --model smollm2-135m-instruct --repeats 4
    python benchmarks/bench_plan.py --stage persona-padding --arch llama-3-8b --dtype bfloat16 --traits openness --control-pairs 6 --eval-pairs 8 --repeats 3 --data-dir ../shared/data
    python benchmarks/bench_plan.py --stage persona-padding --model smollm2-135m-instruct --dtype bfloat16 --random-weights --traits openness --control-pairs 6 --eval-pairs 8 --repeats 3 --data-dir ../shared/data
    python benchmarks/bench_plan.py --stage persona-scale --model smollm2-135m-instruct --dtype bfloat16 --traits openness --control-pairs 6 --scale-pairs 8,16,32,48,60 --data-dir ../shared/data

The second plans and runs ``dpn-lens control --random-weights`` on the 8B architecture, its costs measured on it in
a fresh process: 6 pairs keep the measurement's gradient pass within 24 GiB, and ``--tau-d 0.1`` lets 16 pairs of a
random model select neurons (the chance bound is higher). The fifth checks the gradient pass's memory estimate at
8B (``check_measurement_fits`` and the selection's plan rest on it); its second run, in a fresh process, loads the
model after the first has let its copy go.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the package beside benchmarks/

from dpn_lens.evaluation.control_record import load_control_record  # noqa: E402
from dpn_lens.evaluation.stage_times import StageRow  # noqa: E402
from dpn_lens.io import markdown_table  # noqa: E402
from dpn_lens.plan import measure_costs, plan_locate, timed  # noqa: E402

_RUN_AND_REPORT = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - started
print(json.dumps({"returncode": code.returncode, "seconds": seconds, "stderr": code.stderr[-2000:],
                  "max_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def measured_command(arguments: list[str]) -> dict[str, Any]:
    """Wall time and peak RSS of ``dpn-lens <arguments>`` in a fresh process (a child of a fresh child, so
    the peak is the command's alone); ``OUT`` in ``arguments`` becomes a temporary folder."""
    from dpn_lens.models import free_dropped_models

    free_dropped_models()     # a model this process measured and dropped is freed before the command loads its own
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "dpn_lens.cli",
                   *[str(Path(folder) / "run") if a == "OUT" else a for a in arguments]]
        report = subprocess.run([sys.executable, "-c", _RUN_AND_REPORT, *command], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).resolve().parents[1])
        result = json.loads(report.stdout.strip().splitlines()[-1])
        recorded, summary = Path(folder) / "run" / "control.json", Path(folder) / "run" / "summary.json"
        if recorded.exists():   # a control run records its seconds per stage and trait (evaluation.stage_times)
            control = load_control_record(recorded)
            result["stages"] = list(control.stages or [])
            result["run_seconds"], result["record"] = control.meta.seconds, control
        elif summary.exists():  # a locate run records each trait's seconds: the rest is start-up and load
            traits = json.loads(summary.read_text(encoding="utf-8"))["traits"]
            result["stages"] = [StageRow(trait, "locate", float(row["seconds"])) for trait, row in traits.items()]
            result["run_seconds"] = sum(row.seconds for row in result["stages"])
    if result["returncode"] != 0:
        raise RuntimeError(f"dpn-lens {arguments[0]} failed:\n{result['stderr']}")
    return result


def measured_locate(model: str, traits: str, n_pairs: int, dtype: str, random_weights: bool = False
                    ) -> dict[str, Any]:
    """Wall time and peak RSS of ``dpn-lens locate`` in a fresh process."""
    return measured_command(["locate", "--model", model, "--traits", traits, "--n-pairs", str(n_pairs),
                             "--dtype", dtype, "--no-progress", "--out", "OUT",
                             *(["--random-weights"] if random_weights else [])])


def architecture_folder(arch: str, tokenizer: Path | None = None, out: Path | None = None) -> Path:
    """``out/arch`` (None: under the temporary folder) holding ``arch``'s ``config.json`` and the tokenizer of
    ``tokenizer`` (None: SmolLM2's), written by ``bench_real_size.architecture_folder``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))    # bench_real_size beside this file, as bench_cards does
    from bench_real_size import architecture_folder as write_folder, default_tokenizer

    return write_folder(arch, tokenizer or default_tokenizer(), out or Path(tempfile.gettempdir()) / "dpn_lens_arch")


_MEASURE_COSTS = """
import dataclasses, json, sys, warnings
warnings.simplefilter("ignore")
from dpn_lens.plan import measure_costs
from dpn_lens.plan_control import measure_control_costs
on, dtype, prompts, random_weights, control_pairs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
costs = [measure_costs(on, dtype=dtype, n_prompts=prompts, save=False, random_weights=random_weights)]
if control_pairs:
    costs.append(measure_control_costs(on, dtype=dtype, n_pairs=control_pairs, save=False, random_weights=random_weights))
print(json.dumps([dataclasses.asdict(each) for each in costs]))
"""


def machine_costs(args: argparse.Namespace, control: bool = False) -> Any:
    """This machine's locate costs (``control``: and control's, as a pair), measured on ``--measure-on`` (or
    ``--model``). A measurement on random weights runs in a fresh process: the run after it loads the model
    again, and a model the size of this machine's memory cannot be held twice."""
    from dpn_lens.plan import MachineCosts
    from dpn_lens.plan_control import ControlCosts, measure_control_costs

    on = args.measure_on or args.model
    random_weights = args.random_weights and on == args.model
    if not random_weights:
        machine = measure_costs(on, dtype=args.dtype, n_prompts=args.measure_prompts, save=False)
        return (machine, measure_control_costs(on, dtype=args.dtype, n_pairs=args.control_pairs, save=False)
                ) if control else machine
    done = subprocess.run([sys.executable, "-c", _MEASURE_COSTS, on, args.dtype, str(args.measure_prompts), "1",
                           str(args.control_pairs if control else 0)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"measuring on {on} failed:\n{done.stderr[-2000:]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    machine = MachineCosts(**measured[0])
    return (machine, ControlCosts(**measured[1])) if control else machine


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--model", default="smollm2-135m-instruct")
    options.add_argument("--traits", default="openness,neuroticism")
    options.add_argument("--n-pairs", type=int, default=100)
    options.add_argument("--dtype", default="float32")
    options.add_argument("--measure-prompts", type=int, default=24, help="pairs the machine's costs are measured on")
    options.add_argument("--control-pairs", type=int, default=12,
                         help="pairs control's costs are measured on (--stage control; `dpn-lens plan` measures on 12): "
                              "fewer hold less memory in the gradient pass (an 8B in 24 GiB: 6)")
    options.add_argument("--measure-on", default=None,
                         help="the model the machine's costs are measured on, as `dpn-lens plan --measure-on` (None: "
                              "--model); the plan then scales them to --model by FLOPs and weight bytes")
    options.add_argument("--arch", default=None, choices=("llama-3-8b", "qwen2.5-7b"),
                         help="plan and run this architecture with random weights (its config.json beside SmolLM2's "
                              "tokenizer, benchmarks/bench_real_size.py); replaces --model, implies --random-weights")
    options.add_argument("--random-weights", action="store_true",
                         help="--model's config.json and tokenizer with random weights, for the locate run and a "
                              "measurement on --model (an architecture whose weights are not at hand, e.g. an 8B)")
    options.add_argument("--stage", default="locate", choices=("locate", "control", "sample-rate", "gradient-memory",
                                                                "decode-fit", "persona-padding",
                                                                "persona-scale"))
    options.add_argument("--methods", default="dpn-le,caa", help="control's methods (--stage control)")
    options.add_argument("--eval-pairs", "--pairs", type=int, default=64, help="control's held-out pairs per trait")
    options.add_argument("--run", "--maps", default=None, help="control's run or maps folder (None: located in the run)")
    options.add_argument("--data-dir", default=None, help="control's data folder (None: $DPN_LENS_DATA)")
    options.add_argument("--pairs-cached", action="store_true", help="control's held-out pairs are cached")
    options.add_argument("--repeats", type=int, default=3, help="measurements of the decode costs (--stage decode-fit)")
    options.add_argument("--new-tokens", type=int, default=48,
                         help="the sample's answer tokens (--stage persona-padding)")
    options.add_argument("--scale-pairs", default="8,16,32,48,64",
                         help="pair counts the persona passes are timed at (--stage persona-scale; at most a default "
                              "run's held-out pairs, 64 asked)")
    options.add_argument("--extra", default="", help="more control options, one string (e.g. \"--gammas 0.5,2,8\")")
    return options


def control_main(args: argparse.Namespace, traits: list[str]) -> dict[str, Any]:
    """Measure control's costs, plan the ``dpn-lens control`` command (parsed by control's own parser, as
    ``dpn-lens control ... --plan`` does) and run it in a fresh process."""
    import shlex

    from dpn_lens.cli import build_parser
    from dpn_lens.cli.control import config_from_args
    from dpn_lens.plan_control import plan_control_run

    started = time.perf_counter()
    machine, costs = machine_costs(args, control=True)
    measuring = time.perf_counter() - started
    command = ["control", "--model", args.model, "--traits", ",".join(traits), "--dtype", args.dtype,
               "--methods", args.methods, "--eval-pairs", str(args.eval_pairs),
               "--no-progress", "--no-png", *shlex.split(args.extra), *(["--run", args.run] if args.run else []),
               *(["--data-dir", args.data_dir] if args.data_dir else []),
               *(["--random-weights"] if args.random_weights else []), "--out", "OUT"]
    config = config_from_args(build_parser().parse_args([a if a != "OUT" else "runs/planned" for a in command]))
    plan = plan_control_run(args.model, config, dtype=args.dtype, costs=costs, machine=machine,
                            pairs_cached=args.pairs_cached)
    run = measured_command(command)
    # The same plan with the passes the run made: what is left of the gap is the per-pass cost.
    counted = plan_control_run(args.model, config, dtype=args.dtype, costs=costs, machine=machine,
                               pairs_cached=args.pairs_cached, run=run["record"]) if "record" in run else None
    # The run's own pair counts: --n-pairs is locate's and this stage does not read it. Maps given by --run
    # are not located, so no pairs are.
    pairs = {"n_pairs": None if args.run else config.locate_pairs, "eval_pairs": config.pairs}
    return _report(args, traits, plan, run, measuring, counted, decoding=decode_summary(args.model, costs),
                   pairs=pairs)


def decode_summary(model: str, costs: Any) -> dict[str, Any]:
    """The measured decode costs the generation stages are planned from: a step's seconds by rows after the
    short and the long prompts, what context adds per row and token, and the prompt pass's rates."""
    from dpn_lens.plan import model_shape

    per_row_token = costs.step_context_seconds * model_shape(model).cache_values_per_token()
    return {"step_context": costs.step_context, "step_rows": costs.step_rows,
            "long_step_context": costs.long_step_context, "long_step_rows": costs.long_step_rows,
            "context_seconds_per_row_token": per_row_token, "prefill_points": costs.prefill_points}


def _report(args: argparse.Namespace, traits: list[str], plan: Any, run: dict[str, Any], measuring: float,
            counted: Any = None, decoding: dict[str, Any] | None = None,
            pairs: dict[str, int | None] | None = None) -> dict[str, Any]:
    """Print the plan beside the run and return both as one JSON-able dict. ``pairs``: the run's pair counts
    (None: locate's ``--n-pairs``)."""
    gib = 1024 ** 3
    result = {"stage": args.stage, "model": args.model, "measured_on": getattr(plan.costs, "model", None),
              "random_weights": bool(args.random_weights),
              "traits": traits, **(pairs or {"n_pairs": args.n_pairs}), "dtype": args.dtype,
              "measuring_seconds": measuring, "predicted_seconds": plan.seconds, "measured_seconds": run["seconds"],
              "time_ratio": plan.seconds / run["seconds"], "predicted_peak_gib": plan.peak_bytes / gib,
              "measured_peak_gib": run["max_rss_bytes"] / gib, "memory_ratio": plan.peak_bytes / run["max_rss_bytes"],
              "stages": {stage.name: stage.seconds for stage in plan.stages}}
    print(plan.text())
    if "stages" in run:
        result["stage_comparison"] = stage_comparison(plan, run, counted)
        print(markdown_table(result["stage_comparison"]))
    sweep = list(run["record"].sweep or []) if "record" in run else []
    if sweep:   # what the plan's sweep estimate stands for: probes per budget point, and the points that reached
        result["sweep_points"] = [{"rule": row.rule, "k": row.k, "direction": row.direction,
                                   "probes": row.curve_points, "reached": bool(row.reached)} for row in sweep]
        print(f"budget sweep: {sum(p['reached'] for p in result['sweep_points'])} of {len(sweep)} points reached the "
              f"target KL; bracket probes per point: {[p['probes'] for p in result['sweep_points']]}")
    if decoding:
        result["decoding"] = decoding

        def steps(points: list[list[float]]) -> str:
            return ", ".join(f"{int(rows)}: {seconds:.3f}" for rows, seconds in points)

        print(f"decode step s by rows after {decoding['step_context']:.0f} tokens: {steps(decoding['step_rows'])}; after "
              f"{decoding['long_step_context']:.0f}: {steps(decoding['long_step_rows'])}; context adds "
              f"{decoding['context_seconds_per_row_token']:.2e} s per row and token; prompt pass FLOP/s by padded "
              f"length: {', '.join(f'{int(n)}: {rate:.3g}' for n, rate in decoding['prefill_points'])}")
    print(f"measured in {measuring:.0f} s; {args.stage}: predicted {plan.seconds:.1f} s, measured {run['seconds']:.1f} s, "
          f"ratio {result['time_ratio']:.2f}; peak memory: predicted {result['predicted_peak_gib']:.2f} GiB, measured "
          f"{result['measured_peak_gib']:.2f} GiB, ratio {result['memory_ratio']:.2f}")
    print(json.dumps(result))
    return result


def stage_comparison(plan: Any, run: dict[str, Any], counted: Any = None) -> list[dict[str, Any]]:
    """Per stage: the plan's seconds beside the run's recorded seconds (``stages`` of its control.json,
    summed over traits) and their ratio; start-up and load is the wall time the run's own clock missed.
    ``counted``: the plan with the passes the run made (``plan_control_run(..., run=record)``), beside it
    with its ratio, so a gap splits into the pass counts' share and the per-pass cost's.

    Example:
        >>> from dpn_lens.evaluation.stage_times import StageRow
        >>> from dpn_lens.plan import StagePlan
        >>> plan = type("Plan", (), {"stages": [StagePlan("KL curves (1 traits)", 12.0, 0, "")]})()
        >>> stage_comparison(plan, {"stages": [StageRow("o", "KL curves", 10.0)],
        ...                         "seconds": 15.0, "run_seconds": 11.0})[0]
        {'stage': 'KL curves', 'predicted s': 12.0, 'measured s': 10.0, 'ratio': 1.2}
        >>> counted = type("Plan", (), {"stages": [StagePlan("KL curves (1 traits)", 9.0, 0, "")]})()
        >>> stage_comparison(plan, {"stages": [StageRow("o", "KL curves", 10.0)],
        ...                         "seconds": 15.0, "run_seconds": 11.0}, counted)[0]
        {'stage': 'KL curves', 'predicted s': 12.0, 'measured s': 10.0, 'ratio': 1.2, 'passes counted s': 9.0, 'ratio counted': 0.9}
    """
    from dpn_lens.evaluation.stage_times import stage_seconds

    def name_of(stage: Any) -> str:
        return stage.name.split(" (")[0]          # "KL curves (2 traits)", "locate (DPN-LE maps)"

    def ratio(predicted: float | None, seen: float | None) -> float | None:
        return round(predicted / seen, 2) if predicted and seen else None

    measured = stage_seconds(run["stages"])
    measured["start-up and model load"] = run["seconds"] - run["run_seconds"]
    with_passes = {name_of(stage): stage.seconds for stage in counted.stages} if counted is not None else None
    rows = []
    for stage in plan.stages:
        name = name_of(stage)
        seen = measured.pop(name, None)
        row = {"stage": name, "predicted s": stage.seconds, "measured s": seen, "ratio": ratio(stage.seconds, seen)}
        if with_passes is not None:
            row.update({"passes counted s": with_passes.get(name),
                        "ratio counted": ratio(with_passes.get(name), seen)})
        rows.append(row)
    rows += [{"stage": name, "predicted s": None, "measured s": seconds, "ratio": None}
             for name, seconds in measured.items()]
    return rows


def sample_rate_main(args: argparse.Namespace) -> dict[str, Any]:
    """Answer tokens/s of one answer-scoring pass on the sample's pairs and on a run's, alternated twice,
    each the best of 3 passes; and a 1-token forward call's seconds."""
    import torch

    from dpn_lens.evaluation.preference import PairScorer
    from dpn_lens.models import load_model
    from dpn_lens.plan_control import sample_pairs
    from dpn_lens.steering import Intervention

    model = load_model(args.model, dtype=args.dtype)
    pairs, _, _ = sample_pairs(model, max(args.measure_prompts, args.eval_pairs), 48)
    delta = torch.zeros(int(model.cfg.d_mlp))
    delta[:16] = 0.5
    edit = Intervention({int(model.cfg.n_layers) // 2: delta}, positions="all")
    rows = []
    for n in (args.measure_prompts, args.eval_pairs) * 2:
        scorer = PairScorer(model, pairs[:n])
        scorer.margins(edit)                                              # warm-up (and the questions' cache)
        tokens = sum(len(model.tokenizer.encode(text)) for pair in pairs[:n] for text in (pair.high_answer, pair.low_answer))
        seconds = min(timed(lambda: scorer.margins(edit)) for _ in range(3))
        rows.append({"pairs": n, "answer tokens": tokens, "seconds per pass": seconds, "tokens/s": tokens / seconds})
    one = torch.tensor([[int(model.tokenizer.bos_token_id or 0)]])
    with torch.inference_mode():
        call = min(timed(lambda: model(one)) for _ in range(5))
    small = [row["tokens/s"] for row in rows if row["pairs"] == args.measure_prompts]
    large = [row["tokens/s"] for row in rows if row["pairs"] == args.eval_pairs]
    result = {"stage": "sample-rate", "model": args.model, "rows": rows, "call_seconds": call,
              "run_rate_over_sample_rate": (sum(large) / len(large)) / (sum(small) / len(small))}
    print(markdown_table(rows))
    print(f"1-token forward call: {call:.3f} s; a run's rate / the sample's: {result['run_rate_over_sample_rate']:.2f}")
    print(json.dumps(result))
    return result


def gradient_memory_main(args: argparse.Namespace) -> dict[str, Any]:
    """The gradient pass's memory beyond the loaded model, beside the plan's bound and the estimates: from the
    batches the pass makes of these pairs, and from the batches the plan models for as many pairs."""
    from dpn_lens.data.prompts import render_for_model
    from dpn_lens.effect.gradients import margin_gradients
    from dpn_lens.evaluation.answer_cache import answer_batches
    from dpn_lens.hooked import encode
    from dpn_lens.models import free_dropped_models, load_model
    from dpn_lens.plan import model_shape, reset_peak, status_bytes
    from dpn_lens.plan_control import (_gradient_batch_tokens, batch_tokens_default, gradient_logits_bytes,
                                       gradient_memory, sample_pairs, selection_batches)

    model = load_model(args.model, dtype=args.dtype, random_weights=args.random_weights)
    shape = model_shape(args.model)
    pairs, _, _ = sample_pairs(model, args.eval_pairs, 48)
    # The pass's batches, as CachedAnswerScorer forms them: each question once per answer (a pair's two
    # together), longest first.
    contexts = [len(encode(model, render_for_model(model, pair.question))) for pair in pairs for _ in range(2)]
    answers = [len(encode(model, text, add_bos=False))
               for pair in pairs for text in (pair.high_answer, pair.low_answer)]
    batches = [(len(chunk), max(answers[i] for i in chunk), max(contexts[i] for i in chunk))
               for chunk in answer_batches(contexts, answers, batch_tokens_default(margin_gradients),
                                           [i // 2 for i in range(len(contexts))])]
    estimate = gradient_memory(shape, args.dtype, batches, len(pairs), cpu_heap=True)
    planned = gradient_memory(shape, args.dtype, selection_batches(args.model, len(pairs), 48), len(pairs),
                              cpu_heap=True)
    tokens = _gradient_batch_tokens(len(pairs), 48)          # the answer tokens the plan's bound counts
    bound = gradient_logits_bytes(shape, args.dtype, tokens)
    loaded = status_bytes("VmRSS")
    reset_peak()
    margin_gradients(model, pairs)
    held = max(status_bytes("VmHWM") - loaded, 0)
    del model          # before the fresh process loads its own: a model near this machine's size fits once
    free_dropped_models()
    live = _held_returning_freed_blocks(args.model, args.dtype, pairs, args.random_weights)
    tensors = estimate.total - estimate.heap_retained
    result = {"stage": "gradient-memory", "model": args.model, "dtype": args.dtype, "pairs": len(pairs),
              "batches": batches, "batch_tokens": tokens, "held_bytes": held, "live_bytes": live, "bound_bytes": bound,
              "estimate_bytes": estimate.total, "tensor_bytes": tensors, "plan_estimate_bytes": planned.total,
              "estimate": dataclasses.asdict(estimate), "held_over_bound": held / bound,
              "held_over_estimate": held / estimate.total, "held_over_plan_estimate": held / planned.total,
              "live_over_tensors": None if live is None else live / tensors}
    gib = 1024 ** 3
    print(f"{args.model} ({args.dtype}), {len(pairs)} pairs in {len(batches)} batches (rows, answer, question tokens: "
          f"{batches}); fullest {estimate.batch}")
    print(f"held {held / gib:.2f} GiB beyond the loaded model; estimate {estimate.total / gib:.2f} GiB (activations "
          f"{estimate.activations / gib:.2f}, logits {estimate.logits / gib:.2f}, cache {estimate.cache / gib:.2f}, "
          f"result {estimate.result / gib:.3f}, "
          f"glibc's heap {estimate.heap_retained / gib:.2f}): held / estimate {held / estimate.total:.2f}")
    print(f"the plan's estimate for {len(pairs)} pairs (modelled batches, fullest {planned.batch}) "
          f"{planned.total / gib:.2f} GiB: held / plan's estimate {held / planned.total:.2f}")
    print(f"the plan's bound ({tokens} answer tokens of logits) {bound / gib:.2f} GiB: held / bound {held / bound:.2f} "
          "(at least 1: the bound holds)")
    if live is not None:
        print(f"with freed blocks returned (the tensors' peak): held {live / gib:.2f} GiB; the estimate's tensors "
              f"{tensors / gib:.2f} GiB: held / tensors {live / tensors:.2f}")
    print(json.dumps(result))
    return result


def decode_fit_main(args: argparse.Namespace) -> dict[str, Any]:
    """Control's decode measurement (``plan_control._decode_costs``) ``--repeats`` times on one loaded model
    and one sample: the steps by rows after the questions and after the persona prompts, and what context
    adds per row and token, each time; then the fits' range (largest over smallest)."""
    from dpn_lens.evaluation.preference import greedy_answers
    from dpn_lens.models import load_model
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import _decode_costs, sample_pairs, sample_persona_prompts

    model = load_model(args.model, dtype=args.dtype)
    shape = model_shape(args.model)
    pairs, prompts, lengths = sample_pairs(model, 12, 48)        # control's sample (measure_control_costs)
    _, persona_prompts = sample_persona_prompts(model, pairs)
    persona_lengths = [len(answer) for answer in greedy_answers(model, persona_prompts, 48, 16)]
    rows = []
    for index in range(max(args.repeats, 1)):
        measured: list[Any] = []
        seconds = timed(lambda: measured.append(_decode_costs(model, shape, prompts, lengths, "cpu",
                                                              long_prompts=persona_prompts,
                                                              long_lengths=persona_lengths)))
        costs = measured[0]
        rows.append({"measurement": index + 1, "seconds": round(seconds, 1),
                     **{f"{int(r)} rows": round(s, 4) for r, s in costs.step_rows},
                     **{f"{int(r)} rows, long": round(s, 4) for r, s in costs.long_step_rows},
                     "context s per row and token": costs.context_seconds * shape.cache_values_per_token()})
    fits = [row["context s per row and token"] for row in rows]
    spread = max(fits) / min(fits) if min(fits) > 0 else None
    result = {"stage": "decode-fit", "model": args.model, "dtype": args.dtype, "rows": rows,
              "context_fits": fits, "fit_spread": spread}
    print(markdown_table(rows))
    print(f"context adds {min(fits):.2e} to {max(fits):.2e} s per row and token over {len(fits)} measurements"
          + (f" (largest / smallest {spread:.2f})" if spread else " (a fit of 0 among them)"))
    print(json.dumps(result))
    return result


_HELD_RETURNING = """
import json, sys, torch
from dpn_lens.effect.gradients import margin_gradients
from dpn_lens.evaluation.preference import PreferencePair
from dpn_lens.models import load_model
from dpn_lens.plan import reset_peak, status_bytes
model = load_model(sys.argv[1], dtype=sys.argv[2], random_weights=sys.argv[3] == "1")
pairs = [PreferencePair(*row) for row in json.loads(sys.stdin.read())]
# One token through the model first: weights mapped from a file are read in on their first use, which
# is the loaded model's memory, not the pass's (the parent's were, by generating the answers).
with torch.no_grad():
    model(torch.tensor([[int(model.tokenizer.bos_token_id or 0)]]))
loaded = status_bytes("VmRSS")
reset_peak()
margin_gradients(model, pairs)
print(json.dumps({"held_bytes": max(status_bytes("VmHWM") - loaded, 0)}))
"""


def _held_returning_freed_blocks(model: str, dtype: str, pairs: list[Any], random_weights: bool = False) -> int | None:
    """The gradient pass's memory beyond the loaded model in a fresh process whose glibc serves blocks of
    128 KiB or more by mmap and returns them when freed (``MALLOC_MMAP_THRESHOLD_``, which also keeps the
    threshold from rising): the tensors' own peak. None where that process cannot report it."""
    import os

    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    rows = json.dumps([[pair.question, pair.high_answer, pair.low_answer] for pair in pairs])
    command = [sys.executable, "-c", _HELD_RETURNING, model, dtype, "1" if random_weights else "0"]
    done = subprocess.run(command, input=rows, capture_output=True, text=True, env=environment,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        print(f"the run returning freed blocks failed:\n{done.stderr[-2000:]}")
        return None
    return int(json.loads(done.stdout.strip().splitlines()[-1])["held_bytes"])


def persona_padding_main(args: argparse.Namespace, trait: str) -> dict[str, Any]:
    """Does the persona pass's plan hold for a run's prompts? Time the control measurement's own persona
    sample (``--control-pairs``), then persona passes over ``--repeats`` run-like draws (``--eval-pairs``
    PersonalityBench questions of ``trait``, each with a random persona of the second half, the sample's answers),
    and predict each draw from the sample's rate: counted at mean context lengths (before session 30) and
    in padded batches (``persona_scoring_flops``), on the draw's own contexts and on the plan's spread
    (``prompt_tokens_of``, ``spread_of_draw``). Then the cost of padding alone: one persona, the same answers,
    questions of near-equal length against the shortest and longest, timed side by side."""
    import numpy as np

    from dpn_lens.evaluation.control import ControlConfig, personalitybench_material
    from dpn_lens.evaluation.preference import PairScorer, PreferencePair, preference_margins
    from dpn_lens.hooked import encode
    from dpn_lens.models import load_model
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import (persona_pass_flops, persona_scoring_flops, prompt_tokens_of, sample_pairs,
                                       sample_persona_prompts, spread_of_draw)

    model = load_model(args.model, dtype=args.dtype, random_weights=args.random_weights)
    shape = model_shape(args.model)
    pairs, _, lengths = sample_pairs(model, args.control_pairs, args.new_tokens)
    answer = sum(lengths) / len(lengths)
    personas, _ = sample_persona_prompts(model, pairs)
    sample_personas = [personas[i % 2] for i in range(len(pairs))]

    def contexts_of(chosen: list[Any], per: list[str]) -> list[int]:
        """Each pair's context length: the scorer holds its context once per answer, two a pair (it refuses an
        answer without tokens)."""
        return [len(context) for context in PairScorer(model, chosen, per).contexts[::2]]

    def counted(contexts: list[int]) -> tuple[float, float]:
        """(mean-length FLOPs, padded-batch FLOPs) of a persona pass over these contexts."""
        return (persona_pass_flops(shape, len(contexts), float(np.mean(contexts)), 2 * len(contexts), answer),
                persona_scoring_flops(shape, contexts, 2, answer))

    def seconds(chosen: list[Any], per: list[str]) -> float:
        return timed(lambda: preference_margins(model, chosen, persona=per))

    sample_seconds = min(seconds(pairs, sample_personas) for _ in range(2))       # the first also warms up
    sample_contexts = contexts_of(pairs, sample_personas)
    mean_flops, padded_flops = counted(sample_contexts)
    before_rate, now_rate = mean_flops / sample_seconds, padded_flops / sample_seconds
    questions, highs, _ = personalitybench_material(args.data_dir, trait)
    half = len(highs) // 2
    config = ControlConfig(traits=[trait], methods=["dpn-le"], data_dir=args.data_dir)
    spread = spread_of_draw(prompt_tokens_of(args.model, [trait], config, None).personas, args.eval_pairs)
    mean_plan, padded_plan = counted(spread)          # the plan's count does not depend on the draw
    texts = [(pair.high_answer, pair.low_answer) for pair in pairs]
    rows = []
    for draw in range(max(args.repeats, 1)):
        generator = np.random.default_rng(100 + draw)
        chosen = [PreferencePair(questions[int(i)], *texts[n % len(texts)])
                  for n, i in enumerate(generator.choice(len(questions), args.eval_pairs, replace=False))]
        per = [highs[half + int(i)] for i in generator.integers(0, len(highs) - half, args.eval_pairs)]
        contexts = contexts_of(chosen, per)
        took = seconds(chosen, per)
        mean_draw, padded_draw = counted(contexts)
        rows.append({"draw": draw + 1, "contexts": f"{min(contexts)}-{max(contexts)}", "seconds": took,
                     "before, own contexts": mean_draw / before_rate / took,
                     "now, own contexts": padded_draw / now_rate / took,
                     "before, plan's spread": mean_plan / before_rate / took,
                     "now, plan's spread": padded_plan / now_rate / took})
    # Padding alone: one persona, the sample's answers, near-equal questions against the shortest and longest.
    by_length = sorted(questions, key=lambda question: len(encode(model, question)))
    n, middle = args.eval_pairs, len(by_length) // 2
    sets = {"near-equal": by_length[middle - n // 2: middle - n // 2 + n],
            "wide": by_length[:n // 2] + by_length[-(n - n // 2):]}
    contrast = {}
    for name, chosen_questions in sets.items():
        chosen = [PreferencePair(q, *texts[i % len(texts)]) for i, q in enumerate(chosen_questions)]
        per = [highs[half]] * len(chosen)
        contrast[name] = (min(seconds(chosen, per) for _ in range(2)), *counted(contexts_of(chosen, per)))
    near, wide = contrast["near-equal"], contrast["wide"]
    result = {"stage": "persona-padding", "model": args.model, "dtype": args.dtype, "trait": trait,
              "sample_contexts": sample_contexts, "sample_seconds": sample_seconds, "answer_tokens": answer,
              "draws": rows, "wide_over_near_seconds": wide[0] / near[0],
              "wide_over_near_mean_flops": wide[1] / near[1], "wide_over_near_padded_flops": wide[2] / near[2]}
    print(f"{args.model} ({args.dtype}): the sample's {len(pairs)} contexts {sample_contexts}, {sample_seconds:.2f} s; "
          f"answers {answer:.1f} tokens")
    print("predicted / measured per draw (before: mean context lengths; now: padded batches):")
    print(markdown_table(rows, digits=3))
    print(f"padding alone ({n} pairs, one persona): wide / near-equal questions took "
          f"{result['wide_over_near_seconds']:.2f}x; mean lengths say {result['wide_over_near_mean_flops']:.2f}x, "
          f"padded batches {result['wide_over_near_padded_flops']:.2f}x")
    print(json.dumps(result))
    return result


def batches_flops(shape: Any, contexts: list[int], answers: list[int], keys: list[int]) -> float:
    """FLOPs of ``CachedAnswerScorer`` over items of ``contexts[i]`` context and ``answers[i]`` answer tokens,
    batched as it batches them (``answer_batches``): per batch, ``persona_pass_flops`` of its distinct contexts
    (equal ``keys``) at its longest context and its items at its longest answer. A pair split over two batches
    runs its context in both."""
    from dpn_lens.evaluation.answer_cache import answer_batches
    from dpn_lens.evaluation.preference import PairScorer
    from dpn_lens.plan_control import batch_tokens_default, persona_pass_flops

    return sum(persona_pass_flops(shape, len({keys[i] for i in chunk}), max(contexts[i] for i in chunk), len(chunk),
                                  max(answers[i] for i in chunk))
               for chunk in answer_batches(contexts, answers, batch_tokens_default(PairScorer), keys))


def independent_draws_flops(shape: Any, context_pool: list[int], answer_pool: list[int], n: int,
                            draws: int = 16) -> float:
    """Mean ``batches_flops`` of ``n`` pairs whose contexts and answers are drawn independently from the pools
    (seeded): a stand-in for a run that does not know its answers' lengths, which this stage shows over-counts."""
    import numpy as np

    generator = np.random.default_rng(0)
    keys = [index // 2 for index in range(2 * n)]
    total = 0.0
    for _ in range(draws):
        drawn = generator.choice(np.asarray(context_pool), n)
        answers = generator.choice(np.asarray(answer_pool), 2 * n)
        total += batches_flops(shape, [int(drawn[key]) for key in keys], [int(a) for a in answers], keys)
    return total / draws


@contextlib.contextmanager
def _batches_by_length_alone() -> Any:
    """``CachedAnswerScorer`` batching its items by their own lengths alone, as before session 31 (a pair's two
    answers of unequal lengths often in neighbouring batches, each running the pair's question)."""
    from dpn_lens.evaluation import answer_cache

    grouped = answer_cache.answer_batches
    answer_cache.answer_batches = lambda contexts, answers, batch_tokens, context_keys=None: grouped(
        contexts, answers, batch_tokens)
    try:
        yield
    finally:
        answer_cache.answer_batches = grouped


def persona_scale_main(args: argparse.Namespace, trait: str) -> dict[str, Any]:
    """Does the persona pass's plan hold as the pairs grow? Time the control measurement's persona sample
    (``--control-pairs``), then a persona pass over the first n of a run's own held-out pairs under their high
    personas (``held_out_pairs``, as ``persona_control`` scores them) for each n of ``--scale-pairs``, and
    predict each from the sample's rate:

    * the plan: every answer at the sample's mean length, so a pair's two answers share a batch
      (``persona_scoring_flops`` over ``spread_of_draw`` of the run's persona prompts, as ``plan_control``);
    * the pass's own batches: each answer at its own length (``batches_flops``), on both sides, where a pair
      whose two answers fall in neighbouring batches runs its context in both;
    * independent draws: the run's persona prompts and its answers' lengths, drawn apart
      (``independent_draws_flops``), at the same rate."""
    from dpn_lens.evaluation.control import ControlConfig, held_out_pairs
    from dpn_lens.evaluation.preference import PairScorer
    from dpn_lens.hooked import encode
    from dpn_lens.models import load_model
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import (persona_scoring_flops, prompt_tokens_of, sample_pairs, sample_persona_prompts,
                                       spread_of_draw)

    sizes = sorted({int(n) for n in args.scale_pairs.split(",") if n.strip()})
    if not sizes or sizes[0] < 1:
        raise SystemExit(f"--scale-pairs must list pair counts of at least 1, got {args.scale_pairs!r}")
    model = load_model(args.model, dtype=args.dtype, random_weights=args.random_weights)
    shape = model_shape(args.model)
    pairs, _, lengths = sample_pairs(model, args.control_pairs, args.new_tokens)
    personas, _ = sample_persona_prompts(model, pairs)
    personas_of = [personas[i % 2] for i in range(len(pairs))]

    def timed_pass(chosen: list[Any], per: list[str]) -> tuple[float, Any]:
        """Seconds of one persona pass (``preference_margins(model, chosen, persona=per)``), and its scorer."""
        scorers: list[Any] = []

        def persona_pass() -> None:
            scorers.append(PairScorer(model, chosen, per))
            scorers[-1].margins()

        return timed(persona_pass), scorers[-1]

    def own(scorer: Any) -> float:
        keys = [index // 2 for index in range(len(scorer.contexts))]
        return batches_flops(shape, list(map(len, scorer.contexts)), list(map(len, scorer.answers)), keys)

    timed_pass(pairs, personas_of)                                               # warm-up
    sample_seconds, sample = min((timed_pass(pairs, personas_of) for _ in range(2)), key=lambda row: row[0])
    fill_answer = sum(lengths) / len(lengths)                # the plan's mean answer (answer_fill at these tokens)
    plan_rate = persona_scoring_flops(shape, [len(c) for c in sample.contexts[::2]], 2, fill_answer) / sample_seconds
    own_rate = own(sample) / sample_seconds
    # a default run's held-out pairs (64 asked; a larger n is skipped)
    config = ControlConfig(traits=[trait], methods=["dpn-le"], data_dir=args.data_dir,
                           cache_pairs=not args.random_weights)
    run_personas = prompt_tokens_of(args.model, [trait], config, None).personas
    held = held_out_pairs(model, trait, config, log=lambda line: None)
    answers = [len(encode(model, text, add_bos=False)) for pair in held.pairs
               for text in (pair.high_answer, pair.low_answer)]
    rows = []
    for n in sizes:
        if n > len(held.pairs):
            print(f"only {len(held.pairs)} held-out pairs: {n} skipped")
            continue
        # Side by side, interleaved: the scorer's batches, and the order before session 31 (by each answer's own
        # length, a pair's two answers apart), the first pass of each at a new size also warming up.
        passes: dict[str, list[tuple[float, Any]]] = {"together": [], "by length": []}
        for _ in range(2):
            passes["together"].append(timed_pass(held.pairs[:n], held.high_personas[:n]))
            with _batches_by_length_alone():
                passes["by length"].append(timed_pass(held.pairs[:n], held.high_personas[:n]))
        (took, scorer), (apart, apart_scorer) = (min(passes[name], key=lambda row: row[0])
                                                 for name in ("together", "by length"))
        planned = persona_scoring_flops(shape, spread_of_draw(run_personas, n), 2, fill_answer) / plan_rate
        drawn = independent_draws_flops(shape, run_personas, answers, n) / own_rate
        rows.append({"pairs": n, "batches": len(scorer.cached.batches) if scorer.cached else None,
                     "context runs": sum(int(b.context_ids.shape[0]) for b in scorer.cached.batches)
                     if scorer.cached else None, "seconds": took, "the plan": planned / took,
                     "the pass's own batches": own(scorer) / own_rate / took, "independent draws": drawn / took,
                     "context runs, by length": sum(int(b.context_ids.shape[0]) for b in apart_scorer.cached.batches)
                     if apart_scorer.cached else None, "seconds, by length": apart,
                     "together / by length": took / apart})
    # The metric's own scoring passes (no persona: the questions run once, then the answers under every edit)
    # at the largest size, side by side: keeping a pair together must not slow them.
    import torch

    from dpn_lens.steering import Intervention

    delta = torch.zeros(int(model.cfg.d_mlp))
    delta[:16] = 0.5
    edit = Intervention({int(model.cfg.n_layers) // 2: delta}, positions="all")
    largest = held.pairs[:min(sizes[-1], len(held.pairs))]
    answer_passes: dict[str, float] = {}
    for name in ("together", "by length"):
        with _batches_by_length_alone() if name == "by length" else contextlib.nullcontext():
            metric = PairScorer(model, largest)
            metric.margins(edit)                                                  # warm-up
            answer_passes[name] = min(timed(lambda: metric.margins(edit)) for _ in range(3))
    result = {"stage": "persona-scale", "model": args.model, "dtype": args.dtype, "trait": trait,
              "sample_seconds": sample_seconds, "sample_answers": [len(a) for a in sample.answers],
              "held_out_pairs": len(held.pairs), "rows": rows, "answer_pass_seconds": answer_passes,
              "answer_pass_together_over_by_length": answer_passes["together"] / answer_passes["by length"]}
    print(f"{args.model} ({args.dtype}): the sample's {len(pairs)} pairs took {sample_seconds:.2f} s (answers "
          f"{min(result['sample_answers'])}-{max(result['sample_answers'])} tokens); {len(held.pairs)} held-out pairs, "
          f"answers {min(answers)}-{max(answers)} tokens")
    print("predicted / measured persona pass:")
    print(markdown_table(rows, digits=3))
    print(f"the metric's answer pass ({len(largest)} pairs, an edit, no persona): "
          f"{answer_passes['together']:.2f} s with pairs together, {answer_passes['by length']:.2f} s by length alone "
          f"({result['answer_pass_together_over_by_length']:.2f})")
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    from dpn_lens.pipeline import parse_traits

    traits = parse_traits(args.traits)
    if args.arch:
        args.model, args.random_weights = str(architecture_folder(args.arch)), True
    if args.stage == "control":
        return control_main(args, traits)
    if args.stage == "sample-rate":
        return sample_rate_main(args)
    if args.stage == "gradient-memory":
        return gradient_memory_main(args)
    if args.stage == "decode-fit":
        return decode_fit_main(args)
    if args.stage == "persona-padding":
        return persona_padding_main(args, traits[0])
    if args.stage == "persona-scale":
        return persona_scale_main(args, traits[0])
    started = time.perf_counter()
    costs = machine_costs(args)
    measuring = time.perf_counter() - started
    plan = plan_locate(args.model, traits, args.n_pairs, dtype=args.dtype, costs=costs)
    run = measured_locate(args.model, ",".join(traits), args.n_pairs, args.dtype, args.random_weights)
    return _report(args, traits, plan, run, measuring)


if __name__ == "__main__":
    main()
