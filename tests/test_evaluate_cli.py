"""``dpn-lens evaluate``: one command over both evaluation runs, and ``control``/``compare`` as its parts."""

from __future__ import annotations

import argparse
import json
import shlex

import pytest

from dpn_lens.cli import main
from dpn_lens.cli.app import build_parser
from dpn_lens.cli.evaluate import route
from dpn_lens.cli.reference import verb_parsers
from dpn_lens.evaluation.control_record import ControlRecord, load_control_record
from dpn_lens.evaluation.table import control_rows, read_result_table


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_evaluate_takes_every_option_of_control_and_compare_under_the_same_spelling():
    verbs = verb_parsers()
    evaluate = _options(verbs["evaluate"])
    assert _options(verbs["control"]) | _options(verbs["compare"]) | {"--metrics"} == evaluate


def test_each_option_goes_to_the_runs_that_have_it():
    both = route(["--metrics", "preference,capability", "--traits", "openness", "--seed", "3", "--gamma", "2",
                  "--methods", "dpn-le,caa", "--out", "x"])
    assert both == [("control", ["control", "--traits", "openness", "--seed", "3", "--methods", "dpn-le,caa", "--out", "x"]),
                    ("compare", ["compare", "--traits", "openness", "--seed", "3", "--gamma", "2", "--methods", "dpn-le,caa",
                                 "--out", "x"])]
    # a routed command line parses as the command itself would
    direct = build_parser().parse_args(["control", "--traits", "openness", "--seed", "3", "--methods", "dpn-le,caa",
                                        "--out", "x"])
    routed = build_parser().parse_args(both[0][1])
    assert vars(routed) == vars(direct)


def test_generation_metric_asks_for_the_generation_check_and_its_options_need_it():
    assert route(["--metrics", "preference,generation", "--out", "x"])[0][1][-2:] == ["--generation", "20"]
    assert route(["--metrics", "generation", "--generation", "8", "--out", "x"])[0][1] == \
        ["control", "--generation", "8", "--out", "x"]
    with pytest.raises(ValueError, match="add generation to --metrics"):
        route(["--generation", "8", "--out", "x"])


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "preference", "--gamma-sweep", "0,1", "--out", "x"], "--gamma-sweep applies to the metrics questionnaire"),
    (["--metrics", "capability", "--kl-levels", "0.05", "--out", "x"], "--kl-levels applies to the metrics preference,generation"),
    (["--metrics", "capability", "--judge-url", "http://localhost:1/v1", "--out", "x"], "add judge to --metrics"),
])
def test_an_option_no_chosen_metric_uses_is_refused_by_name(argv, message):
    with pytest.raises(ValueError, match=message):
        route(argv)


def test_the_judge_metric_without_an_endpoint_is_refused(monkeypatch):
    monkeypatch.delenv("DPN_LENS_JUDGE_URL", raising=False)
    with pytest.raises(ValueError, match="--judge-url"):
        route(["--metrics", "judge", "--out", "x"])


def test_an_unknown_metric_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--metrics", "vibes", "--out", "x"])
    assert "vibes" in capsys.readouterr().err


def test_control_prints_the_evaluate_command_that_runs_the_same_and_it_does(tiny_folder, tmp_path, monkeypatch, capsys):
    """``control`` names its ``evaluate`` command; that command, run as printed, gives the same numbers and
    a results.csv with the run's long rows."""
    from dpn_lens.models import load_model
    from helpers import write_personalitybench
    from test_control import tiny_map

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    maps = tmp_path / "maps"
    maps.mkdir()
    tiny_map(load_model(str(tiny_folder)), "openness").save(maps / "openness.safetensors")
    options = ["--model", str(tiny_folder), "--dtype", "float32", "--data-dir", str(data), "--run", str(maps),
               "--traits", "openness", "--methods", "dpn-le,caa", "--eval-pairs", "8", "--gammas", "0.125,0.5,2",
               "--kl-levels", "0.005", "--target-kl", "0.005", "--random-draws", "2", "--no-png", "--no-progress"]
    assert main(["control", *options, "--out", str(tmp_path / "control")]) == 0, capsys.readouterr().err
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note:"))
    printed = shlex.split(note.split("the same run: ", 1)[1])
    assert printed[:4] == ["dpn-lens", "evaluate", "--metrics", "preference"]
    printed[printed.index("--out") + 1] = str(tmp_path / "evaluate")
    assert main(printed[1:]) == 0, capsys.readouterr().err
    assert "note:" not in capsys.readouterr().out          # evaluate runs control without the note
    first, second = (json.loads((tmp_path / name / "control.json").read_text()) for name in ("control", "evaluate"))
    for key in ("validation", "calibrated", "matched_cost", "goal"):
        assert second[key] == first[key], key
    assert read_result_table(tmp_path / "evaluate" / "results.csv") == control_rows(ControlRecord.from_dict(second))


@pytest.mark.slow
def test_both_metric_families_write_one_folder_with_one_long_table(shared_data, tmp_path, monkeypatch, capsys):
    from dpn_lens.models import load_model
    from dpn_lens.tiny import TINY_PUNCTUATION, TINY_WORDS, build_tiny_hf_model
    from helpers import LETTER_WORDS, write_personalitybench
    from test_control import tiny_map

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    # A saved tiny Llama whose vocabulary holds the questionnaire's option letters and the tiny words
    tiny_folder = tmp_path / "model"
    hf_model, _ = build_tiny_hf_model(tiny_folder, n_layers=3, max_positions=512,
                                      words=list(dict.fromkeys([*LETTER_WORDS, *TINY_WORDS])),
                                      punctuation=tuple(dict.fromkeys([*TINY_PUNCTUATION, ".", ",", "?", ":", "(", ")", '"'])))
    hf_model.save_pretrained(tiny_folder)
    # PersonalityBench questions on which the random tiny model's persona answers differ; the rest as shipped
    data = write_personalitybench(tmp_path / "data")
    for part in shared_data.iterdir():
        if part.is_dir() and not (data / part.name).exists():
            (data / part.name).symlink_to(part)
    maps = tmp_path / "maps"
    maps.mkdir()
    tiny_map(load_model(str(tiny_folder)), "openness").save(maps / "openness.safetensors")
    out = tmp_path / "both"
    argv = ["--metrics", "preference,questionnaire", "--model", str(tiny_folder), "--dtype", "float32",
            "--data-dir", str(data), "--run", str(maps), "--traits", "openness", "--methods", "dpn-le,caa",
            "--eval-pairs", "8", "--gammas", "0.125,0.5,2", "--kl-levels", "0.005", "--target-kl", "0.005",
            "--random-draws", "1", "--items", "2", "--statements", "1", "--mc-items", "1", "--lambada-items", "1",
            "--ppl-chunks", "1", "--ppl-tokens", "16", "--kl-chunks", "1", "--kl-tokens", "16",
            "--npti-prompts", "2", "--npti-tokens", "3", "--gamma-sweep", "0,1", "--q-sweep", "",
            "--no-png", "--no-progress", "--out", str(out)]
    assert main(["evaluate", *argv]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "measured together" in text                      # questionnaire named alone runs the whole comparison
    assert "one model, loaded once, in one pass" in text    # the same --model and --dtype for both runs
    rows = read_result_table(out / "results.csv")
    assert {r.harness for r in rows} == {"control", "compare"}
    assert {"preference", "questionnaire_shift", "wikitext_ppl"} <= {r.metric for r in rows}
    assert (out / "control.json").exists() and (out / "comparison.json").exists()
    # the command's time is in the typed record, which reads back to the bytes written
    from dpn_lens.evaluation.comparison_record import load_comparison_record

    record = load_comparison_record(out)
    assert record.meta.ran_with == "evaluate: control and compare in one pass" and record.meta.command_seconds > 0
    assert json.dumps(record.to_dict(), indent=2) + "\n" == (out / "comparison.json").read_text()
    control = load_control_record(out)
    assert control.meta.ran_with == record.meta.ran_with and control.meta.command_seconds == record.meta.command_seconds
    # the report renders the joined table: both harnesses' metrics
    from dpn_lens.report import results_markdown

    report = (out / "results.md").read_text(encoding="utf-8")
    assert report == results_markdown(rows, f"Results: {out.name}")
    assert "### preference, KL" in report and "### questionnaire_shift" in report
    # The Python runner, given the configs the command line makes, on the one loaded model: the same table.
    from dpn_lens.cli.compare import compare_config
    from dpn_lens.cli.control import config_from_args
    from dpn_lens.cli.evaluate import _harness_parsers
    from dpn_lens.evaluation.runner import evaluate

    parsed = {harness: _harness_parsers()[""].parse_args(line) for harness, line in route(argv)}
    result = evaluate(load_model(str(tiny_folder), dtype="float32"), ["preference", "questionnaire"],
                      control=config_from_args(parsed["control"]), compare=compare_config(parsed["compare"]),
                      out=tmp_path / "python", log=lambda message: None, progress=False)
    assert list(result.rows) == rows == read_result_table(tmp_path / "python" / "results.csv")
    assert result.control.to_dict()["calibrated"] == json.loads((out / "control.json").read_text())["calibrated"]
    dpn_le = next(s for s in result.steering("preference", 0.005) if s.method == "dpn-le")
    assert dpn_le.as_asked == sum(r.method == "dpn-le" and r.measured_at("preference", 0.005) and r.ci_low > 0
                                  for r in rows)
    # The two commands run on their own, each on its share of the command line: the same table.
    apart = tmp_path / "apart"
    for harness, line in route(argv):
        line[line.index("--out") + 1] = str(apart)
        assert main(line) == 0, capsys.readouterr().err
    from dpn_lens.evaluation.runner import join_results

    assert join_results(apart, ["control", "compare"]) == rows
    with pytest.raises(ValueError, match="judge endpoint"):
        evaluate(None, ["preference", "judge"])
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(None, ["margin"])


def test_every_evaluate_command_in_the_docs_routes_to_command_lines_that_parse_and_validate():
    from dpn_lens.cli.compare import compare_config
    from dpn_lens.cli.control import config_from_args
    from dpn_lens.cli.options import validate_args
    from test_documented_commands import _commands

    commands = [argv for _, argv in _commands("dpn-lens ") if argv[:1] == ["evaluate"]]
    assert commands
    for argv in commands:
        for harness, line in route(argv[1:]):
            args = build_parser().parse_args(line)
            validate_args(args)
            config_from_args(args) if harness == "control" else compare_config(args)


def test_a_planned_run_writes_nothing(tiny_folder, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["evaluate", "--metrics", "preference", "--model", str(tiny_folder), "--plan", "--out", str(out)]) == 0
    assert "plan for" in capsys.readouterr().out and not out.exists()


def test_runs_that_need_different_models_run_one_after_the_other_and_say_why():
    from dpn_lens.cli.evaluate import _harness_parsers, why_apart

    def parsed(*options: str) -> dict[str, argparse.Namespace]:
        return {h: _harness_parsers()[""].parse_args(line)
                for h, line in route(["--metrics", "preference,capability", *options, "--out", "x"])}

    # control's --dtype default is bfloat16, compare's float32: two models, each run keeps its default
    assert "control runs smollm2-135m-instruct in bfloat16 on cpu and compare smollm2-135m-instruct in float32" \
        in why_apart(parsed())
    assert why_apart(parsed("--dtype", "float32")) is None
    assert why_apart(parsed("--dtype", "bfloat16", "--device", "cpu")) is None
    assert "--merge" in why_apart(parsed("--dtype", "float32", "--merge", "a,b"))


def test_random_weights_go_to_control_and_need_both_runs_on_one_model(tmp_path, capsys):
    """``--random-weights`` is control's option: compare alone refuses it, and two runs on two models (compare's own
    load would read the weights) are refused before either loads."""
    assert dict(route(["--metrics", "preference", "--random-weights", "--out", "x"]))["control"][1:] == \
        ["--random-weights", "--out", "x"]
    with pytest.raises(ValueError, match="--random-weights applies to the metrics preference,generation"):
        route(["--metrics", "capability", "--random-weights", "--out", "x"])
    out = tmp_path / "never"
    (tmp_path / "bare").mkdir()
    assert main(["evaluate", "--metrics", "preference,capability", "--model", str(tmp_path / "bare"),
                 "--random-weights", "--out", str(out)]) != 0
    assert "--random-weights needs both runs on one model, in one pass: control runs" in capsys.readouterr().err
    assert not out.exists()


def test_a_planned_run_of_both_families_plans_and_runs_nothing(tiny_folder, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["evaluate", "--metrics", "preference,capability", "--model", str(tiny_folder), "--plan",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "plan for" in text and "have no plan yet and do not run" in text and not out.exists()


def test_selection_settings_and_the_seed_go_to_both_runs():
    lines = dict(route(["--metrics", "preference,capability", "--selection-pairs", "512", "--budget", "40",
                        "--seed", "1", "--out", "x"]))
    for harness in ("control", "compare"):
        assert lines[harness][1:] == ["--selection-pairs", "512", "--budget", "40", "--seed", "1", "--out", "x"]
    from dpn_lens.cli.compare import compare_config

    config = compare_config(build_parser().parse_args(lines["compare"]))
    assert (config.selection_pairs, config.budget, config.seed) == (512, 40, 1)
