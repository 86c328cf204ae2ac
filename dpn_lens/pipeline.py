"""The locate step for several traits at once, writing a run folder.

A run folder holds everything later steps need::

    RUN_DIR/stats/<trait>.safetensors   contrast statistics (mergeable, reusable with other settings)
    RUN_DIR/maps/<trait>.safetensors    neuron maps (+ <trait>.json, a readable copy of the config)
    RUN_DIR/summary.json                counts per trait, pole and layer, settings, timings
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dpn_lens.collect import CollectionConfig, collect_statistics
from dpn_lens.data import (
    ContrastiveSet,
    anthropic_persona_contrastive_set,
    embedded_contrastive_set,
    personalitybench_contrastive_set,
)
from dpn_lens.io import write_json_atomic
from dpn_lens.localize import LocalizationSettings, locate
from dpn_lens.neuron_map import NeuronMap
from dpn_lens.statistics import ContrastStatistics
from dpn_lens.traits import TRAITS, normalize_trait

__all__ = ["DATA_SOURCES", "contrastive_set_for", "locate_traits", "LocateRun", "parse_traits", "parse_layers",
           "load_run_maps"]

DATA_SOURCES = ("embedded", "personalitybench", "anthropic")


def parse_traits(text: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma-separated list (``"o,extraversion"``) -> canonical trait names."""
    if isinstance(text, str):
        if text.strip().lower() == "all":
            return list(TRAITS)
        text = [part for part in text.split(",") if part.strip()]
    return [normalize_trait(part) for part in text]


def parse_layers(text: str | None) -> list[int] | None:
    """``"12-31"`` or ``"3,5,7"`` -> layer list; ``None``/``"auto"`` -> None."""
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    layers: list[int] = []
    for part in str(text).split(","):
        if "-" in part:
            first, last = part.split("-", 1)
            layers += list(range(int(first), int(last) + 1))
        else:
            layers.append(int(part))
    return layers


def contrastive_set_for(trait: str, source: str = "embedded", n_pairs: int = 1000, seed: int = 42,
                        data_dir: str | Path | None = None) -> ContrastiveSet:
    """Build the contrastive set of one trait from a named source (see ``DATA_SOURCES``)."""
    if source == "embedded":
        return embedded_contrastive_set(trait, n_pairs=n_pairs, seed=seed)
    if source == "personalitybench":
        return personalitybench_contrastive_set(data_dir, trait, n_pairs=n_pairs, seed=seed)
    if source == "anthropic":
        return anthropic_persona_contrastive_set(data_dir, trait, n_pairs=min(n_pairs, 500), seed=seed)
    raise ValueError(f"unknown data source {source!r}; use one of {', '.join(DATA_SOURCES)}")


@dataclass
class LocateRun:
    """Maps and statistics of several traits on one model, with timings."""

    maps: dict[str, NeuronMap]
    stats: dict[str, ContrastStatistics]
    seconds: dict[str, float] = field(default_factory=dict)
    model_name: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts per trait, pole and layer, with settings and the share of neurons edited."""
        traits = {}
        for trait, neuron_map in self.maps.items():
            n_layers = int(neuron_map.fingerprint.get("n_layers", 0)) or len(neuron_map.stat_layers)
            traits[trait] = {
                "high": neuron_map.n_selected("high"), "low": neuron_map.n_selected("low"),
                "percent_of_searched_layers": 100 * neuron_map.fraction_selected(),
                "percent_of_all_mlp_neurons": 100 * neuron_map.n_selected() / (n_layers * neuron_map.d_mlp),
                "layers": neuron_map.settings.layer_range, "q": neuron_map.settings.q,
                "tau_d": neuron_map.settings.tau_d, "settings_source": neuron_map.settings.source,
                "settings_reason": neuron_map.settings.reason,
                "per_layer": {str(layer): list(counts) for layer, counts in neuron_map.counts_per_layer().items()},
                "n_pairs": neuron_map.n_high_samples, "data_source": neuron_map.data_source,
                "seconds": round(self.seconds.get(trait, 0.0), 1),
            }
        first = next(iter(self.maps.values()))
        return {"model": self.model_name, "fingerprint": first.fingerprint, "traits": traits}


def locate_traits(model: Any, traits: Sequence[str], source: str = "embedded", n_pairs: int = 1000,
                  seed: int = 42, data_dir: str | Path | None = None, settings: LocalizationSettings | None = None,
                  q: float | None = None, tau_d: float | None = None, layers: Sequence[int] | None = None,
                  out: str | Path | None = None, log: Callable[[str], None] = print,
                  **collect_kwargs: Any) -> LocateRun:
    """Collect statistics and locate neurons for each trait; save them under ``out`` if given.

    Example:
        >>> run = locate_traits(model, ["openness"], n_pairs=100, out="runs/quick")   # doctest: +SKIP
        >>> run.maps["openness"]                                                      # doctest: +SKIP
    """
    maps: dict[str, NeuronMap] = {}
    stats: dict[str, ContrastStatistics] = {}
    seconds: dict[str, float] = {}
    model_name = getattr(model, "dpn_model_name", "")
    for trait in traits:
        started = time.perf_counter()
        pairs = contrastive_set_for(trait, source, n_pairs, seed, data_dir)
        stats[trait] = collect_statistics(model, pairs, CollectionConfig(**collect_kwargs))
        maps[trait] = locate(stats[trait], settings=settings, model_name=model_name, q=q, tau_d=tau_d, layers=layers)
        seconds[trait] = time.perf_counter() - started
        log(f"{trait:>17}: {maps[trait]!r} [{seconds[trait]:.0f} s]")
        if out is not None:
            stats[trait].save(Path(out) / "stats" / f"{trait}.safetensors")
            maps[trait].save(Path(out) / "maps" / f"{trait}.safetensors")
    run = LocateRun(maps, stats, seconds, model_name)
    if out is not None:
        write_json_atomic(Path(out) / "summary.json", run.summary())
    return run


def load_run_maps(run_dir: str | Path, model: Any | None = None) -> dict[str, NeuronMap]:
    """All neuron maps of a run folder, keyed by trait (checked against ``model`` if given)."""
    folder = Path(run_dir) / "maps"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no neuron maps in {folder}; create them with `dpn-lens locate --out {run_dir}`")
    maps = {path.stem: NeuronMap.load(path, model=model) for path in files}
    return {trait: maps[trait] for trait in TRAITS if trait in maps}


def neuron_table(maps: dict[str, NeuronMap]) -> str:
    """Markdown table of selected neurons per layer (rows) and trait/pole (columns), with totals.

    The last rows give the total per column and the share of neurons edited: of the searched
    layers and of all MLP neurons of the model.
    """
    traits = list(maps)
    layers = sorted({layer for neuron_map in maps.values() for layer in neuron_map.layers})
    header = ["layer"] + [f"{trait[:5]} {pole}" for trait in traits for pole in ("high", "low")]
    rows = [header, ["---"] * len(header)]
    for layer in layers:
        row = [str(layer)]
        for trait in traits:
            counts = maps[trait].counts_per_layer().get(layer)
            row += ["-", "-"] if counts is None else [str(counts[0]), str(counts[1])]
        rows.append(row)
    rows.append(["total"] + [str(maps[t].n_selected(p)) for t in traits for p in ("high", "low")])
    searched, everything = ["% searched"], ["% all MLP"]
    for trait in traits:
        neuron_map = maps[trait]
        n_layers = int(neuron_map.fingerprint.get("n_layers", 0)) or len(neuron_map.stat_layers)
        for pole in ("high", "low"):
            count = neuron_map.n_selected(pole)
            searched.append(f"{100 * count / (len(neuron_map.layers) * neuron_map.d_mlp):.3f}")
            everything.append(f"{100 * count / (n_layers * neuron_map.d_mlp):.3f}")
    rows += [searched, everything]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("| " + " | ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)) + " |" for row in rows)
