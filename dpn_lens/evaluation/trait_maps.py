"""The maps an evaluation uses for a trait: read from a run (or maps) folder, or located on the fly.

``dpn-lens control`` and ``dpn-lens compare`` both call :func:`trait_map` for the DPN-LE map; they differ
only in what a missing map means (control refuses, since its maps folder was named on purpose; compare
locates instead). :func:`rule_maps` gives the maps of effect rules (``dpn_lens.effect.rules``): read from
``<maps>/<rule>/<trait>.safetensors`` when there, else selected from the DPN-LE map with the model.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> neuron_map = trait_map(build_tiny_model(), "openness", locate_pairs=40, log=lambda line: None)
    >>> neuron_map.trait
    'openness'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from dpn_lens.localization.neuron_map import NeuronMap


def trait_map(model: Any, trait: str, *, maps_dir: str | Path | None = None, locate_pairs: int = 500,
              q: float | None = None, tau_d: float | None = None, layers: Sequence[int] | None = None,
              statistics: Literal["last", "answer"] = "last", if_missing: Literal["raise", "locate"] = "raise",
              log: Callable[[str], None] = print) -> NeuronMap:
    """``trait``'s map from ``maps_dir`` (a run or maps folder) when given, else located from
    ``locate_pairs`` embedded pairs (seed 42) with ``q``, ``tau_d`` and ``layers`` (None: the defaults
    and proposals of :func:`dpn_lens.localization.localize.locate`) at the ``statistics`` positions.

    ``if_missing`` says what a ``maps_dir`` without this trait's map does: "raise" (FileNotFoundError
    naming the fix) or "locate" (on the fly, with a logged line saying so).
    """
    from dpn_lens.run import find_map

    if maps_dir:
        path = find_map(maps_dir, trait)
        if path is not None:
            log(f"{trait}: neuron map from {path}")
            return NeuronMap.load(path, model=model, rule="dpn-le")
        if if_missing == "raise":
            raise FileNotFoundError(f"no {trait} map in {maps_dir}; run `dpn-lens locate` for it or drop --run")
        log(f"{trait}: no map in {maps_dir}; locating on the fly")
    from dpn_lens.collection.collect import CollectionConfig, collect_statistics
    from dpn_lens.data.contrastive import embedded_contrastive_set
    from dpn_lens.localization.localize import locate

    log(f"{trait}: locating from {locate_pairs} embedded pairs ({statistics} token statistics)")
    pairs = embedded_contrastive_set(trait, n_pairs=locate_pairs, seed=42)
    if statistics == "answer":
        from dpn_lens.collection.answer_statistics import answer_contrast_statistics

        stats = answer_contrast_statistics(model, pairs)
    else:
        stats = collect_statistics(model, pairs, CollectionConfig(progress=False))
    return locate(stats, model_name=getattr(model, "dpn_model_name", None), q=q, tau_d=tau_d, layers=layers)


def rule_maps(model: Any, base: NeuronMap, rules: Sequence[str], *, maps_dir: str | Path | None = None,
              n_pairs: int | None = None, seed: int = 0, budget: int | None = None,
              memo: dict[Any, Any] | None = None, log: Callable[[str], None] = print, cache_pairs: bool = True
              ) -> dict[str, tuple[NeuronMap, bool]]:
    """``{rule: (map, read from maps_dir)}`` for each effect rule in ``rules`` (``dpn-le`` is ``base`` itself).

    A map in ``maps_dir`` must have been made by that rule (``NeuronMap.load(..., rule=...)`` refuses
    another's) on this model. One selected on other pairs (another seed, or another number of selection
    pairs) is not reused (a logged line says so): a missing or other-pairs map is selected from ``base``
    now (``effect.rules``), with ``n_pairs`` selection pairs drawn with ``seed`` and ``budget`` neurons. A
    saved map of another budget is re-selected at this one from its saved scores. ``memo`` (one dict per trait)
    lets the attribution rules share one gradient pass; ``cache_pairs``: read and write the selection pairs'
    cache.
    """
    from dpn_lens.effect.rules import effect_map, effect_scores, reselect_top, resolved_budget, rule_named
    from dpn_lens.run import find_map

    result: dict[str, tuple[NeuronMap, bool]] = {}
    for rule in rules:
        rule_named(rule)
        if rule == "dpn-le":
            result[rule] = (base, True)
            continue
        path = find_map(maps_dir, base.trait, rule) if maps_dir else None
        if path is not None:
            saved = NeuronMap.load(path, model=model, rule=rule)
            refusal = _other_selection(saved, rule, n_pairs, seed)
            if refusal is None:
                k = resolved_budget(base, rule, saved.effect_score, budget) if saved.effect_score is not None else None
                if k is None or saved.selection.get("budget") in (None, k):
                    log(f"{base.trait}: {rule} map from {path}")
                    result[rule] = (saved, True)
                    continue
                # Same pairs, other budget: the saved scores give this budget's map without a model pass.
                log(f"{base.trait}: {rule} map in {path} kept {saved.selection.get('budget')} neurons; "
                    f"taking the top {k} of its saved scores")
                result[rule] = (reselect_top(saved, k), False)
                continue
            log(f"{base.trait}: {rule} map in {path} {refusal}; selecting anew")
        scores = effect_scores(model, base, rule, n_pairs=n_pairs, seed=seed, memo=memo, log=log,
                               cache_pairs=cache_pairs)
        chosen = effect_map(base, scores, budget)
        log(f"{base.trait}: {chosen!r}")
        result[rule] = (chosen, False)
    return result


# Maps saved before the request was recorded hold only the kept count; drops (identical or empty answer
# pairs) are a few percent, so a kept count this close below the request is taken as that request.
_LEGACY_KEPT_FRACTION = 0.8


def _other_selection(saved: NeuronMap, rule: str, n_pairs: int | None, seed: int) -> str | None:
    """Why ``saved`` was selected on other pairs than (``n_pairs``, ``seed``) ask for; None: the same pairs.

    Reusing another draw would make a ``--seed 1`` replication silently repeat seed 0's selection, and a
    ``--selection-pairs 512`` run silently read a 128-pair selection.
    """
    from dpn_lens.effect.defaults import SELECTION_PAIRS
    from dpn_lens.effect.rules import rule_named

    selection = saved.selection
    if rule_named(rule).score != "attribution":
        return None                              # the write rules read no selection pairs
    saved_seed = selection.get("pairs_seed")
    if saved_seed is not None and int(saved_seed) != seed:
        return f"was selected on pairs of seed {saved_seed}, not {seed}"
    wanted = SELECTION_PAIRS if n_pairs is None else int(n_pairs)
    requested, kept = selection.get("requested_pairs"), selection.get("selection_pairs")
    if requested is not None:
        same = int(requested) == wanted
    else:
        same = kept is None or _LEGACY_KEPT_FRACTION * wanted <= int(kept) <= wanted
    if not same:
        return f"was selected from {requested if requested is not None else kept} selection pairs, not {wanted}"
    return None
