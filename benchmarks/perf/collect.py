"""The ``collect`` section: ``collect_group_statistics`` vs a bare forward pass over the same batches (same
dtype, batch size, padding, prompts), both stopping after the same layer, plus a full forward (all layers +
unembedding) and the naive route (``run_with_cache`` on every layer, keep the vectors, stack, then mean/var).
Time ratios and peak-memory ratios. With both float32 and bfloat16, ``precision_comparison`` compares the
two dtypes' mean activations.
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import torch

from dpn_lens import embedded_contrastive_set
from dpn_lens.collection.collect import CollectionConfig, collect_group_statistics
from dpn_lens.hooked import hook_name, pad_token_id, tokenize_compact

from .common import _naive_statistics, batches, interleaved, load, median, ratio


_COLLECTED_MEANS: dict[str, torch.Tensor] = {}
"""Per-dtype mean activations of the collect section, to compare reduced precision with float32."""


class _Stop(Exception):
    pass


def _raise_stop(activation, hook):
    raise _Stop


def bench_collect(spec: str, dtype: str, n_prompts: int, batch_size: int, repeats: int,
                  padding_side: str = "right") -> dict[str, Any]:
    model = load(spec, dtype)
    prompts = embedded_contrastive_set("extraversion", n_pairs=n_prompts).high
    layers = list(range(int(model.cfg.n_layers)))
    names = [hook_name(layer) for layer in layers]
    token_arrays = tokenize_compact(model, prompts)
    device = torch.device(model.cfg.device or "cpu")
    batched = batches(token_arrays, batch_size, pad_token_id(model.tokenizer), padding_side, device)
    n_tokens = sum(len(ids) for ids in token_arrays)
    # share_prefix=False: this section measures the hooks' overhead over a forward pass of the same
    # tokens; the prefix section measures running fewer tokens.
    config = CollectionConfig(layers, max_batch_size=batch_size, max_batch_tokens=1 << 30,
                              padding_side=padding_side, progress=False, share_prefix=False)

    def bare_same_layers():
        # The forward pass collect runs, minus the read-outs: stop at the last needed hook point.
        with torch.inference_mode(), model.hooks(fwd_hooks=[(names[-1], _raise_stop)]):
            for input_ids, mask in batched:
                try:
                    model(input_ids, attention_mask=mask)
                except _Stop:
                    pass

    def bare_full():
        with torch.inference_mode():
            for input_ids, mask in batched:
                model(input_ids, attention_mask=mask)

    def collect():
        collect_group_statistics(model, prompts, config)

    def naive():
        return _naive_statistics(model, batched, names)

    def tokenize_only():
        tokenize_compact(model, prompts)

    # Correctness guard: the naive route and collect agree.
    reference = collect_group_statistics(model, prompts, CollectionConfig(layers, max_batch_size=batch_size,
                                                                          progress=False, share_prefix=False))
    _COLLECTED_MEANS[dtype] = reference.mean.cpu()
    naive_mean, _ = naive()
    agree = float((reference.mean.cpu() - naive_mean.cpu()).abs().max())  # the naive route keeps the model's device

    variants = {"bare_same_layers": bare_same_layers, "collect": collect, "bare_full": bare_full,
                "naive": naive, "tokenize": tokenize_only}
    times = interleaved(variants, repeats)
    result: dict[str, Any] = {
        "model": spec, "dtype": dtype, "n_prompts": n_prompts, "n_tokens": n_tokens, "batch_size": batch_size,
        "n_batches": len(batched), "layers": f"0-{layers[-1]}", "threads": torch.get_num_threads(),
        "repeats": repeats, "naive_vs_collect_max_abs_diff_of_mean": agree,
        "median_wall_s": {name: median(t["wall"]) for name, t in times.items()},
        "median_cpu_s": {name: median(t["cpu"]) for name, t in times.items()},
    }
    for clock in ("wall", "cpu"):
        result[f"ratio_{clock}"] = {
            "collect/bare_same_layers": ratio(times, "collect", "bare_same_layers", clock),
            "collect/bare_full": ratio(times, "collect", "bare_full", clock),
            "naive/collect": ratio(times, "naive", "collect", clock),
        }
    result["tokens_per_s_collect_wall"] = n_tokens / result["median_wall_s"]["collect"]
    del model
    gc.collect()
    return result


def run_collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    _COLLECTED_MEANS.clear()
    rows = []
    for dtype in args.collect_dtypes.split(","):
        r = bench_collect(args.model, dtype, args.collect_prompts, args.batch_size, args.repeats)
        rows.append(r)
        w, c = r["ratio_wall"], r["ratio_cpu"]
        print(f"[collect {dtype}] {r['n_prompts']} prompts, {r['n_tokens']} tokens, layers {r['layers']}: "
              f"collect {r['median_wall_s']['collect']:.2f}s vs bare {r['median_wall_s']['bare_same_layers']:.2f}s"
              f" | collect/bare(same layers) wall {w['collect/bare_same_layers']:.3f} cpu "
              f"{c['collect/bare_same_layers']:.3f} (target <= 1.10) | collect/bare(full) wall "
              f"{w['collect/bare_full']:.3f} cpu {c['collect/bare_full']:.3f} | naive/collect wall "
              f"{w['naive/collect']:.3f} cpu {c['naive/collect']:.3f}", flush=True)
    return rows


def precision_comparison() -> dict[str, float] | None:
    """bfloat16 against float32 mean activations of the collect section (when both dtypes ran)."""
    if not {"float32", "bfloat16"} <= set(_COLLECTED_MEANS):
        return None
    full, half = _COLLECTED_MEANS["float32"], _COLLECTED_MEANS["bfloat16"]
    error = float((half - full).abs().max() / full.abs().max())
    correlation = float(torch.corrcoef(torch.stack([full.flatten(), half.flatten()]))[0, 1])
    print(f"[collect] bfloat16 vs float32 mean activations: max |error| / max |mean| = {error:.4f}, "
          f"correlation {correlation:.5f}", flush=True)
    return {"max_abs_error_over_max_abs": error, "correlation": correlation}
