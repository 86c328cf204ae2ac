"""The toolkit's overhead over the raw Hugging Face model (issue 25), measured side by side in one run.

What a user pays for TransformerLens hook names, on the same model object, device, dtype and tokens:

* ``generation``: greedy KV-cached generation at batch 1, tokens/s, of
  - ``hf``: the raw model's own ``generate`` (``bridge.original_model``), unsteered;
  - ``hf_steered``: the same with the edit as plain ``register_forward_pre_hook``s on each edited layer's
    ``down_proj`` (its input is ``blocks.{l}.mlp.hook_post``), added at decode steps only;
  - ``bridge``: ``model.generate`` of the TransformerBridge, unsteered;
  - ``bridge_steered``: the same inside ``steer(model, edit)`` (decode-only ``Intervention``), as users run it.
  The tokens of ``hf`` and ``bridge`` must be identical, and those of ``hf_steered`` and ``bridge_steered``.
* ``collection``: statistics of the last prompt token at every layer's ``hook_post``:
  - ``hf_hooks``: the prompts tokenised and batched as collect batches them, then the raw model's forward with
    pre-hooks on every ``down_proj`` accumulating sum and sum of squares (float64) at each prompt's last token;
  - ``collect``: ``collect_group_statistics`` with ``share_prefix=False`` (the same tokens);
  - ``collect_default``: with the default settings (shared prefixes where they pay off).
  The means must agree to 1e-5 (float32).

Targets (issue 25): ``bridge_steered`` at least 0.9x ``hf``'s tokens/s; ``collect`` at least 0.9x ``hf_hooks``'s
speed.

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
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))          # bench_perf's perf/ beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the package beside benchmarks/

from perf.common import LOAD_OPTIONS, batches, bench_edit, interleaved, load, median, ratio  # noqa: E402
from dpn_lens import Intervention, embedded_contrastive_set, steer  # noqa: E402
from dpn_lens.collection.collect import CollectionConfig, collect_group_statistics  # noqa: E402
from dpn_lens.data.prompts import render_for_model  # noqa: E402
from dpn_lens.hooked import decoder_layers, pad_token_id, tokenize_compact  # noqa: E402


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


def bench_generation(model: Any, n_prompts: int, new_tokens: int, repeats: int, neurons_per_layer: int
                     ) -> dict[str, Any]:
    hf_model = model.original_model
    prompts = embedded_contrastive_set("openness", n_pairs=n_prompts).high
    device = torch.device(model.cfg.device or "cpu")
    tokens = [model.tokenizer(render_for_model(model, p), add_special_tokens=False,
                              return_tensors="pt")["input_ids"].to(device) for p in prompts]
    edit = bench_edit(model, neurons_per_layer, 2.0)
    pad = pad_token_id(model.tokenizer)
    outputs: dict[str, list[list[int]]] = {}

    def hf(name: str = "hf") -> None:
        with torch.inference_mode():
            outputs[name] = [hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                                               )[0, ids.shape[1]:].tolist() for ids in tokens]

    def hf_steered() -> None:
        handles = _hf_pre_hooks(hf_model, edit)
        try:
            hf("hf_steered")
        finally:
            for handle in handles:
                handle.remove()

    def bridge(name: str = "bridge") -> None:
        outputs[name] = [model.generate(ids, max_new_tokens=new_tokens, stop_at_eos=False, do_sample=False,
                                        use_past_kv_cache=True, verbose=False)[0, ids.shape[1]:].tolist()
                         for ids in tokens]

    def bridge_steered() -> None:
        with steer(model, edit):
            bridge("bridge_steered")

    times = interleaved({"hf": hf, "hf_steered": hf_steered, "bridge": bridge, "bridge_steered": bridge_steered},
                        repeats)
    n_new = n_prompts * new_tokens
    result = {
        "prompts": n_prompts, "new_tokens": new_tokens, "batch": 1, "edited_layers": sorted(edit.deltas),
        "tokens_per_s_wall": {name: n_new / median(t["wall"]) for name, t in times.items()},
        "tokens_per_s_cpu": {name: n_new / median(t["cpu"]) for name, t in times.items()},
        "same_tokens_unsteered": outputs["hf"] == outputs["bridge"],
        "same_tokens_steered": outputs["hf_steered"] == outputs["bridge_steered"],
        "steering_changed_tokens": outputs["hf"] != outputs["hf_steered"],
    }
    for clock in ("wall", "cpu"):
        result[f"speed_vs_hf_{clock}"] = {
            "bridge/hf": 1 / ratio(times, "bridge", "hf", clock),
            "bridge_steered/hf": 1 / ratio(times, "bridge_steered", "hf", clock),
            "bridge_steered/hf_steered": 1 / ratio(times, "bridge_steered", "hf_steered", clock),
        }
    return result


def bench_collection(model: Any, n_prompts: int, batch_size: int, repeats: int) -> dict[str, Any]:
    hf_model = model.original_model
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
    n_tokens = sum(len(ids) for ids in token_arrays)
    result = {
        "prompts": n_prompts, "tokens": n_tokens, "batch_size": batch_size,
        "median_wall_s": {name: median(t["wall"]) for name, t in times.items()},
        "max_abs_mean_difference": float((found["hf_mean"] - found["collect_mean"].double()).abs().max()),
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
    parser.add_argument("--prompts", type=int, default=3, help="generation prompts (batch 1 each)")
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
    results: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "device": args.device,
                               "threads": torch.get_num_threads(), "repeats": args.repeats}
    g = results["generation"] = bench_generation(model, args.prompts, args.new_tokens, args.repeats, args.neurons)
    s = g["speed_vs_hf_wall"]
    print(f"[generation {args.model} {args.dtype} {args.device}] batch 1, {g['prompts']} x {g['new_tokens']} greedy "
          f"tokens: hf {g['tokens_per_s_wall']['hf']:.1f} tok/s, bridge {g['tokens_per_s_wall']['bridge']:.1f}, "
          f"bridge steered {g['tokens_per_s_wall']['bridge_steered']:.1f} | speed vs hf (wall): bridge "
          f"{s['bridge/hf']:.2f}, bridge steered {s['bridge_steered/hf']:.2f} (target >= 0.9), steered vs hf steered "
          f"{s['bridge_steered/hf_steered']:.2f} | same tokens: unsteered {g['same_tokens_unsteered']}, steered "
          f"{g['same_tokens_steered']}", flush=True)
    c = results["collection"] = bench_collection(model, args.collect_prompts, args.batch_size, args.repeats)
    s = c["speed_vs_hf_wall"]
    print(f"[collection {args.model} {args.dtype} {args.device}] {c['prompts']} prompts ({c['tokens']} tokens), batch "
          f"{c['batch_size']}: hf hooks {c['median_wall_s']['hf_hooks']:.2f}s, collect {c['median_wall_s']['collect']:.2f}s "
          f"| speed vs hf (wall): collect {s['collect/hf_hooks']:.2f} (target >= 0.9), collect with defaults "
          f"{s['collect_default/hf_hooks']:.2f} | max |mean difference| {c['max_abs_mean_difference']:.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
