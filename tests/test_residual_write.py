"""The residual write of a neuron edit: the edit itself on a pre-norm model, the first-order write through
Gemma's post-MLP norm, and the ``attribution-t-resid`` method of ``control``."""

from __future__ import annotations

import warnings

import pytest
import torch

from dpn_lens.effect.residual_write import ResidualWrite, residual_write
from dpn_lens.steering import Intervention, steer

PROMPTS = ["what would you do ?", "a party with a friend .", "a quiet book at home ."]


def _edit(d_mlp: int = 48) -> Intervention:
    low, high = torch.zeros(d_mlp), torch.zeros(d_mlp)
    low[[3, 7, 11]] = torch.tensor([0.5, -1.0, 2.0])
    high[[1, 2]] = torch.tensor([1.0, -0.3])
    return Intervention({1: low, 3: high}, positions="all")


def _logits(model, text: str, edit=None) -> torch.Tensor:
    ids = model.to_tokens(text)
    with torch.no_grad(), steer(model, edit, check=False):
        return model(ids)


def test_on_a_pre_norm_model_the_write_is_the_edit_itself(tiny_model):
    """Llama's MLP output is linear in its neurons: the fixed vectors give the edit's logits (float32 rounding)."""
    edit = _edit()
    write = residual_write(tiny_model, edit, PROMPTS)
    assert sorted(write.vectors) == [1, 3] and write.n_edited == 0 and write.positions == "all"
    clean = _logits(tiny_model, "a friend at home .")
    for gamma in (1.0, -2.5):
        edited = _logits(tiny_model, "a friend at home .", gamma * edit)
        written = _logits(tiny_model, "a friend at home .", gamma * write)
        assert (edited - clean).abs().max() > 1e-2            # the edit does something
        assert torch.allclose(edited, written, atol=1e-5), (edited - written).abs().max()
    # And it is W_out @ delta, computed directly from the weights.
    down = tiny_model.original_model.model.layers[1].mlp.down_proj.weight
    assert torch.allclose(write.vectors[1], down @ edit.deltas[1], atol=1e-5)


def _tiny_gemma():
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from dpn_lens.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, bos_token_id=1,
                              eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf_model = Gemma3ForCausalLM(config).eval()
    hf_model.config.architectures = ["Gemma3ForCausalLM"]
    with torch.no_grad():   # a norm weight that is not the identity, so the norm matters
        for layer in hf_model.model.layers:
            layer.post_feedforward_layernorm.weight.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers("tiny-gemma", hf_model=hf_model, tokenizer=tokenizer)
    bridge.dpn_is_chat_model = False
    return bridge, hf_model


def test_through_gemmas_post_norm_the_write_is_the_mean_first_order_effect():
    """The write equals the Jacobian-vector product of post_norm(down_proj(.)) at each token, averaged over
    tokens (torch.autograd.functional.jvp on the HF modules; central difference error O(step^2))."""
    bridge, hf_model = _tiny_gemma()
    edit = _edit()
    write = residual_write(bridge, edit, PROMPTS, step=1e-3)
    captured = {}

    def keep(layer):
        def hook(activation, hook):
            captured.setdefault(layer, []).append(activation.detach()[0])
            return activation
        return hook

    for prompt in PROMPTS:   # one prompt at a time: no padding to leave out
        ids = bridge.to_tokens(prompt)
        with torch.no_grad(), bridge.hooks(fwd_hooks=[(f"blocks.{l}.mlp.hook_post", keep(l)) for l in (1, 3)]):
            bridge(ids)
    for layer in (1, 3):
        block = hf_model.model.layers[layer]

        def mlp_out(post):
            return block.post_feedforward_layernorm(block.mlp.down_proj(post))

        posts = torch.cat(captured[layer])
        _, jvp = torch.autograd.functional.jvp(mlp_out, posts, edit.deltas[layer].expand_as(posts).contiguous())
        expected = jvp.mean(0)
        assert torch.allclose(write.vectors[layer], expected, atol=2e-3 * expected.abs().max()), \
            (write.vectors[layer] - expected).abs().max()
        # The norm makes it differ from the pre-norm write W_out @ delta (what the edit would write without it).
        assert not torch.allclose(expected, block.mlp.down_proj.weight @ edit.deltas[layer], atol=1e-2)


def test_residual_write_algebra_and_bad_input(tiny_model):
    write = ResidualWrite({2: torch.ones(32)}, label="w")
    assert torch.equal((-2.0 * write).vectors[2], -2 * torch.ones(32))
    assert write.at_positions("all").positions == "all" and write.positions == "decode"
    with pytest.raises(ValueError, match="finite"):
        ResidualWrite({1: torch.tensor([float("nan")])})
    with pytest.raises(TypeError, match="takes a neuron edit"):
        residual_write(tiny_model, write, PROMPTS)
    with pytest.raises(ValueError, match="at least one prompt"):
        residual_write(tiny_model, _edit(), [])
    with pytest.raises(ValueError, match="changes no neuron"):
        residual_write(tiny_model, Intervention({1: torch.zeros(48)}), PROMPTS)
    with pytest.raises(ValueError, match="step must be > 0"):
        residual_write(tiny_model, _edit(), PROMPTS, step=0)


def test_control_runs_the_residual_write_of_attribution_t_without_naming_attribution_t(tmp_path, monkeypatch):
    """``attribution-t-resid`` needs attribution-t's map; control selects it, sweeps the variant, and gives it
    no random-neuron control (it edits no neuron)."""
    from helpers import build_tiny_model, write_personalitybench
    from test_control import tiny_map

    from dpn_lens.evaluation.control import ControlConfig, run_control

    model = build_tiny_model(tmp_path / "model", max_positions=512)
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = write_personalitybench(tmp_path / "data")
    config = ControlConfig(traits=["extraversion"], methods=["attribution-t-resid", "caa"], data_dir=str(data),
                           pairs=8, max_new_tokens=5, gammas=[0.25, 1, 4], kl_levels=[0.01], target_kl=0.01,
                           kl_chunks=2, kl_tokens=24, random_draws=2, selection_pairs=4, budget=6, caa_pairs=4)
    located = []
    result = run_control(model, config, log=lambda m: None, progress=False,
                         maps={"extraversion": tiny_map(model)}, on_located=lambda t, m: located.append(m.rule)).to_dict()
    assert located == ["attribution-t"]
    methods = {point["method"] for point in result["costs"]}
    assert methods == {"attribution-t-resid", "caa"}
    assert not any(point["method"].startswith("random-neurons") for point in result["curves"])
    resid = [point for point in result["costs"] if point["method"] == "attribution-t-resid"]
    assert any(point["kl"] > 0 for point in resid)
