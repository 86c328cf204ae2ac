"""The locate step for several traits at once, writing a run folder (layout: ``dpn_lens.run``).

Example:
    >>> config = LocateConfig(traits=["openness"], n_pairs=100)          # doctest: +SKIP
    >>> run = locate_traits(model, config, out="runs/quick")             # doctest: +SKIP
    >>> run.maps["openness"]                                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from dpn_lens.collection.collect import CollectionConfig, collect_statistics
from dpn_lens.data import (
    ContrastiveSet,
    anthropic_persona_contrastive_set,
    embedded_contrastive_set,
    personalitybench_contrastive_set,
)
from dpn_lens.effect.rules import SELECTION_PAIRS, SELECTION_TOKENS, select_by_effect
from dpn_lens.generation import GENERATION_BATCH
from dpn_lens.localization.localize import LocalizationSettings, locate
from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.io import write_text_atomic
from dpn_lens.run import (MANIFEST_FILE, MANIFEST_FORMAT, MAPS_DIR, MODEL_CARD_FILE, STATS_DIR, SUMMARY_FILE, Run, RunFolderError,
                          file_sha256, lock_run_folder, model_card, percent_of_all_mlp, read_manifest, stats_path, trait_record,
                          write_manifest)
from dpn_lens.collection.statistics import ContrastStatistics
from dpn_lens.traits import TRAITS, normalize_trait

__all__ = ["DATA_SOURCES", "LocateConfig", "contrastive_set_for", "locate_traits", "parse_traits", "parse_layers",
           "parse_rules",
           "neuron_table", "check_run_target"]

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


def parse_rules(text: str | Sequence[str]) -> list[str]:
    """``"attribution,write"`` (or a list) -> the selection rules named, checked, ``dpn-le`` first.

    Example:
        >>> parse_rules("write-layer,attribution")
        ['dpn-le', 'write-layer', 'attribution']
    """
    from dpn_lens.effect.rules import rule_named

    parts = text.split(",") if isinstance(text, str) else [part for item in text for part in str(item).split(",")]
    names = [rule_named(part.strip()).name for part in parts if part.strip()]
    if not names:
        raise ValueError("--select names no rule; pass dpn-le or an effect rule such as attribution")
    return list(dict.fromkeys(["dpn-le", *names]))


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
        select: selection rules to run (``dpn_lens.effect.rules``): the DPN-LE map is always made (the
            effect rules start from its ``s``); each effect rule named here adds ``maps/<rule>/<trait>``.
        budget, selection_pairs, selection_seed, selection_tokens, selection_batch: the effect rules' neuron
            count (None: DPN-LE's, at most 0.5% of the MLP neurons), selection pairs drawn per trait, the
            seed of their draw, their answers' length in tokens and how many are generated at a time.

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
    select: list[str] = field(default_factory=lambda: ["dpn-le"])
    budget: int | None = None
    selection_pairs: int = SELECTION_PAIRS
    selection_seed: int = 0
    selection_tokens: int = SELECTION_TOKENS
    selection_batch: int = GENERATION_BATCH

    def __post_init__(self) -> None:
        self.traits = parse_traits(self.traits)
        if self.source not in DATA_SOURCES:
            raise ValueError(f"unknown data source {self.source!r}; use one of {', '.join(DATA_SOURCES)}")
        self.select = parse_rules(self.select)
        from dpn_lens.numbers import as_float, as_int

        self.n_pairs = as_int(self.n_pairs, "n_pairs", "1000", minimum=1)
        self.seed = as_int(self.seed, "seed", "42")
        self.q = None if self.q is None else as_float(self.q, "q", "0.995")
        self.tau_d = None if self.tau_d is None else as_float(self.tau_d, "tau_d", "0.5")
        self.budget = None if self.budget is None else as_int(self.budget, "budget", "64", minimum=1)
        self.selection_pairs = as_int(self.selection_pairs, "selection_pairs", "128", minimum=2)
        self.selection_seed = as_int(self.selection_seed, "selection_seed", "0")
        self.selection_tokens = as_int(self.selection_tokens, "selection_tokens", "48", minimum=1)
        self.selection_batch = as_int(self.selection_batch, "selection_batch", str(GENERATION_BATCH), minimum=1)

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


# Collection options that change only speed or display, not the statistics: they may differ on --resume.
_SPEED_ONLY = ("max_batch_size", "max_batch_tokens", "progress", "statistics_device")


def _run_settings(config: LocateConfig) -> dict[str, Any]:
    """What must match for two runs to be the same run: the config without speed-only options."""
    settings = config.to_dict()
    settings["collection"] = {key: value for key, value in settings["collection"].items() if key not in _SPEED_ONLY}
    settings["collection"]["layers"] = (None if config.collection.layers is None
                                        else list(config.collection.layers))
    settings["data_dir"] = None if config.data_dir is None else str(Path(config.data_dir).expanduser().resolve())
    return json.loads(json.dumps(settings, default=str))


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``["n_pairs: 60 -> 40", ...]`` for the keys whose values differ."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def _fingerprint_of(model: Any) -> dict[str, Any] | None:
    from dpn_lens.models import model_fingerprint

    try:
        return model_fingerprint(model).to_dict()
    except Exception:  # a duck-typed test double without tokenizer/weights: nothing to record
        return None


def _clear_run(folder: Path) -> None:
    """Remove the artifacts of an earlier run (``--overwrite``); other files in the folder stay."""
    for sub in (MAPS_DIR, STATS_DIR):
        for path in (folder / sub).glob("*") if (folder / sub).is_dir() else []:
            if path.is_file():
                path.unlink()
    for name in (SUMMARY_FILE, MANIFEST_FILE):
        (folder / name).unlink(missing_ok=True)


def check_run_target(out: str | Path, config: LocateConfig, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse, before any model loads, a ``locate`` into ``out`` that ``locate_traits`` would refuse.

    Checks what needs no model: another writer holding the folder, a run with other settings, a
    folder of an older run, ``--resume`` with nothing to resume. (The model fingerprint is compared
    again, with the model, when the run starts.) Changes nothing on disk.

    Example:
        >>> check_run_target("runs/quick", LocateConfig(["openness"], n_pairs=100))   # doctest: +SKIP
    """
    folder = Path(out)
    if not folder.is_dir():
        if resume:
            raise RunFolderError(f"nothing to resume in {folder} (it does not exist); run without --resume")
        return
    with lock_run_folder(folder):
        _prepare_folder(folder, _run_settings(config), None, resume, overwrite, dry_run=True)


def _prepare_folder(folder: Path, settings: dict[str, Any], fingerprint: dict[str, Any] | None, resume: bool,
                    overwrite: bool, dry_run: bool = False) -> dict[str, Any] | None:
    """Decide what an existing run folder means for this run; returns the earlier manifest to resume from.

    ``dry_run`` only raises what would be refused, removing nothing."""
    manifest = read_manifest(folder)
    has_artifacts = any((folder / sub).is_dir() and any((folder / sub).iterdir()) for sub in (MAPS_DIR, STATS_DIR))
    if overwrite:
        if resume:
            raise ValueError("--resume and --overwrite contradict each other: --resume keeps finished traits, "
                             "--overwrite discards them; pass one")
        if not dry_run:
            _clear_run(folder)
        return None
    if manifest is None:
        if has_artifacts:
            raise RunFolderError(f"{folder} already holds maps or statistics of another run (without a manifest); "
                                 "pass --overwrite to replace them, or choose another --out")
        if resume:
            raise RunFolderError(f"nothing to resume in {folder} (no {MANIFEST_FILE}); run without --resume")
        return None
    differences = _differences(manifest.get("settings") or {}, settings)
    if fingerprint and manifest.get("fingerprint") and manifest["fingerprint"] != fingerprint:
        differences.insert(0, "model fingerprint differs")
    if differences:
        raise RunFolderError(f"{folder} holds a run with other settings ({'; '.join(differences[:4])}"
                             f"{'; ...' if len(differences) > 4 else ''}); pass --overwrite to replace it, or choose "
                             "another --out" + (" (--resume needs the same settings)" if resume else ""))
    if not resume:
        # The same settings again: a fresh run of the same experiment replaces the old one.
        if not dry_run:
            _clear_run(folder)
        return None
    return manifest


def locate_traits(model: Any, config: LocateConfig, out: str | Path | None = None,
                  log: Callable[[str], None] = print, resume: bool = False, overwrite: bool = False) -> Run:
    """Collect statistics and locate neurons for each trait; save them under ``out`` if given.

    With ``out``, the folder is a transaction (``dpn_lens.run``): its lock is held throughout, a
    ``manifest.json`` records settings, model fingerprint, data and each trait's status and checksums,
    each trait's statistics and map are written as soon as they exist, and the manifest says
    ``complete`` only at the end. An interrupted run keeps its finished traits; ``resume=True`` reuses
    their statistics (checked by checksum) when the settings match. A folder holding a run with
    other settings is refused unless ``overwrite=True``.

    Example:
        >>> run = locate_traits(model, LocateConfig(["openness"], n_pairs=100), out="runs/quick")   # doctest: +SKIP
        >>> run.maps["openness"]                                                                    # doctest: +SKIP
    """
    model_name = getattr(model, "dpn_model_name", "")
    run = Run(None if out is None else Path(out), {}, model_name=model_name)
    if out is None:
        _locate_each(model, config, run, log, {})
        run.summary = run.summary_dict()
        return run
    folder = Path(out)
    settings, fingerprint = _run_settings(config), _fingerprint_of(model)
    with lock_run_folder(folder):
        earlier = _prepare_folder(folder, settings, fingerprint, resume, overwrite)
        reusable = {}
        for trait, record in ((earlier or {}).get("traits") or {}).items():
            path = stats_path(folder, trait)
            if record.get("status") == "done" and path.exists() and file_sha256(path) == record.get("stats_sha256"):
                reusable[trait] = path
        manifest = {"format": MANIFEST_FORMAT, "status": "running", "model": model_name, "fingerprint": fingerprint,
                    "settings": settings, "data": {"source": config.source, "seed": config.seed,
                                                   "n_pairs": config.n_pairs, "data_dir": settings["data_dir"]},
                    "traits": {trait: {"status": "pending"} for trait in config.traits}}
        write_manifest(folder, manifest)
        _locate_each(model, config, run, log, reusable, folder, manifest)
        run.save_summary()
        write_text_atomic(folder / MAPS_DIR / MODEL_CARD_FILE, model_card(run))
        manifest["status"] = "complete"
        write_manifest(folder, manifest)
    return run


def _locate_each(model: Any, config: LocateConfig, run: Run, log: Callable[[str], None], reusable: dict[str, Path],
                 folder: Path | None = None, manifest: dict[str, Any] | None = None) -> None:
    from dpn_lens.models import model_revision

    # The hub commit or GGUF digest the maps record beside the model name (else the weights hash).
    revision = model_revision(model)
    for trait in config.traits:
        started = time.perf_counter()
        if trait in reusable:
            stats = ContrastStatistics.load(reusable[trait])
            note = " (statistics reused)"
        else:
            pairs = contrastive_set_for(trait, config.source, config.n_pairs, config.seed, config.data_dir)
            stats = collect_statistics(model, pairs, config.collection)
            note = ""
        run.stats[trait] = stats
        run.maps[trait] = locate(stats, settings=config.settings, model_name=run.model_name, q=config.q,
                                 tau_d=config.tau_d, layers=config.layers, model_revision=revision)
        memo: dict[Any, Any] = {}
        # An effect rule's default budget is the DPN-LE count: a map that selects nothing gives it nothing.
        rules = config.select[1:] if run.maps[trait].n_selected() or config.budget is not None else []
        for rule in rules:
            run.rule_maps.setdefault(rule, {})[trait] = select_by_effect(
                model, run.maps[trait], rule, config.budget, n_pairs=config.selection_pairs, seed=config.selection_seed,
                selection_tokens=config.selection_tokens, selection_batch=config.selection_batch, memo=memo)
        run.seconds[trait] = time.perf_counter() - started
        log(f"{trait:>17}: {run.maps[trait]!r} [{run.seconds[trait]:.0f} s]{note}")
        for rule in rules:
            log(f"{'':>17}  {run.rule_maps[rule][trait]!r}")
        if folder is not None and manifest is not None:
            run.save_trait(trait)
            manifest["traits"][trait] = trait_record(folder, trait, run.rules_of(trait))
            write_manifest(folder, manifest)


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
