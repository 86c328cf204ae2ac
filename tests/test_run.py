"""The one run-folder object: layout, load/save round trip, the summary and the share of neurons edited."""

from __future__ import annotations

import json

import pytest

from dpn_lens.localization.localize import locate
from dpn_lens.run import (MAPS_DIR, STATS_DIR, SUMMARY_FILE, Run, find_map, map_path, percent_of_all_mlp,
                          stats_path)

from helpers import make_map, random_stats


def test_percent_of_all_mlp_counts_every_layer_of_the_model_not_only_the_searched_ones():
    neuron_map = make_map("openness", {2: [0, 1, 2]}, {3: [5]}, [2, 3], n_layers=6, d_mlp=20)
    assert percent_of_all_mlp(neuron_map) == pytest.approx(100 * 4 / (6 * 20))
    assert percent_of_all_mlp(neuron_map, "high") == pytest.approx(100 * 3 / (6 * 20))
    assert 100 * neuron_map.fraction_selected() == pytest.approx(100 * 4 / (2 * 20))


def test_save_then_load_gives_the_same_maps_stats_and_summary(tmp_path):
    stats = {trait: random_stats(trait, seed) for seed, trait in enumerate(["extraversion", "openness"])}
    maps = {trait: locate(s, q=0.95, tau_d=0.2, layers=[2, 3]) for trait, s in stats.items()}
    run = Run(tmp_path / "run", maps, stats, seconds={"openness": 1.26}, model_name="constructed")
    run.save()
    assert map_path(run.folder, "openness") == tmp_path / "run" / MAPS_DIR / "openness.safetensors"
    assert stats_path(run.folder, "openness").parent.name == STATS_DIR and stats_path(run.folder, "openness").exists()
    loaded = Run.load(tmp_path / "run")
    assert loaded.traits == ["openness", "extraversion"]          # Big Five order, whatever the input order
    assert set(loaded.stats) == set(stats) and loaded.model_name == "constructed"
    assert loaded.summary == json.loads((tmp_path / "run" / SUMMARY_FILE).read_text()) == run.summary_dict()
    assert loaded.summary["traits"]["openness"]["seconds"] == 1.3
    assert loaded.summary["traits"]["openness"]["percent_of_all_mlp_neurons"] == percent_of_all_mlp(maps["openness"])
    # `compare --maps` takes a run folder or its maps folder.
    assert find_map(tmp_path / "run", "openness") == map_path(tmp_path / "run", "openness")
    assert find_map(tmp_path / "run" / MAPS_DIR, "openness") == map_path(tmp_path / "run", "openness")
    assert find_map(tmp_path / "run", "agreeableness") is None


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no neuron maps.*dpn-lens locate"):
        Run.load(tmp_path)
    make_map("openness", {2: [0]}, {}, [2], d_mlp=20).save(map_path(tmp_path, "openness"))
    make_map("extraversion", {2: [0]}, {}, [2], d_mlp=30).save(map_path(tmp_path, "extraversion"))
    with pytest.raises(ValueError, match="different widths"):
        Run.load(tmp_path)


def test_a_run_without_a_folder_cannot_be_saved_without_one(tmp_path):
    run = Run(None, {"openness": make_map("openness", {2: [0]}, {}, [2])})
    with pytest.raises(ValueError, match="no folder"):
        run.save()
    assert run.save(tmp_path) == tmp_path and Run.load(tmp_path).traits == ["openness"]


def test_locate_config_parses_traits_and_round_trips_through_a_dict():
    from dpn_lens.collection.collect import CollectionConfig
    from dpn_lens.localization.localize import LocalizationSettings
    from dpn_lens.pipeline import LocateConfig

    config = LocateConfig("o,E", settings=LocalizationSettings([1, 2], 0.99, 0.5), layers=[1, 2],
                          collection=CollectionConfig(progress=False, max_batch_size=4))
    assert config.traits == ["openness", "extraversion"] and LocateConfig().traits == LocateConfig("all").traits
    assert LocateConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown data source"):
        LocateConfig(source="wikipedia")
