"""The ``steering`` section: greedy KV-cached generation tokens/s, steered vs unsteered (the edit on the
decode steps only, and on every position), with ``bench_edit``'s DPN-LE-shaped edit.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from dpn_lens import embedded_contrastive_set, steer
from dpn_lens.data.prompts import render_for_model

from .common import bench_edit, interleaved, load, median, ratio


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


def run_steering(args: argparse.Namespace) -> dict[str, Any]:
    r = bench_steering(args.model, "float32", args.steer_prompts, args.steer_tokens, args.repeats,
                       args.steer_neurons)
    w, c = r["speed_ratio_wall"], r["speed_ratio_cpu"]
    print(f"[steering] {r['prompts']} x {r['new_tokens']} greedy tokens, unsteered "
          f"{r['tokens_per_s_wall']['unsteered']:.1f} tok/s | steered(decode)/unsteered speed wall "
          f"{w['steered_decode/unsteered']:.3f} cpu {c['steered_decode/unsteered']:.3f} | steered(all) wall "
          f"{w['steered_all/unsteered']:.3f} cpu {c['steered_all/unsteered']:.3f} (target >= 0.95)", flush=True)
    return r
