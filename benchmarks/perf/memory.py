"""The ``memory`` section: peak RSS of collection for 100 vs 5000 short prompts (bf16 model, all 30 layers;
one fresh subprocess per run, the kernel's peak-RSS counter reset after loading the model and a warm-up
batch; runs repeated and interleaved, medians), as % of the model's own footprint; the naive route at 100
and 500 prompts for comparison.

Each run is ``python benchmarks/bench_perf.py --memory-child [...]`` (``main`` hands it to ``memory_child``),
with the parent's ``--threads`` and ``--random-weights``. Host memory only: skipped on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dpn_lens.collection.collect import CollectionConfig, collect_group_statistics
from dpn_lens.hooked import hook_name, pad_token_id, tokenize_compact

from .common import (LOAD_OPTIONS, _naive_statistics, batches, load, median, model_footprint_bytes, reset_peak_rss,
                     short_prompts, status_kib)

MIB = 1024 * 1024

SCRIPT = Path(__file__).resolve().parents[1] / "bench_perf.py"
"""The command line each memory run starts afresh (its hidden ``--memory-child`` option)."""


def memory_child(spec: str, dtype: str, mode: str, n: int, batch_size: int) -> dict[str, Any]:
    """Runs in its own process: extra peak RSS of one collection of n short prompts over the idle model."""
    model = load(spec, dtype)
    layers = list(range(int(model.cfg.n_layers)))
    names = [hook_name(layer) for layer in layers]
    config = CollectionConfig(layers, max_batch_size=batch_size, chat=False, progress=False, share_prefix=False)

    def run(selected: list[str]) -> None:
        if mode == "collect":
            collect_group_statistics(model, selected, config)
            return
        _naive_statistics(model, batches(tokenize_compact(model, selected, chat=False), batch_size,
                                         pad_token_id(model.tokenizer), "right", "cpu"), names)

    run(short_prompts(batch_size, seed=1))  # warm-up: one-time allocations (thread pools, caches)
    gc.collect()
    baseline_kib = status_kib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    run(short_prompts(n))
    seconds = time.perf_counter() - start
    peak_kib = status_kib("VmHWM")
    return {"model": spec, "dtype": dtype, "mode": mode, "n": n, "seconds": seconds,
            "extra_peak_mib": (peak_kib - baseline_kib) / 1024, "baseline_rss_mib": baseline_kib / 1024,
            "model_footprint_mib": model_footprint_bytes(model) / MIB}


def bench_memory(spec: str, dtype: str, sizes: list[int], naive_sizes: list[int], batch_size: int,
                 threads: int, repeats: int) -> dict[str, Any]:
    """Extra peak RSS per (mode, n), one fresh process per run; collect runs repeated, interleaved.

    Peak RSS of identical runs varies by tens of MiB (allocator and oneDNN scratch reuse), so the
    collect sizes alternate (100, 5000, 100, 5000, ...) and medians are compared.
    """
    runs = []
    plan = [("collect", n) for _ in range(repeats) for n in sizes] + [("naive", n) for n in naive_sizes]
    for mode, n in plan:
        command = [sys.executable, str(SCRIPT), "--memory-child", json.dumps([spec, dtype, mode, n, batch_size]),
                   "--threads", str(threads)] + (["--random-weights"] if LOAD_OPTIONS.random_weights else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
        print(f"  memory {mode} n={n}: +{runs[-1]['extra_peak_mib']:.1f} MiB in {runs[-1]['seconds']:.1f} s",
              flush=True)
    footprint = runs[0]["model_footprint_mib"]
    by: dict[tuple[str, int], list[float]] = {}
    for r in runs:
        by.setdefault((r["mode"], r["n"]), []).append(r["extra_peak_mib"])
    med = {key: median(values) for key, values in by.items()}
    result: dict[str, Any] = {"model": spec, "dtype": dtype, "batch_size": batch_size, "runs": runs,
                              "model_footprint_mib": footprint, "repeats": repeats,
                              "median_extra_peak_mib": {f"{mode}@{n}": v for (mode, n), v in med.items()}}
    if len(sizes) >= 2:
        growth = med[("collect", sizes[-1])] - med[("collect", sizes[0])]
        result["collect_growth_mib"] = growth
        result["collect_growth_pct_of_model"] = 100 * growth / footprint
        spread = [max(by[("collect", n)]) - min(by[("collect", n)]) for n in sizes]
        result["collect_run_to_run_spread_mib"] = max(spread)
    if len(naive_sizes) >= 2:
        slope = (med[("naive", naive_sizes[-1])] - med[("naive", naive_sizes[0])]) / (naive_sizes[-1] - naive_sizes[0])
        result["naive_mib_per_prompt"] = slope
        result["naive_growth_pct_of_model_extrapolated"] = 100 * slope * (sizes[-1] - sizes[0]) / footprint
    common = [n for n in naive_sizes if n in sizes]
    if common:
        n = common[-1]
        result["naive/collect_peak_extra_at_n"] = {"n": n, "ratio": med[("naive", n)] / max(med[("collect", n)], 1e-9)}
    return result


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    if LOAD_OPTIONS.device != "cpu":
        print(f"[memory] skipped on {LOAD_OPTIONS.device}: it measures the process's peak RSS (host memory)",
              flush=True)
        return {"skipped": f"host-memory section; not run on {LOAD_OPTIONS.device}"}
    sizes = [int(x) for x in args.memory_sizes.split(",")]
    naive_sizes = [int(x) for x in args.memory_naive_sizes.split(",") if x]
    r = bench_memory(args.model, args.memory_dtype, sizes, naive_sizes, args.memory_batch_size, args.threads,
                     args.memory_repeats)
    print(f"[memory {args.memory_dtype}] collect peak growth {sizes[0]} -> {sizes[-1]} prompts: "
          f"{r.get('collect_growth_mib', 0):.1f} MiB (medians of {r['repeats']}) = "
          f"{r.get('collect_growth_pct_of_model', 0):.2f}% of the model's {r['model_footprint_mib']:.0f} MiB "
          f"(target < 5%; run-to-run spread {r.get('collect_run_to_run_spread_mib', 0):.0f} MiB) | naive: "
          f"{r.get('naive_mib_per_prompt', 0):.3f} MiB/prompt, "
          f"{r.get('naive_growth_pct_of_model_extrapolated', 0):.0f}% of the model for the same growth "
          f"(extrapolated) | naive/collect extra peak at n={r.get('naive/collect_peak_extra_at_n', {}).get('n')}: "
          f"{r.get('naive/collect_peak_extra_at_n', {}).get('ratio', float('nan')):.2f}", flush=True)
    return r
