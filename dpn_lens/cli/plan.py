"""``dpn-lens plan``: how long ``dpn-lens locate`` or ``dpn-lens control`` will take and how much memory it
needs, before running it.

Example:
    $ dpn-lens plan --model smollm2-135m-instruct --n-pairs 1000 --measure     # measure this machine once
    $ dpn-lens plan --model path/to/Meta-Llama-3-8B-Instruct/config.json --dtype bfloat16 --measure-on smollm2-135m-instruct
    $ dpn-lens plan --model path/to/Meta-Llama-3-8B-Instruct --dtype bfloat16 --measure --random-weights   # times within 25%
    $ dpn-lens plan --stage control --model gemma-3-270m --dtype bfloat16 --measure   # control's rates, once
    $ dpn-lens plan --stage control --model path/to/Meta-Llama-3-8B-Instruct --dtype bfloat16 --measure --random-weights
    $ dpn-lens control --model gemma-3-270m --methods attribution-t,caa --run runs/gemma --out runs/c --plan
"""

from __future__ import annotations

import argparse
from typing import Any

from dpn_lens.cli.options import add_engine_option, add_subcommand, add_traits_option

__all__ = ["register", "run_plan"]


def register(commands: argparse._SubParsersAction) -> None:
    plan = add_subcommand(commands, "plan", "predict locate's or control's wall time and peak memory, before running it")
    plan.add_argument("--model", default="smollm2-135m-instruct",
                      help="embedded name, model folder, or the path of a config.json (its tokenizer files beside it)")
    plan.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    plan.add_argument("--device", default="cpu", help="cpu or cuda (times need a measurement on that device)")
    add_engine_option(plan)
    add_traits_option(plan)
    plan.add_argument("--n-pairs", type=int, default=1000, help="contrastive pairs per trait (as locate's --n-pairs)")
    plan.add_argument("--measure", action="store_true",
                      help="measure this machine's speed now (on --measure-on) and keep it for later plans")
    plan.add_argument("--measure-on", default=None,
                      help="the model to measure on, one that fits here (None: --model itself)")
    plan.add_argument("--random-weights", action="store_true",
                      help="with --measure: measure on the model's config.json and tokenizer with random weights, for "
                           "a model whose weights are not at hand (its load rate is then the random initialisation's; "
                           "on control, its answers are the random model's length)")
    plan.add_argument("--measure-pairs", type=int, default=12,
                      help="with --measure on control: the pairs its costs are measured on (its gradient pass over "
                           "them holds the measurement's largest memory; fewer fit a model near this machine's size)")
    plan.add_argument("--stage", choices=("locate", "control"), default="locate",
                      help="the command to plan: locate (default) or control (its default run; to plan a given control "
                           "run, add --plan to that `dpn-lens control` command)")
    plan.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens plan``."""
    import torch

    from dpn_lens.pipeline import parse_traits
    from dpn_lens.plan import measure_costs, plan_locate, saved_costs

    traits = parse_traits(args.traits)
    if args.random_weights and not args.measure:
        raise ValueError("--random-weights says what the measurement loads: add --measure")
    costs = saved_costs(args.device, args.dtype, torch.get_num_threads())
    if args.measure and args.stage == "control":      # refused before locate's measurement, not minutes after it
        from dpn_lens.plan_control import MEASURE_TOKENS, check_measurement_fits

        check_measurement_fits(args.measure_on or args.model, args.device, args.dtype, args.measure_pairs,
                               MEASURE_TOKENS)
    if args.measure:
        costs = measure_costs(args.measure_on or args.model, args.device, args.dtype, random_weights=args.random_weights)
        print(f"measured: {costs.tokens_per_s:,.0f} tokens/s on {costs.model} ({costs.flops_per_s / 1e9:.1f} GFLOP/s)")
    elif costs is None:
        print(f"no measurement of this machine for {args.device}/{args.dtype}/{torch.get_num_threads()} threads yet: "
              "add --measure for times")
    if args.stage == "control":
        print(_control_plan(args, traits, costs).text())
        return 0
    print(plan_locate(args.model, traits, args.n_pairs, args.device, args.dtype, costs).text())
    return 0


def _control_plan(args: argparse.Namespace, traits: list[str], machine: Any) -> Any:
    """The plan of ``dpn-lens control``'s default run on ``traits``, with control's costs measured now
    (``--measure``) or earlier."""
    import torch

    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan_control import measure_control_costs, plan_control_run

    costs = None
    if args.measure:
        costs = measure_control_costs(args.measure_on or args.model, args.device, args.dtype,
                                      n_pairs=args.measure_pairs, random_weights=args.random_weights)
        print(f"measured control's costs on {costs.model}: probe {costs.probe_flops_per_s / 1e9:.1f}, answers "
              f"{costs.answer_flops_per_s / 1e9:.1f} GFLOP/s; a decode step "
              + ", ".join(f"{seconds * 1e3:.0f} ms at {rows:.0f} rows" for rows, seconds in costs.step_rows)
              + f" ({torch.get_num_threads()} threads)")
    # `control --random-weights` caches no pairs: its run generates every one
    return plan_control_run(args.model, ControlConfig(traits=traits, cache_pairs=not args.random_weights), args.device,
                            args.dtype, costs=costs, machine=machine)
