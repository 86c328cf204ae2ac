"""Command line: ``dpn-lens locate | steer | demo | study | evaluate (control, compare) | summary | report |
export | cards | explore | plan | models``.

Every subcommand sets one ``handler`` (``set_defaults(handler=...)``); each verb but locate, steer and
demo registers itself from its own module of ``dpn_lens.cli``. Expected errors (bad input, missing
files, an incompatible model) are raised as ``ValueError`` / ``FileNotFoundError`` and printed here as
one line, ``dpn-lens <command>: error: ...``, with exit status 2 (argparse's own usage errors look and
exit the same). Shared options are spelled the same everywhere (``dpn_lens.cli.options``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from dpn_lens._version import __version__
from dpn_lens.cli import cards as cards_cli
from dpn_lens.cli import compare as compare_cli
from dpn_lens.cli import control as control_cli
from dpn_lens.cli import evaluate as evaluate_cli
from dpn_lens.cli import export as export_cli
from dpn_lens.cli import plan as plan_cli
from dpn_lens.cli import report as report_cli
from dpn_lens.cli import study as study_cli
from dpn_lens.cli import summary as summary_cli
from dpn_lens.cli.options import (FORMATTER, CommaList, add_data_dir_option, add_model_options, add_out_option,
                                  add_random_weights_option, add_subcommand, add_traits_option, read_maps, validate_args)

__all__ = ["main", "build_parser"]


def _add_locate_options(parser: argparse.ArgumentParser) -> None:
    from dpn_lens.pipeline import DATA_SOURCES

    add_traits_option(parser)
    parser.add_argument("--data", default="embedded", choices=list(DATA_SOURCES),
                        help="contrastive data source (embedded needs no files)")
    add_data_dir_option(parser, "personalitybench/ or anthropic_persona/")
    parser.add_argument("--n-pairs", type=int, default=1000, help="contrastive pairs per trait")
    parser.add_argument("--seed", type=int, default=42, help="seed of the pair draw")
    parser.add_argument("--layers", default=None, help="layer range to search, e.g. 12-31 (None: reference "
                                                       "settings of the model, else proposed from the data)")
    parser.add_argument("--q", type=float, default=None, help="|s| quantile per layer (None: 0.995)")
    parser.add_argument("--tau-d", type=float, default=None, help="Cohen's d threshold (None: reference/proposed)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="token budget of one batch")
    parser.add_argument("--token-position", default="last", choices=["last", "mean"],
                        help="where each prompt's activation is read: its last token (the paper) or the mean over its tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--share-prefix", choices=["auto", "on", "off"], default="auto",
                        help="run token prefixes shared by several prompts once (same statistics): auto = on when "
                             "the model runs on the CPU (faster there), off on a GPU (slower there)")
    parser.add_argument("--no-share-prefix", action="store_true",
                        help="the same as --share-prefix off: run every prompt in full (the path to compare against)")
    parser.add_argument("--select", default="dpn-le",
                        help="selection rules, comma list: dpn-le (the paper's dual criterion; always made) and effect "
                             "rules attribution, attribution-t (the one to use), write, write-layer, dpn-le-attribution "
                             "(maps/<rule>/<trait>; "
                             "docs/METHOD.md, 'Selection by effect')")
    parser.add_argument("--budget", type=int, default=None,
                        help="neurons an effect rule keeps (None: the DPN-LE map's count, at most 0.5%% of MLP neurons)")
    parser.add_argument("--selection-pairs", type=int, default=128,
                        help="selection pairs per trait for the attribution rules (the model's own answers to the "
                             "embedded training questions)")
    parser.add_argument("--selection-seed", type=int, default=0, help="seed of the selection pairs' draw")
    parser.add_argument("--resume", action="store_true",
                        help="finish an interrupted run in --out: reuse finished traits' statistics (same options)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run with other settings in --out")


def build_parser() -> argparse.ArgumentParser:
    """The ``dpn-lens`` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="dpn-lens", description=__doc__.split("\n\n")[0],
                                     formatter_class=FORMATTER)
    parser.add_argument("--version", action="version", version=f"dpn-lens {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", required=True)

    locate = add_subcommand(commands, "locate", "contrastive data -> statistics -> neuron maps (one per trait)")
    add_model_options(locate)
    add_random_weights_option(locate)
    _add_locate_options(locate)
    add_out_option(locate, "run folder for stats/, maps/ and summary.json", required=True)
    locate.set_defaults(handler=run_locate)

    steer = add_subcommand(commands, "steer", "unsteered vs increased vs decreased answers, side by side")
    add_model_options(steer)
    steer.add_argument("--map", required=True, action=CommaList, metavar="FILES",
                       help="neuron map file (.safetensors), or a comma list of several that add up")
    steer.add_argument("--prompt", required=True, action="append", help="question (repeat for several)")
    steer.add_argument("--gamma", type=float, default=None,
                       help="fixed steering strength (None: calibrated per direction to --target-kl)")
    steer.add_argument("--target-kl", type=float, default=0.05,
                       help="KL (nats/token) from the unsteered model at which gamma is calibrated")
    steer.add_argument("--mode", default="both", choices=["both", "directional"],
                       help="both: edit the union of the two poles (the paper); directional: the high pole to increase, "
                            "the low pole to decrease")
    steer.add_argument("--weighted", action="store_true", help="DPN-LE_w weights by rank of |d|")
    steer.add_argument("--all-positions", action="store_true", help="also edit the prompt pass")
    steer.add_argument("--max-new-tokens", type=int, default=60, help="greedy tokens generated per answer")
    steer.set_defaults(handler=run_steer)

    demo = add_subcommand(commands, "demo", "the main job on the embedded model: all five traits end to end")
    add_model_options(demo, default_dtype="bfloat16")
    add_traits_option(demo)
    demo.add_argument("--n-pairs", type=int, default=None, help="pairs per trait (None: sized for ~10 min)")
    demo.add_argument("--gamma", type=float, default=None,
                      help="fixed steering strength (None: calibrated per trait and direction to --target-kl)")
    demo.add_argument("--target-kl", type=float, default=0.05,
                      help="KL (nats/token) from the unsteered model at which gamma is calibrated")
    demo.add_argument("--eval-pairs", type=int, default=32,
                      help="held-out preference pairs per trait for the shift with its 95%% CI (0: skip)")
    add_data_dir_option(demo, "personalitybench/ for the preference check (None: $DPN_LENS_DATA or ../shared/data)")
    add_out_option(demo, "run folder", default="runs/demo")
    demo.add_argument("--overwrite", action="store_true", help="replace a run with other settings in --out")
    demo.add_argument("--figures", default=None, help="folder for the summary figures (None: OUT/figures)")
    demo.add_argument("--max-new-tokens", type=int, default=40, help="greedy tokens of each example answer")
    demo.add_argument("--rule", default="attribution-t",
                      help="effect rule shown beside the paper's neurons (dpn_lens.effect.rules; 'none': the paper's "
                           "neurons only)")
    demo.add_argument("--selection-pairs", type=int, default=48,
                      help="selection pairs per trait for --rule (the model's own answers to embedded questions)")
    demo.set_defaults(handler=run_demo_command)

    study_cli.register(commands)
    compare_cli.register(commands)
    control_cli.register(commands)
    evaluate_cli.register(commands)
    summary_cli.register(commands)
    report_cli.register(commands)
    export_cli.register(commands)
    cards_cli.register(commands)
    plan_cli.register(commands)
    return parser


def _load(args: argparse.Namespace):
    from dpn_lens.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device,
                      random_weights=getattr(args, "random_weights", False))


def _share_prefix_option(args: argparse.Namespace) -> bool | str:
    """``CollectionConfig.share_prefix`` from ``--share-prefix`` (``--no-share-prefix`` wins: it says off)."""
    if args.no_share_prefix:
        return False
    return {"auto": "auto", "on": True, "off": False}[args.share_prefix]


def run_locate(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens locate``."""
    from dpn_lens.collection.collect import CollectionConfig
    from dpn_lens.pipeline import LocateConfig, check_run_target, locate_traits, neuron_table, parse_layers, parse_rules

    collection = CollectionConfig(token_position=args.token_position, max_batch_size=args.batch_size,
                                  max_batch_tokens=args.batch_tokens, progress=not args.no_progress,
                                  share_prefix=_share_prefix_option(args))
    config = LocateConfig(traits=args.traits, source=args.data, n_pairs=args.n_pairs, seed=args.seed,
                          data_dir=args.data_dir, q=args.q, tau_d=args.tau_d, layers=parse_layers(args.layers),
                          collection=collection, select=parse_rules(args.select), budget=args.budget,
                          selection_pairs=args.selection_pairs, selection_seed=args.selection_seed)
    # A locked folder or one with another run is refused before the model loads.
    check_run_target(args.out, config, resume=args.resume, overwrite=args.overwrite)
    model = _load(args)
    run = locate_traits(model, config, out=args.out, resume=args.resume, overwrite=args.overwrite)
    print(neuron_table(run.maps))
    for trait, neuron_map in run.maps.items():
        print(f"{trait}: layers {neuron_map.settings.layer_range}, tau_d {neuron_map.settings.tau_d} "
              f"({neuron_map.settings.source}: {neuron_map.settings.reason})")
    for rule, maps in run.rule_maps.items():
        print(f"{rule} maps ({args.out}/maps/{rule}/): " + ", ".join(
            f"{trait} {neuron_map.n_selected()} neurons" for trait, neuron_map in maps.items()))
    print(f"wrote {args.out}/maps, {args.out}/stats and {args.out}/summary.json")
    return 0


def run_steer(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens steer``."""
    from dpn_lens.demo import compare_generations
    from dpn_lens.steering import combine_interventions, steering_intervention

    from dpn_lens.run import check_runs_of

    # Read the maps before the model: an empty, unreadable or unfinished map costs no model load.
    check_runs_of(args.map)
    maps = read_maps(args.map, "steering with it")
    from dpn_lens.models import check_map_before_loading

    if args.gamma is not None and args.gamma < 0:
        raise ValueError(f"--gamma {args.gamma:g}: gamma is a strength (>= 0); steer shows both directions "
                         f"(increase and decrease) at it, so pass --gamma {-args.gamma:g}")
    for neuron_map in maps:                 # what the model's config alone can tell, before its weights load
        check_map_before_loading(neuron_map, args.model)
    model = _load(args)
    for neuron_map in maps:
        neuron_map.check_compatible(model)
    positions = "all" if args.all_positions else "decode"

    def edit(direction: str, gamma: float):
        edits = [steering_intervention(m, gamma, direction, args.mode, args.weighted, positions) for m in maps]
        return edits[0] if len(edits) == 1 else combine_interventions(*edits)

    if args.gamma is None:
        from dpn_lens.evaluation.calibrate import calibrate_directions

        # calibrate_gamma already builds its grid edits without the large-gamma warning; the warnings of
        # several maps (shared neurons) are shown once, when the final edits are built below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calibrations = calibrate_directions(model, args.target_kl, edit_at=edit)
        for direction, calibration in calibrations.items():
            print(f"{direction}: {calibration.describe()}")
        gammas = {direction: calibration.gamma for direction, calibration in calibrations.items()}
    else:
        gammas = {"increase": args.gamma, "decrease": args.gamma}
    edits = {direction: edit(direction, gamma) for direction, gamma in gammas.items()}
    for generation in compare_generations(model, args.prompt, edits, max_new_tokens=args.max_new_tokens):
        print(generation.text())
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens demo``."""
    from dpn_lens.demo import run_demo
    from dpn_lens.pipeline import parse_traits

    run_demo(model_name=args.model, out=args.out, figures=args.figures, n_pairs=args.n_pairs, gamma=args.gamma,
             max_new_tokens=args.max_new_tokens, traits=parse_traits(args.traits), dtype=args.dtype,
             device=args.device, overwrite=args.overwrite, target_kl=args.target_kl, eval_pairs=args.eval_pairs,
             data_dir=args.data_dir, rule=None if args.rule.lower() == "none" else args.rule,
             selection_pairs=args.selection_pairs)
    return 0


def _one_line_warnings(command: str):
    """Show warnings as ``dpn-lens <command>: warning: ...`` (no file and line of the library)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"dpn-lens {command}: warning: {message}", file=file or sys.stderr)
    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dpn-lens`` with ``argv``; returns the exit status.

    Every option that needs no model is checked first (``cli.options.validate_args``). Expected errors
    (bad input, missing files, a map of another model, a locked or mixed run folder, a model that
    cannot be loaded) are printed as one line with exit status 2; Ctrl-C prints ``interrupted`` and
    exits 130. ``--debug`` shows the traceback instead.
    """
    from dpn_lens.errors import IncompatibleModelError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv   # the command line as given: `evaluate` routes it, `control`/`compare` echo it
    debug = bool(getattr(args, "debug", False))
    show_warning = warnings.showwarning
    if not debug:
        warnings.showwarning = _one_line_warnings(args.command)
    try:
        validate_args(args)
        from dpn_lens.generation import generation_engine

        with generation_engine(getattr(args, "engine", None)):
            return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        # Run folders are written trait by trait, so what finished stays usable (`locate --resume`).
        hint = ""
        if args.command == "locate":
            hint = f"; finished traits are kept: add --resume to the same command to finish {args.out}"
        print(f"dpn-lens {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ModuleNotFoundError, IncompatibleModelError, OSError) as error:
        if debug:
            raise
        # Bad input: one clear line instead of a traceback (the message names the fix).
        text = " ".join(str(error).split("\n")[:1]) if isinstance(error, OSError) else str(error)
        print(f"dpn-lens {args.command}: error: {text}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = show_warning


if __name__ == "__main__":
    sys.exit(main())
