"""Run each study on a run folder and write its figures (HTML + PNG) and tables (CSV + Markdown + JSON).

Every file a study writes starts with its section's prefix (``layers_``, ``overlap_``, ``multifunction_``;
see ``dpn_lens.studies.STUDY_SECTIONS``), which is how ``dpn-lens report`` groups them.

Example:
    >>> run = Run.load("runs/demo")                                   # doctest: +SKIP
    >>> summary = layers_study(run, "figures")                        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch

import dpn_lens.figures as figures
from dpn_lens.io import markdown_table, write_csv_atomic, write_json_atomic, write_text_atomic
from dpn_lens.studies import layers as layer_study
from dpn_lens.studies import overlap as overlap_study
from dpn_lens.run import Run
from dpn_lens.studies.sets import SET_METHODS, NeuronSet, alternative_sets, pole_sets

__all__ = ["write_table", "layers_study", "overlap_study_report", "multifunction_study", "MultifunctionConfig",
           "residual_study"]

PlotlyJs = Literal["cdn", "directory"]



@dataclass
class MultifunctionConfig:
    """How much data the multifunctionality study uses, and which sets it compares.

    Attributes:
        data_dir: shared data folder holding ``capability/`` (default: ``$DPN_LENS_DATA``).
        n_text: WikiText-2 windows for the attribution.
        n_multiple_choice: MMLU + ARC questions for the attribution.
        n_held_out: held-out WikiText-2 windows for the ablation and edit costs.
        window: tokens per text window.
        fraction: capability neurons = this top fraction of each layer by attribution.
        gamma: strength of the edit whose cost is measured (``+gamma * s`` on a set's neurons).
        batch_size: examples per forward pass.
        seed: seed of the data draw and of the random control sets.
        methods: ``alternative_sets`` methods compared.
        random_control: also ablate a layer-matched random set per set.

    Example:
        >>> config = MultifunctionConfig(n_text=2, methods=("DPN-LE",))
        >>> MultifunctionConfig.from_dict(config.to_dict()) == config
        True
    """

    data_dir: str | Path | None = None
    n_text: int = 8
    n_multiple_choice: int = 32
    n_held_out: int = 8
    window: int = 128
    fraction: float = 0.02
    gamma: float = 0.8
    batch_size: int = 4
    seed: int = 0
    methods: tuple[str, ...] = SET_METHODS
    random_control: bool = True

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (the data folder as a string, methods as a list)."""
        result = dataclasses.asdict(self)
        result["data_dir"] = None if self.data_dir is None else str(self.data_dir)
        result["methods"] = list(self.methods)
        return result

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MultifunctionConfig":
        """Inverse of ``to_dict``; unknown keys are an error."""
        return cls(**values)


def write_table(rows: Sequence[dict], folder: str | Path, name: str, markdown: bool = True) -> list[Path]:
    """Write ``rows`` as ``name.csv`` (full precision) and, with ``markdown``, ``name.md`` (4 digits)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_csv_atomic(folder / f"{name}.csv", list(rows))]
    if markdown:
        paths.append(write_text_atomic(folder / f"{name}.md", markdown_table(rows) + "\n"))
    return paths


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def _print(text: str) -> None:
    print(text, flush=True)  # flush: progress must show up promptly when output goes to a file or pipe


def _say(log: Callable[[str], None] | None, text: str) -> None:
    if log:
        log(text)


def layers_study(run: Run, out: str | Path, top: int = 10, png: bool = True, plotlyjs: PlotlyJs = "cdn",
                 log: Callable[[str], None] | None = _print) -> dict:
    """Counts per layer, d/s quantiles per layer, top neurons; bar figure and one d-vs-|s| scatter per trait."""
    out = Path(out)
    counts = layer_study.layer_counts(run.maps)
    write_table(counts, out, "layers_counts")
    write_table(layer_study.layer_value_quantiles(run.maps), out, "layers_value_quantiles")
    write_table(layer_study.top_neurons(run.maps, top), out, "layers_top_neurons")
    figures.save_figure(figures.layer_distribution_figure(counts), out, "layers_distribution", png, plotlyjs)
    for trait, neuron_map in run.maps.items():
        figures.save_figure(figures.d_s_scatter_figure(neuron_map), out, f"layers_d_vs_s_{trait}", png, plotlyjs)
    summary = {}
    for trait, neuron_map in run.maps.items():
        per_layer = neuron_map.counts_per_layer()
        busiest = max(per_layer, key=lambda l: sum(per_layer[l]))
        summary[trait] = {"high": neuron_map.n_selected("high"), "low": neuron_map.n_selected("low"),
                          "layers": neuron_map.settings.layer_range, "q": neuron_map.settings.q,
                          "tau_d": neuron_map.settings.tau_d, "fraction": neuron_map.fraction_selected(),
                          "busiest_layer": busiest, "busiest_layer_count": sum(per_layer[busiest])}
    write_json_atomic(out / "layers_summary.json", _jsonable(summary))
    _say(log, f"layers: wrote counts, quantiles, top neurons and {1 + len(run.maps)} figures to {out}")
    return summary


def _extra_sets(run: Run, methods: Sequence[str], extra_sets: Mapping[str, Sequence[NeuronSet]] | None
                ) -> dict[str, list[NeuronSet]]:
    """Check sets chosen outside the run folder (e.g. ``{"NPTI": npti_sets_for_run(model, run)}``).

    Each set must carry its key as ``method``, belong to a trait of the run, have the maps' width, and
    lie in that trait's ``stat_layers``: the studies look its neurons up in the statistics and in ``s``.
    """
    checked: dict[str, list[NeuronSet]] = {}
    for method, sets in (extra_sets or {}).items():
        if method in methods:
            raise ValueError(f"extra set method {method!r} is already one of the run's methods {list(methods)}")
        sets = list(sets)
        for neuron_set in sets:
            if neuron_set.method != method:
                raise ValueError(f"set {neuron_set.name!r} has method {neuron_set.method!r} but was passed under "
                                 f"{method!r}; key extra_sets by each set's method")
            neuron_map = run.maps.get(neuron_set.trait)
            if neuron_map is None:
                raise ValueError(f"set {neuron_set.name!r} is of trait {neuron_set.trait!r}, which the run at "
                                 f"{run.folder} has no map of ({', '.join(run.traits)})")
            if neuron_set.d_mlp != neuron_map.d_mlp:
                raise ValueError(f"set {neuron_set.name!r} has d_mlp {neuron_set.d_mlp} but the run's maps have "
                                 f"{neuron_map.d_mlp}: it comes from another model")
            outside = sorted(set(neuron_set.layers) - set(neuron_map.stat_layers))
            if outside:
                raise ValueError(f"set {neuron_set.name!r} has layers {outside} outside the run's statistics layers "
                                 f"{neuron_map.stat_layers}; restrict it (npti_sets(stats, layers=stat_layers))")
        checked[method] = sets
    return checked


def _both_poles(sets: Sequence[NeuronSet], trait: str, method: str, d_mlp: int) -> NeuronSet:
    """One set of both poles together: the neurons a "both"-mode edit touches."""
    empty = torch.zeros(0, dtype=torch.long)
    layers = sorted({layer for s in sets for layer in s.layers})
    neurons = {layer: torch.cat([s.neurons.get(layer, empty) for s in sets]) for layer in layers}
    return NeuronSet(f"{trait} [{method}]", neurons, d_mlp, trait, "both", method)


def overlap_study_report(run: Run, out: str | Path, methods: Sequence[str] = SET_METHODS[:3], png: bool = True,
                         plotlyjs: PlotlyJs = "cdn", log: Callable[[str], None] | None = _print,
                         extra_sets: Mapping[str, Sequence[NeuronSet]] | None = None) -> dict:
    """Pole-set overlap (Jaccard, overlap coefficient, p-values), per-layer overlap, UpSet plot,
    within-trait exclusivity for each selection method, and cross-trait steering-vector correlation.

    Args:
        methods: ``alternative_sets`` methods compared in the exclusivity part.
        extra_sets: sets that need more than the run folder, keyed by method, e.g.
            ``{"NPTI": npti_sets_for_run(model, run)}``; they join the exclusivity table, points and
            figure after ``methods`` (the overlap tables stay DPN-LE only).

    Example:
        >>> summary = overlap_study_report(run, "figures", extra_sets={"NPTI": npti_sets})   # doctest: +SKIP
        >>> summary["exclusivity_mean_over_traits"]["NPTI high"]["frac_own_stronger"]      # doctest: +SKIP
    """
    out = Path(out)
    extra = _extra_sets(run, methods, extra_sets)
    all_methods = [*methods, *extra]
    sets = [s for m in run.maps.values() for s in pole_sets(m)]
    names = [s.name for s in sets]
    pairs = overlap_study.pairwise_overlap(sets)
    write_table(pairs, out, "overlap_pairs")
    per_layer = overlap_study.per_layer_overlap(sets)
    write_table(per_layer, out, "overlap_per_layer", markdown=False)
    pvalues = overlap_study.overlap_matrix(pairs, names, "p_value_layer_matched")
    for key, label in (("jaccard", "Jaccard"), ("overlap_coef", "overlap coefficient")):
        matrix = overlap_study.overlap_matrix(pairs, names, key)
        np.savetxt(out / f"overlap_{key}_matrix.csv", matrix, delimiter=",", header=",".join(names), fmt="%.6g")
        fig = figures.overlap_heatmap_figure(matrix, names, f"{label} of the DPN-LE pole sets", label, pvalues=pvalues)
        figures.save_figure(fig, out, f"overlap_{key}_heatmap", png, plotlyjs)
    figures.save_figure(figures.upset_figure(sets), out, "overlap_upset", png, plotlyjs)
    figures.save_figure(figures.layer_jaccard_figure(per_layer), out, "overlap_jaccard_per_layer", png, plotlyjs)

    correlations = overlap_study.steering_correlations(run.maps)
    write_table(correlations, out, "overlap_steering_correlation", markdown=False)
    figures.save_figure(figures.steering_correlation_figure(correlations), out, "overlap_steering_correlation",
                        png, plotlyjs)

    summary: dict[str, Any] = {}
    cross = [r for r in pairs if r["set_a"] != r["set_b"] and r["set_a"].split()[0] != r["set_b"].split()[0]]
    within = [r for r in pairs if r["set_a"] != r["set_b"] and r["set_a"].split()[0] == r["set_b"].split()[0]]
    summary["within_trait_overlap"] = {r["set_a"].split()[0]: r["overlap"] for r in within}
    summary["cross_trait_pairs"] = [
        {k: r[k] for k in ("set_a", "set_b", "overlap", "jaccard", "overlap_coef", "expected_layer_matched",
                           "p_value", "p_value_layer_matched", "p_bonferroni")}
        for r in sorted(cross, key=lambda r: -r["overlap"]) if r["overlap"] > 0]
    summary["n_cross_pairs_significant_bonferroni"] = sum(1 for r in cross if r["p_bonferroni"] < 0.05)
    searched = [r for r in correlations if r["searched"]]
    by_pair: dict[str, list[float]] = {}
    for r in searched:
        by_pair.setdefault(f"{r['trait_a']} & {r['trait_b']}", []).append(r["r"])
    summary["mean_steering_correlation_searched_layers"] = {k: float(np.nanmean(v)) for k, v in by_pair.items()}

    if run.stats:
        run.require_stats("exclusivity")
        points, exclusivity = [], []
        for trait, neuron_map in run.maps.items():
            trait_sets = [s for method in methods for s in alternative_sets(neuron_map, method)]
            trait_sets += [s for sets in extra.values() for s in sets if s.trait == trait]
            points += overlap_study.exclusivity_points(neuron_map, run.stats[trait], trait_sets)
            exclusivity += overlap_study.pole_exclusivity(neuron_map, run.stats[trait], trait_sets)
        write_table(exclusivity, out, "overlap_exclusivity")
        write_table(points, out, "overlap_exclusivity_neurons", markdown=False)
        figures.save_figure(figures.exclusivity_figure(points, all_methods), out, "overlap_exclusivity", png,
                            plotlyjs)
        summary["exclusivity_mean_over_traits"] = {
            f"{method} {pole}": {key: float(np.nanmean([r[key] for r in exclusivity
                                                        if r["method"] == method and r["pole"] == pole]))
                                 for key in ("n", "frac_own_stronger", "median_other_over_own", "median_abs_d",
                                             "frac_weak_d", "frac_small_s", "mean_distribution_overlap")}
            for method in all_methods for pole in ("high", "low")}
    else:
        skipped = f" (and the {', '.join(extra)} sets)" if extra else ""
        _say(log, f"overlap: no statistics in {run.folder / 'stats'}; skipping the exclusivity part{skipped}")
    write_json_atomic(out / "overlap_summary.json", _jsonable(summary))
    _say(log, f"overlap: wrote pair, per-layer, exclusivity and correlation tables and figures to {out}")
    return summary


def multifunction_study(run: Run, out: str | Path, model: Any, config: MultifunctionConfig | None = None,
                        png: bool = True, plotlyjs: PlotlyJs = "cdn", log: Callable[[str], None] | None = _print,
                        extra_sets: Mapping[str, Sequence[NeuronSet]] | None = None) -> dict:
    """Capability attribution, capability-neuron overlap of each personality set, and ablation/edit costs.

    Args:
        config: data sizes, capability fraction, edit strength and set methods (``MultifunctionConfig``).
        extra_sets: sets that need more than the run folder, keyed by method, e.g.
            ``{"NPTI": npti_sets_for_run(model, run)}``; they get the same overlap rows (per pole and both
            poles together) and costs as ``config.methods``. The edit cost is the DPN-LE edit ``+gamma * s`` on
            every set's neurons (NPTI's own boost/clamp edit is what ``dpn-lens compare`` measures).

    Example:
        >>> config = MultifunctionConfig(data_dir="../shared/data", n_text=4)                  # doctest: +SKIP
        >>> summary = multifunction_study(run, "figures", model, config, extra_sets={"NPTI": npti_sets})  # doctest: +SKIP
        >>> summary["by_method"]["NPTI"]["capability_fraction_pooled"]                           # doctest: +SKIP
    """
    from dpn_lens.studies import multifunction as mf

    config = config or MultifunctionConfig()
    methods, fraction, gamma = config.methods, config.fraction, config.gamma
    out = Path(out)
    extra = _extra_sets(run, methods, extra_sets)
    all_methods = [*methods, *extra]
    out.mkdir(parents=True, exist_ok=True)
    for neuron_map in run.maps.values():
        neuron_map.check_compatible(model)
    data = mf.load_capability_data(model, config.data_dir, config.n_text, config.n_multiple_choice,
                                   config.n_held_out, config.window, config.seed)
    _say(log, f"multifunction: attributing over {len(data.text)} text windows and {len(data.multiple_choice)} questions")
    attribution = mf.capability_attribution(model, data, batch_size=config.batch_size)
    combined = attribution["combined"]
    capability = mf.capability_neurons(combined, fraction)
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() for k, v in attribution.items()}, str(out / "multifunction_attribution.safetensors"))
    pole_level = [s for method in methods for m in run.maps.values() for s in alternative_sets(m, method)]
    pole_level += [s for sets in extra.values() for s in sets]
    # One set per trait and method: both poles together, the neurons a "both"-mode edit touches.
    union_sets = [_both_poles([s for s in pole_level if s.method == method and s.trait == trait], trait, method,
                              neuron_map.d_mlp)
                  for method in all_methods for trait, neuron_map in run.maps.items()
                  if any(s.method == method and s.trait == trait for s in pole_level)]
    overlap_rows = mf.capability_overlap(union_sets + pole_level, capability, combined)
    write_table(overlap_rows, out, "multifunction_capability_overlap")
    figures.save_figure(figures.capability_fraction_figure([r for r in overlap_rows if r["pole"] == "both"], fraction),
                        out, "multifunction_capability_fraction", png, plotlyjs)
    steering = {trait: (m.steering_value, m.stat_layers) for trait, m in run.maps.items()}
    costs = mf.set_costs(model, data.held_out, union_sets, steering, gamma, config.random_control, config.seed,
                         config.batch_size,
                         progress=(lambda name: _say(log, f"multifunction: costs of {name}")))
    write_table(costs, out, "multifunction_costs")
    figures.save_figure(figures.capability_cost_figure(costs), out, "multifunction_costs", png, plotlyjs)
    summary = {"data": data.description, "capability_fraction_per_layer": fraction, "gamma": gamma,
               "baseline_loss": costs[0]["baseline_loss"] if costs else None, "by_method": {}}
    for method in all_methods:
        mine = [r for r in overlap_rows if r["method"] == method and r["pole"] == "both"]
        cost = [r for r in costs if r["method"] == method]
        n_total = sum(r["n"] for r in mine)
        summary["by_method"][method] = {
            "mean_set_size": n_total / len(mine) if mine else 0,
            "capability_fraction_pooled": sum(r["n_capability"] for r in mine) / n_total if n_total else None,
            "chance": fraction, "mean_percentile": float(np.nanmean([r["mean_percentile"] for r in mine])),
            "mean_ablation_cost": float(np.mean([r["ablation_cost"] for r in cost])) if cost else None,
            "mean_edit_cost": float(np.mean([r["edit_cost"] for r in cost])) if cost else None,
            "mean_random_ablation_cost": float(np.mean([r["random_ablation_cost"] for r in cost]))
            if cost and "random_ablation_cost" in cost[0] else None}
    write_json_atomic(out / "multifunction_summary.json", _jsonable(summary))
    _say(log, f"multifunction: wrote attribution, overlap and cost tables and figures to {out}")
    return summary


def residual_study(run: Run, out: str | Path, model: Any, n_pairs: int = 200, layer: int | None = None,
                   batch_size: int = 8, log: Callable[[str], None] | None = _print) -> dict:
    """Per trait of the run: the residual trait direction at CAA's layer split into MLP, attention and
    embedding shares, and the share the map's neurons write (``dpn_lens.studies.residual_share``).

    Writes ``residual_share.csv``/``.md`` (a row per trait), ``residual_share_per_layer.csv`` and
    ``residual_share_summary.json``.
    """
    from dpn_lens.data.contrastive import embedded_contrastive_set
    from dpn_lens.studies.residual_share import residual_share

    out = Path(out)
    rows, per_layer = [], []
    for trait, neuron_map in run.maps.items():
        share = residual_share(model, embedded_contrastive_set(trait, n_pairs=n_pairs, seed=42), neuron_map,
                               layer=layer, batch_size=batch_size)
        rows.append(share.row())
        per_layer += [{"trait": trait, **entry} for entry in share.per_layer]
        selected = ("the map's neurons: n/a (the MLP output is normalised before the residual add)"
                    if share.selected is None else f"the map's {share.selected_neurons} neurons {share.selected:+.3f}")
        _say(log, f"residual: {trait} at layer {share.layer}: MLP {share.mlp:+.3f}, attention {share.attn:+.3f}, "
                  f"embedding {share.embed:+.3f}, remainder {share.remainder:+.3f}; {selected}")
    write_table(rows, out, "residual_share")
    write_table(per_layer, out, "residual_share_per_layer", markdown=False)
    summary = {"n_pairs": n_pairs, "layer": layer, "model": getattr(model, "dpn_model_name", None),
               "by_trait": {row["trait"]: row for row in rows}}
    write_json_atomic(out / "residual_share_summary.json", _jsonable(summary))
    _say(log, f"residual: wrote residual_share.csv/.md, residual_share_per_layer.csv and the summary to {out}")
    return summary
