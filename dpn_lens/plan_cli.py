"""``dpn-lens plan``: how long ``dpn-lens locate`` will take and how much memory it needs, before running it.

Example:
    $ dpn-lens plan --model smollm2-135m-instruct --n-pairs 1000 --measure     # measure this machine once
    $ dpn-lens plan --model path/to/Meta-Llama-3-8B-Instruct/config.json --dtype bfloat16 --measure-on smollm2-135m-instruct
"""

from __future__ import annotations

import argparse

from dpn_lens.cli_options import add_subcommand, add_traits_option

__all__ = ["register", "run_plan"]


def register(commands: argparse._SubParsersAction) -> None:
    plan = add_subcommand(commands, "plan", "predict locate's wall time and peak memory for a model, before running it")
    plan.add_argument("--model", default="smollm2-135m-instruct",
                      help="embedded name, model folder, or the path of a config.json (its tokenizer files beside it)")
    plan.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    plan.add_argument("--device", default="cpu", help="cpu or cuda (times need a measurement on that device)")
    add_traits_option(plan)
    plan.add_argument("--n-pairs", type=int, default=1000, help="contrastive pairs per trait (as locate's --n-pairs)")
    plan.add_argument("--measure", action="store_true",
                      help="measure this machine's speed now (on --measure-on) and keep it for later plans")
    plan.add_argument("--measure-on", default=None,
                      help="the model to measure on, one that fits here (None: --model itself)")
    plan.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens plan``."""
    import torch

    from dpn_lens.pipeline import parse_traits
    from dpn_lens.plan import measure_costs, plan_locate, saved_costs

    traits = parse_traits(args.traits)
    costs = saved_costs(args.device, args.dtype, torch.get_num_threads())
    if args.measure:
        costs = measure_costs(args.measure_on or args.model, args.device, args.dtype)
        print(f"measured: {costs.tokens_per_s:,.0f} tokens/s on {costs.model} ({costs.flops_per_s / 1e9:.1f} GFLOP/s)")
    elif costs is None:
        print(f"no measurement of this machine for {args.device}/{args.dtype}/{torch.get_num_threads()} threads yet: "
              "add --measure for times")
    print(plan_locate(args.model, traits, args.n_pairs, args.device, args.dtype, costs).text())
    return 0
