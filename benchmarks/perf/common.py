"""What every section of ``bench_perf.py`` shares: loading the model (``load``, ``LOAD_OPTIONS``), timing
variants side by side (``interleaved``, ``ratio``, ``median``), the process's memory (``status_kib``,
``reset_peak_rss``, ``model_footprint_bytes``), the prompts and batches (``batches``, ``short_prompts``),
the naive statistics route (``_naive_statistics``), the benchmark edit (``bench_edit``) and a raw copy of the
model (``raw_model``).

``benchmarks/bench_cards.py`` and ``benchmarks/bench_overhead.py`` import their loader and timers from here.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dpn_lens import Intervention
from dpn_lens.hooked import pad_token_lists
from dpn_lens.plan import reset_peak, status_bytes


@dataclass
class LoadOptions:
    """How every section loads its model (set once from the command line by ``main``)."""

    device: str = "cpu"
    random_weights: bool = False


LOAD_OPTIONS = LoadOptions()


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (``VmRSS`` now, ``VmHWM`` the peak); a RuntimeError off Linux."""
    return status_bytes(field, required=True) // 1024


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next reading covers only what follows."""
    reset_peak(required=True)


def model_footprint_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def synchronize(device: str | None = None) -> None:
    """Wait for queued GPU work on ``device`` (None: ``LOAD_OPTIONS.device``), so that a clock reading covers it
    (a no-op on the CPU)."""
    if (device or LOAD_OPTIONS.device) != "cpu" and torch.cuda.is_available():
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
            synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name]()
            synchronize()
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


def raw_model(spec: str, dtype: str, device: str, random_weights: bool) -> Any:
    """A second copy of the model as Hugging Face loads it, with no bridge component in it (same weights:
    the same file, or the same seed)."""
    if spec == TINY:
        from dpn_lens.tiny import build_tiny_hf_model

        raw = build_tiny_hf_model(max_positions=512)[0].to(getattr(torch, dtype))
    else:
        from dpn_lens.models import load_hf_model

        raw = load_hf_model(spec, dtype=dtype, device=None if device == "cpu" else device,
                            random_weights=random_weights)[0]
    wrapped = [type(module).__name__ for module in raw.modules() if type(module).__name__.endswith("Bridge")]
    if wrapped:
        raise RuntimeError(f"the raw model holds bridge components ({wrapped[0]}); load a fresh copy")
    return raw.to(device).eval()


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


def generation_variant(model: Any, groups: list[list[list[int]]], new_tokens: int, engine: str, edit: Any,
                       outputs: dict[str, list[list[int]]], name: str, batch_size: int | None = None,
                       penalty: float = 1.0) -> Callable[[], None]:
    """A variant to time: ``greedy_generate`` with ``engine`` on each group of prompts (one batch per group, or
    ``batch_size`` prompts at a time), inside ``steer(model, edit)`` (``None``: unsteered); the answers of every
    group, in order, go to ``outputs[name]``."""
    from dpn_lens import steer
    from dpn_lens.generation import greedy_generate

    def run() -> None:
        with steer(model, edit):
            outputs[name] = [answer for group in groups
                             for answer in greedy_generate(model, group, new_tokens, batch_size=batch_size or len(group),
                                                           repetition_penalty=penalty, engine=engine)]
    return run


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
