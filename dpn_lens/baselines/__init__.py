"""Baseline edits the paper compares DPN-LE with, each usable like a DPN-LE ``Intervention``.

* ``npti``: NPTI neuron editing (activation-probability selection, sigmoid-weighted boost, clamp);
* ``dense``: the DPN-LE mean-difference vector on all neurons of the chosen layers, or on the top-k
  neurons by |Cohen's d| with DPN-LE's neuron budget;
* ``caa``: residual-stream mean-difference steering (contrastive activation addition) at one layer;
* ``prompting``: the persona description in the prompt, no intervention (a ``PersonaPrompt`` is not
  an edit; evaluation functions take it as ``persona=``).

Additive MLP edits are plain ``dpn_lens.steering.Intervention`` objects (built by
``additive_intervention``). NPTI and CAA edits follow the same ``dpn_lens.steering.Edit`` protocol
(``fwd_hooks()``, ``positions``, ``label``, ``n_edited``, ``at_positions``, ``-edit``, ``gamma * edit``),
so ``dpn_lens.steer`` applies every one of them and always removes its hooks.
"""

from dpn_lens.baselines.caa import ResidualIntervention, caa_intervention, residual_means
from dpn_lens.baselines.dense import dense_intervention, topk_intervention
from dpn_lens.baselines.npti import (
    NPTIIntervention,
    NPTIStatistics,
    npti_intervention,
    npti_pole_selection,
    npti_select,
    npti_statistics,
    npti_trait_statistics,
    scaled_top_count,
)
from dpn_lens.baselines.prompting import PersonaPrompt, persona_prompt

__all__ = [
    "ResidualIntervention",
    "caa_intervention",
    "residual_means",
    "dense_intervention",
    "topk_intervention",
    "NPTIIntervention",
    "NPTIStatistics",
    "npti_intervention",
    "npti_pole_selection",
    "npti_select",
    "npti_statistics",
    "npti_trait_statistics",
    "scaled_top_count",
    "PersonaPrompt",
    "persona_prompt",
]
