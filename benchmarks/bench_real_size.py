"""Real-size architectures on a GPU (issue 25, part 3): LLaMA-3-8B and Qwen2.5-7B with seeded random weights.

The weights of an 8B model cannot reach the lent GPU machine (it reaches no network; 64 MiB travel with a
command), and the timings do not need them: shapes, kernels and hooks are the architecture's. So each
architecture is written as a folder (its ``config.json`` from ``ARCHITECTURES``, a borrowed tokenizer whose
vocabulary fits) and loaded with ``load_model(..., random_weights=True)``. What the statistics select means
nothing; the speed and memory are the real model's.

For each architecture, in one process:

* **matmul peak**: an 8192^3 bfloat16 matrix product on this device (the ceiling the share below divides by;
  with ``--peak-tflops``, that figure instead).
* **load**: seconds, and the memory the loaded model holds.
* **collection** (``collect_statistics``, the path of ``locate``) of ``--pairs`` pairs, plain and with shared
  prefixes, ``--repeats`` times interleaved: prompts/s, model TFLOP/s (``plan.locate_work``'s FLOPs, which
  count what runs: padding in, logits out) and their share of the matmul peak; whether sharing pays
  (``share_prefix="auto"`` shares on the CPU only); peak memory beside ``plan_locate``'s; and the plan's time
  model (``plan.fit_forward_rates``, fitted on a ``--fit-pairs`` sample as ``dpn-lens plan --measure`` fits
  it) against the measured times (target: within 25%).
* **generation**: greedy tokens/s at batch 1 and at batch 16 (``--new-tokens`` each) of the raw Hugging Face
  ``generate`` (a second copy of the model with the same seeded weights, loaded after collection; the
  bridge's ``original_model`` holds the bridge's components) and of ``dpn_lens.generation.greedy_generate``
  with the dtype's default engine (bfloat16: ``"raw"``) unsteered, and inside ``steer`` with a DPN-LE-sized
  decode-only edit (0.5% of the neurons) with each engine (``"raw"``, ``"raw-sdpa"``, ``"bridge"``); the default
  engine's steered / raw is the issue's target (>= 0.9). The tokens of ``"raw"`` must be the bridge's loop's.

On the CPU, ``--scale tiny`` shrinks each architecture (2 layers, width 64) for a smoke run whose timings mean
nothing (``tests/test_real_size_bench.py``).

Usage::

    python benchmarks/bench_real_size.py --device cuda --json OUT.json                # both architectures
    python benchmarks/bench_real_size.py --arch qwen2.5-7b --device cuda --pairs 100
    python benchmarks/bench_real_size.py --scale tiny --tokenizer FOLDER --pairs 3 --repeats 1 --new-tokens 2  # smoke
    bash scripts/gpu_evidence.sh            # on the lent GPU: wheels, tokenizer and this script, one command
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))          # bench_perf's perf/ beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the package beside benchmarks/

from perf.common import LOAD_OPTIONS, bench_edit, generation_variant, interleaved, raw_model, synchronize  # noqa: E402
from dpn_lens import embedded_contrastive_set, load_model  # noqa: E402
from dpn_lens.collection.collect import CollectionConfig, collect_statistics  # noqa: E402
from dpn_lens.data.prompts import render_for_model  # noqa: E402
from dpn_lens.generation import default_engine, eos_ids, hf_greedy_batch, model_dtype  # noqa: E402
from dpn_lens.hooked import encode  # noqa: E402
from dpn_lens.plan import fit_forward_rates, locate_work, model_shape, plan_locate, reset_peak, status_bytes  # noqa: E402

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B-Instruct's config.json (8.03B parameters)
    "llama-3-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                   "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
                   "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
                   "attention_bias": False, "vocab_size": 128256, "torch_dtype": "bfloat16"},
    # Qwen/Qwen2.5-7B-Instruct's config.json (7.62B parameters; biases on q, k and v)
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                   "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                   "max_window_layers": 28, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                   "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False,
                   "vocab_size": 152064, "torch_dtype": "bfloat16"},
}

TINY_SCALE = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_window_layers": 2}
"""``--scale tiny``: the architecture's type and vocabulary at a smoke-run size."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")

EDITED_SHARE = 0.005
"""Neurons a DPN-LE map edits: about 0.5% of all (METHOD.md)."""


def architecture_folder(arch: str, tokenizer_dir: Path, out: Path, scale: str = "full") -> Path:
    """``out/arch``: ``ARCHITECTURES[arch]`` as ``config.json`` beside the tokenizer files of ``tokenizer_dir``,
    its special-token ids put in the config (the architecture's own ids may lie outside a borrowed tokenizer).

    Example:
        >>> architecture_folder("llama-3-8b", Path("tok"), Path("/tmp/arch"))        # doctest: +SKIP
        PosixPath('/tmp/arch/llama-3-8b')
    """
    from transformers import AutoTokenizer

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    files = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not files:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}; pass "
                                "--tokenizer a folder holding a Hugging Face tokenizer (scripts/gpu_evidence.sh "
                                "carries SmolLM2's)")
    folder = out / arch
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copy(file, folder / file.name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = dict(ARCHITECTURES[arch], **(TINY_SCALE if scale == "tiny" else {}))
    if len(tokenizer) > config["vocab_size"]:
        raise ValueError(f"the tokenizer of {tokenizer_dir} has {len(tokenizer)} tokens, more than {arch}'s "
                         f"{config['vocab_size']}; borrow a smaller one")
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    for key, token in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("pad_token_id", tokenizer.pad_token_id)):
        if token is not None:
            config[key] = token
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def reset_memory(device: str) -> int:
    """Start a peak reading; what is held now (the GPU's allocated bytes, or the process's RSS)."""
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    reset_peak()
    return status_bytes("VmRSS")


def peak_memory(device: str, held: int) -> int:
    """The peak since ``reset_memory`` (which returned ``held``): the GPU's allocated bytes (the weights
    included: what must fit), or on the CPU the process's peak RSS above ``held``."""
    return torch.cuda.max_memory_allocated() if device != "cpu" else status_bytes("VmHWM") - held


def timed_interleaved(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each variant (``perf.common.interleaved``: a warm-up each, then the order rotating)."""
    return {name: times["wall"] for name, times in interleaved(variants, repeats).items()}


def matmul_tflops(device: str, size: int = 8192) -> float:
    """bfloat16 matrix-product TFLOP/s on ``device`` (the mean of 10 products after 3 warm-ups)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 10 * 2 * size ** 3 / (time.perf_counter() - started) / 1e12


def bench_collection(model: Any, folder: Path, device: str, dtype: str, pairs: int, fit_pairs: int, repeats: int,
                     peak_tflops: float) -> dict[str, Any]:
    shape = model_shape(str(folder))
    collect_statistics(model, embedded_contrastive_set("openness", n_pairs=2, seed=8), CollectionConfig(progress=False))
    rates = fit_forward_rates(model, shape, embedded_contrastive_set("openness", n_pairs=fit_pairs, seed=7), device)
    contrastive = embedded_contrastive_set("openness", n_pairs=pairs)
    configs = {"plain": CollectionConfig(progress=False, share_prefix=False),
               "shared": CollectionConfig(progress=False, share_prefix=True)}
    means: dict[str, torch.Tensor] = {}

    def run(name: str) -> Callable[[], None]:
        def collect() -> None:
            means[name] = collect_statistics(model, contrastive, configs[name]).high.mean.double().cpu()
        return collect

    held = reset_memory(device)
    run("plain")()
    plain_peak = peak_memory(device, held)
    seconds = timed_interleaved({name: run(name) for name in configs}, repeats)
    planned = plan_locate(str(folder), ["openness"], pairs, device, dtype)
    result: dict[str, Any] = {"pairs": pairs, "prompts": 2 * pairs, "fit_pairs": fit_pairs, "paths": {},
                              "seconds_per_flop": rates.seconds_per_flop, "seconds_per_call": rates.seconds_per_call,
                              "max_abs_mean_difference": float((means["plain"] - means["shared"]).abs().max()),
                              "peak_bytes": plain_peak, "planned_peak_bytes": planned.stages[1].peak_bytes}
    for name, config in configs.items():
        work = locate_work(model, shape, [contrastive], config, device)
        measured = statistics.median(seconds[name])
        predicted = rates.seconds(work)
        result["paths"][name] = {
            "seconds": measured, "prompts_per_s": 2 * pairs / measured, "calls": work["calls"],
            "tokens_run": work["tokens_run"], "tflops": work["flops"] / measured / 1e12,
            "share_of_peak": work["flops"] / measured / 1e12 / peak_tflops,
            "predicted_seconds": predicted, "predicted_over_measured": predicted / measured}
    result["shared_over_plain_time"] = result["paths"]["shared"]["seconds"] / result["paths"]["plain"]["seconds"]
    return result


def bench_generation(model: Any, raw: Any, device: str, batches: list[int], new_tokens: int, repeats: int
                     ) -> dict[str, Any]:
    """``raw``: a second copy of the model with no bridge component (``perf.common.raw_model``; the bridge's
    ``original_model`` holds its components)."""
    hf_model = raw
    raw_bytes = sum(p.numel() * p.element_size() for p in raw.parameters())
    questions = embedded_contrastive_set("openness", n_pairs=max(batches)).high
    prompts = [encode(model, render_for_model(model, question)) for question in questions]
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    edit = bench_edit(model, max(1, round(EDITED_SHARE * n_layers * d_mlp / (n_layers - n_layers // 2))), 2.0)
    stop = eos_ids(model)
    result: dict[str, Any] = {"new_tokens": new_tokens, "edited_neurons": edit.n_edited, "batches": {}}
    for batch in batches:
        chosen = prompts[:batch]
        outputs: dict[str, list[list[int]]] = {}

        def hf() -> None:
            outputs["hf"] = hf_greedy_batch(hf_model, chosen, new_tokens, stop)   # padded as greedy_generate pads

        def generated(name: str, engine: str | None, edited: bool) -> Callable[[], None]:
            return generation_variant(model, [chosen], new_tokens, engine, edit if edited else None, outputs, name)

        held = reset_memory(device)
        seconds = timed_interleaved({"hf": hf, "default": generated("default", None, False),
                                     "raw_steered": generated("raw_steered", "raw", True),
                                     "raw_sdpa_steered": generated("raw_sdpa_steered", "raw-sdpa", True),
                                     "bridge_steered": generated("bridge_steered", "bridge", True)}, repeats)
        default_steered = f"{default_engine(model_dtype(model)).replace('-', '_')}_steered"
        tokens = {name: sum(map(len, answers)) for name, answers in outputs.items()}
        speed = {name: tokens[name] / statistics.median(times) for name, times in seconds.items()}
        result["batches"][batch] = {
            # the raw copy's weights left out of the GPU's peak: what the toolkit's generation needs
            "tokens_per_s": speed, "tokens": tokens,
            "peak_bytes": peak_memory(device, held) - (raw_bytes if device != "cpu" else 0),
            # the dtype's default engine (bfloat16: "raw") against the raw copy's own generate
            "default_engine": default_engine(model_dtype(model)),
            "unsteered_over_hf": speed["default"] / speed["hf"], "steered_over_hf": speed[default_steered] / speed["hf"],
            "steered_over_unsteered": speed[default_steered] / speed["default"],
            "raw_steered_over_hf": speed["raw_steered"] / speed["hf"],
            "raw_sdpa_steered_over_hf": speed["raw_sdpa_steered"] / speed["hf"],
            "bridge_steered_over_hf": speed["bridge_steered"] / speed["hf"],
            # "raw" is the bridge's arithmetic: must hold in any dtype
            "same_tokens_raw_and_bridge": outputs["raw_steered"] == outputs["bridge_steered"],
            # the raw copy attends through sdpa: equal in float32, not necessarily in bfloat16
            "same_tokens_as_hf": outputs["hf"] == outputs["default"]}
    return result


def bench_architecture(arch: str, args: argparse.Namespace, work_dir: Path, peak_tflops: float) -> dict[str, Any]:
    folder = architecture_folder(arch, Path(args.tokenizer), work_dir, args.scale)
    device = args.device
    held = reset_memory(device)
    started = time.perf_counter()
    model = load_model(str(folder), dtype=args.dtype, device=None if device == "cpu" else device, random_weights=True)
    synchronize(device)
    result: dict[str, Any] = {"arch": arch, "scale": args.scale, "load_seconds": time.perf_counter() - started,
                              "parameters": sum(p.numel() for p in model.parameters()),
                              "memory_is": "GPU allocated" if device != "cpu" else "process RSS growth",
                              "loaded_bytes": (torch.cuda.memory_allocated() if device != "cpu"
                                               else status_bytes("VmRSS") - held)}
    print(f"[{arch}] loaded {result['parameters'] / 1e9:.2f}B parameters in {result['load_seconds']:.1f} s, "
          f"{result['loaded_bytes'] / 1024 ** 3:.2f} GiB", flush=True)
    c = result["collection"] = bench_collection(model, folder, device, args.dtype, args.pairs, args.fit_pairs,
                                                args.repeats, peak_tflops)
    for name, path in c["paths"].items():
        print(f"[{arch} collection {name}] {c['prompts']} prompts in {path['seconds']:.2f} s: {path['prompts_per_s']:.1f} "
              f"prompts/s, {path['tflops']:.1f} TFLOP/s = {path['share_of_peak']:.1%} of {peak_tflops:.0f} | plan "
              f"{path['predicted_seconds']:.2f} s, predicted/measured {path['predicted_over_measured']:.2f} "
              f"({path['calls']} calls, {path['tokens_run']} tokens)", flush=True)
    print(f"[{arch} collection] shared/plain time {c['shared_over_plain_time']:.2f} (sharing pays below 1) | max "
          f"|mean difference| {c['max_abs_mean_difference']:.1e} | peak {c['peak_bytes'] / 1024 ** 3:.2f} GiB "
          f"({result['memory_is']}), planned {c['planned_peak_bytes'] / 1024 ** 3:.2f} GiB", flush=True)
    # the raw copy only now, after collection's memory was read (an 8B model: 16 GB more)
    raw = raw_model(str(folder), args.dtype, device, random_weights=True)
    g = result["generation"] = bench_generation(model, raw, device, args.batches, args.new_tokens, args.repeats)
    del raw
    for batch, row in g["batches"].items():
        speed = row["tokens_per_s"]
        print(f"[{arch} generation batch {batch}] tokens/s: hf {speed['hf']:.1f}, default engine "
              f"({row['default_engine']}) {speed['default']:.1f} | steered/hf {row['steered_over_hf']:.2f} (target "
              f">= 0.9), steered/unsteered {row['steered_over_unsteered']:.2f} | steered/hf by engine: raw "
              f"{row['raw_steered_over_hf']:.2f}, raw-sdpa {row['raw_sdpa_steered_over_hf']:.2f}, bridge's loop "
              f"{row['bridge_steered_over_hf']:.2f} | same tokens: raw and bridge {row['same_tokens_raw_and_bridge']}, "
              f"default and hf {row['same_tokens_as_hf']} | "
              f"peak {row['peak_bytes'] / 1024 ** 3:.2f} GiB ({result['memory_is']})", flush=True)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()
    return result


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(ARCHITECTURES), help="comma-separated: " + ", ".join(ARCHITECTURES))
    parser.add_argument("--tokenizer", default=None,
                        help="a folder with tokenizer files (default: the installed SmolLM2's, 49k tokens)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--pairs", type=int, default=100, help="collection pairs (2 prompts each)")
    parser.add_argument("--fit-pairs", type=int, default=24, help="the plan's sample (dpn-lens plan --measure: 24)")
    parser.add_argument("--batches", default="1,16", help="generation batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the ceiling of the share (default: an 8192^3 bf16 matmul measured here)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def default_tokenizer() -> Path:
    """The installed SmolLM2's converted folder (49,152 tokens: fits both architectures)."""
    from dpn_lens.models import model_source

    return Path(model_source("smollm2-135m-instruct"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.tokenizer = args.tokenizer or str(default_tokenizer())
    LOAD_OPTIONS.device = args.device           # perf.common's timing synchronises this device
    peak = args.peak_tflops or matmul_tflops(args.device, 8192 if args.device != "cpu" else 512)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
                               "dtype": args.dtype, "torch": torch.__version__, "peak_tflops": peak,
                               "peak_is": "given" if args.peak_tflops else "measured bf16 matmul",
                               "architectures": {}}
    print(f"[device] {results['device']}, torch {torch.__version__}, bf16 matmul peak {peak:.1f} TFLOP/s "
          f"({results['peak_is']})", flush=True)
    with tempfile.TemporaryDirectory() as work_dir:
        for arch in args.arch.split(","):
            results["architectures"][arch] = bench_architecture(arch, args, Path(work_dir), peak)
            if args.json:        # after each architecture: a later one that fails keeps the earlier's numbers
                Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
