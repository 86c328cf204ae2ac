"""The main job: all five traits end to end on the embedded model, in minutes on a laptop CPU.

``dpn-lens demo`` locates each trait's neurons from the embedded contrastive data, saves the maps,
prints the neurons per trait, pole and layer, shows unsteered vs increased vs decreased answers, and
writes a summary and plotly figures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from dpn_lens.evaluation.judge import generate_answers
from dpn_lens.io import write_json_atomic, write_text_atomic
from dpn_lens.run import SUMMARY_FILE, SUMMARY_MD_FILE
from dpn_lens.steering import Edit, steer, steering_intervention
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
# 10-minute budget on 2 cores. gamma 1.0 is the paper's value for generation.
DEMO_PAIRS = 500
DEMO_GAMMA = 1.0
DEMO_DTYPE = "bfloat16"


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
    """For each question: the unsteered answer, then one answer per named intervention."""
    blocks = []
    for question in questions:
        lines = [f"Q: {question}", f"  unsteered: {generate_answer(model, question, max_new_tokens)}"]
        for name, edit in edits.items():
            with steer(model, edit):
                lines.append(f"  {name:>9}: {generate_answer(model, question, max_new_tokens)}")
        blocks.append("\n".join(lines))
    return blocks


def _can_write_png() -> bool:
    import shutil

    if any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "chrome")):
        return True
    print("note: no Chromium found, so figures are written as HTML only (apt-get install chromium for PNGs)")
    return False


def run_demo(model_name: str = "smollm2-135m-instruct", out: str | Path = "runs/demo",
             figures: str | Path | None = None, n_pairs: int | None = None, gamma: float | None = None,
             max_new_tokens: int = 40, traits: Sequence[str] = TRAITS, dtype: str = DEMO_DTYPE,
             device: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run the demo; returns the summary that is also written to ``out/summary.json``.

    The figures go to ``figures`` (default ``out/figures``), inside the run folder: the repository's
    ``figures/`` changes only through ``dpn-lens study all --run runs/demo --out figures``. ``out`` is a run
    folder (``dpn_lens.run``): one with a run of other settings is refused unless ``overwrite``.
    """
    from dpn_lens.models import load_model
    from dpn_lens.pipeline import LocateConfig, locate_traits, neuron_table
    from dpn_lens.studies.outputs import layers_study

    started = time.perf_counter()
    n_pairs = DEMO_PAIRS if n_pairs is None else n_pairs
    gamma = DEMO_GAMMA if gamma is None else gamma
    out = Path(out)
    figures = out / "figures" if figures is None else Path(figures)
    print(f"dpn-lens demo: {model_name} ({dtype}), {len(traits)} traits x {n_pairs} embedded pairs, gamma {gamma}")
    model = load_model(model_name, dtype=dtype, device=device)
    n_neurons = model.cfg.n_layers * model.cfg.d_mlp
    print(f"loaded in {time.perf_counter() - started:.0f} s: {model.cfg.n_layers} layers x d_mlp {model.cfg.d_mlp} "
          f"= {n_neurons} MLP neurons\n")
    run = locate_traits(model, LocateConfig(list(traits), source="embedded", n_pairs=n_pairs), out=out,
                        overwrite=overwrite)
    located = time.perf_counter()
    table = neuron_table(run.maps)
    print("\nSelected neurons per layer (trait high/low), with the share of neurons edited:\n" + table + "\n")

    generations: dict[str, list[str]] = {}
    for trait, neuron_map in run.maps.items():
        print(f"== {trait} ({neuron_map.n_selected()} neurons, gamma {gamma}) ==")
        if neuron_map.n_selected() == 0:
            # steer() refuses an edit that changes nothing; say so instead of showing identical answers.
            generations[trait] = [f"Q: {DEMO_QUESTIONS[trait]}\n  no neurons selected (see the warning of locate): "
                                  "nothing to steer; run the demo with more --n-pairs"]
        else:
            edits = {direction: steering_intervention(neuron_map, gamma=gamma, direction=direction)
                     for direction in ("increase", "decrease")}
            generations[trait] = compare_generations(model, [DEMO_QUESTIONS[trait]], edits, max_new_tokens)
        print("\n".join(generations[trait]) + "\n")

    summary = run.summary_dict()
    # The layer-wise figures and tables are those of `dpn-lens study layers` (PNG needs Chromium).
    png = _can_write_png()
    layers_study(run, figures, png=png, log=None)
    written = sorted(figures.glob("layers_*.html")) + (sorted(figures.glob("layers_*.png")) if png else [])
    summary.update({"gamma": gamma, "n_pairs": n_pairs, "dtype": dtype, "seconds_locate": round(located - started, 1),
                    "seconds_total": round(time.perf_counter() - started, 1),
                    "figures": [str(path) for path in written], "generations": generations})
    write_json_atomic(out / SUMMARY_FILE, summary)
    lines = [f"# dpn-lens demo: {model_name}", "",
             f"{len(traits)} traits x {n_pairs} embedded contrastive pairs; gamma {gamma}; "
             f"{summary['seconds_total']:.0f} s in all.", "", "## Neurons per layer", "", table, "",
             "## Settings", ""]
    lines += [f"- {t}: layers {s['layers']}, q {s['q']}, tau_d {s['tau_d']} ({s['settings_source']}: "
              f"{s['settings_reason']})" for t, s in summary["traits"].items()]
    lines += ["", "## Unsteered vs steered answers (greedy)", ""]
    for trait, blocks in generations.items():
        lines += [f"### {trait}", "", "```", *blocks, "```", ""]
    write_text_atomic(out / SUMMARY_MD_FILE, "\n".join(lines))
    print(f"wrote {out}/summary.md, {out}/summary.json, maps and stats; {len(written)} figure files in {figures}/")
    print(f"demo finished in {summary['seconds_total']:.0f} s")
    return summary
