"""The comparison runner end to end on a tiny model, and the CLI wiring."""

from __future__ import annotations

import argparse
import json

import pytest

from dpn_lens.evaluation.capability import CapabilitySizes
from dpn_lens.evaluation.cli import register
from dpn_lens.evaluation.compare import CompareConfig, run_comparison, write_outputs
from helpers import build_letter_model


@pytest.fixture(scope="module")
def letter_model(tmp_path_factory):
    return build_letter_model(tmp_path_factory.mktemp("letters_compare"))


def test_comparison_writes_every_method_trait_direction_and_sweep(letter_model, shared_data, tmp_path):
    config = CompareConfig(traits=["openness"], data_dir=str(shared_data), locate_pairs=12, locate_q=0.8, locate_tau_d=0.0, questionnaire_items=2,
                           statements_per_pole=1, capability=CapabilitySizes(1, 1, 1, 16, 1, 16), npti_prompts=2,
                           npti_new_tokens=3, caa_pairs=6, gamma_sweep=[0.0, 1.0], q_sweep=[0.999, 0.97])
    result = run_comparison(letter_model, config, log=lambda message: None)
    methods = {(r["method"], r["direction"]) for r in result["rows"]}
    assert methods == {("unsteered", "none")} | {(m, d) for m in config.methods for d in ("increase", "decrease")}
    for row in result["rows"]:
        assert 0 <= row["pct_edited"] <= 100 and 1 <= row["questionnaire"] <= 5
    unsteered = next(r for r in result["rows"] if r["method"] == "unsteered")
    assert unsteered["kl"] == pytest.approx(0.0, abs=1e-7)
    zero = [r for r in result["gamma_sweep"] if r["gamma"] == 0.0 and r["method"] in ("dpn-le", "dense")]
    assert zero and all(r["kl"] == pytest.approx(0.0, abs=1e-6) for r in zero)  # gamma 0 changes nothing
    q = {r["q"]: r["n_edited"] for r in result["q_sweep"]}
    assert q[0.97] >= q[0.999]
    files = {p.name for p in write_outputs(result, tmp_path, make_png=False)}
    assert {"rows.csv", "comparison.json", "comparison.md", "tradeoff.html"} <= files
    assert json.loads((tmp_path / "comparison.json").read_text())["meta"]["n_mlp_neurons"] == 2 * 48


def test_cli_registers_compare_with_its_options():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--out", "x", "--traits", "openness", "--maps", "runs/demo/maps"])
    assert args.command == "compare" and args.maps == "runs/demo/maps" and args.traits == ["openness"]
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--out", "x", "--methods", "magic"])


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown methods"):
        CompareConfig(methods=["magic"])


def test_every_method_is_one_registry_entry_and_builds_an_edit_or_a_persona():
    from dpn_lens.evaluation.methods import COMPARISON_METHODS, METHOD_NAMES, METHODS_BY_NAME, TraitContext

    from helpers import make_map

    assert METHOD_NAMES == tuple(m.name for m in COMPARISON_METHODS) == tuple(CompareConfig().methods)
    context = TraitContext("openness", make_map("openness", {2: [0, 1]}, {3: [5]}, [2, 3]))
    config = CompareConfig(gamma=0.7)
    for name in ("dpn-le", "dense", "topk", "prompting"):
        edit, persona = METHODS_BY_NAME[name].condition(None, context, "increase", config)
        assert (edit is None) != (persona is None), name
    edit, _ = METHODS_BY_NAME["dpn-le"].condition(None, context, "increase", config)
    assert edit.n_edited == 3 and METHODS_BY_NAME["dpn-le"].default_gamma(config) == 0.7
    assert [m.name for m in COMPARISON_METHODS if not m.sweepable] == ["prompting"]
