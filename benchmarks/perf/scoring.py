"""The ``scoring`` section: the preference metric's scoring of fixed pairs under an edit (what
``dpn-lens control`` does for every gamma of every curve): ``PairScorer`` running each question once into a
key/value cache and then only the answers, vs the plain path (``PairScorer(cached=False)``: whole sequences,
the edit masked to the answer positions). Seconds per scored edit, their ratio, the one-off cost of the
cached questions, and the largest margin difference between the two; also the KL probe (``KLProbe``,
block-wise log-softmax) vs the whole-tensor float32 computation it replaced. The pairs are embedded
questions with two persona descriptions as the answers: realistic lengths, no meaning.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch

from dpn_lens import Intervention, embedded_contrastive_set, steer
from dpn_lens.evaluation.calibrate import KLProbe, probe_chunks
from dpn_lens.evaluation.logprobs import continuation_logprobs
from dpn_lens.evaluation.preference import PairScorer, PreferencePair

from .common import interleaved, load, median, ratio


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
    probe = KLProbe(model, probe_chunks(model, 4, 128), edit_context=True)   # as _whole_tensor_kl: every position
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
