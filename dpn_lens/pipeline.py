"""The locate step for several traits at once, writing a run folder (layout: ``dpn_lens.run``).

Example:
    >>> config = LocateConfig(traits=["openness"], n_pairs=100)          # doctest: +SKIP
    >>> run = locate_traits(model, config, out="runs/quick")             # doctest: +SKIP
    >>> run.maps["openness"]                                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import re
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
from dpn_lens.localize import LocalizationSettings, locate
from dpn_lens.neuron_map import NeuronMap
from dpn_lens.run import Run, percent_of_all_mlp
from dpn_lens.statistics import ContrastStatistics
from dpn_lens.traits import TRAITS, normalize_trait

__all__ = ["DATA_SOURCES", "LocateConfig", "contrastive_set_for", "locate_traits", "parse_traits", "parse_layers",
           "neuron_table"]

DATA_SOURCES = ("embedded", "personalitybench", "anthropic")


def parse_traits(text: str | Sequence[str]) -> list[str]:
    """``"all"`` or a comma-separated list (``"o,extraversion"``) -> canonical trait names.

    A list of strings (e.g. space-separated command-line values) may itself hold comma lists.

    Example:
        >>> parse_traits("o,E")
        ['openness', 'extraversion']
        >>> parse_traits(["openness,N", "a"])
        ['openness', 'neuroticism', 'agreeableness']
    """
    if isinstance(text, str):
        if text.strip().lower() == "all":
            return list(TRAITS)
        text = [part for part in text.split(",") if part.strip()]
    else:
        text = [part for item in text for part in str(item).split(",") if part.strip()]
        if [part.strip().lower() for part in text] == ["all"]:
            return list(TRAITS)
    if not text:
        # "--traits ," used to load the model and then collect nothing.
        raise ValueError(f"--traits names no trait; pass 'all' or a comma list such as openness,E "
                         f"(traits: {', '.join(TRAITS)})")
    return list(dict.fromkeys(normalize_trait(part) for part in text))


def parse_layers(text: str | None) -> list[int] | None:
    """``"12-31"`` or ``"3,5,7"`` -> layer list; ``None``/``"auto"`` -> None.

    Raises a ValueError naming the fix for anything else (a reversed range such as ``"5-3"``, a
    negative or non-integer layer, a layer listed twice), before any model is loaded.

    Example:
        >>> parse_layers("2-4,7")
        [2, 3, 4, 7]
    """
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    layers: list[int] = []
    hint = "write a range such as 12-31 or a list such as 3,5,7 (layers counted from 0)"
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(f"--layers {text!r}: {part.strip()!r} is not a layer or a range; {hint}")
        first = int(match.group(1))
        last = first if match.group(2) is None else int(match.group(2))
        if last < first:
            raise ValueError(f"--layers {text!r}: the range {part.strip()} runs backwards; write {last}-{first}")
        layers += list(range(first, last + 1))
    if len(set(layers)) != len(layers) or layers != sorted(layers):
        raise ValueError(f"--layers {text!r}: layers must be increasing and distinct; {hint}")
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
class LocateConfig:
    """What ``locate_traits`` locates, from which data, with which selection settings.

    Attributes:
        traits: canonical trait names (``parse_traits`` turns ``"all"`` / ``"o,E"`` into them).
        source: contrastive data source, one of ``DATA_SOURCES`` (``embedded`` needs no files).
        n_pairs, seed: contrastive pairs per trait and the seed of their draw.
        data_dir: the shared data folder for the file sources (default: ``$DPN_LENS_DATA``).
        settings: explicit ``LocalizationSettings`` (default: reference settings, else proposed).
        q, tau_d, layers: override single settings (None: keep the default's).
        collection: how activations are read and batched (``CollectionConfig``).

    Example:
        >>> LocateConfig(traits=["openness"], n_pairs=8).to_dict()["n_pairs"]
        8
    """

    traits: list[str] = field(default_factory=lambda: list(TRAITS))
    source: str = "embedded"
    n_pairs: int = 1000
    seed: int = 42
    data_dir: str | Path | None = None
    settings: LocalizationSettings | None = None
    q: float | None = None
    tau_d: float | None = None
    layers: Sequence[int] | None = None
    collection: CollectionConfig = field(default_factory=CollectionConfig)

    def __post_init__(self) -> None:
        self.traits = parse_traits(self.traits)
        if self.source not in DATA_SOURCES:
            raise ValueError(f"unknown data source {self.source!r}; use one of {', '.join(DATA_SOURCES)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (paths as strings)."""
        result = dataclasses.asdict(self)
        result["data_dir"] = None if self.data_dir is None else str(self.data_dir)
        result["layers"] = None if self.layers is None else list(self.layers)
        return result

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LocateConfig":
        """Inverse of ``to_dict``."""
        values = dict(values)
        if isinstance(values.get("settings"), dict):
            values["settings"] = LocalizationSettings(**values["settings"])
        if isinstance(values.get("collection"), dict):
            values["collection"] = CollectionConfig(**values["collection"])
        return cls(**values)


def locate_traits(model: Any, config: LocateConfig, out: str | Path | None = None,
                  log: Callable[[str], None] = print) -> Run:
    """Collect statistics and locate neurons for each trait; save them under ``out`` if given.

    Each trait's statistics and map are written as soon as they exist (a long run keeps its finished
    traits), ``summary.json`` at the end.

    Example:
        >>> run = locate_traits(model, LocateConfig(["openness"], n_pairs=100), out="runs/quick")   # doctest: +SKIP
        >>> run.maps["openness"]                                                                    # doctest: +SKIP
    """
    model_name = getattr(model, "dpn_model_name", "")
    run = Run(None if out is None else Path(out), {}, model_name=model_name)
    for trait in config.traits:
        started = time.perf_counter()
        pairs = contrastive_set_for(trait, config.source, config.n_pairs, config.seed, config.data_dir)
        stats: ContrastStatistics = collect_statistics(model, pairs, config.collection)
        run.stats[trait] = stats
        run.maps[trait] = locate(stats, settings=config.settings, model_name=model_name, q=config.q,
                                 tau_d=config.tau_d, layers=config.layers)
        run.seconds[trait] = time.perf_counter() - started
        log(f"{trait:>17}: {run.maps[trait]!r} [{run.seconds[trait]:.0f} s]")
        if out is not None:
            run.save_trait(trait)
    if out is not None:
        run.save_summary()
    else:
        run.summary = run.summary_dict()
    return run


def neuron_table(maps: dict[str, NeuronMap]) -> str:
    """Markdown table of selected neurons per layer (rows) and trait/pole (columns), with totals.

    The last rows give the total per column and the share of neurons edited: of the searched
    layers and of all MLP neurons of the model (``percent_of_all_mlp``).
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
        for pole in ("high", "low"):
            count = neuron_map.n_selected(pole)
            searched.append(f"{100 * count / (len(neuron_map.layers) * neuron_map.d_mlp):.3f}")
            everything.append(f"{percent_of_all_mlp(neuron_map, pole):.3f}")
    rows += [searched, everything]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("| " + " | ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)) + " |" for row in rows)
