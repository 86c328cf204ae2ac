"""The command line end to end on a tiny local Hugging Face folder: locate, then steer with its map."""

from __future__ import annotations

import json

import torch

import pytest

from dpn_lens import NeuronMap
from dpn_lens.cli import main


def test_locate_writes_maps_stats_and_a_summary_then_steer_uses_the_map(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["locate", "--model", str(tiny_folder), "--traits", "extraversion,N", "--n-pairs", "8",
                 "--layers", "0-2", "--q", "0.8", "--tau-d", "0.1", "--out", str(run), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "extra high" in printed and "neuro low" in printed and "% all MLP" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["traits"]) == {"extraversion", "neuroticism"}
    neuron_map = NeuronMap.load(run / "maps" / "extraversion.safetensors")
    assert neuron_map.layers == [0, 1, 2] and neuron_map.n_high_samples == 8
    assert summary["traits"]["extraversion"]["high"] == neuron_map.n_selected("high")
    assert (run / "stats" / "neuroticism.safetensors").exists()

    code = main(["steer", "--model", str(tiny_folder), "--map", str(run / "maps" / "extraversion.safetensors"),
                 "--prompt", "you are outgoing . what would you do ?", "--gamma", "50", "--max-new-tokens", "4"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[:4]] == ["Q", "unsteered", "increase", "decrease"]


def test_bad_input_is_one_clear_line_and_exit_code_2(tiny_folder, tmp_path, capsys):
    code = main(["locate", "--model", str(tiny_folder), "--traits", "humour", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "unknown trait 'humour'" in capsys.readouterr().err


def test_shared_options_are_spelled_the_same_in_every_command_and_help_shows_defaults(capsys):
    from dpn_lens.cli import build_parser

    parser = build_parser()
    for argv in (["locate", "--out", "r"], ["demo"], ["compare", "--out", "c"]):
        for traits in (["openness,E"], ["openness", "E"]):
            args = parser.parse_args(argv + ["--traits", *traits, "--device", "cpu", "--dtype", "float32"])
            assert args.device == "cpu" and args.dtype == "float32"
            from dpn_lens.pipeline import parse_traits

            assert parse_traits(args.traits) == ["openness", "extraversion"]
    for argv in (["locate", "--out", "r"], ["compare", "--out", "c"], ["study", "multifunction", "--run", "r"]):
        assert parser.parse_args(argv).data_dir is None          # resolved later by resolve_data_dir
    with pytest.raises(SystemExit):
        parser.parse_args(["locate", "--help"])
    locate_help = " ".join(capsys.readouterr().out.split())    # argparse wraps lines
    assert "(default: 1000)" in locate_help
    from dpn_lens.effect.rules import RULE_NAMES

    assert all(rule in locate_help for rule in RULE_NAMES), "locate --select's help must name every selection rule"


def test_every_subcommand_has_one_handler():
    from dpn_lens.cli import build_parser

    parser = build_parser()
    for argv in (["locate", "--out", "r"], ["steer", "--map", "m", "--prompt", "p"], ["demo"],
                 ["study", "layers", "--run", "r"], ["compare", "--out", "c"], ["report", "--run", "r"]):
        args = parser.parse_args(argv)
        assert callable(args.handler) and not hasattr(args, "func")


def test_each_thing_has_one_spelling_in_every_verb():
    """Issue 26: a run folder is --run, pair counts are --n-pairs/--eval-pairs/--selection-pairs, lists are
    comma lists (CommaList), --plotlyjs values are inline|cdn|directory: in every verb's visible options."""
    import argparse

    from dpn_lens.cli.options import CommaList

    from dpn_lens.cli import build_parser
    from dpn_lens.cli.reference import verb_parsers

    parsers = {"": build_parser(), **verb_parsers()}   # the top level's own options too
    assert {"control", "compare", "cards", "explore", "report", "study causal", "plan"} <= set(parsers)
    for words, parser in parsers.items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            where = f"dpn-lens {words} {'/'.join(action.option_strings) or action.dest}"
            assert not set(action.option_strings) & {"--maps", "--locate-pairs", "--pairs", "--effect-pairs"}, where
            assert action.option_strings or action.dest not in ("run", "run_dir"), f"{where}: a run folder is --run DIR"
            for option in action.option_strings:
                if "pairs" in option:
                    assert option in ("--n-pairs", "--eval-pairs", "--selection-pairs", "--measure-pairs",
                                      "--pairs-cached"), where
            if action.nargs in ("+", "*") and not isinstance(action, argparse._AppendAction):
                assert isinstance(action, CommaList), f"{where}: a list option must take a comma list"
            if "--plotlyjs" in action.option_strings:
                assert set(action.choices) <= {"inline", "cdn", "directory"}, where
            if "--run" in action.option_strings:
                assert action.dest == "run", where


def test_the_earlier_spellings_still_parse_to_the_new_options_and_say_so(capsys):
    from dpn_lens.cli import build_parser

    parser = build_parser()
    new = parser.parse_args(["control", "--out", "o", "--run", "m", "--n-pairs", "9", "--eval-pairs", "7",
                             "--methods", "dpn-le,caa", "--merge", "a,b"])
    assert capsys.readouterr().err == ""
    old = parser.parse_args(["control", "--out", "o", "--maps", "m", "--locate-pairs", "9", "--pairs", "7",
                             "--methods", "dpn-le,caa", "--merge", "a", "b"])
    for name in ("run", "n_pairs", "eval_pairs", "methods", "merge"):
        assert getattr(old, name) == getattr(new, name), name
    err = capsys.readouterr().err
    assert all(f"is now spelled {option}" in err for option in ("--run", "--n-pairs", "--eval-pairs"))
    cards = parser.parse_args(["cards", "runs/demo", "--effect-pairs", "5", "--rules", "dpn-le,attribution-t"])
    assert (cards.run_positional, cards.eval_pairs, cards.rules) == ("runs/demo", 5, ["dpn-le", "attribution-t"])
    residual = parser.parse_args(["study", "residual", "--run", "r", "--pairs", "6"])
    assert residual.n_pairs == 6


def test_a_run_folder_given_twice_or_not_at_all_is_one_clear_error(tmp_path, capsys):
    assert main(["cards", str(tmp_path / "a"), "--run", str(tmp_path / "b")]) == 2
    assert "two run folders given" in capsys.readouterr().err
    assert main(["explore"]) == 2
    assert "needs a run folder: pass --run DIR" in capsys.readouterr().err


def test_study_errors_are_one_line_and_exit_code_2(tmp_path, capsys):
    code = main(["study", "layers", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpn-lens study: error: no neuron maps") and "\n" not in err


def test_locate_without_prefix_sharing_gives_the_same_statistics(tiny_folder, tmp_path, monkeypatch):
    import dpn_lens.collection.collect
    from dpn_lens.collection.statistics import ContrastStatistics

    plans = []
    planner = dpn_lens.collection.collect.plan_prefix_tree
    monkeypatch.setattr(dpn_lens.collection.collect, "plan_prefix_tree", lambda *a, **k: plans.append(1) or planner(*a, **k))

    common = ["locate", "--model", str(tiny_folder), "--dtype", "float32", "--traits", "extraversion", "--n-pairs", "8",
              "--layers", "0-2", "--q", "0.8", "--tau-d", "0.1", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "shared")]) == 0
    assert plans, "the default path plans shared prefixes"
    plans.clear()
    assert main(common + ["--out", str(tmp_path / "plain"), "--no-share-prefix"]) == 0
    assert not plans, "--no-share-prefix runs every prompt in full"
    assert main(common + ["--out", str(tmp_path / "off"), "--share-prefix", "off"]) == 0
    assert not plans, "--share-prefix off is --no-share-prefix"
    shared = ContrastStatistics.load(tmp_path / "shared" / "stats" / "extraversion.safetensors")
    plain = ContrastStatistics.load(tmp_path / "plain" / "stats" / "extraversion.safetensors")
    torch.testing.assert_close(shared.high.mean, plain.high.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared.low.mean, plain.low.mean, rtol=1e-5, atol=1e-6)


def test_the_option_reference_in_the_docs_is_current_and_every_option_says_what_it_does():
    """docs/CLI.md is generated from the parsers (`python -m dpn_lens.cli.reference > docs/CLI.md`)."""
    from pathlib import Path

    from dpn_lens.cli.reference import option_rows, options_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "CLI.md"
    assert doc.read_text(encoding="utf-8") == options_markdown(), "regenerate: python -m dpn_lens.cli.reference > docs/CLI.md"
    rows = option_rows()
    assert not [row.option for row in rows if not row.meaning], "give these options a help text"
    assert {"--run", "--n-pairs", "--eval-pairs", "--metrics"} <= {row.option for row in rows}
