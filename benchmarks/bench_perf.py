"""Performance targets of dpn-lens (issue 6), measured side by side in one run.

Sections (all on the embedded SmolLM2-135M-Instruct unless said otherwise), one module each in
``benchmarks/perf/``, whose docstring says what it measures; the helpers they share (loading, timing,
memory readings, batches) are in ``perf/common.py``:

* ``collect``  -- collection's hooks vs a bare forward pass of the same batches (``perf/collect.py``).
* ``memory``   -- peak RSS of collection, 100 vs 5000 short prompts, as % of the model (``perf/memory.py``).
* ``steering`` -- greedy KV-cached generation tokens/s, steered vs unsteered (``perf/steering.py``).
* ``locate``   -- end-to-end collect + locate for 5 traits, extrapolated to 1000 pairs (``perf/locate.py``).
* ``prefix``   -- shared-prefix collection vs the plain path, on the demo's data (``perf/prefix.py``).
* ``scoring``  -- preference scoring from cached questions vs whole sequences; the KL probe (``perf/scoring.py``).
* ``evaluation`` -- the judge's answers one question at a time vs batched (``perf/evaluation.py``).
* ``attribution`` -- selection by effect's gradient pass vs collection (``perf/attribution.py``).

CPU timings are noisy when the machine is shared, so every section interleaves its variants
(rotating their order), repeats them, and reports medians of per-repeat ratios. Wall-clock and
process CPU time are both reported; with ``--threads 1`` CPU time is the least noisy.

Usage::

    python benchmarks/bench_perf.py                       # all sections, defaults as in PERFORMANCE.md
    python benchmarks/bench_perf.py --sections collect,steering --repeats 3
    python benchmarks/bench_perf.py --json results.json   # also write the numbers as JSON
    python benchmarks/bench_perf.py --model tiny --repeats 1 --collect-prompts 4 ...   # smoke run, seconds

On a GPU, ``--device cuda`` runs every section but ``memory`` (it reads the process's peak RSS, a
CPU measure) there; timings then synchronise the device before each clock reading. Where the weights
cannot be brought to the machine, ``--random-weights`` with ``--model FOLDER`` (a folder holding only
``config.json`` and the tokenizer files) times the same architecture with seeded random weights: the
same shapes and kernels, so the same speed; the statistics then mean nothing, and generation runs
to its token limit (no end-of-sequence token comes).

``--model tiny`` runs every section on the random tiny Llama of ``dpn_lens.tiny`` (no download; its
timings mean nothing). ``tests/test_benchmarks.py`` imports this file and runs every section that way,
so a renamed function breaks CI instead of this script. It and ``perf/`` import only public names of
``dpn_lens`` (they build their own batches rather than borrow collect's private ones), and it puts the
folder above ``benchmarks/`` first on ``sys.path``, so a clean clone runs it without installing the
package, and ``benchmarks/`` itself, for ``perf``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a clean clone: the package beside this folder, not an installed copy
sys.path.insert(0, str(REPO / "benchmarks"))  # the sections, ``perf/`` beside this file

from perf.attribution import run_attribution  # noqa: E402
from perf.collect import precision_comparison, run_collect  # noqa: E402
from perf.common import LOAD_OPTIONS, TINY, LoadOptions  # noqa: E402
from perf.evaluation import run_evaluation  # noqa: E402
from perf.locate import run_locate  # noqa: E402
from perf.memory import memory_child, run_memory  # noqa: E402
from perf.prefix import run_prefix  # noqa: E402
from perf.scoring import run_scoring  # noqa: E402
from perf.steering import run_steering  # noqa: E402


SECTIONS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "collect": run_collect, "memory": run_memory, "steering": run_steering, "locate": run_locate,
    "prefix": run_prefix, "scoring": run_scoring, "evaluation": run_evaluation, "attribution": run_attribution}
"""Section name -> runner, in the order they run."""


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help=f"a load_model name, or {TINY!r} (random tiny Llama: a smoke run in seconds)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
    parser.add_argument("--random-weights", action="store_true",
                        help="the model's architecture with seeded random weights (needs only its config and "
                             "tokenizer): same speed, meaningless statistics")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noisy on a shared CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--collect-prompts", type=int, default=8)
    parser.add_argument("--collect-dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the collect section")
    parser.add_argument("--memory-sizes", default="100,5000", help="prompt counts of the collect runs")
    parser.add_argument("--memory-naive-sizes", default="100,500", help="prompt counts of the naive runs ('' for none)")
    parser.add_argument("--memory-dtype", default="bfloat16")
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--memory-batch-size", type=int, default=32)
    parser.add_argument("--steer-prompts", type=int, default=3)
    parser.add_argument("--steer-tokens", type=int, default=64)
    parser.add_argument("--steer-neurons", type=int, default=8, help="edited neurons per layer")
    parser.add_argument("--locate-plan", default="bfloat16:40,float32:10",
                        help="dtype:pairs-per-trait, comma-separated (the full target is 5 traits x 1000 pairs)")
    parser.add_argument("--locate-threads", type=int, default=2, help="torch threads for the locate section")
    parser.add_argument("--locate-batch-size", type=int, default=16)
    parser.add_argument("--locate-target-pairs", type=int, default=1000, help="pairs per trait to extrapolate to")
    parser.add_argument("--prefix-traits", type=int, default=1, help="traits of the prefix section (1-5)")
    parser.add_argument("--prefix-pairs", type=int, default=100, help="pairs per trait of the prefix section")
    parser.add_argument("--prefix-dtype", default="bfloat16", help="model dtype of the prefix section (the demo's)")
    parser.add_argument("--prefix-batch-size", type=int, default=16)
    parser.add_argument("--scoring-pairs", type=int, default=32, help="preference pairs of the scoring section")
    parser.add_argument("--scoring-dtype", default="bfloat16", help="model dtype of the scoring section (control's)")
    parser.add_argument("--eval-questions", type=int, default=16, help="questions of the evaluation section")
    parser.add_argument("--eval-tokens", type=int, default=32, help="max new tokens per answer (evaluation section)")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="batch size of the batched evaluation variant")
    parser.add_argument("--eval-dtype", default="float32", help="model dtype of the evaluation section")
    parser.add_argument("--attribution-pairs", type=int, default=64, help="pairs of the attribution section")
    parser.add_argument("--attribution-dtype", default="bfloat16", help="model dtype of the attribution section")
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen sections; returns (and with ``--json`` writes) every number."""
    cli = parser()
    args = cli.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        cli.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    threads, options = torch.get_num_threads(), LoadOptions(**vars(LOAD_OPTIONS))
    torch.set_num_threads(args.threads)
    LOAD_OPTIONS.device, LOAD_OPTIONS.random_weights = args.device, args.random_weights
    try:
        if args.memory_child:
            spec, dtype, mode, n, batch_size = json.loads(args.memory_child)
            result = memory_child(spec, dtype, mode, n, batch_size)
            print(json.dumps(result))
            return result
        results: dict[str, Any] = {"torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
                                   "device": _device_name(args.device), "random_weights": args.random_weights}
        print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved repeats; medians; "
              f"device {results['device']}" + (" (RANDOM WEIGHTS: timings only)" if args.random_weights else ""))
        for name in SECTIONS:  # the fixed order, whatever the order of --sections
            if name in sections:
                results[name] = SECTIONS[name](args)
                if name == "collect" and (precision := precision_comparison()) is not None:
                    results["bfloat16_vs_float32_mean_activation"] = precision
    finally:
        # main() may run inside another process (tests/test_benchmarks.py): leave it as it was
        torch.set_num_threads(threads)
        LOAD_OPTIONS.device, LOAD_OPTIONS.random_weights = options.device, options.random_weights
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
