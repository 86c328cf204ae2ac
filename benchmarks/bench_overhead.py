"""The toolkit's overhead over the raw Hugging Face model (issue 25), measured side by side in one run.

What a user pays for TransformerLens hook names, on the same device, dtype, weights and tokens. The raw model
is a second, separately loaded copy (``load_hf_model``; the tiny model rebuilt from its seed): the bridge
replaces the modules of the model it wraps by its own components, so ``bridge.original_model`` is not raw
(before session 25 this benchmark compared against it, and its "HF" numbers carried the bridge's wrappers).

* ``generation``: greedy KV-cached generation of the same prompts at each ``--batches`` size (left-padded as
  ``greedy_generate`` pads, each row with its own first token), seconds of
  - ``hf``: the raw model's own ``generate``, unsteered;
  - ``hf_steered``: the same with the edit as plain ``register_forward_pre_hook``s on each edited layer's
    ``down_proj`` (its input is ``blocks.{l}.mlp.hook_post``), added at decode steps only;
  - ``hf_eager_steered``: the same with the attention the bridge sets ("eager");
  - ``default``: ``dpn_lens.generation.greedy_generate`` on the TransformerBridge, unsteered, with the engine
    the dtype chooses (``generation.default_engine``: ``"raw-sdpa"`` in float32, ``"raw"`` otherwise);
  - ``raw_steered``, ``raw_sdpa_steered``, ``bridge_steered``: inside ``steer(model, edit)`` (decode-only
    ``Intervention``), as users run it, with each engine (``"bridge"``: TransformerLens's loop, the only one
    before session 26); the default engine's is the target's ``default_steered``.
  The tokens of ``"raw"`` must be the bridge's loop's (the same arithmetic), and in float32 those of the raw
  copy and of every engine must be the same.
* ``collection``: statistics of the last prompt token at every layer's ``hook_post``:
  - ``hf_hooks``: the prompts tokenised and batched as collect batches them, then the raw model's forward with
    pre-hooks on every ``down_proj`` accumulating sum and sum of squares (float64) at each prompt's last token;
  - ``collect``: ``collect_group_statistics`` with ``share_prefix=False`` (the same tokens);
  - ``collect_default``: with the default settings (shared prefixes where they pay off).
  The means must agree to 1e-5 (float32). Also printed: their difference from the raw copy with the bridge's
  eager attention (0 where the arithmetic is the same).

Targets (issue 25): the default engine's steered generation at least 0.9x ``hf``'s speed at batch 1 and 16;
``collect`` at least 0.9x ``hf_hooks``'s speed.

Usage::

    python benchmarks/bench_overhead.py                                  # SmolLM2, float32, CPU
    python benchmarks/bench_overhead.py --model gemma-3-270m
    python benchmarks/bench_overhead.py --model tiny --repeats 1 --prompts 1 --new-tokens 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))          # bench_perf's perf/ beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the package beside benchmarks/

from perf.common import (LOAD_OPTIONS, batches, bench_edit, generation_variant, interleaved, load, median, ratio,  # noqa: E402
                         raw_model)
from dpn_lens import Intervention, embedded_contrastive_set  # noqa: E402
from dpn_lens.generation import default_engine, eos_ids, hf_greedy_batch, model_dtype  # noqa: E402
from dpn_lens.collection.collect import CollectionConfig, collect_group_statistics  # noqa: E402
from dpn_lens.data.prompts import render_for_model  # noqa: E402
from dpn_lens.hooked import decoder_layers, pad_token_id, tokenize_compact  # noqa: E402


STEERED_ENGINES = {"raw": "raw", "raw_sdpa": "raw-sdpa", "bridge": "bridge"}
"""Each engine timed steered: variant name -> ``greedy_generate``'s ``engine``."""


def _hf_pre_hooks(hf_model: Any, edit: Intervention) -> list[Any]:
    """The edit as plain PyTorch pre-hooks on ``down_proj`` (decode steps: one new token)."""
    handles = []
    for layer, delta in edit.deltas.items():
        def hook(module: Any, args: tuple, delta: torch.Tensor = delta) -> tuple | None:
            (hidden,) = args
            if hidden.shape[1] != 1:
                return None
            return (hidden + delta.to(hidden.device, hidden.dtype),)
        handles.append(decoder_layers(hf_model)[layer].mlp.down_proj.register_forward_pre_hook(hook))
    return handles


def bench_generation(model: Any, raw: Any, n_prompts: int, new_tokens: int, repeats: int, neurons_per_layer: int,
                     batches: list[int]) -> dict[str, Any]:
    prompts = embedded_contrastive_set("openness", n_pairs=max(n_prompts, *batches)).high
    token_lists = [model.tokenizer(render_for_model(model, p), add_special_tokens=False)["input_ids"]
                   for p in prompts]
    edit = bench_edit(model, neurons_per_layer, 2.0)
    stop = eos_ids(model)
    engine_name = default_engine(model_dtype(model))
    default = engine_name.replace("-", "_")
    result: dict[str, Any] = {"prompts": n_prompts, "new_tokens": new_tokens, "edited_layers": sorted(edit.deltas),
                              "batches": {}}
    for batch in batches:
        # batch 1: ``n_prompts`` prompts one at a time; larger: one batch of the longest prompts
        groups = ([[tokens] for tokens in token_lists[:n_prompts]] if batch == 1
                  else [sorted(token_lists, key=len, reverse=True)[:batch]])
        outputs: dict[str, list[list[int]]] = {}

        def hf(name: str = "hf") -> None:
            outputs[name] = [answer for group in groups for answer in hf_greedy_batch(raw, group, new_tokens, stop)]

        def hf_steered_as(name: str) -> None:
            handles = _hf_pre_hooks(raw, edit)
            try:
                hf(name)
            finally:
                for handle in handles:
                    handle.remove()

        def hf_steered() -> None:
            hf_steered_as("hf_steered")

        def hf_eager_steered() -> None:
            # the raw copy with the attention the bridge sets: the kernels engine "raw" runs, without its hooks
            held = raw.config._attn_implementation
            raw.set_attn_implementation("eager")
            try:
                hf_steered_as("hf_eager_steered")
            finally:
                raw.set_attn_implementation(held)

        def generated(name: str, engine: str | None, edited: bool) -> Callable[[], None]:
            return generation_variant(model, groups, new_tokens, engine, edit if edited else None, outputs, name)

        times = interleaved({"hf": hf, "hf_steered": hf_steered, "hf_eager_steered": hf_eager_steered,
                             "default": generated("default", None, False),
                             **{f"{name}_steered": generated(f"{name}_steered", engine, True)
                                for name, engine in STEERED_ENGINES.items()}}, repeats)
        times["default_steered"] = times[f"{default}_steered"]
        outputs["default_steered"] = outputs[f"{default}_steered"]
        row: dict[str, Any] = {
            "rows": sum(map(len, groups)), "tokens": sum(map(len, outputs["hf"])), "default_engine": engine_name,
            "median_wall_s": {name: median(t["wall"]) for name, t in times.items()},
            # "raw" is the bridge's arithmetic: its tokens in every dtype
            "same_tokens_raw_and_bridge": outputs["raw_steered"] == outputs["bridge_steered"],
            # against the raw copy (sdpa) and between engines, equality is float32's
            "same_tokens_unsteered": outputs["hf"] == outputs["default"],
            "same_tokens_steered": outputs["hf_steered"] == outputs["default_steered"],
            "same_tokens_all_engines_steered": all(outputs[f"{name}_steered"] == outputs["hf_steered"]
                                                   for name in (*STEERED_ENGINES, "hf_eager")),
            "steering_changed_tokens": outputs["hf"] != outputs["hf_steered"]}
        for clock in ("wall", "cpu"):
            row[f"speed_vs_hf_{clock}"] = {f"{name}/hf": 1 / ratio(times, name, "hf", clock)
                                           for name in times if name != "hf"}
            # "raw" beside the raw copy with the same attention: what the hooks and the engine cost, kernels aside
            row[f"speed_vs_hf_{clock}"]["raw_steered/hf_eager_steered"] = 1 / ratio(
                times, "raw_steered", "hf_eager_steered", clock)
        result["batches"][batch] = row
    return result


def bench_collection(model: Any, raw: Any, n_prompts: int, batch_size: int, repeats: int) -> dict[str, Any]:
    hf_model = raw
    prompts = embedded_contrastive_set("extraversion", n_pairs=n_prompts).high
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers))
    token_arrays = tokenize_compact(model, prompts)
    device = torch.device(model.cfg.device or "cpu")
    found: dict[str, Any] = {}

    def hf_hooks() -> None:
        total = torch.zeros(n_layers, int(model.cfg.d_mlp), dtype=torch.float64)
        squares = torch.zeros_like(total)
        state: dict[str, torch.Tensor] = {}

        def reader(layer: int):
            def hook(module: Any, args: tuple) -> None:
                last = args[0][torch.arange(args[0].shape[0]), state["last"]].double().cpu()
                total[layer] += last.sum(0)
                squares[layer] += (last * last).sum(0)
            return hook

        handles = [decoder_layers(hf_model)[layer].mlp.down_proj.register_forward_pre_hook(reader(layer))
                   for layer in layers]
        try:
            with torch.inference_mode():
                # Tokenised here too: collect starts from text, so the raw route does as well.
                arrays = tokenize_compact(model, prompts)
                for input_ids, mask in batches(arrays, batch_size, pad_token_id(model.tokenizer), "right", device):
                    state["last"] = mask.sum(1) - 1            # right padding: the last real token
                    hf_model(input_ids=input_ids, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
        found["hf_mean"] = total / len(prompts)

    plain = CollectionConfig(layers, max_batch_size=batch_size, max_batch_tokens=1 << 30, progress=False,
                             share_prefix=False)
    default = CollectionConfig(layers, max_batch_size=batch_size, progress=False)

    def collect() -> None:
        found["collect_mean"] = collect_group_statistics(model, prompts, plain).mean.cpu()

    def collect_default() -> None:
        collect_group_statistics(model, prompts, default)

    times = interleaved({"hf_hooks": hf_hooks, "collect": collect, "collect_default": collect_default}, repeats)
    # Untimed: the raw copy with the bridge's attention ("eager"), to tell the kernels' rounding from the hooks'.
    sdpa_mean, held = found["hf_mean"], hf_model.config._attn_implementation
    hf_model.set_attn_implementation("eager")
    try:
        hf_hooks()
    finally:
        hf_model.set_attn_implementation(held)
    eager_mean, found["hf_mean"] = found["hf_mean"], sdpa_mean
    n_tokens = sum(len(ids) for ids in token_arrays)
    result = {
        "prompts": n_prompts, "tokens": n_tokens, "batch_size": batch_size,
        "median_wall_s": {name: median(t["wall"]) for name, t in times.items()},
        "max_abs_mean_difference": float((found["hf_mean"] - found["collect_mean"].double()).abs().max()),
        "max_abs_mean_difference_eager": float((eager_mean - found["collect_mean"].double()).abs().max()),
    }
    for clock in ("wall", "cpu"):
        result[f"speed_vs_hf_{clock}"] = {
            "collect/hf_hooks": 1 / ratio(times, "collect", "hf_hooks", clock),
            "collect_default/hf_hooks": 1 / ratio(times, "collect_default", "hf_hooks", clock),
        }
    return result


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a load_model name, or 'tiny'")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--random-weights", action="store_true", help="the architecture with seeded random weights")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=3, help="generation prompts at batch 1 (one at a time)")
    parser.add_argument("--batches", default="1,16", help="generation batch sizes (comma-separated)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--neurons", type=int, default=8, help="edited neurons per layer")
    parser.add_argument("--collect-prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    LOAD_OPTIONS.device, LOAD_OPTIONS.random_weights = args.device, args.random_weights
    model = load(args.model, args.dtype)
    raw = raw_model(args.model, args.dtype, args.device, args.random_weights)
    results: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "device": args.device,
                               "threads": torch.get_num_threads(), "repeats": args.repeats}
    batch_sizes = [int(b) for b in args.batches.split(",")]
    g = results["generation"] = bench_generation(model, raw, args.prompts, args.new_tokens, args.repeats,
                                                 args.neurons, batch_sizes)
    for batch, row in g["batches"].items():
        s = row["speed_vs_hf_wall"]
        print(f"[generation {args.model} {args.dtype} {args.device}] batch {batch}, {row['rows']} prompts, "
              f"{row['tokens']} greedy tokens: raw hf {row['median_wall_s']['hf']:.2f}s, default engine "
              f"({row['default_engine']}) steered {row['median_wall_s']['default_steered']:.2f}s | speed vs raw hf "
              f"(wall): default engine {s['default/hf']:.2f}, steered {s['default_steered/hf']:.2f} (target >= 0.9) | "
              f"steered: raw {s['raw_steered/hf']:.2f} (beside raw hf with its eager attention "
              f"{s['raw_steered/hf_eager_steered']:.2f}), raw-sdpa {s['raw_sdpa_steered/hf']:.2f}, bridge's loop "
              f"{s['bridge_steered/hf']:.2f}, raw hf {s['hf_steered/hf']:.2f}, raw hf eager "
              f"{s['hf_eager_steered/hf']:.2f} | same tokens: raw and bridge {row['same_tokens_raw_and_bridge']}, "
              f"default and raw hf {row['same_tokens_unsteered']} / steered {row['same_tokens_steered']}, all "
              f"engines steered {row['same_tokens_all_engines_steered']}", flush=True)
    c = results["collection"] = bench_collection(model, raw, args.collect_prompts, args.batch_size, args.repeats)
    s = c["speed_vs_hf_wall"]
    print(f"[collection {args.model} {args.dtype} {args.device}] {c['prompts']} prompts ({c['tokens']} tokens), batch "
          f"{c['batch_size']}: raw hf hooks {c['median_wall_s']['hf_hooks']:.2f}s, collect {c['median_wall_s']['collect']:.2f}s "
          f"| speed vs raw hf (wall): collect {s['collect/hf_hooks']:.2f} (target >= 0.9), collect with defaults "
          f"{s['collect_default/hf_hooks']:.2f} | max |mean difference| {c['max_abs_mean_difference']:.1e} (raw hf with the "
          f"bridge's eager attention: {c['max_abs_mean_difference_eager']:.1e})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
