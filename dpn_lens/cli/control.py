"""``dpn-lens control``: the trait-control evaluation from the command line (``register`` adds it)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dpn_lens.cli.options import (FORMATTER, CommaList, add_data_dir_option, add_model_options, add_out_option,
                                  add_random_weights_option, add_renamed, add_run_option, add_selection_options,
                                  add_traits_option, print_evaluate_equivalent)

if TYPE_CHECKING:
    from dpn_lens.evaluation.control_record import ControlRecord

__all__ = ["register", "run_control_command", "config_from_args", "check_before_loading", "ControlSaving",
           "timestamped"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``control`` sub-command.

    Example:
        >>> parser = argparse.ArgumentParser(); register(parser.add_subparsers(dest="command"))   # doctest: +ELLIPSIS
        ArgumentParser(...)
    """
    from dpn_lens.evaluation.calibrate import DEFAULT_TARGET_KL, GAMMA_GRID
    from dpn_lens.evaluation.control import DEFAULT_METHODS, DEFAULT_SCORE_CACHE_GIB, SWEEP_METHODS

    help_text = ("does steering work? preference shift with 95%% CIs, the persona prompt as positive control, "
                 "random-neuron and gamma-0 controls, dose-response of every method vs KL, matched cost, calibrated gamma")
    parser = subparsers.add_parser("control", help=help_text, description=help_text, formatter_class=FORMATTER)
    add_model_options(parser, default_dtype="bfloat16")
    add_traits_option(parser)
    add_data_dir_option(parser, "personalitybench/ (the held-out questions and persona descriptions)")
    add_run_option(parser, "run folder (or its maps/) with the DPN-LE maps, and effect-rule maps in maps/<rule>/ "
                           "(None: located on the fly from --n-pairs embedded pairs)", old="--maps")
    parser.add_argument("--merge", action=CommaList, default=None, metavar="FOLDERS",
                        help="comma list of folders: join finished control runs of the same settings on different "
                             "traits (each folder's control.json, else its control.partial.json) into --out, as one "
                             "run; loads no model")
    parser.add_argument("--n-pairs", type=int, default=500, help="embedded pairs per trait when locating on the fly")
    add_renamed(parser, "--locate-pairs", "--n-pairs", type=int)
    parser.add_argument("--statistics", default="last", choices=["last", "answer"],
                        help="where on-the-fly localization reads the neurons: the last prompt token (the paper) or "
                             "the mean over the model's own answer tokens (where a decode-time edit acts)")
    parser.add_argument("--q", type=float, default=None, help="|s| quantile when locating on the fly (None: 0.995)")
    parser.add_argument("--tau-d", type=float, default=None, help="Cohen's d threshold when locating on the fly "
                                                                   "(None: proposed from the data)")
    parser.add_argument("--layers", default=None, help="layer range when locating on the fly, e.g. 10-29 "
                                                       "(None: proposed from the data)")
    parser.add_argument("--methods", action=CommaList, default=None, metavar="METHODS",
                        help=f"comma list of methods to sweep, of {','.join(SWEEP_METHODS)} (None: "
                             f"{','.join(DEFAULT_METHODS)})")
    add_selection_options(parser)
    parser.add_argument("--k-sweep", default=None,
                        help="comma list of neuron budgets, e.g. 8,32,128,512,2048,all: each selection rule's shift at "
                             "--target-kl with that many neurons (sweep.csv, sparsity figure)")
    parser.add_argument("--random-draws", type=int, default=5,
                        help="random-neuron draws per rule, trait and direction at --target-kl (intervals over draws "
                             "and pairs)")
    probe = parser.add_mutually_exclusive_group()
    probe.add_argument("--kl-skip-context", action="store_true",
                       help="the KL probe edits only its text, not the BOS token before it, as decode-only use never "
                            "edits the prompt (the default since 2026-12-05; kept so earlier commands still parse)")
    probe.add_argument("--kl-edit-context", action="store_true",
                       help="the KL probe edits the BOS token before its text too, as every run before 2026-12-05 did "
                            "(reproduces those runs' γ and shifts)")
    parser.add_argument("--random-draws-off-target", type=int, default=1,
                        help="random-neuron draws at the other KL levels (0: none there)")
    parser.add_argument("--generation", type=int, default=0, metavar="QUESTIONS",
                        help="the generation-based check on this many held-out questions (0: off): answers generated "
                             "with each edit, scored by the unsteered model under held-out high vs low personas")
    parser.add_argument("--generation-levels", default=None,
                        help="comma list of KL levels at which generation is checked (None: --target-kl)")
    parser.add_argument("--generation-methods", default=None,
                        help="comma list of methods checked in generation (None: the selection rules and CAA)")
    parser.add_argument("--generation-draws", type=int, default=5, help="random-neuron draws per rule in generation")
    parser.add_argument("--eval-pairs", type=int, default=None,
                        help="held-out preference pairs drawn per trait (None: 64, --quick 24)")
    add_renamed(parser, "--pairs", "--eval-pairs", type=int)
    parser.add_argument("--gammas", default=None,
                        help=f"comma list of strengths for the KL curves (None: {','.join(f'{g:g}' for g in GAMMA_GRID)})")
    parser.add_argument("--kl-levels", default=None, help="comma list of KL levels (nats/token) where every method's "
                                                          "shift is measured (None: 0.01,0.05,0.1; --quick 0.05,0.5)")
    parser.add_argument("--target-kl", type=float, default=DEFAULT_TARGET_KL, help="KL at which DPN-LE is calibrated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out pair draw (questions and personas) and "
                                                           "of the random-neuron control; another seed replicates a "
                                                           "result on a new draw (an effect-rule map in --run selected "
                                                           "on another seed's pairs is selected anew)")
    parser.add_argument("--score-cache-gib", type=float, default=DEFAULT_SCORE_CACHE_GIB, metavar="GIB",
                        help="GiB of the held-out questions' key/value cache kept while the edits are scored "
                             "(default: all of it; `--plan` prints its size); the questions of the batches past it "
                             "run again for every edit (the same numbers, more time)")
    parser.add_argument("--no-random-control", action="store_true", help="skip the random-neuron curves")
    parser.add_argument("--plan", action="store_true",
                        help="print this run's plan (time per stage from this machine's measurement, `dpn-lens plan "
                             "--stage control --measure`; peak memory) and exit without running it")
    parser.add_argument("--pairs-cached", action="store_true",
                        help="with --plan: take every trait's held-out pairs as cached by an earlier run (no "
                             "generation stage); the plan looks the cache up itself for an embedded or GGUF model")
    parser.add_argument("--no-cache", action="store_true", help="generate the held-out and the selection pairs again (no cache)")
    add_random_weights_option(parser, "; the pairs it generates are not cached")
    parser.add_argument("--quick", action="store_true", help="a few-minute run: 24 pairs, dpn-le/dense/caa, KL levels 0.05 and 0.5")
    parser.add_argument("--no-png", action="store_true", help="write HTML figures only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_out_option(parser, "output folder", required=True)
    parser.set_defaults(handler=run_control_command)
    return parser


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError:
        raise ValueError(f"{option} takes a comma list of numbers, e.g. 0.5,2,8; got {text!r}") from None


def parse_budgets(text: str) -> list[int]:
    """``"8,32,all"`` -> ``[8, 32, 0]`` (``0`` = every candidate neuron, ``control.ALL_NEURONS``).

    Example:
        >>> parse_budgets("8, 32,all")
        [8, 32, 0]
    """
    budgets = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.lower() == "all":
            budgets.append(0)
        elif part.isdigit() and int(part) > 0:
            budgets.append(int(part))
        else:
            raise ValueError(f"--k-sweep takes positive neuron counts and 'all', e.g. 8,32,128,all; got {part!r}")
    if not budgets:
        raise ValueError("--k-sweep names no budget; pass e.g. 8,32,128,512,2048,all")
    return budgets


def config_from_args(args: argparse.Namespace) -> Any:
    """The ``ControlConfig`` a command line asks for (checked before any model loads)."""
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.pipeline import parse_traits

    settings: dict[str, Any] = dict(traits=parse_traits(args.traits), data_dir=args.data_dir, maps_dir=args.run,
                                    locate_pairs=args.n_pairs, statistics=args.statistics, target_kl=args.target_kl,
                                    random_control=not args.no_random_control,
                                    # a random model's answers must never stand in for the model's own
                                    cache_pairs=not (args.no_cache or getattr(args, "random_weights", False)),
                                    seed=args.seed, budget=args.budget, selection_pairs=args.selection_pairs,
                                    random_draws=args.random_draws, generation_questions=args.generation,
                                    random_draws_off_target=args.random_draws_off_target,
                                    generation_draws=args.generation_draws, kl_skip_context=not args.kl_edit_context,
                                    score_cache_gib=args.score_cache_gib)
    from dpn_lens.pipeline import parse_layers

    settings.update(locate_q=args.q, locate_tau_d=args.tau_d,
                    locate_layers=parse_layers(args.layers) if args.layers else None)
    if args.methods:
        settings["methods"] = list(args.methods)
    if args.eval_pairs is not None:
        settings["pairs"] = args.eval_pairs
    if args.gammas:
        settings["gammas"] = _floats(args.gammas, "--gammas")
    if args.kl_levels:
        settings["kl_levels"] = _floats(args.kl_levels, "--kl-levels")
    if args.k_sweep:
        settings["k_sweep"] = parse_budgets(args.k_sweep)
    if args.generation_levels:
        settings["generation_levels"] = _floats(args.generation_levels, "--generation-levels")
    if args.generation_methods:
        settings["generation_methods"] = [m.strip() for m in args.generation_methods.split(",") if m.strip()]
    return ControlConfig.quick(**settings) if args.quick else ControlConfig(**settings)


def check_before_loading(args: argparse.Namespace, config: Any) -> None:
    """What a ``control`` run refuses before its model loads: a missing data folder, an unfinished or mixed
    run folder."""
    from dpn_lens.data.contrastive import resolve_data_dir

    from dpn_lens.run import check_runs_of

    resolve_data_dir(config.data_dir, "personalitybench")
    check_runs_of([args.run])


@dataclass(frozen=True)
class ControlSaving:
    """What a ``control`` run writes into ``out`` while it runs: after each trait the result so far
    (``control.partial.json``, so an interrupted run keeps its finished traits; ``write_control_outputs``
    can render it), and each map it makes on the fly (``maps/``, and ``maps/<rule>/`` for an effect rule),
    so that ``--run OUT`` reuses them (another method set, the same neurons).

    Example:
        >>> ControlSaving("runs/x").partial.name
        'control.partial.json'
    """

    out: str | Path

    @property
    def partial(self) -> Path:
        return Path(self.out) / "control.partial.json"

    def save_partial(self, record: "ControlRecord") -> None:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        record.save(self.partial)

    def save_map(self, trait: str, neuron_map: Any) -> None:
        from dpn_lens.run import rule_map_path

        path = rule_map_path(self.out, trait, neuron_map.rule)
        path.parent.mkdir(parents=True, exist_ok=True)
        neuron_map.save(path)

    def done(self) -> None:
        """The run finished and wrote ``control.json``: the partial record goes."""
        self.partial.unlink(missing_ok=True)


def timestamped(started: float) -> Callable[[str], None]:
    """A log that prints each message after the seconds since ``started``."""
    return lambda message: print(f"[{time.time() - started:6.0f}s] {message}", flush=True)


def run_control_command(args: argparse.Namespace) -> int:
    from dpn_lens.evaluation.control import run_control
    from dpn_lens.report.control import write_control_outputs
    from dpn_lens.models import load_model

    print_evaluate_equivalent("control", args, generation=bool(args.generation))
    if args.merge:
        return _merge_command(args.merge, args.out, png=not args.no_png)
    started = time.time()
    config = config_from_args(args)
    if args.plan:
        from dpn_lens.plan_control import plan_control_run

        plan = plan_control_run(args.model, config, "cpu" if args.device in (None, "cpu") else args.device, args.dtype,
                                pairs_cached=args.pairs_cached)
        if plan.seconds is None:
            print(f"no measurement of this machine for {args.dtype} yet: run `dpn-lens plan --stage control --measure "
                  f"--model {args.model} --dtype {args.dtype}` for times")
        print(plan.text())
        return 0
    check_before_loading(args, config)
    model = load_model(args.model, dtype=args.dtype, device=args.device, random_weights=args.random_weights)
    saving = ControlSaving(args.out)
    result = run_control(model, config, log=timestamped(started), progress=not args.no_progress,
                         on_trait=saving.save_partial, on_located=saving.save_map)
    result = result.with_meta(command_seconds=time.time() - started)
    for path in write_control_outputs(result, args.out, png=not args.no_png):
        print(f"wrote {path}")
    saving.done()
    return 0


def _merge_command(folders: list[str], out: str, png: bool) -> int:
    """``--merge``: one control result from runs on different traits (``merge_control_results``)."""
    import shutil
    from pathlib import Path

    from dpn_lens.evaluation.control import merge_control_results
    from dpn_lens.evaluation.control_record import load_control_record
    from dpn_lens.report.control import write_control_outputs

    results = []
    for folder in folders:
        found = [path for path in (Path(folder) / "control.json", Path(folder) / "control.partial.json") if path.exists()]
        if not found:
            raise FileNotFoundError(f"{folder} holds no control.json or control.partial.json: pass the --out folders "
                                    "of `dpn-lens control` runs")
        results.append(load_control_record(found[0]))
    merged = merge_control_results(results)
    for path in write_control_outputs(merged, out, png=png):
        print(f"wrote {path}")
    for folder in folders:   # the maps each run made, so `--run OUT` reuses all of them
        if (Path(folder) / "maps").is_dir() and Path(folder).resolve() != Path(out).resolve():
            shutil.copytree(Path(folder) / "maps", Path(out) / "maps", dirs_exist_ok=True)
    return 0
