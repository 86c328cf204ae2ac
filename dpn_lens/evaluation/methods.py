"""The methods ``dpn-lens compare`` compares: one registry entry per method.

Each entry says how to prepare its per-trait state (e.g. NPTI's activation statistics, CAA's vector)
and how to build the condition of one trait, direction and strength: an ``(edit, persona)`` pair of
which exactly one is not None (prompting is a persona prompt, not an edit). ``run_comparison`` loops
over ``COMPARISON_METHODS``; adding a method is one ``ComparisonMethod`` entry there.

The effect-selection rules (``dpn_lens.effect.rules``: ``attribution``, ``write``, ``write-layer``,
``dpn-le-attribution``) are methods too: the DPN-LE edit on the neurons their map selects
(``TraitContext.maps``, filled by ``trait_maps.rule_maps``). ``attribution-t-resid`` is attribution-t's
edit with the post-MLP norm taken out: what its neurons write into the residual stream, added there as fixed
vectors (``effect.residual_write``; the same edit on a model without a post-MLP norm). ``<rule>-frozen``
(``attribution-t-frozen``, ``dpn-le-frozen``) is the rule's neuron edit written through the post-MLP norm
with the norm's scale frozen at each token (``effect.frozen_norm``): still an edit of the rule's neurons,
so it has a random-neuron control; on a model without a post-MLP norm it is the rule's edit itself.
``<rule>-scaled`` scales each token's delta by that token's MLP output scale (``TokenScaledEdit``), an
activation edit of the same neurons that writes about the same vector through the norm at every token.

Example:
    >>> [method.name for method in COMPARISON_METHODS]
    ['dpn-le', 'dpn-le-w', 'dpn-le-sd', 'directional', 'dense', 'topk', 'attribution', 'attribution-t', 'write', 'write-layer', 'dpn-le-attribution', 'attribution-t-resid', 'attribution-t-frozen', 'dpn-le-frozen', 'attribution-t-scaled', 'dpn-le-scaled', 'npti', 'caa', 'prompting']
    >>> METHODS_BY_NAME["attribution-t-frozen"].neurons_of, METHODS_BY_NAME["caa"].neurons_of
    ('attribution-t', None)
    >>> "dpn-le-sd" in DEFAULT_METHOD_NAMES   # a variant: run when --methods names it
    False
    >>> METHODS_BY_NAME["prompting"].sweepable
    False
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence

from dpn_lens.baselines import (PersonaPrompt, caa_intervention, dense_intervention, npti_intervention,
                                npti_trait_statistics, persona_prompt, topk_intervention)
from dpn_lens.data.contrastive import ContrastiveSet, embedded_contrastive_set
from dpn_lens.effect.rules import EFFECT_RULES
from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.steering import Edit, direction_sign, steering_intervention



class MethodSettings(Protocol):
    """What a method reads from a run's config (``CompareConfig`` has these fields; a Protocol, so that
    this registry does not import the comparison that imports it). A method's default strength is the
    field its ``gamma_option`` names, read with ``getattr``."""

    npti_prompts: int
    npti_new_tokens: int
    caa_pairs: int

__all__ = ["ComparisonMethod", "MethodSettings", "TraitContext", "Condition", "COMPARISON_METHODS", "METHODS_BY_NAME",
           "METHOD_NAMES", "DEFAULT_METHOD_NAMES", "effect_rules_needed", "neuron_methods", "caa_prompts"]

Direction = Literal["increase", "decrease"]
Condition = tuple["Edit | None", "PersonaPrompt | None"]
"""``(edit, persona)``: what one evaluated condition applies; exactly one of them is not None."""


@dataclass
class TraitContext:
    """What the methods share for one trait: the trait, its DPN-LE neuron map, the maps of the effect
    rules (``maps[rule]``), and each method's prepared state (``state[method name]``, from
    ``ComparisonMethod.prepare``)."""

    trait: str
    neuron_map: NeuronMap
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    maps: dict[str, NeuronMap] = dataclasses.field(default_factory=dict)
    memo: dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False)
    """Shared by the effect rules of this trait (one gradient pass for both attribution rules)."""

    def rule_map(self, rule: str) -> NeuronMap:
        """The map of selection ``rule`` (``dpn-le``: ``neuron_map``); a KeyError naming the fix if not prepared."""
        if rule == "dpn-le":
            return self.neuron_map
        if rule not in self.maps:
            raise KeyError(f"no {rule} map for {self.trait}; fill TraitContext.maps with trait_maps.rule_maps")
        return self.maps[rule]


@dataclass(frozen=True)
class ComparisonMethod:
    """One method of the comparison.

    Attributes:
        name: the name in ``--methods``, the rows and the tables.
        build: ``(model, context, direction, gamma) -> (edit, persona)``.
        gamma_option: the ``CompareConfig`` field holding its default strength (None: no strength).
        prepare: ``(model, trait, config) -> state``, run once per trait before any condition
            (None: the method needs only the neuron map).
        sweepable: whether the gamma sweep can run it (a strength that scales an edit).
    """

    name: str
    build: Callable[[Any, TraitContext, Direction, float | None], Condition]
    gamma_option: str | None = "gamma"
    needs_rules: tuple[str, ...] = ()
    """Selection rules whose maps it edits beyond its own name (``attribution-t-resid``: attribution-t's)."""
    neurons_of: str | None = None
    """The selection rule whose neurons its edit changes, for the random-neuron control (a rule: itself;
    ``attribution-t-frozen``: ``attribution-t``); None for an edit that is not one of a rule's neurons."""
    prepare: Callable[[Any, str, MethodSettings], Any] | None = None
    sweepable: bool = True
    default: bool = True
    """Part of ``compare``'s default method list (variants that only ``--methods`` names say False)."""

    def default_gamma(self, config: MethodSettings) -> float | None:
        """The strength of the main comparison (``config.<gamma_option>``)."""
        return None if self.gamma_option is None else float(getattr(config, self.gamma_option))

    def condition(self, model: Any, context: TraitContext, direction: Direction, config: MethodSettings,
                  gamma: float | None = None) -> Condition:
        """``(edit, persona)`` at ``gamma`` (None: the method's default strength)."""
        return self.build(model, context, direction, self.default_gamma(config) if gamma is None else gamma)


# ----- the methods -----------------------------------------------------------------------------------
def _dpn_le(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
    return steering_intervention(context.neuron_map, gamma, direction, "both"), None


def _dpn_le_w(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
    return steering_intervention(context.neuron_map, gamma, direction, "both", weighted=True), None


def _dpn_le_sd(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
    return steering_intervention(context.neuron_map, gamma, direction, "both", scale="spread"), None


def _directional(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
    return steering_intervention(context.neuron_map, gamma, direction, "directional"), None


def _dense(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
    return dense_intervention(context.neuron_map, gamma, direction), None


def _topk(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
    return topk_intervention(context.neuron_map, gamma, direction), None


def _effect_rule(rule: str) -> Callable[[Any, TraitContext, Direction, float | None], Condition]:
    def build(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
        return steering_intervention(context.rule_map(rule), gamma, direction, "both"), None
    return build


RESIDUAL_PROMPT_PAIRS = 8
"""Embedded pairs (seed 42, selection data) whose tokens ``<rule>-resid`` averages the residual write over."""


def _residual_write_of(rule: str) -> Callable[[Any, TraitContext, Direction, float | None], Condition]:
    def build(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
        from dpn_lens.effect.residual_write import residual_write

        key = ("residual-write", rule)
        if key not in context.memo:   # once per trait: the unit increase write, signed and scaled below
            pairs = embedded_contrastive_set(context.trait, RESIDUAL_PROMPT_PAIRS, seed=42)
            unit = steering_intervention(context.rule_map(rule), 1.0, "increase", "both")
            context.memo[key] = residual_write(model, unit, [*pairs.high, *pairs.low])
        unit = context.memo[key]
        return gamma * (unit if direction_sign(direction) > 0 else -unit), None
    return build


def _frozen_norm_of(rule: str) -> Callable[[Any, TraitContext, Direction, float | None], Condition]:
    def build(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
        from dpn_lens.effect.frozen_norm import frozen_norm_edit

        return frozen_norm_edit(model, steering_intervention(context.rule_map(rule), gamma, direction, "both")), None
    return build


def _token_scaled_of(rule: str) -> Callable[[Any, TraitContext, Direction, float | None], Condition]:
    def build(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
        from dpn_lens.effect.frozen_norm import reference_scales, token_scaled_edit

        if "reference-scales" not in context.memo:   # once per trait, on selection data
            pairs = embedded_contrastive_set(context.trait, RESIDUAL_PROMPT_PAIRS, seed=42)
            layers = list(range(int(model.cfg.n_layers)))
            context.memo["reference-scales"] = reference_scales(model, layers, [*pairs.high, *pairs.low])
        edit = steering_intervention(context.rule_map(rule), gamma, direction, "both")
        return token_scaled_edit(model, edit, context.memo["reference-scales"]), None
    return build


def _npti_prepare(model: Any, trait: str, config: MethodSettings) -> Any:
    return npti_trait_statistics(model, trait, config.npti_prompts, config.npti_new_tokens)


def _npti(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
    return npti_intervention(model, context.state["npti"], direction, gamma), None


def caa_prompts(trait: str, config: MethodSettings) -> ContrastiveSet:
    """The prompts CAA reads its direction from in a comparison: ``config.caa_pairs`` embedded persona
    prompts per pole (``dpn-lens plan`` counts their tokens from here too).

    Example:
        >>> len(caa_prompts("openness", type("Config", (), {"caa_pairs": 3})()))
        3
    """
    return embedded_contrastive_set(trait, config.caa_pairs, seed=42)


def _caa_prepare(model: Any, trait: str, config: MethodSettings) -> Any:
    # The unit-strength increase vector; each condition scales and signs it.
    return caa_intervention(model, caa_prompts(trait, config), 1.0)


def _caa(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
    unit = context.state["caa"]
    return gamma * (unit if direction_sign(direction) > 0 else -unit), None


def _prompting(model: Any, context: TraitContext, direction: Direction, gamma: float | None) -> Condition:
    return None, persona_prompt(context.trait, direction)


COMPARISON_METHODS: tuple[ComparisonMethod, ...] = (
    ComparisonMethod("dpn-le", _dpn_le, neurons_of="dpn-le"),
    ComparisonMethod("dpn-le-w", _dpn_le_w),
    ComparisonMethod("dpn-le-sd", _dpn_le_sd, default=False),
    ComparisonMethod("directional", _directional),
    ComparisonMethod("dense", _dense),
    ComparisonMethod("topk", _topk),
    *(ComparisonMethod(rule, _effect_rule(rule), default=False, neurons_of=rule) for rule in EFFECT_RULES),
    ComparisonMethod("attribution-t-resid", _residual_write_of("attribution-t"), needs_rules=("attribution-t",),
                     default=False),
    *(ComparisonMethod(f"{rule}-{kind}", builder(rule), default=False, neurons_of=rule)
      for kind, builder in (("frozen", _frozen_norm_of), ("scaled", _token_scaled_of))
      for rule in ("attribution-t", "dpn-le")),
    ComparisonMethod("npti", _npti, gamma_option="npti_gamma", prepare=_npti_prepare),
    ComparisonMethod("caa", _caa, gamma_option="caa_gamma", prepare=_caa_prepare),
    ComparisonMethod("prompting", _prompting, gamma_option=None, sweepable=False),
)
"""Every method of the comparison, in table order."""
METHODS_BY_NAME: dict[str, ComparisonMethod] = {method.name: method for method in COMPARISON_METHODS}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS_BY_NAME)
"""The names ``--methods`` accepts."""
DEFAULT_METHOD_NAMES: tuple[str, ...] = tuple(method.name for method in COMPARISON_METHODS if method.default)
"""The methods ``compare`` runs unless ``--methods`` says otherwise."""


def effect_rules_needed(methods: Sequence[str]) -> list[str]:
    """The effect rules whose maps ``methods`` edit: those named, then those a variant builds on
    (``ComparisonMethod.needs_rules``, or the rule whose neurons it edits, ``neurons_of``), each once;
    what ``trait_maps.rule_maps`` must select.

    Example:
        >>> effect_rules_needed(["dpn-le", "attribution-t-resid", "caa"])
        ['attribution-t']
        >>> effect_rules_needed(["dpn-le-frozen", "attribution-t-scaled"])
        ['attribution-t']
    """
    needed = [name for name in methods if name in EFFECT_RULES]
    for name in methods:
        method = METHODS_BY_NAME[name]
        needed += [rule for rule in (*method.needs_rules, method.neurons_of) if rule in EFFECT_RULES and rule not in needed]
    return needed


def neuron_methods(methods: Sequence[str]) -> list[str]:
    """Those of ``methods`` that edit a selection rule's neurons (``ComparisonMethod.neurons_of``): the ones
    with a random-neuron control and a calibrated verdict in ``control``.

    Example:
        >>> neuron_methods(["dpn-le", "attribution-t-resid", "attribution-t-frozen", "caa"])
        ['dpn-le', 'attribution-t-frozen']
    """
    return [name for name in methods if METHODS_BY_NAME[name].neurons_of is not None]
