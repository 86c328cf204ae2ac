"""Tables and figures of a trait-control run (``dpn_lens.evaluation.control.run_control``).

``write_control_outputs`` writes ``control.json`` (everything), one CSV per table, ``control.md`` (the
tables a write-up quotes) and the figures: preference shift against KL and against perplexity, one
panel per trait and direction, one curve per method; KL against gamma; and, with a budget sweep, the
shift at the target KL against the number of edited neurons, one line per selection rule
(``sparsity_figure``; HTML, and PNG with Chromium).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from dpn_lens.io import markdown_table, write_csv_atomic, write_text_atomic
from dpn_lens.evaluation.control_record import CONTROL_FILE, ControlRecord, GoalRow, MatchedCostRow, MatchedSummaryRow
from dpn_lens.evaluation.control_rows import CalibratedRow, CostPoint, DosePoint, GenerationRow, SweepRow, ValidationRow
from dpn_lens.evaluation.stage_times import StageRow
from dpn_lens.evaluation.table import RESULT_TABLE, control_rows, write_result_table
from dpn_lens.report.results import write_results_report

__all__ = ["write_control_outputs", "format_interval", "tradeoff_figure", "cost_figure", "sparsity_figure",
           "sparsity_rows"]

PALETTE = ["#1f77b4", "#17becf", "#2ca02c", "#9467bd", "#d62728", "#ff7f0e", "#8c564b", "#7f7f7f", "#bcbd22",
           "#e377c2", "#393b79", "#637939"]
"""One colour per curve, in the order the curves first appear."""


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


def _validation_table(rows: Sequence[ValidationRow]) -> str:
    table = [{"trait": r.trait, "pairs": f"{r.n_pairs}/{r.n_drawn}",
              "persona effect (high-low)/2": format_interval(r.persona_effect, r.persona_ci_low, r.persona_ci_high),
              "valid": "yes" if r.valid else "NO",
              "high persona - none": format_interval(r.high_vs_none, r.high_vs_none_ci_low, r.high_vs_none_ci_high),
              "none - low persona": format_interval(r.low_vs_none, r.low_vs_none_ci_low, r.low_vs_none_ci_high)}
             for r in rows]
    return markdown_table(table)


def _calibrated_table(rows: Sequence[CalibratedRow]) -> str:
    table = []
    for row in rows:
        # a run from before the other selection rules calibrated DPN-LE alone and named no method
        label = {"rule": row.method or "dpn-le", "trait": row.trait, "direction": row.direction}
        if row.measured is None:  # the curve never reached the target KL: no gamma, nothing measured there
            table.append({**label, "gamma": f"KL {row.target_kl:g} not reached", "neurons": "n/a", "KL": "n/a",
                          "shift": "n/a", "persona effect recovered": "n/a", "random neurons": "n/a",
                          "rule - random": "n/a"})
            continue
        measured, effect, random = row.measured, row.measured.effect, row.random
        recovered = (format_interval(effect.recovered, effect.recovered_ci_low, effect.recovered_ci_high, 2)
                     if effect.recovered is not None else "n/a")
        table.append({**label, "gamma": f"{measured.gamma:.3g}", "neurons": measured.n_edited,
                      "KL": f"{measured.kl:.4f}", "shift": format_interval(effect.shift, effect.ci_low, effect.ci_high),
                      "persona effect recovered": recovered,
                      # without the random-neuron control (--no-random-control) there is nothing to compare with
                      "random neurons": (format_interval(random.random_shift, random.random_ci_low,
                                                         random.random_ci_high) if random is not None else "not run"),
                      "rule - random": (format_interval(random.vs_random, random.vs_random_ci_low,
                                                        random.vs_random_ci_high) if random is not None else "not run")})
    return markdown_table(table)


def _shift_text(value: float) -> str:
    return f"{value:+.3f}" if not math.isnan(value) else "n/a"


def _matched_tables(summary_rows: Sequence[MatchedSummaryRow], matched: Sequence[MatchedCostRow],
                    levels: Sequence[float]) -> list[str]:
    summary = [{"method": r.method,
                **{f"KL {t:g}: mean shift": _shift_text(r.levels[t].mean_shift) for t in levels},
                **{f"KL {t:g}: reached / CI>0": f"{r.levels[t].reached} / {r.levels[t].ci_positive}" for t in levels}}
               for r in summary_rows]
    detail = [{"trait": r.trait, "direction": r.direction, "method": r.method,
               **{f"KL {t:g}": (format_interval(r.at(t).shift, r.at(t).ci_low, r.at(t).ci_high)
                                + ("" if math.isnan(r.at(t).gamma) else f" (gamma {r.at(t).gamma:.3g})"))
                  for t in levels}} for r in matched]
    return [markdown_table(summary), markdown_table(detail)]


def _best_by_target(summary_rows: Sequence[MatchedSummaryRow], levels: Sequence[float]) -> list[str]:
    lines = []
    for target in levels:
        ranked = sorted((r for r in summary_rows if not math.isnan(r.levels[target].mean_shift)),
                        key=lambda r: -r.levels[target].mean_shift)
        if ranked:
            lines.append(f"- at KL {target:g}: " + ", ".join(f"{r.method} {r.levels[target].mean_shift:+.3f}"
                                                             for r in ranked))
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


def tradeoff_figure(curves: Sequence[DosePoint], x: str = "kl", title: str | None = None) -> Any:
    """Shift against ``x`` (``"kl"`` or ``"ppl"``): rows = traits, columns = directions, a curve per method."""
    import plotly.graph_objects as go

    from dpn_lens.figures import style

    zero_lines: set[tuple[int, int]] = set()

    def add(figure: Any, points: list[dict[str, Any]], method: str, index: int, row: int, col: int) -> None:
        figure.add_trace(go.Scatter(
            x=[max(p[x], 1e-4) for p in points], y=[p["shift"] for p in points], mode="lines+markers",
            name=method, legendgroup=method, showlegend=row == 1 and col == 1,
            line={"color": PALETTE[index % len(PALETTE)], "dash": "dot" if method.startswith("random-neurons") else "solid"},
            error_y={"type": "data", "symmetric": False, "array": [p["ci_high"] - p["shift"] for p in points],
                     "arrayminus": [p["shift"] - p["ci_low"] for p in points], "thickness": 1},
            text=[f"gamma {p['gamma']:g}" for p in points]), row=row, col=col)
        if (row, col) not in zero_lines:  # one zero line per panel
            zero_lines.add((row, col))
            figure.add_hline(y=0, line={"color": "#999", "width": 1}, row=row, col=col)

    figure = _panels([point.to_dict() for point in curves], add)   # plotted from the file's flat columns
    label = "KL(unsteered || steered), nats/token" if x == "kl" else "perplexity of the probe text"
    style(figure, title or f"Preference shift (as asked) vs {label}", label, "shift, nats/token")
    return figure


def cost_figure(costs: Sequence[CostPoint]) -> Any:
    """KL against gamma (log-log), one panel per trait and direction, a curve per method: where capability falls."""
    import plotly.graph_objects as go

    from dpn_lens.figures import style

    def add(figure: Any, points: list[dict[str, Any]], method: str, index: int, row: int, col: int) -> None:
        figure.add_trace(go.Scatter(x=[p["gamma"] for p in points], y=[max(p["kl"], 1e-5) for p in points],
                                    mode="lines+markers", name=method, legendgroup=method,
                                    showlegend=row == 1 and col == 1,
                                    line={"color": PALETTE[index % len(PALETTE)]}), row=row, col=col)

    figure = _panels([point.to_dict() for point in costs], add, log_y=True)
    style(figure, "Cost of each edit: KL(unsteered || steered) on the probe text vs gamma", "gamma", "KL, nats/token")
    return figure


def sparsity_rows(sweep: Sequence[SweepRow]) -> list[dict[str, Any]]:
    """Per rule and budget: the mean shift at the target KL over the trait-directions that reached it,
    how many reached it and moved as asked, and the mean number of neurons edited (a Markdown table's rows).

    Example:
        >>> from dpn_lens.evaluation.control_rows import Effect, MeasuredEdit
        >>> reached = MeasuredEdit(3.0, 8, 0.05, 10.0, Effect(0.02, 0.01, 0.03, 0.01, 64))
        >>> sparsity_rows([SweepRow("o", "increase", "attribution", 8, 8, measured=reached)])[0]["mean shift"]
        0.02
    """
    groups: dict[tuple[str, Any], list[SweepRow]] = {}
    for row in sweep:
        groups.setdefault((row.rule, row.k), []).append(row)
    rows = []
    for (rule, k), points in groups.items():
        reached = [p.measured.effect for p in points if p.measured is not None]
        shifts = [effect.shift for effect in reached]
        rows.append({"rule": rule, "k": k, "mean neurons": (sum(p.n_edited for p in points) / len(points)),
                     "reached": f"{len(reached)}/{len(points)}",
                     "as asked": f"{sum(effect.ci_low > 0 for effect in reached)}/{len(points)}",
                     "mean shift": sum(shifts) / len(shifts) if shifts else math.nan})
    return rows


def _reference_means(record: ControlRecord, level: float) -> dict[str, float]:
    """The mean CAA shift at ``level`` and the mean persona effect: the sparsity figure's reference lines."""
    means = {}
    caa = [r.levels[level].mean_shift for r in record.matched_summary if r.method == "caa" and level in r.levels]
    if caa and not math.isnan(caa[0]):
        means[f"CAA at KL {level:g}"] = caa[0]
    persona = [r.persona_effect for r in record.validation]
    if persona:
        means["persona prompt"] = sum(persona) / len(persona)
    return means


def sparsity_figure(results: Mapping[str, ControlRecord]) -> Any:
    """How sparse can steering be: the mean shift at the target KL against the number of edited neurons,
    one line per selection rule, one panel per model (``results``: ``{model name: control record}``),
    with CAA's shift at the same KL and the persona prompt's effect as reference lines."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from dpn_lens.figures import style

    names = list(results)
    counts = {name: len({(r.trait, r.direction) for r in results[name].sweep or []}) for name in names}
    figure = make_subplots(rows=1, cols=len(names), subplot_titles=[f"{n} ({counts[n]} trait-directions)" for n in names],
                           horizontal_spacing=0.08)
    colours: dict[str, str] = {}
    for col, name in enumerate(names, 1):
        result = results[name]
        level = result.target_kl
        rows = [r for r in sparsity_rows(result.sweep or []) if not math.isnan(r["mean shift"])]
        for rule in dict.fromkeys(r["rule"] for r in rows):
            points = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["mean neurons"])
            first = rule not in colours   # one legend entry per rule, however many panels show it
            colour = colours.setdefault(rule, PALETTE[len(colours) % len(PALETTE)])
            figure.add_trace(go.Scatter(
                x=[max(p["mean neurons"], 1) for p in points], y=[p["mean shift"] for p in points],
                mode="lines+markers", name=rule, legendgroup=rule, showlegend=first,
                line={"color": colour}, text=[f"k={p['k']}, as asked {p['as asked']}" for p in points]),
                row=1, col=col)
        for label, value in _reference_means(result, level).items():
            figure.add_hline(y=value, line={"dash": "dash" if label.startswith("CAA") else "dot", "color": "#555"},
                             annotation_text=label, annotation_position="top left", row=1, col=col)
        figure.add_hline(y=0, line={"color": "#999", "width": 1}, row=1, col=col)
        figure.update_xaxes(type="log", title_text="neurons edited (log)", row=1, col=col)
    figure.update_layout(height=460, width=520 * len(names) + 160)
    level = next(iter(results.values())).target_kl
    style(figure, f"How sparse can steering be? Mean shift at KL {level:g} vs neurons edited",
          None, "mean shift, nats/token")
    return figure


def _goal_table(rows: Sequence[GoalRow]) -> str:
    return markdown_table([{**r.to_dict(), "mean shift": _shift_text(r.mean_shift),
                            f"{r.reference} mean shift": _shift_text(r.reference_mean_shift),
                            "goal met": "yes" if r.goal_met else "no"} for r in rows])


def _generation_table(rows: Sequence[GenerationRow]) -> str:
    table = []
    for row in rows:
        effect, random = row.effect, row.random
        # no effect: the method's curve never reached the level, nothing was generated ("n/a")
        shift = format_interval(effect.shift, effect.ci_low, effect.ci_high) if effect is not None else "n/a"
        table.append({"trait": row.trait, "direction": row.direction, "method": row.method,
                      "KL level": "" if math.isnan(row.kl_level) else f"{row.kl_level:g}",
                      "gamma": "" if math.isnan(row.gamma) else f"{row.gamma:.3g}", "shift": shift,
                      "answers changed": f"{row.changed:.0%}" if row.changed is not None else "",
                      "random neurons": (format_interval(random.random_shift, random.random_ci_low,
                                                         random.random_ci_high) if random is not None else ""),
                      "method - random": (format_interval(random.vs_random, random.vs_random_ci_low,
                                                          random.vs_random_ci_high) if random is not None else "")})
    return markdown_table(table)


def _generation_summary(rows: Sequence[GenerationRow]) -> list[str]:
    """Per method and level: trait-directions moved as asked in generation, and the mean shift."""
    lines = []
    keyed: dict[tuple[str, float], list[GenerationRow]] = {}
    for r in rows:
        if r.direction != "both":
            keyed.setdefault((r.method, r.kl_level), []).append(r)
    for (method, level), points in keyed.items():
        measured = [p for p in points if p.effect is not None and not math.isnan(p.effect.shift)]
        asked = sum(p.effect.ci_low > 0 for p in measured)                                        # type: ignore[union-attr]
        beats = sum(p.random is not None and p.random.vs_random_ci_low > 0 for p in measured)
        mean = sum(p.effect.shift for p in measured) / len(measured) if measured else math.nan    # type: ignore[union-attr]
        lines.append(f"- {method} at KL {level:g}: moved as asked in {asked}/{len(points)}"
                     + (f", beats random neurons in {beats}/{len(points)}" if any(p.random is not None for p in points)
                        else "")
                     + f", mean shift {mean:+.3f}")
    persona = [r.effect.shift for r in rows if r.direction == "both" and r.effect is not None]
    if persona:
        lines.append(f"- persona reference (high-low)/2: mean {sum(persona) / len(persona):+.3f}")
    return lines


def _stage_note(rows: Sequence[StageRow]) -> str:
    """Where the run's time went, summed over traits (``stages.csv`` has it per trait).

    Example:
        >>> _stage_note([StageRow("o", "KL curves", 61.2), StageRow("o", "other", 2)])
        ' (KL curves 61 s, other 2 s)'
    """
    from dpn_lens.evaluation.stage_times import stage_seconds

    totals = stage_seconds(rows)
    return f" ({', '.join(f'{name} {seconds:.0f} s' for name, seconds in totals.items())})" if totals else ""


def write_control_outputs(record: ControlRecord, out: str | Path, png: bool = True) -> list[Path]:
    """Write every table and figure of ``record`` into ``out``; returns the written paths."""
    from dpn_lens.figures import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = record.to_dict()
    written = [record.save(out / CONTROL_FILE), write_result_table(control_rows(record), out / RESULT_TABLE)]
    if record.validation:        # a run with a finished trait: its long table, rendered
        written += write_results_report(out)
    for name in ("validation", "calibrated", "goal", "gamma_zero", "costs", "curves", "matched_cost", "matched_summary",
                 "sweep", "generation", "stages"):
        if data.get(name):
            written.append(write_csv_atomic(out / f"{name}.csv", data[name]))
    meta = record.meta
    config = meta.config
    levels = record.kl_levels
    zero = record.gamma_zero
    lines = [f"# Trait control on {meta.model} ({meta.dtype})", "",
             f"{len(config['traits'])} traits; up to {config['pairs']} preference pairs per trait (the model's own answers "
             f"under held-out PersonalityBench personas, at most {config['max_new_tokens']} tokens); gammas "
             f"{', '.join(f'{g:g}' for g in config['gammas'])} for KL and perplexity ({meta.probe_tokens} probe tokens, "
             f"{'the BOS token before them unedited' if config.get('kl_skip_context') else 'the BOS token before them edited too'}); "
             f"the shift is measured where each curve reaches KL {', '.join(f'{t:g}' for t in levels)}. "
             f"Run time {meta.seconds:.0f} s{_stage_note(record.stages or [])}.", "",
             "Shifts are mean per-token log p(high answer) - log p(low answer), in nats/token, signed by the direction "
             "(positive = moved as asked), with 95% percentile-bootstrap intervals over pairs; `*` = interval excludes 0.", "",
             "## Positive control (the metric's validation)", "",
             "Persona effect per pair = (margin under a high persona - margin under a low persona) / 2, with "
             "descriptions the pairs were not generated with. The metric can judge a trait only if this is > 0.", "",
             _validation_table(record.validation), "",
             f"## Selection rules at KL {record.target_kl:g}: which steers?", "",
             "Per rule (the same `±gamma * s` edit on the neurons each rule selects): trait-directions whose shift "
             "interval lies above 0 (as asked) or below it (wrong way), that beat the rule's own random-neuron control "
             "(rule - random interval above 0), and the mean shift beside CAA's at the same KL. Goal: at least 8 of 10 "
             "as asked and beating random neurons, with a mean shift at least CAA's.", "",
             _goal_table(record.goal or []), "",
             "## Each rule at its calibrated gamma", "",
             f"gamma read off each rule's KL curve at KL {record.target_kl:g}, then measured there; the random-neuron "
             f"control puts the same deltas (same gamma) on random neurons of the same layers, "
             f"{config.get('random_draws', 1)} draws (intervals over draws and pairs); `rule - random` is their paired "
             "difference.", "",
             _calibrated_table(record.calibrated), ""]
    if meta.skipped:
        lines += ["Not steered (validated above, nothing to edit): "
                  + "; ".join(f"{trait}: {reason}" for trait, reason in meta.skipped.items()) + ".", ""]
    if zero:
        lines += ["Gamma 0 (the DPN-LE edit scaled to 0 through the same hooks): "
                  + ", ".join(f"{r.trait} {r.effect.shift:+.2g}" for r in zero) + ". KL noise floor (gamma 0.001, "
                  "rounding alone): " + ", ".join(f"{r.trait} {r.kl_floor:.4f}" for r in zero if r.kl_floor is not None), ""]
    summary, detail = _matched_tables(record.matched_summary, record.matched_cost, levels)
    lines += ["## Matched cost: shift at a given KL", "",
              "Each method's shift measured at the gamma where its KL curve reaches the level (n/a: never reached on "
              "the grid). `reached / CI>0`: trait-directions where the curve reached that KL / where the interval lies "
              "above 0. The random-neuron rows are measured at DPN-LE's gammas (their own KL is in the points table).",
              "", summary, "", "Best first:", "", *_best_by_target(record.matched_summary, levels), "",
              "### Per trait and direction", "", detail, "",
              *(["## How sparse can steering be? (budget sweep)", "",
                 f"Each rule re-selected at k neurons (DPN-LE: q = 1 - k / searched neurons, then |d| > tau_d), gamma "
                 f"calibrated to KL {record.target_kl:g} per trait-direction; `all` = every candidate neuron.", "",
                 markdown_table(sparsity_rows(record.sweep or [])), ""] if record.sweep else []),
              *(["## Generation-based check", "",
                 "Greedy answers (no persona) under each edit at decode steps, scored by the unsteered model: mean "
                 "per-token log p(answer | high persona) - log p(answer | low persona) (held-out personas). Shift = "
                 "steered minus unsteered answer's score per question, signed; persona reference = (score of the "
                 "pairs' high-persona answer - low-persona answer) / 2.", "", *_generation_summary(record.generation or []),
                 "", _generation_table(record.generation or []), ""] if record.generation else []),
              "## Dose-response points", "",
              markdown_table([{k: r[k] for k in ("trait", "direction", "method", "kl_level", "gamma", "n_edited", "kl", "ppl",
                                                 "shift", "ci_low", "ci_high", "p")} for r in data["curves"]], digits=4), ""]
    written.append(write_text_atomic(out / "control.md", "\n".join(lines)))
    figures = {"tradeoff_kl": tradeoff_figure(record.curves, "kl"), "tradeoff_ppl": tradeoff_figure(record.curves, "ppl"),
               "cost_by_gamma": cost_figure(record.costs)}
    if record.sweep:
        figures["sparsity"] = sparsity_figure({meta.model: record})
    for name, figure in figures.items():
        try:
            written += save_figure(figure, out, name, png=png)
        except RuntimeError as error:  # no Chromium: the HTML is written before the PNG fails
            print(f"PNG of {name} skipped: {error}")
            written.append(out / f"{name}.html")
    return written
