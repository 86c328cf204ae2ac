"""Tables and figures of a trait-control run (``dpn_lens.evaluation.control.run_control``).

``write_control_outputs`` writes ``control.json`` (everything), one CSV per table, ``control.md`` (the
tables a write-up quotes) and the trade-off figures: preference shift against KL and against
perplexity, one panel per trait and direction, one curve per method (HTML, and PNG with Chromium).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from dpn_lens.io import markdown_table, write_csv_atomic, write_json_atomic, write_text_atomic

__all__ = ["write_control_outputs", "format_interval", "tradeoff_figure", "cost_figure"]

PALETTE = ["#1f77b4", "#17becf", "#2ca02c", "#9467bd", "#d62728", "#ff7f0e", "#8c564b", "#7f7f7f"]
"""One colour per method, in the order of ``control.SWEEP_METHODS`` plus the random-neuron control."""


def format_interval(value: float, low: float, high: float, digits: int = 3) -> str:
    """``+0.123 [+0.045, +0.201]``, with a ``*`` when the interval excludes 0.

    Example:
        >>> format_interval(0.1234, 0.05, 0.2)
        '+0.123 [+0.050, +0.200] *'
    """
    if any(map(math.isnan, (value, low, high))):
        return "n/a" if math.isnan(value) else f"{value:+.{digits}f}"
    star = " *" if low > 0 or high < 0 else ""
    return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{star}"


def _validation_table(rows: Sequence[dict[str, Any]]) -> str:
    table = [{"trait": r["trait"], "pairs": f"{r['n_pairs']}/{r['n_drawn']}",
              "persona effect (high-low)/2": format_interval(r["persona_effect"], r["persona_ci_low"], r["persona_ci_high"]),
              "valid": "yes" if r["valid"] else "NO",
              "high persona - none": format_interval(r["high_vs_none"], r["high_vs_none_ci_low"], r["high_vs_none_ci_high"]),
              "none - low persona": format_interval(r["low_vs_none"], r["low_vs_none_ci_low"], r["low_vs_none_ci_high"])}
             for r in rows]
    return markdown_table(table)


def _calibrated_table(rows: Sequence[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        if "shift" not in r:  # the curve never reached the target KL: no gamma, nothing measured there
            table.append({"trait": r["trait"], "direction": r["direction"],
                          "gamma": f"KL {r['target_kl']:g} not reached", "neurons": "n/a", "KL": "n/a", "shift": "n/a",
                          "persona effect recovered": "n/a", "random neurons": "n/a", "DPN-LE - random": "n/a"})
            continue
        recovered = (format_interval(r["recovered"], r["recovered_ci_low"], r["recovered_ci_high"], 2)
                     if "recovered" in r else "n/a")
        table.append({"trait": r["trait"], "direction": r["direction"],
                      "gamma": f"{r['gamma']:.3g}{'' if r['reached_target'] else ' (target not reached)'}",
                      "neurons": r["n_edited"], "KL": f"{r['kl']:.4f}",
                      "shift": format_interval(r["shift"], r["ci_low"], r["ci_high"]),
                      "persona effect recovered": recovered,
                      # without the random-neuron control (--no-random-control) there is nothing to compare with
                      "random neurons": (format_interval(r["random_shift"], r["random_ci_low"], r["random_ci_high"])
                                         if "random_shift" in r else "not run"),
                      "DPN-LE - random": (format_interval(r["vs_random"], r["vs_random_ci_low"], r["vs_random_ci_high"])
                                          if "vs_random" in r else "not run")})
    return markdown_table(table)


def _matched_tables(result: dict[str, Any]) -> list[str]:
    targets = result["meta"]["config"]["kl_levels"]
    summary = [{"method": r["method"],
                **{f"KL {t:g}: mean shift": (f"{r[f'mean_shift@kl{t:g}']:+.3f}"
                                             if not math.isnan(r[f"mean_shift@kl{t:g}"]) else "n/a") for t in targets},
                **{f"KL {t:g}: reached / CI>0": f"{r[f'reached@kl{t:g}']} / {r[f'ci>0@kl{t:g}']}" for t in targets}}
               for r in result["matched_summary"]]
    detail = [{"trait": r["trait"], "direction": r["direction"], "method": r["method"],
               **{f"KL {t:g}": (format_interval(r[f"shift@kl{t:g}"], r[f"ci_low@kl{t:g}"], r[f"ci_high@kl{t:g}"])
                                + ("" if math.isnan(r[f"gamma@kl{t:g}"]) else f" (gamma {r[f'gamma@kl{t:g}']:.3g})"))
                  for t in targets}} for r in result["matched_cost"]]
    return [markdown_table(summary), markdown_table(detail)]


def _best_by_target(result: dict[str, Any]) -> list[str]:
    lines = []
    for target in result["meta"]["config"]["kl_levels"]:
        key = f"mean_shift@kl{target:g}"
        ranked = sorted((r for r in result["matched_summary"] if not math.isnan(r[key])), key=lambda r: -r[key])
        if ranked:
            lines.append(f"- at KL {target:g}: " + ", ".join(f"{r['method']} {r[key]:+.3f}" for r in ranked))
    return lines


DIRECTIONS = ("increase", "decrease")


def _panels(rows: Sequence[dict[str, Any]], add: Callable[[Any, list[dict[str, Any]], str, int, int, int], None],
            log_y: bool = False) -> Any:
    """A traits x directions grid of panels (log x, and log y when ``log_y``); ``add(figure, points, method,
    index, row, col)`` draws one method's points (sorted by gamma) in one panel. The figure is sized to the
    number of traits."""
    from plotly.subplots import make_subplots

    traits = list(dict.fromkeys(r["trait"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    if not traits:  # nothing was measured (e.g. no curve reached a KL level): say so instead of failing
        import plotly.graph_objects as go

        return go.Figure().add_annotation(text="no measured points", showarrow=False, x=0.5, y=0.5,
                                          xref="paper", yref="paper")
    figure = make_subplots(rows=len(traits), cols=2, vertical_spacing=0.06 if len(traits) > 1 else 0.1,
                           subplot_titles=[f"{t} {d}" for t in traits for d in DIRECTIONS])
    for row, trait in enumerate(traits, 1):
        for col, direction in enumerate(DIRECTIONS, 1):
            for index, method in enumerate(methods):
                points = sorted((r for r in rows if r["trait"] == trait and r["direction"] == direction
                                 and r["method"] == method), key=lambda r: r["gamma"])
                if points:
                    add(figure, points, method, index, row, col)
            figure.update_xaxes(type="log", row=row, col=col)
            if log_y:
                figure.update_yaxes(type="log", row=row, col=col)
    figure.update_layout(height=260 * len(traits) + 120, width=1000)
    return figure


def tradeoff_figure(curves: Sequence[dict[str, Any]], x: str = "kl", title: str | None = None) -> Any:
    """Shift against ``x`` (``"kl"`` or ``"ppl"``): rows = traits, columns = directions, a curve per method."""
    import plotly.graph_objects as go

    from dpn_lens.figures import style

    zero_lines: set[tuple[int, int]] = set()

    def add(figure: Any, points: list[dict[str, Any]], method: str, index: int, row: int, col: int) -> None:
        figure.add_trace(go.Scatter(
            x=[max(p[x], 1e-4) for p in points], y=[p["shift"] for p in points], mode="lines+markers",
            name=method, legendgroup=method, showlegend=row == 1 and col == 1,
            line={"color": PALETTE[index % len(PALETTE)], "dash": "dot" if method == "random-neurons" else "solid"},
            error_y={"type": "data", "symmetric": False, "array": [p["ci_high"] - p["shift"] for p in points],
                     "arrayminus": [p["shift"] - p["ci_low"] for p in points], "thickness": 1},
            text=[f"gamma {p['gamma']:g}" for p in points]), row=row, col=col)
        if (row, col) not in zero_lines:  # one zero line per panel
            zero_lines.add((row, col))
            figure.add_hline(y=0, line={"color": "#999", "width": 1}, row=row, col=col)

    figure = _panels(curves, add)
    label = "KL(unsteered || steered), nats/token" if x == "kl" else "perplexity of the probe text"
    style(figure, title or f"Preference shift (as asked) vs {label}", label, "shift, nats/token")
    return figure


def cost_figure(costs: Sequence[dict[str, Any]]) -> Any:
    """KL against gamma (log-log), one panel per trait and direction, a curve per method: where capability falls."""
    import plotly.graph_objects as go

    from dpn_lens.figures import style

    def add(figure: Any, points: list[dict[str, Any]], method: str, index: int, row: int, col: int) -> None:
        figure.add_trace(go.Scatter(x=[p["gamma"] for p in points], y=[max(p["kl"], 1e-5) for p in points],
                                    mode="lines+markers", name=method, legendgroup=method,
                                    showlegend=row == 1 and col == 1,
                                    line={"color": PALETTE[index % len(PALETTE)]}), row=row, col=col)

    figure = _panels(costs, add, log_y=True)
    style(figure, "Cost of each edit: KL(unsteered || steered) on the probe text vs gamma", "gamma", "KL, nats/token")
    return figure


def write_control_outputs(result: dict[str, Any], out: str | Path, png: bool = True) -> list[Path]:
    """Write every table and figure of ``result`` into ``out``; returns the written paths."""
    from dpn_lens.figures import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json_atomic(out / "control.json", result)]
    for name in ("validation", "calibrated", "gamma_zero", "costs", "curves", "matched_cost", "matched_summary"):
        if result.get(name):
            written.append(write_csv_atomic(out / f"{name}.csv", result[name]))
    meta = result["meta"]
    config = meta["config"]
    zero = result.get("gamma_zero", [])
    lines = [f"# Trait control on {meta['model']} ({meta['dtype']})", "",
             f"{len(config['traits'])} traits; up to {config['pairs']} preference pairs per trait (the model's own answers "
             f"under held-out PersonalityBench personas, at most {config['max_new_tokens']} tokens); gammas "
             f"{', '.join(f'{g:g}' for g in config['gammas'])} for KL and perplexity ({meta['probe_tokens']} probe tokens); "
             f"the shift is measured where each curve reaches KL {', '.join(f'{t:g}' for t in config['kl_levels'])}. "
             f"Run time {meta['seconds']:.0f} s.", "",
             "Shifts are mean per-token log p(high answer) - log p(low answer), in nats/token, signed by the direction "
             "(positive = moved as asked), with 95% percentile-bootstrap intervals over pairs; `*` = interval excludes 0.", "",
             "## Positive control (the metric's validation)", "",
             "Persona effect per pair = (margin under a high persona - margin under a low persona) / 2, with "
             "descriptions the pairs were not generated with. The metric can judge a trait only if this is > 0.", "",
             _validation_table(result["validation"]), "",
             "## DPN-LE at the calibrated gamma", "",
             f"gamma read off DPN-LE's KL curve at KL {config['target_kl']:g}, then measured there; the random-neuron "
             "control puts the same deltas (same gamma) on random neurons of the same layers; `DPN-LE - random` is "
             "their paired difference.", "",
             _calibrated_table(result["calibrated"]), ""]
    skipped = meta.get("skipped", {})
    if skipped:
        lines += ["Not steered (validated above, nothing to edit): "
                  + "; ".join(f"{trait}: {reason}" for trait, reason in skipped.items()) + ".", ""]
    if zero:
        lines += ["Gamma 0 (the DPN-LE edit scaled to 0 through the same hooks): "
                  + ", ".join(f"{r['trait']} {r['shift']:+.2g}" for r in zero) + ". KL noise floor (gamma 0.001, "
                  "rounding alone): " + ", ".join(f"{r['trait']} {r['kl_floor']:.4f}" for r in zero if "kl_floor" in r), ""]
    summary, detail = _matched_tables(result)
    lines += ["## Matched cost: shift at a given KL", "",
              "Each method's shift measured at the gamma where its KL curve reaches the level (n/a: never reached on "
              "the grid). `reached / CI>0`: trait-directions where the curve reached that KL / where the interval lies "
              "above 0. The random-neuron rows are measured at DPN-LE's gammas (their own KL is in the points table).",
              "", summary, "", "Best first:", "", *_best_by_target(result), "",
              "### Per trait and direction", "", detail, "",
              "## Dose-response points", "",
              markdown_table([{k: r[k] for k in ("trait", "direction", "method", "kl_level", "gamma", "n_edited", "kl", "ppl",
                                                 "shift", "ci_low", "ci_high", "p")} for r in result["curves"]], digits=4), ""]
    written.append(write_text_atomic(out / "control.md", "\n".join(lines)))
    figures = {"tradeoff_kl": tradeoff_figure(result["curves"], "kl"), "tradeoff_ppl": tradeoff_figure(result["curves"], "ppl"),
               "cost_by_gamma": cost_figure(result["costs"])}
    for name, figure in figures.items():
        try:
            written += save_figure(figure, out, name, png=png)
        except RuntimeError as error:  # no Chromium: the HTML is written before the PNG fails
            print(f"PNG of {name} skipped: {error}")
            written.append(out / f"{name}.html")
    return written
