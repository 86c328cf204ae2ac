"""What a neuron does: the trait-margin shift when only this neuron is pushed.

For the top neurons of a map (``top`` per map, ranked by their rank in their layer, then ``|s|``), the
edit is the map's own ``+gamma * s_i`` on that one neuron, at the gamma that brings the WHOLE map's
increase edit to ``target_kl`` (``calibrate_gamma``; KL 0.05 nats/token on neutral text, as in
``dpn-lens control``). The shift is measured as ``control`` measures it: the preference margin
``log p(high answer) - log p(low answer)`` on held-out PersonalityBench pairs (the model's own answers
under held-out personas, cached per model), steered minus unsteered, with a 95% bootstrap interval over
pairs. Positive = towards the high pole. The whole map's shift at the same gamma goes beside it, so a
card says which share of the map's effect one neuron carries.

The cost is one scoring pass over the pairs per neuron, which is why it is opt-in
(``dpn-lens cards --effects N``).

Example:
    >>> add_effects(run, model, cards, data_dir="../shared/data", top=5)       # doctest: +SKIP
    >>> cards[("dpn-le", "openness")][0].effect["shift"]                       # doctest: +SKIP
    0.0021
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from dpn_lens.cards.card import NeuronCard
from dpn_lens.localization.neuron_map import DUAL_CRITERION
from dpn_lens.run import Run

__all__ = ["add_effects", "effect_order"]


def effect_order(cards: list[NeuronCard]) -> list[NeuronCard]:
    """The order in which cards get an effect: best rank in its layer first, then larger ``|s|``."""
    return sorted(cards, key=lambda card: (card.rank_in_layer, -abs(card.s), card.layer, card.neuron))


def add_effects(run: Run, model: Any, cards: dict[tuple[str, str], list[NeuronCard]], data_dir: str | None,
                top: int = 8, n_pairs: int = 32, target_kl: float = 0.05,
                log: Callable[[str], None] | None = print) -> dict[tuple[str, str], dict[str, Any]]:
    """Fill ``card.effect`` of the ``top`` neurons of each map in ``cards`` (module note); returns per map
    the calibrated gamma and the whole map's shift."""
    from dpn_lens.evaluation.calibrate import calibrate_gamma
    from dpn_lens.evaluation.control import ControlConfig, held_out_pairs
    from dpn_lens.evaluation.intervals import paired_effect
    from dpn_lens.evaluation.preference import PairScorer
    from dpn_lens.steering import additive_intervention, steering_intervention

    if top < 1:
        raise ValueError(f"top must be at least 1 neuron per map, got {top}")
    summary: dict[tuple[str, str], dict[str, Any]] = {}
    for trait in dict.fromkeys(trait for _, trait in cards):
        config = ControlConfig(traits=[trait], data_dir=data_dir, pairs=n_pairs)
        held = held_out_pairs(model, trait, config, log=lambda message: None)
        scorer = PairScorer(model, held.pairs, cache_bytes=config.score_cache_bytes)
        base = scorer.margins()
        for (rule, map_trait), map_cards in cards.items():
            if map_trait != trait or not map_cards:
                continue
            neuron_map = run.maps[trait] if rule == DUAL_CRITERION else run.rule_maps[rule][trait]
            calibration = calibrate_gamma(model, neuron_map, target_kl=target_kl)
            gamma = float(calibration.gamma)
            whole = paired_effect(scorer.margins(edit=steering_intervention(neuron_map, gamma, "increase")), base)
            summary[(rule, trait)] = {"gamma": gamma, "map_shift": whole.shift}
            for card in effect_order(map_cards)[:top]:
                edit = additive_intervention(neuron_map.steering_value, neuron_map.stat_layers,
                                             {card.layer: torch.tensor([card.neuron])}, gamma, "increase",
                                             label=f"{card.label} alone", source=trait)
                alone = paired_effect(scorer.margins(edit=edit), base)
                card.effect = {"shift": alone.shift, "ci_low": alone.ci_low, "ci_high": alone.ci_high,
                               "p": alone.p_value, "n_pairs": alone.n, "gamma": gamma, "direction": "increase",
                               "target_kl": target_kl, "map_shift": whole.shift}
            if log:
                log(f"effects: {trait} [{rule}] gamma {gamma:.3g} (map at KL {target_kl}): map shift "
                    f"{whole.shift:+.4f}; {min(top, len(map_cards))} neurons alone")
    return summary
