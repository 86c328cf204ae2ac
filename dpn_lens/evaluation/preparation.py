"""What an evaluation prepares for a trait before it measures it, made once for every harness that asks alike.

Both harnesses (``evaluation.control`` and ``evaluation.compare``) need the same things for a trait: the
DPN-LE neuron map (read from a run folder, or located), the effect rules' maps selected from it, and the
state of the methods that have one (NPTI's statistics, CAA's vector), together a ``methods.TraitContext``.
A ``TraitPreparation`` holds what one trait's harnesses made, each piece under the settings that made it:

* the map under its ``MapSource`` (and what a missing map means, where a map folder lacks it);
* the effect rules' maps (and the gradient pass they share, ``TraitContext.memo``) under the map and the
  ``RuleSelection`` (selection pairs, seed, budget);
* the methods' state under ``method_inputs`` (the ``methods.MethodSettings`` fields a method reads).

A harness asks with its own settings and gets the piece already made when they are equal, else makes its
own: sharing never changes what a harness measures. ``run_control`` and ``run_comparison`` give each trait
a fresh one; ``evaluation.runner.evaluate`` gives one trait's to both harnesses.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> model, prepared = build_tiny_model(), TraitPreparation("openness")
    >>> quiet = lambda line: None
    >>> first = prepared.neuron_map(model, MapSource(locate_pairs=40), log=quiet)
    >>> first is prepared.neuron_map(model, MapSource(locate_pairs=40), log=quiet)   # the same settings: made once
    True
    >>> first is prepared.neuron_map(model, MapSource(locate_pairs=20), log=quiet)   # others: made again
    False
    >>> prepared.shared()
    ['neuron map']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Literal, Sequence, TypeVar

from dpn_lens.effect.defaults import SELECTION_PAIRS
from dpn_lens.evaluation.methods import METHODS_BY_NAME, MethodSettings, TraitContext
from dpn_lens.evaluation.trait_maps import rule_maps, trait_map
from dpn_lens.localization.neuron_map import NeuronMap

__all__ = ["MapSource", "RuleSelection", "TraitPreparation", "method_inputs"]

T = TypeVar("T")


@dataclass(frozen=True)
class MapSource:
    """Where a trait's DPN-LE map comes from (``trait_maps.trait_map``'s settings): equal sources give one map.

    Example:
        >>> MapSource("runs/smollm2", layers=[3, 4]) == MapSource("runs/smollm2", layers=(3, 4))
        True
    """

    maps_dir: str | None = None
    locate_pairs: int = 500
    q: float | None = None
    tau_d: float | None = None
    layers: tuple[int, ...] | None = None
    statistics: Literal["last", "answer"] = "last"

    def __post_init__(self) -> None:
        # a folder spelled as a Path or a str, layers as a list or a tuple: the same source
        object.__setattr__(self, "maps_dir", str(self.maps_dir) if self.maps_dir else None)
        object.__setattr__(self, "layers", None if self.layers is None else tuple(int(i) for i in self.layers))


@dataclass(frozen=True)
class RuleSelection:
    """How the effect rules' maps are selected from the DPN-LE map (``trait_maps.rule_maps``); ``n_pairs``
    None is the default, ``SELECTION_PAIRS``, as ``effect.rules.effect_scores`` reads it. ``cache_pairs``:
    read and write the selection pairs' cache (``control --no-cache`` generates them again); the pairs are
    the same either way, so two selections that differ in it alone select alike (it is not compared).

    Example:
        >>> RuleSelection(None, seed=0) == RuleSelection(SELECTION_PAIRS, seed=0, cache_pairs=False)
        True
    """

    n_pairs: int | None = None
    seed: int = 0
    budget: int | None = None
    cache_pairs: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_pairs", SELECTION_PAIRS if self.n_pairs is None else int(self.n_pairs))


def method_inputs(config: MethodSettings) -> tuple[tuple[str, Any], ...]:
    """What a method's ``prepare`` reads from ``config``: every field of ``methods.MethodSettings`` with its value.

    Example:
        >>> from dpn_lens.evaluation.compare import CompareConfig
        >>> method_inputs(CompareConfig(caa_pairs=20))
        (('npti_prompts', 16), ('npti_new_tokens', 24), ('caa_pairs', 20))
    """
    return tuple((name, getattr(config, name)) for name in MethodSettings.__annotations__)


@dataclass
class TraitPreparation:
    """What one trait's evaluation prepared, each piece under the settings that made it (module note).

    ``reused`` names each piece an asker got already made (``shared``: each once), for the run's log.
    """

    trait: str
    made: dict[Hashable, Any] = field(default_factory=dict, repr=False)
    reused: list[str] = field(default_factory=list)

    def _get(self, key: Hashable, make: Callable[[], T], name: str | None = None) -> T:
        if key not in self.made:
            self.made[key] = make()
        elif name is not None:
            self.reused.append(name)
        return self.made[key]

    def neuron_map(self, model: Any, source: MapSource, *, if_missing: Literal["raise", "locate"] = "raise",
                   log: Callable[[str], None] = print) -> NeuronMap:
        """The trait's DPN-LE map from ``source`` (``trait_maps.trait_map``), made once per source.

        ``if_missing`` is part of the settings only where it decides something: a ``maps_dir`` without
        this trait's map.
        """
        from dpn_lens.run import find_map

        missing = if_missing if source.maps_dir and find_map(source.maps_dir, self.trait) is None else None
        return self._get(("neuron map", source, missing), lambda: trait_map(
            model, self.trait, maps_dir=source.maps_dir, locate_pairs=source.locate_pairs, q=source.q,
            tau_d=source.tau_d, layers=source.layers, statistics=source.statistics, if_missing=if_missing, log=log),
            "neuron map")

    def context(self, neuron_map: NeuronMap, selection: RuleSelection, inputs: tuple[tuple[str, Any], ...]
                ) -> TraitContext:
        """A ``TraitContext`` on ``neuron_map`` whose rule maps (and their memo) are those of every asker with
        this map and ``selection``, and whose method state is that of every asker with these ``inputs``
        (``method_inputs``); fill it with ``add_rule_maps`` and ``add_method_state``."""
        # The map object is the key of what is selected from it (kept in the entry, so its id stays its own).
        _, maps, memo = self._get(("rule maps", id(neuron_map), selection), lambda: (neuron_map, {}, {}))
        state = self._get(("method state", inputs), dict)
        return TraitContext(self.trait, neuron_map, state=state, maps=maps, memo=memo)

    def add_rule_maps(self, model: Any, context: TraitContext, rules: Sequence[str], selection: RuleSelection, *,
                      maps_dir: str | Path | None = None, log: Callable[[str], None] = print
                      ) -> dict[str, tuple[NeuronMap, bool]]:
        """Select (or read from ``maps_dir``) the map of each of ``rules`` that ``context`` lacks, with
        ``selection``; return those made now as ``trait_maps.rule_maps`` does (``{rule: (map, read from maps_dir)}``).

        ``context`` must come from ``context(..., selection, ...)``: the maps it holds were made with it.
        """
        self.reused += [f"{rule} map" for rule in rules if rule in context.maps]
        missing = [rule for rule in rules if rule not in context.maps]
        if not missing:
            return {}
        chosen = rule_maps(model, context.neuron_map, missing, maps_dir=maps_dir, n_pairs=selection.n_pairs,
                           seed=selection.seed, budget=selection.budget, memo=context.memo, log=log,
                           cache_pairs=selection.cache_pairs)
        context.maps.update({rule: rule_map for rule, (rule_map, _) in chosen.items()})
        return chosen

    def add_method_state(self, model: Any, context: TraitContext, name: str, config: MethodSettings) -> bool:
        """Prepare method ``name``'s state into ``context`` unless it holds it; whether it was made now.

        ``context`` must come from ``context(..., method_inputs(config))``: the state it holds was made alike.
        """
        if name in context.state:
            self.reused.append(f"{name} state")
            return False
        context.state[name] = METHODS_BY_NAME[name].prepare(model, self.trait, config)  # type: ignore[misc]
        return True

    def shared(self) -> list[str]:
        """The pieces some asker got already made, each once, in the order first reused.

        Example:
            >>> prepared = TraitPreparation("openness", reused=["neuron map", "caa state", "neuron map"])
            >>> prepared.shared()
            ['neuron map', 'caa state']
        """
        return list(dict.fromkeys(self.reused))
