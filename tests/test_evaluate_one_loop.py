"""``evaluate`` is one pass over the traits: each trait is prepared once for both harnesses where their
settings agree, apart where they differ, and the records are those of ``run_control`` and ``run_comparison``."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest

from dpn_lens.evaluation import methods, preparation
from dpn_lens.evaluation.capability import CapabilitySizes
from dpn_lens.evaluation.compare import CompareConfig, run_comparison
from dpn_lens.evaluation.control import ControlConfig, run_control
from dpn_lens.evaluation.runner import GENERATION_QUESTIONS, EvaluationConfig, evaluate

TRAITS = ["openness", "extraversion"]
METRICS = ["preference", "generation", "questionnaire", "statements", "capability"]
TIMING = {"seconds", "stages"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Llama whose words hold the questionnaire's option letters and the tiny PersonalityBench's."""
    from dpn_lens.tiny import TINY_PUNCTUATION, TINY_WORDS, build_tiny_model
    from helpers import LETTER_WORDS

    return build_tiny_model(tmp_path_factory.mktemp("one_loop"), n_layers=3, max_positions=512,
                            words=list(dict.fromkeys([*LETTER_WORDS, *TINY_WORDS])),
                            punctuation=tuple(dict.fromkeys([*TINY_PUNCTUATION, ".", ",", "?", ":", "(", ")", '"'])))


@pytest.fixture
def configs(shared_data, tmp_path, monkeypatch):
    """Small control and comparison configs that locate their maps alike, on a PersonalityBench the tiny model
    answers differently under high and low personas (the rest of the data as shipped)."""
    from helpers import write_personalitybench

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    for part in shared_data.iterdir():
        if part.is_dir() and not (data / part.name).exists():
            (data / part.name).symlink_to(part)
    common = dict(data_dir=str(data), locate_pairs=12, locate_q=0.8, locate_tau_d=0.0, caa_pairs=6, npti_prompts=2,
                  npti_new_tokens=3)
    control = ControlConfig.quick(**common, methods=["dpn-le", "attribution-t", "caa"], pairs=8, max_new_tokens=6,
                                  gammas=[2.0, 16.0, 128.0], kl_levels=[1e-4], target_kl=1e-4, random_draws=1,
                                  kl_chunks=1, kl_tokens=16, generation_questions=2, generation_draws=1)
    compare = CompareConfig.quick(**common, methods=["dpn-le", "attribution-t", "caa", "npti"], questionnaire_items=2,
                                  statements_per_pole=1, capability=CapabilitySizes(1, 1, 1, 16, 1, 16),
                                  gamma_sweep=[1.0], q_sweep=[], sweep_methods=["caa"])
    return control, compare


def _counted(monkeypatch, module, name: str, calls: Counter, key) -> None:
    """Count the calls of ``module.name`` by ``key(*args, **kwargs)``, letting each through."""
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls[key(*args, **kwargs)] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)


def _count_preparation(monkeypatch) -> tuple[Counter, Counter, Counter]:
    """Calls per trait of the map's location, per (trait, rule) of rule selection, per trait of CAA's vector."""
    maps, rules, caa = Counter(), Counter(), Counter()
    _counted(monkeypatch, preparation, "trait_map", maps, lambda model, trait, **_: trait)
    _counted(monkeypatch, preparation, "rule_maps", rules, lambda model, base, wanted, **_: (base.trait, *wanted))
    _counted(monkeypatch, methods, "caa_intervention", caa, lambda model, pairs, gamma: pairs.trait)
    return maps, rules, caa


def _untimed(value):
    if hasattr(value, "to_dict"):       # a typed record (ControlRecord): compared as its file
        return _untimed(value.to_dict())
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def test_each_trait_is_prepared_once_for_both_harnesses_and_the_records_are_theirs(model, configs, monkeypatch):
    control, compare = configs
    maps, rules, caa = _count_preparation(monkeypatch)
    messages: list[str] = []
    result = evaluate(model, METRICS, traits=TRAITS, control=control, compare=compare, log=messages.append,
                      progress=False)
    assert maps == {trait: 1 for trait in TRAITS}
    assert rules == {(trait, "attribution-t"): 1 for trait in TRAITS}
    assert caa == {trait: 1 for trait in TRAITS}
    assert [m for m in messages if "made once for both" in m] == [
        f"{trait}: control and compare done; made once for both: neuron map, attribution-t map, caa state"
        for trait in TRAITS]
    # Each run alone prepares each trait itself, and records what evaluate recorded.
    alone_control = run_control(model, dataclasses.replace(control, traits=TRAITS), log=lambda m: None, progress=False)
    alone_compare = run_comparison(model, dataclasses.replace(compare, traits=TRAITS), log=lambda m: None)
    assert maps == {trait: 3 for trait in TRAITS}
    assert _untimed(result.control) == _untimed(alone_control)
    assert _untimed(result.comparison) == _untimed(alone_compare)
    assert result.control.curves and result.control.generation and result.comparison.gamma_sweep


def test_settings_that_differ_are_prepared_apart_and_change_nothing(model, configs, monkeypatch):
    control, compare = configs
    compare = dataclasses.replace(compare, seed=1, caa_pairs=8)   # another selection draw and CAA vector, one map
    maps, rules, caa = _count_preparation(monkeypatch)
    messages: list[str] = []
    result = evaluate(model, ["preference", "capability"], traits=["openness"], control=control, compare=compare,
                      log=messages.append, progress=False)
    assert maps == {"openness": 1}
    assert rules == {("openness", "attribution-t"): 2} and caa == {"openness": 2}
    assert [m for m in messages if "done;" in m] == [
        "openness: control and compare done; made once for both: neuron map"]
    alone_control = run_control(model, dataclasses.replace(control, traits=["openness"]), log=lambda m: None,
                                progress=False)
    alone_compare = run_comparison(model, dataclasses.replace(compare, traits=["openness"]), log=lambda m: None)
    assert _untimed(result.control) == _untimed(alone_control)
    assert _untimed(result.comparison.to_dict()) == _untimed(alone_compare.to_dict())


def test_traits_the_configs_list_in_other_orders_keep_each_records_order(model, configs):
    control, compare = configs
    control = dataclasses.replace(control, traits=["extraversion"], generation_questions=0)
    compare = dataclasses.replace(compare, traits=["openness", "extraversion"], methods=["dpn-le"], sweep_methods=[])
    config = EvaluationConfig.of(["preference", "questionnaire"], control=control, compare=compare)
    result = evaluate(model, config, log=lambda m: None, progress=False)
    assert result.config == config and config.schedule() == [("openness", ("compare",)),
                                                              ("extraversion", ("control", "compare"))]
    assert result.control.traits_done == ["extraversion"]
    assert [r.trait for r in result.comparison.rows if r.method == "dpn-le"] == [
        "openness", "openness", "extraversion", "extraversion"]


def test_an_error_in_the_comparison_keeps_the_control_traits_already_finished(model, configs, tmp_path, monkeypatch):
    """When control ran to the end before the comparison began, a comparison error left control's files
    written; in one pass they are written on the way out, with the traits control finished."""
    import json

    from dpn_lens.evaluation.compare import ComparisonRun

    control, compare = configs

    def failing(self, trait, preparation=None):
        raise RuntimeError("comparison failed")

    monkeypatch.setattr(ComparisonRun, "run_trait", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="comparison failed"):
        evaluate(model, ["preference", "questionnaire"], traits=TRAITS, control=control, compare=compare, out=out,
                 log=lambda line: None, progress=False)
    record = json.loads((out / "control.json").read_text(encoding="utf-8"))
    assert record["meta"]["traits_done"] == TRAITS[:1]
    assert not (out / "comparison.json").exists()


def test_the_comparison_selects_effect_rules_with_its_own_selection_pairs_and_budget(model, configs, monkeypatch):
    """The comparison takes ``selection_pairs`` and ``budget`` as control does: set alike, both runs share the
    effect rule's map; set otherwise, the comparison selects its own with them."""
    control, compare = configs
    selections: Counter = Counter()
    _counted(monkeypatch, preparation, "rule_maps", selections,
             lambda model, base, wanted, **kw: (base.trait, kw["n_pairs"], kw["budget"]))
    control = dataclasses.replace(control, selection_pairs=6, budget=4, generation_questions=0)
    alike = dataclasses.replace(compare, selection_pairs=6, budget=4, methods=["attribution-t"], sweep_methods=[])
    evaluate(model, ["preference", "questionnaire"], traits=["openness"], control=control, compare=alike,
             log=lambda m: None, progress=False)
    assert selections == {("openness", 6, 4): 1}
    selections.clear()
    result = run_comparison(model, dataclasses.replace(alike, traits=["openness"], selection_pairs=8, budget=2),
                            log=lambda m: None)
    assert selections == {("openness", 8, 2): 1}
    assert result.meta.config["selection_pairs"] == 8 and result.meta.config["budget"] == 2
    with pytest.raises(ValueError, match="selection_pairs"):
        CompareConfig(selection_pairs=1)


def test_one_config_says_what_runs_and_is_refused_before_anything_loads():
    config = EvaluationConfig.of(["generation", "capability"], traits=["openness"],
                                 control=ControlConfig(traits=["neuroticism"]), compare=CompareConfig())
    assert config.harnesses == ["control", "compare"]
    assert config.control.traits == config.compare.traits == ["openness"]
    assert config.control.generation_questions == GENERATION_QUESTIONS      # generation asks for questions
    assert json.loads(json.dumps(config.to_dict()))["control"]["traits"] == ["openness"]
    assert EvaluationConfig.of(["questionnaire"]).control is None           # no control metric, no control config
    with pytest.raises(ValueError, match="judge metric needs a judge endpoint"):
        EvaluationConfig.of(["judge"])
    with pytest.raises(ValueError, match="takes an EvaluationConfig alone"):
        evaluate(None, config, traits=["openness"])
