"""Typed control rows (``evaluation.control_rows``): each row survives a round trip, and the committed
``control.json`` records read back key for key, in order (no model: pure data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpn_lens.evaluation.control_rows import (ROW_TYPES, CalibratedRow, CostPoint, DosePoint, Effect, GammaZeroRow,
                                              GenerationRandomComparison, GenerationRow, MeasuredEdit,
                                              RandomComparison, SweepRow, ValidationRow)

RESULTS = Path(__file__).resolve().parent.parent / "results"
NAMED_RECORDS = ["control-gemma-3-270m-skipbos", "control-smollm2-135m-instruct-rules-generation",
                 "control-gemma-3-270m-sweep-current"]
"""A current run, one with ``generation`` rows and one with ``sweep`` rows."""

EFFECT = Effect(shift=0.02, ci_low=0.01, ci_high=0.03, p=0.004, n=64, z=3.1)
RECOVERED = Effect(shift=0.02, ci_low=0.01, ci_high=0.03, p=0.004, n=64, z=3.1, recovered=0.4, recovered_ci_low=0.1,
                   recovered_ci_high=0.7)
GENERATION_EFFECT = Effect(shift=0.1, ci_low=-0.2, ci_high=0.4, p=0.5, n=6)
MEASURED = MeasuredEdit(gamma=4.0, n_edited=12, kl=0.05, ppl=11.2, effect=RECOVERED)
RANDOM_DRAWS = MeasuredEdit(gamma=4.0, n_edited=12, kl=0.04, ppl=11.0, effect=EFFECT, draws=5)
VERSUS = RandomComparison(0.0, -0.01, 0.01, random_kl=0.04, vs_random=0.02, vs_random_ci_low=0.01,
                          vs_random_ci_high=0.03, random_draws=5)
VALIDATION = ValidationRow("openness", 60, 64, 3, 1, base_margin=-0.1, persona_effect=0.04, persona_ci_low=0.02,
                           persona_ci_high=0.06, persona_p=0.001, persona_z=4.0, high_vs_none=0.3,
                           high_vs_none_ci_low=0.2, high_vs_none_ci_high=0.4, low_vs_none=0.2, low_vs_none_ci_low=0.1,
                           low_vs_none_ci_high=0.3)

EVERY_KIND_OF_ROW = [
    EFFECT, RECOVERED, GENERATION_EFFECT, MEASURED, RANDOM_DRAWS, VERSUS,
    RandomComparison(0.0, -0.01, 0.01, 0.04, -0.01, -0.02, 0.0),                       # an older run: no random_draws
    CostPoint("openness", "increase", "dpn-le", gamma=0.25, kl=0.001, ppl=10.1),
    DosePoint("openness", "increase", "dpn-le", 0.05, MEASURED),
    DosePoint("openness", "increase", "random-neurons", 0.05, RANDOM_DRAWS),
    CalibratedRow("dpn-le", "openness", "increase", 0.05),                                # target not reached
    CalibratedRow("attribution", "openness", "decrease", 0.05, MEASURED),                 # no random control
    CalibratedRow("dpn-le", "openness", "increase", 0.05, MEASURED, VERSUS),
    CalibratedRow(None, "openness", "increase", 0.05, MEASURED, VERSUS),                  # an older run: no method
    VALIDATION,
    GammaZeroRow("openness", Effect(shift=0.0, ci_low=0.0, ci_high=0.0, p=1.0, n=64, z=0.0), kl_floor=2e-6),
    GammaZeroRow("openness", RECOVERED),                                                 # an older run: no kl_floor
    SweepRow("openness", "increase", "attribution", 8, n_edited=0),                      # the budget selects nothing
    SweepRow("openness", "increase", "dpn-le", "all", n_edited=900, curve_points=3, max_kl=0.01),   # not reached
    SweepRow("openness", "increase", "dpn-le", 32, n_edited=12, curve_points=3, measured=MEASURED),
    SweepRow("openness", "increase", "dpn-le", 32, n_edited=12, measured=MEASURED),      # an older run: no curve_points
    GenerationRandomComparison(0.0, -0.1, 0.1, 0.2, 0.05, 0.35, draws=5),
    GenerationRow("openness", "both", "persona (high-low)/2", math.nan, math.nan, GENERATION_EFFECT),
    GenerationRow("openness", "increase", "caa", 0.5, math.nan),                          # level not reached
    GenerationRow("openness", "increase", "caa", 0.05, 3.0, GENERATION_EFFECT, changed=0.5),
    GenerationRow("openness", "increase", "dpn-le", 0.05, 3.0, GENERATION_EFFECT, changed=0.5,
                  random=GenerationRandomComparison(0.0, -0.1, 0.1, 0.2, 0.05, 0.35, draws=5)),
]


@pytest.mark.parametrize("row", EVERY_KIND_OF_ROW, ids=lambda row: type(row).__name__)
def test_every_row_reads_back_what_it_writes(row):
    again = type(row).from_dict(row.to_dict())
    assert again == row
    assert json.dumps(again.to_dict()) == json.dumps(row.to_dict())      # key order too


def test_every_table_of_control_json_has_a_row_type_and_every_row_type_a_round_trip():
    assert set(ROW_TYPES) == {"validation", "costs", "curves", "calibrated", "gamma_zero", "sweep", "generation"}
    assert set(ROW_TYPES.values()) <= {type(row) for row in EVERY_KIND_OF_ROW}


def test_derived_flags_follow_what_they_are_derived_from():
    assert VALIDATION.valid and not ValidationRow.from_dict({**VALIDATION.to_dict(), "persona_ci_low": -0.01}).valid
    assert VERSUS.beats_random and type(VERSUS.beats_random) is bool
    assert CalibratedRow("dpn-le", "o", "increase", 0.05, MEASURED).reached_target
    assert not SweepRow("o", "increase", "dpn-le", 8, n_edited=0).reached
    with pytest.raises(ValueError, match="n_edited"):
        SweepRow("o", "increase", "dpn-le", 8, n_edited=3, measured=MEASURED)


def _records(names):
    return [(name, json.loads((RESULTS / name / "control.json").read_text(encoding="utf-8"))) for name in names]


def _read_back(record):
    """Each long table of ``record`` read as typed rows and written again (json text: key order and NaN count)."""
    return {key: json.dumps([kind.from_dict(row).to_dict() for row in record.get(key, [])])
            for key, kind in ROW_TYPES.items()}


@pytest.mark.parametrize("name", NAMED_RECORDS)
def test_a_committed_record_reads_back_key_for_key(name):
    [(_, record)] = _records([name])
    read = _read_back(record)
    for key in ROW_TYPES:
        assert read[key] == json.dumps(record.get(key, [])), key
    kinds = {key for key in ROW_TYPES if record.get(key)}
    assert {"validation", "costs", "curves", "calibrated", "gamma_zero"} <= kinds
    assert ("generation" in kinds) == (name.endswith("generation")) and ("sweep" in kinds) == ("sweep" in name)


def test_every_committed_record_reads_back_key_for_key_older_ones_too():
    names = sorted(str(path.parent.relative_to(RESULTS)) for path in RESULTS.glob("**/control.json"))
    assert len(names) > 10
    for name, record in _records(names):
        read = _read_back(record)
        for key in ROW_TYPES:
            assert read[key] == json.dumps(record.get(key, [])), (name, key)


def test_merging_committed_runs_keeps_their_rows_as_they_were_written():
    from dpn_lens.evaluation.control import merge_control_results
    from dpn_lens.evaluation.control_record import ControlRecord

    runs = [record for _, record in _records(["control-gemma-3-270m-sweep-OC", "control-gemma-3-270m-sweep-EAN"])]
    merged = merge_control_results([ControlRecord.from_dict(run) for run in runs]).to_dict()
    for key in ROW_TYPES:
        assert json.dumps(merged[key]) == json.dumps([row for run in runs for row in run.get(key, [])]), key


def test_merging_refuses_a_record_it_would_misread_and_says_why():
    """Records from before control named each row's method once failed the merge with a bare KeyError; a
    row key the row types do not know would have been dropped silently."""
    from dpn_lens.evaluation.control import merge_control_results
    from dpn_lens.evaluation.control_record import ControlRecord

    [(_, old)] = _records(["control-gemma-3-270m"])
    with pytest.raises(ValueError, match=r"result #0 is a control record from an earlier version \(it lacks "
                                         r"calibrated rows' method\).*run `dpn-lens control` again"):
        merge_control_results([ControlRecord.from_dict(old)])
    [(_, current)] = _records(["control-gemma-3-270m-sweep-OC"])
    record = ControlRecord.from_dict(current)
    assert merge_control_results([record]).traits_done == current["meta"]["traits_done"]
    unfinished = {**current, "meta": {k: v for k, v in current["meta"].items() if k != "traits_done"}}
    with pytest.raises(ValueError, match="it lacks traits_done"):
        merge_control_results([record, ControlRecord.from_dict(unfinished)])
    future = {**current, "curves": [{**current["curves"][0], "new_column": 1.0}, *current["curves"][1:]]}
    with pytest.raises(ValueError, match="its curves rows carry new_column, which this version's DosePoint does not keep"):
        ControlRecord.from_dict(future)
