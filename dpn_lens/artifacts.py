"""The on-disk format of dpn-lens artifacts (statistics, neuron maps): safetensors with one metadata key.

One key holds the artifact's config and a checksum over tensors and config, so a flipped byte, a cut-off
write, the wrong kind of file or a newer format each get their own message naming the fix. Both the
statistics stage (``collection.statistics``) and the localization stage (``localization.neuron_map``)
write and read through here.

Example:
    >>> import torch, tempfile, os
    >>> from safetensors.torch import save_file
    >>> tensors = {"x": torch.zeros(2)}
    >>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
    >>> save_file(tensors, path, metadata=artifact_metadata("dpn_lens_statistics", tensors, {"trait": "openness"}))
    >>> load_artifact(path, "dpn_lens_statistics")[1]
    {'trait': 'openness'}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["artifact_metadata", "load_artifact", "identify_artifact", "ARTIFACT_KINDS", "ARTIFACT_FORMAT"]


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


def artifact_metadata(key: str, tensors: dict[str, Tensor], config: dict[str, Any]) -> dict[str, str]:
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
    looks like an artifact but does not read is called truncated or corrupted (in ``load_artifact``).
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
        return                                   # not readable as safetensors: load_artifact says corrupted
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
            return                               # unreadable config: load_artifact says corrupted
        if fmt > ARTIFACT_FORMAT:
            raise ValueError(f"{path} was written by a newer dpn-lens (artifact format {fmt}; this version reads up "
                             f"to {ARTIFACT_FORMAT}); upgrade dpn-lens (pip install -U dpn-lens) to read it")


ARTIFACT_FORMAT = 1
"""The artifact format this version writes and reads (a config's ``format``; files without one are format 1)."""


def load_artifact(path: str | os.PathLike, key: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
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
