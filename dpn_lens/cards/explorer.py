"""``dpn-lens explore --run RUN``: one offline HTML folder to browse a run's maps and neuron cards.

The folder (default ``RUN/explorer/``) holds ``index.html``, ``plotly.min.js`` (copied from the installed
plotly package: no CDN) and ``data.js`` (the cards and the per-layer counts and overlaps). Open
``index.html`` from disk. Pick a map (trait and rule) and a pole; the table sorts by any column and filters
by label or token; clicking a neuron opens its card (identity, logit lens, activation histogram, top
contexts with per-token colour); the token box lists the neurons that promote a token (among each card's
top promoted tokens); the plots show the map's neurons per layer and the overlap (Jaccard) between traits.

Example:
    >>> folder = write_explorer(Run.load("runs/demo"), cards, "runs/demo/explorer")   # doctest: +SKIP
    >>> (folder / "index.html").exists()                                              # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dpn_lens.cards.card import CardConfig, NeuronCard, run_maps
from dpn_lens.cards.page import PAGE
from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.run import Run

__all__ = ["explorer_data", "write_explorer", "EXPLORER_DIR"]

EXPLORER_DIR = "explorer"
"""Default subfolder of a run folder for the explorer."""


def _neuron_set(neuron_map: NeuronMap) -> set[tuple[int, int]]:
    return {(layer, int(i)) for pole in ("high", "low") for layer, indices in neuron_map.pole(pole).items()
            for i in indices.tolist()}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def _clean(value: Any) -> Any:
    """JSON has no NaN or Infinity: they become null. Floats keep 4 significant digits (a page shows 3;
    the full values stay in the cards files), which makes ``data.js`` about half as large."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def explorer_data(run: Run, cards: dict[tuple[str, str], list[NeuronCard]], lens_top: int | None = None
                  ) -> dict[str, Any]:
    """What ``data.js`` holds: maps (key ``rule|trait``, per-layer counts), cards and per-rule trait overlaps."""
    maps_by_key = run_maps(run)
    maps, overlap = [], {}
    for (rule, trait), neuron_map in maps_by_key.items():
        if (rule, trait) not in cards:
            continue
        counts = {layer: list(pair) for layer, pair in neuron_map.counts_per_layer().items()}
        maps.append({"key": f"{rule}|{trait}", "rule": rule, "trait": trait, "n": neuron_map.n_selected(),
                     "counts": counts})
    for rule in dict.fromkeys(m["rule"] for m in maps):
        traits = [m["trait"] for m in maps if m["rule"] == rule]
        sets = {trait: _neuron_set(maps_by_key[(rule, trait)]) for trait in traits}
        overlap[rule] = {"traits": traits, "jaccard": [[_jaccard(sets[a], sets[b]) for b in traits] for a in traits]}
    any_map = next(iter(run.maps.values()))
    return _clean({
        "model": run.model_name or "model", "run": str(run.folder or ""), "n_layers": any_map.n_model_layers,
        "lens_top": lens_top or CardConfig().lens_top, "maps": maps, "overlap": overlap,
        "cards": {f"{rule}|{trait}": [card.to_dict() for card in list_] for (rule, trait), list_ in cards.items()},
    })


def write_explorer(run: Run, cards: dict[tuple[str, str], list[NeuronCard]], out: str | Path | None = None,
                   lens_top: int | None = None) -> Path:
    """Write the explorer folder (module note) for ``cards`` (``build_cards``'s result); returns the folder.

    Each file is written to a temporary name and renamed, so an interrupted write never leaves a page
    that loads another run's data.
    """
    import plotly.offline

    from dpn_lens.io import write_text_atomic

    if not cards:
        raise ValueError("no cards to explore; build them first (dpn-lens cards --run RUN)")
    folder = Path(out) if out is not None else Path(run.folder or ".") / EXPLORER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    data = explorer_data(run, cards, lens_top)
    # ``</`` inside a script would end it early; JSON allows the escaped form.
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    write_text_atomic(folder / "data.js", f"window.DPN_EXPLORER = {payload};\n")
    plotly_js = folder / "plotly.min.js"
    script = plotly.offline.get_plotlyjs()
    if not plotly_js.is_file() or plotly_js.stat().st_size != len(script.encode("utf-8")):
        write_text_atomic(plotly_js, script)
    write_text_atomic(folder / "index.html", PAGE)
    return folder
