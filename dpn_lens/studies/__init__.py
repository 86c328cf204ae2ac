"""Studies of how personality is laid out in a model, from saved neuron maps and statistics.

One module per study: ``layers`` (layer-wise distribution), ``overlap`` (overlap and mutual
exclusivity), ``multifunction`` (capability neurons and ablation/edit costs); ``report`` writes their
figures and tables, ``cli`` adds ``dpn-lens study``.

Example:
    >>> from dpn_lens.studies import load_run, pole_sets, pairwise_overlap      # doctest: +SKIP
    >>> run = load_run("runs/demo")                                             # doctest: +SKIP
    >>> rows = pairwise_overlap([s for m in run.maps.values() for s in pole_sets(m)])   # doctest: +SKIP
"""

from dpn_lens.studies.layers import layer_counts, layer_value_quantiles, top_neurons
from dpn_lens.studies.overlap import (
    jaccard, overlap_coefficient, overlap_pvalue, layer_matched_pvalue, pairwise_overlap, per_layer_overlap,
    overlap_matrix, pole_exclusivity, exclusivity_points, steering_correlations,
)
from dpn_lens.studies.run import (
    METHODS, NPTI, NeuronSet, Run, alternative_sets, load_run, npti_sets, npti_sets_for_run, pole_sets,
)

__all__ = [
    "METHODS", "NPTI", "NeuronSet", "Run", "alternative_sets", "load_run", "npti_sets", "npti_sets_for_run",
    "pole_sets",
    "layer_counts", "layer_value_quantiles", "top_neurons",
    "jaccard", "overlap_coefficient", "overlap_pvalue", "layer_matched_pvalue", "pairwise_overlap",
    "per_layer_overlap", "overlap_matrix", "pole_exclusivity", "exclusivity_points", "steering_correlations",
]
