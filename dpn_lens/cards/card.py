"""One card per neuron of a map: who it is, what it writes, what it reads.

``build_cards(run, model)`` makes a card for every neuron of every map of a run folder (the DPN-LE maps
and the effect rules' maps, ``maps/<rule>/<trait>``). A card holds:

* **identity and statistics**: ``L12.N345``, trait, rule, pole, ``s``, ``d``, mean and SD per pole (from
  the run's statistics), its rank in its layer (by ``|s|`` for DPN-LE, by the rule's score for an effect
  rule) and which other maps of the run contain it;
* **what it writes**: the logit lens of its output direction (``cards.lens``);
* **what it reads**: a histogram of its last-token activation on high vs low prompts (the paper's
  readout), and its top-activating contexts on those prompts and on neutral text (WikiText-2), each
  token with the neuron's activation for colouring (``cards.contexts``, a bounded top-k).

The prompts are embedded contrastive pairs drawn with ``CardConfig.seed`` (7), a different draw from
``locate``'s (42), so the histogram shows the neuron on prompts its selection did not see.

**What it does** (``NeuronCard.effect``) is filled by ``cards.effects.add_effects`` for the top neurons
of each map (opt-in: one scoring pass per neuron): the trait-margin shift of pushing that neuron alone.
Where the run holds the multifunction study's attribution (``multifunction_attribution.safetensors``,
written by ``dpn-lens study multifunction``), ``NeuronCard.capability`` gives the neuron's capability
attribution and its percentile in its layer (the study's capability neurons are the top 2%).

Cards are saved beside the maps, ``RUN/cards/<trait>.json`` and ``RUN/cards/<rule>/<trait>.json``, with
the map's checksum and the settings, so ``build_cards`` reuses a file that is still up to date.

Example:
    >>> cards = build_cards(Run.load("runs/demo"), model, CardConfig(data_dir="../shared/data"))  # doctest: +SKIP
    >>> cards[("dpn-le", "openness")][0].label                                                  # doctest: +SKIP
    'L17.N1023'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dpn_lens.cards.contexts import EMPTY_TOKEN, Neuron, ScanResult, TopContexts, scan, text_windows
from dpn_lens.cards.lens import logit_lens, neuron_label
from dpn_lens.localization.neuron_map import DUAL_CRITERION, NeuronMap
from dpn_lens.run import Run

__all__ = ["CardConfig", "Context", "NeuronCard", "build_cards", "map_cards", "cards_path", "save_cards",
           "save_run_cards", "load_cards", "run_maps", "CARDS_DIR", "CARDS_FORMAT"]

CARDS_DIR = "cards"
"""Subfolder of a run folder that holds the cards."""
CARDS_FORMAT = 1


@dataclass
class CardConfig:
    """What the cards read and how much of it.

    Attributes:
        n_pairs: embedded contrastive pairs per trait for the histogram and the prompt contexts.
        seed: seed of that draw (not ``locate``'s 42: prompts the selection did not see).
        data_dir: the shared data folder holding ``capability/wikitext2_test/test.txt`` (None:
            ``$DPN_LENS_DATA``; no neutral contexts when neither names one).
        text_windows: WikiText-2 windows streamed for the neutral contexts.
        window: tokens per WikiText window.
        k: top contexts kept per neuron and source.
        before, after: context tokens kept around the activating token.
        lens_top: tokens per side of the logit lens.
        bins: histogram bins.
        batch_size: sequences per forward pass.
    """

    n_pairs: int = 64
    seed: int = 7
    data_dir: str | None = None
    text_windows: int = 128
    window: int = 64
    k: int = 8
    before: int = 12
    after: int = 3
    lens_top: int = 15
    bins: int = 20
    batch_size: int = 16

    def __post_init__(self) -> None:
        from dpn_lens.numbers import as_int

        for name in ("n_pairs", "text_windows", "k", "lens_top", "bins", "batch_size"):
            setattr(self, name, as_int(getattr(self, name), f"CardConfig.{name}", minimum=1))
        for name in ("window", "before", "after", "seed"):
            setattr(self, name, as_int(getattr(self, name), f"CardConfig.{name}"))
        if self.window < 2 or self.before < 0 or self.after < 0:
            raise ValueError(f"CardConfig needs window >= 2 and before, after >= 0; got window={self.window}, "
                             f"before={self.before}, after={self.after}")

    def key(self) -> dict[str, Any]:
        """The settings a saved card must match to be reused (the data folder's path is not one)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "data_dir"}


@dataclass
class Context:
    """One top-activating context: the activation, where, and the window's tokens with their activations.

    ``center`` is the index of the activating token inside ``tokens``.
    """

    value: float
    sequence: int
    position: int
    tokens: list[str]
    activations: list[float | None]
    center: int


@dataclass
class NeuronCard:
    """Everything a card shows about one neuron of one map (module note)."""

    layer: int
    neuron: int
    trait: str
    rule: str
    pole: str
    s: float
    d: float
    rank_in_layer: int
    rank_by: str
    mean_high: float | None = None
    sd_high: float | None = None
    mean_low: float | None = None
    sd_low: float | None = None
    in_maps: list[str] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    lens_note: str = ""
    histogram: dict[str, list[float]] = field(default_factory=dict)
    prompt_contexts: list[Context] = field(default_factory=list)
    text_contexts: list[Context] = field(default_factory=list)
    effect: dict[str, Any] | None = None
    capability: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return neuron_label(self.layer, self.neuron)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NeuronCard":
        data = {k: v for k, v in data.items() if k != "label"}
        for source in ("prompt_contexts", "text_contexts"):
            data[source] = [Context(**c) for c in data.get(source, [])]
        for side in ("promoted", "suppressed"):
            data[side] = [tuple(pair) for pair in data.get(side, [])]
        return cls(**data)


def cards_path(folder: str | Path, trait: str, rule: str = DUAL_CRITERION) -> Path:
    """``RUN/cards/<trait>.json`` (DPN-LE) or ``RUN/cards/<rule>/<trait>.json``."""
    base = Path(folder) / CARDS_DIR
    return base / f"{trait}.json" if rule == DUAL_CRITERION else base / rule / f"{trait}.json"


def _map_checksum(neuron_map: NeuronMap) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(neuron_map._tensors().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_cards(path: str | Path, cards: Sequence[NeuronCard], neuron_map: NeuronMap, config: CardConfig) -> Path:
    """Write ``cards`` of ``neuron_map`` as JSON (atomically), with the map's checksum and the settings."""
    from dpn_lens.io import write_json_atomic

    payload = {"format": CARDS_FORMAT, "trait": neuron_map.trait, "rule": neuron_map.rule,
               "map_sha256": _map_checksum(neuron_map), "config": config.key(),
               "cards": [card.to_dict() for card in cards]}
    return write_json_atomic(path, payload)


def load_cards(path: str | Path, neuron_map: NeuronMap | None = None, config: CardConfig | None = None
               ) -> list[NeuronCard] | None:
    """The cards saved at ``path``; None when the file is missing, or (given ``neuron_map``/``config``)
    was made from another map or with other settings, so it must be rebuilt."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a cards file ({error}); delete it and build the cards again") from None
    if not isinstance(payload, dict) or "cards" not in payload:
        raise ValueError(f"{path} is not a cards file (no 'cards' list); delete it and build the cards again")
    if payload.get("format", 0) > CARDS_FORMAT:
        raise ValueError(f"{path} was written by a newer dpn-lens (cards format {payload['format']}); upgrade dpn-lens")
    if neuron_map is not None and payload.get("map_sha256") != _map_checksum(neuron_map):
        return None
    if config is not None and payload.get("config") != config.key():
        return None
    return [NeuronCard.from_dict(card) for card in payload["cards"]]


def _token_texts(tokenizer: Any) -> Callable[[int], str]:
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]
    return text


def _contexts(found: TopContexts, row: int, text: Callable[[int], str]) -> list[Context]:
    contexts = []
    for slot in range(found.k):
        value = float(found.values[row, slot])
        if not np.isfinite(value):
            continue
        ids = found.tokens[row, slot].tolist()
        acts = found.activations[row, slot].tolist()
        kept = [i for i, token in enumerate(ids) if token != EMPTY_TOKEN]
        contexts.append(Context(value, int(found.where[row, slot, 0]), int(found.where[row, slot, 1]),
                                [text(ids[i]) for i in kept], [float(acts[i]) for i in kept],
                                found.before - sum(1 for i in range(found.before) if ids[i] == EMPTY_TOKEN)))
    return contexts


def _histogram(high: np.ndarray, low: np.ndarray, bins: int) -> dict[str, list[float]]:
    values = np.concatenate([high, low])
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    return {"edges": edges.tolist(), "high": np.histogram(high, edges)[0].astype(float).tolist(),
            "low": np.histogram(low, edges)[0].astype(float).tolist()}


def _ranks_in_layer(scores: torch.Tensor) -> torch.Tensor:
    """Rank (1 = best) of each neuron of each row by ``scores`` (higher is better; NaN ranks last)."""
    filled = torch.nan_to_num(scores.double(), nan=-torch.inf)
    order = torch.argsort(filled, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, scores.shape[1] + 1).expand_as(order).contiguous())
    return ranks


def _neurons_of(neuron_map: NeuronMap) -> list[tuple[str, int, int]]:
    return [(pole, layer, int(i)) for pole in ("high", "low") for layer, indices in sorted(neuron_map.pole(pole).items())
            for i in indices.tolist()]


CAPABILITY_FILE = "multifunction_attribution.safetensors"
"""What ``dpn-lens study multifunction`` writes: ``combined`` capability attribution ``[n_layers, d_mlp]``."""


def capability_attribution_file(folder: str | Path | None) -> Path | None:
    """The multifunction study's attribution file inside a run folder (any depth), newest first; or None."""
    if folder is None or not Path(folder).is_dir():
        return None
    found = sorted(Path(folder).rglob(CAPABILITY_FILE), key=lambda path: path.stat().st_mtime, reverse=True)
    return found[0] if found else None


def capability_of(path: Path, neurons: Sequence[Neuron]) -> dict[Neuron, dict[str, Any]]:
    """``{(layer, index): {"attribution", "percentile_in_layer", "capability_neuron", "source"}}`` from the
    study's file (percentile 1.0 = the layer's most capability-relevant neuron; top 2% = capability neuron)."""
    from safetensors.torch import load_file

    combined = load_file(str(path))["combined"].double()
    ranks = torch.argsort(torch.argsort(combined, dim=1), dim=1).double() / max(combined.shape[1] - 1, 1)
    result = {}
    for layer, index in neurons:
        if layer < combined.shape[0] and index < combined.shape[1]:
            percentile = float(ranks[layer, index])
            result[(layer, index)] = {"attribution": float(combined[layer, index]), "percentile_in_layer": percentile,
                                      "capability_neuron": percentile >= 0.98, "source": str(path)}
    return result


def _wikitext(config: CardConfig) -> Path | None:
    from dpn_lens.data.contrastive import resolve_data_dir

    try:
        folder = resolve_data_dir(config.data_dir, "capability")
    except FileNotFoundError:
        return None
    path = folder / "wikitext2_test" / "test.txt"
    return path if path.is_file() else None


def map_cards(neuron_map: NeuronMap, stats: Any, other_maps: dict[str, NeuronMap], lenses: dict[Neuron, Any],
              prompt_scan: ScanResult, n_high: int, text_scan: ScanResult | None, config: CardConfig,
              text: Callable[[int], str], capability: dict[Neuron, dict[str, Any]] | None = None) -> list[NeuronCard]:
    """The cards of one map from the shared pieces ``build_cards`` computed (the lens of each neuron, the
    scans of this trait's prompts and of the neutral text, whose rows follow their ``neurons`` lists)."""
    prompt_rows = {neuron: row for row, neuron in enumerate(prompt_scan.contexts.neurons)}
    text_rows = {} if text_scan is None else {neuron: row for row, neuron in enumerate(text_scan.contexts.neurons)}
    if neuron_map.rule == DUAL_CRITERION or neuron_map.effect_score is None:
        rank_scores, rank_by = neuron_map.steering_value.abs(), "|s|"
    else:
        rank_scores, rank_by = neuron_map.effect_score, f"{neuron_map.rule} score"
    ranks = _ranks_in_layer(rank_scores)
    membership: dict[Neuron, list[str]] = {}
    for name, other in other_maps.items():
        for pole, layer, index in _neurons_of(other):
            membership.setdefault((layer, index), []).append(f"{name} {pole}")
    own = f"{neuron_map.trait} [{neuron_map.rule}]"
    # Per-pole SDs once per map, not once per card (each is a full [layers, d_mlp] reduction).
    sd_high = stats.high.variance().sqrt() if stats is not None else None
    sd_low = stats.low.variance().sqrt() if stats is not None else None
    cards = []
    for pole, layer, index in _neurons_of(neuron_map):
        row = neuron_map.stat_layers.index(layer)
        s, d = neuron_map.values_at(layer, torch.tensor([index]))
        card = NeuronCard(layer, index, neuron_map.trait, neuron_map.rule, pole, float(s[0]), float(d[0]),
                          int(ranks[row, index]), rank_by,
                          in_maps=[m for m in membership.get((layer, index), []) if not m.startswith(own)])
        if stats is not None and layer in stats.layers:
            stat_row = stats.layers.index(layer)
            card.mean_high = float(stats.high.mean[stat_row, index])
            card.mean_low = float(stats.low.mean[stat_row, index])
            card.sd_high = float(sd_high[stat_row, index])
            card.sd_low = float(sd_low[stat_row, index])
        lens = lenses[(layer, index)]
        card.promoted, card.suppressed, card.lens_note = lens.promoted, lens.suppressed, lens.note
        prompt_row = prompt_rows[(layer, index)]
        values = prompt_scan.last_token[prompt_row].numpy()
        card.histogram = _histogram(values[:n_high], values[n_high:], config.bins)
        card.prompt_contexts = _contexts(prompt_scan.contexts, prompt_row, text)
        if text_scan is not None:
            card.text_contexts = _contexts(text_scan.contexts, text_rows[(layer, index)], text)
        card.capability = (capability or {}).get((layer, index))
        cards.append(card)
    return cards


def run_maps(run: Run) -> dict[tuple[str, str], NeuronMap]:
    """``{(rule, trait): map}`` of every map of ``run``: DPN-LE's (``rule="dpn-le"``) and the effect rules'."""
    maps: dict[tuple[str, str], NeuronMap] = {}
    for trait, neuron_map in run.maps.items():
        maps[(DUAL_CRITERION, trait)] = neuron_map
        for rule in run.rules_of(trait):
            maps[(rule, trait)] = run.rule_maps[rule][trait]
    return maps


def save_run_cards(run: Run, cards: dict[tuple[str, str], list[NeuronCard]], config: CardConfig) -> None:
    """Save every map's cards in ``run``'s folder (``cards_path``)."""
    if run.folder is None:
        raise ValueError("the run has no folder to save cards in; load it with Run.load(folder)")
    maps = run_maps(run)
    for (rule, trait), map_cards in cards.items():
        save_cards(cards_path(run.folder, trait, rule), map_cards, maps[(rule, trait)], config)


def build_cards(run: Run, model: Any, config: CardConfig | None = None, rules: Sequence[str] | None = None,
                save: bool = True, log: Callable[[str], None] | None = print) -> dict[tuple[str, str], list[NeuronCard]]:
    """Cards for every neuron of every map of ``run`` (module note), reusing saved cards that are current.

    Args:
        run: a loaded run folder (``Run.load``); its statistics fill the per-pole means and SDs.
        model: the model the maps were located on.
        config: what the cards read (``CardConfig``).
        rules: which maps (``"dpn-le"`` and effect rule names; None: all the run has).
        save: write ``RUN/cards/...`` (``cards_path``) for each map built.

    Returns:
        ``{(rule, trait): [NeuronCard, ...]}``, cards ordered by pole, then layer, then neuron.
    """
    from dpn_lens.data.contrastive import embedded_contrastive_set
    from dpn_lens.hooked import tokenize_prompts

    config = config or CardConfig()
    maps = run_maps(run)
    if rules is not None:
        unknown = sorted(set(rules) - {rule for rule, _ in maps})
        if unknown:
            raise ValueError(f"the run has no maps of rule(s) {unknown}; it has {sorted({r for r, _ in maps})}")
        maps = {key: m for key, m in maps.items() if key[0] in rules}
    for neuron_map in maps.values():
        neuron_map.check_compatible(model)
    result: dict[tuple[str, str], list[NeuronCard]] = {}
    if save and run.folder is not None:
        for key, neuron_map in maps.items():
            saved = load_cards(cards_path(run.folder, key[1], key[0]), neuron_map, config)
            if saved is not None:
                result[key] = saved
    todo = {key: m for key, m in maps.items() if key not in result}
    capability_file = capability_attribution_file(run.folder)
    if not todo:
        return _with_capability(dict(sorted(result.items())), capability_file)
    start = time.perf_counter()
    text = _token_texts(model.tokenizer)
    every_neuron = sorted({(layer, index) for m in todo.values() for _, layer, index in _neurons_of(m)})
    lenses: dict[Neuron, Any] = {}
    for layer in sorted({layer for layer, _ in every_neuron}):
        indices = [index for l, index in every_neuron if l == layer]
        for lens in logit_lens(model, layer, indices, config.lens_top):
            lenses[(layer, lens.neuron)] = lens
    text_scan = None
    wikitext = _wikitext(config)
    if wikitext is not None and every_neuron:
        text_scan = scan(model, every_neuron, text_windows(model.tokenizer, wikitext, config.window, config.text_windows),
                         config.k, config.before, config.after, config.batch_size)
    elif log:
        log("cards: no WikiText-2 found (pass data_dir or set $DPN_LENS_DATA); cards have no neutral-text contexts")
    all_names = {f"{trait} [{rule}]": m for (rule, trait), m in maps.items()}
    capability = capability_of(capability_file, every_neuron) if capability_file is not None else None
    for trait in sorted({trait for _, trait in todo}):
        trait_neurons = sorted({(layer, index) for (rule, t), m in todo.items() if t == trait
                                for _, layer, index in _neurons_of(m)})
        if not trait_neurons:
            for key in [k for k in todo if k[1] == trait]:
                result[key] = []
            continue
        pairs = embedded_contrastive_set(trait, config.n_pairs, seed=config.seed)
        token_lists = tokenize_prompts(model, pairs.high + pairs.low)
        prompt_scan = scan(model, trait_neurons, token_lists, config.k, config.before, config.after, config.batch_size)
        for key in [k for k in todo if k[1] == trait]:
            cards = map_cards(todo[key], run.stats.get(trait), all_names, lenses, prompt_scan, len(pairs.high),
                              text_scan, config, text, capability)
            result[key] = cards
            if save and run.folder is not None:
                save_cards(cards_path(run.folder, trait, key[0]), cards, todo[key], config)
    if log:
        log(f"cards: {sum(len(result[k]) for k in todo)} cards of {len(todo)} maps in {time.perf_counter() - start:.1f}s")
    return _with_capability(dict(sorted(result.items())), capability_file)


def _with_capability(cards: dict[tuple[str, str], list[NeuronCard]], path: Path | None
                     ) -> dict[tuple[str, str], list[NeuronCard]]:
    """Fill every card's capability from the study's file as it is now (saved cards may predate the study)."""
    if path is not None:
        found = capability_of(path, sorted({(c.layer, c.neuron) for list_ in cards.values() for c in list_}))
        for list_ in cards.values():
            for card in list_:
                card.capability = found.get((card.layer, card.neuron))
    return cards
