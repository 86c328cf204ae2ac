"""Option groups every ``dpn-lens`` subcommand spells the same way.

One spelling per thing, in every verb:

- ``--run DIR``: a run folder (``locate --out``, ``demo --out``, a ``control`` run) or its ``maps/``;
  ``--map FILE``: one map file.
- Pair counts: ``--n-pairs`` (embedded contrastive pairs a map is located on), ``--eval-pairs``
  (held-out preference pairs an edit is judged on), ``--selection-pairs`` (pairs an effect rule is
  selected on).
- Lists are comma lists (``--traits openness,E``, ``--methods dpn-le,caa``; ``CommaList``); values
  separated by spaces are accepted too.
- ``--plotlyjs inline|cdn|directory``: plotly.js embedded, from the CDN, or one shared file beside the
  HTML.
- ``--model``/``--dtype``/``--device`` (every command that loads a model), ``--data-dir`` (default:
  None, resolved by ``dpn_lens.data.contrastive.resolve_data_dir``, which falls back to
  ``$DPN_LENS_DATA``) and ``--out``.

Spellings of earlier releases (``--maps``, ``--locate-pairs``, ``--pairs``, ``--effect-pairs``, a
positional run folder) still parse for one release (``add_renamed``): they print the new spelling and
are hidden from ``--help``. Each subcommand parser uses ``FORMATTER`` so ``--help`` shows the defaults.

Example:
    >>> parser = argparse.ArgumentParser(formatter_class=FORMATTER)
    >>> add_traits_option(parser); add_model_options(parser)
    >>> parser.parse_args(["--traits", "openness,E"]).traits
    ['openness', 'E']
    >>> parser.parse_args(["--traits", "openness", "E"]).traits
    ['openness', 'E']
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["FORMATTER", "DEFAULT_MODEL", "CommaList", "add_subcommand", "add_traits_option", "add_model_options",
           "add_engine_option", "add_random_weights_option", "add_data_dir_option", "add_out_option", "add_selection_options", "add_run_option", "add_renamed", "add_positional_run",
           "check_model_spec", "check_device", "check_out", "validate_args", "read_maps",
           "print_evaluate_equivalent", "equivalent_command"]

class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, and a comma-list option as one value (``--methods METHODS``), as it is
    meant to be written, not as argparse's ``METHODS [METHODS ...]``."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if isinstance(action, CommaList):
            metavar = self._metavar_formatter(action, default_metavar)(1)[0]
            return f"[{metavar}]" if action.nargs == "*" else metavar
        return super()._format_args(action, default_metavar)


FORMATTER = _Formatter
"""Every subcommand's help shows each option's default (and comma lists as one value)."""
DEFAULT_MODEL = "smollm2-135m-instruct"


def add_subcommand(subparsers: Any, name: str, help_text: str, description: str | None = None
                   ) -> argparse.ArgumentParser:
    """A subcommand parser with the shared help formatter."""
    return subparsers.add_parser(name, help=help_text, description=description or help_text,
                                 formatter_class=FORMATTER)


class CommaList(argparse.Action):
    """A list option spelled as a comma list: ``--methods dpn-le,caa`` gives ``["dpn-le", "caa"]``.

    Values separated by spaces (``--methods dpn-le caa``) are split the same way, so commands written
    either way parse. ``item`` converts each part (``float`` for numbers); ``allowed`` lists the valid
    parts (checked here, with the list in the error, because argparse's ``choices`` would see the
    whole ``"a,b"``). ``nargs="*"`` lets the option be given empty (``--q-sweep`` with no value: none).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument("--gammas", action=CommaList, item=float)
        >>> parser.parse_args(["--gammas", "0.5,2", "8"]).gammas
        [0.5, 2.0, 8.0]
    """

    def __init__(self, option_strings: Sequence[str], dest: str, item: Callable[[str], Any] = str,
                 allowed: Sequence[str] | None = None, nargs: str = "+", **kwargs: Any) -> None:
        self.item, self.allowed = item, None if allowed is None else list(allowed)
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        values = [values] if isinstance(values, str) else list(values or [])
        if len(values) > 1:   # recorded so that the docs' own commands can be held to the comma form
            setattr(namespace, "space_separated", [*getattr(namespace, "space_separated", []), option_string])
        parts = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
        try:
            items = [self.item(part) for part in parts]
        except ValueError:
            parser.error(f"{option_string} takes a comma list of {getattr(self.item, '__name__', 'value')}s, "
                         f"e.g. {self.metavar or 'a,b'}; got {','.join(parts)!r}")
        if self.allowed is not None:
            unknown = [part for part in items if part not in self.allowed]
            if unknown:
                parser.error(f"{option_string}: {', '.join(map(str, unknown))} is not one of "
                             f"{','.join(self.allowed)}; pass a comma list of those")
        setattr(namespace, self.dest, items)


class _Renamed(argparse.Action):
    """An earlier release's spelling of an option: stores into the new option's ``dest`` and says the
    new spelling on stderr (the command still runs)."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"dpn-lens: note: {option_string} is now spelled {self.new} (the old spelling goes in the next "
              "release)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Keep ``old`` (an earlier release's spelling of the single-value option ``new``) parsing, hidden
    from ``--help``.

    ``kwargs`` (``type=int``) are those of ``new``; the value lands in ``new``'s dest.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> _ = parser.add_argument("--eval-pairs", type=int, default=None)
        >>> add_renamed(parser, "--pairs", "--eval-pairs", type=int)
        >>> parser.parse_args(["--pairs", "8"]).eval_pairs    # prints the new spelling on stderr
        8
    """
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_Renamed, new=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kwargs)


def add_run_option(parser: argparse.ArgumentParser, help_text: str, required: bool = False,
                   old: str | None = None) -> None:
    """``--run DIR``: the run folder a command reads (``old``: an earlier spelling kept for one release)."""
    parser.add_argument("--run", required=required, default=None, metavar="DIR", help=help_text)
    if old:
        add_renamed(parser, old, "--run")


def add_positional_run(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--run DIR`` for a verb whose run folder used to be positional (``cards RUN``): the positional
    form still parses (hidden); ``resolve_positional_run`` joins the two after parsing."""
    add_run_option(parser, help_text + " (required)")
    parser.add_argument("run_positional", nargs="?", default=None, help=argparse.SUPPRESS)


def resolve_positional_run(args: argparse.Namespace) -> None:
    """Set ``args.run`` from the old positional run folder (saying the new spelling); raise a ValueError
    when neither or two different folders are given."""
    positional = getattr(args, "run_positional", None)
    if positional is not None:
        if args.run is not None and Path(args.run) != Path(positional):
            raise ValueError(f"two run folders given ({positional} and --run {args.run}); pass one, as --run DIR")
        print(f"dpn-lens: note: the run folder is now given as --run {positional} (the positional form goes in "
              "the next release)", file=sys.stderr)
        args.run = positional
    if args.run is None:
        raise ValueError(f"dpn-lens {args.command} needs a run folder: pass --run DIR (a folder written by "
                         "`dpn-lens locate --out DIR` or `dpn-lens demo --out DIR`)")


def add_traits_option(parser: argparse.ArgumentParser, default: str = "all") -> None:
    """``--traits``: "all" or a comma list (``openness,E``); pass the value to ``pipeline.parse_traits``."""
    parser.add_argument("--traits", action=CommaList, default=default, metavar="TRAITS",
                        help="'all' or a comma list of traits, e.g. openness,E")


def add_model_options(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL,
                      default_dtype: str | None = None, model_help: str | None = None) -> None:
    """``--model``, ``--dtype`` and ``--device`` (the arguments of ``dpn_lens.models.load_model``), and ``--engine``
    (what generates: ``dpn_lens.generation.ENGINES``, set around the command by ``cli.app.main``)."""
    parser.add_argument("--model", default=default,
                        help=model_help or "embedded name (smollm2-135m-instruct, gemma-3-270m), .gguf file, "
                                           "hub name or folder")
    parser.add_argument("--dtype", default=default_dtype,
                        help="model dtype: float32, bfloat16 (about 3x faster on CPU) or float16 "
                             "(None: float32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, auto (all GPUs), ... (None: cpu)")
    add_engine_option(parser)


def add_engine_option(parser: argparse.ArgumentParser) -> None:
    """``--engine``: what generates (``dpn_lens.generation.ENGINES``), set around the command by ``cli.app.main``."""
    parser.add_argument("--engine", default=None,
                        help="what generates answers: raw (Hugging Face's generate through the raw modules, the "
                             "bridge's tokens), raw-sdpa (with sdpa attention: faster; other answers in bfloat16) or "
                             "bridge (TransformerLens's loop) (None: raw-sdpa in float32, raw otherwise; "
                             "dpn_lens.generation.ENGINES)")


def add_random_weights_option(parser: argparse.ArgumentParser, also: str = "") -> None:
    """``--random-weights``: the model's architecture and tokenizer with seeded random weights (``load_model``),
    to time a run of a model whose weights are not at hand; ``also``: what else it changes for this command."""
    parser.add_argument("--random-weights", action="store_true",
                        help="read only --model's config.json and tokenizer and draw the weights at random (seeded): "
                             "the run's time and memory are the real model's, its results mean nothing (to check "
                             "`dpn-lens plan` on a model whose weights are not at hand)" + also)


def add_data_dir_option(parser: argparse.ArgumentParser, holds: str) -> None:
    """``--data-dir`` (None: ``$DPN_LENS_DATA``, resolved where the data is read)."""
    parser.add_argument("--data-dir", default=None,
                        help=f"shared data folder holding {holds} (None: $DPN_LENS_DATA)")


def add_selection_options(parser: argparse.ArgumentParser) -> None:
    """``--budget`` and ``--selection-pairs``: how the effect rules (``attribution-t``, ...) select their neurons."""
    from dpn_lens.effect.defaults import SELECTION_PAIRS

    parser.add_argument("--budget", type=int, default=None,
                        help="neurons an effect rule edits (None: the DPN-LE map's count, at most 0.5%% of MLP neurons)")
    parser.add_argument("--selection-pairs", type=int, default=SELECTION_PAIRS,
                        help="selection pairs per trait for the attribution rules (the model's own answers to the "
                             "embedded training questions; drawn with --seed)")


def add_out_option(parser: argparse.ArgumentParser, help_text: str, default: str | None = None,
                   required: bool = False) -> None:
    """``--out``: where the command writes (a folder, or the report page)."""
    if required:
        parser.add_argument("--out", required=True, help=help_text)
    else:
        parser.add_argument("--out", default=default, help=help_text)


# ----- validation before the model loads ---------------------------------------------------------
# Every check here needs no model, so `main()` runs them first: a typo costs a second, not a model
# load plus a collected trait. Each error names the option and the fix.

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_spec(spec: str) -> None:
    """Raise a ValueError unless ``spec`` is an embedded name, an existing path, or a hub-style ``org/name``.

    An unknown bare name (``"smollm"``) fails here at once instead of after the hub's network retries.

    Example:
        >>> check_model_spec("smollm2-135m-instruct"); check_model_spec("Qwen/Qwen2.5-7B-Instruct")
        >>> check_model_spec("smollm")
        Traceback (most recent call last):
        ...
        ValueError: --model 'smollm' is not an embedded model (smollm2-135m-instruct, gemma-3-270m), an existing file or folder, or a hub name such as org/name; pass one of those
    """
    from dpn_lens.models import EMBEDDED_MODELS

    text = str(spec)
    if text in EMBEDDED_MODELS:
        return
    path = Path(text).expanduser()
    if text.endswith(".gguf") and not path.is_file():
        raise FileNotFoundError(f"--model {text!r}: GGUF file {path} does not exist; pass the path of a .gguf file")
    if path.exists() or _HUB_NAME.match(text):
        return
    raise ValueError(f"--model {text!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), an existing file "
                     "or folder, or a hub name such as org/name; pass one of those")


def check_device(device: str | None) -> None:
    """Raise a ValueError unless ``device`` exists on this machine (None, cpu, auto, cuda[:i], mps)."""
    if device is None or device in ("cpu", "auto"):
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch build sees no CUDA GPU "
                             f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1} or auto")
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps: MPS is not available on this machine; use --device cpu")
        return
    raise ValueError(f"--device {device!r} is not a device; use cpu, cuda, cuda:<i>, auto (all GPUs) or mps")


def check_out(path: str | os.PathLike, folder: bool = True) -> None:
    """Raise a ValueError unless ``path`` can be created and written: no regular file on the way to it,
    the nearest existing folder writable, and (for ``folder=True``) not itself a file."""
    target = Path(path).expanduser()
    if target.exists() and folder and not target.is_dir():
        raise ValueError(f"--out {str(path)!r} is a file; pass a folder (new or existing)")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {str(path)!r} lies under the regular file {ancestor}; choose a path in a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(path)!r}: cannot write in {ancestor} (permission denied); choose another place")


def read_maps(paths: list[str], use: str) -> list[Any]:
    """The ``--map`` files as ``NeuronMap``s, before any model loads; an empty map is refused, saying that
    ``use`` (e.g. "the export") would change nothing."""
    from dpn_lens.localization.neuron_map import NeuronMap

    maps = [NeuronMap.load(path) for path in paths]
    for path, neuron_map in zip(paths, maps):
        if neuron_map.n_selected() == 0:
            raise ValueError(f"--map {path}: the {neuron_map.trait} map selects no neurons, so {use} would change "
                             "nothing; locate again with more --n-pairs or a lower --tau-d")
    return maps


def _positive(args: argparse.Namespace, name: str, minimum: float = 1) -> None:
    value = getattr(args, name, None)
    if value is not None and value < minimum:
        option = "--" + name.replace("_", "-")
        raise ValueError(f"{option} must be at least {minimum:g}, got {value}")


def validate_args(args: argparse.Namespace) -> None:
    """Check every option of a parsed command line that needs no model; raise ValueError naming the fix.

    Runs in ``dpn_lens.cli.app`` before any handler, so before any model is loaded. Options a
    subcommand does not have are skipped.

    Example:
        >>> validate_args(argparse.Namespace(q=1.5))
        Traceback (most recent call last):
        ...
        ValueError: --q must lie strictly between 0 and 1 (0.995 keeps the top 0.5% of |s| per layer), got 1.5
    """
    from dpn_lens.pipeline import parse_layers, parse_traits

    q = getattr(args, "q", None)
    if q is not None and not 0.0 < q < 1.0:
        raise ValueError(f"--q must lie strictly between 0 and 1 (0.995 keeps the top 0.5% of |s| per layer), got {q}")
    tau_d = getattr(args, "tau_d", None)
    if tau_d is not None and not (math.isfinite(tau_d) and tau_d >= 0):
        raise ValueError(f"--tau-d must be a finite effect size >= 0 (e.g. 0.3-0.8), got {tau_d}")
    gamma = getattr(args, "gamma", None)
    if gamma is not None and not math.isfinite(gamma):
        raise ValueError(f"--gamma must be a finite number (e.g. 1.0), got {gamma}")
    for name in ("n_pairs", "batch_size", "batch_tokens", "max_new_tokens", "n_questions", "budget"):
        _positive(args, name)
    _positive(args, "selection_pairs", 2)   # the attribution rules average a gradient over pairs
    _positive(args, "measure_pairs", 2)     # the measurement's intervals and fits need two pairs at least
    engine = getattr(args, "engine", None)
    if engine is not None:
        from dpn_lens.generation import ENGINES

        if engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)} (leave it out for the default: raw-sdpa "
                             f"in float32, raw otherwise), got {engine!r}")
    rule = getattr(args, "rule", None)
    if isinstance(rule, str) and rule.lower() != "none":
        from dpn_lens.effect.rules import rule_named

        if rule_named(rule).score is None:
            raise ValueError(f"--rule {rule}: the demo always shows the paper's neurons (dpn-le); name an effect rule "
                             "such as attribution-t, or none")
    if isinstance(getattr(args, "select", None), str):
        from dpn_lens.pipeline import parse_rules

        parse_rules(args.select)
    target_kl = getattr(args, "target_kl", None)
    if target_kl is not None and not (math.isfinite(target_kl) and target_kl > 0):
        raise ValueError(f"--target-kl must be a positive KL in nats/token (e.g. 0.05), got {target_kl}")
    if hasattr(args, "run_positional"):
        resolve_positional_run(args)
    if (getattr(args, "eval_pairs", None) or 0) < 0:
        raise ValueError(f"--eval-pairs must be 0 (skip the preference check) or more, got {args.eval_pairs}")
    if isinstance(getattr(args, "layers", None), str):
        parse_layers(args.layers)
    if getattr(args, "traits", None) is not None:
        parse_traits(args.traits)
    if getattr(args, "model", None) is not None:
        check_model_spec(args.model)
    if getattr(args, "dtype", None) is not None:
        from dpn_lens.models import resolve_dtype

        try:
            resolve_dtype(args.dtype)
        except ValueError as error:
            raise ValueError(f"--dtype: {error}") from None
    check_device(getattr(args, "device", None))
    for index, prompt in enumerate(getattr(args, "prompt", None) or []):
        if not str(prompt).strip():
            raise ValueError(f"--prompt #{index + 1} is empty; pass a question, e.g. --prompt 'What do you do on a "
                             "free evening?'")
    maps = getattr(args, "map", None)
    for path in [maps] if isinstance(maps, str) else (maps or []):
        if not Path(path).exists():
            raise FileNotFoundError(f"--map {path}: no such file; pass a neuron map such as RUN/maps/openness.safetensors "
                                    "(written by `dpn-lens locate --out RUN`)")
    out = getattr(args, "out", None)
    if out is not None:
        check_out(out, folder=args.command in ("locate", "demo", "compare", "control", "evaluate", "study"))


def equivalent_command(command: str, argv: Sequence[str], generation: bool = False, judge: bool = False) -> str:
    """The ``dpn-lens evaluate`` command that runs what ``dpn-lens <command> <argv>`` runs (``control``:
    preference, and generation when asked; ``compare``: questionnaire, statements, capability, and the judge
    when an endpoint is given). ``evaluate`` takes both commands' options under the same spellings.

    Example:
        >>> equivalent_command("control", ["--traits", "openness", "--generation", "20", "--out", "o"], generation=True)
        'dpn-lens evaluate --metrics preference,generation --traits openness --generation 20 --out o'
    """
    import shlex

    if command == "control":
        metrics = ["preference"] + (["generation"] if generation else [])
    else:
        metrics = ["questionnaire", "statements", "capability"] + (["judge"] if judge else [])
    return shlex.join(["dpn-lens", "evaluate", "--metrics", ",".join(metrics), *argv])


def print_evaluate_equivalent(command: str, args: argparse.Namespace, generation: bool = False,
                              judge: bool = False) -> None:
    """Say that ``command`` is part of ``dpn-lens evaluate``, with the command that runs the same (not when
    ``evaluate`` runs it)."""
    argv = list(getattr(args, "argv", None) or [])
    if getattr(args, "via_evaluate", False) or argv[:1] != [command]:
        return
    print(f"note: `dpn-lens {command}` is now part of `dpn-lens evaluate`; the same run: "
          f"{equivalent_command(command, argv[1:], generation, judge)}", flush=True)
