"""Numbers as people pass them (issue 24): numpy and 0-d torch scalars work wherever a Python number does,
and bool, NaN/Inf, strings and arrays are refused with a message naming the parameter; a negative gamma
with a direction is refused with the call that was meant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpn_lens.numbers import as_float, as_int
from dpn_lens.steering import additive_intervention, check_strength, steering_intervention

S = torch.tensor([[0.5, -2.0, 1.0]])


def _as_people_pass_it(value: float):
    return st.sampled_from([value, np.float32(value), np.float64(value), torch.tensor(value), np.array(value)])


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=0.0, max_value=50.0, allow_nan=False).flatmap(_as_people_pass_it))
def test_a_gamma_from_numpy_or_torch_builds_the_same_edit_as_a_python_float(gamma):
    expected = additive_intervention(S, [4], {4: torch.tensor([0, 2])}, gamma=float(gamma)).deltas[4]
    got = additive_intervention(S, [4], {4: torch.tensor([0, 2])}, gamma=gamma).deltas[4]
    torch.testing.assert_close(got, expected)


NOT_NUMBERS = [True, np.bool_(False), "1.0", None, float("nan"), math.inf, np.float32("nan"), torch.tensor(math.inf),
               np.array([1.0, 2.0]), torch.tensor([1.0]), [1.0], {"gamma": 1.0}]


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=[repr(v)[:30] for v in NOT_NUMBERS])
def test_what_is_not_a_number_is_refused_naming_the_parameter(value):
    with pytest.raises(ValueError, match=r"^gamma must be a finite number"):
        additive_intervention(S, [4], {4: torch.tensor([1])}, gamma=value)
    with pytest.raises(ValueError, match=r"^k must be a whole number"):
        as_int(value, "k")


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=10_000).flatmap(
    lambda n: st.sampled_from([n, np.int32(n), np.int64(n), torch.tensor(n), float(n), np.float64(n)])))
def test_whole_numbers_in_any_form_are_ints(value):
    assert as_int(value, "k") == int(value) and type(as_int(value, "k")) is int


def test_a_fractional_count_is_refused():
    with pytest.raises(ValueError, match=r"k must be a whole number \(e.g. 8\), got 2.5"):
        as_int(2.5, "k")
    with pytest.raises(ValueError, match="must be at least 1"):
        as_int(0, "n_pairs", minimum=1)
    assert as_float(np.float16(0.5), "q") == 0.5


@pytest.mark.parametrize("direction,other", [("increase", "decrease"), ("decrease", "increase")])
def test_a_negative_gamma_with_a_direction_is_refused_with_the_call_that_was_meant(direction, other):
    with pytest.raises(ValueError, match=f"would {other} the trait.*pass gamma=2, direction='{other}'"):
        additive_intervention(S, [4], {4: torch.tensor([1])}, gamma=-2.0, direction=direction)
    with pytest.raises(ValueError, match=f"pass gamma=2, direction='{other}'"):
        check_strength(np.float32(-2.0), direction)
    assert check_strength(0.0, direction) == 0.0


def test_steering_intervention_takes_a_numpy_gamma_and_refuses_a_negative_one():
    from helpers import make_map

    neuron_map = make_map("openness", high={1: [0, 1]}, low={1: [2]}, layers=[1], n_layers=2, d_mlp=8)
    same = steering_intervention(neuron_map, gamma=np.float32(1.0))
    torch.testing.assert_close(same.deltas[1], steering_intervention(neuron_map, gamma=1.0).deltas[1])
    with pytest.raises(ValueError, match="direction='decrease'"):
        steering_intervention(neuron_map, gamma=-2.0, direction="increase")


def test_locate_and_reselect_take_q_and_tau_d_from_numpy_and_refuse_non_numbers():
    from helpers import make_map

    from dpn_lens.localization.localize import reselect
    from dpn_lens.localization.settings import LocalizationSettings

    neuron_map = make_map("openness", high={1: [0, 1]}, low={1: [2]}, layers=[1], n_layers=2, d_mlp=8)
    assert reselect(neuron_map, q=np.float64(0.9), tau_d=torch.tensor(0.5)).settings.q == 0.9
    with pytest.raises(ValueError, match="q must be a finite number"):
        reselect(neuron_map, q="0.9")
    with pytest.raises(ValueError, match="tau_d must be a finite number"):
        LocalizationSettings([1, 2], q=0.99, tau_d=float("nan"))
    assert LocalizationSettings(list(np.arange(2, 4)), q=np.float32(0.5)).layers == [2, 3]


@pytest.mark.parametrize("build", [
    lambda n: __import__("dpn_lens").embedded_contrastive_set("openness", n_pairs=n),
    lambda n: __import__("dpn_lens").CollectionConfig(max_batch_size=n),
    lambda n: __import__("dpn_lens.cards", fromlist=["CardConfig"]).CardConfig(n_pairs=n),
    lambda n: __import__("dpn_lens.evaluation.control", fromlist=["ControlConfig"]).ControlConfig(pairs=n),
], ids=["embedded_contrastive_set", "CollectionConfig", "CardConfig", "ControlConfig"])
def test_counts_take_numpy_and_torch_integers_and_refuse_what_is_not_a_count(build):
    for value in (np.int64(5), np.int32(5), torch.tensor(5), 5.0):
        built = build(value)
        assert built is not None
    for value in (True, 2.5, "5", np.array([5, 6])):
        with pytest.raises(ValueError, match="must be a whole number"):
            build(value)


def test_a_control_config_from_numpy_numbers_is_written_as_plain_json():
    import dataclasses
    import json

    from dpn_lens.evaluation.control import ControlConfig

    config = ControlConfig(pairs=np.int32(8), seed=np.int64(1), target_kl=np.float32(0.05), kl_levels=[np.float64(0.1)],
                           k_sweep=[np.int64(8)], budget=torch.tensor(20))
    json.dumps(dataclasses.asdict(config))                 # numpy scalars would raise here
    assert config.kl_levels == pytest.approx([0.05, 0.1]) and config.budget == 20 and type(config.budget) is int


def test_calibrate_gamma_refuses_a_string_target_naming_it(tiny_model):
    from helpers import make_map

    from dpn_lens.evaluation.calibrate import calibrate_gamma

    with pytest.raises(ValueError, match=r"target_kl \(nats/token\) must be a finite number"):
        calibrate_gamma(tiny_model, make_map("openness", high={1: [0]}, low={}, layers=[1], n_layers=4, d_mlp=48),
                        target_kl="0.05")
