"""Neuron cards: the logit lens is W_out @ W_U (through the norms' weights), the streamed top-k contexts equal
a brute-force pass, and `dpn-lens cards` writes one card per neuron of every map, reused while current."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpn_lens.cards.card import CardConfig, build_cards, cards_path, load_cards
from dpn_lens.cards.contexts import EMPTY_TOKEN, TopContexts, scan, text_windows
from dpn_lens.cards.lens import logit_lens, norm_scale
from dpn_lens.cli import main
from dpn_lens.run import Run


def _hf(model):
    return model.original_model


def test_the_logit_lens_is_w_out_times_the_final_norm_weight_times_w_u(tiny_model):
    hf = _hf(tiny_model)
    original = hf.model.norm.weight.detach().clone()
    with torch.no_grad():                    # a final norm weight far from ones, so applying it matters
        hf.model.norm.weight.copy_(torch.linspace(0.2, 3.0, original.numel()))
    try:
        _check_lens_against_weights(tiny_model, hf)
    finally:
        with torch.no_grad():
            hf.model.norm.weight.copy_(original)


@torch.no_grad()
def _check_lens_against_weights(tiny_model, hf):
    layer, neurons = 2, [0, 7, 31]
    lenses = logit_lens(tiny_model, layer, neurons, top=5)
    w_out = hf.model.layers[layer].mlp.down_proj.weight.detach().float()          # [d_model, d_mlp]
    w_u = hf.lm_head.weight.detach().float().T                                     # [d_model, vocab]
    for lens, neuron in zip(lenses, neurons):
        direct = (w_out[:, neuron] * hf.model.norm.weight.float()) @ w_u
        top = torch.topk(direct, 5)
        bottom = torch.topk(-direct, 5)
        assert lens.promoted_ids == top.indices.tolist() and lens.suppressed_ids == bottom.indices.tolist()
        np.testing.assert_allclose([v for _, v in lens.promoted], top.values.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([v for _, v in lens.suppressed], (-bottom.values).numpy(), rtol=1e-5, atol=1e-6)
        assert lens.promoted[0][0] == tiny_model.tokenizer.decode([top.indices[0].item()])
    raw = logit_lens(tiny_model, layer, [7], top=3, apply_norm=False)[0]
    assert raw.promoted_ids == torch.topk(w_out[:, 7] @ w_u, 3).indices.tolist()


def test_norm_scale_reads_llama_and_gemma_weights_off_the_module():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    weight = torch.linspace(-0.5, 0.5, 8)
    gemma, llama = Gemma3RMSNorm(8, eps=1e-6), LlamaRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        gemma.weight.copy_(weight)
        llama.weight.copy_(weight)
    assert torch.allclose(norm_scale(gemma, 8)[0], 1 + weight, atol=1e-5)      # Gemma scales by (1 + w)
    assert torch.allclose(norm_scale(llama, 8)[0], weight, atol=1e-5)
    layer_norm = torch.nn.LayerNorm(8)
    assert norm_scale(layer_norm, 8)[1] is True and norm_scale(None, 8) == (None, False)


def _brute_force(model, neurons, token_lists):
    """Every activation of every watched neuron at every position, one unpadded sequence at a time."""
    records = {neuron: [] for neuron in neurons}   # (value, sequence, position, full activation row)
    for number, tokens in enumerate(token_lists):
        captured = {}
        hooks = [(f"blocks.{layer}.mlp.hook_post",
                  lambda act, hook, layer=layer: captured.__setitem__(layer, act[0].float().clone()))
                 for layer in sorted({layer for layer, _ in neurons})]
        with torch.inference_mode():
            model.run_with_hooks(torch.tensor([tokens]), fwd_hooks=hooks)
        for layer, index in neurons:
            row = captured[layer][:, index]
            records[(layer, index)] += [(float(v), number, p, row) for p, v in enumerate(row)]
    return records


def test_streamed_top_contexts_equal_a_brute_force_pass(tiny_model):
    rng = np.random.default_rng(0)
    vocab = [i for i in range(len(tiny_model.tokenizer)) if i >= 3]
    token_lists = [rng.choice(vocab, size=int(rng.integers(3, 14))).tolist() for _ in range(23)]
    neurons = [(0, 5), (2, 11), (0, 40), (3, 1)]
    k, before, after = 4, 3, 2
    found = scan(tiny_model, neurons, iter(token_lists), k=k, before=before, after=after, batch_size=5)
    records = _brute_force(tiny_model, neurons, token_lists)
    for row, neuron in enumerate(neurons):
        best = sorted(records[neuron], key=lambda r: -r[0])[:k]
        np.testing.assert_allclose(found.contexts.values[row].numpy(), [r[0] for r in best], rtol=1e-4, atol=1e-5)
        assert found.contexts.where[row].tolist() == [[r[1], r[2]] for r in best]
        for slot, (_, number, position, activations) in enumerate(best):
            tokens = token_lists[number]
            expected = [tokens[p] if 0 <= p < len(tokens) else EMPTY_TOKEN
                        for p in range(position - before, position + after + 1)]
            assert found.contexts.tokens[row, slot].tolist() == expected
            window = found.contexts.activations[row, slot].numpy()
            inside = np.array(expected) != EMPTY_TOKEN
            assert np.isnan(window[~inside]).all()
            np.testing.assert_allclose(window[inside], activations[[p for p, e in zip(
                range(position - before, position + after + 1), expected) if e != EMPTY_TOKEN]].numpy(),
                rtol=1e-4, atol=1e-5)
        last = [records[neuron][sum(len(t) for t in token_lists[:n]) + len(token_lists[n]) - 1][0]
                for n in range(len(token_lists))]
        np.testing.assert_allclose(found.last_token[row].numpy(), last, rtol=1e-4, atol=1e-5)


def test_the_top_k_store_is_bounded_whatever_the_corpus_size():
    store = TopContexts.empty([(0, 0)], k=3, before=1, after=1)
    for start in range(50):                      # 50 batches of 2 x 4 positions
        activations = torch.arange(start * 8, start * 8 + 8, dtype=torch.float32).reshape(2, 4, 1)
        store.update(activations, torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4), torch.tensor([2 * start, 2 * start + 1]))
        assert store.values.shape == (1, 3) and store.tokens.shape == (1, 3, 3)
    assert store.values[0].tolist() == [399.0, 398.0, 397.0]
    assert store.where[0].tolist() == [[99, 3], [99, 2], [99, 1]]


def test_text_windows_streams_fixed_windows_and_refuses_a_missing_file(tiny_model, tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(" = Heading = \n\n" + "you are calm . hello world\n" * 40, encoding="utf-8")
    windows = list(text_windows(tiny_model.tokenizer, path, window=8, max_windows=5))
    assert len(windows) == 5 and all(len(w) == 8 for w in windows)
    assert len(list(text_windows(tiny_model.tokenizer, path, window=8, max_windows=5, skip_windows=2))) == 5
    with pytest.raises(FileNotFoundError, match="wikitext2_test"):
        next(text_windows(tiny_model.tokenizer, tmp_path / "missing.txt"))


@pytest.fixture(scope="module")
def carded_run(tiny_folder, tmp_path_factory):

    folder = tmp_path_factory.mktemp("cards") / "run"
    with pytest.MonkeyPatch.context() as patch:      # this module's cache only: later modules need the real one
        patch.setenv("DPN_LENS_CACHE", str(folder.parent / "cache"))
        code = main(["locate", "--model", str(tiny_folder), "--dtype", "float32", "--traits", "openness,E",
                     "--n-pairs", "12", "--layers", "0-2", "--q", "0.8", "--tau-d", "0.1", "--select", "attribution-t",
                     "--selection-pairs", "16", "--budget", "5", "--out", str(folder), "--no-progress"])
    assert code == 0
    data = folder.parent / "data" / "capability" / "wikitext2_test"
    data.mkdir(parents=True)
    (data / "test.txt").write_text("you are calm . hello world what would you do ?\n" * 30, encoding="utf-8")
    return folder


def test_cards_cover_every_neuron_of_every_map_and_are_reused_while_current(carded_run, tiny_folder, capsys):
    data_dir = str(carded_run.parent / "data")
    code = main(["cards", "--run", str(carded_run), "--model", str(tiny_folder), "--dtype", "float32", "--data-dir", data_dir,
                 "--n-pairs", "6", "--text-windows", "8", "--k", "3"])
    assert code == 0, capsys.readouterr().err
    assert "[attribution-t]: 5 cards" in capsys.readouterr().out
    run = Run.load(carded_run)
    for trait, neuron_map in run.maps.items():
        for rule, chosen in [("dpn-le", neuron_map), ("attribution-t", run.rule_maps["attribution-t"][trait])]:
            cards = load_cards(cards_path(carded_run, trait, rule), chosen)
            assert cards is not None and len(cards) == chosen.n_selected()
            assert {(c.pole, c.layer, c.neuron) for c in cards} == {
                (pole, layer, int(i)) for pole in ("high", "low") for layer, idx in chosen.pole(pole).items()
                for i in idx.tolist()}
            stats = run.stats[trait]
            for card in cards:
                row = stats.layers.index(card.layer)
                assert card.mean_high == pytest.approx(float(stats.high.mean[row, card.neuron]))
                assert card.s == pytest.approx(float(chosen.steering_value[chosen.stat_layers.index(card.layer), card.neuron]))
                assert sum(card.histogram["high"]) == 6 and sum(card.histogram["low"]) == 6
                assert 1 <= len(card.text_contexts) <= 3 and len(card.promoted) == 15
                assert all(ctx.tokens[ctx.center] for ctx in card.prompt_contexts)
    # A card of a neuron both maps hold names the other map.
    dual = run.maps["openness"]
    shared = {(layer, int(i)) for layer, idx in dual.high.items() for i in idx.tolist()} | {
        (layer, int(i)) for layer, idx in dual.low.items() for i in idx.tolist()}
    for card in load_cards(cards_path(carded_run, "openness", "attribution-t")):
        assert ((card.layer, card.neuron) in shared) == any("openness [dpn-le]" in m for m in card.in_maps)
    # Built again with the same settings: read back, not recomputed.
    path = cards_path(carded_run, "openness")
    before = path.stat().st_mtime_ns
    from dpn_lens.models import load_model

    model = load_model(str(tiny_folder), dtype="float32")
    config = CardConfig(n_pairs=6, text_windows=8, k=3, data_dir=data_dir)
    again = build_cards(run, model, config, log=None)
    assert path.stat().st_mtime_ns == before and len(again[("dpn-le", "openness")]) == dual.n_selected()
    # Other settings: rebuilt.
    build_cards(run, model, CardConfig(n_pairs=4, text_windows=8, k=3, data_dir=data_dir), rules=["dpn-le"], log=None)
    assert json.loads(path.read_text())["config"]["n_pairs"] == 4


def test_a_broken_cards_file_says_what_to_do(tmp_path):
    path = tmp_path / "openness.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="delete it and build the cards again"):
        load_cards(path)
    assert load_cards(tmp_path / "missing.json") is None


def test_the_notebook_panels_live_reselection_equals_reselect(carded_run):
    from dpn_lens.cards.notebook import selection_view
    from dpn_lens.localization.localize import reselect

    neuron_map = Run.load(carded_run).maps["openness"]
    for q, tau_d in [(0.8, 0.1), (0.9, 0.3), (0.95, 0.0), (0.7, 0.6)]:
        view = selection_view(neuron_map, q, tau_d)
        expected = reselect(neuron_map, q=q, tau_d=tau_d)
        assert view.counts == expected.counts_per_layer()
        assert (view.n_high, view.n_low) == (expected.n_selected("high"), expected.n_selected("low"))
        for pole in ("high", "low"):
            assert {l: v.tolist() for l, v in view.neuron_map.pole(pole).items()} == {
                l: v.tolist() for l, v in expected.pole(pole).items()}
        assert f"q={q:g}" in view.text and len(view.figure().data) == 2


def test_the_notebook_panel_runs_its_callbacks_without_a_frontend(carded_run, tiny_folder):
    pytest.importorskip("ipywidgets", reason="the notebook explorer needs ipywidgets (a test extra)")
    from dpn_lens.cards.card import build_cards
    from dpn_lens.cards.notebook import card_html, explore, selection_view, steered_answers
    from dpn_lens.models import load_model

    run = Run.load(carded_run)
    model = load_model(str(tiny_folder), dtype="float32")
    cards = build_cards(run, model, CardConfig(n_pairs=6, text_windows=8, k=3,
                                               data_dir=str(carded_run.parent / "data")), log=None)
    same = steered_answers(model, run.maps["openness"], "what would you do ?", 0.0, max_new_tokens=4)
    assert same["steered"] == same["unsteered"]                    # gamma 0 is no edit
    panel = explore(run, model, cards, prompt="what would you do ?", max_new_tokens=4)
    trait, sliders, summary = panel.children[0], panel.children[1], panel.children[2]
    q, tau_d = sliders.children
    q.value, tau_d.value = 0.9, 0.3
    assert selection_view(run.maps[trait.value], 0.9, 0.3).text in summary.value
    trait.value = "extraversion"
    assert "extraversion" in summary.value
    generate, answers = panel.children[5].children[1], panel.children[6]
    generate.click()
    assert "unsteered" in answers.value and "increase" in answers.value
    card_view = panel.children[8]
    first = cards[("dpn-le", "extraversion")][0]
    assert first.label in card_view.value and card_view.value == card_html(first)


def test_a_cards_effect_is_the_margin_shift_of_that_neuron_alone_at_the_maps_gamma(carded_run, tiny_folder, tmp_path,
                                                                                     monkeypatch):
    import dataclasses

    from helpers import write_personalitybench

    from dpn_lens.cards.effects import add_effects, effect_order
    from dpn_lens.evaluation.calibrate import calibrate_gamma
    from dpn_lens.evaluation.control import ControlConfig, held_out_pairs
    from dpn_lens.evaluation.preference import PairScorer
    from dpn_lens.models import load_model
    from dpn_lens.steering import steering_intervention

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    shared_data = write_personalitybench(tmp_path / "data")     # personas in the tiny model's vocabulary
    run = Run.load(carded_run)
    model = load_model(str(tiny_folder), dtype="float32")
    cards = build_cards(run, model, CardConfig(n_pairs=6, text_windows=8, k=3, data_dir=str(carded_run.parent / "data")),
                        rules=["dpn-le"], log=None)
    cards = {key: value for key, value in cards.items() if key[1] == "openness"}
    summary = add_effects(run, model, cards, str(shared_data), top=2, n_pairs=8, log=None)
    neuron_map = run.maps["openness"]
    gamma = calibrate_gamma(model, neuron_map, target_kl=0.05).gamma
    assert summary[("dpn-le", "openness")]["gamma"] == pytest.approx(gamma)
    ordered = effect_order(cards[("dpn-le", "openness")])
    assert all(card.effect is not None for card in ordered[:2]) and all(card.effect is None for card in ordered[2:])
    held = held_out_pairs(model, "openness", ControlConfig(traits=["openness"], data_dir=str(shared_data), pairs=8),
                          log=lambda message: None)
    scorer = PairScorer(model, held.pairs)
    base = scorer.margins()
    for card in ordered[:2]:
        # The same edit built another way: the map cut down to this one neuron, through steering_intervention.
        only = {pole: {layer: torch.tensor([card.neuron] if (layer, pole) == (card.layer, card.pole) else [],
                                            dtype=torch.long) for layer in neuron_map.layers} for pole in ("high", "low")}
        alone = dataclasses.replace(neuron_map, high=only["high"], low=only["low"])
        shifted = scorer.margins(edit=steering_intervention(alone, gamma, "increase")) - base
        assert card.effect["shift"] == pytest.approx(float(np.mean(shifted)), abs=1e-6)
        assert card.effect["ci_low"] <= card.effect["shift"] <= card.effect["ci_high"]


def test_cards_carry_the_multifunction_studys_capability_percentile_when_the_run_has_it(carded_run, tiny_folder):
    from safetensors.torch import save_file

    from dpn_lens.models import load_model

    run = Run.load(carded_run)
    n_layers, d_mlp = run.maps["openness"].n_model_layers, run.maps["openness"].d_mlp
    combined = torch.arange(n_layers * d_mlp, dtype=torch.float32).reshape(n_layers, d_mlp)   # rank = index
    study = carded_run / "figures"
    study.mkdir(exist_ok=True)
    save_file({"combined": combined}, str(study / "multifunction_attribution.safetensors"))
    try:
        model = load_model(str(tiny_folder), dtype="float32")
        cards = build_cards(run, model, CardConfig(n_pairs=6, text_windows=8, k=3,
                                                   data_dir=str(carded_run.parent / "data")), log=None)
        for card in cards[("dpn-le", "openness")]:
            assert card.capability["percentile_in_layer"] == pytest.approx(card.neuron / (d_mlp - 1))
            assert card.capability["capability_neuron"] == (card.neuron / (d_mlp - 1) >= 0.98)
    finally:
        (study / "multifunction_attribution.safetensors").unlink()
