"""Probe dpn-lens with the inputs people really pass, and classify each answer (issue 24).

    python scripts/probe_inputs.py                          # the installed / checked-out dpn_lens
    PYTHONPATH=/path/to/old/checkout python scripts/probe_inputs.py    # the same probes on another version

Each probe is one call (Python API or command line, on a tiny random model built on the fly) with one
mistake or one unusual-but-valid value. The answer is classified as:

* ``works``: a valid value (a numpy gamma) was accepted and gave the same result as a Python number;
* ``refused``: a valid value was refused;
* ``clear``: refused at once with a message that names the problem and the fix (its expected words);
* ``clear late``: the same, but only after the model loaded;
* ``misleading``: refused with a wrong diagnosis (e.g. "corrupted" for a good file of the wrong kind);
* ``traceback``: an exception type a user should not see (TypeError, KeyError, ...);
* ``silent``: no error where one was due, or a different result.

Prints a Markdown table, one row per probe.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def _tiny_run(folder: Path) -> tuple[Path, Path]:
    """A tiny Hugging Face folder and a run folder located on it (maps, stats)."""
    from dpn_lens.cli import main
    from dpn_lens.tiny import build_tiny_hf_model

    model_folder = folder / "tiny_hf"
    hf_model, _ = build_tiny_hf_model(model_folder, n_layers=3, max_positions=512)
    hf_model.save_pretrained(model_folder)
    run = folder / "run"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["locate", "--model", str(model_folder), "--dtype", "float32", "--traits", "openness",
                     "--n-pairs", "8", "--layers", "0-2", "--q", "0.8", "--tau-d", "0.1", "--out", str(run),
                     "--no-progress"]) == 0
    return model_folder, run


def _cli(argv: list[str]) -> tuple[int, str]:
    from dpn_lens.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    return code, err.getvalue()


def classify_call(call: Callable[[], Any], expect: list[str] | None, same_as: Callable[[], Any] | None = None) -> tuple[str, str]:
    """Run ``call``; ``expect`` None means it should work (and equal ``same_as()``), else the words a clear
    refusal contains."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = call()
    except (ValueError, FileNotFoundError) as error:
        text = str(error)
        if expect is None:
            return "refused", text
        if "corrupt" in text.lower() and not any("corrupt" in e for e in expect):
            return "misleading", text
        return ("clear" if all(word.lower() in text.lower() for word in expect) else "misleading"), text
    except Exception as error:   # noqa: BLE001 - what the user would see
        return "traceback", f"{type(error).__name__}: {error}"
    if expect is not None:
        return "silent", "accepted"
    if same_as is not None:
        expected = same_as()
        equal = all(torch.equal(result.deltas[k], expected.deltas[k]) for k in expected.deltas) \
            if hasattr(expected, "deltas") else result == expected
        return ("works" if equal else "silent"), "same result as a Python number" if equal else "different result"
    return "works", "accepted"


def classify_cli(argv: list[str], expect: list[str], loaded: Callable[[], bool]) -> tuple[str, str]:
    code, err = _cli(argv)
    line = err.strip().splitlines()[-1] if err.strip() else ""
    if code == 0:
        return "silent", "exit 0"
    if "Traceback" in err:
        return "traceback", line
    if "corrupt" in line.lower() and not any("corrupt" in e for e in expect):
        return "misleading", line
    if not all(word.lower() in line.lower() for word in expect):
        return "misleading", line
    return ("clear late" if loaded() else "clear"), line


def probes(model_folder: Path, run: Path, scratch: Path) -> list[tuple[str, Callable[[], tuple[str, str]]]]:
    import dpn_lens
    import dpn_lens.cli.app as cli
    from dpn_lens import ContrastStatistics, NeuronMap, steering_intervention
    from dpn_lens.localization.localize import reselect
    from dpn_lens.localization.settings import LocalizationSettings

    map_file = run / "maps" / "openness.safetensors"
    stats_file = run / "stats" / "openness.safetensors"
    neuron_map = NeuronMap.load(map_file)
    empty = scratch / "empty.safetensors"
    empty.write_bytes(b"")
    from dpn_lens.tiny import build_tiny_hf_model

    other_shape = scratch / "other_model"              # a real model (weights too) with two more layers
    other_model, _ = build_tiny_hf_model(other_shape, n_layers=5, max_positions=512)
    other_model.save_pretrained(other_shape)
    loads: list[str] = []
    original_load = cli._load

    def counting_load(args: Any) -> Any:
        loads.append(args.model)
        return original_load(args)

    cli._load = counting_load
    import dpn_lens.cli.export as export_cli

    original_export_load = export_cli._load

    def counting_export_load(args: Any) -> Any:
        loads.append(args.model)
        return original_export_load(args)

    export_cli._load = counting_export_load

    def loaded() -> bool:
        was = bool(loads)
        loads.clear()
        return was

    S, D = torch.tensor([0.0, 2.0, -3.0, 0.1]), torch.tensor([0.0, 1.0, -2.0, 0.1])
    persona = scratch / "persona_data"
    (persona / "anthropic_persona").mkdir(parents=True)
    (persona / "anthropic_persona" / "openness.jsonl").write_text("\n".join(
        f'{{"statement": "I like new ideas {i}", "answer_matching_behavior": "{a}", "answer_not_matching_behavior": "{b}"}}'
        for i in range(4) for a, b in ((" Yes", " No"), (" No", " Yes"))))

    def edit(gamma: Any) -> Any:
        return steering_intervention(neuron_map, gamma=gamma)

    steer = ["steer", "--model", str(model_folder), "--dtype", "float32", "--prompt", "what would you do ?",
             "--max-new-tokens", "2"]
    return [
        ("gamma=np.float32(1.0)", lambda: classify_call(lambda: edit(np.float32(1.0)), None, lambda: edit(1.0))),
        ("gamma=np.float64(0.5) (a pandas cell)", lambda: classify_call(lambda: edit(np.float64(0.5)), None, lambda: edit(0.5))),
        ("gamma=torch.tensor(2.0)", lambda: classify_call(lambda: edit(torch.tensor(2.0)), None, lambda: edit(2.0))),
        ("gamma=True", lambda: classify_call(lambda: edit(True), ["gamma", "number"])),
        ("gamma='1.0'", lambda: classify_call(lambda: edit("1.0"), ["gamma", "number"])),
        ("gamma=np.array([1.0, 2.0])", lambda: classify_call(lambda: edit(np.array([1.0, 2.0])), ["gamma", "number"])),
        ("gamma=float('nan')", lambda: classify_call(lambda: edit(float("nan")), ["gamma", "finite"])),
        ("gamma=-2.0, direction='increase'", lambda: classify_call(
            lambda: steering_intervention(neuron_map, gamma=-2.0, direction="increase"), ["decrease"])),
        ("reselect(map, q='0.99')", lambda: classify_call(lambda: reselect(neuron_map, q="0.99"), ["q"])),
        ("reselect(map, q=np.float64(0.9))", lambda: classify_call(
            lambda: reselect(neuron_map, q=np.float64(0.9)).n_selected(), None,
            lambda: reselect(neuron_map, q=0.9).n_selected())),
        ("LocalizationSettings(tau_d=nan)", lambda: classify_call(
            lambda: LocalizationSettings([1], q=0.99, tau_d=float("nan")), ["tau_d"])),
        ("NeuronMap.load(<the .json sidecar>)", lambda: classify_call(
            lambda: NeuronMap.load(run / "maps" / "openness.json"), ["openness.safetensors"])),
        ("NeuronMap.load(<a statistics file>)", lambda: classify_call(lambda: NeuronMap.load(stats_file), ["statistics"])),
        ("ContrastStatistics.load(<a map>)", lambda: classify_call(lambda: ContrastStatistics.load(map_file), ["map"])),
        ("NeuronMap.load(<the run folder>)", lambda: classify_call(lambda: NeuronMap.load(run), ["maps/openness"])),
        ("NeuronMap.load(<the maps/ folder>)", lambda: classify_call(lambda: NeuronMap.load(run / "maps"), ["folder"])),
        ("ContrastStatistics.load(<the run folder>)", lambda: classify_call(lambda: ContrastStatistics.load(run), ["stats/"])),
        ("NeuronMap.load(<an empty file>)", lambda: classify_call(lambda: NeuronMap.load(empty), ["empty"])),
        ("dpn-lens steer --map <the .json sidecar>", lambda: classify_cli(
            steer + ["--gamma", "1", "--map", str(run / "maps" / "openness.json")], ["openness.safetensors"], loaded)),
        ("dpn-lens steer --gamma -1", lambda: classify_cli(steer + ["--gamma", "-1", "--map", str(map_file)],
                                                          ["decrease"], loaded)),
        ("dpn-lens steer --map M --model <other shape>", lambda: classify_cli(
            ["steer", "--model", str(other_shape), "--prompt", "hi", "--gamma", "1", "--map", str(map_file)],
            ["n_layers"], loaded)),
        ("dpn-lens export --gamma -1 --direction increase", lambda: classify_cli(
            ["export", "--model", str(model_folder), "--map", str(map_file), "--gamma", "-1", "--direction", "increase",
             "--format", "gguf", "--out", str(scratch / "x.gguf")], ["decrease"], loaded)),
        ("locate(stats, tau_d=[0.5])", lambda: classify_call(
            lambda: dpn_lens.locate(ContrastStatistics.load(stats_file), tau_d=[0.5]), ["tau_d"])),
        ("LocateConfig(n_pairs='100')", lambda: classify_call(
            lambda: dpn_lens.LocateConfig(n_pairs="100"), ["n_pairs"])),
        ("select_neurons(s, d, q=np.float32(0.5), tau_d=0.5)", lambda: classify_call(
            lambda: [t.tolist() for t in dpn_lens.select_neurons(S, D, q=np.float32(0.5), tau_d=0.5)[:2]],
            None, lambda: [t.tolist() for t in dpn_lens.select_neurons(S, D, q=0.5, tau_d=0.5)[:2]])),
        ("anthropic_persona_contrastive_set(seed=np.float64(3))", lambda: classify_call(
            lambda: dpn_lens.anthropic_persona_contrastive_set(persona, "openness", 2, seed=np.float64(3)).high,
            None, lambda: dpn_lens.anthropic_persona_contrastive_set(persona, "openness", 2, seed=3).high)),
        ("dpn-lens steer --map <stats file>", lambda: classify_cli(steer + ["--gamma", "1", "--map", str(stats_file)],
                                                                   ["statistics"], loaded)),
    ]


def main() -> int:
    import dpn_lens

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        os.environ["DPN_LENS_CACHE"] = str(scratch / "cache")
        model_folder, run = _tiny_run(scratch)
        rows = []
        for name, probe in probes(model_folder, run, scratch):
            verdict, message = probe()
            rows.append((name, verdict, message.replace("|", "/").replace("\n", " ")[:150]))
    print(f"dpn_lens {dpn_lens.__version__} from {Path(dpn_lens.__file__).parent}")
    print("| probe | answer | message |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    counts = {v: sum(r[1] == v for r in rows)
              for v in ("works", "refused", "clear", "clear late", "misleading", "traceback", "silent")}
    print("\n" + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
