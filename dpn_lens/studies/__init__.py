"""Studies of how personality is laid out in a model, from saved neuron maps and statistics.

One module per study: ``layers`` (layer-wise distribution), ``overlap`` (overlap and mutual
exclusivity), ``multifunction`` (capability neurons and ablation/edit costs); ``sets`` builds the neuron
sets they compare, ``outputs`` writes their figures and tables, ``cli`` adds ``dpn-lens study``.

Adding a study: its module (declaring a ``REPORT_SECTION``) and one line in ``STUDY_SECTIONS`` below.

Example:
    >>> from dpn_lens.run import Run                                             # doctest: +SKIP
    >>> from dpn_lens.studies import pole_sets, pairwise_overlap                # doctest: +SKIP
    >>> run = Run.load("runs/demo")                                             # doctest: +SKIP
    >>> rows = pairwise_overlap([s for m in run.maps.values() for s in pole_sets(m)])   # doctest: +SKIP
"""

from dpn_lens.run import Run
from dpn_lens.studies import causal, layers, multifunction, overlap
from dpn_lens.studies.layers import layer_counts, layer_value_quantiles, top_neurons
from dpn_lens.studies.outputs import MultifunctionConfig
from dpn_lens.studies.overlap import (
    jaccard, overlap_coefficient, overlap_pvalue, layer_matched_pvalue, pairwise_overlap, per_layer_overlap,
    overlap_matrix, pole_exclusivity, exclusivity_points, steering_correlations,
)
from dpn_lens.studies.section import ReportSection
from dpn_lens.studies.sets import (
    NPTI, SET_METHODS, NeuronSet, alternative_sets, npti_sets, npti_sets_for_run, pole_sets,
)

STUDY_SECTIONS: tuple[ReportSection, ...] = (
    layers.REPORT_SECTION,
    overlap.REPORT_SECTION,
    multifunction.REPORT_SECTION,
    causal.REPORT_SECTION,
)
"""The studies' sections of the report page, in page order (one line per study)."""

__all__ = [
    "SET_METHODS", "NPTI", "NeuronSet", "Run", "alternative_sets", "npti_sets", "npti_sets_for_run", "pole_sets",
    "ReportSection", "STUDY_SECTIONS", "MultifunctionConfig",
    "layer_counts", "layer_value_quantiles", "top_neurons",
    "jaccard", "overlap_coefficient", "overlap_pvalue", "layer_matched_pvalue", "pairwise_overlap",
    "per_layer_overlap", "overlap_matrix", "pole_exclusivity", "exclusivity_points", "steering_correlations",
]
