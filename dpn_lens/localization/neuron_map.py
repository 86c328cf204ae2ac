"""The ``NeuronMap`` artifact: a trait's high-pole and low-pole neurons and what produced them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens._version import __version__
from dpn_lens.errors import IncompatibleModelError, WrongRuleError
from dpn_lens.hooked import HookedModel
from dpn_lens.localization.settings import LocalizationSettings
from dpn_lens.traits import normalize_pole

__all__ = ["NeuronMap", "IncompatibleModelError", "WrongRuleError", "DUAL_CRITERION"]

DUAL_CRITERION = "dpn-le"
"""The selection rule of the paper (``|s| > tau_q`` and ``|d| > tau_d``); other rules: ``dpn_lens.effect.rules``."""


@dataclass
class NeuronMap:
    """Per-layer indices of a trait's high-pole and low-pole neurons, with s, d and thresholds.

    Attributes:
        trait: Big Five trait.
        settings: layers searched, q, tau_d and where they came from.
        high, low: ``{layer: neuron indices}`` of the two (disjoint) pole sets.
        tau_q: ``{layer: |s| threshold}``.
        steering_value, effect_size: s and Cohen's d, ``[len(stat_layers), d_mlp]``, for every collected
            layer (``effect_size`` is saved under the tensor name ``cohens_d``).
        stat_layers: the model layers of the rows of ``steering_value`` and ``effect_size``.
        hook_name: hook point template, ``"blocks.{layer}.mlp.hook_post"``.
        fingerprint: the model's ``ModelFingerprint`` as a dict.
        model_name, model_revision: what to pass to ``load_model`` to get the model back, and which
            version of it (hub commit, GGUF digest, or ``weights:<hash>``); ``""`` in maps saved
            before these fields existed.
        rule: the selection rule that chose the neurons: ``"dpn-le"`` (the paper's dual criterion, the
            default and what maps saved before rules existed hold) or an effect rule of
            ``dpn_lens.effect.rules`` (``"attribution"``, ``"write"``, ...). The edit is the same
            ``±gamma * s`` on the selected neurons whatever the rule; an effect rule's poles are its
            neurons split by the sign of ``s``.
        effect_score: the per-neuron score an effect rule ranked (``[len(stat_layers), d_mlp]``, ``-inf``
            where a neuron was not a candidate), so the map can be re-selected at another budget
            (``localize.reselect(map, k=...)``); None for the dual criterion.
        selection: what the rule read and chose (budget, pairs, seed, ...), JSON-ready.

    Example:
        >>> neuron_map.save("runs/openness.safetensors")                      # doctest: +SKIP
        >>> NeuronMap.load("runs/openness.safetensors", model=model)          # doctest: +SKIP
        NeuronMap(trait='openness', high=52, low=49, layers=12-29, 0.43% of their neurons)
    """

    trait: str
    settings: LocalizationSettings
    high: dict[int, Int[Tensor, "n"]]
    low: dict[int, Int[Tensor, "n"]]
    tau_q: dict[int, float]
    steering_value: Float[Tensor, "n_stat_layers d_mlp"]
    effect_size: Float[Tensor, "n_stat_layers d_mlp"]
    stat_layers: list[int]
    hook_name: str = "blocks.{layer}.mlp.hook_post"
    fingerprint: dict[str, Any] = field(default_factory=dict)
    n_high_samples: int = 0
    n_low_samples: int = 0
    token_position: str = "last"
    data_source: str = ""
    version: str = ""
    model_name: str = ""
    model_revision: str = ""
    rule: str = DUAL_CRITERION
    effect_score: Float[Tensor, "n_stat_layers d_mlp"] | None = field(default=None, repr=False)
    selection: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.version:
            self.version = __version__
        if (self.rule == DUAL_CRITERION) != (self.effect_score is None):
            raise ValueError(f"a {self.rule!r} map {'has no' if self.effect_score is None else 'cannot have an'} "
                             "effect score: the dual criterion ranks by s and d, every other rule by its score")

    # ----- reading the map -------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.settings.layers)

    @property
    def d_mlp(self) -> int:
        return int(self.steering_value.shape[1])

    @property
    def n_model_layers(self) -> int:
        """Layers of the model the map was located on (its fingerprint; else the layers it has statistics of)."""
        return int(self.fingerprint.get("n_layers", 0)) or len(self.stat_layers)

    def pole(self, pole: str) -> dict[int, Tensor]:
        """``{layer: indices}`` of ``"high"`` or ``"low"``."""
        return self.high if normalize_pole(pole) == "high" else self.low

    def n_selected(self, pole: str | None = None) -> int:
        """Number of selected neurons of one pole, or of both when ``pole`` is None."""
        poles = ("high", "low") if pole is None else (pole,)
        return sum(int(indices.numel()) for p in poles for indices in self.pole(p).values())

    def fraction_selected(self) -> float:
        """Selected neurons (both poles) as a fraction of all neurons of the searched layers."""
        return self.n_selected() / (len(self.layers) * self.d_mlp)

    def selection_summary(self) -> dict[str, Any]:
        """Neurons per pole and the settings that chose them (what run summaries and control runs record)."""
        return {"rule": self.rule, "high": self.n_selected("high"), "low": self.n_selected("low"),
                "layers": self.settings.layer_range, "q": self.settings.q, "tau_d": self.settings.tau_d,
                "settings_source": self.settings.source}

    def counts_per_layer(self) -> dict[int, tuple[int, int]]:
        """``{layer: (n_high, n_low)}``."""
        return {layer: (int(self.high[layer].numel()), int(self.low[layer].numel())) for layer in self.layers}

    def values_at(self, layer: int, indices: Tensor) -> tuple[Tensor, Tensor]:
        """``(s, d)`` of the given neurons of ``layer``."""
        row = self.stat_layers.index(layer)
        return self.steering_value[row, indices], self.effect_size[row, indices]

    def neurons(self, pole: str | None = None) -> list[dict[str, Any]]:
        """One row per selected neuron: pole, layer, neuron, s, d (sorted by layer, then |d|)."""
        rows = []
        for p in ("high", "low") if pole is None else (normalize_pole(pole),):
            for layer, indices in self.pole(p).items():
                s, d = self.values_at(layer, indices)
                rows += [{"pole": p, "layer": layer, "neuron": int(i), "s": float(si), "d": float(di)}
                         for i, si, di in zip(indices.tolist(), s.tolist(), d.tolist())]
        return sorted(rows, key=lambda r: (r["pole"], r["layer"], -abs(r["d"])))

    def __repr__(self) -> str:
        rule = "" if self.rule == DUAL_CRITERION else f", rule={self.rule!r}"
        return (f"NeuronMap(trait={self.trait!r}{rule}, high={self.n_selected('high')}, low={self.n_selected('low')}, "
                f"layers={self.settings.layer_range}, {100 * self.fraction_selected():.2f}% of their neurons)")

    # ----- compatibility --------------------------------------------------------------------
    def check_compatible(self, model: HookedModel) -> None:
        """Raise ``IncompatibleModelError`` unless ``model`` is the model this map was located on."""
        from dpn_lens.models import ModelFingerprint, model_fingerprint

        if not self.fingerprint:
            raise IncompatibleModelError("this neuron map records no model fingerprint; it cannot be checked")
        theirs = model_fingerprint(model)
        mine = ModelFingerprint.from_dict(self.fingerprint)
        differences = mine.differences(theirs)
        if differences:
            raise IncompatibleModelError(
                f"this {self.trait} neuron map was located on a different model ({'; '.join(differences)}); "
                "locate the trait on this model with `dpn-lens locate` (or dpn_lens.locate) instead"
            )

    # ----- persistence ----------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        def flat(sets: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
            layers = [torch.full((indices.numel(),), layer, dtype=torch.long) for layer, indices in sets.items()]
            neurons = [indices.to(torch.long).cpu() for indices in sets.values()]
            return torch.cat(layers) if layers else torch.zeros(0, dtype=torch.long), (
                torch.cat(neurons) if neurons else torch.zeros(0, dtype=torch.long))

        high_layers, high_neurons = flat(self.high)
        low_layers, low_neurons = flat(self.low)
        tensors = {"steering_value": self.steering_value.detach().cpu().contiguous(),
                   "cohens_d": self.effect_size.detach().cpu().contiguous(),
                   "high_layers": high_layers, "high_neurons": high_neurons,
                   "low_layers": low_layers, "low_neurons": low_neurons}
        if self.effect_score is not None:
            tensors["effect_score"] = self.effect_score.detach().cpu().to(torch.float32).contiguous()
        return tensors

    def config(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-ready data."""
        return {
            "kind": "dpn_lens.NeuronMap", "version": self.version, "trait": self.trait,
            "settings": {"layers": self.settings.layers, "q": self.settings.q, "tau_d": self.settings.tau_d,
                         "source": self.settings.source, "reason": self.settings.reason},
            "tau_q": {str(layer): value for layer, value in self.tau_q.items()},
            "stat_layers": self.stat_layers, "hook_name": self.hook_name, "fingerprint": self.fingerprint,
            "n_high_samples": self.n_high_samples, "n_low_samples": self.n_low_samples,
            "token_position": self.token_position, "data_source": self.data_source,
            "model_name": self.model_name, "model_revision": self.model_revision,
            "rule": self.rule, "selection": self.selection,
            "counts": {"high": self.n_selected("high"), "low": self.n_selected("low"),
                       "fraction_of_searched_layers": self.fraction_selected()},
        }

    def save(self, path: str | os.PathLike, write_json: bool = True) -> Path:
        """Save as ``path`` (safetensors: tensors + config as metadata), atomically.

        With ``write_json`` a readable copy of the config is written beside it (``<stem>.json``);
        loading reads only the safetensors file.
        """
        from safetensors.torch import save_file

        from dpn_lens.io import atomic_path, write_json_atomic
        from dpn_lens.artifacts import artifact_metadata

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"neuron maps are saved as .safetensors files; got {path.name!r}")
        tensors = self._tensors()
        config = self.config()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=artifact_metadata("dpn_lens_neuron_map", tensors, config))
        if write_json:
            write_json_atomic(path.with_suffix(".json"), config)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: HookedModel | None = None, rule: str | None = None) -> "NeuronMap":
        """Load a saved map; with ``model``, refuse it unless it was located on that model; with ``rule``,
        refuse it unless that selection rule made it (``WrongRuleError``).

        Example:
            >>> NeuronMap.load("runs/demo/maps/openness.safetensors", rule="attribution")   # doctest: +SKIP
            Traceback (most recent call last):
            WrongRuleError: runs/demo/maps/openness.safetensors holds a 'dpn-le' map, not an 'attribution' map; ...
        """
        from dpn_lens.artifacts import load_artifact

        tensors, config = load_artifact(path, "dpn_lens_neuron_map")
        found = config.get("rule", DUAL_CRITERION)   # maps saved before rules existed: the dual criterion
        if rule is not None and found != rule:
            raise WrongRuleError(f"{path} holds a {found!r} map, not a {rule!r} map; pass the {rule} map (a control "
                                 f"run keeps effect maps in maps/<rule>/), or ask for rule={found!r}")

        def unflat(prefix: str, layers: list[int]) -> dict[int, Tensor]:
            owner, neurons = tensors[f"{prefix}_layers"], tensors[f"{prefix}_neurons"]
            return {layer: neurons[owner == layer].clone() for layer in layers}

        settings = LocalizationSettings(**config["settings"])
        neuron_map = cls(
            trait=config["trait"], settings=settings, high=unflat("high", settings.layers),
            low=unflat("low", settings.layers), tau_q={int(k): v for k, v in config["tau_q"].items()},
            steering_value=tensors["steering_value"], effect_size=tensors["cohens_d"],
            stat_layers=list(config["stat_layers"]), hook_name=config["hook_name"],
            fingerprint=config["fingerprint"], n_high_samples=config["n_high_samples"],
            n_low_samples=config["n_low_samples"], token_position=config["token_position"],
            data_source=config["data_source"], version=config["version"],
            # older map files have no model name/revision: they load with "" (unknown)
            model_name=config.get("model_name", ""), model_revision=config.get("model_revision", ""),
            rule=found, effect_score=tensors.get("effect_score"), selection=dict(config.get("selection") or {}),
        )
        if model is not None:
            neuron_map.check_compatible(model)
        return neuron_map
