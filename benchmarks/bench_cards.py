"""Neuron cards: their cost against locate's, and their memory against the corpus size, in one run.

Two measurements, side by side on the same machine and model:

1. **cards vs locate**: ``locate_traits`` with the demo's settings (5 traits x ``--pairs`` embedded pairs,
   the dual criterion) into a temporary run folder, then ``build_cards`` for every selected neuron of
   that run (the default ``CardConfig``: 64 pairs per trait for the histograms and prompt contexts, 128
   WikiText-2 windows of 64 tokens). Target: cards take at most 2x locate's time.
2. **memory flat in corpus size**: the peak RSS growth of streaming ``--memory-windows`` WikiText-2
   windows and 4x as many through ``scan`` (the bounded top-k) for the same neurons. Flat means the 4x
   corpus costs about the same peak.

Usage:
    python benchmarks/bench_cards.py --data-dir ../shared/data                  # SmolLM2, the demo's 500 pairs
    python benchmarks/bench_cards.py --data-dir ../shared/data --parts memory    # the memory part only
    python benchmarks/bench_cards.py --model tiny --pairs 60 --data-dir ../shared/data   # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dpn_lens import TRAITS, CardConfig, CollectionConfig, LocateConfig, build_cards, locate_traits
from dpn_lens.cards import scan, text_windows

# The model loader and the peak-RSS readers are bench_perf's (perf/common.py; the same tiny model for `--model tiny`).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf.common import load, reset_peak_rss as _reset_peak_rss, status_kib  # noqa: E402  (benchmarks/ on sys.path)


def wikitext_path(data_dir: str) -> Path:
    path = Path(data_dir) / "capability" / "wikitext2_test" / "test.txt"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist; pass --data-dir, the folder holding capability/wikitext2_test")
    return path


def bench_cards_vs_locate(model: Any, pairs: int, data_dir: str, batch_size: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        config = LocateConfig(list(TRAITS), n_pairs=pairs, collection=CollectionConfig(max_batch_size=batch_size,
                                                                                      progress=False))
        started = time.perf_counter()
        run = locate_traits(model, config, out=Path(folder) / "run")
        locate_s = time.perf_counter() - started
        neurons = sum(m.n_selected() for m in run.maps.values())
        started = time.perf_counter()
        cards = build_cards(run, model, CardConfig(data_dir=data_dir, batch_size=batch_size), log=None)
        cards_s = time.perf_counter() - started
    n_cards = sum(len(c) for c in cards.values())
    return {"pairs_per_trait": pairs, "selected_neurons": neurons, "cards": n_cards, "locate_s": locate_s,
            "cards_s": cards_s, "cards_over_locate": cards_s / locate_s}


def _watched_neurons(model: Any, n_neurons: int) -> list[tuple[int, int]]:
    generator = torch.Generator().manual_seed(0)
    layers = torch.randint(0, model.cfg.n_layers, (n_neurons,), generator=generator).tolist()
    indices = torch.randint(0, model.cfg.d_mlp, (n_neurons,), generator=generator).tolist()
    return sorted(set(zip(layers, indices)))


def memory_child(spec: str, dtype: str, data_dir: str, windows: int, n_neurons: int, batch_size: int) -> dict[str, Any]:
    """In a fresh process: load the model, warm up, then the peak RSS growth of one scan of ``windows``."""
    model = load(spec, dtype)
    neurons = _watched_neurons(model, n_neurons)
    path = wikitext_path(data_dir)
    scan(model, neurons, text_windows(model.tokenizer, path, 64, 2), batch_size=batch_size)   # warm up
    gc.collect()
    _reset_peak_rss()
    before = status_kib("VmRSS")
    started = time.perf_counter()
    found = scan(model, neurons, text_windows(model.tokenizer, path, 64, windows), batch_size=batch_size)
    return {"windows": windows, "seconds": time.perf_counter() - started,
            "peak_growth_mib": (status_kib("VmHWM") - before) / 1024, "sequences_seen": int(found.last_token.shape[1]),
            "neurons": len(neurons)}


def bench_memory(spec: str, dtype: str, data_dir: str, windows: int, n_neurons: int, batch_size: int,
                 threads: int) -> dict[str, Any]:
    """Peak RSS growth of scanning ``windows`` and ``4 * windows`` WikiText windows for the same neurons,
    each in its own fresh process (so one run's freed memory cannot hide the other's peak)."""
    import subprocess
    import sys

    result: dict[str, Any] = {"window_tokens": 64}
    for label, count in (("small", windows), ("large", 4 * windows)):
        child = json.dumps([spec, dtype, data_dir, count, n_neurons, batch_size])
        output = subprocess.run([sys.executable, __file__, "--memory-child", child, "--threads", str(threads)],
                                check=True, capture_output=True, text=True).stdout
        result[label] = json.loads(output.strip().splitlines()[-1])
    result["neurons"] = result["small"]["neurons"]
    result["peak_ratio_large_over_small"] = (max(result["large"]["peak_growth_mib"], 1e-3)
                                             / max(result["small"]["peak_growth_mib"], 1e-3))
    return result


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, folder, or 'tiny'")
    parser.add_argument("--dtype", default="bfloat16", help="the demo's dtype")
    parser.add_argument("--n-pairs", "--pairs", type=int, default=500, help="pairs per trait of the locate run (the demo's 500)")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding capability/wikitext2_test")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noisy on a shared CPU)")
    parser.add_argument("--memory-windows", type=int, default=128, help="WikiText windows of the small corpus")
    parser.add_argument("--memory-neurons", type=int, default=900, help="neurons watched in the memory run")
    parser.add_argument("--parts", default="speed,memory", help="comma list of speed (cards vs locate) and memory")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        result = memory_child(*json.loads(args.memory_child))
        print(json.dumps(result))
        return result
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if not parts or parts - {"speed", "memory"}:
        raise SystemExit(f"--parts takes speed and/or memory, got {args.parts!r}")
    results: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "threads": args.threads,
                               "torch": torch.__version__}
    if "speed" in parts:
        results["cards_vs_locate"] = _speed(args)
    if "memory" in parts:
        results["memory"] = _memory(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _speed(args: argparse.Namespace) -> dict[str, Any]:
    speed = bench_cards_vs_locate(load(args.model, args.dtype), args.n_pairs, args.data_dir, args.batch_size)
    print(f"[cards] locate {speed['pairs_per_trait']} pairs x 5 traits: {speed['locate_s']:.1f} s; cards for "
          f"{speed['cards']} neurons: {speed['cards_s']:.1f} s -> {speed['cards_over_locate']:.2f}x locate "
          f"(target <= 2x)")
    return speed


def _memory(args: argparse.Namespace) -> dict[str, Any]:
    memory = bench_memory(args.model, args.dtype, args.data_dir, args.memory_windows, args.memory_neurons,
                          args.batch_size, args.threads)
    print(f"[cards] peak RSS growth streaming {memory['small']['windows']} vs {memory['large']['windows']} WikiText "
          f"windows for {memory['neurons']} neurons: {memory['small']['peak_growth_mib']:.1f} vs "
          f"{memory['large']['peak_growth_mib']:.1f} MiB (ratio {memory['peak_ratio_large_over_small']:.2f}; "
          f"flat = about 1)")
    return memory


if __name__ == "__main__":
    main()
