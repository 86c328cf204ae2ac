"""The main job: all five traits end to end on the embedded model, in minutes on a laptop CPU.

``dpn-lens demo`` locates each trait's neurons from the embedded contrastive data, saves the maps and
prints the neurons per trait, pole and layer. Beside the paper's neurons (the dual criterion) it selects
the neurons of the rule that steers (``DEMO_RULE``, ``attribution-t``: the neurons whose edit moves the
model's preference consistently across selection pairs; ``dpn_lens.effect.rules``). Per trait and map it
then calibrates gamma (the strength at which the edit reaches a KL of 0.05 nats/token from the
unsteered model, ``calibrate_gamma``), measures whether the edit moves the model's preference between a
high- and a low-trait answer to held-out questions (shift with a 95% interval, beside the persona
prompt's own effect; needs the PersonalityBench folder of the shared data), shows one unsteered answer
and one answer per map and direction, and writes a summary and plotly figures.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from dpn_lens.answers import Generation
from dpn_lens.evaluation.calibrate import Calibration
from dpn_lens.evaluation.judge import generate_answers
from dpn_lens.evaluation.shifts import PERSONA, Shift, ShiftRow, rows_of_record
from dpn_lens.io import write_json_atomic, write_text_atomic
from dpn_lens.run import SUMMARY_FILE, SUMMARY_MD_FILE
from dpn_lens.steering import Edit, Intervention, steering_intervention
from dpn_lens.traits import TRAITS

__all__ = ["run_demo", "generate_answer", "compare_generations", "DEMO_QUESTIONS"]

DEMO_QUESTIONS: dict[str, str] = {
    "openness": "A friend suggests spending Saturday at an experimental art exhibition. How do you respond?",
    "conscientiousness": "You have a report due on Monday and it is Friday evening. What do you do this weekend?",
    "extraversion": "You are invited to a party where you only know the host. How do you spend the evening?",
    "agreeableness": "A colleague takes credit for an idea you had. How do you react?",
    "neuroticism": "Your manager asks to see you tomorrow without saying why. How do you feel tonight?",
}
"""One situational question per trait, written for the demo."""

# Defaults of the demo. bfloat16 runs about 3x faster than float32 on recent CPUs (statistics stay
# float64; docs/PERFORMANCE.md), so 500 pairs x 5 traits x 2 poles = 5,000 prompts fit in the
# 10-minute budget on 2 cores together with the calibration and the preference check. The paper's
# gamma 1.0 is calibrated for 8B models; on the embedded models it barely changes the output, so the
# demo calibrates gamma per trait and direction instead (a fixed --gamma still works).
DEMO_PAIRS = 500
DEMO_DTYPE = "bfloat16"
DEMO_TARGET_KL = 0.05
"""Calibration target of the demo (nats/token on the probe text; ``evaluation.calibrate``)."""
DEMO_EVAL_PAIRS = 32
"""Preference pairs drawn per trait for the demo's shift (``dpn-lens control`` uses 64)."""
DEMO_RULE = "attribution-t"
"""The effect rule the demo shows beside the paper's neurons (the one that steers in docs/RESULTS.md)."""
DEMO_SELECTION_PAIRS = 48
"""Selection pairs per trait for the demo's rule (``dpn-lens control`` uses 128; fewer keep the demo short)."""
DEMO_SELECTION_TOKENS = 16
"""Answer tokens per selection pair in the demo (``dpn-lens control`` uses 48): the persona shows in the first
tokens of an answer, and generating them is most of the selection's time."""
DEMO_GENERATION_BATCH = 64
"""Prompts the demo generates at a time, for its selection pairs and its held-out pairs (faster than
control's 16 on a CPU)."""


def generate_answer(model: Any, question: str, max_new_tokens: int = 40) -> str:
    """Greedy answer to one question, rendered through the model's chat template (no repetition penalty).

    Any active ``steer`` context applies. The judge evaluation generates the same way
    (``dpn_lens.evaluation.judge.generate_answers``), with the paper's repetition penalty.
    An empty or whitespace question is refused (it would answer an empty chat).
    """
    if not str(question).strip():
        raise ValueError("the question is empty or whitespace; pass the text of a question")
    return generate_answers(model, [question], max_new_tokens=max_new_tokens, repetition_penalty=1.0)[0]


def compare_generations(model: Any, questions: Sequence[str], edits: Mapping[str, Edit],
                        max_new_tokens: int = 40) -> list[Generation]:
    """For each question: the unsteered answer, then one answer per named intervention (``Generation``;
    ``.text()`` prints it).

    One question under additive neuron edits: every condition is a row of one batched generation
    (``RowEdits``: row ``r`` carries edit ``r``, the first row none), a fraction of the time of one
    generation per condition. Otherwise each condition answers all the questions in one batched call
    (the answers of ``generate_answer``).
    """
    for question in questions:
        if not str(question).strip():
            raise ValueError("a question is empty or whitespace; pass the text of a question")
    if len(questions) == 1 and edits and all(isinstance(edit, Intervention) for edit in edits.values()):
        from dpn_lens.evaluation.logprobs import render
        from dpn_lens.generation import greedy_generate
        from dpn_lens.hooked import encode
        from dpn_lens.steering import RowEdits, steer

        prompt = encode(model, render(model, questions[0]))
        rows = RowEdits([None, *edits.values()], label="demo conditions")
        with steer(model, rows):
            tokens = greedy_generate(model, [prompt] * len(rows.edits), max_new_tokens, batch_size=len(rows.edits))
        texts = [model.tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]
        answers = {name: [text] for name, text in zip(["unsteered", *edits], texts)}
    else:
        answers = {"unsteered": generate_answers(model, questions, max_new_tokens=max_new_tokens,
                                                 repetition_penalty=1.0)}
        for name, edit in edits.items():
            answers[name] = generate_answers(model, questions, edit, max_new_tokens=max_new_tokens,
                                             repetition_penalty=1.0)
    return [Generation(question, {name: texts[index] for name, texts in answers.items()})
            for index, question in enumerate(questions)]


def _can_write_png() -> bool:
    import shutil

    if any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "chrome")):
        return True
    print("note: no Chromium found, so figures are written as HTML only (apt-get install chromium for PNGs)")
    return False


def _find_data(data_dir: str | Path | None) -> Path | None:
    """The shared data folder with personalitybench/ (argument, $DPN_LENS_DATA or a nearby shared/data), or None."""
    from dpn_lens.data.contrastive import find_data_dir, resolve_data_dir

    try:
        return resolve_data_dir(data_dir, "personalitybench").parent if data_dir is not None \
            else find_data_dir("personalitybench")
    except FileNotFoundError:
        return None


class StageClock:
    """Wall seconds per named stage, summed over repeats (the demo's "where the time goes").

    Example:
        >>> clock = StageClock()
        >>> with clock.stage("load"):
        ...     pass
        >>> list(clock.seconds)
        ['load']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def describe(self) -> str:
        return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.seconds.items())


@dataclass(frozen=True)
class CalibratedEdit:
    """One edit the demo shows: whose neurons, which direction, at which gamma (and how it was found)."""

    neurons: str
    direction: str
    gamma: float
    edit: Edit
    calibration: Calibration | None = None


def preference_check(model: Any, trait: str, edits: Sequence[CalibratedEdit], data_dir: Path, n_pairs: int,
                     clock: "StageClock | None" = None) -> list[ShiftRow]:
    """The demo's evidence for one trait: a ``ShiftRow`` per edit, then the persona prompt's.

    Pairs are the model's own answers under held-out PersonalityBench personas (cached per model, as in
    ``dpn-lens control``); the shift is signed by the direction (positive = moved as asked), with a 95%
    bootstrap interval over pairs.
    """
    from dpn_lens.evaluation.control import ControlConfig, held_out_pairs, persona_control
    from dpn_lens.evaluation.metrics import PreferenceMargin

    clock = StageClock() if clock is None else clock
    with clock.stage("preference pairs"):
        # 64 prompts at a time: faster on a CPU than control's 16 (its own cache entry: the batch can change
        # a bfloat16 greedy answer).
        held = held_out_pairs(model, trait, ControlConfig(traits=[trait], data_dir=str(data_dir), pairs=n_pairs,
                                                          pair_batch=DEMO_GENERATION_BATCH), log=lambda message: None)
    with clock.stage("preference margins"):
        margin = PreferenceMargin()
        base, _, _, persona = persona_control(model, held, margin)
        return _shift_rows(trait, lambda edit: margin.score(model, edit, held.pairs).per_item, len(held.pairs),
                           base, persona, edits)


def _shift_rows(trait: str, margins_of: Callable[[Any], Any], n_pairs: int, base: Any, persona: Any,
                edits: Sequence[CalibratedEdit]) -> list[ShiftRow]:
    """A ``ShiftRow`` per edit (``margins_of(edit)``: the pairs' margins under it), then the persona prompt's."""
    from dpn_lens.evaluation.intervals import paired_effect
    from dpn_lens.steering import direction_sign

    rows = []
    for item in edits:
        sign = direction_sign(item.direction)
        effect = paired_effect(sign * margins_of(item.edit), sign * base)
        rows.append(ShiftRow(trait, item.neurons, item.direction, item.gamma, n_pairs, Shift.of(effect),
                             item.calibration))
    return rows + [ShiftRow(trait, PERSONA, "", None, n_pairs, Shift.of(persona))]


def _calibrated_edits(model: Any, neuron_map: Any, gamma: float | None, target_kl: float, probe: Any,
                      clock: StageClock, neurons: str) -> list[CalibratedEdit]:
    """Per direction: the gamma (calibrated to ``target_kl`` unless fixed), the edit and what the calibration said."""
    from dpn_lens.evaluation.calibrate import calibrate_directions

    if gamma is None:
        with clock.stage("calibration"):
            calibrations = calibrate_directions(model, target_kl, neuron_map=neuron_map, probe=probe)
        gammas = {direction: calibration.gamma for direction, calibration in calibrations.items()}
    else:
        gammas, calibrations = {"increase": gamma, "decrease": gamma}, {}
    return [CalibratedEdit(neurons, direction, value,
                           steering_intervention(neuron_map, gamma=value, direction=direction),
                           calibrations.get(direction)) for direction, value in gammas.items()]


def _evidence_lines(trait: str, rows: Sequence[ShiftRow]) -> list[str]:
    """The summary's lines of one trait: each map's shifts per direction, then the persona prompt's."""
    return [f"- **{trait}** ({rows[0].n_pairs} pairs):"] + ["  " + row.line().strip() for row in rows]


def run_demo(model_name: str = "smollm2-135m-instruct", out: str | Path = "runs/demo",
             figures: str | Path | None = None, n_pairs: int | None = None, gamma: float | None = None,
             max_new_tokens: int = 40, traits: Sequence[str] = TRAITS, dtype: str = DEMO_DTYPE,
             device: str | None = None, overwrite: bool = False, target_kl: float = DEMO_TARGET_KL,
             eval_pairs: int = DEMO_EVAL_PAIRS, data_dir: str | Path | None = None, rule: str | None = DEMO_RULE,
             selection_pairs: int = DEMO_SELECTION_PAIRS) -> dict[str, Any]:
    """Run the demo; returns the summary that is also written to ``out/summary.json``.

    ``gamma=None`` (default) calibrates gamma per trait, map and direction to ``target_kl``; a number fixes it.
    ``rule`` names the effect rule shown beside the paper's neurons (None: the paper's neurons only); its
    maps are selected from ``selection_pairs`` of the model's own answers to embedded training questions.
    The preference check runs when the PersonalityBench data is found (``data_dir``, ``$DPN_LENS_DATA``
    or a ``shared/data`` folder near the working directory) and ``eval_pairs`` > 0.

    The figures go to ``figures`` (default ``out/figures``), inside the run folder: the repository's
    ``figures/`` changes only through ``dpn-lens study all --run runs/demo --out figures``. ``out`` is a run
    folder (``dpn_lens.run``): one with a run of other settings is refused unless ``overwrite``.
    """
    from dpn_lens.evaluation.calibrate import KLProbe, probe_chunks
    from dpn_lens.models import load_model
    from dpn_lens.pipeline import LocateConfig, locate_traits, neuron_table
    from dpn_lens.studies.outputs import layers_study

    started, clock = time.perf_counter(), StageClock()
    n_pairs = DEMO_PAIRS if n_pairs is None else n_pairs
    out = Path(out)
    figures = out / "figures" if figures is None else Path(figures)
    data = _find_data(data_dir) if eval_pairs > 0 else None
    strength = f"gamma calibrated to KL {target_kl:g}" if gamma is None else f"gamma {gamma:g}"
    shown = f"; the paper's neurons beside the {rule} rule's" if rule else ""
    print(f"dpn-lens demo: {model_name} ({dtype}), {len(traits)} traits x {n_pairs} embedded pairs, {strength}{shown}")
    if data is None and eval_pairs > 0:
        print("note: no PersonalityBench data found (--data-dir or $DPN_LENS_DATA), so the preference check is skipped")
    with clock.stage("load"):
        model = load_model(model_name, dtype=dtype, device=device)
    n_neurons = model.cfg.n_layers * model.cfg.d_mlp
    print(f"loaded in {time.perf_counter() - started:.0f} s: {model.cfg.n_layers} layers x d_mlp {model.cfg.d_mlp} "
          f"= {n_neurons} MLP neurons\n")
    config = LocateConfig(list(traits), source="embedded", n_pairs=n_pairs, select=["dpn-le"] + ([rule] if rule else []),
                          selection_pairs=selection_pairs, selection_tokens=DEMO_SELECTION_TOKENS,
                          selection_batch=DEMO_GENERATION_BATCH)
    with clock.stage("locate"):
        run = locate_traits(model, config, out=out, overwrite=overwrite)
    located = time.perf_counter()
    table = neuron_table(run.maps)
    print("\nSelected neurons per layer (trait high/low), with the share of neurons edited:\n" + table + "\n")

    with clock.stage("calibration"):
        probe = KLProbe(model, probe_chunks(model)) if gamma is None else None
    generations: dict[str, list[Generation]] = {}
    evidence: dict[str, dict[str, Any]] = {}
    for trait, neuron_map in run.maps.items():
        rule_map = run.rule_maps.get(rule, {}).get(trait) if rule else None
        print(f"== {trait} (DPN-LE {neuron_map.n_selected()} neurons"
              + (f", {rule} {rule_map.n_selected()} neurons" if rule_map is not None else "") + ") ==")
        if neuron_map.n_selected() == 0:
            # steer() refuses an edit that changes nothing; say so instead of showing identical answers.
            generations[trait] = [Generation(DEMO_QUESTIONS[trait], note="no neurons selected (see the warning of "
                                             "locate): nothing to steer; run the demo with more --n-pairs")]
            print(generations[trait][0].text() + "\n")
            continue
        record: dict[str, Any] = {"trait": trait}
        shown = _calibrated_edits(model, neuron_map, gamma, target_kl, probe, clock, "DPN-LE")
        record["gamma"] = {item.direction: item.gamma for item in shown}
        if rule_map is not None:
            rule_edits = _calibrated_edits(model, rule_map, gamma, target_kl, probe, clock, rule)
            record["rules"] = {rule: {"gamma": {item.direction: item.gamma for item in rule_edits},
                                      "neurons": rule_map.n_selected()}}
            shown += rule_edits
        for item in shown:
            if item.calibration is not None:
                print(f"  {item.neurons} {item.direction}: {item.calibration.describe()}")
        if data is not None:
            rows = preference_check(model, trait, shown, data, eval_pairs, clock)
            record["shifts"] = [row.to_dict() for row in rows]
            print(f"  preference shift, nats/token, 95% CI over {rows[0].n_pairs} held-out pairs:")
            print("\n".join(row.line() for row in rows))
        # The answers are labelled as before: DPN-LE's by direction, a rule's as "<rule>-<direction>".
        named = {item.direction if item.neurons == "DPN-LE" else f"{item.neurons}-{item.direction}": item.edit
                 for item in shown}
        with clock.stage("example answers"):
            generations[trait] = compare_generations(model, [DEMO_QUESTIONS[trait]], named, max_new_tokens)
        evidence[trait] = record
        print("\n".join(g.text() for g in generations[trait]) + "\n")

    summary = run.summary_dict()
    # The layer-wise figures and tables are those of `dpn-lens study layers` (PNG needs Chromium).
    png = _can_write_png()
    with clock.stage("figures"):
        layers_study(run, figures, png=png, log=None)
    written = sorted(figures.glob("layers_*.html")) + (sorted(figures.glob("layers_*.png")) if png else [])
    summary.update({"gamma": gamma if gamma is not None else "calibrated", "target_kl": target_kl, "n_pairs": n_pairs,
                    "dtype": dtype, "rule": rule, "seconds_locate": round(located - started, 1),
                    "seconds_total": round(time.perf_counter() - started, 1),
                    "seconds_by_stage": {name: round(seconds, 1) for name, seconds in clock.seconds.items()},
                    "figures": [str(path) for path in written], "evidence": evidence,
                    "generations": {trait: [g.to_dict() for g in items] for trait, items in generations.items()}})
    write_json_atomic(out / SUMMARY_FILE, summary)
    lines = [f"# dpn-lens demo: {model_name}", "",
             f"{len(traits)} traits x {n_pairs} embedded contrastive pairs; {strength}; "
             f"{summary['seconds_total']:.0f} s in all.", "", "## Neurons per layer (DPN-LE)", "", table, "",
             "## Settings", ""]
    lines += [f"- {t}: layers {s['layers']}, q {s['q']}, tau_d {s['tau_d']} ({s['settings_source']}: "
              f"{s['settings_reason']})" for t, s in summary["traits"].items()]
    if rule:
        lines += [f"- {rule} (beside DPN-LE): " + ", ".join(
            f"{t} {m.n_selected()} neurons" for t, m in run.rule_maps.get(rule, {}).items())
            + f"; selected from {selection_pairs} selection pairs per trait (docs/METHOD.md, 'Selection by effect')"]
    lines += ["", "## Does the edit steer? (preference shift, nats/token, 95% CI; positive = moved as asked)", ""]
    if not any("shifts" in record for record in evidence.values()):
        lines += ["Not measured: no PersonalityBench data was found (pass --data-dir).", ""]
    for trait, record in evidence.items():
        if "shifts" in record:
            lines += _evidence_lines(trait, rows_of_record(record))
    lines += ["", "## Browse the neurons", "",
              f"`dpn-lens explore --run {out}{' --data-dir ' + str(data) if data is not None else ''}` writes "
              "[the neuron explorer](explorer/index.html): a card per neuron "
              "(what it reads, writes and does), the layer histogram and the overlap between traits.", ""]
    lines += ["", "## Unsteered vs steered answers (greedy)", ""]
    for trait, items in generations.items():
        lines += [f"### {trait}", "", "```", *(g.text() for g in items), "```", ""]
    write_text_atomic(out / SUMMARY_MD_FILE, "\n".join(lines))
    print(f"wrote {out}/summary.md, {out}/summary.json, maps and stats; {len(written)} figure files in {figures}/")
    print(f"demo finished in {summary['seconds_total']:.0f} s ({clock.describe()})")
    data_option = f" --data-dir {data}" if data is not None else ""
    print(f"browse the neurons: dpn-lens explore --run {out}{data_option}  (then open {out}/explorer/index.html)")
    return summary
