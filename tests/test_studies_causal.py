"""`dpn-lens locate --select` keeps each effect rule's maps beside DPN-LE's, and `dpn-lens study causal`
compares them: overlap against chance, layers, pole exclusivity and the capability cost of the neurons."""

from __future__ import annotations

import json

import pytest

from dpn_lens import NeuronMap, WrongRuleError
from dpn_lens.cli import main
from dpn_lens.run import Run, RunFolderError, check_run_folder


@pytest.fixture(scope="module")
def rules_run(tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rules") / "run"
    with pytest.MonkeyPatch.context() as patch:      # this module's cache only: later modules need the real one
        patch.setenv("DPN_LENS_CACHE", str(folder.parent / "cache"))
        code = main(["locate", "--model", str(tiny_folder), "--dtype", "float32", "--traits", "openness,E",
                     "--n-pairs", "12", "--layers", "0-2", "--q", "0.8", "--tau-d", "0.1", "--select",
                     "attribution-t,write-layer", "--selection-pairs", "24", "--budget", "5", "--out", str(folder),
                     "--no-progress"])
    assert code == 0
    return folder


def test_locate_select_writes_each_rules_maps_beside_the_dual_criterions(rules_run, capsys):
    for trait in ("openness", "extraversion"):
        assert NeuronMap.load(rules_run / "maps" / f"{trait}.safetensors").rule == "dpn-le"
        for rule in ("attribution-t", "write-layer"):
            chosen = NeuronMap.load(rules_run / "maps" / rule / f"{trait}.safetensors", rule=rule)
            assert chosen.n_selected() == 5 and chosen.selection["budget"] == 5
    run = Run.load(rules_run)
    assert set(run.rule_maps) == {"attribution-t", "write-layer"} and set(run.maps) == {"openness", "extraversion"}
    summary = json.loads((rules_run / "summary.json").read_text())
    assert summary["rules"]["write-layer"]["openness"]["rule"] == "write-layer"
    manifest = json.loads((rules_run / "manifest.json").read_text())
    assert set(manifest["traits"]["openness"]["rule_maps_sha256"]) == {"attribution-t", "write-layer"}


def test_steer_takes_an_effect_rules_map_and_checks_its_run(rules_run, tiny_folder, capsys):
    from dpn_lens.run import run_folder_of

    path = rules_run / "maps" / "attribution-t" / "openness.safetensors"
    assert run_folder_of(path) == rules_run
    code = main(["steer", "--model", str(tiny_folder), "--dtype", "float32", "--map", str(path), "--gamma", "2",
                 "--prompt", "what would you do ?", "--max-new-tokens", "4"])
    assert code == 0, capsys.readouterr().err
    assert "increase" in capsys.readouterr().out


def test_a_run_folder_refuses_a_swapped_or_misplaced_rule_map(rules_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(rules_run, copy)
    # An effect rule's map where the DPN-LE map belongs is refused, not read as DPN-LE's.
    shutil.copy(copy / "maps" / "attribution-t" / "openness.safetensors", copy / "maps" / "openness.safetensors")
    with pytest.raises(RunFolderError, match="replaced"):
        check_run_folder(copy)
    with pytest.raises(WrongRuleError, match="not a 'dpn-le' map"):
        Run.load(copy, check=False)
    # A replaced rule map is caught by its checksum.
    shutil.copytree(rules_run, tmp_path / "second")
    target = tmp_path / "second" / "maps" / "write-layer" / "openness.safetensors"
    shutil.copy(tmp_path / "second" / "maps" / "write-layer" / "extraversion.safetensors", target)
    with pytest.raises(RunFolderError, match="write-layer/openness.safetensors is missing or was replaced"):
        check_run_folder(tmp_path / "second")


def test_study_causal_compares_the_rules_with_dpn_le(rules_run, tmp_path, tiny_folder, capsys):
    out = tmp_path / "causal"
    code = main(["study", "causal", "--run", str(rules_run), "--out", str(out), "--no-png", "--no-capability",
                 "--model", str(tiny_folder)])
    assert code == 0, capsys.readouterr().err
    overlap = json.loads((out / "causal_summary.json").read_text())["overlap"]
    assert {(r["rule"], r["trait"]) for r in overlap} == {(rule, trait) for rule in ("attribution-t", "write-layer")
                                                          for trait in ("openness", "extraversion")}
    for row in overlap:
        assert 0 <= row["shared"] <= row["n_rule"] == 5 and 0 <= row["p_value_layer_matched"] <= 1
    exclusivity = (out / "causal_exclusivity.csv").read_text()
    assert "attribution-t" in exclusivity and "dpn-le" in exclusivity
    text = (out / "causal.md").read_text()
    assert "Overlap with DPN-LE's neurons" in text and "Exclusivity between poles" in text
    assert (out / "causal_layers.html").exists()


def test_study_causal_without_rule_maps_says_how_to_make_them(tiny_folder, tmp_path, capsys):
    run = tmp_path / "plain"
    assert main(["locate", "--model", str(tiny_folder), "--traits", "openness", "--n-pairs", "8", "--layers", "0-2",
                 "--q", "0.8", "--tau-d", "0.1", "--out", str(run), "--no-progress"]) == 0
    code = main(["study", "causal", "--run", str(run), "--out", str(tmp_path / "x"), "--no-capability"])
    assert code == 2 and "--select attribution" in capsys.readouterr().err
