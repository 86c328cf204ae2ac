"""The explorer in a notebook: ``explore(run, model)`` returns an ipywidgets panel.

* a **trait** dropdown;
* **q** and **tau_d** sliders that re-select the trait's map from its saved ``s`` and ``d`` live
  (``reselect``), with the counts and the layer plot updating;
* a **gamma** slider and a **direction** toggle that regenerate a steered answer to a prompt you type,
  beside the unsteered answer;
* the trait's **neuron cards** inline (a neuron dropdown).

The panel only wires widgets to three plain functions, which tests and scripts call without a kernel:
``selection_view`` (re-select and describe), ``steered_answers`` (unsteered vs steered answer) and
``card_html`` (one card as HTML).

Example:
    >>> view = selection_view(run.maps["openness"], q=0.99, tau_d=0.4)       # doctest: +SKIP
    >>> view.n_high, view.n_low                                              # doctest: +SKIP
    (212, 198)
    >>> explore(run, model)                                                  # doctest: +SKIP
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from dpn_lens.cards.card import NeuronCard
from dpn_lens.localization.neuron_map import NeuronMap
from dpn_lens.run import Run

__all__ = ["SelectionView", "selection_view", "steered_answers", "card_html", "explore"]


@dataclass
class SelectionView:
    """A map re-selected at ``q`` and ``tau_d``: the map, its counts per layer and a one-line summary."""

    neuron_map: NeuronMap
    counts: dict[int, tuple[int, int]]
    n_high: int
    n_low: int
    text: str

    def figure(self) -> Any:
        """Stacked bars of high and low neurons per layer (plotly)."""
        import plotly.graph_objects as go

        layers = sorted(self.counts)
        figure = go.Figure([go.Bar(x=layers, y=[self.counts[l][0] for l in layers], name="high", marker_color="#b03a2e"),
                            go.Bar(x=layers, y=[self.counts[l][1] for l in layers], name="low", marker_color="#1f618d")])
        figure.update_layout(barmode="stack", height=280, margin={"t": 30, "r": 10, "b": 35, "l": 40},
                             title=self.text, xaxis_title="layer", yaxis_title="neurons")
        return figure


def selection_view(neuron_map: NeuronMap, q: float | None = None, tau_d: float | None = None) -> SelectionView:
    """``reselect(neuron_map, q, tau_d)`` and what the panel shows of it (counts per layer, a summary line).

    An effect rule's map is shown as it is (its neurons are ranked by effect, not chosen by q and tau_d).
    """
    from dpn_lens.localization.localize import reselect

    chosen = neuron_map if neuron_map.rule != "dpn-le" else reselect(neuron_map, q=q, tau_d=tau_d)
    n_high, n_low = chosen.n_selected("high"), chosen.n_selected("low")
    settings = "" if chosen.rule != "dpn-le" else f" at q={chosen.settings.q:g}, tau_d={chosen.settings.tau_d:g}"
    text = (f"{chosen.trait} [{chosen.rule}]{settings}: {n_high} high + {n_low} low neurons "
            f"({100 * chosen.fraction_selected():.2f}% of the searched layers)")
    return SelectionView(chosen, chosen.counts_per_layer(), n_high, n_low, text)


def steered_answers(model: Any, neuron_map: NeuronMap, prompt: str, gamma: float, direction: str = "increase",
                    max_new_tokens: int = 40) -> dict[str, str]:
    """``{"unsteered": ..., "steered": ...}``: greedy answers to ``prompt`` without and with the map's edit
    at ``gamma`` in ``direction`` (decode positions only, as in use)."""
    from dpn_lens.evaluation.judge import generate_answers
    from dpn_lens.steering import steering_intervention

    if not str(prompt).strip():
        raise ValueError("the prompt is empty; type a question")
    edit = steering_intervention(neuron_map, gamma, direction)
    unsteered = generate_answers(model, [prompt], max_new_tokens=max_new_tokens, repetition_penalty=1.0)[0]
    steered = generate_answers(model, [prompt], edit, max_new_tokens=max_new_tokens, repetition_penalty=1.0)[0]
    return {"unsteered": unsteered, "steered": steered}


def _tokens_html(contexts: list[Any]) -> str:
    if not contexts:
        return "<i>none recorded</i>"
    top = max(c.value for c in contexts) or 1.0
    rows = []
    for context in contexts:
        spans = []
        for i, (token, value) in enumerate(zip(context.tokens, context.activations)):
            alpha = 0.0 if value is None else max(-1.0, min(1.0, value / top))
            colour = f"rgba(220,60,40,{0.85 * alpha:.3f})" if alpha >= 0 else f"rgba(40,90,220,{-0.85 * alpha:.3f})"
            outline = "outline:1px solid #333;" if i == context.center else ""
            spans.append(f'<span style="background:{colour};{outline}">{html.escape(token)}</span>')
        rows.append(f'<div style="font-family:monospace;font-size:12px">{context.value:.2f} {"".join(spans)}</div>')
    return "".join(rows)


def card_html(card: NeuronCard) -> str:
    """One card as HTML (what the notebook panel shows inline; the explorer page draws the same fields)."""
    def stat(mean: float | None, sd: float | None) -> str:
        return "–" if mean is None else f"{mean:.3f} ± {sd:.3f}"

    def tokens(pairs: list[tuple[str, float]]) -> str:
        return ", ".join(f"{html.escape(repr(t))} {v:+.3f}" for t, v in pairs)

    others = ", ".join(html.escape(m) for m in card.in_maps) or "no other map"
    return (f"<h3>{card.label}</h3><div>{html.escape(card.trait)} · rule <b>{html.escape(card.rule)}</b> · "
            f"{card.pole} pole · s = {card.s:.4g} · d = {card.d:.2f} · rank {card.rank_in_layer} in layer "
            f"{card.layer} by {html.escape(card.rank_by)}</div>"
            f"<div>high prompts {stat(card.mean_high, card.sd_high)} · low prompts {stat(card.mean_low, card.sd_low)}"
            f" · also in: {others}</div>"
            f"<p><b>promotes</b> {tokens(card.promoted)}<br><b>suppresses</b> {tokens(card.suppressed)}<br>"
            f"<small>{html.escape(card.lens_note)}</small></p>"
            f"<b>top contexts, contrastive prompts</b>{_tokens_html(card.prompt_contexts)}"
            f"<b>top contexts, neutral text</b>{_tokens_html(card.text_contexts)}"
            f"<p><b>pushed alone</b>: {_effect_text(card.effect)}<br><b>capability</b>: {_capability_text(card.capability)}</p>")


def _effect_text(effect: dict[str, Any] | None) -> str:
    if not effect:
        return "not measured (dpn-lens cards --effects N)"
    return (f"margin shift {effect['shift']:+.4f} [{effect['ci_low']:+.4f}, {effect['ci_high']:+.4f}] nats/token at gamma "
            f"{effect['gamma']:.3g} (its map's KL {effect['target_kl']:g} gamma); the whole map {effect['map_shift']:+.4f}")


def _capability_text(capability: dict[str, Any] | None) -> str:
    if not capability:
        return "no multifunction study in this run (dpn-lens study multifunction)"
    return (f"attribution percentile {100 * capability['percentile_in_layer']:.1f} in its layer"
            + (" (a capability neuron: top 2%)" if capability["capability_neuron"] else ""))


def explore(run: Run, model: Any, cards: dict[tuple[str, str], list[NeuronCard]] | None = None,
            prompt: str = "What would you do on a free Saturday?", max_new_tokens: int = 40) -> Any:
    """The ipywidgets panel (module note) for ``run``'s DPN-LE maps; ``cards`` from ``build_cards``
    (None: no card section).

    Needs ``ipywidgets`` (``pip install ipywidgets``) and a notebook frontend to be interactive; without a
    frontend it still builds and each callback runs when called.
    """
    from dpn_lens.numbers import as_int

    max_new_tokens = as_int(max_new_tokens, "max_new_tokens", "40", minimum=1)
    try:
        import ipywidgets as widgets
    except ImportError as error:
        raise ImportError("explore() needs ipywidgets: pip install ipywidgets (or use `dpn-lens explore --run RUN`, "
                          "the HTML explorer)") from error
    import plotly.graph_objects as go

    traits = list(run.maps)
    if not traits:
        raise ValueError("the run has no maps to explore")
    first = run.maps[traits[0]]
    trait = widgets.Dropdown(options=traits, value=traits[0], description="trait")
    q = widgets.FloatSlider(value=first.settings.q, min=0.9, max=0.9995, step=0.0005, readout_format=".4f",
                            description="q", continuous_update=False)
    tau_d = widgets.FloatSlider(value=first.settings.tau_d, min=0.0, max=2.0, step=0.05, description="tau_d",
                                continuous_update=False)
    summary = widgets.HTML()
    plot = go.FigureWidget(selection_view(first).figure()) if _has_widget_plotly() else None
    plot_output = widgets.Output()
    gamma = widgets.FloatSlider(value=1.0, min=0.0, max=16.0, step=0.25, description="gamma", continuous_update=False)
    direction = widgets.ToggleButtons(options=["increase", "decrease"], value="increase")
    question = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="70%"))
    generate = widgets.Button(description="generate")
    answers = widgets.HTML()
    neuron = widgets.Dropdown(description="neuron")
    card_view = widgets.HTML()
    state: dict[str, Any] = {}

    def update_selection(*_: Any) -> None:
        view = selection_view(run.maps[trait.value], q.value, tau_d.value)
        state["map"] = view.neuron_map
        summary.value = f"<b>{html.escape(view.text)}</b>"
        if plot is not None:
            with plot.batch_update():
                for bar, pole in zip(plot.data, (0, 1)):
                    layers = sorted(view.counts)
                    bar.x, bar.y = layers, [view.counts[l][pole] for l in layers]
                plot.layout.title = view.text
        else:
            plot_output.clear_output(wait=True)
            with plot_output:
                view.figure().show()

    def update_trait(*_: Any) -> None:
        chosen = run.maps[trait.value]
        q.value, tau_d.value = chosen.settings.q, chosen.settings.tau_d
        trait_cards = (cards or {}).get(("dpn-le", trait.value), [])
        neuron.options = [(f"{c.label} ({c.pole}, s={c.s:+.3g})", i) for i, c in enumerate(trait_cards)]
        neuron.value = 0 if trait_cards else None      # new options leave no neuron chosen
        update_selection()
        show_card()

    def show_card(*_: Any) -> None:
        trait_cards = (cards or {}).get(("dpn-le", trait.value), [])
        card_view.value = card_html(trait_cards[neuron.value]) if trait_cards and neuron.value is not None else \
            "<i>no cards: build them with dpn_lens.cards.build_cards(run, model)</i>"

    def run_generation(*_: Any) -> None:
        result = steered_answers(model, state["map"], question.value, gamma.value, direction.value, max_new_tokens)
        answers.value = (f"<b>unsteered</b>: {html.escape(result['unsteered'])}<br>"
                         f"<b>{direction.value} (gamma {gamma.value:g})</b>: {html.escape(result['steered'])}")

    trait.observe(update_trait, names="value")
    q.observe(update_selection, names="value")
    tau_d.observe(update_selection, names="value")
    neuron.observe(show_card, names="value")
    generate.on_click(run_generation)
    update_trait()
    return widgets.VBox([trait, widgets.HBox([q, tau_d]), summary, plot if plot is not None else plot_output,
                         widgets.HBox([gamma, direction]), widgets.HBox([question, generate]), answers,
                         neuron, card_view])


def _has_widget_plotly() -> bool:
    """``go.FigureWidget`` needs anywidget (plotly 6); fall back to re-drawn static figures without it."""
    try:
        import anywidget  # noqa: F401
    except ImportError:
        return False
    return True
