"""``dpn-lens study selection``: would two runs select the same neurons? Split-half agreement per trait.

For each trait of a run folder (its DPN-LE maps give ``s``, the edit), draw the selection pairs a
``control`` run would draw (``effect.pairs.selection_pairs``: same model, count and seed, so the cache is
shared), compute their per-pair attributions once, and measure how alike disjoint halves of them select
(``effect.reliability``). Writes ``selection_agreement.csv``/``.md`` (a row per trait, rule and half
size), ``selection_agreement_summary.json`` (the rows and settings) and the figure ``selection_agreement`` (top-k Jaccard against pairs per half, one line per trait,
chance as dotted lines; beside it, how often one half's top k keep their sign on the other half). No held-out data is read: the study looks only at the selection split.

Example:
    >>> rows = selection_study(Run.load("runs/demo"), "runs/demo/selection", model, n_pairs=128)   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import plotly.graph_objects as go

import dpn_lens.figures as figures
from dpn_lens.effect.reliability import SplitAgreement, selection_agreement
from dpn_lens.io import write_json_atomic
from dpn_lens.run import Run

__all__ = ["selection_study", "agreement_figure"]


def agreement_figure(rows: Sequence[SplitAgreement]) -> go.Figure:
    """Against pairs per half, a line per trait and rule: left, the top-k Jaccard of two disjoint halves
    (chance dotted); right, the share of one half's top k whose effect has the same sign on the other
    half (0.5 for a selection of noise, dotted).

    Example:
        >>> row = SplitAgreement("openness", "attribution-t", 64, 4, 80, 36000.0, .3, .2, .1, .3, .001, .7, 1.2)
        >>> len(agreement_figure([row]).data)     # Jaccard, its chance, the replicated share
        3
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("top-k overlap of the halves (dotted: chance)",
                                        "top k keeping their sign on the other half"))
    groups: dict[tuple[str, str], list[SplitAgreement]] = {}
    for row in rows:
        groups.setdefault((row.trait, row.rule), []).append(row)
    several_rules = len({rule for _, rule in groups}) > 1
    for (trait, rule), points in groups.items():
        points = sorted(points, key=lambda row: row.pairs_per_half)
        name = f"{trait} ({rule})" if several_rules else trait
        sizes, color = [row.pairs_per_half for row in points], figures.trait_color(trait)
        fig.add_trace(go.Scatter(
            x=sizes, y=[row.jaccard for row in points], mode="lines+markers", name=name, legendgroup=name,
            line={"color": color},
            customdata=[[row.spearman, row.budget, row.splits, row.jaccard_chance, row.jaccard_min, row.jaccard_max]
                        for row in points],
            hovertemplate="%{x} pairs per half: Jaccard %{y:.4f} (%{customdata[4]:.4f} to %{customdata[5]:.4f} over "
                          "%{customdata[2]} splits; chance %{customdata[3]:.4f})<br>Spearman %{customdata[0]:.3f}, "
                          "k %{customdata[1]}<extra>" + name + "</extra>"),
            row=1, col=1)
        fig.add_trace(go.Scatter(x=sizes, y=[row.jaccard_chance for row in points], mode="lines",
                                 line={"color": color, "dash": "dot", "width": 1}, legendgroup=name,
                                 name=f"{name}: chance", showlegend=False, hoverinfo="skip"), row=1, col=1)
        fig.add_trace(go.Scatter(
            x=sizes, y=[row.replicated_sign for row in points], mode="lines+markers", name=name, legendgroup=name,
            line={"color": color}, showlegend=False, customdata=[[row.replicated_score] for row in points],
            hovertemplate="%{x} pairs per half: %{y:.2f} of the top k keep their sign (mean statistic "
                          "%{customdata[0]:.2f})<extra>" + name + "</extra>"), row=1, col=2)
    fig.add_hline(y=0.5, line={"dash": "dot", "color": "grey", "width": 1}, row=1, col=2)
    fig.update_xaxes(type="log", dtick=0.30102999566)   # ticks at powers of two
    fig.update_yaxes(rangemode="tozero", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_yaxes(title_text="Jaccard of the two top-k sets", row=1, col=1)
    fig.update_yaxes(title_text="share of one half's top k (0.5: noise)", row=1, col=2)
    return figures.style(fig, "Would two runs select the same neurons? Disjoint halves of the selection pairs",
                         "selection pairs per half", None, width=1150, height=520)


def selection_study(run: Run, out: str | Path, model: Any, rules: Sequence[str] = ("attribution-t",),
                    n_pairs: int = 128, seed: int = 0, splits: int = 4, png: bool = True,
                    plotlyjs: Literal["cdn", "directory"] = "cdn",
                    log: Callable[[str], None] | None = print) -> list[SplitAgreement]:
    """Split-half agreement of each rule's selection for every trait of ``run`` (module note).

    ``n_pairs`` selection pairs drawn with ``seed`` (as ``dpn-lens control --selection-pairs N --seed S``
    draws them); ``splits`` random splits per half size.
    """
    from dpn_lens.effect.pairs import selection_pairs
    from dpn_lens.effect.rules import per_pair_attribution
    from dpn_lens.studies.outputs import _jsonable, write_table

    if not run.maps:
        raise FileNotFoundError(f"{run.folder} holds no DPN-LE maps; run `dpn-lens locate` first")
    out = Path(out)
    rows: list[SplitAgreement] = []
    for trait, base in run.maps.items():
        pairs = selection_pairs(model, trait, n_pairs=n_pairs, seed=seed, log=log)
        per_pair = per_pair_attribution(model, base, pairs)      # one gradient pass, shared by the rules
        for rule in rules:
            found = selection_agreement(model, base, rule, pairs, splits=splits, seed=seed, per_pair=per_pair)
            rows += found
            if log:
                log(f"selection: {trait} {rule}, k {found[0].budget}: " + "; ".join(
                    f"{row.pairs_per_half} pairs per half: Jaccard {row.jaccard:.2f} (chance {row.jaccard_chance:.3f}), "
                    f"Spearman {row.spearman:.2f}, sign kept {row.replicated_sign:.2f}" for row in found[:3]))
    table = [row.to_dict() for row in rows]
    write_table(table, out, "selection_agreement")
    write_json_atomic(out / "selection_agreement_summary.json", _jsonable(
        {"model": getattr(model, "dpn_model_name", None), "n_pairs": n_pairs, "seed": seed, "splits": splits,
         "rules": list(rules), "rows": table}))
    figures.save_figure(agreement_figure(rows), out, "selection_agreement", png, plotlyjs)
    if log:
        log(f"selection: wrote selection_agreement.csv/.md, selection_agreement_summary.json and the figure selection_agreement to {out}")
    return rows
