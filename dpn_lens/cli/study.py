"""``dpn-lens study layers|overlap|multifunction|all|residual|causal|selection``: study figures and tables from a run folder.

Example:
    $ dpn-lens study all --run runs/demo --out figures --data-dir ../shared/data
    $ dpn-lens study overlap --run runs/demo --npti        # also NPTI's neuron sets (generates with the model)
    $ dpn-lens study residual --run runs/demo --out runs/demo/residual   # who writes the trait direction
    $ dpn-lens study causal --run runs/rules --control results/control-rules --out results/causal
    $ dpn-lens study selection --run runs/demo --selection-pairs 256 --out runs/demo/selection   # would two runs pick the same neurons?

``residual``, ``causal`` and ``selection`` are not part of ``all``: they run the model on fresh prompts or
need the effect-rule maps of ``dpn-lens locate --select``, and ``all`` makes ``figures/``.
"""

from __future__ import annotations

import argparse
from typing import Any

from dpn_lens.cli.options import (DEFAULT_MODEL, FORMATTER, CommaList, add_data_dir_option, add_model_options,
                                  add_out_option, add_renamed, add_run_option)

__all__ = ["register", "run_study"]


def _common(parser: argparse.ArgumentParser) -> None:
    add_run_option(parser, "run folder holding maps/<trait>.safetensors and stats/", required=True)
    add_out_option(parser, "folder for figures and tables", default="figures")
    parser.add_argument("--no-png", action="store_true", help="write HTML only (PNG export needs Chromium)")
    parser.add_argument("--plotlyjs", choices=("cdn", "directory"), default="cdn",
                        help="HTML loads plotly.js from the CDN or one shared plotly.min.js in --out (never inline: "
                             "a full copy per figure)")


def _layers_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top", type=int, default=10, help="top neurons per trait and pole in the table")


def _model_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser, default=None,
                      model_help=f"model the maps were located on (None: the run's summary.json; the "
                                 f"multifunction study falls back to {DEFAULT_MODEL}, --npti does not)")


def _npti_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--npti", action="store_true",
                        help="also study the NPTI baseline's neuron sets (answers generated with the model)")
    parser.add_argument("--npti-prompts", type=int, default=16,
                        help="high and low persona prompts per trait for the NPTI statistics")
    parser.add_argument("--npti-tokens", type=int, default=24,
                        help="generated tokens per answer for the NPTI statistics")


def _multifunction_options(parser: argparse.ArgumentParser) -> None:
    add_data_dir_option(parser, "capability/")
    parser.add_argument("--n-text", type=int, default=4, help="WikiText-2 windows for attribution")
    parser.add_argument("--n-questions", type=int, default=16, help="MMLU + ARC questions for attribution")
    parser.add_argument("--n-held-out", type=int, default=4, help="held-out WikiText-2 windows for costs")
    parser.add_argument("--window", type=int, default=128, help="tokens per text window")
    parser.add_argument("--capability-fraction", type=float, default=0.02,
                        help="capability neurons = this top fraction of each layer by attribution")
    parser.add_argument("--gamma", type=float, default=0.8, help="edit strength for the edit cost")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-random-control", action="store_true", help="skip the random-set ablation control")


def _residual_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-pairs", type=int, default=200, help="embedded contrastive pairs per trait (seed 42)")
    add_renamed(parser, "--pairs", "--n-pairs", type=int)
    parser.add_argument("--layer", type=int, default=None,
                        help="residual layer to split (None: the layer CAA steers at for each trait)")
    parser.add_argument("--batch-size", type=int, default=8)


def _causal_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", action=CommaList, nargs="*", default=[], metavar="FOLDERS",
                        help="comma list of output folders of `dpn-lens control --k-sweep ...` (one per model) for "
                             "the sparsity figure")
    parser.add_argument("--no-capability", action="store_true",
                        help="skip the capability part (it loads the model and reads capability/ of --data-dir)")


def _selection_options(parser: argparse.ArgumentParser) -> None:
    from dpn_lens.effect.rules import EFFECT_RULES, rule_named

    attribution_rules = [name for name in EFFECT_RULES if rule_named(name).score == "attribution"]
    # bfloat16 as `dpn-lens control` loads the model: the dtype is part of the selection pairs' cache key.
    add_model_options(parser, default=None, default_dtype="bfloat16",
                      model_help="model the maps were located on (None: the run's summary.json)")
    parser.add_argument("--rules", action=CommaList, allowed=attribution_rules, default=["attribution-t"], metavar="RULES",
                        help=f"comma list of attribution rules ({', '.join(attribution_rules)})")
    parser.add_argument("--selection-pairs", type=int, default=128,
                        help="selection pairs per trait, drawn as `dpn-lens control --selection-pairs` draws them")
    parser.add_argument("--seed", type=int, default=0, help="seed of the selection pairs' draw and of the splits")
    parser.add_argument("--splits", type=int, default=4, help="random splits into two disjoint halves per half size")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``study`` (with ``layers``, ``overlap``, ``multifunction``, ``all``, ``residual``, ``causal``, ``selection``) to a
    subparsers object."""
    study = subparsers.add_parser("study", help="layer-wise, overlap and multifunctionality studies of a run",
                                  description=__doc__.split("\n\n")[0], formatter_class=FORMATTER)
    inner = study.add_subparsers(dest="study", required=True,
                                 metavar="{layers,overlap,multifunction,all,residual,causal,selection}")
    for name, help_text, extras in (
            ("layers", "neuron counts, d and s per layer, top neurons", [_layers_options]),
            ("overlap", "overlap and mutual exclusivity of pole sets, steering-vector correlation",
             [_model_options, _npti_options]),
            ("multifunction", "capability neurons and ablation/edit costs of personality sets",
             [_model_options, _multifunction_options, _npti_options]),
            ("all", "all three studies", [_layers_options, _model_options, _multifunction_options, _npti_options]),
            ("residual", "share of the residual trait direction written by MLPs, attention and the map's neurons",
             [_model_options, _residual_options]),
            ("causal", "effect-selected neurons vs DPN-LE's: overlap, layers, pole exclusivity, capability cost",
             [_model_options, _multifunction_options, _causal_options]),
            ("selection", "would two runs select the same neurons: split-half agreement of an attribution rule",
             [_selection_options])):
        parser = inner.add_parser(name, help=help_text, description=help_text, formatter_class=FORMATTER)
        _common(parser)
        for add in extras:
            add(parser)
        parser.set_defaults(handler=run_study)
    return study


def _model_name(args: argparse.Namespace, run: Any) -> str:
    if args.model:
        return args.model
    return run.model_name or DEFAULT_MODEL


def _check(args: argparse.Namespace, run: Any) -> None:
    """Refuse what could not work before any work is done (``ValueError`` / ``FileNotFoundError``)."""
    from dpn_lens.data.contrastive import resolve_data_dir
    from dpn_lens.run import STATS_DIR, SUMMARY_FILE

    if args.study in ("multifunction", "all") or (args.study == "causal" and not args.no_capability):
        resolve_data_dir(args.data_dir, "capability")  # raises, naming --data-dir and $DPN_LENS_DATA
    if not getattr(args, "npti", False):
        return
    if not (args.model or run.model_name):
        raise ValueError(f"--npti generates answers with the model the maps were located on, but "
                         f"{run.folder / SUMMARY_FILE} names no model: pass --model")
    if min(args.npti_prompts, args.npti_tokens) < 1:
        raise ValueError("--npti-prompts and --npti-tokens must be at least 1")
    if args.study == "overlap" and not run.stats:
        raise FileNotFoundError(f"--npti adds the NPTI sets to the exclusivity part, which needs the run's "
                                f"statistics; {run.folder / STATS_DIR} holds none")


def run_study(args: argparse.Namespace) -> int:
    """Run the chosen study (``args.study``) and print where the files went.

    With ``--npti`` the NPTI sets of every trait are built once (``npti_sets_for_run``) and passed to the
    overlap and multifunction studies as ``extra_sets={"NPTI": ...}``.
    """
    from dpn_lens.models import load_model
    from dpn_lens.run import Run
    from dpn_lens.studies.outputs import MultifunctionConfig, layers_study, multifunction_study, overlap_study_report
    from dpn_lens.studies.sets import NPTI, npti_sets_for_run

    run = Run.load(args.run)
    _check(args, run)
    if args.study == "causal":
        return _run_causal(args, run)
    if args.study == "selection":
        return _run_selection(args, run)
    if args.study == "residual":
        from dpn_lens.studies.outputs import residual_study

        if args.n_pairs < 2:
            raise ValueError("--n-pairs must be at least 2")
        model = load_model(_model_name(args, run), dtype=args.dtype, device=args.device)
        residual_study(run, args.out, model, n_pairs=args.n_pairs, layer=args.layer, batch_size=args.batch_size,
                       log=lambda text: print(text, flush=True))
        return 0
    common = {"png": not args.no_png, "plotlyjs": args.plotlyjs}
    model, extra = None, None
    if getattr(args, "npti", False):
        model = load_model(_model_name(args, run), dtype=args.dtype, device=args.device)
        extra = {NPTI: npti_sets_for_run(model, run, args.npti_prompts, args.npti_tokens,
                                         log=lambda text: print(text, flush=True))}
    if args.study in ("layers", "all"):
        layers_study(run, args.out, top=args.top, **common)
    if args.study in ("overlap", "all"):
        overlap_study_report(run, args.out, extra_sets=extra, **common)
    if args.study in ("multifunction", "all"):
        if model is None:
            model = load_model(_model_name(args, run), dtype=args.dtype, device=args.device)
        config = MultifunctionConfig(
            data_dir=args.data_dir, n_text=args.n_text, n_multiple_choice=args.n_questions, n_held_out=args.n_held_out,
            window=args.window, fraction=args.capability_fraction, gamma=args.gamma, batch_size=args.batch_size,
            seed=args.seed, random_control=not args.no_random_control)
        multifunction_study(run, args.out, model, config, extra_sets=extra, **common)
    return 0


def _run_causal(args: argparse.Namespace, run: Any) -> int:
    from pathlib import Path

    from dpn_lens.models import load_model
    from dpn_lens.studies.causal import causal_study
    from dpn_lens.studies.outputs import MultifunctionConfig

    from dpn_lens.evaluation.control_record import load_control_record

    control = {}
    for folder in args.control:
        path = Path(folder) / "control.json"
        if not path.exists():
            raise FileNotFoundError(f"--control {folder}: no control.json there; pass an output folder of `dpn-lens control`")
        record = load_control_record(path)
        control[record.meta.model] = record
    model, config = None, None
    if not args.no_capability:
        model = load_model(_model_name(args, run), dtype=args.dtype, device=args.device)
        config = MultifunctionConfig(
            data_dir=args.data_dir, n_text=args.n_text, n_multiple_choice=args.n_questions, n_held_out=args.n_held_out,
            window=args.window, fraction=args.capability_fraction, gamma=args.gamma, batch_size=args.batch_size,
            seed=args.seed, random_control=not args.no_random_control, methods=("DPN-LE",))
    causal_study(run, args.out, model, control, config, png=not args.no_png, plotlyjs=args.plotlyjs,
                 log=lambda text: print(text, flush=True))
    return 0


def _run_selection(args: argparse.Namespace, run: Any) -> int:
    from dpn_lens.effect.reliability import MIN_HALF
    from dpn_lens.models import load_model
    from dpn_lens.studies.selection import selection_study

    if args.selection_pairs < 2 * MIN_HALF:
        raise ValueError(f"--selection-pairs must be at least {2 * MIN_HALF} (two halves of {MIN_HALF})")
    if args.splits < 1:
        raise ValueError("--splits must be at least 1")
    model = load_model(_model_name(args, run), dtype=args.dtype, device=args.device)
    selection_study(run, args.out, model, rules=args.rules, n_pairs=args.selection_pairs, seed=args.seed,
                    splits=args.splits, png=not args.no_png, plotlyjs=args.plotlyjs,
                    log=lambda text: print(text, flush=True))
    return 0
