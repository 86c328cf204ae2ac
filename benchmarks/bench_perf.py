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
* ``prefix``   -- end-to-end ``collect_statistics`` + ``locate`` on the demo's data (embedded
  role-play prompts, bf16 by default), shared-prefix collection vs the plain path
  (``CollectionConfig(share_prefix=False)``), side by side: time ratio, tokens run vs tokens in
  the prompts, and how far the two agree (statistics and selected neurons).
* ``scoring`` -- the preference metric's scoring of fixed pairs under an edit (what ``dpn-lens control``
  does for every gamma of every curve): ``PairScorer`` running each question once into a key/value
  cache and then only the answers, vs the plain path (``PairScorer(cached=False)``: whole sequences,
  the edit masked to the answer positions). Seconds per scored edit, their ratio, the one-off cost of
  the cached questions, and the largest margin difference between the two; also the KL probe
  (``KLProbe``, block-wise log-softmax) vs the whole-tensor float32 computation it replaced. The pairs
  are embedded questions with two persona descriptions as the answers: realistic lengths, no meaning.
* ``evaluation`` -- ``evaluation.judge.generate_answers`` (greedy, repetition penalty 1.15, the judge's
  generation) one question at a time (``batch_size=1``) vs in left-padded batches: answered
  questions/s of each, their ratio, and whether the answers are identical.
* ``attribution`` -- the cost of selection by effect relative to collection, for the same number of
  pairs: ``effect.margin_gradients`` (one forward and one backward per batch over each pair's question
  and both answers, the attribution rules' pass) vs ``collect_statistics`` of as many contrastive pairs
  (the DPN-LE pass). Target: at most 3x. The one-off greedy generation of the selection pairs'
  answers (``effect.selection_pairs``, cached per model afterwards) is timed once and reported beside.

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
so a renamed function breaks CI instead of this script. It imports only public names of ``dpn_lens``
(it builds its own batches rather than borrow collect's private ones), and it puts the folder above
``benchmarks/`` first on ``sys.path``, so a clean clone runs it without installing the package.
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
from dataclasses import dataclass
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a clean clone: the package beside this folder, not an installed copy

from dpn_lens import (TRAITS, Intervention, collect_statistics, embedded_contrastive_set,  # noqa: E402
                      locate, steer)
from dpn_lens.collect import CollectionConfig, collect_group_statistics  # noqa: E402
from dpn_lens.data.prompts import render_for_model  # noqa: E402
from dpn_lens.evaluation.calibrate import KLProbe, probe_chunks  # noqa: E402
from dpn_lens.evaluation.judge import generate_answers  # noqa: E402
from dpn_lens.evaluation.logprobs import continuation_logprobs  # noqa: E402
from dpn_lens.evaluation.preference import PairScorer, PreferencePair  # noqa: E402
from dpn_lens.effect import margin_gradients, selection_pairs  # noqa: E402
from dpn_lens.hooked import hook_name, pad_token_id, pad_token_lists, tokenize_compact  # noqa: E402
from dpn_lens.prefix import plan_prefix_tree, tokens_run  # noqa: E402

MIB = 1024 * 1024


@dataclass
class LoadOptions:
    """How every section loads its model (set once from the command line by ``main``)."""

    device: str = "cpu"
    random_weights: bool = False


LOAD_OPTIONS = LoadOptions()


# ----------------------------------------------------------------------------------------------
# helpers


def status_kib(field: str) -> int:
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


def _synchronize() -> None:
    """Wait for queued GPU work, so that a clock reading covers it (a no-op on the CPU)."""
    if LOAD_OPTIONS.device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


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
            _synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            _synchronize()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def ratio(times: dict[str, dict[str, list[float]]], name: str, baseline: str, clock: str) -> float:
    """Median over repeats of the per-repeat ratio (pairs share the machine's load at that moment)."""
    return statistics.median(a / b for a, b in zip(times[name][clock], times[baseline][clock]))


def median(values: list[float]) -> float:
    return statistics.median(values)


TINY = "tiny"
"""``--model tiny``: the random tiny Llama of ``dpn_lens.tiny`` (a smoke run; its timings mean nothing)."""


def load(spec: str, dtype: str = "float32"):
    """The model to time: an embedded/hub model by name, or ``"tiny"``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec == TINY:
            from dpn_lens.tiny import build_tiny_model

            # 512 positions: the embedded role-play prompts are ~130 word-level tokens, plus generation.
            return build_tiny_model(max_positions=512).to(getattr(torch, dtype)).to(LOAD_OPTIONS.device)
        from dpn_lens import load_model

        device = None if LOAD_OPTIONS.device == "cpu" else LOAD_OPTIONS.device
        model = load_model(spec, dtype=dtype, device=device, random_weights=LOAD_OPTIONS.random_weights)
    return model


def batches(token_arrays: list, batch_size: int, pad_id: int, padding_side: str, device: Any) -> list[tuple]:
    """``(input_ids, attention_mask)`` batches of ``batch_size`` prompts, longest first.

    The batches ``collect_group_statistics`` forms when ``max_batch_tokens`` does not bind (the
    benchmark passes 2**30), so the bare forward passes below run on exactly the same tensors.
    """
    order = sorted(range(len(token_arrays)), key=lambda i: -len(token_arrays[i]))
    result = []
    for start in range(0, len(order), batch_size):
        ids, mask = pad_token_lists([token_arrays[i] for i in order[start:start + batch_size]], pad_id, padding_side)
        result.append((ids.to(device), mask.to(device)))
    return result


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


def _naive_statistics(model: Any, batched: list[tuple], names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The route collection avoids: ``run_with_cache`` on every layer, keep each prompt's vectors, then
    mean/var. Its memory grows with the number of prompts."""
    kept = []
    with torch.inference_mode():
        for input_ids, mask in batched:
            _, cache = model.run_with_cache(input_ids, attention_mask=mask, names_filter=names)
            stacked = torch.stack([cache[name] for name in names], dim=1)  # [batch, layer, pos, d_mlp]
            last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)          # last non-pad token, either side
            kept.append(stacked[torch.arange(len(last)), :, last])
            del cache, stacked
        values = torch.cat(kept).to(torch.float64)
        return values.mean(0), values.var(0)


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
        command = [sys.executable, __file__, "--memory-child", json.dumps([spec, dtype, mode, n, batch_size]),
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


# ----------------------------------------------------------------------------------------------
# steering


def bench_edit(model: Any, neurons_per_layer: int, value: float) -> Intervention:
    """A DPN-LE-shaped decode-only edit: the second half of the layers, ``neurons_per_layer`` seeded random
    neurons each set to ``value``. The hook adds a dense per-layer delta, so its cost does not depend on
    which or how many neurons are edited."""
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for layer in range(n_layers // 2, n_layers):
        delta = torch.zeros(d_mlp)
        delta[torch.randperm(d_mlp, generator=generator)[:neurons_per_layer]] = value
        deltas[layer] = delta
    return Intervention(deltas, positions="decode", label="bench decode")


def bench_steering(spec: str, dtype: str, n_prompts: int, new_tokens: int, repeats: int,
                   neurons_per_layer: int) -> dict[str, Any]:
    model = load(spec, dtype)
    prompts = embedded_contrastive_set("openness", n_pairs=n_prompts).high
    device = torch.device(model.cfg.device or "cpu")
    tokens = [model.tokenizer(render_for_model(model, p), add_special_tokens=False,
                              return_tensors="pt")["input_ids"].to(device) for p in prompts]
    n_layers = int(model.cfg.n_layers)
    decode = bench_edit(model, neurons_per_layer, 0.5)
    every = decode.at_positions("all")

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
    results: dict[str, Any] = {"model": spec, "traits": len(TRAITS), "batch_size": batch_size,
                               "threads": torch.get_num_threads(), "by_dtype": {}}
    config = CollectionConfig(max_batch_size=batch_size, progress=False)
    for dtype, n_pairs in plan:
        sets = [embedded_contrastive_set(trait, n_pairs=n_pairs) for trait in TRAITS]
        model = load(spec, dtype)
        _synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        maps = [locate(collect_statistics(model, pairs, config)) for pairs in sets]
        _synchronize()
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
# prefix


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


# ----------------------------------------------------------------------------------------------
# scoring


def _whole_tensor_kl(probe: KLProbe, edit: Any) -> tuple[float, float]:
    """The KL probe as it was before the block-wise log-softmax: full float32 distributions, then the sum."""
    total, count, nll = 0.0, 0, []
    with steer(probe.model, edit.at_positions("all")):
        scores = continuation_logprobs(probe.model, [probe.context] * len(probe.chunks), probe.chunks, full=True)
    for base, steered in zip(probe.reference, scores):
        total += float((base.exp() * (base - steered.distributions)).sum(-1).double().sum())
        count += base.shape[0]
        nll.append(-steered.token_logprobs.double())
    return max(total / count, 0.0), float(torch.exp(torch.cat(nll).mean()))


def bench_scoring(spec: str, dtype: str, n_pairs: int, repeats: int, neurons: int = 8) -> dict[str, Any]:
    """Preference scoring under an edit, cached questions vs plain; the KL probe, block-wise vs whole-tensor."""
    model = load(spec, dtype)
    drawn = embedded_contrastive_set("extraversion", n_pairs=n_pairs).pairs
    pairs = [PreferencePair(pair.question, pair.high_description, pair.low_description) for pair in drawn]
    generator = torch.Generator().manual_seed(0)
    layers = range(model.cfg.n_layers // 3, 2 * model.cfg.n_layers // 3 + 1)
    deltas = {}
    for layer in layers:
        deltas[layer] = torch.zeros(model.cfg.d_mlp)
        deltas[layer][torch.randperm(model.cfg.d_mlp, generator=generator)[:neurons]] = torch.randn(neurons,
                                                                                                  generator=generator)
    edit = Intervention(deltas, "decode", label="benchmark edit")
    started = time.perf_counter()
    cached = PairScorer(model, pairs)
    setup_s = time.perf_counter() - started
    plain = PairScorer(model, pairs, cached=False)
    probe = KLProbe(model, probe_chunks(model, 4, 128))
    variants = {"plain": lambda: plain.margins(edit), "cached": lambda: cached.margins(edit),
                "kl_whole_tensor": lambda: _whole_tensor_kl(probe, edit), "kl_blockwise": lambda: probe(edit)}
    # Correctness guard (and warm-up): each once, compared.
    outputs = {name: run() for name, run in variants.items()}
    times = interleaved(variants, repeats, warmup=False)
    result: dict[str, Any] = {
        "model": spec, "dtype": dtype, "pairs": len(pairs), "threads": torch.get_num_threads(), "repeats": repeats,
        "edited_neurons": edit.n_edited, "cached_used": cached.cached is not None, "cached_setup_s": setup_s,
        "median_wall_s": {name: median(t["wall"]) for name, t in times.items()},
        "median_cpu_s": {name: median(t["cpu"]) for name, t in times.items()},
        "ratio_wall": ratio(times, "cached", "plain", "wall"), "ratio_cpu": ratio(times, "cached", "plain", "cpu"),
        "kl_ratio_wall": ratio(times, "kl_blockwise", "kl_whole_tensor", "wall"),
        "max_abs_margin_difference": float(abs(outputs["cached"] - outputs["plain"]).max()),
        "mean_margin": {name: float(outputs[name].mean()) for name in ("plain", "cached")},
        "kl": {name: outputs[name][0] for name in ("kl_whole_tensor", "kl_blockwise")},
    }
    del model
    gc.collect()
    return result


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


# ----------------------------------------------------------------------------------------------
# evaluation


def bench_evaluation(spec: str, dtype: str, n_questions: int, new_tokens: int, batch_size: int, repeats: int,
                     repetition_penalty: float = 1.15) -> dict[str, Any]:
    """``generate_answers`` one question at a time vs batched, on the embedded questions, interleaved."""
    model = load(spec, dtype)
    drawn = embedded_contrastive_set("openness", n_pairs=4 * n_questions).pairs
    questions = list(dict.fromkeys(pair.question for pair in drawn))[:n_questions]

    def answers(size: int) -> Callable[[], list[str]]:
        return lambda: generate_answers(model, questions, max_new_tokens=new_tokens,
                                        repetition_penalty=repetition_penalty, batch_size=size)

    variants = {"one_at_a_time": answers(1), "batched": answers(batch_size)}
    # Correctness guard (and warm-up): both once, compared.
    outputs = {name: run() for name, run in variants.items()}
    times = interleaved(variants, repeats, warmup=False)
    result: dict[str, Any] = {
        "model": spec, "dtype": dtype, "questions": len(questions), "max_new_tokens": new_tokens,
        "batch_size": batch_size, "repetition_penalty": repetition_penalty, "repeats": repeats,
        "threads": torch.get_num_threads(),
        "answers_identical": outputs["batched"] == outputs["one_at_a_time"],
        "answered_tokens": sum(len(model.tokenizer(a, add_special_tokens=False)["input_ids"])
                               for a in outputs["batched"]),
    }
    for clock in ("wall", "cpu"):
        result[f"questions_per_s_{clock}"] = {name: len(questions) / median(t[clock]) for name, t in times.items()}
        result[f"speedup_{clock}"] = 1 / ratio(times, "batched", "one_at_a_time", clock)
    del model
    gc.collect()
    return result


# ----------------------------------------------------------------------------------------------
# the command line: one runner per section, each prints its line and returns its numbers


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


def run_steering(args: argparse.Namespace) -> dict[str, Any]:
    r = bench_steering(args.model, "float32", args.steer_prompts, args.steer_tokens, args.repeats,
                       args.steer_neurons)
    w, c = r["speed_ratio_wall"], r["speed_ratio_cpu"]
    print(f"[steering] {r['prompts']} x {r['new_tokens']} greedy tokens, unsteered "
          f"{r['tokens_per_s_wall']['unsteered']:.1f} tok/s | steered(decode)/unsteered speed wall "
          f"{w['steered_decode/unsteered']:.3f} cpu {c['steered_decode/unsteered']:.3f} | steered(all) wall "
          f"{w['steered_all/unsteered']:.3f} cpu {c['steered_all/unsteered']:.3f} (target >= 0.95)", flush=True)
    return r


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


def run_evaluation(args: argparse.Namespace) -> dict[str, Any]:
    r = bench_evaluation(args.model, args.eval_dtype, args.eval_questions, args.eval_tokens, args.eval_batch_size,
                         args.repeats)
    w, c = r["questions_per_s_wall"], r["questions_per_s_cpu"]
    print(f"[evaluation {r['dtype']}] generate_answers, {r['questions']} questions x <= {r['max_new_tokens']} new "
          f"tokens (repetition penalty {r['repetition_penalty']:g}), {r['threads']} thread(s): one at a time "
          f"{w['one_at_a_time']:.2f} q/s, batched ({r['batch_size']}) {w['batched']:.2f} q/s | batched/one-at-a-time "
          f"speed wall {r['speedup_wall']:.2f} cpu {r['speedup_cpu']:.2f} (cpu q/s {c['one_at_a_time']:.2f} vs "
          f"{c['batched']:.2f}) | answers identical: {r['answers_identical']}", flush=True)
    return r


def run_scoring(args: argparse.Namespace) -> dict[str, Any]:
    r = bench_scoring(args.model, args.scoring_dtype, args.scoring_pairs, args.repeats)
    w = r["median_wall_s"]
    print(f"[scoring {r['dtype']}] preference margins of {r['pairs']} pairs under an edit of {r['edited_neurons']} "
          f"neurons, {r['threads']} thread(s): plain {w['plain']:.2f}s, cached questions {w['cached']:.2f}s per edit "
          f"(+{r['cached_setup_s']:.2f}s once) | cached/plain wall {r['ratio_wall']:.3f} cpu {r['ratio_cpu']:.3f} | "
          f"max |margin difference| {r['max_abs_margin_difference']:.2e} (means {r['mean_margin']['plain']:+.4f} vs "
          f"{r['mean_margin']['cached']:+.4f}) | KL probe: whole-tensor {w['kl_whole_tensor']:.2f}s, block-wise "
          f"{w['kl_blockwise']:.2f}s, ratio wall {r['kl_ratio_wall']:.3f}, KL {r['kl']['kl_whole_tensor']:.6f} vs "
          f"{r['kl']['kl_blockwise']:.6f}", flush=True)
    return r


def run_attribution(args: argparse.Namespace) -> dict[str, Any]:
    r = bench_attribution(args.model, args.attribution_dtype, args.attribution_pairs, args.repeats)
    w = r["median_wall_s"]
    print(f"[attribution {r['dtype']}] {r['pairs']} pairs, {r['threads']} thread(s): collection {w['collect']:.2f}s, "
          f"attribution gradients {w['attribution']:.2f}s | attribution/collection wall {r['ratio_wall']:.2f} "
          f"cpu {r['ratio_cpu']:.2f} (target <= 3) | the selection pairs' answers ({r['answer_tokens']} tokens) "
          f"generated once in {r['generation_s']:.1f}s: with it {r['ratio_with_generation']:.2f}x collection", flush=True)
    return r


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
