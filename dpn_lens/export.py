"""Take a DPN-LE edit out of dpn-lens: llama.cpp control vector, steering-vectors vector, or an MLP bias.

An additive edit on ``blocks.{l}.mlp.hook_post`` (the input of the MLP output projection) changes
that layer's MLP output by ``delta_l @ W_out[l]`` (TransformerLens convention, ``W_out[l]`` is
``[d_mlp, d_model]``; in Hugging Face terms ``down_proj.weight @ delta_l``): one dense vector in the
residual stream per edited layer. Three runtimes can add such a vector without dpn-lens hooks:

* ``"gguf"``: a llama.cpp control vector (``--control-vector FILE``), tensors ``direction.<l>``,
  architecture ``controlvector``. llama.cpp adds ``direction.<l>`` to the OUTPUT of layer ``l``
  (0-based, after the residual add); its loader refuses ``direction.0``, so an edit of layer 0
  cannot be exported in this format.
* ``"steering-vectors"``: the fields of a ``steering_vectors.SteeringVector``
  (``layer_activations={l: vector}``, ``layer_type="decoder_block"``), which adds each vector to the
  output of decoder block ``l``.
* ``"hf-bias"``: a Hugging Face model folder (``save_pretrained``) whose edited layers carry
  ``down_proj.bias = vector`` (Llama-family configs with ``mlp_bias=True``; the gate/up biases are
  zero), so any runtime that loads the model steers with no hooks at all. Qwen2 and Mistral configs
  have no ``mlp_bias``; their models are saved as the same network written as a ``LlamaForCausalLM``
  (same weights and names; Qwen2's q/k/v biases kept, zero biases added where Llama's options put
  them), which is exact when no sliding-window attention is configured.

Adding a vector to a layer's output equals adding it to that layer's MLP output only when the MLP
output goes straight into the residual sum (pre-norm blocks: LLaMA, Qwen2, Mistral, SmolLM2). Gemma 2/3
normalise the MLP output (``post_feedforward_layernorm``) before the residual add, so the first two
formats would NOT reproduce the edit there; they are refused for such models, as is ``hf-bias`` when
the config cannot carry an MLP bias.

Every export carries the ALL-POSITIONS form of the edit: the vector is added at every token,
prompt included (``edit.at_positions("all")``). ``dpn-lens steer`` edits only decode steps by default,
so exported steering matches ``dpn-lens steer --all-positions``.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> from dpn_lens.steering import Intervention
    >>> model = build_tiny_model()
    >>> delta = torch.zeros(48); delta[5] = 2.0
    >>> vectors = residual_vectors(model, Intervention({2: delta}))
    >>> sorted(vectors), tuple(vectors[2].shape)
    ([2], (32,))
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from dpn_lens.hooked import HOOK_NAME, HookedModel, decoder_layers, down_proj_weight, hf_model, hf_module
from dpn_lens.steering import Intervention

__all__ = ["FORMATS", "ExportedEdit", "residual_vectors", "exported_edit", "export_control_vector",
           "export_steering_vector", "load_steering_vector", "export_bias_model", "export_edit",
           "ALL_POSITIONS_NOTE"]

Format = Literal["gguf", "steering-vectors", "hf-bias"]
FORMATS: tuple[str, ...] = ("gguf", "steering-vectors", "hf-bias")
ALL_POSITIONS_NOTE = ("all-positions form: the vector is added at every token, prompt included "
                      "(as `dpn-lens steer --all-positions`; the default `steer` edits decode steps only)")


@dataclass
class ExportedEdit:
    """An edit as residual vectors: ``vectors[layer]`` is added to layer ``layer``'s MLP output.

    Attributes:
        vectors: ``{layer: [d_model] float32}``, ``W_out[layer]``-projected deltas (nonzero layers only).
        metadata: what produced it (trait, gamma, direction, mode, model name, positions="all").
    """

    vectors: dict[int, Float[Tensor, "d_model"]]
    metadata: dict[str, Any] = field(default_factory=dict)


def normalises_mlp_output(model: Any) -> bool:
    """True when the MLP output passes a norm before the residual add (Gemma 2/3)."""
    return any(hasattr(hf_module(layer), "post_feedforward_layernorm") for layer in decoder_layers(model, "exports"))


def residual_vectors(model: HookedModel, edit: Intervention) -> dict[int, Float[Tensor, "d_model"]]:
    """``{layer: down_proj.weight @ delta}`` in float32: each delta as a change of the MLP output.

    Layers whose delta is all zero are left out.
    """
    if not isinstance(edit, Intervention):
        raise TypeError(f"exports take a neuron edit (dpn_lens.steering.Intervention); got {type(edit).__name__}")
    if edit.hook_template != HOOK_NAME:
        raise ValueError(f"exports need edits on {HOOK_NAME!r} (the input of down_proj); this edit acts on "
                         f"{edit.hook_template!r}")
    vectors = {}
    for layer, delta in sorted(edit.deltas.items()):
        if not bool((delta != 0).any()):
            continue
        weight = down_proj_weight(model, layer, "exports").detach().to("cpu", torch.float32)
        if weight.shape[1] != delta.numel():
            raise ValueError(f"layer {layer}: the delta has {delta.numel()} neurons but down_proj takes "
                             f"{weight.shape[1]}; the edit was built for another model")
        vectors[layer] = weight @ delta.detach().to("cpu", torch.float32)
    return vectors


def exported_edit(model: HookedModel, edit: Intervention, **metadata: Any) -> ExportedEdit:
    """The all-positions residual form of ``edit``, with ``metadata`` (trait, gamma, ...) recorded."""
    info = {"model_name": str(getattr(model, "dpn_model_name", "")), "label": edit.label, "positions": "all",
            "note": ALL_POSITIONS_NOTE, "hook": HOOK_NAME, **metadata}
    return ExportedEdit(residual_vectors(model, edit), info)


def _refuse_normalised_mlp(model: Any, fmt: str) -> None:
    if normalises_mlp_output(model):
        arch = type(hf_model(model)).__name__
        raise ValueError(
            f"{arch} normalises each MLP output (post_feedforward_layernorm) before the residual add, so a "
            f"{fmt} vector added to a layer's output would not equal the neuron edit; steer this model "
            "with dpn-lens hooks (`dpn-lens steer`) instead")


def _export_target(exported: "ExportedEdit", path: str | os.PathLike, suffix: str, what: str) -> Path:
    """``path`` checked for ``suffix`` (with its parent folder made); refuses an edit that changes nothing."""
    if not exported.vectors:
        raise ValueError("the edit changes no neuron (all deltas are zero); nothing to export")
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{what}; got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def export_control_vector(model: HookedModel, exported: ExportedEdit, path: str | os.PathLike) -> Path:
    """Write a llama.cpp control vector GGUF: tensors ``direction.<layer>`` (float32, ``[d_model]``).

    llama.cpp adds ``direction.<l>`` to the output of layer ``l`` (0-based), which for pre-norm
    blocks equals adding it to the MLP output. Use it with ``llama-cli -m model.gguf
    --control-vector PATH`` (scale with ``--control-vector-scaled PATH 1.0``).

    Example:
        >>> export_control_vector(model, exported_edit(model, edit), "openness.gguf")   # doctest: +SKIP
    """
    import gguf

    from dpn_lens.io import atomic_path

    _refuse_normalised_mlp(model, "llama.cpp control")
    if 0 in exported.vectors:
        raise ValueError("llama.cpp control vectors cannot steer layer 0 (its loader rejects `direction.0`); "
                         "locate with layers >= 1 or export with --format hf-bias")
    path = _export_target(exported, path, ".gguf", "a control vector is a .gguf file")
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        # The two keys llama.cpp's own control-vector generator writes; the rest say what produced it.
        writer.add_string("controlvector.model_hint", str(getattr(hf_model(model).config, "model_type", "")))
        writer.add_uint32("controlvector.layer_count", len(exported.vectors))
        for key, value in exported.metadata.items():
            writer.add_string(f"dpn_lens.{key}", str(value))
        for layer, vector in sorted(exported.vectors.items()):
            writer.add_tensor(f"direction.{layer}", vector.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def export_steering_vector(model: HookedModel, exported: ExportedEdit, path: str | os.PathLike) -> Path:
    """Save a ``steering_vectors.SteeringVector`` as safetensors: ``layer_activations.<l>`` tensors.

    The metadata holds ``layer_type="decoder_block"`` and what produced it; ``load_steering_vector``
    turns the file back into a ``SteeringVector`` (or, without that library, its constructor
    arguments). steering-vectors 0.12 pins ``transformers<5``, so dpn-lens writes its format
    without depending on it.
    """
    from safetensors.torch import save_file

    from dpn_lens.io import atomic_path

    _refuse_normalised_mlp(model, "steering-vectors decoder_block")
    path = _export_target(exported, path, ".safetensors", "a steering vector is saved as a .safetensors file")
    tensors = {f"layer_activations.{layer}": vector.contiguous() for layer, vector in exported.vectors.items()}
    metadata = {"format": "steering_vectors.SteeringVector", "layer_type": "decoder_block",
                "dpn_lens": json.dumps(exported.metadata)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_steering_vector(path: str | os.PathLike) -> Any:
    """A ``SteeringVector`` from ``export_steering_vector``'s file, or its kwargs without the library.

    Example:
        >>> vector = load_steering_vector("openness.safetensors")          # doctest: +SKIP
        >>> with vector.apply(hf_model):                                   # doctest: +SKIP
        ...     hf_model.generate(...)
    """
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != "steering_vectors.SteeringVector":
            raise ValueError(f"{path} is not a steering vector written by dpn-lens export")
        activations = {int(key.split(".")[1]): handle.get_tensor(key) for key in handle.keys()}
    kwargs = {"layer_activations": dict(sorted(activations.items())), "layer_type": metadata["layer_type"]}
    try:
        from steering_vectors import SteeringVector
    except ImportError:
        return kwargs
    return SteeringVector(**kwargs)


_AS_LLAMA: dict[str, dict[str, Any]] = {"qwen2": {"attention_bias": True}, "mistral": {"attention_bias": False}}
"""Model types whose decoder is a Llama decoder up to biases: the Llama options that express them."""


def _bias_config(config: Any, architecture: str) -> tuple[Any, str | None]:
    """A config for the biased copy: ``config`` with ``mlp_bias=True``, or a Llama config of the same network.

    Returns ``(config, the original architecture when it was re-expressed as Llama, else None)``.
    """
    if hasattr(config, "mlp_bias"):
        biased = copy.deepcopy(config)
        biased.mlp_bias = True
        return biased, None
    model_type = getattr(config, "model_type", None)
    if model_type not in _AS_LLAMA:
        raise ValueError(f"{type(config).__name__} has no `mlp_bias` option, so a saved model of it cannot carry an "
                         f"MLP output bias (supported: Llama-family configs, and {', '.join(sorted(_AS_LLAMA))} "
                         "saved as Llama); use --format gguf or steering-vectors (pre-norm models) or dpn-lens hooks")
    # Llama has no sliding window: the same network only when none is configured.
    if getattr(config, "use_sliding_window", model_type == "mistral") and getattr(config, "sliding_window", None):
        raise ValueError(f"this {model_type} config uses sliding-window attention (window "
                         f"{config.sliding_window}), which a Llama model cannot express; use --format gguf or "
                         "steering-vectors, or dpn-lens hooks")
    from transformers import LlamaConfig

    fields = {key: value for key, value in config.to_dict().items()
              if key not in ("model_type", "architectures", "transformers_version", "layer_types",
                             "use_sliding_window", "sliding_window", "max_window_layers")}
    return LlamaConfig(**{**fields, **_AS_LLAMA[model_type], "mlp_bias": True,
                          "architectures": ["LlamaForCausalLM"]}), architecture


def export_bias_model(model: HookedModel, exported: ExportedEdit, out: str | os.PathLike) -> Path:
    """Save the model with ``down_proj.bias = vector`` on each edited layer (``save_pretrained``).

    The config gets ``mlp_bias=True`` (Llama-family configs), which gives every gate/up/down
    projection a bias: all are zero except the edited layers' ``down_proj.bias``. Since the bias
    sits inside the MLP, this is exact for any block layout, but only configs with an ``mlp_bias``
    field can carry it. A Qwen2 or Mistral model is written as the same network in Llama form
    (``LlamaForCausalLM``: identical weight names; Qwen2's q/k/v biases kept, a zero o_proj bias
    added); a sliding-window config is refused. ``dpn_lens_edit.json`` in the folder records the
    edit and, for such a model, the original architecture.

    Example:
        >>> export_bias_model(model, exported_edit(model, edit), "smollm2-openness")   # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("smollm2-openness")                 # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    from dpn_lens.io import write_json_atomic

    hf = hf_model(model)
    config, re_expressed_from = _bias_config(hf.config, type(hf_module(hf)).__name__)
    if not exported.vectors:
        raise ValueError("the edit changes no neuron (all deltas are zero); nothing to export")
    # A TransformerBridge wraps every HF module (`._original_component` in the state dict keys):
    # rebuild a plain model from the config and copy the weights in, so save_pretrained writes
    # standard names.
    state = {key.replace("._original_component", ""): value for key, value in hf.state_dict().items()}
    dtype = next(hf.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    not_bias = [key for key in missing if not key.endswith("_proj.bias") and key != "lm_head.weight"]
    if unexpected and re_expressed_from is not None:
        raise ValueError(f"{re_expressed_from} weights {unexpected[:3]} have no place in the Llama form; "
                         "use --format gguf or steering-vectors, or dpn-lens hooks")
    if not_bias:
        raise ValueError(f"could not copy the weights into a plain {type(plain).__name__}: missing {not_bias[:3]}")
    if "lm_head.weight" in missing and not getattr(config, "tie_word_embeddings", False):
        raise ValueError("could not copy lm_head.weight into the exported model")
    with torch.no_grad():
        for name, param in plain.named_parameters():
            # the biases the copy adds (the original's own biases were loaded above)
            if name.endswith("_proj.bias") and name in missing:
                param.zero_()
        for layer, vector in exported.vectors.items():
            # added, not copied: a model that had MLP biases keeps its own
            plain.model.layers[layer].mlp.down_proj.bias.add_(vector.to(dtype))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if re_expressed_from is None:
        plain.config.architectures = list(getattr(hf.config, "architectures", None) or [type(plain).__name__])
    plain.save_pretrained(out)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    record = {**exported.metadata, "layers": sorted(exported.vectors), "bias": "model.layers.<layer>.mlp.down_proj.bias"}
    if re_expressed_from is not None:
        record["architecture"] = f"LlamaForCausalLM, the same network as the original {re_expressed_from}"
    write_json_atomic(out / "dpn_lens_edit.json", record)
    return out


def export_edit(model: HookedModel, edit: Intervention, fmt: Format, out: str | os.PathLike,
                **metadata: Any) -> Path:
    """Export ``edit`` (its all-positions form) as ``fmt`` to ``out``; returns the written path.

    Example:
        >>> from dpn_lens.steering import steering_intervention                     # doctest: +SKIP
        >>> edit = steering_intervention(neuron_map, 1.0, "increase")             # doctest: +SKIP
        >>> export_edit(model, edit, "gguf", "openness.gguf", trait="openness")    # doctest: +SKIP
    """
    writers = {"gguf": export_control_vector, "steering-vectors": export_steering_vector,
               "hf-bias": export_bias_model}
    if fmt not in writers:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return writers[fmt](model, exported_edit(model, edit, **metadata), out)
