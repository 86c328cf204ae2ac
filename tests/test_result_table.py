"""The long result table (``results.csv``): the same numbers as each harness's own tables, and a round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpn_lens.evaluation.control_record import ControlRecord
from dpn_lens.evaluation.table import (ResultRow, comparison_rows, control_rows, read_result_table,
                                       write_result_table)

RESULTS = Path(__file__).resolve().parent.parent / "results"


def _preference_at(rows, trait, method, direction, level):
    found = [r for r in rows if (r.trait, r.method, r.direction, r.metric, r.kl_level)
             == (trait, method, direction, "preference", level)]
    assert len(found) <= 1, "one preference row per trait, method, direction and KL level"
    return found[0] if found else None


def check_control_rows_match_the_run(result):
    """Every calibrated shift (recorded apart from the matched-cost table the long rows read) appears as
    the preference row at its KL level, with its γ; every KL level's shift of every method is there."""
    rows = control_rows(ControlRecord.from_dict(result))
    calibrated = [c for c in result["calibrated"] if c["reached_target"]]
    assert calibrated
    for c in calibrated:
        row = _preference_at(rows, c["trait"], c["method"], c["direction"], c["target_kl"])
        assert row is not None and row.value == pytest.approx(c["shift"], abs=1e-12)
        assert row.gamma == pytest.approx(c["gamma"]) and row.ci_low <= row.value <= row.ci_high
    levels = result["meta"]["config"]["kl_levels"]
    measured = sum(not math.isnan(float(m.get(f"shift@kl{level:g}", math.nan)))
                   for m in result["matched_cost"] for level in levels)
    assert sum(r.metric == "preference" and r.method not in ("persona", "gamma-0") for r in rows) == measured
    personas = [r for r in rows if r.method == "persona" and r.metric == "preference"]
    assert {r.trait for r in personas} == {v["trait"] for v in result["validation"]}
    return rows


def test_a_committed_control_run_reads_the_same_in_the_long_table():
    result = json.loads((RESULTS / "control-gemma-3-270m-allrules" / "control.json").read_text())
    rows = check_control_rows_match_the_run(result)
    vs_random = [r for r in rows if r.metric == "preference_vs_random"]
    assert len(vs_random) == sum(not math.isnan(c["vs_random"]) for c in result["calibrated"])


def test_a_committed_generation_run_keeps_its_generation_rows_and_random_draws():
    result = json.loads((RESULTS / "control-smollm2-135m-instruct-generation" / "control.json").read_text())
    rows = control_rows(ControlRecord.from_dict(result))
    for g in result["generation"]:
        if g["method"].startswith("persona") or math.isnan(g["shift"]):
            continue
        found = [r for r in rows if (r.trait, r.method, r.direction, r.metric, r.kl_level)
                 == (g["trait"], g["method"], g["direction"], "generation", g["kl_level"])]
        assert len(found) == 1 and found[0].value == pytest.approx(g["shift"], abs=1e-12) and found[0].n == g["n"]
        if not math.isnan(g.get("random_shift", math.nan)):
            assert any(r.method == f"random-neurons:{g['method']}" and r.kl_level == g["kl_level"]
                       and r.trait == g["trait"] and r.direction == g["direction"] for r in rows)


def test_a_committed_comparison_reads_the_same_in_the_long_table():
    from dpn_lens.evaluation.comparison_record import load_comparison_record

    result = json.loads((RESULTS / "smollm2-135m-instruct" / "comparison.json").read_text())
    rows = comparison_rows(load_comparison_record(RESULTS / "smollm2-135m-instruct"))
    for r in result["rows"]:
        key = (r["trait"], r["method"], r["direction"])
        found = {x.metric: x.value for x in rows if (x.trait, x.method, x.direction) == key}
        assert found["questionnaire"] == pytest.approx(r["questionnaire"])
        assert found["kl"] == pytest.approx(r["kl"]) and found["mmlu_acc"] == pytest.approx(r["mmlu_acc"])
        assert found["questionnaire_shift"] == pytest.approx(r["trait_shift"])


def test_the_table_round_trips_through_csv_with_missing_values_empty(tmp_path):
    rows = [ResultRow("openness", "caa", "increase", "preference", 0.1 / 3, ci_low=-0.01, ci_high=0.07, n=63,
                      kl_level=0.05, gamma=2.0 ** 0.5, harness="control"),
            ResultRow("openness", "persona", "both", "preference", 0.04, n=60, harness="control")]
    path = write_result_table(rows, tmp_path / "results.csv")
    assert read_result_table(path) == rows
    assert ",,," in path.read_text()          # None is written as nothing, not 'None' or 'nan'
    assert read_result_table(write_result_table([], tmp_path / "empty.csv")) == []


def test_a_file_that_is_not_a_result_table_is_refused_by_name(tmp_path):
    other = tmp_path / "matched_cost.csv"
    other.write_text("trait,direction,method,shift@kl0.05\nopenness,increase,caa,0.1\n")
    with pytest.raises(ValueError, match="not a dpn-lens result table .*results.csv"):
        read_result_table(other)


def test_a_row_without_an_interval_does_not_claim_to_exclude_zero():
    assert not ResultRow("o", "m", "increase", "kl", 0.05).excludes_zero
    assert ResultRow("o", "m", "increase", "preference", -0.2, ci_low=-0.3, ci_high=-0.1).excludes_zero


def test_the_summary_of_a_committed_run_equals_its_own_goal_table():
    """``steering_summary`` over the long rows counts what ``control`` wrote in goal.csv (computed from
    the calibrated rows, not from the long table)."""
    from dpn_lens.evaluation.table import steering_summary

    result = json.loads((RESULTS / "control-gemma-3-270m-allrules" / "control.json").read_text())
    target = result["meta"]["config"]["target_kl"]
    summary = {s.method: s for s in steering_summary(control_rows(ControlRecord.from_dict(result)), "preference", target)}
    for goal in result["goal"]:
        mine = summary[goal["rule"]]
        total = mine.trait_directions
        assert goal["as asked"] == f"{mine.as_asked}/{total}" and goal["wrong way"] == f"{mine.wrong_way}/{total}"
        assert goal["beats random"] == f"{mine.beyond_random}/{total}"
        assert goal["as asked and beats random"] == f"{mine.as_asked_and_beyond_random}/{total}"
        assert mine.mean_shift == pytest.approx(goal["mean shift"])


def test_summary_joins_runs_of_one_model_and_refuses_to_count_a_measurement_twice(tmp_path):
    from dpn_lens.cli.summary import summary_markdown

    text = summary_markdown([str(RESULTS / "control-gemma-3-270m-allrules"), str(RESULTS / "control-gemma-3-270m-skipbos")])
    assert text.count("## gemma-3-270m") == 1
    table = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"attribution", "write", "attribution-t", "caa"} <= set(table)
    caa = [cell.strip() for cell in table["caa"].split("|")[1:-1]]
    assert caa[5:7] == ["", ""]          # CAA has no random-neuron draws: blank, not 0
    with pytest.raises(ValueError, match="both measured"):
        summary_markdown([str(RESULTS / "control-gemma-3-270m-skipbos"), str(RESULTS / "control-gemma-3-270m-skipbos-CE")])
    with pytest.raises(ValueError, match="nothing in"):
        summary_markdown([str(RESULTS / "control-gemma-3-270m-allrules")], "generation", 0.05)
    with pytest.raises(FileNotFoundError, match="no control.json"):
        summary_markdown([str(tmp_path)])


def test_a_folder_with_results_csv_is_read_from_it(tmp_path):
    from dpn_lens.evaluation.table import run_rows

    (tmp_path / "control.json").write_text(json.dumps({"meta": {"model": "m", "config": {"kl_levels": []}}}))
    rows = [ResultRow("openness", "caa", "increase", "preference", 0.5, 0.1, 0.9, kl_level=0.05)]
    write_result_table(rows, tmp_path / "results.csv")
    assert run_rows(tmp_path) == ("m", rows)


def test_summary_detail_gives_each_trait_direction_with_its_interval_and_rule_minus_random():
    from dpn_lens.cli.summary import summary_markdown

    folder = RESULTS / "control-smollm2-135m-instruct-generation"
    result = json.loads((folder / "control.json").read_text())
    row = next(g for g in result["generation"] if g["method"] == "attribution-t" and g["kl_level"] == 0.05)
    text = summary_markdown([str(folder)], "generation", 0.05, detail=True)
    def star(low, high):                      # a shift whose interval excludes 0 is marked
        return " *" if low > 0 or high < 0 else ""

    expected = (f"| {row['trait']} | {row['direction']} | attribution-t | {row['shift']:+.3f} [{row['ci_low']:+.3f}, "
                f"{row['ci_high']:+.3f}]{star(row['ci_low'], row['ci_high'])} | {row['vs_random']:+.3f} "
                f"[{row['vs_random_ci_low']:+.3f}, {row['vs_random_ci_high']:+.3f}]"
                f"{star(row['vs_random_ci_low'], row['vs_random_ci_high'])} |")
    assert expected in text
