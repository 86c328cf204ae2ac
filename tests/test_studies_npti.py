"""NPTI's neuron sets in the studies: the sets are the neurons NPTI edits, and the overlap and
multifunction studies (and ``dpn-lens study --npti``) report them next to the other methods."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

from dpn_lens import LocalizationSettings, locate, model_fingerprint
from dpn_lens.baselines import NPTIStatistics, npti_intervention, npti_select, npti_statistics, scaled_top_count
from dpn_lens.data.contrastive import embedded_contrastive_set
from dpn_lens.studies import NPTI, NeuronSet, Run, npti_sets, npti_sets_for_run
from dpn_lens.studies.outputs import MultifunctionConfig, multifunction_study, overlap_study_report
from helpers import make_map, make_stats, random_stats


def _random_npti_stats(n_layers: int, d_mlp: int, trait: str = "openness", seed: int = 0) -> NPTIStatistics:
    generator = torch.Generator().manual_seed(seed)
    shape = (n_layers, d_mlp)
    return NPTIStatistics(trait, torch.rand(shape, generator=generator), torch.rand(shape, generator=generator),
                          torch.rand(shape, generator=generator) + 0.5, torch.rand(shape, generator=generator) + 0.5,
                          10, 10)


def _edited(neurons: dict[int, torch.Tensor]) -> set[tuple[int, int]]:
    return {(layer, int(i)) for layer, indices in neurons.items() for i in indices.tolist()}


def _flat_pairs(flat: torch.Tensor, d_mlp: int) -> set[tuple[int, int]]:
    return {(int(i) // d_mlp, int(i) % d_mlp) for i in flat.tolist()}


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("top, min_diff", [(None, 0.1), (10, 0.5), (5, 2.0)])
def test_npti_sets_are_the_neurons_npti_intervention_edits(tiny_model, top, min_diff):
    n_layers, d_mlp = int(tiny_model.cfg.n_layers), int(tiny_model.cfg.d_mlp)
    stats = _random_npti_stats(n_layers, d_mlp)
    high, low = npti_sets(stats, top=top, min_diff=min_diff)
    up = npti_intervention(tiny_model, stats, "increase", top=top, min_diff=min_diff)
    down = npti_intervention(tiny_model, stats, "decrease", top=top, min_diff=min_diff)
    # Raising the trait boosts the high set and clamps the low one; lowering it does the reverse.
    assert high.pairs() == _edited({l: i for l, (i, _) in up.boost.items()}) == _edited(down.clamp)
    assert low.pairs() == _edited(up.clamp) == _edited({l: i for l, (i, _) in down.boost.items()})
    # ... and both are NPTI's rule applied to P_high - P_low over all layers.
    k = scaled_top_count(n_layers * d_mlp) if top is None else top
    assert high.pairs() == _flat_pairs(npti_select(stats.p_high - stats.p_low, k, min_diff), d_mlp)
    assert low.pairs() == _flat_pairs(npti_select(stats.p_low - stats.p_high, k, min_diff), d_mlp)
    # diff lies in (-1, 1): min_diff 2 never extends the top k; the others do.
    assert high.size == k if min_diff > 1 else high.size > k
    assert (high.method, high.pole, low.pole, high.trait) == (NPTI, "high", "low", "openness")
    assert high.layers == low.layers == list(range(n_layers))


def test_npti_sets_restricted_to_layers_drop_other_layers_without_reselecting():
    stats = _random_npti_stats(4, 48)
    full_high, full_low = npti_sets(stats)
    high, low = npti_sets(stats, layers=[1, 3])
    assert high.layers == low.layers == [1, 3]
    assert high.pairs() == full_high.pairs([1, 3]) and low.pairs() == full_low.pairs([1, 3])
    assert high.size < full_high.size                        # NPTI picked neurons in layers 0 and 2 too
    with pytest.raises(ValueError, match="out of range"):
        npti_sets(stats, layers=[4])


def test_npti_sets_for_run_keeps_each_trait_to_its_statistics_layers(tiny_model, other_tiny_model, tmp_path):
    fingerprint = model_fingerprint(tiny_model).to_dict()
    neuron_map = make_map("openness", {2: [0, 1]}, {3: [5]}, [2, 3], n_layers=4, d_mlp=48, fingerprint=fingerprint)
    # A run that collected statistics at layers 1..3 only.
    neuron_map.stat_layers = [1, 2, 3]
    neuron_map.steering_value, neuron_map.effect_size = neuron_map.steering_value[1:], neuron_map.effect_size[1:]
    run = Run(tmp_path, {"openness": neuron_map})
    sets = npti_sets_for_run(tiny_model, run, n_prompts=2, new_tokens=3)
    expected = npti_sets(npti_statistics(tiny_model, embedded_contrastive_set("openness", n_pairs=2, seed=7), 3),
                         layers=[1, 2, 3])
    assert [s.name for s in sets] == ["openness high [NPTI]", "openness low [NPTI]"]
    assert all(s.layers == [1, 2, 3] for s in sets)
    assert [s.pairs() for s in sets] == [s.pairs() for s in expected]
    with pytest.raises(Exception, match="different model"):
        npti_sets_for_run(other_tiny_model, run, n_prompts=2, new_tokens=3)


# ----- overlap study ------------------------------------------------------------------------------
@pytest.fixture
def located_run(tmp_path):
    maps, stats = {}, {}
    for seed, trait in enumerate(("openness", "extraversion")):
        stats[trait] = random_stats(trait, seed)
        maps[trait] = locate(stats[trait], LocalizationSettings([2, 3, 4, 5], 0.95, 0.3))
    return Run(tmp_path, maps, stats)


def _hand_npti_sets(trait: str) -> list[NeuronSet]:
    # NPTI is not limited to the searched layers 2..5: layer 0 neurons must show up too.
    return [NeuronSet(f"{trait} high [NPTI]", {0: torch.tensor([3, 7]), 4: torch.tensor([10])}, 200, trait, "high",
                      NPTI),
            NeuronSet(f"{trait} low [NPTI]", {1: torch.tensor([5])}, 200, trait, "low", NPTI)]


def test_overlap_report_places_npti_neurons_in_the_run_statistics(located_run, tmp_path):
    out = tmp_path / "figs"
    extra = {NPTI: _hand_npti_sets("openness") + _hand_npti_sets("extraversion")}
    summary = overlap_study_report(located_run, out, png=False, log=None, extra_sets=extra)
    points = [r for r in _read_csv(out / "overlap_exclusivity_neurons.csv") if r["method"] == NPTI]
    openness = {(r["pole"], int(r["layer"]), int(r["neuron"])): r for r in points if r["trait"] == "openness"}
    assert set(openness) == {("high", 0, 3), ("high", 0, 7), ("high", 4, 10), ("low", 1, 5)}
    stats, neuron_map = located_run.stats["openness"], located_run.maps["openness"]
    assert float(openness[("high", 0, 7)]["mean_high"]) == pytest.approx(float(stats.high.mean[0, 7]))
    assert float(openness[("low", 1, 5)]["mean_low"]) == pytest.approx(float(stats.low.mean[1, 5]))
    assert float(openness[("high", 4, 10)]["d"]) == pytest.approx(float(neuron_map.effect_size[4, 10]))

    rows = {(r["trait"], r["pole"]): r for r in _read_csv(out / "overlap_exclusivity.csv") if r["method"] == NPTI}
    assert set(rows) == {(t, p) for t in ("openness", "extraversion") for p in ("high", "low")}
    d_high = neuron_map.effect_size[[0, 0, 4], [3, 7, 10]]
    assert int(rows[("openness", "high")]["n"]) == 3
    expected_sign = float((d_high > 0).double().mean())
    assert float(rows[("openness", "high")]["frac_sign_consistent"]) == pytest.approx(expected_sign)
    # Layer 1 was not searched: |s| is judged against the map's q-quantile of that layer.
    tau_1 = float(torch.quantile(neuron_map.steering_value[1].abs().double(), neuron_map.settings.q))
    small = float(abs(neuron_map.steering_value[1, 5]) <= tau_1)
    assert float(rows[("openness", "low")]["frac_small_s"]) == small
    assert summary["exclusivity_mean_over_traits"]["NPTI high"]["n"] == 3
    assert summary["exclusivity_mean_over_traits"]["NPTI low"]["n"] == 1
    assert "Openness: NPTI" in (out / "overlap_exclusivity.html").read_text()

    plain = overlap_study_report(located_run, tmp_path / "plain", png=False, log=None)
    assert not any(r["method"] == NPTI for r in _read_csv(tmp_path / "plain" / "overlap_exclusivity.csv"))
    assert "NPTI high" not in plain["exclusivity_mean_over_traits"]


def test_extra_sets_that_do_not_fit_the_run_are_refused(located_run, tmp_path):
    high, low = _hand_npti_sets("openness")
    with pytest.raises(ValueError, match="has method"):
        overlap_study_report(located_run, tmp_path, png=False, log=None, extra_sets={"other": [high]})
    stray = NeuronSet("openness high [NPTI]", {6: torch.tensor([1])}, 200, "openness", "high", NPTI)
    with pytest.raises(ValueError, match="outside the run's statistics layers"):
        overlap_study_report(located_run, tmp_path, png=False, log=None, extra_sets={NPTI: [stray]})
    foreign = NeuronSet("neuroticism high [NPTI]", {0: torch.tensor([1])}, 200, "neuroticism", "high", NPTI)
    with pytest.raises(ValueError, match="no map"):
        overlap_study_report(located_run, tmp_path, png=False, log=None, extra_sets={NPTI: [foreign]})
    with pytest.raises(ValueError, match="already one of"):
        overlap_study_report(located_run, tmp_path, png=False, log=None, extra_sets={"DPN-LE": []})


# ----- multifunction study ------------------------------------------------------------------------
def test_multifunction_study_reports_npti_overlap_and_costs(tiny_model, shared_data, tmp_path):
    from dpn_lens.studies import multifunction as mf

    fingerprint = model_fingerprint(tiny_model).to_dict()
    maps = {"openness": make_map("openness", {2: [0, 1, 2]}, {3: [5]}, [2, 3], n_layers=4, d_mlp=48,
                                 fingerprint=fingerprint)}
    high, low = npti_sets(_random_npti_stats(4, 48), top=4, min_diff=0.6)
    assert high.layers == [0, 1, 2, 3] and high.size + low.size > 8
    options = dict(n_text=2, n_multiple_choice=2, n_held_out=2, window=16, fraction=0.1, seed=0)
    out = tmp_path / "out"
    summary = multifunction_study(Run(tmp_path, maps), out, tiny_model,
                                  MultifunctionConfig(data_dir=shared_data, methods=("DPN-LE",), **options),
                                  png=False, log=None, extra_sets={NPTI: [high, low]})
    overlap = {r["pole"]: r for r in _read_csv(out / "multifunction_capability_overlap.csv") if r["method"] == NPTI}
    assert set(overlap) == {"high", "low", "both"}
    assert int(overlap["high"]["n"]) == high.size and int(overlap["both"]["n"]) == high.size + low.size
    assert summary["by_method"][NPTI]["mean_set_size"] == high.size + low.size
    assert summary["by_method"]["DPN-LE"]["mean_set_size"] == 4

    [cost] = [r for r in _read_csv(out / "multifunction_costs.csv") if r["method"] == NPTI]
    assert cost["set"] == "openness [NPTI]" and int(cost["n"]) == high.size + low.size
    # The cost is the held-out loss with exactly the NPTI neurons zeroed.
    data = mf.load_capability_data(tiny_model, shared_data, 2, 2, 2, 16, 0)
    both = NeuronSet("both", {l: torch.cat([high.neurons[l], low.neurons[l]]) for l in high.layers}, 48)
    ablated = mf.lm_loss(tiny_model, data.held_out, mf.ablation(both))
    assert float(cost["ablated_loss"]) == pytest.approx(ablated, rel=1e-6)
    assert float(cost["ablation_cost"]) != 0.0
    assert "NPTI" in (out / "multifunction_costs.html").read_text()


# ----- command line -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from dpn_lens.cli.study import register

    parser = argparse.ArgumentParser(prog="dpn-lens")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_study_cli_parses_the_npti_options():
    parser = _parser()
    args = parser.parse_args(["study", "overlap", "--run", "r", "--npti", "--device", "cpu"])
    assert (args.npti, args.npti_prompts, args.npti_tokens, args.model, args.device) == (True, 16, 24, None, "cpu")
    args = parser.parse_args(["study", "all", "--run", "r", "--npti", "--npti-prompts", "4", "--npti-tokens", "8",
                              "--model", "m", "--data-dir", "d"])
    assert (args.npti, args.npti_prompts, args.npti_tokens, args.model) == (True, 4, 8, "m")
    assert parser.parse_args(["study", "multifunction", "--run", "r"]).npti is False
    with pytest.raises(SystemExit):
        parser.parse_args(["study", "layers", "--run", "r", "--npti"])


@pytest.fixture
def tiny_run_dir(tiny_model, tmp_path):
    fingerprint = model_fingerprint(tiny_model).to_dict()
    folder = tmp_path / "run"
    generator = torch.Generator().manual_seed(0)
    for trait in ("openness", "extraversion"):
        make_map(trait, {2: [0, 1, 2]}, {3: [5]}, [2, 3], n_layers=4, d_mlp=48, fingerprint=fingerprint).save(
            folder / "maps" / f"{trait}.safetensors")
        make_stats(trait, torch.randn(4, 48, generator=generator), torch.randn(4, 48, generator=generator)).save(
            folder / "stats" / f"{trait}.safetensors")
    return folder


def _no_model_load(*args, **kwargs):
    raise AssertionError("the study must not load a model here")


def test_study_cli_npti_without_a_known_model_is_an_error(tiny_run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("dpn_lens.models.load_model", _no_model_load)
    args = _parser().parse_args(["study", "overlap", "--run", str(tiny_run_dir), "--out", str(tmp_path / "o"),
                                 "--no-png", "--npti"])
    with pytest.raises(ValueError, match="pass --model"):
        args.handler(args)
    assert not (tmp_path / "o").exists()                    # refused before any work


def test_study_cli_npti_builds_the_sets_once_and_reports_them(tiny_model, tiny_run_dir, tmp_path, monkeypatch):
    loaded = []

    def fake_load_model(name, dtype=None, device=None):
        loaded.append(name)
        return tiny_model

    (tiny_run_dir / "summary.json").write_text(json.dumps({"model": "tiny-llama"}))
    monkeypatch.setattr("dpn_lens.models.load_model", fake_load_model)
    parser = _parser()
    out = tmp_path / "o"
    args = parser.parse_args(["study", "overlap", "--run", str(tiny_run_dir), "--out", str(out), "--no-png",
                              "--npti", "--npti-prompts", "2", "--npti-tokens", "3"])
    assert args.handler(args) == 0
    assert loaded == ["tiny-llama"]
    rows = [r for r in _read_csv(out / "overlap_exclusivity.csv") if r["method"] == NPTI]
    assert {(r["trait"], r["pole"]) for r in rows} == {(t, p) for t in ("openness", "extraversion")
                                                       for p in ("high", "low")}
    expected = npti_sets(npti_statistics(tiny_model, embedded_contrastive_set("openness", n_pairs=2, seed=7), 3))
    assert int(next(r for r in rows if r["trait"] == "openness" and r["pole"] == "high")["n"]) == expected[0].size

    monkeypatch.setattr("dpn_lens.models.load_model", _no_model_load)
    plain = tmp_path / "plain"
    args = parser.parse_args(["study", "overlap", "--run", str(tiny_run_dir), "--out", str(plain), "--no-png"])
    assert args.handler(args) == 0
    assert not any(r["method"] == NPTI for r in _read_csv(plain / "overlap_exclusivity.csv"))
    assert Run.load(tiny_run_dir).traits == ["openness", "extraversion"]
