"""The ``attribution`` section: the cost of selection by effect relative to collection, for the same number
of pairs: ``effect.margin_gradients`` (one forward and one backward per batch over each pair's question and
both answers, the attribution rules' pass) vs ``collect_statistics`` of as many contrastive pairs (the
DPN-LE pass). Target: at most 3x. The one-off greedy generation of the selection pairs' answers
(``effect.selection_pairs``, cached per model afterwards) is timed once and reported beside.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch

from dpn_lens import collect_statistics, embedded_contrastive_set
from dpn_lens.collection.collect import CollectionConfig
from dpn_lens.effect import margin_gradients, selection_pairs

from .common import interleaved, load, median, ratio


def bench_attribution(spec: str, dtype: str, n_pairs: int, repeats: int) -> dict[str, Any]:
    """Attribution's gradient pass vs collection of the same number of pairs; the answers' generation once."""
    model = load(spec, dtype)
    started = time.perf_counter()
    pairs = selection_pairs(model, "openness", n_pairs=n_pairs, seed=0, cache=False)
    generation_s = time.perf_counter() - started
    contrastive = embedded_contrastive_set("openness", n_pairs=len(pairs))
    config = CollectionConfig(progress=False)
    variants = {"collect": lambda: collect_statistics(model, contrastive, config),
                "attribution": lambda: margin_gradients(model, pairs)}
    times = interleaved(variants, repeats)
    answer_tokens = sum(len(model.tokenizer(p.high_answer + p.low_answer)["input_ids"]) for p in pairs)
    result = {"model": spec, "dtype": dtype, "pairs": len(pairs), "threads": torch.get_num_threads(),
              "repeats": repeats, "generation_s": generation_s, "answer_tokens": answer_tokens,
              "median_wall_s": {name: median(t["wall"]) for name, t in times.items()},
              "ratio_wall": ratio(times, "attribution", "collect", "wall"),
              "ratio_cpu": ratio(times, "attribution", "collect", "cpu")}
    result["ratio_with_generation"] = ((result["median_wall_s"]["attribution"] + generation_s)
                                       / result["median_wall_s"]["collect"])
    del model
    gc.collect()
    return result


def run_attribution(args: argparse.Namespace) -> dict[str, Any]:
    r = bench_attribution(args.model, args.attribution_dtype, args.attribution_pairs, args.repeats)
    w = r["median_wall_s"]
    print(f"[attribution {r['dtype']}] {r['pairs']} pairs, {r['threads']} thread(s): collection {w['collect']:.2f}s, "
          f"attribution gradients {w['attribution']:.2f}s | attribution/collection wall {r['ratio_wall']:.2f} "
          f"cpu {r['ratio_cpu']:.2f} (target <= 3) | the selection pairs' answers ({r['answer_tokens']} tokens) "
          f"generated once in {r['generation_s']:.1f}s: with it {r['ratio_with_generation']:.2f}x collection", flush=True)
    return r
