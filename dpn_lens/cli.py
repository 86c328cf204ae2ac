"""Command line: ``dpn-lens locate | steer | demo | study | compare | report``."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]

# Modules that add their own subcommands through `register(subparsers)`.
_PLUGIN_MODULES: tuple[str, ...] = ("dpn_lens.studies.cli", "dpn_lens.evaluation.cli", "dpn_lens.report")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="embedded name (smollm2-135m-instruct, gemma-3-270m), .gguf file, hub name or folder")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, auto (all GPUs), ...")


def _add_locate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traits", default="all", help="'all' or a comma list, e.g. openness,E")
    parser.add_argument("--data", default="embedded", choices=["embedded", "personalitybench", "anthropic"],
                        help="contrastive data source (embedded needs no files)")
    parser.add_argument("--data-dir", default=None, help="folder holding personalitybench/ or anthropic_persona/ "
                                                          "(default: $DPN_LENS_DATA)")
    parser.add_argument("--n-pairs", type=int, default=1000, help="contrastive pairs per trait")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--layers", default=None, help="layer range to search, e.g. 12-31 (default: reference "
                                                       "settings of the model, else proposed from the data)")
    parser.add_argument("--q", type=float, default=None, help="|s| quantile per layer (default 0.995)")
    parser.add_argument("--tau-d", type=float, default=None, help="Cohen's d threshold (default: reference/proposed)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=4096, help="token budget of one batch")
    parser.add_argument("--token-position", default="last", choices=["last", "mean"])
    parser.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpn-lens", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    locate = commands.add_parser("locate", help="contrastive data -> statistics -> neuron maps (one per trait)")
    _add_model_options(locate)
    _add_locate_options(locate)
    locate.add_argument("--out", required=True, help="run folder for stats/, maps/ and summary.json")
    locate.set_defaults(handler=_run_locate)

    steer = commands.add_parser("steer", help="unsteered vs increased vs decreased answers, side by side")
    _add_model_options(steer)
    steer.add_argument("--map", required=True, nargs="+", help="neuron map file(s) (.safetensors); several add up")
    steer.add_argument("--prompt", required=True, action="append", help="question (repeat for several)")
    steer.add_argument("--gamma", type=float, default=1.0)
    steer.add_argument("--mode", default="both", choices=["both", "directional"])
    steer.add_argument("--weighted", action="store_true", help="DPN-LE_w weights by rank of |d|")
    steer.add_argument("--all-positions", action="store_true", help="also edit the prompt pass")
    steer.add_argument("--max-new-tokens", type=int, default=60)
    steer.set_defaults(handler=_run_steer)

    demo = commands.add_parser("demo", help="the main job on the embedded model: all five traits end to end")
    demo.add_argument("--model", default="smollm2-135m-instruct")
    demo.add_argument("--n-pairs", type=int, default=None, help="pairs per trait (default: sized for ~10 min)")
    demo.add_argument("--gamma", type=float, default=None, help="steering strength (default: see dpn_lens.demo)")
    demo.add_argument("--out", default="runs/demo", help="run folder")
    demo.add_argument("--figures", default="figures", help="folder for the summary figures")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.add_argument("--dtype", default="bfloat16", help="model dtype (statistics are always float64)")
    demo.set_defaults(handler=_run_demo)

    for module_name in _PLUGIN_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


def _load(args: argparse.Namespace):
    from dpn_lens.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def _run_locate(args: argparse.Namespace) -> int:
    from dpn_lens.pipeline import locate_traits, neuron_table, parse_layers, parse_traits

    traits = parse_traits(args.traits)
    model = _load(args)
    run = locate_traits(model, traits, source=args.data, n_pairs=args.n_pairs, seed=args.seed, data_dir=args.data_dir,
                        q=args.q, tau_d=args.tau_d, layers=parse_layers(args.layers), out=args.out,
                        max_batch_size=args.batch_size, max_batch_tokens=args.batch_tokens,
                        token_position=args.token_position, progress=not args.no_progress)
    print(neuron_table(run.maps))
    for trait, neuron_map in run.maps.items():
        print(f"{trait}: layers {neuron_map.settings.layer_range}, tau_d {neuron_map.settings.tau_d} "
              f"({neuron_map.settings.source}: {neuron_map.settings.reason})")
    print(f"wrote {args.out}/maps, {args.out}/stats and {args.out}/summary.json")
    return 0


def _run_steer(args: argparse.Namespace) -> int:
    from dpn_lens.neuron_map import NeuronMap
    from dpn_lens.steering import combine_interventions, steering_intervention
    from dpn_lens.demo import compare_generations

    model = _load(args)
    maps = [NeuronMap.load(path, model=model) for path in args.map]
    positions = "all" if args.all_positions else "decode"

    def edit(direction: str):
        edits = [steering_intervention(m, args.gamma, direction, args.mode, args.weighted, positions) for m in maps]
        return edits[0] if len(edits) == 1 else combine_interventions(*edits)

    for block in compare_generations(model, args.prompt, {"increase": edit("increase"), "decrease": edit("decrease")},
                                     max_new_tokens=args.max_new_tokens):
        print(block)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from dpn_lens.demo import run_demo

    run_demo(model_name=args.model, out=args.out, figures=args.figures, n_pairs=args.n_pairs, gamma=args.gamma,
             max_new_tokens=args.max_new_tokens, dtype=args.dtype)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = getattr(args, "handler", None) or args.func
        return int(handler(args) or 0)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        # Bad input: one clear line instead of a traceback (the message names the fix).
        print(f"dpn-lens {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
