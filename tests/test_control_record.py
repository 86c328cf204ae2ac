"""The typed control record (``evaluation.control_record``): every committed ``control.json`` reads into a
``ControlRecord`` and writes back equal, the wide tables are typed per KL level, and bad input is refused
with a message that names it (no model: pure data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpn_lens.evaluation.control_record import (ControlRecord, GoalRow, LevelPoint, LevelSummary, MatchedCostRow,
                                                MatchedSummaryRow, TraitExamples, load_control_record)
from dpn_lens.evaluation.control_rows import CalibratedRow, DosePoint, Effect, MeasuredEdit, RandomComparison

RESULTS = Path(__file__).resolve().parent.parent / "results"
RECORDS = sorted(RESULTS.glob("**/control*.json"))


def _same(a, b) -> bool:
    """JSON equality with NaN equal to NaN (the records write unreached points as NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_every_committed_record_reads_into_types_and_writes_back_equal():
    assert len(RECORDS) > 40
    for path in RECORDS:
        data = json.loads(path.read_text(encoding="utf-8"))
        record = ControlRecord.from_dict(data)
        assert _same(record.to_dict(), data), path
        assert all(isinstance(row, MatchedCostRow) for row in record.matched_cost), path
        assert record.kl_levels == [float(level) for level in data["meta"]["config"]["kl_levels"]]


def test_a_current_record_keeps_its_table_and_key_order():
    path = RESULTS / "control-gemma-3-270m-selection512" / "control.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    written = ControlRecord.from_dict(data).to_dict()
    assert list(written) == list(data)
    for table in ("validation", "matched_cost", "matched_summary", "calibrated", "goal", "stages"):
        assert [list(row) for row in written[table]] == [list(row) for row in data[table]], table


def test_tables_an_older_record_lacks_stay_absent():
    data = json.loads((RESULTS / "control-gemma-3-270m" / "control.json").read_text(encoding="utf-8"))
    assert "goal" not in data
    record = ControlRecord.from_dict(data)
    assert record.goal is None and record.sweep is None and record.stages is None
    assert "goal" not in record.to_dict()


def test_the_wide_tables_are_read_per_kl_level():
    row = MatchedCostRow.from_dict({"trait": "o", "direction": "increase", "method": "caa",
                                    "gamma@kl0.01": 1.0, "kl@kl0.01": 0.01, "shift@kl0.01": 0.02,
                                    "ci_low@kl0.01": 0.0, "ci_high@kl0.01": 0.04,
                                    "gamma@kl0.1": math.nan, "kl@kl0.1": math.nan, "shift@kl0.1": math.nan,
                                    "ci_low@kl0.1": math.nan, "ci_high@kl0.1": math.nan})
    assert list(row.levels) == [0.01, 0.1]
    assert row.at(0.01) == LevelPoint(1.0, 0.01, 0.02, 0.0, 0.04)
    assert not row.at(0.1).reached and not row.at(0.5).reached      # a level the table does not have: unreached
    summary = MatchedSummaryRow("caa", {0.05: LevelSummary(0.03, "9/10", "8/10")})
    assert summary.to_dict() == {"method": "caa", "mean_shift@kl0.05": 0.03, "reached@kl0.05": "9/10",
                                 "ci>0@kl0.05": "8/10"}
    goal = GoalRow("attribution", "1/1", "1/1", "0/1", "1/1", "1/1", 0.04, 0.02, True, reference="npti")
    assert "npti mean shift" in goal.to_dict() and GoalRow.from_dict(goal.to_dict()) == goal


def test_a_record_made_by_the_run_writes_the_file_it_reads_back():
    """The run's own assembly (matched cost, summary and goal derived from typed rows) round-trips."""
    from dpn_lens.evaluation.control import ControlConfig, _assemble, _Parts
    from dpn_lens.evaluation.control_record import ControlMeta

    config = ControlConfig(traits=["openness"], methods=["dpn-le", "caa"], kl_levels=[0.05], target_kl=0.05)
    measured = MeasuredEdit(2.0, 10, 0.05, 10.0, Effect(0.03, 0.01, 0.05, 0.01, 32, z=2.5))
    versus = RandomComparison(0.0, -0.01, 0.01, 0.05, 0.03, 0.01, 0.05, random_draws=3)
    parts = _Parts(curves=[DosePoint("openness", "increase", "dpn-le", 0.05, measured),
                           DosePoint("openness", "increase", "caa", 0.05, measured)],
                   calibrated=[CalibratedRow("dpn-le", "openness", "increase", 0.05, measured, versus)])
    meta = ControlMeta(model="tiny", dtype="torch.float32", config={"kl_levels": [0.05], "target_kl": 0.05}, seconds=1.0)
    record = _assemble(config, meta, parts, {"openness": TraitExamples()}, {}, {})
    assert record.goal[0].as_asked_and_beats_random == "1/1" and record.goal[0].reference_mean_shift == 0.03
    assert record.matched_summary[0].levels[0.05].mean_shift == 0.03
    again = ControlRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again.matched_cost == record.matched_cost and again.goal == record.goal    # no NaN in these
    assert _same(again.to_dict(), record.to_dict())         # the summary's unmeasured random curve is NaN


def test_bad_input_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="control.json does not exist; pass the control.json"):
        load_control_record(tmp_path)
    (tmp_path / "control.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_control_record(tmp_path)
    (tmp_path / "control.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a control record"):
        load_control_record(tmp_path)
    current = json.loads((RESULTS / "control-gemma-3-270m-sweep-OC" / "control.json").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="the table\\(s\\) novel"):
        ControlRecord.from_dict({**current, "novel": []})
    wide = {**current, "matched_cost": [{**current["matched_cost"][0], "median@kl0.05": 0.1}]}
    with pytest.raises(ValueError, match="'median@kl0.05'"):
        ControlRecord.from_dict(wide)
    missing = {**current, "curves": [{k: v for k, v in current["curves"][0].items() if k != "gamma"}]}
    (tmp_path / "control.json").write_text(json.dumps(missing))
    with pytest.raises(ValueError, match="a table row lacks 'gamma'"):
        load_control_record(tmp_path)


def test_the_sparsity_figure_and_report_read_committed_records(tmp_path):
    """The readers take the typed record: the sparsity figure of two models' sweeps (``study causal
    --control``) and the whole report of a run with a sweep and a generation check."""
    from dpn_lens.report.control import sparsity_figure, write_control_outputs

    gemma = load_control_record(RESULTS / "control-gemma-3-270m-sweep-current")
    smollm = load_control_record(RESULTS / "control-smollm2-135m-instruct-sweep")
    figure = sparsity_figure({gemma.meta.model: gemma, smollm.meta.model: smollm})
    rules = {trace.name for trace in figure.data}
    assert rules and rules <= {row.rule for record in (gemma, smollm) for row in record.sweep}
    written = write_control_outputs(load_control_record(RESULTS / "control-gemma-3-270m-selection512-generation"),
                                    tmp_path, png=False)
    text = (tmp_path / "control.md").read_text()
    assert "Generation-based check" in text and "which steers?" in text and (tmp_path / "goal.csv") in written
    assert _same(json.loads((tmp_path / "control.json").read_text()), json.loads(
        (RESULTS / "control-gemma-3-270m-selection512-generation" / "control.json").read_text()))


def test_one_traits_record_keeps_its_rows_only():
    record = load_control_record(RESULTS / "control-gemma-3-270m-selection512-generation")
    mine = record.of_trait("openness")
    for table in ("validation", "costs", "curves", "calibrated", "gamma_zero", "generation", "stages"):
        rows = getattr(mine, table)
        assert rows and {row.trait for row in rows} == {"openness"}, table
        assert len(rows) == sum(row.trait == "openness" for row in getattr(record, table)), table
    assert list(mine.examples) == ["openness"] and mine.meta == record.meta
