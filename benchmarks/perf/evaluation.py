"""The ``evaluation`` section: ``evaluation.judge.generate_answers`` (greedy, repetition penalty 1.15, the
judge's generation) one question at a time (``batch_size=1``) vs in left-padded batches: answered
questions/s of each, their ratio, and whether the answers are identical.
"""

from __future__ import annotations

import argparse
import gc
from typing import Any, Callable

import torch

from dpn_lens import embedded_contrastive_set
from dpn_lens.evaluation.judge import generate_answers

from .common import interleaved, load, median, ratio


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
