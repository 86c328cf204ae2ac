"""Do the neurons that steer look like the paper's? Effect-selected sets beside DPN-LE's dual criterion.

``dpn-lens locate --select ...`` keeps, beside each trait's DPN-LE map, the maps of the effect rules
(``dpn_lens.effect.rules``; ``Run.rule_maps``). This study compares them with DPN-LE's sets:

* **overlap** with DPN-LE's neurons of the same trait: shared neurons, Jaccard, the hypergeometric
  p-value (population: all neurons of the layers both searched) and its layer-matched version
  (``overlap.layer_matched_pvalue``). Does the paper's set contain the neurons that steer?
* **layers**: how each rule's neurons spread over the layers (counts per layer, all traits pooled).
* **exclusivity between poles** (the paper's claim 3), at the level of representations:
  ``overlap.pole_exclusivity`` of every rule's high and low sets (an effect rule's poles are its neurons
  split by the sign of ``s``, disjoint by construction like DPN-LE's; the question is whether each pole's
  neurons respond to their own pole's prompts and not the other's).
* **multifunctionality** (claim 2): the multifunction study (``studies.multifunction``) on every rule's
  sets: overlap with capability neurons against layer-matched chance, and the held-out LM-loss cost of
  ablating them, beside a layer-matched random set.
* with control runs (``--control``): the **sparsity figure**, the mean shift at the target KL against
  the number of edited neurons per rule (``report.control.sparsity_figure``), one panel per model.

Files start with ``causal_``.

Example:
    >>> run = Run.load("runs/causal")                                            # doctest: +SKIP
    >>> rows = overlap_with_dual(run)                                            # doctest: +SKIP
    >>> rows[0]["rule"], rows[0]["jaccard"]                                      # doctest: +SKIP
    ('attribution', 0.05)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.run import Run
from dpn_lens.studies.overlap import jaccard, layer_matched_pvalue, overlap_pvalue, pole_exclusivity, shared_layers
from dpn_lens.studies.section import ReportSection
from dpn_lens.studies.sets import NeuronSet

if TYPE_CHECKING:
    from dpn_lens.evaluation.control_record import ControlRecord

__all__ = ["REPORT_SECTION", "rule_pole_sets", "rule_union_set", "overlap_with_dual", "layer_distribution",
           "rule_exclusivity", "causal_study"]

REPORT_SECTION = ReportSection("causal", "Neurons that steer vs the dual criterion")


def rule_pole_sets(neuron_map: NeuronMap) -> list[NeuronSet]:
    """The high and low sets of a map of any rule, with the rule as the set's method."""
    return [NeuronSet(f"{neuron_map.trait} {pole} [{neuron_map.rule}]", neuron_map.pole(pole), neuron_map.d_mlp,
                      neuron_map.trait, pole, neuron_map.rule) for pole in ("high", "low")]


def rule_union_set(neuron_map: NeuronMap) -> NeuronSet:
    """Both poles of a map together: the neurons a ``mode="both"`` edit changes."""
    layers = sorted(set(neuron_map.high) | set(neuron_map.low))
    neurons = {layer: np.union1d(neuron_map.high.get(layer, []), neuron_map.low.get(layer, [])) for layer in layers}
    return NeuronSet(f"{neuron_map.trait} [{neuron_map.rule}]", neurons, neuron_map.d_mlp, neuron_map.trait, "both",
                     neuron_map.rule)


def _require_rules(run: Run) -> None:
    if not run.rule_maps:
        raise FileNotFoundError(f"{run.folder} holds no effect-rule maps (maps/<rule>/<trait>.safetensors); make them "
                                "with `dpn-lens locate --select attribution,write-layer,... --out RUN`")


def overlap_with_dual(run: Run) -> list[dict[str, Any]]:
    """Per effect rule and trait: its neurons' overlap with DPN-LE's, against size-matched chance.

    Example:
        >>> from helpers import make_map                                    # doctest: +SKIP
    """
    _require_rules(run)
    rows = []
    for rule, maps in run.rule_maps.items():
        for trait, chosen in maps.items():
            mine, dual = rule_union_set(chosen), rule_union_set(run.maps[trait])
            layers = shared_layers(mine, dual)
            a, b = mine.pairs(layers), dual.pairs(layers)
            shared = len(a & b)
            p_layer, expected = layer_matched_pvalue(shared, mine.d_mlp, [mine.layer_size(l) for l in layers],
                                                     [dual.layer_size(l) for l in layers])
            rows.append({"rule": rule, "trait": trait, "n_rule": mine.size, "n_dpn_le": dual.size,
                         "n_in_shared_layers": len(a), "shared": shared, "jaccard": jaccard(mine, dual),
                         "expected_layer_matched": expected,
                         "p_value": overlap_pvalue(shared, len(layers) * mine.d_mlp, len(a), len(b)),
                         "p_value_layer_matched": p_layer})
    return rows


def layer_distribution(run: Run) -> list[dict[str, Any]]:
    """Per rule (DPN-LE included) and layer: neurons selected, summed over traits, and their share."""
    rows = []
    by_rule = {"dpn-le": run.maps, **run.rule_maps}
    for rule, maps in by_rule.items():
        counts: dict[int, int] = {}
        for neuron_map in maps.values():
            for layer, (high, low) in neuron_map.counts_per_layer().items():
                counts[layer] = counts.get(layer, 0) + high + low
        total = sum(counts.values())
        rows += [{"rule": rule, "layer": layer, "neurons": count, "share": count / total if total else float("nan")}
                 for layer, count in sorted(counts.items())]
    return rows


def rule_exclusivity(run: Run) -> list[dict[str, Any]]:
    """``overlap.pole_exclusivity`` of every rule's high and low sets (needs the run's statistics)."""
    run.require_stats("exclusivity")
    rows = []
    by_rule = {"dpn-le": run.maps, **run.rule_maps}
    for rule, maps in by_rule.items():
        for trait, neuron_map in maps.items():
            rows += pole_exclusivity(run.maps[trait], run.stats[trait], rule_pole_sets(neuron_map))
    return rows


def _layer_figure(rows: Sequence[dict[str, Any]]) -> Any:
    import plotly.graph_objects as go

    from dpn_lens.figures import style

    figure = go.Figure()
    for rule in dict.fromkeys(r["rule"] for r in rows):
        mine = [r for r in rows if r["rule"] == rule]
        figure.add_trace(go.Scatter(x=[r["layer"] for r in mine], y=[r["share"] for r in mine], mode="lines+markers",
                                    name=rule))
    return style(figure, "Where each rule's neurons sit: share of its neurons per layer (all traits)", "layer",
                 "share of the rule's neurons")


def _summary_lines(overlap: Sequence[dict[str, Any]], exclusivity: Sequence[dict[str, Any]],
                   capability: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Overlap with DPN-LE's neurons (same trait)", ""]
    for rule in dict.fromkeys(r["rule"] for r in overlap):
        mine = [r for r in overlap if r["rule"] == rule]
        shared, size = sum(r["shared"] for r in mine), sum(r["n_rule"] for r in mine)
        expected = sum(r["expected_layer_matched"] for r in mine)
        significant = sum(r["p_value_layer_matched"] < 0.05 for r in mine)
        lines.append(f"- {rule}: {shared} of its {size} neurons are DPN-LE's ({expected:.1f} expected by chance, "
                     f"layer-matched); mean Jaccard {np.mean([r['jaccard'] for r in mine]):.3f}; overlap above chance "
                     f"(p < 0.05) in {significant}/{len(mine)} traits")
    if exclusivity:
        lines += ["", "## Exclusivity between poles (claim 3)", ""]
        for rule in dict.fromkeys(r["method"] for r in exclusivity):
            mine = [r for r in exclusivity if r["method"] == rule and r["n"]]
            if mine:
                lines.append(f"- {rule}: own pole stronger for {np.nanmean([r['frac_own_stronger'] for r in mine]):.0%} "
                             f"of neurons; median |d| {np.nanmean([r['median_abs_d'] for r in mine]):.2f}; distribution "
                             f"overlap {np.nanmean([r['mean_distribution_overlap'] for r in mine]):.2f} (1 = indistinguishable)")
    if capability:
        lines += ["", "## Multifunctionality (claim 2)", ""]
        for rule, entry in capability.get("by_method", {}).items():
            fraction = entry.get("capability_fraction_pooled")
            lines.append(f"- {rule}: {fraction if fraction is None else f'{fraction:.1%}'} capability neurons "
                         f"(chance {entry['chance']:.0%}), mean within-layer percentile {entry['mean_percentile']:.2f}; "
                         f"ablation cost {entry['mean_ablation_cost']:+.4f} nats vs random "
                         f"{entry['mean_random_ablation_cost'] if entry['mean_random_ablation_cost'] is None else format(entry['mean_random_ablation_cost'], '+.4f')}")
    return lines


def causal_study(run: Run, out: str | Path, model: Any = None, control: "Mapping[str, ControlRecord] | None" = None,
                 capability_config: Any = None, png: bool = True, plotlyjs: str = "cdn",
                 log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Write the causal study of ``run`` to ``out`` (module note); returns its summary.

    Args:
        run: a run folder with effect-rule maps (``dpn-lens locate --select ...``) and statistics.
        model: the model, for the capability part (None: skipped).
        control: ``{model name: control record}`` of ``dpn-lens control`` runs with a budget sweep, for the
            sparsity figure.
        capability_config: a ``MultifunctionConfig`` (data folder and sizes) for the capability part.
    """
    from dpn_lens.report.control import sparsity_figure
    from dpn_lens.figures import save_figure
    from dpn_lens.io import write_json_atomic, write_text_atomic
    from dpn_lens.studies.outputs import _jsonable, multifunction_study, write_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overlap = overlap_with_dual(run)
    write_table(overlap, out, "causal_overlap")
    layers = layer_distribution(run)
    write_table(layers, out, "causal_layers", markdown=False)
    save_figure(_layer_figure(layers), out, "causal_layers", png, plotlyjs)  # type: ignore[arg-type]
    exclusivity = rule_exclusivity(run) if run.stats else []
    if exclusivity:
        write_table(exclusivity, out, "causal_exclusivity")
    elif log:
        log(f"causal: no statistics in {run.folder}; the exclusivity part is skipped")
    capability = None
    if model is not None:
        extra = {rule: [s for trait in run.maps if trait in maps for s in rule_pole_sets(maps[trait])]
                 for rule, maps in run.rule_maps.items()}
        capability = multifunction_study(run, out / "capability", model, capability_config, png, plotlyjs,  # type: ignore[arg-type]
                                         log, extra_sets=extra)
    if control:
        with_sweep = {name: record for name, record in control.items() if record.sweep}
        if with_sweep:
            save_figure(sparsity_figure(with_sweep), out, "causal_sparsity", png, plotlyjs)
    lines = [f"# Neurons that steer vs the dual criterion ({run.model_name or 'model'})", "",
             *_summary_lines(overlap, exclusivity, capability), ""]
    write_text_atomic(out / "causal.md", "\n".join(lines))
    summary = {"overlap": overlap, "layers": layers, "exclusivity": exclusivity, "capability": capability}
    write_json_atomic(out / "causal_summary.json", _jsonable(summary))
    if log:
        log(f"causal: wrote overlap, layer, exclusivity{' and capability' if capability else ''} tables to {out}")
    return summary
