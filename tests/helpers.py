"""Builders shared by the test files: plain functions and constants, no fixtures (those live in conftest.py).

Every test file imports them the same way, ``from helpers import ...`` (conftest.py puts ``tests/`` on
``sys.path``). No test imports ``conftest`` or another test module.

- tiny models: ``build_tiny_model`` / ``build_tiny_hf_model`` / ``build_tiny_tokenizer`` (from
  ``dpn_lens.tiny``, so the benchmark script builds the same model without importing tests) and
  ``build_letter_model`` (option letters and Yes/No in the vocabulary, for the evaluation metrics);
- prompts: ``TINY_WORDS``, ``TINY_HIGH`` / ``TINY_LOW``, ``random_prompts``;
- independent references: ``raw_last_token_activations``, ``numpy_s_and_d``, ``brute_force_selection``,
  ``attached_hooks``;
- edits and tokens for the evaluation tests: ``ForceToken``, ``token``;
- constructed neuron maps and statistics for the studies: ``make_map``, ``make_stats``, ``random_stats``;
- the doctest policy of conftest.py: ``has_runnable_example``.
"""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import torch

from dpn_lens import ContrastStatistics, GroupStatistics, LocalizationSettings, NeuronMap
from dpn_lens.hooked import encode
from dpn_lens.traits import TRAITS
from dpn_lens.tiny import TINY_PUNCTUATION, TINY_WORDS, build_tiny_hf_model, build_tiny_model, build_tiny_tokenizer

__all__ = [
    "TINY_WORDS", "TINY_PUNCTUATION", "TINY_HIGH", "TINY_LOW", "LETTER_WORDS", "FINGERPRINT",
    "build_tiny_tokenizer", "build_tiny_hf_model", "build_tiny_model", "build_letter_model",
    "random_prompts", "attached_hooks", "raw_last_token_activations", "numpy_s_and_d", "brute_force_selection",
    "ForceToken", "token", "make_map", "make_stats", "random_stats", "has_runnable_example", "write_personalitybench",
]

# --- tiny models and prompts ------------------------------------------------------------------------

TINY_HIGH = [
    "you are outgoing and kind . what would you do on the weekend ?",
    "you are a person who loves new ideas . how would you feel about a party ?",
    "you are outgoing . a friend invites you to a party . what would you do ?",
    "you are kind and calm . how do you plan money ?",
    "you are outgoing and loves travel . what would you do at home ?",
    "you are a person who loves art . how would you feel about work ?",
]
TINY_LOW = [
    "you are reserved and quiet . what would you do on the weekend ?",
    "you are a person who prefers routine . how would you feel about a party ?",
    "you are reserved . a friend invites you to a party . what would you do ?",
    "you are anxious and worried . how do you plan money ?",
    "you are quiet and prefers home . what would you do at home ?",
    "you are blunt and careless . how would you feel about work ?",
]

LETTER_WORDS = "A B C D E Yes No yes no I am the life of party quiet cat sat on mat dog ran home Given statement".split()


def build_letter_model(folder: Path, seed: int = 0):
    """A tiny random Llama whose word-level vocabulary holds the option letters and Yes/No."""
    return build_tiny_model(folder, seed, n_layers=2, name="letters", max_positions=256, words=LETTER_WORDS,
                            punctuation=(".", ",", "?", ":", "(", ")", '"'))


def random_prompts(seed: int, n: int, min_words: int = 3, max_words: int = 25) -> list[str]:
    """Prompts of varied length from the tiny model's vocabulary (so padding really happens)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(TINY_WORDS, size=int(rng.integers(min_words, max_words + 1))))
            for _ in range(n)]


# --- references computed independently of dpn_lens ---------------------------------------------------

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


# --- edits and tokens for the evaluation tests --------------------------------------------------------

class ForceToken:
    """An edit that adds a large logit to one token at every position (interface of a baseline).

    It has the whole ``Edit`` interface of ``dpn_lens.steering`` (``at_positions``, ``-edit``,
    ``gamma * edit``), so ``steer`` accepts it like any method's edit.
    """

    label = "force"
    n_edited = 0

    def __init__(self, token_id: int, amount: float = 100.0, positions: str = "all"):
        self.token_id, self.amount, self.positions = token_id, amount, positions

    def fwd_hooks(self):
        def hook(logits, hook):
            if self.positions == "decode" and logits.shape[1] != 1:
                return logits
            logits = logits.clone()
            logits[..., self.token_id] += self.amount
            return logits
        return [("unembed.hook_out", hook)]

    def at_positions(self, positions: str) -> "ForceToken":
        return ForceToken(self.token_id, self.amount, positions)

    def __neg__(self) -> "ForceToken":
        return ForceToken(self.token_id, -self.amount, self.positions)

    def __mul__(self, gamma: float) -> "ForceToken":
        return ForceToken(self.token_id, gamma * self.amount, self.positions)

    __rmul__ = __mul__


def token(model, word):
    """The single token id of ``word`` (no BOS)."""
    return encode(model, word, add_bos=False)[0]


# --- constructed neuron maps and statistics for the studies --------------------------------------------

FINGERPRINT = {"architecture": "Constructed", "n_layers": 6, "d_mlp": 20, "d_model": 8, "tokenizer": "t", "weights": "w"}


def make_map(trait: str, high: dict[int, list[int]], low: dict[int, list[int]], layers: list[int],
             n_layers: int = 6, d_mlp: int = 20, tau_d: float = 0.5, fingerprint: dict | None = None) -> NeuronMap:
    """A map whose pole sets are exactly ``high`` / ``low``; s and d agree with them (high: +, low: -)."""
    s = torch.zeros(n_layers, d_mlp)
    d = torch.zeros(n_layers, d_mlp)
    for layer, indices in high.items():
        s[layer, indices], d[layer, indices] = 1.0, 2.0
    for layer, indices in low.items():
        s[layer, indices], d[layer, indices] = -1.0, -2.0
    return NeuronMap(
        trait=trait, settings=LocalizationSettings(layers, 0.9, tau_d),
        high={l: torch.tensor(high.get(l, []), dtype=torch.long) for l in layers},
        low={l: torch.tensor(low.get(l, []), dtype=torch.long) for l in layers},
        tau_q={l: 0.5 for l in layers}, steering_value=s, effect_size=d, stat_layers=list(range(n_layers)),
        fingerprint=dict(fingerprint or FINGERPRINT), n_high_samples=10, n_low_samples=10)


def make_stats(trait: str, mean_high: torch.Tensor, mean_low: torch.Tensor, variance: float = 1.0, n: int = 10
               ) -> ContrastStatistics:
    """Statistics with the given per-neuron means and one shared variance."""
    m2 = torch.full_like(mean_high, variance * (n - 1), dtype=torch.float64)
    return ContrastStatistics(trait, GroupStatistics(n, mean_high.double(), m2),
                              GroupStatistics(n, mean_low.double(), m2.clone()),
                              list(range(mean_high.shape[0])), fingerprint=dict(FINGERPRINT))


def random_stats(trait: str, seed: int, n_layers: int = 6, d_mlp: int = 200, n: int = 40) -> ContrastStatistics:
    """Random statistics (for located maps with realistic s/d spreads)."""
    generator = torch.Generator().manual_seed(seed)
    mean_high = torch.randn(n_layers, d_mlp, generator=generator, dtype=torch.float64)
    mean_low = mean_high + 0.3 * torch.randn(n_layers, d_mlp, generator=generator, dtype=torch.float64)
    m2 = (n - 1) * (torch.rand(n_layers, d_mlp, generator=generator, dtype=torch.float64) + 0.05)
    fingerprint = dict(FINGERPRINT, n_layers=n_layers, d_mlp=d_mlp)
    return ContrastStatistics(trait, GroupStatistics(n, mean_high, m2), GroupStatistics(n, mean_low, m2.clone()),
                              list(range(n_layers)), fingerprint=fingerprint)


# --- the doctest policy (conftest.py deselects docstrings without a runnable example) -------------------

def has_runnable_example(test: doctest.DocTest) -> bool:
    """Whether a docstring has at least one example that is not ``+SKIP`` (so running it tests something)."""
    skip = doctest.OPTIONFLAGS_BY_NAME["SKIP"]
    return any(not example.options.get(skip, False) for example in test.examples)


# --- data folders -----------------------------------------------------------------------------------

def write_personalitybench(folder, n_descriptions=8, n_questions=12):
    """A PersonalityBench-shaped folder in the tiny model's words."""
    pb = folder / "personalitybench"
    (pb / "test").mkdir(parents=True)
    highs = ["you are outgoing and loves a party", "you are a person who loves new ideas",
             "you are kind and outgoing", "you are a friend who loves art and travel"]
    lows = ["you are reserved and quiet", "you are a person who prefers routine",
            "you are calm and reserved", "you are quiet and prefers home"]
    with open(pb / "description.jsonl", "w") as handle:
        for index in range(n_descriptions):
            row = {}
            for trait in TRAITS:
                row[trait.capitalize()] = highs[index % 4] + " " + ["i", "the", "it"][index % 3]
                row[f"{trait.capitalize()}_reversed"] = lows[index % 4] + " " + ["i", "the", "it"][index % 3]
            handle.write(json.dumps(row) + "\n")
    questions = ["what would you do on the weekend ?", "how would you feel about a party ?",
                 "a friend invites you to a party . what would you do ?", "how do you feel about money ?",
                 "what would you do about work ?", "how would you plan the weekend ?"]
    for trait in TRAITS:
        with open(pb / "test" / f"{trait.capitalize()}.jsonl", "w") as handle:
            for index in range(n_questions):
                handle.write(json.dumps({"question": f"{questions[index % 6]} {['i', 'it'][index // 6 % 2]} {index}"}) + "\n")
    return folder


class FailingEdit:
    """An edit (the full ``Edit`` protocol) whose hook raises ``error`` mid-forward: are hooks removed after it?"""

    positions, label, n_edited = "all", "failing", 0

    def __init__(self, error: Exception):
        self.error = error

    def at_positions(self, positions):
        return self

    def fwd_hooks(self):
        def hook(activation, hook):
            raise self.error
        return [("blocks.1.mlp.hook_post", hook)]

    def __neg__(self):
        return self

    def __mul__(self, gamma):
        return self

    __rmul__ = __mul__


def control_costs(**changes):
    """``ControlCosts`` with round rates (a plan's arithmetic checked by hand), ``changes`` applied."""
    from dpn_lens.generation import default_engine
    from dpn_lens.plan_control import ControlCosts

    values = dict(device="cpu", dtype="float32", threads=1, model="m", probe_flops_per_s=1e9, answer_flops_per_s=2e9,
                  persona_flops_per_s=2e9, gradient_flops_per_s=1e9, step_seconds=0.01, step_flops_per_s=1e9,
                  answer_fill=0.8, prompt_tokens=40.0, persona_tokens=90.0, trait_seconds=0.001,
                  probe_reference_bytes=10, extra_bytes=2 ** 20, selection_extra_bytes=2 ** 22, sample_tokens=10 ** 6,
                  measured="now")
    values.update(changes)
    values.setdefault("engine", default_engine(values["dtype"]))     # measured with the engine a run now uses
    return ControlCosts(**values)
