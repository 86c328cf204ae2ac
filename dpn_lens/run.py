"""A run folder and the one object that reads and writes it.

A run folder (written by ``dpn-lens locate`` / ``dpn-lens demo``) holds everything later steps need::

    RUN_DIR/stats/<trait>.safetensors   contrast statistics (mergeable, reusable with other settings)
    RUN_DIR/maps/<trait>.safetensors    neuron maps (+ <trait>.json, a readable copy of the config)
    RUN_DIR/maps/README.md              model card: model, traits, neurons, settings, how to load
    RUN_DIR/summary.json                counts per trait, pole and layer, settings, timings
    RUN_DIR/summary.md                  the demo's readable summary
    RUN_DIR/report.html                 ``dpn-lens report``'s page

The file names live here as constants; ``Run`` loads and saves them, and every reader of a run folder
(locate, the studies, ``compare --maps``, the HTML report, the demo) goes through it.

Example:
    >>> run = Run.load("runs/demo")                       # doctest: +SKIP
    >>> run.traits                                        # doctest: +SKIP
    ['openness', 'conscientiousness', 'extraversion', 'agreeableness', 'neuroticism']
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpn_lens.io import write_json_atomic, write_text_atomic
from dpn_lens.neuron_map import NeuronMap
from dpn_lens.statistics import ContrastStatistics
from dpn_lens.traits import TRAITS

__all__ = ["Run", "MAPS_DIR", "STATS_DIR", "SUMMARY_FILE", "SUMMARY_MD_FILE", "REPORT_FILE", "MODEL_CARD_FILE", "map_path",
           "stats_path", "find_map", "percent_of_mlp", "percent_of_all_mlp", "read_summary", "model_card"]

MAPS_DIR = "maps"
"""Subfolder of the neuron maps, ``<trait>.safetensors`` (+ ``<trait>.json``)."""
STATS_DIR = "stats"
"""Subfolder of the contrast statistics, ``<trait>.safetensors``."""
SUMMARY_FILE = "summary.json"
"""Counts per trait, pole and layer, settings and timings (``Run.summary_dict``)."""
SUMMARY_MD_FILE = "summary.md"
"""The demo's readable summary."""
REPORT_FILE = "report.html"
"""Default page of ``dpn-lens report``."""
MAP_SUFFIX = ".safetensors"
MODEL_CARD_FILE = "README.md"
"""The maps folder's model card (``maps/README.md``), written by ``Run.save``."""


def map_path(folder: str | Path, trait: str) -> Path:
    """``folder/maps/<trait>.safetensors``.

    Example:
        >>> map_path("runs/demo", "openness").as_posix()
        'runs/demo/maps/openness.safetensors'
    """
    return Path(folder) / MAPS_DIR / f"{trait}{MAP_SUFFIX}"


def stats_path(folder: str | Path, trait: str) -> Path:
    """``folder/stats/<trait>.safetensors``."""
    return Path(folder) / STATS_DIR / f"{trait}{MAP_SUFFIX}"


def find_map(folder: str | Path, trait: str) -> Path | None:
    """The map file of ``trait`` in a maps folder (``folder/<trait>.safetensors``) or a run folder
    (``folder/maps/<trait>.safetensors``), whichever exists first; None if neither does."""
    for path in (Path(folder) / f"{trait}{MAP_SUFFIX}", map_path(folder, trait)):
        if path.exists():
            return path
    return None


def percent_of_mlp(count: int, n_layers: int, d_mlp: int) -> float:
    """``count`` neurons as a percentage of all ``n_layers * d_mlp`` MLP neurons of a model.

    The one formula behind every "% of all MLP neurons" the package writes (run summaries, the
    neuron table, the report, ``pct_edited`` of the comparison).

    Example:
        >>> percent_of_mlp(30, n_layers=30, d_mlp=1536)
        0.06510416666666667
    """
    return 100 * count / (n_layers * d_mlp)


def percent_of_all_mlp(neuron_map: NeuronMap, pole: str | None = None) -> float:
    """Selected neurons of ``pole`` (both when None) as a percentage of ALL MLP neurons of the model.

    The model's layer count comes from the map's fingerprint (the map may cover fewer layers); a map
    without one falls back to the layers it has statistics of.
    """
    n_layers = int(neuron_map.fingerprint.get("n_layers", 0)) or len(neuron_map.stat_layers)
    return percent_of_mlp(neuron_map.n_selected(pole), n_layers, neuron_map.d_mlp)


def _trait_order(trait: str) -> tuple[int, str]:
    # Big Five order first, any other trait after them, alphabetically.
    return (TRAITS.index(trait) if trait in TRAITS else len(TRAITS), trait)


@dataclass
class Run:
    """The neuron maps (and, when present, statistics) of one model, keyed by trait, and their folder.

    Attributes:
        folder: the run folder (None for a run that was never saved).
        maps: ``{trait: NeuronMap}`` in Big Five order.
        stats: ``{trait: ContrastStatistics}``; may be empty (the maps alone suffice for most uses).
        summary: what ``summary.json`` holds (read by ``load``; ``summary_dict`` computes it afresh).
        seconds: time spent per trait when the run was located.
        model_name: the model the maps were located on ("" when unknown).

    Example:
        >>> run = Run.load("runs/demo")                  # doctest: +SKIP
        >>> run.summary_dict()["traits"]["openness"]["percent_of_all_mlp_neurons"]   # doctest: +SKIP
    """

    folder: Path | None
    maps: dict[str, NeuronMap]
    stats: dict[str, ContrastStatistics] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    model_name: str = ""

    def __post_init__(self) -> None:
        self.folder = None if self.folder is None else Path(self.folder)
        if not self.model_name:
            self.model_name = str(self.summary.get("model") or self.summary.get("model_name") or "")

    @property
    def traits(self) -> list[str]:
        return list(self.maps)

    # ----- reading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, model: Any | None = None) -> "Run":
        """Load ``folder/maps/*.safetensors``, and ``stats/`` and ``summary.json`` where present.

        With ``model``, each map is refused (``IncompatibleModelError``) unless it was located on it.
        Traits come in Big Five order, any other trait after them.

        Raises:
            FileNotFoundError: the folder holds no maps.
            ValueError: the maps come from models of different widths.
        """
        folder = Path(folder)
        map_dir = folder / MAPS_DIR
        files = sorted(map_dir.glob(f"*{MAP_SUFFIX}")) if map_dir.is_dir() else []
        if not files:
            raise FileNotFoundError(f"no neuron maps in {map_dir}; pass the run folder written by `dpn-lens demo` "
                                    "or `dpn-lens locate --out` (it holds maps/<trait>.safetensors)")
        maps = {}
        for path in files:
            neuron_map = NeuronMap.load(path, model=model)
            maps[neuron_map.trait] = neuron_map
        maps = dict(sorted(maps.items(), key=lambda item: _trait_order(item[0])))
        d_mlps = {m.d_mlp for m in maps.values()}
        if len(d_mlps) > 1:
            raise ValueError(f"the maps in {map_dir} come from models of different widths {sorted(d_mlps)}; "
                             "put each model's maps in its own run folder")
        stats = {trait: ContrastStatistics.load(stats_path(folder, trait)) for trait in maps
                 if stats_path(folder, trait).exists()}
        return cls(folder, maps, stats, read_summary(folder))

    def require_stats(self, study: str) -> None:
        """Raise ``FileNotFoundError`` naming the missing files unless every trait has its statistics."""
        missing = [trait for trait in self.maps if trait not in self.stats]
        if missing:
            raise FileNotFoundError(
                f"the {study} study needs the contrast statistics of {', '.join(missing)}; expected "
                f"{Path(self.folder or '.') / STATS_DIR}/<trait>.safetensors (written by `dpn-lens locate` / "
                "`dpn-lens demo`)")

    # ----- the summary ----------------------------------------------------------------------------
    def summary_dict(self) -> dict[str, Any]:
        """JSON-ready counts per trait, pole and layer, with settings and the share of neurons edited.

        This is what ``save`` writes to ``summary.json`` (the demo adds its own keys to it).
        """
        traits = {}
        for trait, neuron_map in self.maps.items():
            settings = neuron_map.settings
            traits[trait] = {
                "high": neuron_map.n_selected("high"), "low": neuron_map.n_selected("low"),
                "percent_of_searched_layers": 100 * neuron_map.fraction_selected(),
                "percent_of_all_mlp_neurons": percent_of_all_mlp(neuron_map),
                "layers": settings.layer_range, "q": settings.q, "tau_d": settings.tau_d,
                "settings_source": settings.source, "settings_reason": settings.reason,
                "per_layer": {str(layer): list(counts) for layer, counts in neuron_map.counts_per_layer().items()},
                "n_pairs": neuron_map.n_high_samples, "data_source": neuron_map.data_source,
                "seconds": round(self.seconds.get(trait, 0.0), 1),
            }
        first = next(iter(self.maps.values()))
        return {"model": self.model_name, "fingerprint": first.fingerprint, "traits": traits}

    # ----- writing --------------------------------------------------------------------------------
    def _target(self, folder: str | Path | None) -> Path:
        target = folder if folder is not None else self.folder
        if target is None:
            raise ValueError("this run has no folder; pass one to save it")
        return Path(target)

    def save_trait(self, trait: str, folder: str | Path | None = None) -> None:
        """Write one trait's statistics (when held) and map (``stats/<trait>``, ``maps/<trait>``)."""
        target = self._target(folder)
        if trait in self.stats:
            self.stats[trait].save(stats_path(target, trait))
        self.maps[trait].save(map_path(target, trait))

    def save_summary(self, folder: str | Path | None = None) -> Path:
        """Write ``summary_dict()`` to ``summary.json`` (and keep it as ``self.summary``)."""
        self.summary = self.summary_dict()
        return write_json_atomic(self._target(folder) / SUMMARY_FILE, self.summary)

    def save(self, folder: str | Path | None = None) -> Path:
        """Write statistics, maps and ``summary.json`` to ``folder`` (default: ``self.folder``); returns it."""
        target = self._target(folder)
        for trait in self.maps:
            self.save_trait(trait, target)
        self.save_summary(target)
        write_text_atomic(target / MAPS_DIR / MODEL_CARD_FILE, model_card(self))
        return target


def model_card(run: Run) -> str:
    """The Markdown model card of a run's maps folder: model, traits, neurons, settings, how to load.

    Example:
        >>> print(model_card(run).splitlines()[0])          # doctest: +SKIP
        # DPN-LE neuron maps for smollm2-135m-instruct
    """
    first = next(iter(run.maps.values()))
    name = run.model_name or first.model_name or "(unknown model)"
    fingerprint = first.fingerprint
    revision = first.model_revision or "(not recorded)"
    rows = [f"| {trait} | {m.n_selected('high')} | {m.n_selected('low')} | {m.settings.layer_range} | {m.settings.q} "
            f"| {m.settings.tau_d} | {percent_of_all_mlp(m):.3f} | {m.n_high_samples} | {m.data_source or '-'} |"
            for trait, m in run.maps.items()]
    trait = next(iter(run.maps))
    return "\n".join([
        f"# DPN-LE neuron maps for {name}", "",
        f"- Model: `{name}`, revision `{revision}`",
        f"- Architecture: {fingerprint.get('architecture', '?')}, {fingerprint.get('n_layers', '?')} layers, "
        f"d_mlp {fingerprint.get('d_mlp', '?')}, d_model {fingerprint.get('d_model', '?')}",
        f"- Neurons: `{first.hook_name}` (the input of the MLP output projection), token position "
        f"`{first.token_position}`; written by dpn-lens {first.version}",
        "",
        "| trait | high neurons | low neurons | layers | q | tau_d | % of all MLP neurons | pairs per pole | data |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, "",
        "Each `<trait>.safetensors` holds the two pole sets, s and Cohen's d of every collected layer, the "
        "thresholds and the model fingerprint (`<trait>.json` is a readable copy). Loading a map into a "
        "different model is refused.", "",
        "## How to load", "",
        "```python",
        "from dpn_lens import load_model",
        "from dpn_lens.neuron_map import NeuronMap",
        "from dpn_lens.steering import steer, steering_intervention",
        "",
        f'model = load_model("{name}")',
        f'neuron_map = NeuronMap.load("maps/{trait}.safetensors", model=model)',
        'with steer(model, steering_intervention(neuron_map, gamma=1.0, direction="increase")):',
        '    print(model.generate("Tell me about your weekend.", max_new_tokens=40))',
        "```", "",
        "From the command line (`--map` takes these files):", "",
        "```bash",
        f'dpn-lens steer --model {name} --map maps/{trait}.safetensors --prompt "Tell me about your weekend."',
        f"dpn-lens export --model {name} --map maps/{trait}.safetensors --format gguf --out {trait}.gguf",
        "```", "",
    ])


def read_summary(folder: str | Path) -> dict[str, Any]:
    """``folder/summary.json`` as a dict; ``{}`` when the file does not exist."""
    path = Path(folder) / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
