"""The generation engines' answers beside the bridge's loop (issue 25), side by side in one run.

``greedy_generate`` can generate through the raw Hugging Face modules (``engine="raw"``, with the attention the
bridge sets, the default in half precision; ``"raw-sdpa"``, with ``scaled_dot_product_attention``, the default
in float32) or through TransformerLens's loop (``"bridge"``). This benchmark answers ``--prompts`` embedded role-play prompts with ``--new-tokens``
greedy tokens each, in batches of ``--batch``, with every engine, unsteered and inside ``steer`` with a
DPN-LE-shaped decode-only edit, and with the judge's repetition penalty (``--penalty``), then prints per engine:

* answers identical to the bridge's loop's, of all, and their mean common prefix in tokens;
* its speed beside the bridge's loop (median over ``--repeats`` of the per-repeat ratio, engines interleaved).

``"raw"`` must give the bridge's answers in every dtype (the same arithmetic). ``"raw-sdpa"`` is the default
in float32 because it gave them there; in bfloat16 it differs as bfloat16's rounding does.

Usage::

    python benchmarks/bench_engines.py --model gemma-3-270m --dtype bfloat16
    python benchmarks/bench_engines.py --model smollm2-135m-instruct --dtype float32
    python benchmarks/bench_engines.py --model tiny --prompts 4 --new-tokens 4 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))          # perf/ beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # the package beside benchmarks/

from perf.common import bench_edit, generation_variant, interleaved, load, ratio  # noqa: E402
from dpn_lens import embedded_contrastive_set  # noqa: E402
from dpn_lens.data.prompts import render_for_model  # noqa: E402
from dpn_lens.generation import ENGINES  # noqa: E402

REFERENCE = "bridge"


def common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens two answers share from their start.

    Example:
        >>> common_prefix([1, 2, 3], [1, 2, 4, 5])
        2
    """
    return next((index for index, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare_engines(model: Any, n_prompts: int, new_tokens: int, batch: int, penalty: float, repeats: int
                    ) -> dict[str, Any]:
    questions = embedded_contrastive_set("openness", n_pairs=n_prompts).high
    prompts = [model.tokenizer(render_for_model(model, q), add_special_tokens=False)["input_ids"] for q in questions]
    edit = bench_edit(model, 8, 2.0)
    answers: dict[str, list[list[int]]] = {}

    def generated(name: str, engine: str, edited: bool) -> Callable[[], None]:
        return generation_variant(model, [prompts], new_tokens, engine, edit if edited else None, answers, name,
                                  batch_size=batch, penalty=penalty)

    variants = {f"{engine} {condition}": generated(f"{engine} {condition}", engine, condition == "steered")
                for condition in ("unsteered", "steered") for engine in ENGINES}
    times = interleaved(variants, repeats, warmup=False)
    result: dict[str, Any] = {"prompts": n_prompts, "new_tokens": new_tokens, "batch": batch, "penalty": penalty,
                              "engines": {}}
    for condition in ("unsteered", "steered"):
        reference = answers[f"{REFERENCE} {condition}"]
        for engine in ENGINES:
            name = f"{engine} {condition}"
            result["engines"][name] = {
                "identical": sum(a == b for a, b in zip(answers[name], reference)), "of": len(reference),
                "mean_common_prefix": sum(map(common_prefix, answers[name], reference)) / len(reference),
                "speed_vs_bridge_wall": 1 / ratio(times, name, f"{REFERENCE} {condition}", "wall")}
    result["steering_changed_answers"] = answers[f"{REFERENCE} unsteered"] != answers[f"{REFERENCE} steered"]
    return result


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m", help="a load_model name, or 'tiny'")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--penalty", type=float, default=1.15, help="repetition penalty (the judge's 1.15)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load(args.model, args.dtype)
    result = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
              **compare_engines(model, args.prompts, args.new_tokens, args.batch, args.penalty, args.repeats)}
    for name, row in result["engines"].items():
        print(f"[engines {args.model} {args.dtype}] {name}: {row['identical']} of {row['of']} answers identical to "
              f"the bridge's loop (mean common prefix {row['mean_common_prefix']:.1f} of <= {args.new_tokens} "
              f"tokens), speed vs the bridge's loop {row['speed_vs_bridge_wall']:.2f} | {args.prompts} prompts, batch "
              f"{args.batch}, penalty {args.penalty}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
