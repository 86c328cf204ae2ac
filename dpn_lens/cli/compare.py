"""``dpn-lens compare``: the method comparison from the command line (``register`` adds it)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from dpn_lens.cli.options import (FORMATTER, CommaList, add_data_dir_option, add_model_options, add_out_option,
                                  add_renamed, add_run_option, add_selection_options, add_traits_option,
                                  print_evaluate_equivalent)

__all__ = ["register", "run_compare", "compare_config", "judge_from_args"]

QUICK = {"items": 8, "statements": 20, "gamma_sweep": [0.0, 1.0, 2.0], "q_sweep": []}
"""What ``--quick`` sets (where the option is not given); capability sizes are ``CapabilitySizes.quick()`` either way."""
FULL = {"items": None, "statements": None, "gamma_sweep": [0.0, 0.5, 1.0, 1.5, 2.0], "q_sweep": [0.999, 0.995, 0.97]}
"""The defaults without ``--quick``: every item and statement (``None``), the full sweeps."""


def _count_or_all(text: str) -> int | None:
    """``"all"`` -> ``None`` (every item), else a positive integer."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value}")
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` sub-command to an ``argparse`` sub-parser set.

    Example:
        >>> parser = argparse.ArgumentParser(); register(parser.add_subparsers(dest="command"))   # doctest: +ELLIPSIS
        ArgumentParser(...)
    """
    from dpn_lens.evaluation.methods import DEFAULT_METHOD_NAMES, METHOD_NAMES

    help_text = "compare DPN-LE with NPTI, dense, top-k, CAA and prompting"
    parser = subparsers.add_parser("compare", help=help_text, description=help_text, formatter_class=FORMATTER)
    add_model_options(parser)
    add_traits_option(parser)
    parser.add_argument("--methods", action=CommaList, allowed=list(METHOD_NAMES), default=list(DEFAULT_METHOD_NAMES),
                        metavar="METHODS", help=f"comma list of {','.join(METHOD_NAMES)}")
    add_data_dir_option(parser, "ipip/, personalitybench/, anthropic_persona/ and capability/")
    add_run_option(parser, "run folder (or its maps/ folder) with <trait>.safetensors neuron maps (None: located on "
                           "the fly)", old="--maps")
    parser.add_argument("--n-pairs", type=int, default=100, help="embedded pairs per trait when locating on the fly")
    add_renamed(parser, "--locate-pairs", "--n-pairs", type=int)
    add_selection_options(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the statement, capability-item and judge-question draws and of the effect rules' "
                             "selection pairs")
    parser.add_argument("--quick", action="store_true",
                        help=f"a few-minute run: --items {QUICK['items']} --statements {QUICK['statements']}, gamma sweep "
                             f"{','.join(map(str, QUICK['gamma_sweep']))}, no q sweep (options given explicitly win)")
    parser.add_argument("--items", type=_count_or_all, default=argparse.SUPPRESS,
                        help="questionnaire items per trait, or 'all' (default: all; --quick: 8)")
    parser.add_argument("--inventory", default="ipip_neo_300_test", help="IPIP inventory in ipip/ the questionnaire reads")
    parser.add_argument("--statements", type=_count_or_all, default=argparse.SUPPRESS,
                        help="Anthropic statements per pole, or 'all' (default: all, 500 per pole; --quick: 20)")
    parser.add_argument("--respondents", default=None, help="PAlign/PAPI respondent JSON (None: the 10-respondent sample)")
    parser.add_argument("--mc-items", type=int, default=12, help="items per multiple-choice task")
    parser.add_argument("--lambada-items", type=int, default=24, help="LAMBADA passages (last-word accuracy)")
    parser.add_argument("--ppl-chunks", type=int, default=3, help="WikiText-2 chunks for perplexity")
    parser.add_argument("--ppl-tokens", type=int, default=128, help="tokens per perplexity chunk")
    parser.add_argument("--kl-chunks", type=int, default=2,
                        help="WikiText-2 chunks (after the perplexity ones) for the KL from the unsteered model")
    parser.add_argument("--kl-tokens", type=int, default=96, help="tokens per KL chunk")
    parser.add_argument("--gamma", type=float, default=1.0, help="DPN-LE / dense / top-k strength")
    parser.add_argument("--npti-gamma", type=float, default=1.4, help="NPTI baseline strength")
    parser.add_argument("--caa-gamma", type=float, default=1.0,
                        help="CAA baseline strength (multiples of the residual mean difference)")
    parser.add_argument("--npti-prompts", type=int, default=16)
    parser.add_argument("--npti-tokens", type=int, default=24)
    parser.add_argument("--gamma-sweep", action=CommaList, item=float, nargs="*", default=argparse.SUPPRESS,
                        metavar="GAMMAS", help=f"comma list (default: {','.join(map(str, FULL['gamma_sweep']))}; "
                                               f"--quick: {','.join(map(str, QUICK['gamma_sweep']))})")
    parser.add_argument("--q-sweep", action=CommaList, item=float, nargs="*", default=argparse.SUPPRESS,
                        metavar="QS", help=f"comma list (default: {','.join(map(str, FULL['q_sweep']))}; "
                                           "--quick: none)")
    parser.add_argument("--sweep-trait", default=None, help="trait of the gamma and q sweeps (None: the first of --traits)")
    parser.add_argument("--judge-url", default=None,
                        help="base URL of an OpenAI-compatible API (e.g. http://localhost:8000/v1) for the optional "
                             "PersonalityBench judge (None: $DPN_LENS_JUDGE_URL, else off). Key: $DPN_LENS_JUDGE_KEY")
    parser.add_argument("--judge-model", default="gpt-4o", help="model name the judge endpoint serves")
    parser.add_argument("--judge-questions", type=int, default=10, help="PersonalityBench test questions per trait")
    parser.add_argument("--judge-tokens", type=int, default=400, help="new tokens per generated answer (paper: 400)")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="seconds before one judge request times out")
    parser.add_argument("--judge-retries", type=int, default=3,
                        help="times a failed judge request (connection error, timeout, 429, 5xx) is sent again")
    parser.add_argument("--no-png", action="store_true", help="write HTML figures only")
    add_out_option(parser, "output folder", required=True)
    parser.set_defaults(handler=run_compare)
    return parser


def compare_config(args: argparse.Namespace, judge: Any = None) -> Any:
    """The ``CompareConfig`` of parsed ``compare`` arguments (``--quick`` fills the sizes not given).

    Example:
        >>> parser = argparse.ArgumentParser(); _ = register(parser.add_subparsers(dest="command"))
        >>> compare_config(parser.parse_args(["compare", "--out", "x", "--quick"])).statements_per_pole
        20
    """
    from dpn_lens.evaluation.capability import CapabilitySizes
    from dpn_lens.evaluation.compare import CompareConfig
    from dpn_lens.pipeline import parse_traits

    sizes = {**(QUICK if args.quick else FULL), **{k: v for k, v in vars(args).items() if k in FULL}}
    return CompareConfig(
        traits=parse_traits(args.traits), methods=args.methods, data_dir=args.data_dir, maps_dir=args.run,
        locate_pairs=args.n_pairs, questionnaire_items=sizes["items"], inventory=args.inventory,
        statements_per_pole=sizes["statements"], respondents=args.respondents,
        capability=CapabilitySizes(args.mc_items, args.lambada_items, args.ppl_chunks, args.ppl_tokens,
                                   args.kl_chunks, args.kl_tokens),
        gamma=args.gamma, npti_gamma=args.npti_gamma, caa_gamma=args.caa_gamma, npti_prompts=args.npti_prompts,
        npti_new_tokens=args.npti_tokens, gamma_sweep=list(sizes["gamma_sweep"]), q_sweep=list(sizes["q_sweep"]),
        sweep_trait=args.sweep_trait, selection_pairs=args.selection_pairs, budget=args.budget, seed=args.seed,
        judge=judge)


def judge_from_args(args: argparse.Namespace) -> Any:
    """The ``JudgeConfig`` the command line asks for (``--judge-url`` or ``$DPN_LENS_JUDGE_URL``), saying
    whether the judge runs; None without an endpoint.

    Raises:
        ValueError: for a timeout that is not positive or a negative retry count.
    """
    from dpn_lens.evaluation.judge import JudgeConfig, judge_endpoint

    url = judge_endpoint(args.judge_url)
    if url is None:
        print("judge: no endpoint configured (--judge-url or $DPN_LENS_JUDGE_URL); the judge evaluation is skipped")
        return None
    if args.judge_timeout <= 0 or args.judge_retries < 0:
        raise ValueError(f"--judge-timeout must be > 0 and --judge-retries >= 0, got {args.judge_timeout} and "
                         f"{args.judge_retries}")
    print(f"judge: {args.judge_model} at {url} rates {args.judge_questions} generated answers per trait and condition")
    return JudgeConfig(url, args.judge_model, args.judge_questions, args.judge_tokens, timeout=args.judge_timeout,
                       retries=args.judge_retries)


def run_compare(args: argparse.Namespace) -> int:
    from dpn_lens.cli.control import timestamped
    from dpn_lens.evaluation.compare import run_comparison, write_outputs
    from dpn_lens.evaluation.judge import judge_endpoint
    from dpn_lens.models import load_model
    from dpn_lens.run import check_runs_of

    started = time.time()
    print_evaluate_equivalent("compare", args, judge=judge_endpoint(args.judge_url) is not None)
    config = compare_config(args, judge_from_args(args))
    check_runs_of([args.run])       # an unfinished or mixed run folder is refused before the model loads
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    record = run_comparison(model, config, log=timestamped(started))
    record = record.with_meta(command_seconds=time.time() - started)
    for path in write_outputs(record, args.out, make_png=not args.no_png):
        print(f"wrote {path}")
    return 0
