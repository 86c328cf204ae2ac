"""Localization by effect: select the neurons whose edit moves the trait, not only those that differ.

* ``pairs``: selection pairs, the model's own answers to embedded training questions (never the
  evaluation's held-out questions);
* ``gradients``: the margin's gradient at the answer positions, and each neuron's write along a
  residual direction;
* ``rules``: the selection rules (``dpn-le``, ``attribution``, ``write``, ``write-layer``,
  ``dpn-le-attribution``), effect scores and the maps they make.
"""

from dpn_lens.effect.gradients import MarginGradients, margin_gradients, write_gradients
from dpn_lens.effect.pairs import selection_pairs
from dpn_lens.effect.rules import (EFFECT_RULES, RULE_NAMES, SELECTION_RULES, EffectScores, default_budget,
                                   effect_map, effect_scores, reselect_top, select_by_effect, select_top)

__all__ = ["MarginGradients", "margin_gradients", "write_gradients", "selection_pairs", "EFFECT_RULES", "RULE_NAMES",
           "SELECTION_RULES", "EffectScores", "default_budget", "effect_map", "effect_scores", "reselect_top",
           "select_by_effect", "select_top"]
