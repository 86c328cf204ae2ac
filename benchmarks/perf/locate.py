"""The ``locate`` section: end-to-end ``collect_statistics`` + ``locate`` for 5 traits x P pairs, prompts/s
and the extrapolated minutes for 5 traits x 1000 pairs (float32 and bfloat16 model).
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch

from dpn_lens import TRAITS, collect_statistics, embedded_contrastive_set, locate
from dpn_lens.collection.collect import CollectionConfig

from .common import synchronize, load


def bench_locate(spec: str, plan: list[tuple[str, int]], batch_size: int, target_pairs: int) -> dict[str, Any]:
    """End-to-end collect + locate for the five traits, once per (dtype, pairs per trait) of ``plan``."""
    results: dict[str, Any] = {"model": spec, "traits": len(TRAITS), "batch_size": batch_size,
                               "threads": torch.get_num_threads(), "by_dtype": {}}
    config = CollectionConfig(max_batch_size=batch_size, progress=False)
    for dtype, n_pairs in plan:
        sets = [embedded_contrastive_set(trait, n_pairs=n_pairs) for trait in TRAITS]
        model = load(spec, dtype)
        synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        maps = [locate(collect_statistics(model, pairs, config)) for pairs in sets]
        synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        n_prompts = 2 * sum(len(pairs) for pairs in sets)
        results["by_dtype"][dtype] = {
            "pairs_per_trait": n_pairs, "prompts": n_prompts, "wall_s": wall, "cpu_s": cpu,
            "prompts_per_s_wall": n_prompts / wall,
            "extrapolated_minutes_wall": 2 * len(sets) * target_pairs / (n_prompts / wall) / 60,
            "extrapolated_cpu_minutes": 2 * len(sets) * target_pairs / (n_prompts / cpu) / 60,
            "selected_neurons": [m.n_selected("high") + m.n_selected("low") for m in maps],
        }
        del model, maps
        gc.collect()
    return results


def run_locate(args: argparse.Namespace) -> dict[str, Any]:
    plan = [(item.split(":")[0], int(item.split(":")[1])) for item in args.locate_plan.split(",")]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.locate_threads)
    try:
        r = bench_locate(args.model, plan, args.locate_batch_size, args.locate_target_pairs)
    finally:
        torch.set_num_threads(threads)
    for dtype, d in r["by_dtype"].items():
        print(f"[locate {dtype}] 5 traits x {d['pairs_per_trait']} pairs, {r['threads']} threads: "
              f"{d['wall_s']:.1f}s wall ({d['cpu_s']:.1f}s CPU), {d['prompts_per_s_wall']:.2f} prompts/s -> "
              f"EXTRAPOLATED 5 traits x {args.locate_target_pairs} pairs: {d['extrapolated_minutes_wall']:.0f} min "
              f"wall at this load ({d['extrapolated_cpu_minutes']:.0f} CPU-minutes)", flush=True)
    return r
