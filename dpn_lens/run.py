"""A run folder and the one object that reads and writes it.

A run folder (written by ``dpn-lens locate`` / ``dpn-lens demo``) holds everything later steps need::

    RUN_DIR/stats/<trait>.safetensors   contrast statistics (mergeable, reusable with other settings)
    RUN_DIR/maps/<trait>.safetensors    neuron maps (+ <trait>.json, a readable copy of the config)
    RUN_DIR/maps/README.md              model card: model, traits, neurons, settings, how to load
    RUN_DIR/summary.json                counts per trait, pole and layer, settings, timings
    RUN_DIR/summary.md                  the demo's readable summary
    RUN_DIR/report.html                 ``dpn-lens report``'s page
    RUN_DIR/manifest.json               settings, model fingerprint, data, per-trait status and checksums
    RUN_DIR/.lock                       held while a process writes the folder

A run folder is a transaction: ``manifest.json`` (written atomically) says whether the run is
``complete`` or still ``running`` (interrupted), which traits are done, and the SHA-256 of each
trait's map and statistics. Every reader (``Run.load``, so the studies and the report; ``steer`` and
``compare --run`` through ``check_run_folder``) refuses an incomplete folder or one holding maps of
another run, saying how to finish or redo it. Writers hold ``RUN_DIR/.lock`` (``lock_run_folder``), so a
second writer is refused. Folders without a manifest (written by older versions) are read with a warning.

The file names live here as constants; ``Run`` loads and saves them, and every reader of a run folder
(locate, the studies, ``compare --run``, the HTML report, the demo) goes through it.

Example:
    >>> run = Run.load("runs/demo")                       # doctest: +SKIP
    >>> run.traits                                        # doctest: +SKIP
    ['openness', 'conscientiousness', 'extraversion', 'agreeableness', 'neuroticism']
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from dpn_lens.io import write_json_atomic, write_text_atomic
from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.collection.statistics import ContrastStatistics
from dpn_lens.traits import TRAITS

__all__ = ["Run", "MAPS_DIR", "STATS_DIR", "SUMMARY_FILE", "SUMMARY_MD_FILE", "REPORT_FILE", "MODEL_CARD_FILE",
           "map_path", "rule_map_path", "stats_path", "find_map", "percent_of_mlp", "percent_of_all_mlp", "read_summary",
           "model_card", "MANIFEST_FILE", "LOCK_FILE", "RunFolderError", "lock_run_folder", "read_manifest",
           "write_manifest", "check_run_folder", "check_runs_of", "file_sha256", "run_folder_of"]

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
MANIFEST_FILE = "manifest.json"
"""The run's settings, model fingerprint, data, per-trait status and checksums (``write_manifest``)."""
LOCK_FILE = ".lock"
"""Lock file held by the process writing the folder (``lock_run_folder``)."""
MAP_SUFFIX = ".safetensors"
MODEL_CARD_FILE = "README.md"
"""The maps folder's model card (``maps/README.md``), written by ``Run.save``."""
MANIFEST_FORMAT = 1


class RunFolderError(ValueError):
    """A run folder that must not be read or written as asked: locked, incomplete, mixed, other settings."""


@contextlib.contextmanager
def lock_run_folder(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder/.lock`` while writing; a second writer gets a ``RunFolderError`` at once.

    Example:
        >>> with lock_run_folder("runs/quick"):          # doctest: +SKIP
        ...     pass                                      # write maps, stats, the manifest
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderError(f"another process is writing {folder} (it holds {folder / LOCK_FILE}); wait for it to "
                             "finish, or pass another --out") from None
    try:
        yield folder
    finally:
        lock.release()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """``folder/manifest.json`` as a dict, or None when the folder has none (an older run)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path} is not valid JSON ({error.msg}); redo the run with `dpn-lens locate --overwrite`")


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` atomically to ``folder/manifest.json``."""
    return write_json_atomic(Path(folder) / MANIFEST_FILE, manifest)


def trait_record(folder: str | Path, trait: str, rules: Sequence[str] = ()) -> dict[str, Any]:
    """The manifest entry of a finished trait: status and the checksums of its map, the maps of the effect
    ``rules`` (``maps/<rule>/<trait>``) and its statistics."""
    record: dict[str, Any] = {"status": "done", "map_sha256": file_sha256(map_path(folder, trait))}
    if rules:
        record["rule_maps_sha256"] = {rule: file_sha256(rule_map_path(folder, trait, rule)) for rule in rules}
    if stats_path(folder, trait).exists():
        record["stats_sha256"] = file_sha256(stats_path(folder, trait))
    return record


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder a map file or maps folder belongs to (``RUN/maps/x.safetensors`` and an effect rule's
    ``RUN/maps/<rule>/x.safetensors`` -> ``RUN``), else None."""
    path = Path(path)
    for candidate in (path, path.parent, path.parent.parent, path.parent.parent.parent):
        if (candidate / MANIFEST_FILE).exists() or (candidate / MAPS_DIR).is_dir():
            return candidate
    return None


def check_runs_of(paths: Sequence[str | Path | None]) -> None:
    """``check_run_folder`` on the run folder each of ``paths`` (a map file, a maps folder or a run folder;
    None: nothing given) belongs to, each folder once: what a command refuses before its model loads.

    Raises:
        RunFolderError: a run is unfinished or a folder mixes runs.
    """
    for folder in dict.fromkeys(run_folder_of(path) for path in paths if path):
        if folder is not None:
            check_run_folder(folder)


_WARNED_OLD: set[Path] = set()


def check_run_folder(folder: str | Path) -> dict[str, Any] | None:
    """Refuse a run folder that is incomplete or mixed; return its manifest (None for an older run).

    Checks: the run finished (``status == "complete"``); every map in ``maps/`` belongs to a trait the
    manifest lists as done, with the recorded checksum (a map copied in from another run, or one
    written by a second run into the same folder, is named). A folder without ``manifest.json``
    (written before manifests existed) is read with a warning.

    Raises:
        RunFolderError: naming the problem and how to finish or redo the run.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        if folder.resolve() in _WARNED_OLD:
            return None
        _WARNED_OLD.add(folder.resolve())   # once per folder and process: a report reads it several times
        warnings.warn(f"{folder} has no {MANIFEST_FILE} (a run from an older version): its maps are read without "
                      "checking that they belong to one complete run", UserWarning, stacklevel=2)
        return None
    traits = manifest.get("traits", {})
    done = [trait for trait, record in traits.items() if record.get("status") == "done"]
    if manifest.get("status") != "complete":
        pending = [trait for trait in traits if trait not in done]
        raise RunFolderError(
            f"{folder} holds an unfinished run (done: {', '.join(done) or 'none'}; not done: {', '.join(pending)}); "
            f"finish it with `dpn-lens locate --out {folder} --resume` and the same options, or redo it with --overwrite")
    map_dir = folder / MAPS_DIR
    for path in sorted(map_dir.glob(f"*{MAP_SUFFIX}")) if map_dir.is_dir() else []:
        trait = path.name[: -len(MAP_SUFFIX)]
        record = traits.get(trait)
        if record is None or record.get("status") != "done":
            raise RunFolderError(f"{path} is not part of the run recorded in {folder / MANIFEST_FILE} (its traits: "
                                 f"{', '.join(done)}): the folder mixes runs; remove that file, or redo the run "
                                 "with `dpn-lens locate --overwrite`")
        if record.get("map_sha256") and file_sha256(path) != record["map_sha256"]:
            raise RunFolderError(f"{path} was replaced after the run that {folder / MANIFEST_FILE} records (checksum "
                                 "differs): the folder mixes runs; redo it with `dpn-lens locate --overwrite`")
        for rule, checksum in (record.get("rule_maps_sha256") or {}).items():
            rule_file = rule_map_path(folder, trait, rule)
            if not rule_file.exists() or file_sha256(rule_file) != checksum:
                raise RunFolderError(f"{rule_file} is missing or was replaced after the run that "
                                     f"{folder / MANIFEST_FILE} records: redo the run with `dpn-lens locate --overwrite`")
        stats = stats_path(folder, trait)
        if record.get("stats_sha256") and stats.exists() and file_sha256(stats) != record["stats_sha256"]:
            raise RunFolderError(f"{stats} was replaced after the run that {folder / MANIFEST_FILE} records "
                                 "(checksum differs): redo the run with `dpn-lens locate --overwrite`")
    return manifest


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


def rule_map_path(folder: str | Path, trait: str, rule: str) -> Path:
    """Where a run folder keeps ``trait``'s map of a selection rule: ``maps/<trait>.safetensors`` for the
    dual criterion (``dpn-le``), ``maps/<rule>/<trait>.safetensors`` for an effect rule.

    Example:
        >>> rule_map_path("runs/control", "openness", "attribution").as_posix()
        'runs/control/maps/attribution/openness.safetensors'
    """
    if rule == "dpn-le":
        return map_path(folder, trait)
    return Path(folder) / MAPS_DIR / rule / f"{trait}{MAP_SUFFIX}"


def find_map(folder: str | Path, trait: str, rule: str = "dpn-le") -> Path | None:
    """The map file of ``trait`` (and selection ``rule``) in a maps folder (``folder/<trait>.safetensors``,
    ``folder/<rule>/<trait>.safetensors``) or a run folder (``rule_map_path``), whichever exists first;
    None if none does."""
    inside = Path(folder) / f"{trait}{MAP_SUFFIX}" if rule == "dpn-le" else Path(folder) / rule / f"{trait}{MAP_SUFFIX}"
    for path in (inside, rule_map_path(folder, trait, rule)):
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
        rule_maps: ``{rule: {trait: NeuronMap}}`` of effect rules (``dpn_lens.effect.rules``), kept in
            ``maps/<rule>/<trait>.safetensors`` beside the DPN-LE maps they were selected from.

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
    rule_maps: dict[str, dict[str, NeuronMap]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = None if self.folder is None else Path(self.folder)
        if not self.model_name:
            self.model_name = str(self.summary.get("model") or self.summary.get("model_name") or "")

    @property
    def traits(self) -> list[str]:
        return list(self.maps)

    def rules_of(self, trait: str) -> list[str]:
        """The effect rules that have a map of ``trait`` in this run."""
        return [rule for rule, maps in self.rule_maps.items() if trait in maps]

    # ----- reading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, model: Any | None = None, check: bool = True) -> "Run":
        """Load ``folder/maps/*.safetensors``, and ``stats/`` and ``summary.json`` where present.

        With ``model``, each map is refused (``IncompatibleModelError``) unless it was located on it.
        With ``check`` (default), the folder's manifest is checked first (``check_run_folder``).
        Traits come in Big Five order, any other trait after them.

        Raises:
            FileNotFoundError: the folder holds no maps.
            RunFolderError: the run is unfinished or the folder mixes runs.
            ValueError: the maps come from models of different widths.
        """
        folder = Path(folder)
        if check and folder.is_dir():
            check_run_folder(folder)
        map_dir = folder / MAPS_DIR
        files = sorted(map_dir.glob(f"*{MAP_SUFFIX}")) if map_dir.is_dir() else []
        if not files:
            raise FileNotFoundError(f"no neuron maps in {map_dir}; pass the run folder written by `dpn-lens demo` "
                                    "or `dpn-lens locate --out` (it holds maps/<trait>.safetensors)")
        maps = {}
        for path in files:
            # maps/<trait> holds the dual criterion's map; an effect rule's map there would be taken for it
            neuron_map = NeuronMap.load(path, model=model, rule="dpn-le")
            maps[neuron_map.trait] = neuron_map
        rule_maps: dict[str, dict[str, NeuronMap]] = {}
        for rule_dir in sorted(path for path in map_dir.iterdir() if path.is_dir()):
            for path in sorted(rule_dir.glob(f"*{MAP_SUFFIX}")):
                neuron_map = NeuronMap.load(path, model=model, rule=rule_dir.name)
                rule_maps.setdefault(rule_dir.name, {})[neuron_map.trait] = neuron_map
        maps = dict(sorted(maps.items(), key=lambda item: _trait_order(item[0])))
        d_mlps = {m.d_mlp for m in maps.values()}
        if len(d_mlps) > 1:
            raise ValueError(f"the maps in {map_dir} come from models of different widths {sorted(d_mlps)}; "
                             "put each model's maps in its own run folder")
        stats = {trait: ContrastStatistics.load(stats_path(folder, trait)) for trait in maps
                 if stats_path(folder, trait).exists()}
        return cls(folder, maps, stats, read_summary(folder), rule_maps=rule_maps)

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
            traits[trait] = {
                **neuron_map.selection_summary(),
                "percent_of_searched_layers": 100 * neuron_map.fraction_selected(),
                "percent_of_all_mlp_neurons": percent_of_all_mlp(neuron_map),
                "settings_reason": neuron_map.settings.reason,
                "per_layer": {str(layer): list(counts) for layer, counts in neuron_map.counts_per_layer().items()},
                "n_pairs": neuron_map.n_high_samples, "data_source": neuron_map.data_source,
                "seconds": round(self.seconds.get(trait, 0.0), 1),
            }
        first = next(iter(self.maps.values()))
        summary = {"model": self.model_name, "fingerprint": first.fingerprint, "traits": traits}
        if self.rule_maps:
            summary["rules"] = {rule: {trait: {**neuron_map.selection_summary(),
                                               "percent_of_all_mlp_neurons": percent_of_all_mlp(neuron_map),
                                               "selection": neuron_map.selection}
                                       for trait, neuron_map in maps.items()}
                                for rule, maps in self.rule_maps.items()}
        return summary

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
        for rule, maps in self.rule_maps.items():
            if trait in maps:
                maps[trait].save(rule_map_path(target, trait, rule))

    def save_summary(self, folder: str | Path | None = None) -> Path:
        """Write ``summary_dict()`` to ``summary.json`` (and keep it as ``self.summary``)."""
        self.summary = self.summary_dict()
        return write_json_atomic(self._target(folder) / SUMMARY_FILE, self.summary)

    def save(self, folder: str | Path | None = None) -> Path:
        """Write statistics, maps, ``summary.json`` and a complete ``manifest.json`` to ``folder``
        (default: ``self.folder``), holding its lock; returns it."""
        target = self._target(folder)
        with lock_run_folder(target):
            for trait in self.maps:
                self.save_trait(trait, target)
            self.save_summary(target)
            write_text_atomic(target / MAPS_DIR / MODEL_CARD_FILE, model_card(self))
            first = next(iter(self.maps.values()))
            write_manifest(target, {"format": MANIFEST_FORMAT, "status": "complete", "model": self.model_name,
                                    "fingerprint": first.fingerprint, "settings": None,
                                    "traits": {trait: trait_record(target, trait, self.rules_of(trait))
                                               for trait in self.maps}})
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
        "from dpn_lens.localization.neuron_map import NeuronMap",
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
