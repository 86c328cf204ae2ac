"""dpn-lens: locate the MLP neurons that carry a personality trait and steer only those.

The data flows one way, one module per step:

    prompts (``data``) -> activation statistics (``statistics``, ``collect``)
        -> neuron map (``localize``, ``neuron_map``) -> intervention (``steering``)
        -> evaluation (``evaluation``, ``baselines``) -> studies and figures (``studies``, ``figures``)

Example:
    >>> import dpn_lens as dl
    >>> model = dl.load_model("smollm2-135m-instruct")                      # doctest: +SKIP
    >>> pairs = dl.embedded_contrastive_set("extraversion", n_pairs=200)     # doctest: +SKIP
    >>> stats = dl.collect_statistics(model, pairs)                          # doctest: +SKIP
    >>> neuron_map = dl.locate(stats)                                        # doctest: +SKIP
    >>> with dl.steer(model, dl.steering_intervention(neuron_map, gamma=1.0)):  # doctest: +SKIP
    ...     print(model.generate(prompt, max_new_tokens=40, do_sample=False))
"""

from dpn_lens._version import __version__

from dpn_lens.traits import TRAITS, normalize_trait, normalize_pole
from dpn_lens.models import load_model, model_fingerprint, ModelFingerprint, EMBEDDED_MODELS
from dpn_lens.data import (
    ContrastiveSet,
    ContrastivePair,
    embedded_contrastive_set,
    personalitybench_contrastive_set,
    anthropic_persona_contrastive_set,
    render_roleplay_prompt,
)
from dpn_lens.collection.statistics import GroupStatistics, ContrastStatistics
from dpn_lens.collection.collect import CollectionConfig, collect_statistics, collect_group_statistics
from dpn_lens.localization.localize import (
    LocalizationSettings,
    REFERENCE_SETTINGS,
    steering_values,
    cohens_d,
    select_neurons,
    propose_settings,
    locate,
    reselect,
)
from dpn_lens.localization.neuron_map import IncompatibleModelError, NeuronMap, WrongRuleError
from dpn_lens.effect.rules import EFFECT_RULES, RULE_NAMES, effect_map, effect_scores, select_by_effect
from dpn_lens.effect.pairs import selection_pairs
from dpn_lens.steering import (
    Edit,
    Intervention,
    additive_intervention,
    apply_intervention,
    combine_interventions,
    direction_sign,
    steer,
    steering_intervention,
)
from dpn_lens.collection.distributed import collect_statistics_distributed, merge_across_processes
from dpn_lens.pipeline import LocateConfig, locate_traits, neuron_table
from dpn_lens.run import Run
from dpn_lens.evaluation.calibrate import Calibration, calibrate_directions, calibrate_gamma
from dpn_lens.evaluation.runner import Evaluation, EvaluationConfig, evaluate
from dpn_lens.cards import CardConfig, NeuronCard, build_cards, explore

__all__ = [
    "__version__",
    "TRAITS",
    "normalize_trait",
    "normalize_pole",
    "load_model",
    "model_fingerprint",
    "ModelFingerprint",
    "EMBEDDED_MODELS",
    "ContrastiveSet",
    "ContrastivePair",
    "embedded_contrastive_set",
    "personalitybench_contrastive_set",
    "anthropic_persona_contrastive_set",
    "render_roleplay_prompt",
    "GroupStatistics",
    "ContrastStatistics",
    "CollectionConfig",
    "collect_statistics",
    "collect_group_statistics",
    "LocalizationSettings",
    "REFERENCE_SETTINGS",
    "steering_values",
    "cohens_d",
    "select_neurons",
    "propose_settings",
    "locate",
    "reselect",
    "NeuronMap",
    "IncompatibleModelError",
    "WrongRuleError",
    "RULE_NAMES",
    "EFFECT_RULES",
    "effect_scores",
    "effect_map",
    "select_by_effect",
    "selection_pairs",
    "Edit",
    "Intervention",
    "steering_intervention",
    "calibrate_gamma",
    "calibrate_directions",
    "evaluate",
    "EvaluationConfig",
    "Evaluation",
    "CardConfig",
    "NeuronCard",
    "build_cards",
    "explore",
    "Calibration",
    "additive_intervention",
    "direction_sign",
    "combine_interventions",
    "steer",
    "apply_intervention",
    "collect_statistics_distributed",
    "merge_across_processes",
    "locate_traits",
    "Run",
    "LocateConfig",
    "neuron_table",
]
