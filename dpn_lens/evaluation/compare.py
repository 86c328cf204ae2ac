"""The comparison: every method x trait x direction on trait control and capability, plus sweeps.

Methods (all through the same evaluation code; one entry each in ``dpn_lens.evaluation.methods``):
``unsteered``, ``dpn-le`` (mode "both"), ``dense`` (s on all neurons of DPN-LE's layers), ``topk``
(s on DPN-LE's neuron budget, chosen by |d|), ``npti``, ``caa`` and ``prompting``.

Per row: neurons edited (count, % of all MLP neurons), questionnaire score of the trait and its change,
statement agreement (high-pole, low-pole, gap) and change, every capability metric and its change.
``trait_shift`` is the questionnaire change signed by the direction (positive = moved as asked).
With a judge (``CompareConfig.judge``), rows also hold the judge's trait and fluency ratings of generated
PersonalityBench answers (``judge_trait``, ``judge_fluency``) and ``judge_shift``, signed the same way.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dpn_lens.baselines import PersonaPrompt
from dpn_lens.data.contrastive import embedded_contrastive_set
from dpn_lens.evaluation import capability as cap
from dpn_lens.io import markdown_table
from dpn_lens.evaluation import trait as tr
from dpn_lens.evaluation.judge import JudgeConfig, judge_evaluation, load_test_questions
from dpn_lens.evaluation.methods import METHOD_NAMES, METHODS_BY_NAME, TraitContext
from dpn_lens.localize import reselect
from dpn_lens.neuron_map import NeuronMap
from dpn_lens.run import find_map, percent_of_mlp
from dpn_lens.steering import Edit, direction_sign
from dpn_lens.traits import TRAITS, normalize_trait

__all__ = ["CompareConfig", "run_comparison", "write_outputs"]

DIRECTIONS = ("increase", "decrease")


@dataclass
class CompareConfig:
    """What to compare and how much data to use (defaults: a quick CPU run).

    Example:
        >>> CompareConfig(traits=["openness"], questionnaire_items=6).traits
        ['openness']
    """

    traits: list[str] = field(default_factory=lambda: list(TRAITS))
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    data_dir: str | None = None
    maps_dir: str | None = None
    locate_pairs: int = 100
    locate_q: float | None = None
    locate_tau_d: float | None = None
    questionnaire_items: int = 8
    inventory: str = "ipip_neo_300_test"
    statements_per_pole: int = 6
    respondents: str | None = None
    capability: cap.CapabilitySizes = field(default_factory=cap.CapabilitySizes.quick)
    gamma: float = 1.0
    npti_gamma: float = 1.4
    caa_gamma: float = 1.0
    npti_prompts: int = 16
    npti_new_tokens: int = 24
    caa_pairs: int = 50
    gamma_sweep: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0])
    q_sweep: list[float] = field(default_factory=lambda: [0.999, 0.995, 0.97])
    sweep_trait: str | None = None
    sweep_methods: list[str] = field(default_factory=lambda: ["dpn-le", "npti", "dense"])
    seed: int = 0
    judge: JudgeConfig | None = None

    def __post_init__(self) -> None:
        self.traits = [normalize_trait(t) for t in self.traits]
        unknown = [m for m in self.methods if m not in METHODS_BY_NAME]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHOD_NAMES)}")


def _neuron_map(model: Any, trait: str, config: CompareConfig, log) -> NeuronMap:
    if config.maps_dir:
        path = find_map(config.maps_dir, trait)  # a maps folder or a run folder
        if path is not None:
            log(f"{trait}: neuron map from {path}")
            return NeuronMap.load(path, model=model)
        log(f"{trait}: no map in {config.maps_dir}; locating on the fly")
    from dpn_lens.collect import CollectionConfig, collect_statistics
    from dpn_lens.localize import locate

    pairs = embedded_contrastive_set(trait, n_pairs=config.locate_pairs, seed=42)
    return locate(collect_statistics(model, pairs, CollectionConfig(progress=False)), model_name=getattr(model, "dpn_model_name", None),
                  q=config.locate_q, tau_d=config.locate_tau_d)


class _Evaluator:
    """Evaluates one condition (edit and/or persona) on trait and capability metrics, with shared data."""

    def __init__(self, model: Any, config: CompareConfig):
        self.model, self.config = model, config
        items = tr.load_ipip_items(config.data_dir, config.inventory)
        self.items = {t: [i for i in items if i.trait == t][: config.questionnaire_items] for t in config.traits}
        self.statements = {t: tr.load_statements(config.data_dir, t, config.statements_per_pole, config.seed)
                           for t in config.traits}
        self.suite = cap.load_capability_suite(config.data_dir, config.capability, config.seed)
        judge = config.judge
        self.judge_questions = ({t: load_test_questions(config.data_dir, t, judge.questions_per_trait, config.seed)
                                 for t in config.traits} if judge else {})
        self.judged: list[dict[str, Any]] = []  # every generated answer with its ratings, for inspection

    def trait_metrics(self, trait: str, edit: Edit | None, persona: PersonaPrompt | None, label: dict[str, Any] | None = None
                      ) -> tuple[dict[str, float], np.ndarray]:
        answers = tr.answer_items(self.model, self.items[trait], edit, persona)
        agreement = tr.statement_agreement(self.model, self.statements[trait], edit, persona)
        metrics = {"questionnaire": float(answers["keyed"].mean()), "option_mass": float(answers["mass"].mean()),
                   "statements_high": agreement["high"], "statements_low": agreement["low"],
                   "statements_gap": agreement["gap"]}
        if self.config.judge is not None:
            questions = self.judge_questions[trait]
            judged = judge_evaluation(self.model, trait, questions, self.config.judge, edit, persona)
            metrics.update(judge_trait=judged["judge_trait"], judge_fluency=judged["judge_fluency"],
                           judge_unparsable=judged["judge_unparsable"])
            # An unparsable reply keeps its row (empty ratings, the raw reply) so it can be read, not guessed.
            self.judged += [{**(label or {}), "trait": trait, "question": q, "answer": a,
                             "judge_trait": r.trait if r else None, "judge_fluency": r.fluency if r else None,
                             "judge_parsed": r is not None, "judge_reply": reply}
                            for q, a, r, reply in zip(questions, judged["answers"], judged["ratings"], judged["replies"])]
        return metrics, answers["raw"]

    def capability(self, edit: Edit | None, persona: PersonaPrompt | None, light: bool = False) -> dict[str, float]:
        prefix = persona.prefix if persona is not None else ""
        if light:
            sizes = self.suite.sizes
            ppl = cap._chunks(self.model, self.suite.ppl_text, sizes.ppl_chunks, sizes.ppl_chunk_tokens)
            kl_chunks = cap._chunks(self.model, self.suite.ppl_text, sizes.kl_chunks, sizes.kl_chunk_tokens,
                                    skip_chunks=-(-sizes.ppl_chunks * sizes.ppl_chunk_tokens // sizes.kl_chunk_tokens))
            reference = self.suite._kl_reference.get(id(self.model))
            return {"wikitext_ppl": cap.perplexity(self.model, ppl, edit, prefix),
                    "kl": cap.kl_divergence(self.model, kl_chunks, edit, prefix, reference)}
        return cap.evaluate_capability(self.model, self.suite, edit, prefix)


def _prepare(model: Any, trait: str, config: CompareConfig, log) -> TraitContext:
    """The trait's neuron map and the state of every method that runs on it (in registry order)."""
    context = TraitContext(trait, _neuron_map(model, trait, config, log))
    for name, method in METHODS_BY_NAME.items():
        if method.prepare is not None and (name in config.methods or (method.sweepable and name in config.sweep_methods)):
            context.state[name] = method.prepare(model, trait, config)
    return context


def run_comparison(model: Any, config: CompareConfig, log=print) -> dict[str, Any]:
    """Run the comparison and return ``{"rows", "gamma_sweep", "q_sweep", "respondents", "meta"}``.

    Example:
        >>> result = run_comparison(load_model("smollm2-135m-instruct"), CompareConfig(data_dir="../shared/data"))  # doctest: +SKIP
    """
    started = time.time()
    evaluator = _Evaluator(model, config)
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    n_neurons = n_layers * d_mlp
    log("unsteered capability")
    base_capability = evaluator.capability(None, None)
    rows: list[dict[str, Any]] = []
    raw_answers: dict[tuple[str, str, str], np.ndarray] = {}
    base_trait: dict[str, dict[str, float]] = {}
    for trait in config.traits:
        base_trait[trait], answers = evaluator.trait_metrics(trait, None, None, {"method": "unsteered"})
        for direction in DIRECTIONS:
            raw_answers[("unsteered", trait, direction)] = answers
        rows.append({"method": "unsteered", "trait": trait, "direction": "none", "n_edited": 0, "pct_edited": 0.0,
                     **base_trait[trait], **base_capability, "trait_shift": 0.0, "seconds": 0.0,
                     **({"judge_shift": 0.0} if config.judge else {})})
    contexts: dict[str, TraitContext] = {}
    for trait in config.traits:
        t0 = time.time()
        context = contexts[trait] = _prepare(model, trait, config, log)
        log(f"{trait}: map {context.neuron_map.n_selected()} neurons; baselines prepared in {time.time() - t0:.0f}s")
        for direction in DIRECTIONS:
            sign = direction_sign(direction)
            for method in config.methods:
                t0 = time.time()
                edit, persona = METHODS_BY_NAME[method].condition(model, context, direction, config)
                metrics, answers = evaluator.trait_metrics(trait, edit, persona,
                                                           {"method": method, "direction": direction})
                raw_answers[(method, trait, direction)] = answers
                capability = evaluator.capability(edit, persona)
                n_edited = edit.n_edited if edit is not None else 0
                row = {"method": method, "trait": trait, "direction": direction, "n_edited": n_edited,
                       "pct_edited": percent_of_mlp(n_edited, n_layers, d_mlp), **metrics, **capability,
                       "trait_shift": sign * (metrics["questionnaire"] - base_trait[trait]["questionnaire"]),
                       "seconds": time.time() - t0}
                if "judge_trait" in metrics:
                    row["judge_shift"] = sign * (metrics["judge_trait"] - base_trait[trait]["judge_trait"])
                for key in list(metrics) + list(capability):
                    base = base_trait[trait].get(key, base_capability.get(key))
                    row[f"delta_{key}"] = row[key] - base
                rows.append(row)
                log(f"{trait} {direction} {method}: q={metrics['questionnaire']:.3f} shift={row['trait_shift']:+.3f} "
                    f"kl={capability['kl']:.4f} ppl={capability['wikitext_ppl']:.2f} ({row['seconds']:.0f}s)")
    respondents = _respondent_rows(evaluator, config, raw_answers)
    sweep_trait = normalize_trait(config.sweep_trait or config.traits[0])
    gamma_rows, q_rows = [], []
    if sweep_trait in contexts and (config.gamma_sweep or config.q_sweep):
        context = contexts[sweep_trait]
        base_q = base_trait[sweep_trait]["questionnaire"]
        for method in [m for m in config.sweep_methods if m in METHODS_BY_NAME and METHODS_BY_NAME[m].sweepable]:
            for gamma in config.gamma_sweep:
                edit, _ = METHODS_BY_NAME[method].condition(model, context, "increase", config, gamma)
                metrics, _ = evaluator.trait_metrics(sweep_trait, edit, None, {"method": method, "gamma": gamma})
                gamma_rows.append({"method": method, "trait": sweep_trait, "gamma": gamma, "n_edited": edit.n_edited,
                                   **metrics, "trait_shift": metrics["questionnaire"] - base_q,
                                   **evaluator.capability(edit, None, light=True)})
                log(f"gamma sweep {method} {gamma}: shift={gamma_rows[-1]['trait_shift']:+.3f} kl={gamma_rows[-1]['kl']:.4f}")
        for q in config.q_sweep:
            neuron_map = reselect(context.neuron_map, q=q)
            edit, _ = METHODS_BY_NAME["dpn-le"].condition(model, TraitContext(sweep_trait, neuron_map), "increase",
                                                          config)
            metrics, _ = evaluator.trait_metrics(sweep_trait, edit, None, {"method": "dpn-le", "q": q})
            q_rows.append({"method": "dpn-le", "trait": sweep_trait, "q": q, "n_edited": edit.n_edited,
                           "pct_edited": percent_of_mlp(edit.n_edited, n_layers, d_mlp), **metrics,
                           "trait_shift": metrics["questionnaire"] - base_q, **evaluator.capability(edit, None, light=True)})
            log(f"q sweep {q}: n={edit.n_edited} shift={q_rows[-1]['trait_shift']:+.3f} kl={q_rows[-1]['kl']:.4f}")
    meta = {"model": getattr(model, "dpn_model_name", "model"), "n_mlp_neurons": n_neurons,
            "config": {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                       for k, v in dataclasses.asdict(config).items()},
            "seconds": time.time() - started}
    if config.judge is not None:  # replies the judge gave that were not a rating: reported, never guessed
        meta["judge_replies"] = len(evaluator.judged)
        meta["judge_unparsable"] = sum(not j["judge_parsed"] for j in evaluator.judged)
    return {"rows": rows, "gamma_sweep": gamma_rows, "q_sweep": q_rows, "respondents": respondents,
            "judged": evaluator.judged, "meta": meta}


def _respondent_rows(evaluator: _Evaluator, config: CompareConfig, raw: dict) -> list[dict[str, Any]]:
    """Respondent-matching MAE per method (only when the questionnaire is IPIP-NEO-300's test split)."""
    if config.inventory != "ipip_neo_300_test" or set(config.traits) != set(TRAITS):
        return []
    from dpn_lens.data.contrastive import resolve_data_dir

    folder = resolve_data_dir(config.data_dir, "ipip") / "ipip_neo_300"
    path = Path(config.respondents) if config.respondents else folder / "respondents_sample10.json"
    respondents = tr.load_respondents(path)
    train_ids = {str(i) for i in json.loads((folder / "split.json").read_text())["train_index"]}
    train = [i for i in tr.load_ipip_items(config.data_dir, "ipip_neo_300") if i.id in train_ids]
    test = [i for t in TRAITS for i in evaluator.items[t]]
    result = []
    for method in ["unsteered", *config.methods]:
        mae = tr.respondent_mae(respondents, train, test, lambda t, d: raw[(method, t, d)])
        result.append({"method": method, "respondent_mae": mae, "n_respondents": len(respondents),
                       "n_test_items": len(test)})
    return result


def _markdown(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    return markdown_table(rows, columns, digits=3)


def summary_by_method(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over traits and directions of the main columns, per method."""
    result = []
    for method in dict.fromkeys(row["method"] for row in rows):
        chosen = [r for r in rows if r["method"] == method]
        entry = {"method": method, "conditions": len(chosen)}
        for key in ("n_edited", "pct_edited", "trait_shift", "judge_shift", "judge_fluency", "statements_gap", "kl",
                    "wikitext_ppl",
                    *[m for m in cap.CAPABILITY_METRICS if m not in ("kl", "wikitext_ppl")]):
            values = [r[key] for r in chosen if key in r]
            if values:
                entry[key] = float(np.mean(values))
        result.append(entry)
    return result


def write_outputs(result: dict[str, Any], out: str | Path, make_png: bool = True) -> list[Path]:
    """CSV + JSON of every table, a markdown report and plotly figures (HTML, and PNG if kaleido works)."""
    from dpn_lens.io import write_csv_atomic, write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json_atomic(out / "comparison.json", result)]
    for name in ("rows", "gamma_sweep", "q_sweep", "respondents", "judged"):
        rows = result.get(name)
        if not rows:
            continue
        written.append(write_csv_atomic(out / f"{name}.csv", rows))
    summary = summary_by_method(result["rows"])
    judge = ["judge_trait", "judge_shift", "judge_fluency"] if result.get("judged") else []
    main = ["method", "trait", "direction", "n_edited", "pct_edited", "questionnaire", "trait_shift", *judge,
            "statements_gap", "kl", "wikitext_ppl", "lambada_acc", *[f"{t}_acc" for t in cap.MC_TASKS]]
    text = [f"# Comparison on {result['meta']['model']}", "",
            f"Run time: {result['meta']['seconds']:.0f} s. Neurons: {result['meta']['n_mlp_neurons']} MLP neurons.", "",
            *([f"Judge: {result['meta']['judge_unparsable']} of {result['meta']['judge_replies']} replies were not a "
               "rating (counted in judge_unparsable, left out of the means; the raw replies are in judged.csv).", ""]
              if "judge_unparsable" in result["meta"] else []),
            "## Mean per method (over traits and directions)", "",
            _markdown(summary, ["method", "conditions", "n_edited", "pct_edited", "trait_shift",
                                *[c for c in judge if c != "judge_trait"], "statements_gap", "kl", "wikitext_ppl",
                                "lambada_acc", *[f"{t}_acc" for t in cap.MC_TASKS]]), "",
            "## Every condition", "", _markdown(result["rows"], main), ""]
    if result["respondents"]:
        text += ["## Respondent matching (IPIP-NEO-300, MAE, lower is better)", "",
                 _markdown(result["respondents"], ["method", "respondent_mae", "n_respondents", "n_test_items"]), ""]
    if result["gamma_sweep"]:
        text += ["## Gamma sweep", "", _markdown(result["gamma_sweep"], ["method", "gamma", "n_edited", "questionnaire",
                                                                        "trait_shift", "kl", "wikitext_ppl"]), ""]
    if result["q_sweep"]:
        text += ["## q sweep (DPN-LE)", "", _markdown(result["q_sweep"], ["q", "n_edited", "pct_edited", "questionnaire",
                                                                         "trait_shift", "kl", "wikitext_ppl"]), ""]
    written.append(write_text_atomic(out / "comparison.md", "\n".join(text)))
    written += _figures(result, summary, out, make_png)
    return written


def _figures(result: dict[str, Any], summary: list[dict[str, Any]], out: Path, make_png: bool) -> list[Path]:
    import plotly.graph_objects as go

    from dpn_lens.figures import save_figure, style

    figures = {}
    rows = [r for r in result["rows"] if r["method"] != "unsteered"]
    scatter = go.Figure()
    for method in dict.fromkeys(r["method"] for r in rows):
        chosen = [r for r in rows if r["method"] == method]
        scatter.add_trace(go.Scatter(x=[r["kl"] for r in chosen], y=[r["trait_shift"] for r in chosen], mode="markers",
                                     name=method, text=[f"{r['trait']} {r['direction']}" for r in chosen]))
    figures["tradeoff"] = style(scatter, "Trait control vs capability cost (each point: trait x direction)",
                                "KL(unsteered || steered), nats/token", "questionnaire shift (as asked)")
    if result["gamma_sweep"]:
        sweep = go.Figure()
        for method in dict.fromkeys(r["method"] for r in result["gamma_sweep"]):
            chosen = [r for r in result["gamma_sweep"] if r["method"] == method]
            sweep.add_trace(go.Scatter(x=[r["kl"] for r in chosen], y=[r["trait_shift"] for r in chosen],
                                       mode="lines+markers", name=method, text=[f"gamma={r['gamma']}" for r in chosen]))
        figures["gamma_sweep"] = style(sweep, f"Gamma sweep ({result['gamma_sweep'][0]['trait']}, increase)",
                                       "KL nats/token", "questionnaire shift")
    if result["q_sweep"]:
        q = result["q_sweep"]
        labels = [f"q={r['q']} ({r['n_edited']} neurons)" for r in q]
        qfig = go.Figure([go.Bar(x=labels, y=[r["trait_shift"] for r in q], name="questionnaire shift"),
                          go.Bar(x=labels, y=[r["kl"] for r in q], name="KL (nats/token)")])
        qfig.update_layout(barmode="group")
        figures["q_sweep"] = style(qfig, "q sweep (DPN-LE, increase)")
    written = []
    for name, figure in figures.items():
        figure.update_layout(width=800, height=500)
        try:
            written += save_figure(figure, out, name, png=make_png)
        except RuntimeError as error:  # no Chromium: save_figure wrote the HTML before the PNG failed; keep it
            print(f"PNG of {name} skipped: {error}")
            written.append(out / f"{name}.html")
    return written
