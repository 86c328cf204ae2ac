"""The main job: all five traits end to end on the embedded model, in minutes on a laptop CPU.

``dpn-lens demo`` locates each trait's neurons from the embedded contrastive data, saves the maps and
prints the neurons per trait, pole and layer. Per trait it then calibrates gamma (the strength at
which the edit reaches a KL of 0.05 nats/token from the unsteered model, ``calibrate_gamma``), measures
whether the edit moves the model's preference between a high- and a low-trait answer to held-out
questions (shift with a 95% interval, beside the persona prompt's own effect; needs the PersonalityBench
folder of the shared data), shows one unsteered, increased and decreased answer, and writes a summary
and plotly figures.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from dpn_lens.evaluation.judge import generate_answers
from dpn_lens.io import write_json_atomic, write_text_atomic
from dpn_lens.run import SUMMARY_FILE, SUMMARY_MD_FILE
from dpn_lens.steering import Edit, steering_intervention
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
                        max_new_tokens: int = 40) -> list[str]:
    """For each question: the unsteered answer, then one answer per named intervention.

    Each condition answers all the questions in one batched call (the answers of ``generate_answer``).
    """
    for question in questions:
        if not str(question).strip():
            raise ValueError("a question is empty or whitespace; pass the text of a question")
    answers = {"unsteered": generate_answers(model, questions, max_new_tokens=max_new_tokens, repetition_penalty=1.0)}
    for name, edit in edits.items():
        answers[name] = generate_answers(model, questions, edit, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
    return ["\n".join([f"Q: {question}"] + [f"  {name:>9}: {texts[index]}" for name, texts in answers.items()])
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


def preference_check(model: Any, trait: str, edits: Mapping[str, Edit], data_dir: Path, n_pairs: int,
                     clock: "StageClock | None" = None) -> dict[str, Any]:
    """The demo's evidence for one trait: the preference shift of each edit and the persona prompt's effect.

    Pairs are the model's own answers under held-out PersonalityBench personas (cached per model, as in
    ``dpn-lens control``); the shift is signed by the direction (positive = moved as asked), with a 95%
    bootstrap interval over pairs.
    """
    from dpn_lens.evaluation.control import ControlConfig, held_out_pairs, persona_control
    from dpn_lens.evaluation.preference import PairScorer

    clock = StageClock() if clock is None else clock
    with clock.stage("preference pairs"):
        held = held_out_pairs(model, trait, ControlConfig(traits=[trait], data_dir=str(data_dir), pairs=n_pairs),
                              log=lambda message: None)
    with clock.stage("preference margins"):
        scorer = PairScorer(model, held.pairs)
        base, _, _, persona = persona_control(model, held, scorer)
        result = _shifts(scorer, held, base, persona, edits)
    return result


def _shifts(scorer: Any, held: Any, base: Any, persona: Any, edits: Mapping[str, Edit]) -> dict[str, Any]:
    from dpn_lens.evaluation.intervals import paired_effect
    from dpn_lens.steering import direction_sign

    result: dict[str, Any] = {"n_pairs": len(held.pairs), "persona": _effect(persona)}
    for direction, edit in edits.items():
        sign = direction_sign(direction)
        steered = scorer.margins(edit=edit)
        result[direction] = _effect(paired_effect(sign * steered, sign * base))
    return result


def _effect(effect: Any) -> dict[str, float]:
    return {"shift": effect.shift, "ci_low": effect.ci_low, "ci_high": effect.ci_high, "p": effect.p_value}


def _effect_line(name: str, effect: Mapping[str, float]) -> str:
    from dpn_lens.evaluation.intervals import shift_verdict

    verdict = shift_verdict(effect["ci_low"], effect["ci_high"])
    return (f"  {name:<26} {effect['shift']:+.3f} [{effect['ci_low']:+.3f}, {effect['ci_high']:+.3f}]  "
            f"p={effect['p']:.2g}  {verdict}")


def run_demo(model_name: str = "smollm2-135m-instruct", out: str | Path = "runs/demo",
             figures: str | Path | None = None, n_pairs: int | None = None, gamma: float | None = None,
             max_new_tokens: int = 40, traits: Sequence[str] = TRAITS, dtype: str = DEMO_DTYPE,
             device: str | None = None, overwrite: bool = False, target_kl: float = DEMO_TARGET_KL,
             eval_pairs: int = DEMO_EVAL_PAIRS, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary that is also written to ``out/summary.json``.

    ``gamma=None`` (default) calibrates gamma per trait and direction to ``target_kl``; a number fixes it.
    The preference check runs when the PersonalityBench data is found (``data_dir``, ``$DPN_LENS_DATA``
    or a ``shared/data`` folder near the working directory) and ``eval_pairs`` > 0.

    The figures go to ``figures`` (default ``out/figures``), inside the run folder: the repository's
    ``figures/`` changes only through ``dpn-lens study all --run runs/demo --out figures``. ``out`` is a run
    folder (``dpn_lens.run``): one with a run of other settings is refused unless ``overwrite``.
    """
    from dpn_lens.evaluation.calibrate import KLProbe, calibrate_gamma, probe_chunks
    from dpn_lens.models import load_model
    from dpn_lens.pipeline import LocateConfig, locate_traits, neuron_table
    from dpn_lens.studies.outputs import layers_study

    started, clock = time.perf_counter(), StageClock()
    n_pairs = DEMO_PAIRS if n_pairs is None else n_pairs
    out = Path(out)
    figures = out / "figures" if figures is None else Path(figures)
    data = _find_data(data_dir) if eval_pairs > 0 else None
    strength = f"gamma calibrated to KL {target_kl:g}" if gamma is None else f"gamma {gamma:g}"
    print(f"dpn-lens demo: {model_name} ({dtype}), {len(traits)} traits x {n_pairs} embedded pairs, {strength}")
    if data is None and eval_pairs > 0:
        print("note: no PersonalityBench data found (--data-dir or $DPN_LENS_DATA), so the preference check is skipped")
    with clock.stage("load"):
        model = load_model(model_name, dtype=dtype, device=device)
    n_neurons = model.cfg.n_layers * model.cfg.d_mlp
    print(f"loaded in {time.perf_counter() - started:.0f} s: {model.cfg.n_layers} layers x d_mlp {model.cfg.d_mlp} "
          f"= {n_neurons} MLP neurons\n")
    with clock.stage("locate"):
        run = locate_traits(model, LocateConfig(list(traits), source="embedded", n_pairs=n_pairs), out=out,
                            overwrite=overwrite)
    located = time.perf_counter()
    table = neuron_table(run.maps)
    print("\nSelected neurons per layer (trait high/low), with the share of neurons edited:\n" + table + "\n")

    with clock.stage("calibration"):
        probe = KLProbe(model, probe_chunks(model)) if gamma is None else None
    generations: dict[str, list[str]] = {}
    evidence: dict[str, dict[str, Any]] = {}
    for trait, neuron_map in run.maps.items():
        print(f"== {trait} ({neuron_map.n_selected()} neurons) ==")
        if neuron_map.n_selected() == 0:
            # steer() refuses an edit that changes nothing; say so instead of showing identical answers.
            generations[trait] = [f"Q: {DEMO_QUESTIONS[trait]}\n  no neurons selected (see the warning of locate): "
                                  "nothing to steer; run the demo with more --n-pairs"]
            print(generations[trait][0] + "\n")
            continue
        gammas: dict[str, float] = {}
        record: dict[str, Any] = {}
        for direction in ("increase", "decrease"):
            if gamma is None:
                with clock.stage("calibration"):
                    calibration = calibrate_gamma(model, neuron_map, target_kl=target_kl, probe=probe,
                                                  direction=direction)
                gammas[direction] = calibration.gamma
                record[f"{direction}_calibration"] = calibration.describe()
                print(f"  {direction}: {calibration.describe()}")
            else:
                gammas[direction] = gamma
        edits = {direction: steering_intervention(neuron_map, gamma=value, direction=direction)
                 for direction, value in gammas.items()}
        record["gamma"] = gammas
        if data is not None:
            check = preference_check(model, trait, edits, data, eval_pairs, clock)
            record["preference"] = check
            print(f"  preference shift, nats/token, 95% CI over {check['n_pairs']} held-out pairs:")
            for direction in ("increase", "decrease"):
                print(_effect_line(f"{direction} (gamma {gammas[direction]:.3g})", check[direction]))
            print(_effect_line("persona prompt (high-low)/2", check["persona"]))
        with clock.stage("example answers"):
            generations[trait] = compare_generations(model, [DEMO_QUESTIONS[trait]], edits, max_new_tokens)
        evidence[trait] = record
        print("\n".join(generations[trait]) + "\n")

    summary = run.summary_dict()
    # The layer-wise figures and tables are those of `dpn-lens study layers` (PNG needs Chromium).
    png = _can_write_png()
    with clock.stage("figures"):
        layers_study(run, figures, png=png, log=None)
    written = sorted(figures.glob("layers_*.html")) + (sorted(figures.glob("layers_*.png")) if png else [])
    summary.update({"gamma": gamma if gamma is not None else "calibrated", "target_kl": target_kl, "n_pairs": n_pairs,
                    "dtype": dtype, "seconds_locate": round(located - started, 1),
                    "seconds_total": round(time.perf_counter() - started, 1),
                    "seconds_by_stage": {name: round(seconds, 1) for name, seconds in clock.seconds.items()},
                    "figures": [str(path) for path in written], "generations": generations, "evidence": evidence})
    write_json_atomic(out / SUMMARY_FILE, summary)
    lines = [f"# dpn-lens demo: {model_name}", "",
             f"{len(traits)} traits x {n_pairs} embedded contrastive pairs; {strength}; "
             f"{summary['seconds_total']:.0f} s in all.", "", "## Neurons per layer", "", table, "",
             "## Settings", ""]
    lines += [f"- {t}: layers {s['layers']}, q {s['q']}, tau_d {s['tau_d']} ({s['settings_source']}: "
              f"{s['settings_reason']})" for t, s in summary["traits"].items()]
    lines += ["", "## Does the edit steer? (preference shift, nats/token, 95% CI; positive = moved as asked)", ""]
    if not any("preference" in record for record in evidence.values()):
        lines += ["Not measured: no PersonalityBench data was found (pass --data-dir).", ""]
    for trait, record in evidence.items():
        if "preference" in record:
            check = record["preference"]
            lines += [f"- **{trait}** ({check['n_pairs']} pairs):"] + [
                "  " + _effect_line(name, check[key]).strip() for name, key in
                ((f"increase, gamma {record['gamma']['increase']:.3g}", "increase"),
                 (f"decrease, gamma {record['gamma']['decrease']:.3g}", "decrease"), ("persona prompt", "persona"))]
    lines += ["", "## Unsteered vs steered answers (greedy)", ""]
    for trait, blocks in generations.items():
        lines += [f"### {trait}", "", "```", *blocks, "```", ""]
    write_text_atomic(out / SUMMARY_MD_FILE, "\n".join(lines))
    print(f"wrote {out}/summary.md, {out}/summary.json, maps and stats; {len(written)} figure files in {figures}/")
    print(f"demo finished in {summary['seconds_total']:.0f} s ({clock.describe()})")
    return summary
