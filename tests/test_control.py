"""Trait control: calibration on constructed curves, the evaluation end to end on a tiny model, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from dpn_lens.evaluation.calibrate import Calibration, CurvePoint, KLProbe, calibrate_gamma, gamma_at, probe_chunks
from dpn_lens.evaluation.control import ControlConfig, matched_cost_rows, run_control
from dpn_lens.report.control import write_control_outputs
from helpers import write_personalitybench
from dpn_lens.models import model_fingerprint
from dpn_lens.steering import steering_intervention

from helpers import make_map


class PowerLawProbe:
    """A stand-in for KLProbe whose KL is exactly ``c * gamma**power`` (the edit's gamma is its label)."""

    def __init__(self, c: float = 0.004, power: float = 2.0):
        self.c, self.power, self.calls = c, power, []

    def __call__(self, edit):
        gamma = float(edit)
        self.calls.append(gamma)
        return self.c * gamma ** self.power, 10.0 + gamma


def test_gamma_at_recovers_a_power_law_exactly():
    gammas = [0.25, 0.5, 1, 2, 4, 8, 16, 32]
    kls = [0.004 * g ** 2 for g in gammas]
    for target in (0.01, 0.05, 0.1, 1.0):
        assert gamma_at(gammas, kls, target) == pytest.approx(math.sqrt(target / 0.004), rel=1e-9)
    assert math.isnan(gamma_at(gammas, kls, 100.0))      # never reached
    assert math.isnan(gamma_at(gammas, kls, 1e-6))       # below the first point: no crossing on the grid
    # Linear values (a shift) are interpolated in log gamma.
    assert gamma_at([1, 4], [0.0, 1.0], 0.5, log_values=False) == pytest.approx(2.0)


def test_calibrate_gamma_finds_the_known_gamma_on_a_constructed_curve(tiny_model):
    probe = PowerLawProbe()
    calibration = calibrate_gamma(tiny_model, edit_at=lambda gamma: gamma, probe=probe, target_kl=0.05)
    assert isinstance(calibration, Calibration) and calibration.reached and calibration.target == "kl"
    assert calibration.gamma == pytest.approx(math.sqrt(0.05 / 0.004), rel=1e-9)
    # One probe at gamma 1 predicts the target (KL ~ gamma^2); the grid points around it bracket it: 2 and 4.
    assert probe.calls == [1.0, 2.0, 4.0]
    assert [p.gamma for p in calibration.points] == probe.calls and "reaches KL 0.05" in calibration.describe()


@pytest.mark.parametrize("c,power,target", [(0.004, 2.0, 0.05), (1e-4, 1.5, 0.05), (2e-5, 2.5, 0.01), (0.3, 3.0, 0.1),
                                            (1e-5, 2.0, 0.05), (0.02, 1.0, 0.5)])
def test_the_bracket_search_reads_the_gamma_a_full_grid_sweep_reads(tiny_model, c, power, target):
    from dpn_lens.evaluation.calibrate import GAMMA_GRID

    probe = PowerLawProbe(c, power)
    fast = calibrate_gamma(tiny_model, edit_at=lambda gamma: gamma, probe=probe, target_kl=target)
    grid = list(GAMMA_GRID)
    kls = [c * g ** power for g in grid]
    assert fast.gamma == pytest.approx(gamma_at(grid, kls, target), rel=1e-12)
    assert len(probe.calls) <= 4 < len(grid)
    # A guess (the other direction's gamma) changes where the search starts, not what it finds.
    guessed = PowerLawProbe(c, power)
    assert calibrate_gamma(tiny_model, edit_at=lambda gamma: gamma, probe=guessed, target_kl=target,
                           start=fast.gamma).gamma == pytest.approx(fast.gamma, rel=1e-12)
    assert len(guessed.calls) <= 3


def test_calibrate_directions_calibrates_each_direction_as_calibrate_gamma_does(tiny_model):
    """The one per-direction calibration of steer and the demo: each direction's gamma is calibrate_gamma's
    for that direction's edit; the second search starts at the first's gamma and needs fewer probes."""
    from dpn_lens.evaluation.calibrate import calibrate_directions

    scale = {"increase": 1.0, "decrease": 1.3}        # the decrease edit costs a little more KL per gamma
    probe = PowerLawProbe()
    both = calibrate_directions(tiny_model, 0.05, probe=probe, edit_at=lambda direction, gamma: gamma * scale[direction])
    assert list(both) == ["increase", "decrease"]
    for direction, calibration in both.items():
        alone = calibrate_gamma(tiny_model, edit_at=lambda gamma: gamma * scale[direction], probe=PowerLawProbe(),
                                target_kl=0.05)
        assert calibration.gamma == pytest.approx(alone.gamma, rel=1e-12) and calibration.reached
    assert both["decrease"].gamma == pytest.approx(both["increase"].gamma / 1.3, rel=1e-9)
    assert len(both["decrease"].points) <= len(both["increase"].points)


def test_calibrate_gamma_goes_below_the_grid_and_reports_an_unreached_target(tiny_model):
    steep = PowerLawProbe(c=4.0)                        # KL 0.25 already at gamma 0.25
    calibration = calibrate_gamma(tiny_model, edit_at=lambda gamma: gamma, probe=steep, target_kl=0.05)
    assert calibration.reached and calibration.gamma == pytest.approx(math.sqrt(0.05 / 4.0), rel=1e-9)
    assert min(p.gamma for p in calibration.points) < 0.25
    flat = PowerLawProbe(c=1e-6)                        # KL 0.016 at gamma 128: 0.05 is never reached
    calibration = calibrate_gamma(tiny_model, edit_at=lambda gamma: gamma, probe=flat, target_kl=0.05)
    assert not calibration.reached and calibration.gamma == 128.0 and "not reached" in calibration.describe()


def test_calibrate_gamma_arguments_are_checked(tiny_model):
    with pytest.raises(ValueError, match="target_kl or target_shift"):
        calibrate_gamma(tiny_model, edit_at=float, probe=PowerLawProbe(), target_kl=0.1, target_shift=0.1)
    with pytest.raises(ValueError, match="needs pairs"):
        calibrate_gamma(tiny_model, edit_at=float, probe=PowerLawProbe(), target_shift=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_gamma(tiny_model, probe=PowerLawProbe())
    with pytest.raises(ValueError, match="positive"):
        calibrate_gamma(tiny_model, edit_at=float, probe=PowerLawProbe(), target_kl=-1.0)


def tiny_map(model, trait="extraversion"):
    return make_map(trait, {1: [0, 3, 5, 7], 2: [2, 9]}, {1: [11, 13], 2: [4, 6, 8]}, [1, 2],
                    n_layers=int(model.cfg.n_layers), d_mlp=int(model.cfg.d_mlp),
                    fingerprint=model_fingerprint(model).to_dict())


def test_calibrate_gamma_on_a_real_edit_reaches_the_target_kl(tiny_model):
    probe = KLProbe(tiny_model, probe_chunks(tiny_model, n_chunks=2, chunk_tokens=24))
    assert probe(None)[0] == 0.0                         # no edit, no divergence
    neuron_map = tiny_map(tiny_model)
    # KL of this random model saturates near 0.017; 0.01 lies on the rising part of its curve.
    calibration = calibrate_gamma(tiny_model, neuron_map, target_kl=0.01, probe=probe, gammas=[0.125, 0.25, 0.5, 1, 2, 4])
    assert calibration.reached, calibration.points
    measured, _ = probe(steering_intervention(neuron_map, calibration.gamma, "increase"))
    # Log-log interpolation between grid points a factor 2 apart: within 25% of the target here.
    assert measured == pytest.approx(0.01, rel=0.25)


def test_run_control_end_to_end_on_a_tiny_model(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    config = ControlConfig(traits=["extraversion"], methods=["dpn-le", "dense"], data_dir=str(data), pairs=12,
                           max_new_tokens=6, gammas=[0.125, 0.25, 0.5, 1, 2, 4], kl_levels=[0.005, 0.01], target_kl=0.01,
                           kl_chunks=2, kl_tokens=24)
    maps = {"extraversion": tiny_map(tiny_model)}
    messages, checkpoints = [], []
    result = run_control(tiny_model, config, log=messages.append, progress=False, maps=maps, on_trait=checkpoints.append)
    assert [c.traits_done for c in checkpoints] == [["extraversion"]]
    # The run says which neurons DPN-LE edited.
    assert result.meta.maps["extraversion"] == {"dpn-le": {
        "rule": "dpn-le", "layers": "1-2", "q": maps["extraversion"].settings.q,
        "tau_d": maps["extraversion"].settings.tau_d, "settings_source": maps["extraversion"].settings.source,
        "high": 6, "low": 5}}
    validation = result.validation[0]
    assert validation.n_pairs >= 4 and validation.persona_ci_low <= validation.persona_effect <= validation.persona_ci_high
    # Gamma 0 goes through the same hooks and must change nothing.
    assert result.gamma_zero[0].effect.shift == 0.0
    # Every curve point sits at its KL level: measured there after reading the gamma off the KL grid.
    assert {p.method for p in result.curves} == {"dpn-le", "dense", "random-neurons"}
    for point in result.curves:
        assert point.measured.effect.ci_low <= point.measured.effect.shift <= point.measured.effect.ci_high
        if point.method != "random-neurons":
            assert point.measured.kl == pytest.approx(point.kl_level, rel=0.35)
    # The random-neuron control runs at DPN-LE's gammas, with as many neurons.
    for direction in ("increase", "decrease"):
        dpn = {p.kl_level: p.measured for p in result.curves if p.method == "dpn-le" and p.direction == direction}
        rnd = {p.kl_level: p.measured for p in result.curves if p.method == "random-neurons" and p.direction == direction}
        assert dpn and dpn.keys() == rnd.keys()
        for level in dpn:
            assert rnd[level].gamma == dpn[level].gamma and rnd[level].n_edited == dpn[level].n_edited
    calibrated = result.calibrated
    assert [r.direction for r in calibrated] == ["increase", "decrease"]
    assert all(r.reached_target and r.random is not None for r in calibrated)
    assert {r.method for r in result.matched_cost} == {"dpn-le", "dense", "random-neurons"}
    # The matched-cost table holds the curve's points, level by level.
    for row in result.matched_cost:
        for point in (p for p in result.curves if (p.trait, p.direction, p.method) == (row.trait, row.direction, row.method)):
            assert row.at(point.kl_level).shift == point.measured.effect.shift
    # A second run reads the generated pairs from the cache and gives the same numbers.
    again = run_control(tiny_model, config, log=messages.append, progress=False, maps=maps)
    assert any("from the cache" in m for m in messages)
    assert again.validation == result.validation
    # Without the random-neuron control (--no-random-control): no random curve, and the run finishes.
    import dataclasses

    alone = run_control(tiny_model, dataclasses.replace(config, random_control=False), log=messages.append,
                        progress=False, maps=maps)
    assert {p.method for p in alone.curves} == {"dpn-le", "dense"}
    done = [m for m in messages if "done in" in m]
    assert "random" in done[0] and "random" not in done[-1] and "shift" in done[-1]
    written = write_control_outputs(alone, tmp_path / "alone", png=False)
    assert "not run" in (tmp_path / "alone" / "control.md").read_text() and len(written) > 5


def test_matched_cost_rows_leave_unreached_levels_empty():
    from dpn_lens.evaluation.control_rows import DosePoint, Effect, MeasuredEdit

    point = DosePoint("openness", "increase", "dense", 0.1, MeasuredEdit(2.0, 5, 0.11, 10.0, Effect(0.2, 0.1, 0.3, 0.01, 8)))
    row = matched_cost_rows([point], [0.01, 0.1])[0]
    assert not row.at(0.01).reached and row.at(0.1).shift == 0.2 and row.at(0.1).gamma == 2.0
    written = row.to_dict()
    assert math.isnan(written["shift@kl0.01"]) and written["shift@kl0.1"] == 0.2 and written["gamma@kl0.1"] == 2.0


def test_control_config_is_checked():
    with pytest.raises(ValueError, match="unknown or unsweepable"):
        ControlConfig(methods=["prompting"])
    with pytest.raises(ValueError, match="at least 4"):
        ControlConfig(pairs=2)
    assert 0.05 in ControlConfig(kl_levels=[0.1], target_kl=0.05).kl_levels
    with pytest.raises(ValueError, match="score_cache_gib .* must be at least 0"):
        ControlConfig(score_cache_gib=-0.5)
    assert ControlConfig(score_cache_gib=0).score_cache_bytes == 0
    assert ControlConfig(score_cache_gib=None).score_cache_bytes is None
    assert ControlConfig().score_cache_bytes is None             # the default keeps the whole cache


def test_control_command_line(tiny_folder, tmp_path, monkeypatch, capsys):
    from dpn_lens.cli import build_parser, main
    from dpn_lens.cli.control import config_from_args

    args = build_parser().parse_args(["control", "--quick", "--kl-levels", "0.1,0.5", "--traits", "openness",
                                      "--out", str(tmp_path / "x")])
    config = config_from_args(args)
    assert config.pairs == 24 and config.methods == ["dpn-le", "dense", "caa"] and config.kl_levels == [0.05, 0.1, 0.5]
    assert config.seed == 0
    assert config_from_args(build_parser().parse_args(["control", "--seed", "3", "--out", str(tmp_path)])).seed == 3
    assert config.score_cache_gib is None
    assert config_from_args(build_parser().parse_args(["control", "--score-cache-gib", "0.25", "--out",
                                                       str(tmp_path)])).score_cache_bytes == 2 ** 28
    with pytest.raises(ValueError, match="score_cache_gib"):
        config_from_args(build_parser().parse_args(["control", "--score-cache-gib", "-1", "--out", str(tmp_path)]))
    monkeypatch.delenv("DPN_LENS_DATA", raising=False)
    status = main(["control", "--model", str(tiny_folder), "--traits", "openness", "--out", str(tmp_path / "y")])
    assert status == 2 and "no data folder given" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["control", "--out", str(tmp_path), "--gammas"])


def test_demo_preference_check_reports_each_direction_and_the_persona(tiny_model, tmp_path, monkeypatch):
    from dpn_lens.demo import CalibratedEdit, StageClock, preference_check
    from dpn_lens.evaluation.shifts import PERSONA, Shift, ShiftRow, rows_of_record

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    neuron_map = tiny_map(tiny_model)
    found = Calibration(2.0, "kl", 0.05, True, (CurvePoint(1.0, 0.01, 20.0), CurvePoint(4.0, 0.2, 21.0)))
    edits = [CalibratedEdit("DPN-LE", d, 2.0, steering_intervention(neuron_map, 2.0, d), found) for d in
             ("increase", "decrease")]
    # Another map's edit beside DPN-LE's, named by the caller and signed by its direction.
    edits.append(CalibratedEdit("other", "decrease", 2.0, steering_intervention(neuron_map, 2.0, "decrease")))
    clock = StageClock()
    rows = preference_check(tiny_model, "extraversion", edits, data, n_pairs=8, clock=clock)
    assert set(clock.seconds) == {"preference pairs", "preference margins"}
    assert [row.label() for row in rows] == ["DPN-LE increase", "DPN-LE decrease", "other decrease", PERSONA]
    assert rows[2].effect == rows[1].effect and rows[0].calibration == found and rows[2].calibration is None
    assert rows[0].n_pairs >= 4
    for row in rows:
        assert row.effect.ci_low <= row.effect.shift <= row.effect.ci_high and 0 <= row.effect.p <= 1
        assert ShiftRow.from_dict(row.to_dict()) == row
    assert rows_of_record({"shifts": [row.to_dict() for row in rows]}) == rows
    assert "CI includes 0" in ShiftRow("t", "x", "increase", 1.0, 8, Shift(0.1, -0.1, 0.3, 0.4)).line()
    assert "wrong way" in ShiftRow("t", "x", "increase", 1.0, 8, Shift(-0.2, -0.3, -0.1, 0.01)).line()


def test_a_shift_row_refuses_a_dict_that_is_not_one():
    from dpn_lens.evaluation.shifts import ShiftRow

    with pytest.raises(ValueError, match="trait, neurons and effect"):
        ShiftRow.from_dict({"trait": "openness"})
    with pytest.raises(ValueError, match="shift, ci_low, ci_high and p"):
        ShiftRow.from_dict({"trait": "openness", "neurons": "DPN-LE", "effect": {"shift": 0.1}})


def test_steer_command_calibrates_gamma_by_default(tiny_folder, tmp_path, capsys):
    from dpn_lens.cli import main
    from dpn_lens.models import load_model

    model = load_model(str(tiny_folder))
    path = tmp_path / "map.safetensors"
    tiny_map(model).save(path)
    status = main(["steer", "--model", str(tiny_folder), "--map", str(path), "--prompt", "what would you do ?",
                   "--max-new-tokens", "2", "--target-kl", "0.001"])
    out = capsys.readouterr().out
    assert status == 0 and "increase: gamma" in out and "decrease: gamma" in out and "KL 0.001" in out
    assert main(["steer", "--model", str(tiny_folder), "--map", str(path), "--prompt", "p", "--target-kl", "-1"]) == 2


def test_answer_mean_activations_equal_a_hand_computed_mean(tiny_model):
    from dpn_lens.collection.answer_statistics import answer_mean_activations
    from dpn_lens.hooked import encode

    prompts = [encode(tiny_model, text) for text in ("you are outgoing . what would you do ?", "how would you feel ?",
                                                      "a friend invites you to a party")]
    answers = [encode(tiny_model, text, add_bos=False) for text in ("i would go to the party", "calm", "no")]
    batched = answer_mean_activations(tiny_model, prompts, answers, [0, 2], batch_tokens=64)
    for index, (prompt, answer) in enumerate(zip(prompts, answers)):
        _, cache = tiny_model.run_with_cache(torch.tensor([prompt + answer]))
        for slot, layer in enumerate([0, 2]):
            expected = cache[f"blocks.{layer}.mlp.hook_post"][0, len(prompt):].double().mean(0)
            torch.testing.assert_close(batched[index, slot], expected, rtol=1e-5, atol=1e-6)


def test_answer_statistics_locate_like_prompt_statistics(tiny_model, tiny_pairs):
    from dpn_lens.collection.answer_statistics import answer_contrast_statistics

    stats = answer_contrast_statistics(tiny_model, tiny_pairs, max_new_tokens=4, batch_size=4)
    assert stats.token_position == "answer" and stats.high.count == len(tiny_pairs.high)
    assert stats.layers == list(range(int(tiny_model.cfg.n_layers)))
    assert torch.isfinite(stats.high.mean).all() and torch.isfinite(stats.low.mean).all()
    with pytest.raises(ValueError, match="statistics must be"):
        ControlConfig(statistics="first")


def run_control_command(tiny_folder, tmp_path, monkeypatch, methods: str, *options: str) -> tuple[int, Path]:
    """``dpn-lens control`` on openness of the tiny model with a saved map (its exit status and --out)."""
    from dpn_lens.cli import main
    from dpn_lens.models import load_model

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    maps = tmp_path / "maps"
    maps.mkdir()
    tiny_map(load_model(str(tiny_folder)), "openness").save(maps / "openness.safetensors")
    out = tmp_path / "out"
    status = main(["control", "--model", str(tiny_folder), "--dtype", "float32", "--traits", "openness",
                   "--data-dir", str(data), "--run", str(maps), "--methods", methods, "--eval-pairs", "8",
                   "--gammas", "0.125,0.25,0.5,1,2,4", "--kl-levels", "0.005", "--target-kl", "0.005", "--no-png",
                   "--no-progress", *options, "--out", str(out)])
    return status, out


def test_control_command_runs_end_to_end_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch, capsys):
    status, out = run_control_command(tiny_folder, tmp_path, monkeypatch, "dpn-le")
    assert status == 0, capsys.readouterr().err
    report = (out / "control.md").read_text()
    for heading in ("Positive control", "calibrated gamma", "Matched cost", "Dose-response points"):
        assert heading in report
    result = json.loads((out / "control.json").read_text())
    assert result["validation"][0]["trait"] == "openness" and result["calibrated"][0]["reached_target"]
    assert {p.name for p in out.iterdir()} >= {"control.json", "curves.csv", "costs.csv", "tradeoff_kl.html",
                                               "cost_by_gamma.html"}
    assert not (out / "control.partial.json").exists()   # the per-trait checkpoint is removed once all is written
    assert not (out / "maps").exists()   # maps read from --maps are not copied


def test_control_keeps_the_maps_it_locates_and_another_run_reuses_them(tiny_folder, tmp_path, monkeypatch, capsys):
    from dpn_lens.cli import main
    from dpn_lens.localization.neuron_map import NeuronMap

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    common = ["control", "--model", str(tiny_folder), "--dtype", "float32", "--traits", "openness", "--data-dir",
              str(data), "--methods", "dpn-le", "--eval-pairs", "8", "--gammas", "0.5,1,2,4,8,16", "--kl-levels", "0.005",
              "--target-kl", "0.005", "--no-png", "--no-progress", "--no-random-control"]
    first = tmp_path / "first"
    # 40 pairs sit below the chance bound on d, so tau_d is set low enough for the tiny model to select neurons.
    assert main([*common, "--n-pairs", "40", "--tau-d", "0.2", "--out", str(first)]) == 0, capsys.readouterr().err
    assert "locating from 40 embedded pairs" in capsys.readouterr().out
    saved = NeuronMap.load(first / "maps" / "openness.safetensors")
    assert saved.trait == "openness" and saved.n_selected() > 0
    second = tmp_path / "second"
    assert main([*common, "--run", str(first), "--out", str(second)]) == 0
    assert "neuron map from" in capsys.readouterr().out
    one, two = (json.loads((folder / "control.json").read_text()) for folder in (first, second))
    assert one["meta"]["maps"] == two["meta"]["maps"] and one["calibrated"] == two["calibrated"]


def test_the_calibrated_table_says_when_the_target_kl_was_not_reached():
    from dpn_lens.report.control import _calibrated_table

    from dpn_lens.evaluation.control_rows import CalibratedRow

    table = _calibrated_table([CalibratedRow(None, "extraversion", "increase", target_kl=0.05)])
    assert "| extraversion | increase | KL 0.05 not reached | n/a |" in table


def test_the_figures_of_a_run_with_no_measured_points_are_empty_not_an_error():
    from dpn_lens.report.control import cost_figure, tradeoff_figure

    assert tradeoff_figure([]).layout.annotations[0].text == "no measured points"
    assert cost_figure([]).layout.annotations[0].text == "no measured points"


def test_trait_map_reads_a_maps_folder_and_a_missing_trait_is_refused_or_located(tiny_model, tmp_path):
    from dpn_lens.evaluation.trait_maps import trait_map

    lines: list[str] = []
    located = trait_map(tiny_model, "openness", locate_pairs=40, tau_d=0.3, log=lines.append)
    assert located.n_selected() > 0 and "locating from 40 embedded pairs" in lines[-1]
    located.save(tmp_path / "openness.safetensors")
    read = trait_map(tiny_model, "openness", maps_dir=tmp_path, log=lines.append)
    assert {l: i.tolist() for l, i in read.high.items()} == {l: i.tolist() for l, i in located.high.items()}
    assert "neuron map from" in lines[-1]
    with pytest.raises(FileNotFoundError, match="no agreeableness map in .*dpn-lens locate"):
        trait_map(tiny_model, "agreeableness", maps_dir=tmp_path, log=lines.append)
    fallback = trait_map(tiny_model, "agreeableness", maps_dir=tmp_path, locate_pairs=10, tau_d=0.3,
                         if_missing="locate", log=lines.append)
    assert fallback.trait == "agreeableness" and any("no map in" in line for line in lines)


def test_rule_maps_reuse_a_saved_map_of_the_same_seed_and_select_anew_for_another(tiny_model, tmp_path):
    """`control --seed 1 --maps DIR` once reused DIR's seed-0 effect maps silently: not a replication."""
    from dpn_lens.evaluation.trait_maps import rule_maps, trait_map

    base = trait_map(tiny_model, "openness", locate_pairs=40, tau_d=0.3, log=lambda line: None)
    lines: list[str] = []
    made = rule_maps(tiny_model, base, ["attribution-t"], n_pairs=4, seed=0, log=lines.append)["attribution-t"]
    assert made[1] is False and made[0].selection["pairs_seed"] == 0
    (tmp_path / "attribution-t").mkdir()
    made[0].save(tmp_path / "attribution-t" / "openness.safetensors")
    same = rule_maps(tiny_model, base, ["attribution-t"], maps_dir=tmp_path, n_pairs=4, seed=0, log=lines.append)
    assert same["attribution-t"][1] is True and "attribution-t map from" in lines[-1]
    other = rule_maps(tiny_model, base, ["attribution-t"], maps_dir=tmp_path, n_pairs=4, seed=1, log=lines.append)
    assert other["attribution-t"][1] is False and other["attribution-t"][0].selection["pairs_seed"] == 1
    assert any("selected on pairs of seed 0, not 1; selecting anew" in line for line in lines)


def test_rule_maps_select_anew_for_another_pair_count_and_reselect_another_budget_from_saved_scores(tiny_model, tmp_path):
    """`control --selection-pairs 512 --run DIR` once silently reused DIR's 128-pair selection, and
    `--budget K` DIR's map at its own budget."""
    from dpn_lens.effect.rules import effect_map, effect_scores
    from dpn_lens.evaluation.trait_maps import rule_maps, trait_map

    base = trait_map(tiny_model, "openness", locate_pairs=40, tau_d=0.3, log=lambda line: None)
    lines: list[str] = []
    made = rule_maps(tiny_model, base, ["attribution-t"], n_pairs=4, seed=0, log=lines.append)["attribution-t"][0]
    assert made.selection["requested_pairs"] == 4
    (tmp_path / "attribution-t").mkdir()
    made.save(tmp_path / "attribution-t" / "openness.safetensors")

    more = rule_maps(tiny_model, base, ["attribution-t"], maps_dir=tmp_path, n_pairs=6, seed=0, log=lines.append)
    assert more["attribution-t"][1] is False and more["attribution-t"][0].selection["requested_pairs"] == 6
    assert any("was selected from 4 selection pairs, not 6; selecting anew" in line for line in lines)

    k = made.n_selected() + 2
    smaller, loaded = rule_maps(tiny_model, base, ["attribution-t"], maps_dir=tmp_path, n_pairs=4, seed=0, budget=k,
                                log=lines.append)["attribution-t"]
    fresh = effect_map(base, effect_scores(tiny_model, base, "attribution-t", n_pairs=4, seed=0), k)
    assert loaded is False and smaller.n_selected() == k and any("taking the top" in line for line in lines)
    for layer in fresh.layers:
        assert smaller.high[layer].tolist() == fresh.high[layer].tolist()
        assert smaller.low[layer].tolist() == fresh.low[layer].tolist()


def test_rule_maps_take_a_legacy_maps_kept_pair_count_as_its_request_only_when_close_below_it(tiny_model, tmp_path):
    # Maps saved before `requested_pairs` existed record only the pairs kept after dropping identical ones.
    import dataclasses

    from dpn_lens.evaluation.trait_maps import rule_maps, trait_map

    base = trait_map(tiny_model, "openness", locate_pairs=40, tau_d=0.3, log=lambda line: None)
    made = rule_maps(tiny_model, base, ["attribution-t"], n_pairs=4, seed=0, log=lambda line: None)["attribution-t"][0]
    legacy = dataclasses.replace(made, selection={key: value for key, value in made.selection.items()
                                                  if key != "requested_pairs"} | {"selection_pairs": 120})
    (tmp_path / "attribution-t").mkdir()
    legacy.save(tmp_path / "attribution-t" / "openness.safetensors")
    lines: list[str] = []
    reused = rule_maps(tiny_model, base, ["attribution-t"], maps_dir=tmp_path, n_pairs=128, seed=0, log=lines.append)
    assert reused["attribution-t"][1] is True
    again = rule_maps(tiny_model, base, ["attribution-t"], maps_dir=tmp_path, n_pairs=4, seed=0, log=lines.append)
    assert again["attribution-t"][1] is False and any("from 120 selection pairs, not 4" in line for line in lines)


def test_a_trait_whose_map_selects_no_neurons_is_skipped_and_the_others_still_count(tiny_model, tmp_path, monkeypatch):
    # Answer-token statistics from few pairs can leave a trait without neurons; that is a result for that
    # trait, and must not throw away the traits measured before and after it.
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    config = ControlConfig(traits=["openness", "extraversion"], methods=["dpn-le"], data_dir=str(data), pairs=12,
                           max_new_tokens=6, gammas=[0.25, 1, 4], kl_levels=[0.005], target_kl=0.005,
                           kl_chunks=2, kl_tokens=24)
    empty = make_map("openness", {}, {}, [1, 2], n_layers=int(tiny_model.cfg.n_layers), d_mlp=int(tiny_model.cfg.d_mlp),
                     fingerprint=model_fingerprint(tiny_model).to_dict())
    assert empty.n_selected() == 0
    maps = {"openness": empty, "extraversion": tiny_map(tiny_model)}
    messages, checkpoints = [], []
    record = run_control(tiny_model, config, log=messages.append, progress=False, maps=maps, on_trait=checkpoints.append)
    result = record.to_dict()
    assert [r["trait"] for r in result["validation"]] == ["openness", "extraversion"]   # both validated
    assert {r["trait"] for r in result["calibrated"]} == {"extraversion"}              # one steered
    assert {p["trait"] for p in result["curves"]} == {"extraversion"}
    assert list(result["meta"]["skipped"]) == ["openness"] and "selects no neurons" in result["meta"]["skipped"]["openness"]
    assert result["meta"]["maps"]["openness"]["dpn-le"]["high"] == 0
    assert any(m.startswith("openness: not steered") for m in messages)
    assert [c.traits_done for c in checkpoints] == [["openness"], ["openness", "extraversion"]]
    write_control_outputs(record, tmp_path / "out", png=False)
    assert "Not steered" in (tmp_path / "out" / "control.md").read_text()
    # When no trait has neurons there is nothing to report: a clear error, naming the fix.
    with pytest.raises(ValueError, match="no trait was steered.*lower tau_d"):
        run_control(tiny_model, dataclasses.replace(config, traits=["openness"]), log=messages.append, progress=False,
                    maps=maps)


def test_control_compares_selection_rules_with_their_own_random_neurons(tmp_path, monkeypatch):
    """Every rule gets its curve, its random-neuron control over several draws, a verdict, a budget sweep and the
    generation check; the maps each rule made are handed out to be saved."""
    from helpers import build_tiny_model

    # A context long enough for the embedded role-play prompts that the write rules and CAA read.
    tiny_model = build_tiny_model(tmp_path / "model", max_positions=512)
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    rules = ["dpn-le", "attribution", "write-layer"]
    config = ControlConfig(traits=["extraversion"], methods=[*rules, "caa"], data_dir=str(data), pairs=8,
                           max_new_tokens=5, gammas=[0.25, 1, 4], kl_levels=[0.01], target_kl=0.01, kl_chunks=2,
                           kl_tokens=24, random_draws=2, selection_pairs=4, budget=6, k_sweep=[3, 0],
                           generation_questions=3, generation_draws=2, caa_pairs=4)
    located = []
    record = run_control(tiny_model, config, log=lambda m: None, progress=False,
                         maps={"extraversion": tiny_map(tiny_model)}, on_located=lambda t, m: located.append(m.rule))
    result = record.to_dict()
    assert located == ["attribution", "write-layer"]
    assert set(result["meta"]["maps"]["extraversion"]) == set(rules)
    assert result["meta"]["maps"]["extraversion"]["attribution"]["high"] + \
        result["meta"]["maps"]["extraversion"]["attribution"]["low"] == 6
    methods = {p["method"] for p in result["curves"]}
    assert {"random-neurons", "random-neurons:attribution", "random-neurons:write-layer"} <= methods
    for point in result["curves"]:
        if point["method"].startswith("random-neurons"):
            assert point["draws"] == 2 and point["ci_low"] <= point["shift"] <= point["ci_high"]
    assert sorted({r["method"] for r in result["calibrated"]}) == sorted(rules)
    assert all(r.get("random_draws") == 2 for r in result["calibrated"] if r["reached_target"])
    assert [r["rule"] for r in result["goal"]] == rules
    sweep = result["sweep"]
    assert {(r["rule"], r["k"]) for r in sweep} == {(rule, k) for rule in rules for k in (3, "all")}
    attribution_all = [r for r in sweep if r["rule"] == "attribution" and r["k"] == "all" and r["reached"]]
    assert all(r["n_edited"] > 6 for r in attribution_all)
    generation = result["generation"]
    assert any(r["method"] == "persona (high-low)/2" for r in generation)
    checked = [r for r in generation if r["method"] == "attribution" and not math.isnan(r["shift"])]
    assert checked and all("vs_random" in r and r["draws"] == 2 for r in checked)
    written = write_control_outputs(record, tmp_path / "out", png=False)
    text = (tmp_path / "out" / "control.md").read_text()
    assert "which steers?" in text and "budget sweep" in text and "Generation-based check" in text
    assert (tmp_path / "out" / "sparsity.html").exists() and (tmp_path / "out" / "sweep.csv") in written
    assert (tmp_path / "out" / "results.md") in written and (tmp_path / "out" / "results.html") in written
    from dpn_lens.evaluation.table import read_result_table
    from test_result_table import check_control_rows_match_the_run

    assert read_result_table(tmp_path / "out" / "results.csv") == check_control_rows_match_the_run(result)
    assert any(r.metric == "generation" and r.method == "attribution" for r in read_result_table(tmp_path / "out" / "results.csv"))


def test_runs_on_different_traits_merge_into_the_run_over_all_of_them(tiny_folder, tmp_path, monkeypatch, capsys):
    from dpn_lens.cli import main
    from dpn_lens.evaluation.control import merge_control_results
    from dpn_lens.models import load_model

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    maps = tmp_path / "maps"
    maps.mkdir()
    model = load_model(str(tiny_folder))
    for trait in ("openness", "extraversion"):
        tiny_map(model, trait).save(maps / f"{trait}.safetensors")
    common = ["control", "--model", str(tiny_folder), "--dtype", "float32", "--data-dir", str(data), "--run",
              str(maps), "--methods", "dpn-le,caa", "--eval-pairs", "8", "--gammas", "0.125,0.25,0.5,1,2,4",
              "--kl-levels", "0.005", "--target-kl", "0.005", "--random-draws", "2", "--no-png", "--no-progress"]
    for name, traits in (("both", "openness,extraversion"), ("o", "openness"), ("e", "extraversion")):
        assert main([*common, "--traits", traits, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
    merged_folder = tmp_path / "merged"
    assert main(["control", "--merge", str(tmp_path / "o"), str(tmp_path / "e"), "--no-png",
                 "--out", str(merged_folder)]) == 0, capsys.readouterr().err
    whole, merged = (json.loads((tmp_path / name / "control.json").read_text()) for name in ("both", "merged"))
    for key in ("validation", "calibrated", "curves", "matched_cost", "matched_summary", "goal"):
        assert merged[key] == whole[key], key
    assert merged["meta"]["traits_done"] == ["openness", "extraversion"]
    assert merged["meta"]["config"] == whole["meta"]["config"]
    assert (merged_folder / "control.md").exists()

    from dpn_lens.evaluation.control_record import ControlRecord, load_control_record

    one = load_control_record(tmp_path / "o")
    with pytest.raises(ValueError, match="openness"):
        merge_control_results([one, one])
    other = dataclasses.replace(one, meta=dataclasses.replace(one.meta, config={**one.meta.config, "seed": 1},
                                                              traits_done=["extraversion"]))
    with pytest.raises(ValueError, match="differs from result #0 in seed"):
        merge_control_results([one, other])
    # The scorer's cache budget changes no number: runs with different budgets merge.
    e = load_control_record(tmp_path / "e")
    cheaper = dataclasses.replace(e, meta=dataclasses.replace(e.meta, config={**e.meta.config, "score_cache_gib": 0.0}))
    assert merge_control_results([one, cheaper]).traits_done == ["openness", "extraversion"]
    # The KL probe: a run from before its setting was recorded edited the BOS token, as --kl-edit-context does.
    assert one.meta.config["kl_skip_context"] is True
    old, old_e = (ControlRecord.from_dict({**r.to_dict(), "meta": {**r.meta.to_dict(), "config": {
        k: v for k, v in r.meta.config.items() if k != "kl_skip_context"}}}) for r in (one, e))
    assert merge_control_results([old, old_e]).meta.config["kl_skip_context"] is False
    with pytest.raises(ValueError, match="differs from result #0 in kl_skip_context"):
        merge_control_results([old, e])
    # The engine: recorded; runs whose engines give the same answers merge, others not.
    assert one.meta.engine == "raw-sdpa"                         # float32's default
    bridge_e = dataclasses.replace(e, meta=dataclasses.replace(e.meta, engine="bridge"))
    assert merge_control_results([one, bridge_e]).meta.engine == "raw-sdpa"
    half = [dataclasses.replace(r, meta=dataclasses.replace(r.meta, dtype="torch.bfloat16", engine=engine))
            for r, engine in ((one, "raw-sdpa"), (e, "raw"))]
    with pytest.raises(ValueError, match="engine 'raw', result #0 with 'raw-sdpa', whose answers differ"):
        merge_control_results(half)
    assert main(["control", "--merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no control.json" in capsys.readouterr().err


def test_a_budget_points_bracket_search_reads_the_gamma_of_the_whole_curve_in_fewer_probes(tiny_model):
    """The budget sweep's bracket search (``calibrate_gamma`` as ``control._budget_sweep`` calls it) against
    the whole-grid curve the sweep ran before (``control._cost_curve``), on real edits of the tiny model at
    three budgets and both directions: the same gamma at the target KL (to 1e-9), with fewer probe passes."""
    from dpn_lens.evaluation.control import _cost_curve, _level_gammas

    probe = KLProbe(tiny_model, probe_chunks(tiny_model, 2, 24))
    config = ControlConfig(gammas=[0.0625, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32], kl_levels=[0.01], target_kl=0.01)
    full_probes = bracket_probes = reached = 0
    for layers in ({1: [3]}, {1: [0, 3, 5], 2: [2, 9]}, {1: list(range(0, 40, 3)), 2: list(range(1, 40, 4))}):
        neuron_map = make_map("extraversion", layers, {2: [4, 6]}, [1, 2], n_layers=int(tiny_model.cfg.n_layers),
                              d_mlp=int(tiny_model.cfg.d_mlp), fingerprint=model_fingerprint(tiny_model).to_dict())
        for direction in ("increase", "decrease"):
            def edit_at(gamma, direction=direction, neuron_map=neuron_map):
                return steering_intervention(neuron_map, gamma, direction)

            whole = _cost_curve(edit_at, probe, config, "extraversion", direction, "dpn-le")
            calibration = calibrate_gamma(tiny_model, edit_at=edit_at, probe=probe, target_kl=config.target_kl,
                                          gammas=config.gammas)
            bracket = calibration.points
            expected = _level_gammas(whole, [0.01]).get(0.01)
            found = calibration.gamma if calibration.reached else None
            assert (expected is None) == (found is None)
            if expected is not None:
                assert found == pytest.approx(expected, rel=1e-9)
                reached += 1
            full_probes += len(whole)
            bracket_probes += len(bracket)
    assert reached >= 4 and bracket_probes < full_probes / 2


def test_no_cache_reaches_the_selection_pairs(tiny_model, monkeypatch):
    """``control --no-cache`` (``cache_pairs=False``) generates the selection pairs again too: the effect rules'
    selection asks ``selection_pairs`` not to read the cache, through the run's ``RuleSelection``."""
    from dpn_lens.effect import pairs as pair_module
    from dpn_lens.evaluation.preparation import RuleSelection, TraitPreparation

    asked = []

    def recorded(*args, cache=True, **kwargs):
        asked.append(cache)
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(pair_module, "selection_pairs", recorded)
    base = tiny_map(tiny_model)
    for cache in (False, True):
        preparation = TraitPreparation("extraversion")
        selection = RuleSelection(4, seed=0, cache_pairs=cache)
        context = preparation.context(base, selection, ())
        with pytest.raises(RuntimeError, match="stop after the call"):
            preparation.add_rule_maps(tiny_model, context, ["attribution"], selection, log=lambda m: None)
    assert asked == [False, True]
    assert RuleSelection(4, cache_pairs=False) == RuleSelection(4)     # the same selection either way
