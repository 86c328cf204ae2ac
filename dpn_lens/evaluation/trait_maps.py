"""The DPN-LE map an evaluation uses for a trait: read from a run (or maps) folder, or located on the fly.

``dpn-lens control`` and ``dpn-lens compare`` both call :func:`trait_map`; they differ only in what a
missing map means (control refuses, since its maps folder was named on purpose; compare locates instead).

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> neuron_map = trait_map(build_tiny_model(), "openness", locate_pairs=40, log=lambda line: None)
    >>> neuron_map.trait
    'openness'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from dpn_lens.neuron_map import NeuronMap


def trait_map(model: Any, trait: str, *, maps_dir: str | Path | None = None, locate_pairs: int = 500,
              q: float | None = None, tau_d: float | None = None, layers: Sequence[int] | None = None,
              statistics: Literal["last", "answer"] = "last", if_missing: Literal["raise", "locate"] = "raise",
              log: Callable[[str], None] = print) -> NeuronMap:
    """``trait``'s map from ``maps_dir`` (a run or maps folder) when given, else located from
    ``locate_pairs`` embedded pairs (seed 42) with ``q``, ``tau_d`` and ``layers`` (None: the defaults
    and proposals of :func:`dpn_lens.localize.locate`) at the ``statistics`` positions.

    ``if_missing`` says what a ``maps_dir`` without this trait's map does: "raise" (FileNotFoundError
    naming the fix) or "locate" (on the fly, with a logged line saying so).
    """
    from dpn_lens.run import find_map

    if maps_dir:
        path = find_map(maps_dir, trait)
        if path is not None:
            log(f"{trait}: neuron map from {path}")
            return NeuronMap.load(path, model=model)
        if if_missing == "raise":
            raise FileNotFoundError(f"no {trait} map in {maps_dir}; run `dpn-lens locate` for it or drop --maps")
        log(f"{trait}: no map in {maps_dir}; locating on the fly")
    from dpn_lens.collect import CollectionConfig, collect_statistics
    from dpn_lens.data.contrastive import embedded_contrastive_set
    from dpn_lens.localize import locate

    log(f"{trait}: locating from {locate_pairs} embedded pairs ({statistics} token statistics)")
    pairs = embedded_contrastive_set(trait, n_pairs=locate_pairs, seed=42)
    if statistics == "answer":
        from dpn_lens.answer_statistics import answer_contrast_statistics

        stats = answer_contrast_statistics(model, pairs)
    else:
        stats = collect_statistics(model, pairs, CollectionConfig(progress=False))
    return locate(stats, model_name=getattr(model, "dpn_model_name", None), q=q, tau_d=tau_d, layers=layers)
