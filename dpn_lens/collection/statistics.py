"""Running per-group activation statistics: count, mean and sum of squared deviations.

Memory is O(n_layers x d_mlp) whatever the number of prompts. Updates and merges use Chan et al.'s
parallel formula in float64, which stays accurate for large offsets and tiny variances (the naive
``E[x^2] - E[x]^2`` does not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["GroupStatistics", "ContrastStatistics"]


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
            save_file(tensors, str(tmp), metadata=_artifact_metadata("dpn_lens_statistics", tensors, self._metadata()))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ContrastStatistics":
        tensors, metadata = _load_checked(path, "dpn_lens_statistics")
        return cls(
            trait=metadata["trait"],
            high=GroupStatistics(metadata["n_high"], tensors["high_mean"], tensors["high_m2"]),
            low=GroupStatistics(metadata["n_low"], tensors["low_mean"], tensors["low_m2"]),
            layers=list(metadata["layers"]), hook_name=metadata["hook_name"],
            token_position=metadata["token_position"], fingerprint=metadata["fingerprint"],
            source=metadata.get("source", ""),
        )


def _tensor_checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def _artifact_checksum(tensors: dict[str, Tensor], config: dict[str, Any]) -> str:
    """sha256 over the tensors and the canonical JSON of the config: a flipped byte anywhere shows."""
    h = hashlib.sha256(_tensor_checksum(tensors).encode())
    h.update(json.dumps(config, sort_keys=True).encode())
    return h.hexdigest()


def _artifact_metadata(key: str, tensors: dict[str, Tensor], config: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata of a dpn-lens artifact: ONE key holding the config and its checksum.

    One key, not several: safetensors writes its metadata map in hash order, which changes from
    process to process, so several keys would make identical artifacts differ byte for byte.
    """
    if "checksum" in config:
        raise ValueError("'checksum' is reserved in artifact configs")
    return {key: json.dumps({**config, "checksum": _artifact_checksum(tensors, config)}, sort_keys=True)}


ARTIFACT_KINDS = {"dpn_lens_neuron_map": ("neuron map", "maps/<trait>.safetensors", "NeuronMap.load"),
                  "dpn_lens_statistics": ("statistics file", "stats/<trait>.safetensors", "ContrastStatistics.load")}
"""Metadata key of each dpn-lens artifact: what it is called, where a run folder keeps it, what loads it."""


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a complete safetensors file, or None when the bytes are no such file."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return None
        length = int.from_bytes(head, "little")
        if length <= 0 or length > path.stat().st_size - 8:
            return None
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
    return header if isinstance(header, dict) else None


def identify_artifact(path: str | os.PathLike, key: str) -> None:
    """Check that ``path`` is the kind of file ``key`` names before reading it; else say what it is.

    What people pass by mistake gets its own message with the path to pass instead: a folder (a run
    folder, its maps/), an empty file, the readable ``.json`` sidecar of an artifact, the other kind of
    artifact (statistics for a map, a map for statistics), a file from a newer dpn-lens. Only a file that
    looks like an artifact but does not read is called truncated or corrupted (in ``_load_checked``).
    """
    path = Path(path)
    name, place, loader = ARTIFACT_KINDS[key]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a {name} written by dpn-lens ({place} in a run folder)")
    if path.is_dir():
        folder = "maps" if key == "dpn_lens_neuron_map" else "stats"
        if (path / folder).is_dir():
            files = sorted(p.name for p in (path / folder).glob("*.safetensors"))
            raise ValueError(f"{path} is a run folder, not a {name}; pass one of its files, e.g. "
                             f"{path / folder / (files[0] if files else '<trait>.safetensors')}")
        here = sorted(p.name for p in path.glob("*.safetensors"))
        example = path / here[0] if here else f"a {place} file"
        raise ValueError(f"{path} is a folder, not a {name}; pass one file, e.g. {example}")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): it was never written or its write was cut off before it began; "
                         f"re-create the {name} (dpn-lens writes through a temporary file, so a finished save is never empty)")
    with path.open("rb") as handle:
        start = handle.read(1)
    if start in (b"{", b"["):
        twin = path.with_suffix(".safetensors")
        if path.suffix == ".json" and twin.is_file():
            raise ValueError(f"{path} is the readable JSON copy of a dpn-lens artifact, not the artifact; pass its "
                             f"twin {twin}")
        raise ValueError(f"{path} is a JSON file, not a {name}; pass the .safetensors file dpn-lens wrote ({place})")
    header = _safetensors_header(path)
    if header is None:
        return                                   # not readable as safetensors: _load_checked says corrupted
    metadata = header.get("__metadata__") or {}
    other = next((k for k in ARTIFACT_KINDS if k != key and k in metadata), None)
    if other is not None:
        other_name, other_place, other_loader = ARTIFACT_KINDS[other]
        hint = (" (locate(ContrastStatistics.load(path)) makes a map from it)" if other == "dpn_lens_statistics" else "")
        raise ValueError(f"{path} is a {other_name} ({other_place}), not a {name}; pass the {place} of the same trait "
                         f"or load it with {other_loader}{hint}")
    if key in metadata:
        try:
            fmt = int(json.loads(metadata[key]).get("format", 1))
        except (ValueError, TypeError, AttributeError):
            return                               # unreadable config: _load_checked says corrupted
        if fmt > ARTIFACT_FORMAT:
            raise ValueError(f"{path} was written by a newer dpn-lens (artifact format {fmt}; this version reads up "
                             f"to {ARTIFACT_FORMAT}); upgrade dpn-lens (pip install -U dpn-lens) to read it")


ARTIFACT_FORMAT = 1
"""The artifact format this version writes and reads (a config's ``format``; files without one are format 1)."""


def _load_checked(path: str | os.PathLike, key: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a dpn-lens safetensors artifact, verifying it is the right kind, complete and uncorrupted."""
    from safetensors import safe_open

    path = Path(path)
    identify_artifact(path, key)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for truncated/garbled headers
        raise ValueError(f"{path} is truncated or corrupted ({error}); re-create it with save()") from error
    if key not in metadata:
        raise ValueError(f"{path} is a safetensors file but not a dpn-lens {key.split('_')[-1]} artifact "
                         f"(no {key!r} metadata); pass a file written by dpn-lens' save()")
    try:
        config = json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} has corrupted metadata ({error.msg}); re-create it with save()") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} has corrupted metadata (not a JSON object); re-create it with save()")
    if "checksum" in metadata:  # the first format: separate key, tensors only
        intact = metadata["checksum"] == _tensor_checksum(tensors)
    else:
        intact = config.pop("checksum", None) == _artifact_checksum(tensors, config)
    if not intact:
        raise ValueError(f"{path} is corrupted: its contents do not match the checksum written at save time; "
                         "re-create it with save()")
    return tensors, config
