"""The ``prefix`` section: end-to-end ``collect_statistics`` + ``locate`` on the demo's data (embedded
role-play prompts, bf16 by default), shared-prefix collection vs the plain path
(``CollectionConfig(share_prefix=False)``), side by side: time ratio, tokens run vs tokens in the prompts,
and how far the two agree (statistics and selected neurons).
"""

from __future__ import annotations

import argparse
import gc
from typing import Any, Callable

import torch

from dpn_lens import TRAITS, collect_statistics, embedded_contrastive_set, locate
from dpn_lens.collection.collect import CollectionConfig
from dpn_lens.hooked import tokenize_compact
from dpn_lens.collection.prefix import plan_prefix_tree, tokens_run

from .common import interleaved, load, median, ratio


def bench_prefix(spec: str, dtype: str, n_traits: int, n_pairs: int, batch_size: int, repeats: int
                 ) -> dict[str, Any]:
    """Shared-prefix vs plain collection + ``locate`` on the embedded role-play prompts, interleaved."""
    if not 1 <= n_traits <= len(TRAITS):
        raise ValueError(f"--prefix-traits must be between 1 and {len(TRAITS)}, got {n_traits}")
    model = load(spec, dtype)
    sets = [embedded_contrastive_set(trait, n_pairs=n_pairs) for trait in TRAITS[:n_traits]]
    configs = {name: CollectionConfig(max_batch_size=batch_size, progress=False, share_prefix=name == "shared")
               for name in ("plain", "shared")}
    # The tokens each route runs: every prompt in full, or each shared prefix once plus the rest.
    groups = [tokenize_compact(model, prompts) for pairs in sets for prompts in (pairs.high, pairs.low)]
    n_tokens = sum(len(ids) for arrays in groups for ids in arrays)
    n_run = sum(tokens_run(plan_prefix_tree(arrays), arrays) for arrays in groups)

    def route(name: str) -> Callable[[], list]:
        return lambda: [(stats, locate(stats)) for stats in
                        (collect_statistics(model, pairs, configs[name]) for pairs in sets)]

    variants = {name: route(name) for name in configs}
    # Correctness guard (and warm-up): both routes once, compared.
    outputs = {name: run() for name, run in variants.items()}
    mean_error, same, jaccard = 0.0, True, []
    for (a, map_a), (b, map_b) in zip(outputs["shared"], outputs["plain"]):
        for group in ("high", "low"):
            x, y = getattr(a, group).mean, getattr(b, group).mean
            mean_error = max(mean_error, float((x - y).abs().max() / y.abs().max()))
        for pole in ("high", "low"):
            left = {(layer, int(i)) for layer, idx in getattr(map_a, pole).items() for i in idx}
            right = {(layer, int(i)) for layer, idx in getattr(map_b, pole).items() for i in idx}
            same = same and left == right
            jaccard.append(len(left & right) / len(left | right) if left | right else 1.0)  # both empty: agree
    del outputs
    times = interleaved(variants, repeats, warmup=False)
    result: dict[str, Any] = {
        "model": spec, "dtype": dtype, "traits": n_traits, "pairs_per_trait": n_pairs, "batch_size": batch_size,
        "prompts": 2 * n_traits * n_pairs, "threads": torch.get_num_threads(), "repeats": repeats,
        "tokens_in_prompts": n_tokens, "tokens_run_shared": n_run, "tokens_ratio": n_run / n_tokens,
        "median_wall_s": {name: median(t["wall"]) for name, t in times.items()},
        "median_cpu_s": {name: median(t["cpu"]) for name, t in times.items()},
        "ratio_wall": ratio(times, "shared", "plain", "wall"), "ratio_cpu": ratio(times, "shared", "plain", "cpu"),
        "max_mean_error_over_max_mean": mean_error, "same_neurons": same,
        "min_jaccard_of_selected_neurons": min(jaccard),
    }
    del model
    gc.collect()
    return result


def run_prefix(args: argparse.Namespace) -> dict[str, Any]:
    r = bench_prefix(args.model, args.prefix_dtype, args.prefix_traits, args.prefix_pairs, args.prefix_batch_size,
                     args.repeats)
    print(f"[prefix {r['dtype']}] {r['traits']} trait(s) x {r['pairs_per_trait']} pairs ({r['prompts']} prompts), "
          f"collect+locate, {r['threads']} thread(s): plain {r['median_wall_s']['plain']:.1f}s, shared "
          f"{r['median_wall_s']['shared']:.1f}s | shared/plain wall {r['ratio_wall']:.3f} cpu {r['ratio_cpu']:.3f} "
          f"(target <= 0.5) | tokens run {r['tokens_run_shared']} of {r['tokens_in_prompts']} in the prompts "
          f"({r['tokens_ratio']:.3f}) | max |mean diff| / max |mean| {r['max_mean_error_over_max_mean']:.2e}, "
          f"same neurons: {r['same_neurons']} (min Jaccard {r['min_jaccard_of_selected_neurons']:.3f})", flush=True)
    return r
