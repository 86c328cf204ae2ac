"""The comparison runner end to end on a tiny model, and the CLI wiring."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from dpn_lens.evaluation.capability import CapabilitySizes
from dpn_lens.cli.compare import compare_config, register
from dpn_lens.evaluation.compare import SHIFT_METRICS, CompareConfig, run_comparison, trait_effects, write_outputs
from helpers import build_letter_model


@pytest.fixture(scope="module")
def letter_model(tmp_path_factory):
    return build_letter_model(tmp_path_factory.mktemp("letters_compare"))


def test_comparison_writes_every_method_trait_direction_and_sweep(letter_model, shared_data, tmp_path):
    config = CompareConfig(traits=["openness"], data_dir=str(shared_data), locate_pairs=12, locate_q=0.8, locate_tau_d=0.0, questionnaire_items=2,
                           statements_per_pole=1, capability=CapabilitySizes(1, 1, 1, 16, 1, 16), npti_prompts=2,
                           npti_new_tokens=3, caa_pairs=6, gamma_sweep=[0.0, 1.0], q_sweep=[0.999, 0.97])
    record = run_comparison(letter_model, config, log=lambda message: None)
    methods = {(r.method, r.direction) for r in record.rows}
    assert methods == {("unsteered", "none")} | {(m, d) for m in config.methods for d in ("increase", "decrease")}
    for row in record.rows:
        assert 0 <= row.pct_edited <= 100 and 1 <= row.questionnaire <= 5
    unsteered = next(r for r in record.rows if r.method == "unsteered")
    assert unsteered.kl == pytest.approx(0.0, abs=1e-7)
    zero = [r for r in record.gamma_sweep if r.gamma == 0.0 and r.method in ("dpn-le", "dense")]
    assert zero and all(r.kl == pytest.approx(0.0, abs=1e-6) for r in zero)  # gamma 0 changes nothing
    q = {r.q: r.n_edited for r in record.q_sweep}
    assert q[0.97] >= q[0.999]
    files = {p.name for p in write_outputs(record, tmp_path, make_png=False)}
    assert {"rows.csv", "comparison.json", "comparison.md", "tradeoff.html", "results.csv", "results.md",
            "results.html"} <= files
    from dpn_lens.evaluation.table import read_result_table

    long = read_result_table(tmp_path / "results.csv")
    assert {(r.method, r.direction) for r in long} == methods
    assert {(r.method, r.trait, r.direction): r.value for r in long if r.metric == "questionnaire"} == pytest.approx(
        {(r.method, r.trait, r.direction): r.questionnaire for r in record.rows})
    assert json.loads((tmp_path / "comparison.json").read_text())["meta"]["n_mlp_neurons"] == 2 * 48
    assert "trait_shift [95% CI]" in (tmp_path / "comparison.md").read_text()


def _brackets(row, name):
    """Whether the flat columns ``row`` (``trait_effects``) hold an interval of ``name`` that brackets it."""
    return row[f"{name}_ci_low"] - 1e-9 <= row[name] <= row[f"{name}_ci_high"] + 1e-9


def _interval_brackets(value, interval):
    return interval is not None and interval.ci_low - 1e-9 <= value <= interval.ci_high + 1e-9 and 0 <= interval.p <= 1


def test_every_steered_shift_has_an_interval_that_brackets_it_and_the_unsteered_row_is_the_baseline(
        letter_model, shared_data, tmp_path):
    config = CompareConfig(traits=["openness"], methods=["dpn-le", "prompting"], data_dir=str(shared_data),
                           locate_pairs=12, locate_q=0.8, locate_tau_d=0.0, questionnaire_items=6, statements_per_pole=4,
                           capability=CapabilitySizes(1, 1, 1, 16, 1, 16), gamma_sweep=[2.0], q_sweep=[],
                           sweep_methods=["dpn-le"])
    record = run_comparison(letter_model, config, log=lambda message: None)
    for row in record.rows:
        shifts = {"trait_shift": (row.trait_shift, row.trait_shift_interval),
                  "statements_shift": (row.statements_shift, row.statements_shift_interval)}
        assert set(shifts) == set(SHIFT_METRICS)
        for name, (value, interval) in shifts.items():
            if row.method == "unsteered":
                assert value == 0.0 and interval is None
            else:
                assert _interval_brackets(value, interval), (row.method, name)
    steered = next(r for r in record.rows if r.method == "dpn-le" and r.direction == "increase")
    base = next(r for r in record.rows if r.method == "unsteered")
    assert steered.trait_shift == pytest.approx(steered.questionnaire - base.questionnaire, abs=1e-6)
    assert steered.statements_shift == pytest.approx(steered.statements_gap - base.statements_gap, abs=1e-6)
    assert all(_interval_brackets(r.trait_shift, r.trait_shift_interval) for r in record.gamma_sweep)
    summary = {e.method: e for e in record.summary}
    assert not summary["unsteered"].intervals
    for method in config.methods:
        assert all(_interval_brackets(summary[method].means[name], summary[method].intervals[name])
                   for name in SHIFT_METRICS)
    # The HTML report's headline shows the recorded intervals.
    from dpn_lens.report.html import _headline

    write_outputs(record, tmp_path, make_png=False)
    assert "95% interval" in _headline(tmp_path / "comparison.json", [])


def test_trait_effects_sign_the_shifts_by_direction():
    base = {"keyed": np.full(6, 3.0), "yes": np.full(6, 0.5)}
    steered = {"keyed": np.array([3.5, 3.2, 3.4, 3.1, 3.3, 3.6]),
               "yes": np.array([0.7, 0.6, 0.8, 0.4, 0.3, 0.2])}
    high = np.array([True, True, True, False, False, False])
    up, items = trait_effects(steered, base, high, sign=1)
    assert up["trait_shift"] == pytest.approx(0.35) and up["statements_shift"] == pytest.approx(0.2 + 0.2)
    assert up["trait_shift_ci_low"] > 0 and _brackets(up, "statements_shift") and items["statements_shift"].shape == (6,)
    down, _ = trait_effects(steered, base, high, sign=-1)
    assert down["trait_shift"] == pytest.approx(-0.35) and down["statements_shift"] == pytest.approx(-0.4)


def test_default_sizes_are_every_item_of_the_trait_and_every_statement(shared_data):
    import csv

    from dpn_lens.evaluation.compare import _Evaluator

    config = CompareConfig(traits=["openness"], data_dir=str(shared_data))
    assert config.questionnaire_items is None and config.statements_per_pole is None
    evaluator = _Evaluator(None, config)
    folder = shared_data / "ipip" / "ipip_neo_300"
    test_ids = {str(i) for i in json.loads((folder / "split.json").read_text())["test_index"]}
    with open(folder / "item_key.csv", encoding="utf-8") as handle:
        expected = [r for r in csv.DictReader(handle) if r["item"] in test_ids and r["facet_code"].startswith("O")]
    assert len(evaluator.items["openness"]) == len(expected) == 36
    lines = (shared_data / "anthropic_persona" / "openness.jsonl").read_text().splitlines()
    assert len(evaluator.statements["openness"]) == sum(1 for line in lines if line.strip())
    assert {s.high for s in evaluator.statements["openness"]} == {True, False}
    with pytest.raises(ValueError, match=r"questionnaire_items \(or None: all\) must be at least 1"):
        CompareConfig(questionnaire_items=0)


def _parse(*argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return compare_config(parser.parse_args(["compare", "--out", "x", *argv]))


def test_quick_sets_the_small_sizes_and_explicit_options_win():
    quick = _parse("--quick")
    assert (quick.questionnaire_items, quick.statements_per_pole) == (8, 20)
    assert quick.capability == CapabilitySizes.quick() and quick.gamma_sweep == [0.0, 1.0, 2.0] and quick.q_sweep == []
    assert CompareConfig.quick().questionnaire_items == 8 and CompareConfig.quick().q_sweep == []
    full = _parse()
    assert (full.questionnaire_items, full.statements_per_pole) == (None, None) and full.q_sweep
    assert full.capability == CapabilitySizes.quick()  # the capability sizes are today's either way
    mixed = _parse("--quick", "--items", "12", "--statements", "all", "--q-sweep", "0.99")
    assert (mixed.questionnaire_items, mixed.statements_per_pole, mixed.q_sweep) == (12, None, [0.99])
    with pytest.raises(SystemExit):
        _parse("--items", "0")


def test_cli_registers_compare_with_its_options():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--out", "x", "--traits", "openness", "--run", "runs/demo/maps",
                              "--methods", "dpn-le,caa", "--gamma-sweep", "0,1.5"])
    assert args.command == "compare" and args.run == "runs/demo/maps" and args.traits == ["openness"]
    assert args.methods == ["dpn-le", "caa"] and args.gamma_sweep == [0.0, 1.5]
    # space-separated lists and the earlier --maps/--locate-pairs spellings parse to the same
    old = parser.parse_args(["compare", "--out", "x", "--traits", "openness", "--maps", "runs/demo/maps",
                             "--methods", "dpn-le", "caa", "--gamma-sweep", "0", "1.5", "--locate-pairs", "7"])
    assert (old.run, old.methods, old.gamma_sweep, old.n_pairs) == (args.run, args.methods, args.gamma_sweep, 7)
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--out", "x", "--methods", "dpn-le,magic"])


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown methods"):
        CompareConfig(methods=["magic"])


def test_every_method_is_one_registry_entry_and_builds_an_edit_or_a_persona():
    from dpn_lens.evaluation.methods import (COMPARISON_METHODS, DEFAULT_METHOD_NAMES, METHOD_NAMES, METHODS_BY_NAME,
                                             TraitContext)

    from helpers import make_map

    assert METHOD_NAMES == tuple(m.name for m in COMPARISON_METHODS)
    from dpn_lens.effect.rules import EFFECT_RULES

    # compare runs every method but the variants and selection rules that only --methods asks for
    assert tuple(CompareConfig().methods) == DEFAULT_METHOD_NAMES == tuple(
        n for n in METHOD_NAMES if n not in ("dpn-le-sd", "attribution-t-resid") and n not in EFFECT_RULES
        and not n.endswith(("-frozen", "-scaled")))
    context = TraitContext("openness", make_map("openness", {2: [0, 1]}, {3: [5]}, [2, 3]))
    config = CompareConfig(gamma=0.7)
    for name in ("dpn-le", "dpn-le-sd", "dense", "topk", "prompting"):
        edit, persona = METHODS_BY_NAME[name].condition(None, context, "increase", config)
        assert (edit is None) != (persona is None), name
    edit, _ = METHODS_BY_NAME["dpn-le"].condition(None, context, "increase", config)
    assert edit.n_edited == 3 and METHODS_BY_NAME["dpn-le"].default_gamma(config) == 0.7
    assert [m.name for m in COMPARISON_METHODS if not m.sweepable] == ["prompting"]
    # An effect rule's method is the DPN-LE edit on the neurons of that rule's map (TraitContext.maps).
    import dataclasses

    rule_map = dataclasses.replace(context.neuron_map, high={2: context.neuron_map.high[2][:1], 3: context.neuron_map.high[3]},
                                   rule="attribution-t", effect_score=context.neuron_map.steering_value.clone())
    with pytest.raises(KeyError, match="no attribution-t map"):
        METHODS_BY_NAME["attribution-t"].condition(None, context, "increase", config)
    context.maps["attribution-t"] = rule_map
    edit, persona = METHODS_BY_NAME["attribution-t"].condition(None, context, "decrease", config)
    assert persona is None and edit.n_edited == rule_map.n_selected() == 2 and "attribution-t" in edit.label
