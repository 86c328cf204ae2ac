"""Files as people mix them up (issue 24): each loader says what it was given, what it expected and the path
to pass instead, before any checksum; only real corruption says "corrupted"."""

from __future__ import annotations

import json

import pytest

from dpn_lens import ContrastStatistics, NeuronMap
from dpn_lens.cli import main


@pytest.fixture(scope="module")
def run_folder(tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DPN_LENS_CACHE", str(folder.parent / "cache"))
        assert main(["locate", "--model", str(tiny_folder), "--dtype", "float32", "--traits", "openness",
                     "--n-pairs", "8", "--layers", "0-2", "--q", "0.8", "--tau-d", "0.1", "--out", str(folder),
                     "--no-progress"]) == 0
    return folder


def test_the_json_sidecar_names_its_safetensors_twin(run_folder):
    sidecar = run_folder / "maps" / "openness.json"
    with pytest.raises(ValueError, match=r"readable JSON copy .* pass its twin .*maps/openness\.safetensors") as error:
        NeuronMap.load(sidecar)
    assert "corrupt" not in str(error.value)


def test_statistics_given_as_a_map_and_a_map_given_as_statistics(run_folder):
    with pytest.raises(ValueError, match=r"is a statistics file \(stats/<trait>.safetensors\), not a neuron map"):
        NeuronMap.load(run_folder / "stats" / "openness.safetensors")
    with pytest.raises(ValueError, match=r"is a neuron map \(maps/<trait>.safetensors\), not a statistics file"):
        ContrastStatistics.load(run_folder / "maps" / "openness.safetensors")


def test_a_folder_given_as_a_file(run_folder):
    with pytest.raises(ValueError, match=r"is a run folder, not a neuron map; pass one of its files, e.g. .*maps/openness"):
        NeuronMap.load(run_folder)
    with pytest.raises(ValueError, match=r"is a run folder, not a statistics file; .*stats/openness"):
        ContrastStatistics.load(run_folder)
    with pytest.raises(ValueError, match=r"is a folder, not a neuron map; pass one file, e.g. .*openness.safetensors"):
        NeuronMap.load(run_folder / "maps")


def test_an_empty_file_is_empty_not_corrupted(tmp_path):
    path = tmp_path / "openness.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty") as error:
        NeuronMap.load(path)
    assert "corrupt" not in str(error.value)


def test_a_file_from_a_newer_dpn_lens_says_upgrade(run_folder, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    source = run_folder / "maps" / "openness.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    config = json.loads(metadata["dpn_lens_neuron_map"])
    config["format"] = 99
    metadata["dpn_lens_neuron_map"] = json.dumps(config)
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"newer dpn-lens \(artifact format 99; this version reads up to 1\); upgrade"):
        NeuronMap.load(tmp_path / "future.safetensors")


def test_the_cli_passes_the_same_messages_on(run_folder, capsys):
    code = main(["steer", "--map", str(run_folder / "maps" / "openness.json"), "--prompt", "hi", "--gamma", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pass its twin" in err and "corrupt" not in err


def test_steer_refuses_a_map_of_another_model_before_loading_its_weights(run_folder, tiny_folder, tmp_path, monkeypatch,
                                                                         capsys):
    import dataclasses

    import dpn_lens.cli.app as cli

    def no_load(args):
        raise AssertionError("the model was loaded before the map was checked")

    monkeypatch.setattr(cli, "_load", no_load)
    neuron_map = NeuronMap.load(run_folder / "maps" / "openness.safetensors")
    # Located on one embedded model, steered with the other: the names alone tell.
    named = dataclasses.replace(neuron_map, model_name="smollm2-135m-instruct").save(tmp_path / "named.safetensors")
    assert main(["steer", "--map", str(named), "--model", "gemma-3-270m", "--prompt", "hi", "--gamma", "1"]) == 2
    assert "located on smollm2-135m-instruct, not gemma-3-270m" in capsys.readouterr().err
    # A folder whose config.json has another shape: the config alone tells.
    other = tmp_path / "other_model"
    other.mkdir()
    config = json.loads((tiny_folder / "config.json").read_text())
    config["num_hidden_layers"] = config["num_hidden_layers"] + 2
    (other / "config.json").write_text(json.dumps(config))
    assert main(["steer", "--map", str(run_folder / "maps" / "openness.safetensors"), "--model", str(other),
                 "--prompt", "hi", "--gamma", "1"]) == 2
    assert "n_layers" in capsys.readouterr().err


def test_the_input_probes_find_nothing_misleading_silent_or_refused(capsys, monkeypatch, tmp_path):
    """scripts/probe_inputs.py: every probe of issue 24 and the ten more either works or is refused clearly
    before the model loads."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "probe_inputs.py"
    spec = importlib.util.spec_from_file_location("probe_inputs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    assert module.main() == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| probe")]
    assert len(rows) >= 20
    assert all(line.split(" | ")[1] in ("works", "clear") for line in rows), table
