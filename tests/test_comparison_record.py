"""The comparison's typed record: ``comparison.json`` reads back to the same bytes, for every committed
record and for a fresh one, and a file that is not a record is refused by name."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dpn_lens.evaluation.capability import CAPABILITY_METRICS, MC_TASKS, CapabilitySizes
from dpn_lens.evaluation.compare import CompareConfig, run_comparison, write_outputs
from dpn_lens.evaluation.comparison_record import (ComparisonRecord, ComparisonRow, Interval, ComparisonSweepRow,
                                                   load_comparison_record)
from helpers import build_letter_model

RESULTS = Path(__file__).resolve().parent.parent / "results"
COMMITTED = sorted(RESULTS.glob("*/comparison.json"))


def _as_written(data) -> str:
    """The text ``write_outputs`` writes for ``data`` (``io.write_json_atomic``)."""
    return json.dumps(data, indent=2) + "\n"


def _read_back(text: str) -> str:
    return _as_written(ComparisonRecord.from_dict(json.loads(text)).to_dict())


@pytest.fixture(scope="module")
def letter_model(tmp_path_factory):
    return build_letter_model(tmp_path_factory.mktemp("letters_record"))


@pytest.fixture(scope="module")
def fresh(letter_model, shared_data, tmp_path_factory):
    """A tiny-model comparison with both sweeps, and the folder ``write_outputs`` wrote it to."""
    config = CompareConfig(traits=["openness"], methods=["dpn-le", "prompting"], data_dir=str(shared_data),
                           locate_pairs=12, locate_q=0.8, locate_tau_d=0.0, questionnaire_items=3,
                           statements_per_pole=2, capability=CapabilitySizes(1, 1, 1, 16, 1, 16),
                           gamma_sweep=[0.0, 1.0], q_sweep=[0.97], sweep_methods=["dpn-le"])
    record = run_comparison(letter_model, config, log=lambda message: None)
    out = tmp_path_factory.mktemp("record_out")
    write_outputs(record, out, make_png=False)
    return record, out


def test_the_committed_records_are_found():
    assert len(COMMITTED) >= 2, f"no committed comparison.json under {RESULTS}"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda path: path.parent.name)
def test_every_committed_record_reads_back_to_the_same_bytes(path):
    text = path.read_text(encoding="utf-8")
    assert _read_back(text) == text
    record = load_comparison_record(path)
    # Written before the summary, the statement shift and the intervals: those fields are empty, not invented.
    assert record.summary is None and not record.extra and not record.meta.extra
    assert all(row.statements_shift is None and row.trait_shift_interval is None and not row.extra
               for row in record.rows)
    steered = [row for row in record.rows if row.method != "unsteered"]
    assert steered and all(set(row.deltas) == {"questionnaire", "option_mass", "statements_high", "statements_low",
                                               "statements_gap", *CAPABILITY_METRICS} for row in steered)
    assert record.meta.command_seconds is not None and record.respondents


@pytest.mark.parametrize("path", COMMITTED[-1:], ids=lambda path: path.parent.name)
def test_write_outputs_of_a_committed_record_rewrites_its_json_unchanged(path, tmp_path):
    """An earlier release's record (no summary: ``comparison.md`` computes the means) goes through
    ``write_outputs`` and comes out as the same file."""
    record = load_comparison_record(path.parent)
    write_outputs(record, tmp_path, make_png=False)
    assert (tmp_path / "comparison.json").read_text() == path.read_text(encoding="utf-8")
    assert "## Mean per method" in (tmp_path / "comparison.md").read_text()


def test_a_fresh_record_reads_back_equal_and_its_file_to_the_same_bytes(fresh):
    record, out = fresh
    text = (out / "comparison.json").read_text()
    assert text == _as_written(record.to_dict())
    assert _read_back(text) == text
    assert load_comparison_record(out).to_dict() == record.to_dict()
    assert ComparisonRecord.from_dict(record.to_dict()) == record


def test_a_fresh_record_writes_the_columns_in_the_order_compare_always_wrote(fresh):
    """The key order of c6e635b's dict rows (checked then against a run of that commit: every output file
    the same bytes, timings aside): identifiers, scores, capability, shifts with intervals, seconds, deltas."""
    data = fresh[0].to_dict()
    scores = ["questionnaire", "option_mass", "statements_high", "statements_low", "statements_gap"]
    capability = [f"{task}_acc" for task in MC_TASKS] + ["lambada_acc", "wikitext_ppl", "kl"]
    shifts = [f"{name}{part}" for name in ("trait_shift", "statements_shift") for part in ("", "_ci_low", "_ci_high", "_p")]
    start = ["method", "trait", "direction", "n_edited", "pct_edited", *scores, *capability]
    assert list(data) == ["rows", "summary", "gamma_sweep", "q_sweep", "respondents", "judged", "meta"]
    assert list(data["rows"][0]) == [*start, "trait_shift", "statements_shift", "seconds"]
    assert list(data["rows"][1]) == [*start, *shifts, "seconds", *[f"delta_{key}" for key in scores + capability]]
    sweep = [*scores, *shifts, "wikitext_ppl", "kl"]
    assert list(data["gamma_sweep"][0]) == ["method", "trait", "gamma", "n_edited", *sweep]
    assert list(data["q_sweep"][0]) == ["method", "trait", "q", "n_edited", "pct_edited", *sweep]
    means = ["n_edited", "pct_edited", "trait_shift", "statements_shift", "statements_gap", "kl", "wikitext_ppl",
             *[f"{task}_acc" for task in MC_TASKS], "lambada_acc"]
    assert list(data["summary"][0]) == ["method", "conditions", *means]
    assert list(data["summary"][1]) == ["method", "conditions", *means, *[s for s in shifts if s not in
                                                                           ("trait_shift", "statements_shift")]]
    assert list(data["meta"]) == ["model", "n_mlp_neurons", "n_questionnaire_items", "n_statements", "config", "seconds"]
    timed = fresh[0].with_meta(command_seconds=2.0, ran_with="evaluate")
    assert list(timed.to_dict()["meta"])[-2:] == ["command_seconds", "ran_with"]      # what the CLI adds, last


def test_unknown_keys_of_another_release_are_kept_and_written_back(fresh):
    data = fresh[0].to_dict()
    data["rows"][1]["steering_note"] = "kept"
    data["meta"]["host"] = {"cores": 2}
    data["notes"] = ["a later table"]
    record = ComparisonRecord.from_dict(data)
    assert record.rows[1].extra == {"steering_note": "kept"} and record.meta.extra == {"host": {"cores": 2}}
    assert record.extra == {"notes": ["a later table"]}
    assert _as_written(record.to_dict()) == _as_written(data)


def test_every_capability_number_is_a_field_or_an_accuracy_not_an_unknown_key(fresh):
    row = fresh[0].rows[1]
    assert not row.extra and set(row.accuracies) | {"wikitext_ppl", "kl"} == set(CAPABILITY_METRICS)
    assert row.number("kl") == row.kl and row.number("mmlu_acc") == row.accuracies["mmlu_acc"]
    assert row.number("delta_kl") == row.deltas["kl"] and row.number("judge_trait") is None


def _row(fresh) -> dict:
    return fresh[0].to_dict()["rows"][1]


def test_a_missing_or_mistyped_column_is_refused_naming_the_row_and_the_key(fresh):
    data = fresh[0].to_dict()
    del data["rows"][2]["questionnaire"]
    with pytest.raises(ValueError, match=r"rows\[2\] has no 'questionnaire'"):
        ComparisonRecord.from_dict(data)
    data = fresh[0].to_dict()
    data["gamma_sweep"][1]["kl"] = "small"
    with pytest.raises(ValueError, match=r"gamma_sweep\[1\]: kl must be a number, got 'small'"):
        ComparisonRecord.from_dict(data)
    with pytest.raises(ValueError, match="n_edited must be a whole number"):
        ComparisonRow.from_dict({**_row(fresh), "n_edited": 2.5})
    with pytest.raises(ValueError, match="method must be a string"):
        ComparisonRow.from_dict({**_row(fresh), "method": None})
    with pytest.raises(ValueError, match="pct_edited must be a number, got True"):
        ComparisonRow.from_dict({**_row(fresh), "pct_edited": True})


def test_a_partial_interval_or_judge_block_is_refused(fresh):
    row = _row(fresh)
    del row["trait_shift_p"]
    with pytest.raises(ValueError, match="trait_shift_ci_low, trait_shift_ci_high but not trait_shift_p"):
        ComparisonRow.from_dict(row)
    with pytest.raises(ValueError, match="not every judge score"):
        ComparisonRow.from_dict({**_row(fresh), "judge_trait": 3.0})
    assert Interval.from_columns({"trait_shift": 0.1}, "trait_shift") is None


def test_a_sweep_row_needs_its_gamma_or_q():
    point = {"method": "dpn-le", "trait": "openness", "n_edited": 3, "questionnaire": 3.0, "option_mass": 1.0,
             "statements_high": 0.5, "statements_low": 0.5, "statements_gap": 0.0, "trait_shift": 0.1,
             "wikitext_ppl": 30.0, "kl": 0.01}
    with pytest.raises(ValueError, match="neither 'gamma' nor 'q'"):
        ComparisonSweepRow.from_dict(point)
    assert ComparisonSweepRow.from_dict({**point, "q": 0.97}).to_dict() == {**point, "q": 0.97}
    assert list(ComparisonSweepRow.from_dict({**point, "gamma": 1.0}).to_dict())[:3] == ["method", "trait", "gamma"]


def test_a_record_without_its_lists_or_meta_is_refused(fresh):
    data = fresh[0].to_dict()
    with pytest.raises(ValueError, match="the comparison record has no 'meta'"):
        ComparisonRecord.from_dict({k: v for k, v in data.items() if k != "meta"})
    with pytest.raises(ValueError, match="'rows' must be a list, got dict"):
        ComparisonRecord.from_dict({**data, "rows": {}})
    with pytest.raises(ValueError, match=r"rows\[0\] must be a JSON object, got list"):
        ComparisonRecord.from_dict({**data, "rows": [[1, 2]]})
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        ComparisonRecord.from_dict([])


def test_loading_names_the_file_that_is_missing_or_not_a_record(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"comparison.json does not exist; pass the comparison.json"):
        load_comparison_record(tmp_path)
    (tmp_path / "comparison.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"comparison.json is not JSON"):
        load_comparison_record(tmp_path / "comparison.json")
    (tmp_path / "comparison.json").write_text(json.dumps({"rows": [], "meta": {}}))
    with pytest.raises(ValueError, match=r"comparison.json is not a comparison record: .* has no 'gamma_sweep'"):
        load_comparison_record(tmp_path)


def test_the_summary_is_derived_from_the_typed_rows(fresh):
    """The recorded means are the rows' means (the shifts: the pooled items' mean, equal up to rounding)."""
    from dpn_lens.evaluation.compare import summary_by_method

    record = fresh[0]
    for recorded, derived in zip(record.summary, summary_by_method(record.rows)):
        assert recorded.method == derived.method and recorded.conditions == derived.conditions
        assert recorded.means == pytest.approx(derived.means)
        assert bool(recorded.intervals) == (recorded.method != "unsteered")
    frozen = record.rows[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        frozen.kl = 1.0   # type: ignore[misc]


def test_the_compare_command_writes_its_record_with_the_commands_run_time(shared_data, tmp_path, monkeypatch, capsys):
    """``dpn-lens compare`` adds ``command_seconds`` to the typed record (``with_meta``), last in meta."""
    from dpn_lens.cli import main
    from dpn_lens.models import load_model
    from dpn_lens.tiny import build_tiny_hf_model
    from helpers import LETTER_WORDS
    from test_control import tiny_map

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    hf_model, _ = build_tiny_hf_model(folder, n_layers=3, max_positions=512, words=LETTER_WORDS,
                                      punctuation=(".", ",", "?", ":", "(", ")", '"'))
    hf_model.save_pretrained(folder)
    maps = tmp_path / "maps"
    maps.mkdir()
    tiny_map(load_model(str(folder)), "openness").save(maps / "openness.safetensors")
    out = tmp_path / "compare"
    argv = ["compare", "--model", str(folder), "--dtype", "float32", "--data-dir", str(shared_data), "--run", str(maps),
            "--traits", "openness", "--methods", "dpn-le,prompting", "--items", "2", "--statements", "1",
            "--mc-items", "1", "--lambada-items", "1", "--ppl-chunks", "1", "--ppl-tokens", "16", "--kl-chunks", "1",
            "--kl-tokens", "16", "--gamma-sweep", "1", "--q-sweep", "", "--no-png", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    record = load_comparison_record(out)
    assert [row.method for row in record.rows] == ["unsteered", "dpn-le", "prompting", "dpn-le", "prompting"]
    assert record.meta.command_seconds >= record.meta.seconds > 0 and record.meta.ran_with is None
    assert list(record.to_dict()["meta"])[-1] == "command_seconds"
    assert _read_back((out / "comparison.json").read_text()) == (out / "comparison.json").read_text()
