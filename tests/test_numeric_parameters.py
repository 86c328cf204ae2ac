"""Every numeric parameter of the public API (``dpn_lens.__all__``), found by signature, takes Python, numpy
and 0-d torch numbers alike and refuses bool, NaN/Inf, strings and arrays with a message naming it (issue 24).

``CALLS`` says how to call each function with one numeric parameter set and everything else valid; the first
test fails when the API gains a numeric parameter that ``CALLS`` does not cover, so the property below
really runs over all of them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import numpy as np
import pytest
import torch

import dpn_lens
from helpers import make_map

# Records the library builds and hands back (read off a run or a model), not inputs a person passes.
RECORDS = {"ModelFingerprint", "ContrastiveSet", "GroupStatistics", "NeuronMap", "Intervention", "NeuronCard",
           "Calibration"}


def _numeric(annotation: Any) -> str | None:
    """"int" or "float" for a scalar numeric annotation (also ``| None``), else None."""
    text = str(annotation).replace("typing.", "")
    if any(word in text for word in ("Sequence", "list", "dict", "Mapping", "Callable", "Tensor", "tuple")):
        return None
    kinds = {part.strip() for part in text.replace("Optional[", "").rstrip("]").split("|")} - {"None"}
    return kinds.pop() if kinds in ({"int"}, {"float"}) else None


def public_numeric_parameters() -> set[tuple[str, str]]:
    found = set()
    for name in dpn_lens.__all__:
        target = getattr(dpn_lens, name)
        if name in RECORDS or not callable(target):
            continue
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        found |= {(name, p.name) for p in signature.parameters.values() if _numeric(p.annotation)}
    return found


# ---------------------------------------------------------------------------- how to call each one
_S = torch.tensor([0.9, -0.8, 0.1, 0.7, -0.05, 0.3])
_D = torch.tensor([2.0, -1.5, 0.1, 0.9, -0.2, 0.4])


def _map():
    return make_map("openness", high={1: [0, 1, 4]}, low={1: [2, 3]}, layers=[1], n_layers=4, d_mlp=48)


def _stats():
    if "stats" not in _CACHE:
        from dpn_lens.collection.collect import CollectionConfig, collect_statistics
        from helpers import build_tiny_model

        model = build_tiny_model()
        _CACHE["model"] = model
        _CACHE["stats"] = collect_statistics(model, dpn_lens.embedded_contrastive_set("openness", 12),
                                             CollectionConfig(progress=False))
    return _CACHE["stats"]


def _model():
    _stats()
    return _CACHE["model"]


def _scores():
    if "scores" not in _CACHE:
        base = dpn_lens.locate(_stats(), layers=[1, 2, 3], tau_d=0.0)
        _CACHE["base"] = base
        _CACHE["scores"] = dpn_lens.effect_scores(_model(), base, "write-layer", contrastive_pairs=4)
    return _CACHE["scores"]


_CACHE: dict[str, Any] = {}

# (function, parameter) -> (a valid value, call(value) -> something comparable between equal inputs)
CALLS: dict[tuple[str, str], tuple[float, Callable[[Any], Any]]] = {
    ("embedded_contrastive_set", "n_pairs"): (5, lambda v: dpn_lens.embedded_contrastive_set("openness", n_pairs=v).high),
    ("embedded_contrastive_set", "seed"): (3, lambda v: dpn_lens.embedded_contrastive_set("openness", 4, seed=v).high),
    ("personalitybench_contrastive_set", "n_pairs"): (5, lambda v: _pb(n_pairs=v)),
    ("personalitybench_contrastive_set", "seed"): (3, lambda v: _pb(seed=v)),
    ("anthropic_persona_contrastive_set", "n_pairs"): (5, lambda v: _ap(n_pairs=v)),
    ("anthropic_persona_contrastive_set", "seed"): (3, lambda v: _ap(seed=v)),
    ("CollectionConfig", "max_batch_size"): (4, lambda v: dpn_lens.CollectionConfig(max_batch_size=v)),
    ("CollectionConfig", "max_batch_tokens"): (512, lambda v: dpn_lens.CollectionConfig(max_batch_tokens=v)),
    ("CollectionConfig", "prefix_min_saving"): (8, lambda v: dpn_lens.CollectionConfig(prefix_min_saving=v)),
    ("LocalizationSettings", "q"): (0.75, lambda v: dpn_lens.LocalizationSettings([1], q=v)),
    ("LocalizationSettings", "tau_d"): (0.5, lambda v: dpn_lens.LocalizationSettings([1], tau_d=v)),
    ("select_neurons", "q"): (0.5, lambda v: _tensors(dpn_lens.select_neurons(_S, _D, q=v, tau_d=0.25))),
    ("select_neurons", "tau_d"): (0.25, lambda v: _tensors(dpn_lens.select_neurons(_S, _D, q=0.5, tau_d=v))),
    ("propose_settings", "q"): (0.75, lambda v: dpn_lens.propose_settings(_stats(), q=v)),
    ("propose_settings", "separation_fraction"): (0.5, lambda v: dpn_lens.propose_settings(_stats(), separation_fraction=v)),
    ("locate", "q"): (0.75, lambda v: dpn_lens.locate(_stats(), q=v, tau_d=0.0).n_selected()),
    ("locate", "tau_d"): (0.25, lambda v: dpn_lens.locate(_stats(), q=0.75, tau_d=v).n_selected()),
    ("locate", "budget"): (3, lambda v: dpn_lens.locate(_stats(), select="write-layer", model=_model(), budget=v,
                                                          tau_d=0.0, contrastive_pairs=4).n_selected()),
    ("reselect", "q"): (0.5, lambda v: dpn_lens.reselect(_map(), q=v).n_selected()),
    ("reselect", "tau_d"): (0.5, lambda v: dpn_lens.reselect(_map(), tau_d=v).n_selected()),
    ("reselect", "k"): (2, lambda v: dpn_lens.reselect(_effect(), k=v).n_selected()),
    ("effect_scores", "n_pairs"): (2, lambda v: _effect_scores(n_pairs=v)),
    ("effect_scores", "seed"): (1, lambda v: _effect_scores(seed=v)),
    ("effect_scores", "contrastive_pairs"): (3, lambda v: _effect_scores(contrastive_pairs=v)),
    ("effect_scores", "selection_tokens"): (4, lambda v: _effect_scores(selection_tokens=v)),
    ("effect_scores", "selection_batch"): (2, lambda v: _effect_scores(selection_batch=v)),
    ("effect_map", "budget"): (4, lambda v: (_scores(), dpn_lens.effect_map(_CACHE["base"], _scores(), v).n_selected())[1]),
    ("select_by_effect", "budget"): (4, lambda v: (_scores(), dpn_lens.select_by_effect(
        _model(), _CACHE["base"], "write-layer", v, contrastive_pairs=4).n_selected())[1]),
    ("selection_pairs", "n_pairs"): (2, lambda v: _selection_pairs(n_pairs=v)),
    ("selection_pairs", "seed"): (1, lambda v: _selection_pairs(seed=v)),
    ("selection_pairs", "max_new_tokens"): (3, lambda v: _selection_pairs(max_new_tokens=v)),
    ("selection_pairs", "batch_size"): (2, lambda v: _selection_pairs(batch_size=v)),
    ("steering_intervention", "gamma"): (2.0, lambda v: dpn_lens.steering_intervention(_map(), gamma=v).deltas[1]),
    ("additive_intervention", "gamma"): (2.0, lambda v: dpn_lens.additive_intervention(
        _S[None], [1], {1: torch.tensor([0, 2])}, gamma=v).deltas[1]),
    ("calibrate_gamma", "target_kl"): (2**-7, lambda v: _calibrate(target_kl=v)),
    ("calibrate_gamma", "target_shift"): (2**-7, lambda v: _calibrate(target_kl=None, target_shift=v)),
    ("calibrate_gamma", "max_kl"): (1.0, lambda v: _calibrate(max_kl=v)),
    ("calibrate_gamma", "start"): (1.0, lambda v: _calibrate(start=v)),
    ("calibrate_directions", "target_kl"): (2**-7, lambda v: _calibrate_directions(target_kl=v)),
    ("CardConfig", "n_pairs"): (8, lambda v: dpn_lens.CardConfig(n_pairs=v)),
    ("CardConfig", "seed"): (1, lambda v: dpn_lens.CardConfig(seed=v)),
    ("CardConfig", "text_windows"): (4, lambda v: dpn_lens.CardConfig(text_windows=v)),
    ("CardConfig", "window"): (16, lambda v: dpn_lens.CardConfig(window=v)),
    ("CardConfig", "k"): (3, lambda v: dpn_lens.CardConfig(k=v)),
    ("CardConfig", "before"): (4, lambda v: dpn_lens.CardConfig(before=v)),
    ("CardConfig", "after"): (2, lambda v: dpn_lens.CardConfig(after=v)),
    ("CardConfig", "lens_top"): (5, lambda v: dpn_lens.CardConfig(lens_top=v)),
    ("CardConfig", "bins"): (10, lambda v: dpn_lens.CardConfig(bins=v)),
    ("CardConfig", "batch_size"): (4, lambda v: dpn_lens.CardConfig(batch_size=v)),
    ("explore", "max_new_tokens"): (3, lambda v: _explore(max_new_tokens=v)),
    **{("LocateConfig", name): (value, (lambda name: lambda v: dpn_lens.LocateConfig(**{name: v}))(name))
       for name, value in (("n_pairs", 20), ("seed", 1), ("q", 0.75), ("tau_d", 0.375), ("budget", 10),
                           ("selection_pairs", 16), ("selection_seed", 1), ("selection_tokens", 8),
                           ("selection_batch", 4))},
}


def _effect():
    _scores()
    return dpn_lens.effect_map(_CACHE["base"], _scores(), 4)


def _tensors(result):
    return tuple(x.tolist() if torch.is_tensor(x) else x for x in result)


def _pb(**options):
    from helpers import write_personalitybench

    if "pb" not in _CACHE:
        import tempfile
        from pathlib import Path

        _CACHE["pb"] = write_personalitybench(Path(tempfile.mkdtemp()) / "data")
    return dpn_lens.personalitybench_contrastive_set(_CACHE["pb"], "extraversion", **{"n_pairs": 4, **options}).high


def _ap(**options):
    import json
    import tempfile
    from pathlib import Path

    if "ap" not in _CACHE:
        folder = Path(tempfile.mkdtemp()) / "anthropic_persona"
        folder.mkdir()
        rows = [{"statement": f"I enjoy meeting new people number {i}", "answer_matching_behavior": answer,
                 "answer_not_matching_behavior": " No" if answer == " Yes" else " Yes"}
                for i in range(6) for answer in (" Yes", " No")]
        (folder / "extraversion.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
        _CACHE["ap"] = folder.parent
    return dpn_lens.anthropic_persona_contrastive_set(_CACHE["ap"], "extraversion", **{"n_pairs": 4, **options}).high


def _effect_scores(**options):
    _scores()
    settings = {"contrastive_pairs": 4, **options}
    rule = "attribution" if {"n_pairs", "seed", "selection_tokens", "selection_batch"} & options.keys() else "write-layer"
    if rule == "attribution":
        settings.setdefault("n_pairs", 2)
        settings.setdefault("selection_tokens", 3)
    return dpn_lens.effect_scores(_model(), _CACHE["base"], rule, **settings).scores.tolist()


def _selection_pairs(**options):
    pairs = dpn_lens.selection_pairs(_model(), "openness", **{"n_pairs": 2, "max_new_tokens": 3, "cache": False, **options})
    return [(p.question, p.high_answer, p.low_answer) for p in pairs]


def _calibrate(**options):
    from dpn_lens.evaluation.calibrate import KLProbe, probe_chunks

    if "probe" not in _CACHE:
        _CACHE["probe"] = KLProbe(_model(), probe_chunks(_model(), n_chunks=1, chunk_tokens=12))
    from dpn_lens.models import model_fingerprint

    neuron_map = make_map("openness", high={1: [0, 3, 5]}, low={2: [4]}, layers=[1, 2], n_layers=4, d_mlp=48,
                          fingerprint=model_fingerprint(_model()).to_dict())
    if options.get("target_shift") is not None:
        from dpn_lens.evaluation.preference import PreferencePair

        options["pairs"] = [PreferencePair("what would you do ?", "a party .", "a book .")] * 2
    settings = {"target_kl": 0.01, "gammas": (0.5, 1.0, 2.0), **options}
    return dpn_lens.calibrate_gamma(_model(), neuron_map, probe=_CACHE["probe"], **settings).gamma


def _calibrate_directions(**options):
    from dpn_lens.models import model_fingerprint

    _calibrate()                                        # builds the shared probe
    neuron_map = make_map("openness", high={1: [0, 3, 5]}, low={2: [4]}, layers=[1, 2], n_layers=4, d_mlp=48,
                          fingerprint=model_fingerprint(_model()).to_dict())
    calibrations = dpn_lens.calibrate_directions(_model(), neuron_map=neuron_map, probe=_CACHE["probe"], **options)
    return [calibration.gamma for calibration in calibrations.values()]


def _explore(**options):
    """The answers the panel's generate button writes (greedy, so equal inputs give equal text)."""
    pytest.importorskip("ipywidgets", reason="the notebook explorer needs ipywidgets (a test extra)")
    from dpn_lens.models import model_fingerprint
    from dpn_lens.run import Run

    neuron_map = make_map("openness", high={1: [0, 3, 5]}, low={2: [4]}, layers=[1, 2], n_layers=4, d_mlp=48,
                          fingerprint=model_fingerprint(_model()).to_dict())
    panel = dpn_lens.explore(Run(None, {"openness": neuron_map}), _model(), prompt="what would you do ?", **options)
    generate, answers = panel.children[5].children[1], panel.children[6]
    generate.click()
    return answers.value


def test_calls_cover_every_numeric_parameter_of_the_public_api():
    found = public_numeric_parameters()
    assert found - CALLS.keys() == set(), "numeric parameters with no entry in CALLS: add one for each"
    assert CALLS.keys() - found == set(), "entries in CALLS for parameters the API no longer has"


def _forms(value: float, kind: str) -> list[Any]:
    forms = [value, np.float64(value), np.float32(value), torch.tensor(float(value)), np.array(value)]
    if kind == "int":
        forms += [np.int64(value), np.int32(value), torch.tensor(int(value)), float(value)]
    return forms


def _kind(function: str, parameter: str) -> str:
    return _numeric(inspect.signature(getattr(dpn_lens, function)).parameters[parameter].annotation)


def _same(a: Any, b: Any) -> bool:
    if dataclasses.is_dataclass(a):
        a, b = dataclasses.asdict(a), dataclasses.asdict(b)
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b or (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-6))


@pytest.mark.parametrize("key", sorted(CALLS), ids=[f"{f}.{p}" for f, p in sorted(CALLS)])
def test_numpy_and_torch_numbers_give_what_the_python_number_gives(key):
    value, call = CALLS[key]
    expected = call(value)
    for form in _forms(value, _kind(*key)):
        assert _same(call(form), expected), f"{key} with {form!r} ({type(form).__name__})"


NOT_NUMBERS = [True, np.bool_(True), "1", float("nan"), math.inf, np.float32("-inf"), np.array([1.0, 2.0]),
               torch.tensor([1.0]), [1.0]]


@pytest.mark.parametrize("key", sorted(CALLS), ids=[f"{f}.{p}" for f, p in sorted(CALLS)])
def test_what_is_not_a_number_is_refused_naming_the_parameter(key):
    """Every parameter against every kind of non-number: the space is finite, so all of it, not a sample."""
    _, call = CALLS[key]
    for bad in NOT_NUMBERS:
        with pytest.raises(ValueError) as refused:
            call(bad)
        assert key[1] in str(refused.value), f"{key} refused {bad!r} without naming the parameter: {refused.value}"
