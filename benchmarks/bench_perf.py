"""Performance targets of dpn-lens (issue 6), measured side by side in one run.

Sections (all on the embedded SmolLM2-135M-Instruct unless said otherwise):

* ``collect``  -- ``collect_group_statistics`` vs a bare forward pass over the same batches (same
  dtype, batch size, padding, prompts), both stopping after the same layer, plus a full forward
  (all layers + unembedding) and the naive route (``run_with_cache`` on every layer, keep the
  vectors, stack, then mean/var). Time ratios and peak-memory ratios.
* ``memory``   -- peak RSS of collection for 100 vs 5000 short prompts (bf16 model, all 30 layers; one
  fresh subprocess per run, the kernel's peak-RSS counter reset after loading the model and a
  warm-up batch; runs repeated and interleaved, medians), as % of the model's own footprint; the
  naive route at 100 and 500 prompts for comparison.
* ``steering`` -- greedy KV-cached generation tokens/s, steered vs unsteered.
* ``locate``   -- end-to-end ``collect_statistics`` + ``locate`` for 5 traits x P pairs, prompts/s
  and the extrapolated minutes for 5 traits x 1000 pairs (float32 and bfloat16 model).

CPU timings are noisy when the machine is shared, so every section interleaves its variants
(rotating their order), repeats them, and reports medians of per-repeat ratios. Wall-clock and
process CPU time are both reported; with ``--threads 1`` CPU time is the least noisy.

Usage::

    python benchmarks/bench_perf.py                       # all sections, defaults as in PERFORMANCE.md
    python benchmarks/bench_perf.py --sections collect,steering --repeats 7
    python benchmarks/bench_perf.py --json results.json   # also write the numbers as JSON
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------------
# helpers


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next reading covers only what follows."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def model_footprint_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True
                ) -> dict[str, dict[str, list[float]]]:
    """Time each variant ``repeats`` times, interleaved with rotating order; wall and CPU seconds."""
    names = list(variants)
    if warmup:
        for name in names:
            variants[name]()
    times = {name: {"wall": [], "cpu": []} for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def ratio(times: dict[str, dict[str, list[float]]], name: str, baseline: str, clock: str) -> float:
    """Median over repeats of the per-repeat ratio (pairs share the machine's load at that moment)."""
    return statistics.median(a / b for a, b in zip(times[name][clock], times[baseline][clock]))


def median(values: list[float]) -> float:
    return statistics.median(values)


def load(spec: str, dtype: str = "float32"):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec == "tiny":
            sys.path.insert(0, str(REPO / "tests"))
            import tempfile

            from conftest import build_tiny_model

            return build_tiny_model(Path(tempfile.mkdtemp()))
        from dpn_lens import load_model

        model = load_model(spec, dtype=dtype)
    return model


def short_prompts(n: int, words: int = 8, seed: int = 0) -> list[str]:
    """Distinct short prompts (same length distribution for every n), for the memory runs."""
    vocabulary = ("new ideas art travel routine quiet calm anxious worried outgoing reserved kind blunt "
                  "organised careless weekend friend party book plan money work home feel").split()
    rng = random.Random(seed)
    return [f"{i % 10} " + " ".join(rng.choice(vocabulary) for _ in range(words)) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# collect


_COLLECTED_MEANS: dict[str, torch.Tensor] = {}
"""Per-dtype mean activations of the collect section, to compare reduced precision with float32."""


class _Stop(Exception):
    pass


def _raise_stop(activation, hook):
    raise _Stop


def bench_collect(spec: str, dtype: str, n_prompts: int, batch_size: int, repeats: int,
                  padding_side: str = "right") -> dict[str, Any]:
    from dpn_lens import embedded_contrastive_set
    from dpn_lens.collect import CollectionConfig, _batches, collect_group_statistics
    from dpn_lens.hooked import hook_name, pad_token_id as _pad_token_id, tokenize_compact as _tokenize_compact

    model = load(spec, dtype)
    if spec == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import TINY_HIGH

        prompts = (TINY_HIGH * (n_prompts // len(TINY_HIGH) + 1))[:n_prompts]
    else:
        prompts = embedded_contrastive_set("extraversion", n_pairs=n_prompts).high
    layers = list(range(int(model.cfg.n_layers)))
    names = [hook_name(layer) for layer in layers]
    token_arrays = _tokenize_compact(model, prompts)
    device = torch.device(model.cfg.device or "cpu")
    batches = list(_batches(token_arrays, batch_size, 1 << 30, _pad_token_id(model.tokenizer), padding_side,
                            device))
    n_tokens = sum(len(ids) for ids in token_arrays)

    def bare_same_layers():
        # The forward pass collect runs, minus the read-outs: stop at the last needed hook point.
        with torch.inference_mode(), model.hooks(fwd_hooks=[(names[-1], _raise_stop)]):
            for batch in batches:
                try:
                    model(batch.input_ids, attention_mask=batch.attention_mask)
                except _Stop:
                    pass

    def bare_full():
        with torch.inference_mode():
            for batch in batches:
                model(batch.input_ids, attention_mask=batch.attention_mask)

    def collect():
        collect_group_statistics(model, prompts, CollectionConfig(layers, max_batch_size=batch_size,
                                 max_batch_tokens=1 << 30, padding_side=padding_side, progress=False))

    def naive():
        kept = []
        with torch.inference_mode():
            for batch in batches:
                _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                                names_filter=names)
                stacked = torch.stack([cache[name] for name in names], dim=1)  # [batch, layer, pos, d_mlp]
                mask = batch.attention_mask
                last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
                kept.append(stacked[torch.arange(len(last)), :, last])
                del cache, stacked
            values = torch.cat(kept).to(torch.float64)
            return values.mean(0), values.var(0)

    def tokenize_only():
        _tokenize_compact(model, prompts)

    # Correctness guard: the naive route and collect agree.
    reference = collect_group_statistics(model, prompts,
                                         CollectionConfig(layers, max_batch_size=batch_size, progress=False))
    _COLLECTED_MEANS[dtype] = reference.mean
    naive_mean, naive_var = naive()
    agree = float((reference.mean - naive_mean).abs().max())

    variants = {"bare_same_layers": bare_same_layers, "collect": collect, "bare_full": bare_full,
                "naive": naive, "tokenize": tokenize_only}
    times = interleaved(variants, repeats)
    result: dict[str, Any] = {
        "model": spec, "dtype": dtype, "n_prompts": n_prompts, "n_tokens": n_tokens, "batch_size": batch_size,
        "n_batches": len(batches), "layers": f"0-{layers[-1]}", "threads": torch.get_num_threads(),
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


def memory_child(spec: str, dtype: str, mode: str, n: int, batch_size: int) -> dict[str, Any]:
    """Runs in its own process: extra peak RSS of one collection of n short prompts over the idle model."""
    from dpn_lens.collect import CollectionConfig, collect_group_statistics
    from dpn_lens.hooked import hook_name

    model = load(spec, dtype)
    layers = list(range(int(model.cfg.n_layers)))
    names = [hook_name(layer) for layer in layers]
    prompts = short_prompts(n)

    def run(selected: list[str]) -> None:
        if mode == "collect":
            collect_group_statistics(model, selected, CollectionConfig(layers, max_batch_size=batch_size, chat=False,
                                                                       progress=False))
            return
        from dpn_lens.collect import _batches
        from dpn_lens.hooked import pad_token_id as _pad_token_id, tokenize_compact as _tokenize_compact

        kept = []
        with torch.inference_mode():
            for batch in _batches(_tokenize_compact(model, selected, chat=False), batch_size, 1 << 30,
                                  _pad_token_id(model.tokenizer), "right", "cpu"):
                _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                                names_filter=names)
                stacked = torch.stack([cache[name] for name in names], dim=1)
                last = batch.attention_mask.sum(dim=1) - 1
                kept.append(stacked[torch.arange(len(last)), :, last])
                del cache, stacked
            values = torch.cat(kept).to(torch.float64)
            values.mean(0), values.var(0)

    run(short_prompts(batch_size, seed=1))  # warm-up: one-time allocations (thread pools, caches)
    gc.collect()
    baseline_kib = _status_kib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    run(prompts)
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")
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
        command = [sys.executable, __file__, "--memory-child", json.dumps([spec, dtype, mode, n, batch_size]),
                   "--threads", str(threads)]
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


# ----------------------------------------------------------------------------------------------
# steering


def bench_steering(spec: str, dtype: str, n_prompts: int, new_tokens: int, repeats: int,
                   neurons_per_layer: int) -> dict[str, Any]:
    from dpn_lens import Intervention, embedded_contrastive_set, steer
    from dpn_lens.data.prompts import render_for_model

    model = load(spec, dtype)
    prompts = embedded_contrastive_set("openness", n_pairs=n_prompts).high
    tokens = [model.tokenizer(render_for_model(model, p), add_special_tokens=False, return_tensors="pt")["input_ids"]
              for p in prompts]
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    # A DPN-LE-shaped edit: the second half of the layers, a few neurons each. The hook adds a
    # dense per-layer delta, so its cost does not depend on which or how many neurons are edited.
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for layer in range(n_layers // 2, n_layers):
        delta = torch.zeros(d_mlp)
        delta[torch.randperm(d_mlp, generator=generator)[:neurons_per_layer]] = 0.5
        deltas[layer] = delta
    decode = Intervention(deltas, positions="decode", label="bench decode")
    every = Intervention(deltas, positions="all", label="bench all")

    def generate_all():
        for ids in tokens:
            model.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False, do_sample=False,
                           use_past_kv_cache=True, verbose=False)

    def steered(intervention):
        def run():
            with steer(model, intervention):
                generate_all()
        return run

    variants = {"unsteered": generate_all, "steered_decode": steered(decode), "steered_all": steered(every)}
    times = interleaved(variants, repeats)
    n_new = n_prompts * new_tokens
    result: dict[str, Any] = {"model": spec, "dtype": dtype, "prompts": n_prompts, "new_tokens": new_tokens,
                              "edited_layers": f"{n_layers // 2}-{n_layers - 1}",
                              "neurons_per_layer": neurons_per_layer, "repeats": repeats,
                              "threads": torch.get_num_threads()}
    for clock in ("wall", "cpu"):
        result[f"tokens_per_s_{clock}"] = {name: n_new / median(t[clock]) for name, t in times.items()}
        result[f"speed_ratio_{clock}"] = {
            "steered_decode/unsteered": 1 / ratio(times, "steered_decode", "unsteered", clock),
            "steered_all/unsteered": 1 / ratio(times, "steered_all", "unsteered", clock),
        }
    return result


# ----------------------------------------------------------------------------------------------
# locate


def bench_locate(spec: str, plan: list[tuple[str, int]], batch_size: int, target_pairs: int) -> dict[str, Any]:
    """End-to-end collect + locate for the five traits, once per (dtype, pairs per trait) of ``plan``."""
    from dpn_lens import TRAITS, collect_statistics, embedded_contrastive_set, locate
    from dpn_lens.collect import CollectionConfig

    results: dict[str, Any] = {"model": spec, "traits": len(TRAITS), "batch_size": batch_size,
                               "threads": torch.get_num_threads(), "by_dtype": {}}
    for dtype, n_pairs in plan:
        sets = [embedded_contrastive_set(trait, n_pairs=n_pairs) for trait in TRAITS]
        model = load(spec, dtype)
        wall, cpu = time.perf_counter(), time.process_time()
        maps = [locate(collect_statistics(model, pairs, CollectionConfig(max_batch_size=batch_size, progress=False))) for pairs in sets]
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


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="collect,memory,steering,locate")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noisy on a shared CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--collect-prompts", type=int, default=8)
    parser.add_argument("--collect-dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--memory-sizes", default="100,5000")
    parser.add_argument("--memory-naive-sizes", default="100,500")
    parser.add_argument("--memory-dtype", default="bfloat16")
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--steer-prompts", type=int, default=3)
    parser.add_argument("--steer-tokens", type=int, default=64)
    parser.add_argument("--locate-plan", default="bfloat16:40,float32:10",
                        help="dtype:pairs-per-trait, comma-separated (the full target is 5 traits x 1000 pairs)")
    parser.add_argument("--locate-threads", type=int, default=2, help="torch threads for the locate section")
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        spec, dtype, mode, n, batch_size = json.loads(args.memory_child)
        print(json.dumps(memory_child(spec, dtype, mode, n, batch_size)))
        return

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"collect", "memory", "steering", "locate"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from collect, memory, steering, locate")
    results: dict[str, Any] = {"torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count()}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved repeats; medians")
    if "collect" in sections:
        results["collect"] = []
        for dtype in args.collect_dtypes.split(","):
            r = bench_collect(args.model, dtype, args.collect_prompts, args.batch_size, args.repeats)
            results["collect"].append(r)
            w, c = r["ratio_wall"], r["ratio_cpu"]
            print(f"[collect {dtype}] {r['n_prompts']} prompts, {r['n_tokens']} tokens, layers {r['layers']}: "
                  f"collect {r['median_wall_s']['collect']:.2f}s vs bare {r['median_wall_s']['bare_same_layers']:.2f}s"
                  f" | collect/bare(same layers) wall {w['collect/bare_same_layers']:.3f} cpu "
                  f"{c['collect/bare_same_layers']:.3f} (target <= 1.10) | collect/bare(full) wall "
                  f"{w['collect/bare_full']:.3f} cpu {c['collect/bare_full']:.3f} | naive/collect wall "
                  f"{w['naive/collect']:.3f} cpu {c['naive/collect']:.3f}", flush=True)
        if {"float32", "bfloat16"} <= set(_COLLECTED_MEANS):
            full, half = _COLLECTED_MEANS["float32"], _COLLECTED_MEANS["bfloat16"]
            error = float((half - full).abs().max() / full.abs().max())
            correlation = float(torch.corrcoef(torch.stack([full.flatten(), half.flatten()]))[0, 1])
            results["bfloat16_vs_float32_mean_activation"] = {"max_abs_error_over_max_abs": error,
                                                              "correlation": correlation}
            print(f"[collect] bfloat16 vs float32 mean activations: max |error| / max |mean| = {error:.4f}, "
                  f"correlation {correlation:.5f}", flush=True)
    if "memory" in sections:
        sizes = [int(x) for x in args.memory_sizes.split(",")]
        naive_sizes = [int(x) for x in args.memory_naive_sizes.split(",") if x]
        r = bench_memory(args.model, args.memory_dtype, sizes, naive_sizes, 32, args.threads, args.memory_repeats)
        results["memory"] = r
        print(f"[memory {args.memory_dtype}] collect peak growth {sizes[0]} -> {sizes[-1]} prompts: "
              f"{r.get('collect_growth_mib', 0):.1f} MiB (medians of {r['repeats']}) = "
              f"{r.get('collect_growth_pct_of_model', 0):.2f}% of the model's {r['model_footprint_mib']:.0f} MiB "
              f"(target < 5%; run-to-run spread {r.get('collect_run_to_run_spread_mib', 0):.0f} MiB) | naive: "
              f"{r.get('naive_mib_per_prompt', 0):.3f} MiB/prompt, "
              f"{r.get('naive_growth_pct_of_model_extrapolated', 0):.0f}% of the model for the same growth "
              f"(extrapolated) | naive/collect extra peak at n={r.get('naive/collect_peak_extra_at_n', {}).get('n')}: "
              f"{r.get('naive/collect_peak_extra_at_n', {}).get('ratio', float('nan')):.2f}", flush=True)
    if "steering" in sections:
        r = bench_steering(args.model, "float32", args.steer_prompts, args.steer_tokens, args.repeats, 8)
        results["steering"] = r
        w, c = r["speed_ratio_wall"], r["speed_ratio_cpu"]
        print(f"[steering] {r['prompts']} x {r['new_tokens']} greedy tokens, unsteered "
              f"{r['tokens_per_s_wall']['unsteered']:.1f} tok/s | steered(decode)/unsteered speed wall "
              f"{w['steered_decode/unsteered']:.3f} cpu {c['steered_decode/unsteered']:.3f} | steered(all) wall "
              f"{w['steered_all/unsteered']:.3f} cpu {c['steered_all/unsteered']:.3f} (target >= 0.95)", flush=True)
    if "locate" in sections:
        torch.set_num_threads(args.locate_threads)
        plan = [(item.split(":")[0], int(item.split(":")[1])) for item in args.locate_plan.split(",")]
        r = bench_locate(args.model, plan, 16, 1000)
        results["locate"] = r
        for dtype, d in r["by_dtype"].items():
            print(f"[locate {dtype}] 5 traits x {d['pairs_per_trait']} pairs, {r['threads']} threads: "
                  f"{d['wall_s']:.1f}s wall ({d['cpu_s']:.1f}s CPU), {d['prompts_per_s_wall']:.2f} prompts/s -> "
                  f"EXTRAPOLATED 5 traits x 1000 pairs: {d['extrapolated_minutes_wall']:.0f} min wall at this load "
                  f"({d['extrapolated_cpu_minutes']:.0f} CPU-minutes)", flush=True)
        torch.set_num_threads(args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
