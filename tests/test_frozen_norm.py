"""The frozen-norm neuron edit: the neuron edit itself without a post-MLP norm; through Gemma's post-MLP
norm, ``g * (W_out @ delta) / rms(W_out @ a)`` at each token; its random-neuron control; and the
``attribution-t-frozen`` method of ``control``."""

from __future__ import annotations

import pytest
import torch
from test_residual_write import _edit, _tiny_gemma

from dpn_lens.effect.frozen_norm import FrozenNorm, FrozenNormEdit, frozen_norm_edit
from dpn_lens.evaluation.controls import random_neuron_control
from dpn_lens.steering import Intervention, steer

TEXT = "a friend at home ."


def _run(model, edit=None, names=()):
    """Logits and the activations at ``names`` of one pass over TEXT (``edit`` applied, if any)."""
    seen = {}

    def keep(name):
        def hook(activation, hook):
            seen[name] = activation.detach().clone()
            return activation
        return hook

    with torch.no_grad(), steer(model, edit, check=False), model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
        logits = model(model.to_tokens(TEXT))
    return logits, seen


def test_without_a_post_mlp_norm_it_is_the_neuron_edit_itself(tiny_model):
    edit = _edit()
    assert frozen_norm_edit(tiny_model, edit) is edit


@pytest.fixture(scope="module")
def gemma():
    return _tiny_gemma()


def test_through_gemmas_post_norm_it_adds_the_gained_write_over_the_tokens_own_scale(gemma):
    """At the first edited layer (its input is not yet changed by the edit) the MLP output moves by exactly
    g * (W_out @ delta) / sqrt(mean((W_out @ a)^2) + eps), computed here from the HF modules; float32 rounding."""
    bridge, hf_model = gemma
    edit = 2.5 * frozen_norm_edit(bridge, _edit())
    assert isinstance(edit, FrozenNormEdit) and sorted(edit.norms) == [1, 3] and edit.n_edited == 5
    names = ["blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"]
    clean, before = _run(bridge, None, names)
    steered, after = _run(bridge, edit, names)
    block = hf_model.model.layers[1]
    norm = block.post_feedforward_layernorm
    with torch.no_grad():
        x = block.mlp.down_proj(before["blocks.1.mlp.hook_post"])
        expected = ((1 + norm.weight) * (block.mlp.down_proj.weight @ (2.5 * _edit().deltas[1]))
                    / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
    moved = after["blocks.1.hook_mlp_out"] - before["blocks.1.hook_mlp_out"]
    assert torch.allclose(moved, expected, atol=1e-5 * float(expected.abs().max())), (moved - expected).abs().max()
    # hook_post itself is left alone: the write is added after the norm
    assert torch.equal(after["blocks.1.mlp.hook_post"], before["blocks.1.mlp.hook_post"])
    assert (steered - clean).abs().max() > 1e-2
    # ... and it is not what the plain neuron edit does through the norm
    _, plain = _run(bridge, 2.5 * _edit(), names)
    assert not torch.allclose(plain["blocks.1.hook_mlp_out"] - before["blocks.1.hook_mlp_out"], expected,
                              atol=1e-2 * float(expected.abs().max()))


def test_decode_only_leaves_the_prompt_pass_alone_and_the_algebra_keeps_the_norms(gemma):
    bridge, _ = gemma
    edit = frozen_norm_edit(bridge, _edit().at_positions("decode"))
    clean, _ = _run(bridge)
    with pytest.warns(RuntimeWarning, match="never fired"):
        untouched, _ = _run(bridge, edit)
    assert torch.equal(clean, untouched)
    assert edit.at_positions("all").positions == "all" and edit.positions == "decode"
    assert torch.allclose((-2.0 * edit).write(3), -2.0 * edit.write(3))
    control = random_neuron_control(edit, seed=3)
    assert isinstance(control, FrozenNormEdit) and control.norms is edit.norms
    assert control.n_edited == edit.n_edited and not torch.equal(control.write(1), edit.write(1))
    assert torch.equal(control.intervention.deltas[1], random_neuron_control(_edit().at_positions("decode"), 3).deltas[1])


def test_bad_input(gemma, tiny_model):
    bridge, _ = gemma
    with pytest.raises(TypeError, match="takes a neuron edit"):
        frozen_norm_edit(bridge, "not an edit")
    with pytest.raises(TypeError, match="takes a neuron edit"):
        FrozenNormEdit(None, {})
    norm = FrozenNorm(torch.ones(32, 48), torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="mlp.hook_post"):
        FrozenNormEdit(Intervention({1: torch.ones(48)}, hook_template="blocks.{layer}.mlp.hook_pre"), {1: norm})


def test_control_gives_attribution_t_frozen_a_random_neuron_control_and_on_llama_it_is_attribution_t(tmp_path, monkeypatch):
    """``attribution-t-frozen`` edits attribution-t's neurons: control selects that map, sweeps the variant and
    draws random neurons for it. On the tiny Llama (no post-MLP norm) every curve equals attribution-t's."""
    from helpers import build_tiny_model, write_personalitybench
    from test_control import tiny_map

    from dpn_lens.evaluation.control import ControlConfig, random_curve, run_control

    model = build_tiny_model(tmp_path / "model", max_positions=512)
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    config = ControlConfig(traits=["extraversion"], methods=["attribution-t", "attribution-t-frozen"],
                           data_dir=str(data), pairs=8, max_new_tokens=5, gammas=[0.25, 1, 4], kl_levels=[0.01],
                           target_kl=0.01, kl_chunks=2, kl_tokens=24, random_draws=2, selection_pairs=4, budget=6)
    located = []
    result = run_control(model, config, log=lambda m: None, progress=False,
                         maps={"extraversion": tiny_map(model)}, on_located=lambda t, m: located.append(m.rule)).to_dict()
    assert located == ["attribution-t"]
    by_method = {}
    for point in result["curves"]:
        by_method.setdefault(point["method"], []).append(point)
    assert random_curve("attribution-t-frozen") in by_method
    assert {row["method"] for row in result["calibrated"]} == {"attribution-t", "attribution-t-frozen"}
    for plain, frozen in zip(by_method["attribution-t"], by_method["attribution-t-frozen"]):
        assert plain["gamma"] == frozen["gamma"] and plain["kl"] == frozen["kl"] and plain["shift"] == frozen["shift"]


def test_control_command_reports_dpn_le_frozen_beside_its_random_neurons(tiny_folder, tmp_path, monkeypatch, capsys):
    import json

    from test_control import run_control_command

    status, out = run_control_command(tiny_folder, tmp_path, monkeypatch, "dpn-le-frozen", "--random-draws", "2")
    assert status == 0, capsys.readouterr().err
    result = json.loads((out / "control.json").read_text())
    assert {p["method"] for p in result["curves"]} == {"dpn-le-frozen", "random-neurons:dpn-le-frozen"}
    assert result["goal"][0]["rule"] == "dpn-le-frozen" and "dpn-le-frozen" in (out / "control.md").read_text()


def test_the_token_scaled_edit_scales_each_tokens_delta_by_its_mlp_output_scale(gemma, tiny_model):
    """At hook_post the token-scaled edit adds delta * rms(W_out a) / reference at each token (a read of the
    HF down_proj), so through the norm it writes about the same at every token; the plain edit on Llama."""
    from dpn_lens.effect.frozen_norm import TokenScaledEdit, reference_scales, token_scaled_edit

    plain = _edit()
    assert token_scaled_edit(tiny_model, plain, {}) is plain
    bridge, hf_model = gemma
    reference = reference_scales(bridge, [0, 1, 2, 3], ["what would you do ?", "a party with a friend ."])
    assert sorted(reference) == [0, 1, 2, 3] and all(value > 0 for value in reference.values())
    edit = 1.5 * token_scaled_edit(bridge, _edit(), reference)
    assert isinstance(edit, TokenScaledEdit) and edit.n_edited == 5
    seen = {}

    def keep(activation, hook):
        seen.setdefault("post", []).append(activation.detach().clone())
        return activation

    ids = bridge.to_tokens(TEXT)
    with torch.no_grad(), bridge.hooks(fwd_hooks=[("blocks.1.mlp.hook_post", keep)]):
        bridge(ids)
    clean = seen.pop("post")[0]
    with torch.no_grad():
        x = hf_model.model.layers[1].mlp.down_proj(clean)
        rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + hf_model.model.layers[1].post_feedforward_layernorm.eps)
        edited = edit.fwd_hooks()[0][1](clean.clone(), None)
    expected = clean + 1.5 * _edit().deltas[1] * rms / reference[1]
    assert torch.allclose(edited, expected, atol=1e-5), (edited - expected).abs().max()
    assert rms.max() / rms.min() > 1.05   # the scale does differ between tokens
    control = random_neuron_control(edit, seed=1)
    assert isinstance(control, TokenScaledEdit) and control.reference == edit.reference
    with pytest.raises(ValueError, match="reference scale"):
        TokenScaledEdit(_edit(), edit.norms, {})


def test_the_kl_probe_can_leave_its_context_token_unedited(gemma):
    """``KLProbe`` (``edit_context=False``, the default) adds the edit at the chunk's tokens only, not at the BOS before them: its
    KL equals one computed here with the delta added by hand at positions 1.. (and differs from editing BOS too)."""
    from dpn_lens.evaluation.calibrate import KLProbe

    bridge, _ = gemma
    chunk = bridge.to_tokens("a friend at home . a party with a friend .", prepend_bos=False)[0].tolist()
    everywhere, chunk_only = KLProbe(bridge, [chunk], edit_context=True), KLProbe(bridge, [chunk])
    edit = 3.0 * _edit()
    sequence = torch.tensor([chunk_only.context + chunk])

    def by_hand(layer):
        def hook(activation, hook):
            activation = activation.clone()
            activation[:, 1:] += edit.deltas[layer]
            return activation
        return hook

    with torch.no_grad():
        base = torch.log_softmax(bridge(sequence)[0, :-1].double(), -1)
        with bridge.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", by_hand(layer)) for layer in (1, 3)]):
            edited = torch.log_softmax(bridge(sequence)[0, :-1].double(), -1)
    expected = float((base.exp() * (base - edited)).sum(-1).mean())
    assert chunk_only(edit)[0] == pytest.approx(expected, rel=1e-3)
    assert everywhere(edit)[0] != pytest.approx(expected, rel=1e-2)
    assert chunk_only(None)[0] == pytest.approx(0.0, abs=1e-6)
    # Chunks of other lengths batch together, right-padded: the token-weighted mean of each chunk's KL.
    short = chunk[:-3]
    both = KLProbe(bridge, [chunk, short], edit_context=False)(edit)[0]
    alone = KLProbe(bridge, [short], edit_context=False)(edit)[0]
    assert both == pytest.approx((len(chunk) * expected + len(short) * alone) / (len(chunk) + len(short)), rel=1e-3)
