"""How long a locate run will take and how much memory it needs, before running it (``dpn-lens plan``).

The prediction has two parts:

* **What the run computes**, from the model's config and the run's settings alone: the prompts of every
  trait (the embedded role-play set, tokenised with the model's tokenizer), the tokens the forward passes
  really run (with shared prefixes where collection shares them, ``dpn_lens.collection.prefix``), the parameters and
  the forward FLOPs per token (``ModelShape``), the weights, the largest batch's activations and the
  statistics.
* **What this machine does per FLOP**, measured once (``measure_costs``) by timing the real collection path
  on a sample of prompts of a model that fits here (by default the model itself), and kept in
  ``$DPN_LENS_CACHE/plan/``. Another model's time is the measured rate scaled by its FLOPs per token, so a
  laptop's measurement on SmolLM2 says how long the same machine would take for a larger model; a GPU's
  rate must be measured on that GPU (``dpn-lens plan --measure --device cuda``), never guessed.

Example:
    >>> shape = ModelShape(n_layers=2, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=1, head_dim=4, vocab=32, tied=True)
    >>> shape.n_params(), shape.forward_flops_per_token(context=10)
    (1408, 2944)
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ModelShape", "MachineCosts", "StagePlan", "RunPlan", "model_shape", "measure_costs", "plan_locate",
           "status_bytes", "reset_peak", "costs_file", "read_costs", "timed", "rendering_stub", "GPU_SIZES_GIB",
           "ForwardRates", "fit_forward_rates"]

GPU_SIZES_GIB = (16, 24, 40, 48, 80, 141)
"""GPU memory sizes the plan checks (GiB): T4/V100-16, 4090/L4, A100-40, A6000/L40, A100/H100-80, H200."""
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GEMMA3_TYPES = ("gemma3", "gemma3_text")
"""``model_type`` values of a Gemma 3 config (the text model, or the multimodal one whose ``text_config`` is read)."""


@dataclass
class ModelShape:
    """What the cost of a decoder depends on, read from its config.

    Attributes:
        gated: a gated MLP (Llama, Qwen, Gemma: three ``d_model x d_mlp`` matrices; else two).
        tied: the unembedding shares the embedding matrix.
        family: the block's layout, for what a backward pass keeps (``plan_control.gradient_activation_bytes``):
            ``"gemma3"`` (RMSNorm in float32, norms after attention and after the MLP too, and on each
            head's queries and keys) or ``"llama"`` (pre-norms only: LLaMA, SmolLM2, Mistral, Qwen2, ...).
    """

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated: bool = True
    family: str = "llama"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelShape":
        """From a Hugging Face ``config.json`` (a multimodal config's ``text_config``)."""
        config = config.get("text_config", config)
        heads = int(config["num_attention_heads"])
        d_model = int(config["hidden_size"])
        return cls(n_layers=int(config["num_hidden_layers"]), d_model=d_model, d_mlp=int(config["intermediate_size"]),
                   n_heads=heads, n_kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(config.get("head_dim") or d_model // heads), vocab=int(config["vocab_size"]),
                   tied=bool(config.get("tie_word_embeddings", True)),
                   gated=str(config.get("hidden_act", config.get("hidden_activation", "silu"))) != "gelu_new",
                   family="gemma3" if config.get("model_type") in GEMMA3_TYPES else "llama")

    def layer_params(self) -> int:
        attention = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = (3 if self.gated else 2) * self.d_model * self.d_mlp
        return attention + mlp

    def n_params(self) -> int:
        """Matrix parameters (norms and biases are a rounding error)."""
        embedding = self.vocab * self.d_model
        return self.n_layers * self.layer_params() + embedding * (1 if self.tied else 2)

    def cache_values_per_token(self) -> int:
        """Numbers one token adds to the key/value cache: keys and values of every layer's key/value heads
        (a decode step reads them all, and on the CPU the cache's growth copies them)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim

    def forward_flops_per_token(self, context: int, layers: int | None = None, logits: bool = False) -> int:
        """Multiply-adds x 2 of one token through ``layers`` layers (all by default) at ``context`` tokens of
        attention, plus the unembedding when ``logits``."""
        layers = self.n_layers if layers is None else layers
        attention_scores = 2 * self.n_heads * self.head_dim * context     # q.k and the weighted sum of v
        flops = 2 * layers * (self.layer_params() + attention_scores)
        return flops + (2 * self.vocab * self.d_model if logits else 0)


def model_config(spec: str) -> dict[str, Any]:
    """The ``config.json`` of ``spec``: an embedded model (its converted folder), a folder, or a ``config.json``."""
    from dpn_lens.models import EMBEDDED_MODELS, model_source

    path = Path(spec).expanduser()
    if path.name == "config.json" and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if spec in EMBEDDED_MODELS or spec.endswith(".gguf"):
        path = Path(model_source(spec))
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    raise FileNotFoundError(f"no config.json for {spec!r}; pass an embedded model name, a model folder, or the path "
                            "of a config.json (e.g. one saved from the hub on another machine)")


def model_shape(spec: str) -> ModelShape:
    return ModelShape.from_config(model_config(spec))


@dataclass
class MachineCosts:
    """This machine's measured speed: effective forward FLOP/s of the collection path on ``model``."""

    device: str
    dtype: str
    threads: int
    model: str
    flops_per_s: float
    seconds_per_call: float
    """Fixed cost of one forward call (its Python, a batch-1 prefix's poor kernel use, the cache copies)."""
    tokens_per_s: float
    runtime_bytes: int
    """Resident memory of the Python process with torch and transformers imported, before any model."""
    startup_seconds: float
    """A fresh interpreter importing what ``dpn-lens locate`` imports (torch, transformers, TransformerLens)."""
    load_bytes_per_s: float
    """Weight bytes loaded per second by ``load_model`` (read, convert, wrap in the bridge) on ``model``."""
    load_peak_ratio: float
    """Peak resident memory while loading, above ``runtime_bytes``, per byte of weights (the loader's copies)."""
    resident_ratio: float
    """Resident memory the loaded model keeps, above ``runtime_bytes``, per byte of weights."""
    locate_extra_bytes: int
    """Peak memory of locate's sample trait above the loaded model, the batch's activations and the statistics
    (tokenised prompts, the prefix cache, allocator slack): measured, taken as a constant."""
    trait_seconds: float
    """What ``locate`` spends per trait beyond its forward passes (prompts, tokenising, statistics, selection,
    saving), measured on one trait of ``model``."""
    measured: str
    machine: str = field(default_factory=platform.node)
    weights_bytes: int = 0
    """The weight bytes of ``model`` (0 in a file from before 2026-12-07: its extras then scale with the weights)."""

    def load_extra_bytes(self, weights: int) -> int:
        """What loading a model of ``weights`` bytes holds beyond them at its peak: the bytes measured on ``model``,
        not scaled to another model's weights. The loader's and the bridge's extras hardly grow with the model:
        SmolLM2's ratio (3.4 in bfloat16) planned 51 GiB for an 8B model that peaked at 16.3 (docs/PERFORMANCE.md).

        Example:
            >>> costs = MachineCosts("cpu", "bfloat16", 2, "m", 1e9, 0.0, 1.0, 0, 1.0, 1e8, 3.0, 1.5, 0, 0.0, "now",
            ...                      weights_bytes=100)
            >>> costs.load_extra_bytes(100), costs.load_extra_bytes(10_000), costs.resident_extra_bytes(10_000)
            (200, 200, 50)
        """
        return self._extra(self.load_peak_ratio, weights)

    def resident_extra_bytes(self, weights: int) -> int:
        """What the loaded model keeps beside ``weights`` bytes of weights: measured bytes, as ``load_extra_bytes``."""
        return self._extra(self.resident_ratio, weights)

    def _extra(self, ratio: float, weights: int) -> int:
        return int(max(ratio - 1.0, 0.0) * (self.weights_bytes or weights))

    def same_size(self, weights: int, within: float = 4.0) -> bool:
        """Whether ``model`` had about ``weights`` bytes of weights (within a factor ``within``; True where unknown):
        forward FLOP/s grow with the matrices' size (an 8B locate on a 2-core CPU ran 2-4x faster than its plan
        from costs measured on SmolLM2, docs/PERFORMANCE.md)."""
        return not self.weights_bytes or max(weights, self.weights_bytes) <= within * min(weights, self.weights_bytes)


def costs_file(device: str, dtype: str, threads: int, stage: str = "locate") -> Path:
    """Where this machine's measured costs of ``stage`` are kept (one file per device, dtype and threads)."""
    from dpn_lens.models import cache_dir

    suffix = "" if stage == "locate" else f"-{stage}"
    return cache_dir() / "plan" / f"{platform.node()}-{device}-{dtype}-{threads}threads{suffix}.json"


def read_costs(kind: type, path: Path) -> Any:
    """A ``kind`` (``MachineCosts``, ``ControlCosts``) from ``path``; None when absent or written by another
    version (then it is measured again)."""
    if not path.is_file():
        return None
    try:
        return kind(**json.loads(path.read_text(encoding="utf-8")))
    except (TypeError, ValueError):
        return None


def status_bytes(field: str, required: bool = False) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS`` now, ``VmHWM`` the peak).

    Where it cannot be read (off Linux, or no such field): 0, or with ``required=True`` a RuntimeError.
    """
    try:
        text = Path("/proc/self/status").read_text()
    except OSError as error:
        if required:
            raise RuntimeError(f"cannot read {field} from /proc/self/status: it needs Linux's /proc") from error
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    if required:
        raise RuntimeError(f"{field} not in /proc/self/status: it needs Linux's /proc")
    return 0


def reset_peak(required: bool = False) -> None:
    """Reset the kernel's peak-RSS counter, so ``VmHWM`` covers only what follows.

    Where it cannot (off Linux): a no-op, or with ``required=True`` a RuntimeError.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as error:
        if required:
            raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs: it needs Linux's /proc") from error


def timed(function: Any, device: str = "cpu") -> float:
    """Wall seconds of ``function()``, the GPU's queued work included (synchronised before and after)."""
    import torch

    if device != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _startup_seconds() -> float:
    """A fresh interpreter importing what ``dpn-lens locate`` imports (best of two: the first warms the disk cache)."""
    import subprocess
    import sys

    imports = "import torch, transformers, transformer_lens, dpn_lens.cli, dpn_lens.pipeline"
    times = []
    for _ in range(2):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", imports], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return min(times)


@dataclass
class ForwardRates:
    """Collection's forward time on this machine as ``flops * seconds_per_flop + calls * seconds_per_call``
    (``fit_forward_rates``), with the two timed runs it was fitted from."""

    seconds_per_flop: float
    seconds_per_call: float
    runs: list[tuple[dict[str, int], float]]
    """``(locate_work, seconds)`` of the plain run, then of the shared-prefix run."""

    def seconds(self, work: dict[str, int]) -> float:
        """Predicted forward seconds of ``work`` (``locate_work``).

        Example:
            >>> ForwardRates(1e-9, 0.01, []).seconds({"flops": 2e9, "calls": 10})
            2.1
        """
        return work["flops"] * self.seconds_per_flop + work["calls"] * self.seconds_per_call


def fit_forward_rates(model: Any, shape: ModelShape, pairs: Any, device: str = "cpu") -> ForwardRates:
    """Time collection of ``pairs`` twice, plain (few large calls) and with shared prefixes (many small
    ones), and solve the two runs for the two unknowns of ``seconds = flops * seconds_per_flop + calls *
    seconds_per_call``. Where noise swamps one term, all of it goes to FLOPs."""
    from dpn_lens.collection.collect import CollectionConfig, collect_statistics

    runs = []
    for share in (False, True):
        config = CollectionConfig(progress=False, share_prefix=share)
        work = locate_work(model, shape, [pairs], config, device)
        runs.append((work, timed(lambda: collect_statistics(model, pairs, config), device)))
    (plain, t_plain), (shared, t_shared) = runs
    determinant = plain["flops"] * shared["calls"] - shared["flops"] * plain["calls"]
    seconds_per_flop = (t_plain * shared["calls"] - t_shared * plain["calls"]) / determinant if determinant else 0.0
    seconds_per_call = (plain["flops"] * t_shared - shared["flops"] * t_plain) / determinant if determinant else -1.0
    if seconds_per_flop <= 0 or seconds_per_call < 0:     # noise swamped one term: attribute it all to FLOPs
        seconds_per_flop, seconds_per_call = (t_plain + t_shared) / (plain["flops"] + shared["flops"]), 0.0
    return ForwardRates(seconds_per_flop, seconds_per_call, runs)


def measure_costs(model_spec: str, device: str = "cpu", dtype: str = "float32", n_prompts: int = 24,
                  save: bool = True, random_weights: bool = False) -> MachineCosts:
    """Time ``collect_statistics`` (the locate path, default settings) on ``n_prompts`` pairs of embedded
    prompts with ``model_spec`` on this machine, after one warm-up batch; the rate is per forward FLOP.

    ``random_weights``: ``model_spec``'s config and tokenizer with seeded random weights (``load_model``), for an
    architecture whose weights are not at hand. Its load rate is then the initialisation's, not a load's."""
    import torch

    from dpn_lens.collection.collect import CollectionConfig, collect_statistics
    from dpn_lens.data.contrastive import embedded_contrastive_set
    from dpn_lens.models import load_model

    import transformer_lens  # noqa: F401  (imported before the runtime is read, as `dpn-lens locate` has them)
    import transformers  # noqa: F401

    import dpn_lens.pipeline  # noqa: F401

    startup = _startup_seconds()
    runtime = status_bytes("VmRSS")
    shape = model_shape(model_spec)
    weights = shape.n_params() * BYTES[dtype]
    reset_peak()
    started = time.perf_counter()
    model = load_model(model_spec, dtype=dtype, device=None if device == "cpu" else device,
                       random_weights=random_weights)
    load_seconds = time.perf_counter() - started
    load_peak = max(status_bytes("VmHWM") - runtime, 0)
    resident = max(status_bytes("VmRSS") - runtime, 0)
    pairs = embedded_contrastive_set("openness", n_pairs=n_prompts, seed=7)
    collect_statistics(model, embedded_contrastive_set("openness", n_pairs=2, seed=8), CollectionConfig(progress=False))
    rates = fit_forward_rates(model, shape, pairs, device)
    seconds_per_flop, seconds_per_call = rates.seconds_per_flop, rates.seconds_per_call
    (plain, t_plain), (shared, t_shared) = rates.runs
    # One whole trait of locate (the pipeline, with its folder): what is not forward passes is per-trait cost.
    import tempfile

    from dpn_lens.pipeline import LocateConfig, contrastive_set_for, locate_traits

    config = LocateConfig(traits=["openness"], n_pairs=n_prompts, collection=CollectionConfig(progress=False))
    work = locate_work(model, shape, [contrastive_set_for("openness", n_pairs=n_prompts)], config.collection, device)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a timing sample: few pairs select few neurons, and locate says so
        before = status_bytes("VmRSS")
        reset_peak()
        started = time.perf_counter()
        locate_traits(model, config, out=Path(folder) / "run", log=lambda message: None)
        located = time.perf_counter() - started
        sample_peak = status_bytes("VmHWM") - before
    predicted = _batch_bytes(shape, config.collection, work["longest_prompt"], BYTES[dtype])
    forward = work["flops"] * seconds_per_flop + work["calls"] * seconds_per_call
    costs = MachineCosts(device=device, dtype=dtype, threads=torch.get_num_threads(), model=model_spec,
                         flops_per_s=1.0 / seconds_per_flop, seconds_per_call=seconds_per_call,
                         tokens_per_s=(plain["tokens_run"] + shared["tokens_run"]) / (t_plain + t_shared),
                         runtime_bytes=runtime, startup_seconds=startup, load_bytes_per_s=weights / load_seconds,
                         load_peak_ratio=load_peak / weights, resident_ratio=resident / weights,
                         locate_extra_bytes=max(int(sample_peak - predicted), 0), trait_seconds=max(located - forward, 0.0),
                         measured=time.strftime("%Y-%m-%d %H:%M"), weights_bytes=weights)
    if save:
        from dpn_lens.io import write_json_atomic

        path = costs_file(device, dtype, costs.threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, asdict(costs))
    return costs


def saved_costs(device: str, dtype: str, threads: int) -> MachineCosts | None:
    return read_costs(MachineCosts, costs_file(device, dtype, threads))


def locate_work(model: Any, shape: ModelShape, sets: Sequence[Any], config: Any, device: str = "cpu"
                ) -> dict[str, int]:
    """What collection runs for every pole of every contrastive set, batch by batch as it forms them:
    tokens in the prompts, tokens run (padding included; shared prefixes once, where collection shares
    them on this device), forward calls, FLOPs (each token attends to its batch's longest context) and
    the longest prompt."""
    from dpn_lens.collection.collect import batch_chunks
    from dpn_lens.hooked import tokenize_compact
    from dpn_lens.collection.prefix import plan_prefix_tree

    shares = config.share_prefix is True or (config.share_prefix == "auto" and device == "cpu")
    work = {"tokens_in_prompts": 0, "tokens_run": 0, "calls": 0, "flops": 0, "longest_prompt": 0}

    def batches(lengths: list[int], cached: int = 0) -> None:
        for chunk in batch_chunks(lengths, config.max_batch_size, config.max_batch_tokens, cached):
            longest = max(lengths[i] for i in chunk)
            padded = len(chunk) * longest
            work["tokens_run"] += padded
            work["calls"] += 1
            work["flops"] += padded * shape.forward_flops_per_token(context=cached + longest)

    for contrastive in sets:
        for prompts in (contrastive.high, contrastive.low):
            arrays = tokenize_compact(model, prompts)
            work["tokens_in_prompts"] += sum(len(a) for a in arrays)
            work["longest_prompt"] = max([work["longest_prompt"], *map(len, arrays)])
            if not shares:
                batches([len(a) for a in arrays])
                continue
            for group in plan_prefix_tree(arrays, config.prefix_min_saving).walk():
                if group.end > 0:
                    segment = group.end - group.start
                    work["tokens_run"] += segment
                    work["calls"] += 1
                    work["flops"] += segment * shape.forward_flops_per_token(context=group.end)
                if group.members:
                    batches([len(arrays[i]) - group.end for i in group.members], group.end)
    return work


@dataclass
class StagePlan:
    name: str
    seconds: float | None
    peak_bytes: int
    detail: str
    # True where the passes' own memory needs a measurement that is missing: the bytes are what is
    # known without it (weights, reference logits), so the stage needs at least that much.
    peak_is_lower_bound: bool = False
    # Where a lower bound has an estimate beside it (the gradient pass's memory, from the model's shape):
    # the stage's estimated peak, printed after the bound.
    estimate_bytes: int | None = None


@dataclass
class RunPlan:
    model: str
    shape: ModelShape
    device: str
    dtype: str
    weights_bytes: int
    stages: list[StagePlan]
    costs: MachineCosts | None
    fits_gpus_gib: dict[int, bool]

    @property
    def seconds(self) -> float | None:
        """The whole command's wall time (None without a measurement for this device and dtype)."""
        times = [stage.seconds for stage in self.stages]
        return None if any(t is None for t in times) else float(sum(times))   # type: ignore[arg-type]

    @property
    def peak_bytes(self) -> int:
        """The whole command's peak memory (host memory on the CPU, the GPU's on a GPU)."""
        return max(stage.peak_bytes for stage in self.stages)

    def text(self) -> str:
        gib = 1024 ** 3
        lines = [f"plan for {self.model} ({self.dtype} on {self.device}): {self.shape.n_params() / 1e6:,.0f}M matrix "
                 f"parameters, {self.shape.n_layers} layers x {self.shape.d_mlp} MLP neurons",
                 f"  weights {self.weights_bytes / gib:.2f} GiB"]
        for stage in self.stages:
            when = "time unknown (no measurement for this device and dtype)" if stage.seconds is None else \
                f"~{_duration(stage.seconds)}"
            memory = (f"peak memory at least {stage.peak_bytes / gib:.2f} GiB (the rest of its passes' memory needs "
                      f"the same measurement)" if stage.peak_is_lower_bound else f"peak memory ~{stage.peak_bytes / gib:.2f} GiB")
            if stage.peak_is_lower_bound and stage.estimate_bytes is not None:
                memory = (f"peak memory at least {stage.peak_bytes / gib:.2f} GiB, estimated ~"
                          f"{stage.estimate_bytes / gib:.2f} GiB (an estimate from the model's shape; a measurement "
                          "replaces both)")
            lines.append(f"  {stage.name}: {when}; {memory} ({stage.detail})")
        if self.seconds is not None:
            lines.append(f"  in all: ~{_duration(self.seconds)}, peak memory ~{self.peak_bytes / gib:.2f} GiB")
        if self.costs is not None:
            lines.append(f"  times from {self.costs.flops_per_s / 1e9:.1f} GFLOP/s and {self.costs.seconds_per_call:.2f} s per "
                         f"forward call, measured on {self.costs.model} ({self.costs.measured}, {self.costs.threads} threads)")
            if self.seconds is not None and not self.costs.same_size(self.weights_bytes):
                lines.append(f"  measured on a model of {self.costs.weights_bytes / gib:.2f} GiB of weights: larger matrices "
                             "run at other FLOP/s, so these times can be several times off (an 8B locate on a 2-core CPU "
                             "ran 2-4x faster than planned from SmolLM2); for times within 25%, measure on this model: "
                             "add --measure (--random-weights without its weights)")
        fit = ", ".join(f"{size} GiB {'yes' if ok else 'no'}" for size, ok in self.fits_gpus_gib.items())
        lines.append(f"  fits on one GPU of: {fit}")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plan_locate(spec: str, traits: Sequence[str], n_pairs: int, device: str = "cpu", dtype: str = "float32",
                costs: MachineCosts | None = None, collection: Any = None) -> RunPlan:
    """The plan of ``dpn-lens locate`` (DPN-LE's selection) for ``traits`` x ``n_pairs`` pairs."""
    from dpn_lens.collection.collect import CollectionConfig
    from dpn_lens.data.contrastive import embedded_contrastive_set
    from dpn_lens.numbers import as_int

    n_pairs = as_int(n_pairs, "n_pairs", "1000", minimum=1)
    if dtype not in BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(BYTES)}")
    shape = model_shape(spec)
    collection = collection or CollectionConfig(progress=False)
    sets = [embedded_contrastive_set(trait, n_pairs=n_pairs) for trait in traits]
    work = locate_work(rendering_stub(spec), shape, sets, collection, device)
    weights = shape.n_params() * BYTES[dtype]
    peak = weights + _batch_bytes(shape, collection, work["longest_prompt"], BYTES[dtype])
    usable = costs is not None and costs.device == device and costs.dtype == dtype
    runtime = costs.runtime_bytes if costs is not None and device == "cpu" else 0
    load_seconds = collect_seconds = None
    if usable:
        load_seconds = costs.startup_seconds + (weights / costs.load_bytes_per_s if costs.load_bytes_per_s else 0.0)
        collect_seconds = (work["flops"] / costs.flops_per_s + work["calls"] * costs.seconds_per_call
                           + len(traits) * costs.trait_seconds)
    # Loading holds the loader's copies of the weights for a moment (host memory; on a GPU, host RAM).
    load_peak = runtime + weights + (costs.load_extra_bytes(weights) if costs is not None else 0)
    host_peak = peak
    if costs is not None and device == "cpu":   # what the process keeps beside the weights, as measured
        host_peak += costs.resident_extra_bytes(weights) + costs.locate_extra_bytes
    stages = [StagePlan("start-up and model load", load_seconds, load_peak if device == "cpu" else weights,
                        f"{weights / 1024 ** 3:.2f} GiB of weights"),
              StagePlan("locate", collect_seconds, runtime + host_peak,
                        f"{len(traits)} traits x {n_pairs} pairs: {work['tokens_run']:,} tokens run of "
                        f"{work['tokens_in_prompts']:,} in the prompts, {work['flops'] / 1e12:.1f} TFLOP")]
    gib = 1024 ** 3
    fits = {size: peak * 1.1 < size * gib for size in GPU_SIZES_GIB}   # 10% for the CUDA context and allocator
    return RunPlan(spec, shape, device, dtype, weights, stages, costs, fits)


def _batch_bytes(shape: ModelShape, collection: Any, longest_prompt: int, width: int) -> int:
    """The largest batch's activations (``max_batch_tokens`` tokens through one layer at a time: residual,
    attention, MLP activations and a few temporaries) plus the statistics (float64 sums per layer and
    neuron, two poles)."""
    batch_tokens = min(collection.max_batch_tokens, collection.max_batch_size * longest_prompt)
    activations = batch_tokens * (8 * shape.d_model + 4 * shape.d_mlp) * width
    return activations + 2 * 2 * shape.n_layers * shape.d_mlp * 8


def rendering_stub(spec: str) -> "_RenderingStub":
    """What tokenising a prompt for ``spec`` needs (its tokenizer and whether it uses a chat template),
    without loading the model: the tokenizer beside its ``config.json``."""
    from transformers import AutoTokenizer

    from dpn_lens.models import EMBEDDED_MODELS, model_source

    source = model_source(spec) if spec in EMBEDDED_MODELS else Path(spec).expanduser()
    folder = source.parent if Path(source).name == "config.json" else source
    return _RenderingStub(AutoTokenizer.from_pretrained(str(folder)), spec)


class _RenderingStub:
    """Just enough of a model for ``tokenize_compact``: the tokenizer and whether prompts use a chat template."""

    def __init__(self, tokenizer: Any, spec: str):
        from dpn_lens.models import EMBEDDED_MODELS

        self.tokenizer = tokenizer
        embedded = EMBEDDED_MODELS.get(spec)
        self.dpn_is_chat_model = embedded.is_chat_model if embedded else bool(getattr(tokenizer, "chat_template", None))
        self.cfg = type("cfg", (), {"device": "cpu"})()
