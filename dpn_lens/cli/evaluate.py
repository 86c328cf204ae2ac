"""``dpn-lens evaluate``: one command for "does this edit move the trait, and at what cost?".

The metrics name what to measure; each family is measured by its harness, both with the same option
spellings, into one folder with one long result table (``results.csv``, ``evaluation.table``):

* ``preference`` (the held-out paired-answer margin, with the persona prompt, random neurons and γ 0 as
  controls, every method at matched KL) and ``generation`` (generated answers scored by held-out persona
  likelihood): ``dpn_lens.evaluation.control``;
* ``questionnaire``, ``statements`` and ``capability`` (measured together, at a fixed γ) and ``judge``
  (a judge model's ratings, when an endpoint is given): ``dpn_lens.evaluation.compare``.

Both families on one model (the same ``--model``, ``--dtype`` and ``--device``) run in one pass over the
traits on one loaded model (``evaluation.runner.evaluate``); runs that need different models (each keeps
its own ``--dtype`` default) run one after the other (``why_apart`` says why).

``dpn-lens control`` and ``dpn-lens compare`` are the same two runs under their earlier names: they still
run, and print the ``evaluate`` command that does the same.

Example:
    >>> route(["--metrics", "preference,capability", "--traits", "openness", "--gamma", "2", "--out", "x"])
    [('control', ['control', '--traits', 'openness', '--out', 'x']), ('compare', ['compare', '--traits', 'openness', '--gamma', '2', '--out', 'x'])]
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Sequence

from dpn_lens.cli import compare as compare_cli
from dpn_lens.cli import control as control_cli
from dpn_lens.cli.options import FORMATTER, CommaList
from dpn_lens.evaluation.runner import GENERATION_QUESTIONS, HARNESS_OF, METRICS, join_results

__all__ = ["register", "route", "why_apart", "METRICS", "HARNESS_OF"]



def _harness_parsers() -> dict[str, argparse.ArgumentParser]:
    """Fresh ``control`` and ``compare`` parsers (their options are ``evaluate``'s), and under ``""`` the
    parser of both commands, which parses a routed command line into its handler's namespace."""
    both = argparse.ArgumentParser(prog="dpn-lens", add_help=False)
    commands = both.add_subparsers(dest="command")
    return {"control": control_cli.register(commands), "compare": compare_cli.register(commands), "": both}


def _joined(make: Callable[..., argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """``make(**options)`` joined from both runs' options, each spelled once (where both have one, both take
    the value), and ``--metrics``."""
    # Its own parser copies: joining parents with "resolve" strips the shared options from them.
    parents = _harness_parsers()
    parser = make(parents=[parents["compare"], parents["control"]], conflict_handler="resolve", allow_abbrev=False)
    parser.add_argument("--metrics", action=CommaList, allowed=list(METRICS), default=["preference"], metavar="METRICS",
                        help=f"comma list of {','.join(METRICS)}")
    return parser


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command: ``--metrics`` and every option of ``control`` and ``compare``.

    Example:
        >>> parser = argparse.ArgumentParser(); register(parser.add_subparsers(dest="command"))   # doctest: +ELLIPSIS
        ArgumentParser(...)
    """
    help_text = ("does this edit move the trait, and at what cost? --metrics picks what is measured: preference and "
                 "generation (at matched KL, with controls; as `control`), questionnaire, statements, capability and "
                 "judge (at a fixed gamma; as `compare`); one folder, one results.csv")
    parser = _joined(lambda **options: subparsers.add_parser("evaluate", help=help_text, description=help_text,
                                                             formatter_class=FORMATTER, **options))
    # An option both runs have with different defaults: each run keeps its own when the option is not given.
    own = _harness_parsers()
    for action in parser._actions:   # noqa: SLF001
        defaults = {h: own[h]._option_string_actions[action.option_strings[0]].default   # noqa: SLF001
                    for h in ("control", "compare") if action.option_strings
                    and action.option_strings[0] in own[h]._option_string_actions}   # noqa: SLF001
        if len(defaults) == 2 and defaults["control"] != defaults["compare"]:
            shown = {h: ",".join(map(str, d)) if isinstance(d, list) else ("unset" if d is None else d)
                     for h, d in defaults.items()}
            action.default = None
            action.help = (f"{action.help or ''} (None: {shown['control']} for preference and generation, "
                           f"{shown['compare']} for questionnaire, statements, capability and judge)").lstrip()
    parser.set_defaults(handler=run_evaluate)
    return parser


def _take(parser: argparse.ArgumentParser, argv: Sequence[str], start: int) -> tuple[str, list[str]]:
    """The option at ``argv[start]`` and its tokens (the option and its values)."""
    token = argv[start]
    name = token.partition("=")[0]
    action = parser._option_string_actions.get(name)   # noqa: SLF001 (argparse keeps no public lookup)
    if action is None:
        raise ValueError(f"evaluate: unknown option {token!r}; see `dpn-lens evaluate --help`")
    if "=" in token or action.nargs == 0:
        return name, [token]
    if action.nargs in (None, 1):
        return name, list(argv[start:start + 2])
    end = start + 1
    while end < len(argv) and not (argv[end].startswith("--") and len(argv[end]) > 2):
        end += 1
    return name, list(argv[start:end])


def route(argv: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The ``control`` and ``compare`` command lines an ``evaluate`` command line stands for.

    Each option goes to every run that has it; ``--metrics`` chooses the runs. An option no chosen run
    has is refused, naming the metric that takes it.

    Raises:
        ValueError: for an option that no chosen metric uses, or a generation or judge setting without
            its metric.
    """
    parsers = _harness_parsers()
    evaluate = _joined(lambda **options: argparse.ArgumentParser(add_help=False, **options))
    parsed = evaluate.parse_args(list(argv))
    metrics: list[str] = list(parsed.metrics)
    wanted = list(dict.fromkeys(HARNESS_OF[m] for m in metrics))
    lines = {harness: [harness] for harness in wanted}
    index, given = 0, set()
    while index < len(argv):
        if not argv[index].startswith("-"):
            raise ValueError(f"evaluate takes options only; {argv[index]!r} is not one")
        name, tokens = _take(evaluate, argv, index)
        index += len(tokens)
        given.add(name)
        if name == "--metrics":
            continue
        takers = [h for h in wanted if name in parsers[h]._option_string_actions]   # noqa: SLF001
        if not takers:
            owner = next(h for h in ("control", "compare") if name in parsers[h]._option_string_actions)  # noqa: SLF001
            needs = ",".join(m for m, h in HARNESS_OF.items() if h == owner)
            raise ValueError(f"{name} applies to the metrics {needs}, not to --metrics {','.join(metrics)}; add one of "
                             f"them to --metrics or drop {name}")
        for harness in takers:
            lines[harness] += tokens
    generation = parsed.generation
    if "generation" in metrics and "--generation" not in given:
        lines["control"] += ["--generation", str(GENERATION_QUESTIONS)]
    if generation and "generation" not in metrics:
        raise ValueError(f"--generation {generation} asks for the generation check: add generation to --metrics")
    if "judge" in metrics and not ("--judge-url" in given or os.environ.get("DPN_LENS_JUDGE_URL")):
        raise ValueError("the judge metric needs an OpenAI-compatible endpoint: pass --judge-url URL (or set "
                         "$DPN_LENS_JUDGE_URL), or drop judge from --metrics")
    if "--judge-url" in given and "judge" not in metrics:
        raise ValueError("--judge-url asks for the judge: add judge to --metrics")
    return [(harness, lines[harness]) for harness in wanted]


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the chosen metrics into ``--out`` and write one ``results.csv``.

    Both metric families on one model (the same ``--model``, ``--dtype`` and ``--device`` for both runs) go
    through one pass over the traits on one loaded model (``_one_pass``); otherwise each harness runs on
    its share of the command line, one after the other (``_one_after_the_other``).
    """
    from dpn_lens.cli.options import validate_args

    argv = list(getattr(args, "argv", None) or [])
    if argv[:1] == ["evaluate"]:
        argv = argv[1:]
    routes = route(argv)
    named = set(args.metrics)
    together = {"questionnaire", "statements", "capability"}
    if named & together and not together <= named:
        print("evaluate: questionnaire, statements and capability are measured together (one comparison run); "
              "results.csv holds all three")
    parser = _harness_parsers()[""]
    parsed: dict[str, argparse.Namespace] = {}
    for harness, line in routes:
        print(f"evaluate: {', '.join(m for m in args.metrics if HARNESS_OF[m] == harness)}: dpn-lens {shlex.join(line)}",
              flush=True)
        parsed[harness] = parser.parse_args(line)
        parsed[harness].via_evaluate = True     # no "this is evaluate" note: it is
        validate_args(parsed[harness])
    control = parsed.get("control")
    if control is not None and control.plan:
        if "compare" in parsed:
            print("evaluate --plan: the plan covers preference and generation; questionnaire, statements, capability "
                  "and judge have no plan yet and do not run")
        return int(control.handler(control) or 0)
    if len(parsed) == 2:
        apart = why_apart(parsed)
        if apart is None:
            return _one_pass(args, parsed["control"], parsed["compare"])
        if parsed["control"].random_weights:     # compare's own load would read the weights
            raise ValueError(f"--random-weights needs both runs on one model, in one pass: {apart}")
        print(f"evaluate: {apart}", flush=True)
    return _one_after_the_other(args, parsed)


def why_apart(parsed: dict[str, argparse.Namespace]) -> str | None:
    """Why the ``control`` and ``compare`` runs of one ``evaluate`` command run one after the other, each
    with its own model (None: they run in one pass on one model). ``--merge`` joins earlier control runs
    (no model); different model settings need two models (each run keeps its own ``--dtype`` default).

    Example:
        >>> both = {"control": argparse.Namespace(model="m", dtype="bfloat16", device=None, merge=None),
        ...         "compare": argparse.Namespace(model="m", dtype=None, device=None)}
        >>> why_apart(both)[:60]
        'control runs m in bfloat16 on cpu and compare m in float32 o'
        >>> both["compare"].dtype = "bfloat16"; why_apart(both) is None
        True
    """
    if parsed["control"].merge:
        return "--merge joins earlier control runs; the comparison runs after it"
    setting = {h: (a.model, a.dtype or "float32", a.device or "cpu") for h, a in parsed.items()}
    if setting["control"] == setting["compare"]:
        return None
    words = {h: f"{model} in {dtype} on {device}" for h, (model, dtype, device) in setting.items()}
    return (f"control runs {words['control']} and compare {words['compare']} (each run's default where not given), "
            "so each loads its own model and they run one after the other; give --dtype (and --model, --device) "
            "to run both in one pass on one model")


def _one_after_the_other(args: argparse.Namespace, parsed: dict[str, argparse.Namespace]) -> int:
    """Each harness's own command on its share of the command line, then the joined table."""
    for harness_args in parsed.values():
        status = int(harness_args.handler(harness_args) or 0)
        if status:
            return status
    _report_joined(args.out, list(parsed))
    return 0


def _one_pass(args: argparse.Namespace, control: argparse.Namespace, compare: argparse.Namespace) -> int:
    """Both harnesses on one loaded model in one pass over the traits (``evaluation.runner.evaluate``),
    saving as ``control`` saves (the finished traits after each, the maps made on the fly), then each
    harness's files and the joined table, as the two commands would write them."""
    import time

    from dpn_lens.evaluation.compare import write_outputs
    from dpn_lens.evaluation.runner import EvaluationConfig, evaluate
    from dpn_lens.models import load_model
    from dpn_lens.report.control import write_control_outputs

    started = time.time()
    config = EvaluationConfig.of(args.metrics, control=control_cli.config_from_args(control),
                                 compare=compare_cli.compare_config(compare, compare_cli.judge_from_args(compare)))
    control_cli.check_before_loading(control, config.control)   # --run reaches both runs alike (route)
    print("evaluate: both runs use one model, loaded once, in one pass over the traits", flush=True)
    model = load_model(control.model, dtype=control.dtype, device=control.device, random_weights=control.random_weights)
    saving = control_cli.ControlSaving(args.out)
    result = evaluate(model, config, out=None,
                      log=control_cli.timestamped(started), progress=not control.no_progress,
                      on_trait=saving.save_partial, on_located=saving.save_map)
    # The one command's time, in each record (the two runs shared it).
    seconds, ran_with = time.time() - started, "evaluate: control and compare in one pass"
    control_record = result.control.with_meta(command_seconds=seconds, ran_with=ran_with)   # type: ignore[union-attr]
    comparison = result.comparison.with_meta(command_seconds=seconds, ran_with=ran_with)  # type: ignore[union-attr]
    for path in [*write_control_outputs(control_record, args.out, png=not control.no_png),
                 *write_outputs(comparison, args.out, make_png=not compare.no_png)]:
        print(f"wrote {path}")
    saving.done()
    _report_joined(args.out, ["control", "compare"])
    return 0


def _report_joined(out: str, ran: Sequence[str]) -> None:
    from dpn_lens.evaluation.table import RESULT_TABLE
    from dpn_lens.report.results import RESULTS_HTML, RESULTS_MARKDOWN

    rows = join_results(out, ran)      # nothing to join after --merge of no record
    if rows:
        print(f"wrote {Path(out) / RESULT_TABLE} ({len(rows)} rows from {', '.join(ran)}), "
              f"{Path(out) / RESULTS_MARKDOWN} and {Path(out) / RESULTS_HTML}")
