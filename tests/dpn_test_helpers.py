"""Helpers shared by the test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np
import torch

from conftest import TINY_WORDS


def random_prompts(seed: int, n: int, min_words: int = 3, max_words: int = 25) -> list[str]:
    """Prompts of varied length from the tiny model's vocabulary (so padding really happens)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(TINY_WORDS, size=int(rng.integers(min_words, max_words + 1))))
            for _ in range(n)]


def attached_hooks(model) -> int:
    """Number of forward/backward hooks on any module of ``model`` (hook points and plain modules)."""
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
               for module in model.modules())


def raw_last_token_activations(model, prompts: list[str], layers: list[int]) -> np.ndarray:
    """``[n_prompts, n_layers, d_mlp]`` float64, read independently of dpn_lens: one unpadded
    ``run_with_cache`` per prompt, ``blocks.{l}.mlp.hook_post`` at the last token."""
    names = [f"blocks.{layer}.mlp.hook_post" for layer in layers]
    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([model.tokenizer(prompt)["input_ids"]])
            _, cache = model.run_with_cache(ids, names_filter=lambda name: name in names)
            rows.append(np.stack([cache[name][0, -1].double().cpu().numpy() for name in names]))
    return np.stack(rows)


def numpy_s_and_d(high: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The method's s and Cohen's d (pooled unbiased variances, +1e-8 in the root, NaN -> 0)."""
    n_h, n_l = high.shape[0], low.shape[0]
    s = high.mean(axis=0) - low.mean(axis=0)
    pooled = ((n_h - 1) * high.var(axis=0, ddof=1) + (n_l - 1) * low.var(axis=0, ddof=1)) / (n_h + n_l - 2)
    d = np.nan_to_num(s / np.sqrt(pooled + 1e-8), nan=0.0)
    return s, d


def brute_force_selection(s: np.ndarray, d: np.ndarray, q: float, tau_d: float) -> tuple[list[int], list[int], float]:
    """Per-neuron python loop over one layer, threshold from ``np.quantile``."""
    tau_q = float(np.quantile(np.abs(s), q))
    high, low = [], []
    for neuron in range(s.shape[0]):
        if abs(s[neuron]) > tau_q:
            if d[neuron] > tau_d:
                high.append(neuron)
            elif d[neuron] < -tau_d:
                low.append(neuron)
    return high, low, tau_q
