"""Plotly figures of the studies, in one consistent look, saved as small HTML and as PNG.

Every figure has a title and labelled axes; neuron-level plots show layer, neuron, d and s on hover.
Each trait has one colour; its high pole is drawn in the full colour, its low pole in a lighter tint.
HTML files load plotly.js from the CDN (``plotlyjs="cdn"``, a few kB each) or from one shared
``plotly.min.js`` written beside them (``plotlyjs="directory"``, for offline viewing).

Example:
    >>> fig = layer_distribution_figure(layer_counts(run.maps))      # doctest: +SKIP
    >>> save_figure(fig, "figures", "layer_distribution")            # doctest: +SKIP
    [PosixPath('figures/layer_distribution.html'), PosixPath('figures/layer_distribution.png')]
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import torch
from plotly.subplots import make_subplots

from dpn_lens.io import write_text_atomic


__all__ = [
    "TRAIT_COLORS", "TEMPLATE", "trait_color", "pole_color", "style", "save_figure", "layer_distribution_figure",
    "d_s_scatter_figure", "overlap_heatmap_figure", "upset_figure", "layer_jaccard_figure",
    "steering_correlation_figure", "exclusivity_figure", "capability_fraction_figure", "capability_cost_figure",
]

TEMPLATE = "plotly_white"
TRAIT_COLORS: dict[str, str] = {"openness": "#1f77b4", "conscientiousness": "#2ca02c", "extraversion": "#ff7f0e",
                                "agreeableness": "#9467bd", "neuroticism": "#d62728"}
METHOD_COLORS: dict[str, str] = {"DPN-LE": "#1f77b4", "top|d|": "#ff7f0e", "|s|-only": "#2ca02c", "q=0.97": "#9467bd",
                                 "NPTI": "#d62728", "random": "#7f7f7f"}
BACKGROUND = "#c7c7c7"
HOVER_NEURON = "layer %{customdata[0]}, neuron %{customdata[1]}<br>d = %{customdata[2]:.3f}<br>s = %{customdata[3]:.4f}"


def _tint(hex_color: str, amount: float = 0.55) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    r, g, b = (round(c + (255 - c) * amount) for c in (r, g, b))
    return f"#{r:02x}{g:02x}{b:02x}"


def trait_color(trait: str) -> str:
    """The trait's colour (unknown names get a stable colour from the same palette)."""
    palette = list(TRAIT_COLORS.values())
    return TRAIT_COLORS.get(trait, palette[sum(map(ord, trait)) % len(palette)])


def pole_color(trait: str, pole: str) -> str:
    """Full trait colour for the high pole, a lighter tint for the low pole."""
    return trait_color(trait) if pole == "high" else _tint(trait_color(trait))


def _label(name: str) -> str:
    return name[:1].upper() + name[1:]


def style(fig: go.Figure, title: str, x_title: str | None = None, y_title: str | None = None,
          height: int | None = None, width: int | None = None) -> go.Figure:
    """Apply the common look: template, title, axis titles, legend, margins."""
    fig.update_layout(template=TEMPLATE, title={"text": title, "x": 0.01, "xanchor": "left"},
                      font={"family": "Arial, sans-serif", "size": 12}, margin={"l": 70, "r": 30, "t": 80, "b": 60},
                      legend={"title": None}, hoverlabel={"font_size": 11})
    if height:
        fig.update_layout(height=height)
    if width:
        fig.update_layout(width=width)
    # In a grid of panels, only the bottom row gets x titles and the left column y titles.
    for axis, text in (("x", x_title), ("y", y_title)):
        if text is None:
            continue
        if _has_grid(fig):
            _set_outer_titles(fig, axis, text)
        elif axis == "x":
            fig.update_xaxes(title_text=text)
        else:
            fig.update_yaxes(title_text=text)
    return fig


def _has_grid(fig: go.Figure) -> bool:
    return fig._grid_ref is not None and (len(fig._grid_ref) > 1 or len(fig._grid_ref[0]) > 1)


def _set_outer_titles(fig: go.Figure, axis: str, text: str) -> None:
    rows, cols = len(fig._grid_ref), len(fig._grid_ref[0])
    if axis == "x":
        for col in range(1, cols + 1):
            fig.update_xaxes(title_text=text, row=rows, col=col)
    else:
        for row in range(1, rows + 1):
            fig.update_yaxes(title_text=text, row=row, col=1)


_PNG_SERVER: list[bool] = []


def _start_png_server() -> None:
    """Keep one headless Chromium for all PNG exports of this process.

    Without it kaleido launches (and tears down) a browser per figure: slow, and under heavy CPU
    load such a launch was seen to hang for minutes. The server is stopped when the process exits.
    """
    if _PNG_SERVER:
        return
    import atexit

    import kaleido

    kaleido.start_sync_server(silence_warnings=True)
    atexit.register(kaleido.stop_sync_server, silence_warnings=True)
    _PNG_SERVER.append(True)


def save_figure(fig: go.Figure, folder: str | Path, name: str, png: bool = True,
                plotlyjs: Literal["cdn", "directory"] = "cdn", scale: float = 1.5) -> list[Path]:
    """Write ``folder/name.html`` (without an embedded plotly bundle), ``folder/name.json`` and ``folder/name.png``.

    The JSON file is the figure itself (``plotly.io.to_json``; read it back with ``plotly.io.read_json``):
    ``dpn-lens report`` draws figures from it rather than from the HTML.
    Returns the paths written: HTML, JSON, then PNG if ``png``.

    Args:
        plotlyjs: ``"cdn"`` loads plotly.js from the CDN (smallest files); ``"directory"`` writes one
            shared ``plotly.min.js`` beside the HTML files (viewable offline).
        png: also write a PNG through kaleido (needs Chrome/Chromium; install with
            ``apt-get install chromium`` or ``plotly_get_chrome``).
    """
    if plotlyjs not in ("cdn", "directory"):
        raise ValueError(f"plotlyjs must be 'cdn' or 'directory' (never a full bundle per file), got {plotlyjs!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    html = folder / f"{name}.html"
    fig.write_html(html, include_plotlyjs=plotlyjs, full_html=True, config={"displaylogo": False})
    paths = [html, write_text_atomic(folder / f"{name}.json", pio.to_json(fig, validate=False))]
    if png:
        target = folder / f"{name}.png"
        try:
            _start_png_server()
            with warnings.catch_warnings():  # plotly passes kaleido options that a running server ignores
                warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                fig.write_image(target, scale=scale)
        except Exception as error:  # kaleido raises plain RuntimeError/ValueError variants
            raise RuntimeError(f"could not write {target} ({error}); PNG export needs Chrome or Chromium: install it "
                               "(`apt-get install chromium` or `plotly_get_chrome`) or pass png=False / --no-png") from error
        paths.append(target)
    return paths


# ----- layer-wise distribution -------------------------------------------------------------------
def layer_distribution_figure(count_rows: Sequence[dict], title: str = "Personality neurons per layer") -> go.Figure:
    """Mirrored bars per layer: high-pole counts up, low-pole counts down, one row per trait.

    ``count_rows`` are ``studies.layers.layer_counts`` rows (trait, pole, layer, n).
    """
    traits = list(dict.fromkeys(r["trait"] for r in count_rows))
    if not traits:
        raise ValueError("no count rows to plot")
    fig = make_subplots(rows=len(traits), cols=1, shared_xaxes=True, vertical_spacing=0.03,
                        subplot_titles=[_label(t) for t in traits])
    for row, trait in enumerate(traits, start=1):
        for pole, sign in (("high", 1), ("low", -1)):
            mine = [r for r in count_rows if r["trait"] == trait and r["pole"] == pole]
            fig.add_trace(go.Bar(
                x=[r["layer"] for r in mine], y=[sign * r["n"] for r in mine], name=f"{_label(trait)} {pole}",
                marker_color=pole_color(trait, pole), legendgroup=trait,
                customdata=[[r["layer"], r["n"], 100 * r["fraction"]] for r in mine],
                hovertemplate=f"{_label(trait)} {pole}<br>layer %{{customdata[0]}}: %{{customdata[1]}} neurons "
                              "(%{customdata[2]:.2f}% of the layer)<extra></extra>"), row=row, col=1)
        fig.add_hline(y=0, line_width=1, line_color="#444", row=row, col=1)
    fig.update_layout(barmode="relative", bargap=0.15)
    style(fig, f"{title} (bars up: high pole, down: low pole)", "layer", "neurons", height=170 * len(traits) + 120,
          width=950)
    return fig


def _thin(mask_keep: torch.Tensor, n_background: int, generator: torch.Generator) -> torch.Tensor:
    rest = torch.nonzero(~mask_keep).flatten()
    if rest.numel() > n_background:
        rest = rest[torch.randperm(rest.numel(), generator=generator)[:n_background]]
    return rest


def d_s_scatter_figure(neuron_map, layers: Sequence[int] | None = None, n_background: int = 100,
                       background_quantile: float = 0.97, columns: int = 5, seed: int = 0) -> go.Figure:
    """Cohen's d against |s| per layer, thresholds drawn, selected neurons highlighted.

    To keep files small, every neuron with ``|s|`` above the layer's ``background_quantile`` is drawn,
    plus a random ``n_background`` of the rest (the unselected bulk near the origin).
    """
    layers = list(neuron_map.layers if layers is None else layers)
    missing = [l for l in layers if l not in neuron_map.layers]
    if missing:
        raise ValueError(f"layers {missing} were not searched for {neuron_map.trait}; choose among {neuron_map.layers}")
    rows = math.ceil(len(layers) / columns)
    cols = min(columns, len(layers))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {l}" for l in layers],
                        horizontal_spacing=0.04, vertical_spacing=0.5 / max(rows, 1) if rows > 1 else 0.1)
    generator = torch.Generator().manual_seed(seed)
    trait, tau_d = neuron_map.trait, neuron_map.settings.tau_d
    for k, layer in enumerate(layers):
        r, c = k // cols + 1, k % cols + 1
        row_index = neuron_map.stat_layers.index(layer)
        s, d = neuron_map.steering_value[row_index], neuron_map.effect_size[row_index]
        high, low = neuron_map.high[layer], neuron_map.low[layer]
        selected = torch.zeros_like(s, dtype=torch.bool)
        selected[high], selected[low] = True, True
        near = s.abs() > torch.quantile(s.abs().double(), background_quantile).to(s.dtype)
        shown_other = torch.cat([torch.nonzero(near & ~selected).flatten(), _thin(near | selected, n_background, generator)])
        for indices, name, color, size in ((shown_other, "not selected", BACKGROUND, 4),
                                           (high, f"{_label(trait)} high", pole_color(trait, "high"), 7),
                                           (low, f"{_label(trait)} low", pole_color(trait, "low"), 7)):
            # numpy arrays are stored base64-encoded in the HTML: several times smaller than lists.
            fig.add_trace(go.Scatter(
                x=s[indices].abs().numpy().astype(np.float32), y=d[indices].numpy().astype(np.float32),
                mode="markers", name=name, legendgroup=name,
                showlegend=k == 0, marker={"color": color, "size": size, "line": {"width": 0.5, "color": "#333"}
                                           if size > 4 else {"width": 0}},
                # d is the y value; customdata carries layer, neuron and the signed s.
                customdata=np.column_stack([np.full(indices.numel(), layer), indices.numpy(),
                                            s[indices].numpy()]).astype(np.float32),
                hovertemplate="layer %{customdata[0]}, neuron %{customdata[1]}<br>d = %{y:.3f}<br>"
                              f"s = %{{customdata[2]:.4f}}<extra>{name}</extra>"), row=r, col=c)
        tau_q = neuron_map.tau_q[layer]
        fig.add_vline(x=tau_q, line_dash="dash", line_color="#555", line_width=1, row=r, col=c)
        for y in (tau_d, -tau_d):
            fig.add_hline(y=y, line_dash="dot", line_color="#555", line_width=1, row=r, col=c)
    style(fig, f"{_label(trait)}: Cohen's d vs |s| per layer (dashed: tau_q, dotted: ±tau_d = ±{tau_d:g}; "
               f"q = {neuron_map.settings.q:g})", "|s| (steering value)", "Cohen's d",
          height=260 * rows + 140, width=240 * cols + 160)
    return fig


# ----- overlap --------------------------------------------------------------------------------------
def overlap_heatmap_figure(matrix: np.ndarray, labels: Sequence[str], title: str, value_name: str = "Jaccard",
                           text_format: str = ".2f", pvalues: np.ndarray | None = None, zmax: float | None = None
                           ) -> go.Figure:
    """Annotated heatmap of a symmetric set-overlap matrix (e.g. Jaccard of the ten pole sets).

    With ``pvalues``, cells significant at 0.05 get a ``*`` and hover shows the p-value.
    """
    matrix = np.asarray(matrix, dtype=float)
    text = [[("" if np.isnan(v) else format(v, text_format)) for v in row] for row in matrix]
    if pvalues is not None:
        text = [[t + ("*" if (not np.isnan(p) and p < 0.05) else "") for t, p in zip(trow, prow)]
                for trow, prow in zip(text, pvalues)]
    custom = pvalues if pvalues is not None else np.full_like(matrix, np.nan)
    off_diagonal = matrix[~np.eye(len(matrix), dtype=bool)] if len(matrix) > 1 else matrix.flatten()
    top = zmax if zmax is not None else (float(np.nanmax(off_diagonal)) if np.isfinite(off_diagonal).any() else 1.0)
    fig = go.Figure(go.Heatmap(
        z=matrix, x=list(labels), y=list(labels), text=text, texttemplate="%{text}", textfont={"size": 10},
        colorscale="Blues", zmin=0, zmax=max(top, 1e-9), colorbar={"title": value_name}, customdata=custom,
        hovertemplate="%{y} vs %{x}<br>" + value_name + " = %{z:.4f}<br>p = %{customdata:.3g}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    note = " (* layer-matched p < 0.05; diagonal = 1)" if pvalues is not None else ""
    style(fig, title + note, "pole set", "pole set", height=620, width=760)
    return fig


def upset_figure(sets: Sequence, max_intersections: int = 25, title: str = "Intersections of the pole sets"
                 ) -> go.Figure:
    """UpSet-style plot: bars = neurons in exactly that combination of sets, dots below = the combination.

    ``sets`` are ``studies.sets.NeuronSet`` objects (names label the rows).
    """
    names = [s.name for s in sets]
    membership: dict[tuple[int, int], list[int]] = {}
    for index, neuron_set in enumerate(sets):
        for pair in neuron_set.pairs():
            membership.setdefault(pair, []).append(index)
    combos = Counter(tuple(v) for v in membership.values())
    ranked = sorted(combos.items(), key=lambda item: (-item[1], len(item[0]), item[0]))[:max_intersections]
    # Show multi-set intersections even when single-set counts crowd them out of the top.
    shared = [item for item in sorted(combos.items(), key=lambda item: -item[1]) if len(item[0]) > 1]
    for item in shared:
        if item not in ranked and len(ranked) < max_intersections + 10:
            ranked.append(item)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.55, 0.45], vertical_spacing=0.02)
    x = list(range(len(ranked)))
    labels = [" & ".join(names[i] for i in combo) for combo, _ in ranked]
    fig.add_trace(go.Bar(x=x, y=[count for _, count in ranked], marker_color=["#444" if len(c) == 1 else "#d62728"
                                                                                for c, _ in ranked],
                         customdata=labels, hovertemplate="%{customdata}<br>%{y} neurons<extra></extra>",
                         showlegend=False, text=[count for _, count in ranked], textposition="outside"), row=1, col=1)
    for column, (combo, _) in enumerate(ranked):
        fig.add_trace(go.Scatter(x=[column] * len(names), y=list(range(len(names))), mode="markers",
                                 marker={"color": ["#222" if i in combo else "#e0e0e0" for i in range(len(names))],
                                         "size": 9}, hoverinfo="skip", showlegend=False), row=2, col=1)
        if len(combo) > 1:
            fig.add_trace(go.Scatter(x=[column, column], y=[min(combo), max(combo)], mode="lines",
                                     line={"color": "#222", "width": 2}, hoverinfo="skip", showlegend=False), row=2, col=1)
    fig.update_yaxes(tickvals=list(range(len(names))), ticktext=names, autorange="reversed", row=2, col=1)
    fig.update_xaxes(showticklabels=False, row=2, col=1)
    fig.update_yaxes(title_text="neurons in exactly this combination", row=1, col=1)
    fig.update_xaxes(title_text="set combination (red: shared by several sets)", row=2, col=1)
    style(fig, title, height=640, width=max(700, 30 * len(ranked) + 300))
    return fig


def layer_jaccard_figure(per_layer_rows: Sequence[dict], top: int = 10,
                         title: str = "Per-layer Jaccard of the most overlapping pole-set pairs") -> go.Figure:
    """Jaccard per layer for the ``top`` pairs of largest total overlap (``overlap.per_layer_overlap`` rows)."""
    totals: Counter = Counter()
    for r in per_layer_rows:
        totals[(r["set_a"], r["set_b"])] += r["overlap"]
    pairs = [pair for pair, total in totals.most_common(top) if total > 0]
    fig = go.Figure()
    for a, b in pairs:
        mine = sorted((r for r in per_layer_rows if r["set_a"] == a and r["set_b"] == b), key=lambda r: r["layer"])
        fig.add_trace(go.Scatter(
            x=[r["layer"] for r in mine], y=[0.0 if math.isnan(r["jaccard"]) else r["jaccard"] for r in mine],
            mode="lines+markers", name=f"{a} & {b}",
            customdata=[[r["overlap"], r["size_a"], r["size_b"], r["p_value"]] for r in mine],
            hovertemplate=f"{a} & {b}<br>layer %{{x}}: Jaccard %{{y:.3f}}<br>overlap %{{customdata[0]}} of "
                          "%{customdata[1]} and %{customdata[2]}<br>p = %{customdata[3]:.3g}<extra></extra>"))
    if not pairs:
        fig.add_annotation(text="no two pole sets share a neuron in any layer", showarrow=False, x=0.5, y=0.5,
                           xref="paper", yref="paper")
    style(fig, title, "layer", "Jaccard index", height=480, width=900)
    return fig


def steering_correlation_figure(rows: Sequence[dict],
                                title: str = "Correlation of steering vectors s between traits, per layer") -> go.Figure:
    """Pearson r of two traits' s vectors per layer, one line per trait pair (``overlap.steering_correlations``)."""
    fig = go.Figure()
    pairs = list(dict.fromkeys((r["trait_a"], r["trait_b"]) for r in rows))
    for a, b in pairs:
        mine = [r for r in rows if (r["trait_a"], r["trait_b"]) == (a, b)]
        fig.add_trace(go.Scatter(x=[r["layer"] for r in mine], y=[r["r"] for r in mine], mode="lines+markers",
                                 name=f"{_label(a)} & {_label(b)}", line={"color": trait_color(a)},
                                 marker={"color": trait_color(b), "size": 6},
                                 hovertemplate=f"{_label(a)} & {_label(b)}<br>layer %{{x}}: r = %{{y:.3f}}<extra></extra>"))
    fig.add_hline(y=0, line_width=1, line_color="#444")
    style(fig, title, "layer", "Pearson r of s", height=480, width=900)
    return fig


def exclusivity_figure(points: Sequence[dict], methods: Sequence[str] | None = None,
                       title: str = "Mean activation of each pole's neurons under high vs low prompts") -> go.Figure:
    """Per trait (rows) and selection method (columns): each neuron's mean activation under
    high-trait prompts (x) against under low-trait prompts (y); the diagonal is "no preference".

    ``points`` are ``overlap.exclusivity_points`` rows.
    """
    traits = list(dict.fromkeys(p["trait"] for p in points))
    methods = list(methods or dict.fromkeys(p["method"] for p in points))
    fig = make_subplots(rows=len(traits), cols=len(methods), horizontal_spacing=0.05, vertical_spacing=0.06,
                        subplot_titles=[f"{_label(t)}: {m}" for t in traits for m in methods])
    for r, trait in enumerate(traits, start=1):
        for c, method in enumerate(methods, start=1):
            mine = [p for p in points if p["trait"] == trait and p["method"] == method]
            for pole in ("high", "low"):
                pts = [p for p in mine if p["pole"] == pole]
                fig.add_trace(go.Scatter(
                    x=np.array([p["mean_high"] for p in pts], np.float32),
                    y=np.array([p["mean_low"] for p in pts], np.float32), mode="markers",
                    name=f"{pole}-pole neurons", legendgroup=pole, showlegend=r == 1 and c == 1,
                    marker={"color": pole_color(trait, pole), "size": 5,
                            "symbol": "circle" if pole == "high" else "diamond"},
                    customdata=np.array([[p["layer"], p["neuron"], p["d"], p["s"]] for p in pts], np.float32
                                        ).reshape(-1, 4),
                    hovertemplate=HOVER_NEURON + "<br>mean | high prompts = %{x:.3f}<br>mean | low prompts = %{y:.3f}"
                                  f"<extra>{_label(trait)} {pole} [{method}]</extra>"), row=r, col=c)
            values = [v for p in mine for v in (p["mean_high"], p["mean_low"])]
            if values:
                lo, hi = min(values), max(values)
                fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"color": "#888", "dash": "dot",
                                                                                      "width": 1},
                                         hoverinfo="skip", showlegend=False), row=r, col=c)
    style(fig, title + " (dotted: equal activation)", "mean activation | high-trait prompts",
          "mean act. | low prompts", height=230 * len(traits) + 140, width=300 * len(methods) + 160)
    return fig


# ----- multifunctionality -------------------------------------------------------------------------
def _trait_method_bars(fig: go.Figure, rows: Sequence[dict], value: str, row: int, col: int, show_legend: bool,
                       hover: str) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        fig.add_trace(go.Bar(x=[_label(r["trait"]) for r in mine], y=[r[value] for r in mine], name=method,
                             legendgroup=method, showlegend=show_legend, offsetgroup=method,
                             marker_color=METHOD_COLORS.get(method, "#17becf"),
                             customdata=[[r["n"], r.get("p_value", float("nan")), r.get("chance", float("nan"))]
                                         for r in mine],
                             hovertemplate=f"{method}<br>%{{x}}: {hover}<br>set size %{{customdata[0]}}<extra></extra>"),
                      row=row, col=col)


def capability_fraction_figure(rows: Sequence[dict], fraction: float,
                               title: str = "Personality neurons that are also capability neurons") -> go.Figure:
    """Grouped bars: per trait and selection method, the fraction of the set (both poles) that are
    capability neurons; the dashed line is chance (the per-layer capability fraction)."""
    fig = make_subplots(rows=1, cols=1)
    _trait_method_bars(fig, rows, "fraction", 1, 1, True,
                       "%{y:.3f} are capability neurons (chance %{customdata[2]:.3f}, p = %{customdata[1]:.3g})")
    fig.add_hline(y=fraction, line_dash="dash", line_color="#444",
                  annotation_text=f"chance ({fraction:.0%} of each layer)", annotation_position="top left")
    fig.update_layout(barmode="group")
    style(fig, title, "trait", "fraction of set that are capability neurons", height=480, width=900)
    return fig


def capability_cost_figure(rows: Sequence[dict],
                           title: str = "Capability cost: held-out WikiText-2 loss increase") -> go.Figure:
    """Two panels of grouped bars (ablation, DPN-LE edit): loss increase per trait and set; black
    markers show a layer-matched random ablation of the same size."""
    gamma = rows[0]["gamma"] if rows else 0.8
    fig = make_subplots(rows=1, cols=2, subplot_titles=["ablation (neurons zeroed)",
                                                        f"edit (+gamma*s, gamma = {gamma:g})"])
    _trait_method_bars(fig, rows, "ablation_cost", 1, 1, True, "loss +%{y:.4f}")
    _trait_method_bars(fig, rows, "edit_cost", 1, 2, False, "loss +%{y:.4f}")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if rows and "random_ablation_cost" in rows[0]:
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            fig.add_trace(go.Scatter(x=[_label(r["trait"]) for r in mine], y=[r["random_ablation_cost"] for r in mine],
                                     mode="markers", marker={"symbol": "line-ew-open", "size": 14, "color": "#000",
                                                             "line": {"width": 2}},
                                     name="random ablation, same size", legendgroup="random",
                                     showlegend=method == methods[0], offsetgroup=method,
                                     hovertemplate=f"random set sized like {method}<br>%{{x}}: loss +%{{y:.4f}}"
                                                   "<extra></extra>"), row=1, col=1)
    fig.update_layout(barmode="group", scattermode="group")
    style(fig, title, "trait", "loss increase (nats/token)", height=480, width=1150)
    return fig
