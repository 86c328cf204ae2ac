"""Running per-group activation statistics: count, mean and sum of squared deviations.

Memory is O(n_layers x d_mlp) whatever the number of prompts. Updates and merges use Chan et al.'s
parallel formula in float64, which stays accurate for large offsets and tiny variances (the naive
``E[x^2] - E[x]^2`` does not).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from dpn_lens.artifacts import ARTIFACT_FORMAT, ARTIFACT_KINDS, artifact_metadata, identify_artifact, load_artifact

__all__ = ["GroupStatistics", "ContrastStatistics", "identify_artifact", "ARTIFACT_KINDS", "ARTIFACT_FORMAT"]


@dataclass
class GroupStatistics:
    """Streaming mean and variance of activations of one group (e.g. the high-pole prompts).

    Attributes:
        count: number of samples seen.
        mean: ``[n_layers, d_mlp]`` float64 running mean.
        m2: ``[n_layers, d_mlp]`` float64 sum of squared deviations from the mean.

    Example:
        >>> stats = GroupStatistics.empty(2, 3)
        >>> stats.update(torch.ones(5, 2, 3))
        >>> stats.count, stats.variance().sum().item()
        (5, 0.0)
    """

    count: int
    mean: Float[Tensor, "n_layers d_mlp"]
    m2: Float[Tensor, "n_layers d_mlp"]

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int, device: str | torch.device = "cpu") -> "GroupStatistics":
        zeros = torch.zeros(n_layers, d_mlp, dtype=torch.float64, device=device)
        return cls(0, zeros, zeros.clone())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mean.shape)  # type: ignore[return-value]

    def update(self, batch: Float[Tensor, "batch n_layers d_mlp"]) -> None:
        """Fold a batch of per-sample activations into the running statistics."""
        if batch.ndim != 3 or tuple(batch.shape[1:]) != self.shape:
            raise ValueError(f"expected activations of shape [batch, {self.shape[0]}, {self.shape[1]}], "
                             f"got {list(batch.shape)}")
        if batch.shape[0] == 0:
            return
        values = batch.to(self.mean.device, torch.float64)
        if not torch.isfinite(values).all():
            bad = (~torch.isfinite(values)).nonzero()[0].tolist()
            raise FloatingPointError(
                f"non-finite activation (NaN or Inf) at sample {bad[0]} of the batch, layer slot {bad[1]}, "
                f"neuron {bad[2]}; the model overflowed: load it in float32 (dtype='float32') or check its weights"
            )
        batch_mean = values.mean(dim=0)
        batch_m2 = ((values - batch_mean) ** 2).sum(dim=0)
        self._merge_moments(values.shape[0], batch_mean, batch_m2)

    def _merge_moments(self, count: int, mean: Tensor, m2: Tensor) -> None:
        total = self.count + count
        delta = mean - self.mean
        # Chan et al. (1979): exact for any split of the data, and stable in float64.
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    def merge(self, other: "GroupStatistics") -> "GroupStatistics":
        """Statistics of the union of the samples behind ``self`` and ``other`` (a new object)."""
        if self.shape != other.shape:
            raise ValueError(f"cannot merge statistics of shape {self.shape} with {other.shape}")
        merged = GroupStatistics(self.count, self.mean.clone(), self.m2.clone())
        if other.count:
            merged._merge_moments(other.count, other.mean.to(merged.mean.device), other.m2.to(merged.mean.device))
        return merged

    def variance(self, unbiased: bool = True) -> Float[Tensor, "n_layers d_mlp"]:
        """Per-neuron variance (``ddof=1`` when ``unbiased``)."""
        denominator = self.count - 1 if unbiased else self.count
        if denominator <= 0:
            raise ValueError(f"variance needs at least {2 if unbiased else 1} samples, have {self.count}")
        return self.m2 / denominator

    def to(self, device: str | torch.device) -> "GroupStatistics":
        return GroupStatistics(self.count, self.mean.to(device), self.m2.to(device))


@dataclass
class ContrastStatistics:
    """High-pole and low-pole statistics of one trait on one model, plus what produced them.

    ``layers[i]`` is the model layer of row ``i`` of the statistics tensors.
    """

    trait: str
    high: GroupStatistics
    low: GroupStatistics
    layers: list[int]
    hook_name: str = "blocks.{layer}.mlp.hook_post"
    token_position: str = "last"
    fingerprint: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __repr__(self) -> str:
        return (f"ContrastStatistics(trait={self.trait!r}, n_high={self.high.count}, n_low={self.low.count}, "
                f"layers={self.layers[0]}..{self.layers[-1]}, d_mlp={self.high.shape[1]})")

    @property
    def d_mlp(self) -> int:
        return self.high.shape[1]

    def merge(self, other: "ContrastStatistics") -> "ContrastStatistics":
        """Statistics of the union of two shards collected on the same model and layers."""
        for name in ("trait", "layers", "hook_name", "token_position", "fingerprint"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"cannot merge shards that differ in {name}: "
                                 f"{getattr(self, name)!r} vs {getattr(other, name)!r}")
        return dataclasses.replace(self, high=self.high.merge(other.high), low=self.low.merge(other.low))

    def _metadata(self) -> dict[str, Any]:
        return {"trait": self.trait, "layers": self.layers, "hook_name": self.hook_name,
                "token_position": self.token_position, "fingerprint": self.fingerprint, "source": self.source,
                "n_high": self.high.count, "n_low": self.low.count}

    def save(self, path: str | os.PathLike) -> Path:
        """Save as one safetensors file (tensors + JSON metadata), atomically."""
        from safetensors.torch import save_file

        from dpn_lens.io import atomic_path

        tensors = {"high_mean": self.high.mean, "high_m2": self.high.m2, "low_mean": self.low.mean,
                   "low_m2": self.low.m2}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=artifact_metadata("dpn_lens_statistics", tensors, self._metadata()))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ContrastStatistics":
        tensors, metadata = load_artifact(path, "dpn_lens_statistics")
        return cls(
            trait=metadata["trait"],
            high=GroupStatistics(metadata["n_high"], tensors["high_mean"], tensors["high_m2"]),
            low=GroupStatistics(metadata["n_low"], tensors["low_mean"], tensors["low_m2"]),
            layers=list(metadata["layers"]), hook_name=metadata["hook_name"],
            token_position=metadata["token_position"], fingerprint=metadata["fingerprint"],
            source=metadata.get("source", ""),
        )
