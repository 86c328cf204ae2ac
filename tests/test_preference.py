"""The paired-answer preference metric: known margins, answer-position edits, batching, JSONL loading."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from helpers import FailingEdit
from dpn_lens.baselines.caa import ResidualIntervention
from dpn_lens.evaluation.controls import random_neuron_control
from dpn_lens.hooked import encode
from dpn_lens.evaluation.preference import (PreferencePair, answer_scores,
                                            generate_persona_pairs, greedy_answers, load_preference_pairs,
                                            preference_margins, strip_template_echo)
from dpn_lens.steering import Intervention, MaskedEdit, steer

PROMPT = "you are outgoing . what would you do on the weekend ?"


def token_id(model, word: str) -> int:
    ids = encode(model, word, add_bos=False)
    assert len(ids) == 1
    return ids[0]


def random_edit(model, seed: int = 0, scale: float = 3.0, positions: str = "decode") -> Intervention:
    generator = torch.Generator().manual_seed(seed)
    d_mlp = int(model.cfg.d_mlp)
    return Intervention({layer: scale * torch.randn(d_mlp, generator=generator) for layer in (1, 2)}, positions,
                        label="random test edit")


# (a) a model forced to prefer one answer scores the known margin

def forced_logits(model, favoured: int, strength: float):
    """A hook that replaces every logit row by ``strength`` on ``favoured`` and 0 elsewhere."""
    def hook(logits, hook):
        forced = torch.zeros_like(logits)
        forced[..., favoured] = strength
        return forced
    return [("unembed.hook_out", hook)]


def test_forced_model_scores_the_known_margin(tiny_model):
    c = 4.0
    party = token_id(tiny_model, "party")
    assert token_id(tiny_model, "book") != party        # each word is one token, "book" another than "party"
    # Every position predicts "party" with logit c, every other token with 0: log p(party) = c - L and
    # log p(other) = -L. High answer "party party book" has mean 2c/3 - L, low "book book" has -L.
    pairs = [PreferencePair("what would you do ?", "party party book", "book book"),
             PreferencePair("how would you feel about a party ?", "book", "party"),
             PreferencePair(PROMPT, "party", "party party")]
    with tiny_model.hooks(fwd_hooks=forced_logits(tiny_model, party, c)):
        margins = preference_margins(tiny_model, pairs, batch_tokens=16)
    assert margins.shape == (3,) and margins.dtype == np.float64
    np.testing.assert_allclose(margins, [2 * c / 3, -c, 0.0], atol=1e-5)
    with tiny_model.hooks(fwd_hooks=forced_logits(tiny_model, party, c)):
        scores = answer_scores(tiny_model, pairs)
    np.testing.assert_array_equal(scores.high_tokens, [3, 1, 1])
    np.testing.assert_array_equal(scores.low_tokens, [2, 1, 2])
    # Sums: high 2c - 3L, low -2L for the first pair; -L vs c - L; c - L vs 2c - 2L.
    log_norm = math.log(math.exp(c) + len(tiny_model.tokenizer) - 1)
    np.testing.assert_allclose(scores.sum_margins, [2 * c - log_norm, -c, -c + log_norm], atol=1e-4)


def test_margin_equals_unbatched_log_softmax(tiny_model):
    pairs = [PreferencePair(PROMPT, "i would plan a party with friend .", "i would read a book at home ."),
             PreferencePair("how do you plan money ?", "yes", "no i plan money and work"),
             PreferencePair("what would you do at home ?", "art and travel", "quiet")]

    def mean_logprob(question: str, answer: str) -> float:
        context, tokens = encode(tiny_model, question), encode(tiny_model, answer, add_bos=False)
        with torch.inference_mode():
            logits = tiny_model(torch.tensor([context + tokens]))[0].float()
        logprobs = torch.log_softmax(logits, -1)
        return float(np.mean([logprobs[len(context) - 1 + t, token].item() for t, token in enumerate(tokens)]))

    expected = [mean_logprob(p.question, p.high_answer) - mean_logprob(p.question, p.low_answer) for p in pairs]
    for batch_tokens in (1, 20, 4096):  # one sequence per pass, mixed, everything at once
        np.testing.assert_allclose(preference_margins(tiny_model, pairs, batch_tokens=batch_tokens), expected,
                                   atol=1e-5)


def test_persona_changes_the_context(tiny_model):
    pairs = [PreferencePair(PROMPT, "party", "book")]
    plain = preference_margins(tiny_model, pairs)
    with_persona = preference_margins(tiny_model, pairs, persona="you are outgoing and kind .")
    assert not np.allclose(plain, with_persona)
    with pytest.raises(ValueError, match="persona"):
        preference_margins(tiny_model, pairs, persona="  ")
    two = pairs + [PreferencePair("how do you plan money ?", "yes", "no")]
    each = preference_margins(tiny_model, two, persona=["you are outgoing and kind .", None])
    np.testing.assert_allclose(each, [with_persona[0], preference_margins(tiny_model, two[1:])[0]], atol=1e-6)
    with pytest.raises(ValueError, match="one per pair"):
        preference_margins(tiny_model, two, persona=["you are kind ."])


# (b) the edit at the answer positions equals decode-only steering during KV-cached generation

def teacher_forced_logits(model, context: list[int], answer: list[int], edit) -> torch.Tensor:
    """Logits of the full sequence with ``edit`` at the answer positions only."""
    sequence = torch.tensor([context + answer])
    mask = (torch.arange(sequence.shape[1]) >= len(context))[None]
    with torch.inference_mode(), steer(model, None if edit is None else MaskedEdit(edit, mask)):
        return model(sequence)[0].float()


@pytest.mark.parametrize("kind", ["neurons", "residual"])
def test_answer_position_edit_equals_decode_steering(tiny_model, kind):
    if kind == "neurons":
        edit = random_edit(tiny_model)
    else:
        vector = 2.0 * torch.randn(int(tiny_model.cfg.d_model), generator=torch.Generator().manual_seed(1))
        edit = ResidualIntervention(2, vector, positions="decode")
    context = encode(tiny_model, PROMPT)
    n_new = 8
    with steer(tiny_model, edit):
        with torch.inference_mode():
            output = tiny_model.generate(torch.tensor([context]), max_new_tokens=n_new, do_sample=False,
                                         stop_at_eos=False, use_past_kv_cache=True, verbose=False,
                                         return_type="tokens", output_logits=True)
    answer = output.sequences[0, len(context):].tolist()
    generated = torch.stack([step[0].float() for step in output.logits])
    # Step k's logits predict answer token k: the prompt pass gives step 0, the decode pass over token k-1 the rest.
    forced = teacher_forced_logits(tiny_model, context, answer, edit)[len(context) - 1:len(context) - 1 + n_new]
    torch.testing.assert_close(forced, generated, atol=1e-4, rtol=1e-4)
    unedited = teacher_forced_logits(tiny_model, context, answer, None)[len(context) - 1:len(context) - 1 + n_new]
    assert (unedited[1:] - generated[1:]).abs().max() > 1e-2  # the edit matters, so the check means something
    torch.testing.assert_close(unedited[0], generated[0], atol=1e-4, rtol=1e-4)  # the prompt pass is unedited


def test_margin_with_edit_reads_the_decode_steered_logprobs(tiny_model):
    edit = random_edit(tiny_model, seed=3)
    high, low = "i would plan a party", "quiet book at home"
    context = encode(tiny_model, PROMPT)

    def decode_steered_mean(answer: str) -> float:
        # The teacher-forced logits with the answer-position edit are the decode-steered ones (test above).
        tokens = encode(tiny_model, answer, add_bos=False)
        logprobs = torch.log_softmax(teacher_forced_logits(tiny_model, context, tokens, edit), -1)
        return float(np.mean([logprobs[len(context) - 1 + t, token].item() for t, token in enumerate(tokens)]))

    expected = decode_steered_mean(high) - decode_steered_mean(low)
    margin = preference_margins(tiny_model, [PreferencePair(PROMPT, high, low)], edit=edit)
    np.testing.assert_allclose(margin, [expected], atol=1e-5)
    assert not np.allclose(margin, preference_margins(tiny_model, [PreferencePair(PROMPT, high, low)]))


# (c) prompt positions are untouched

def test_prompt_positions_untouched(tiny_model):
    edit = random_edit(tiny_model, seed=5, positions="all")
    context = encode(tiny_model, PROMPT)
    answer = encode(tiny_model, "i would plan a party", add_bos=False)
    edited = teacher_forced_logits(tiny_model, context, answer, edit)
    plain = teacher_forced_logits(tiny_model, context, answer, None)
    assert torch.equal(edited[:len(context)], plain[:len(context)])
    assert (edited[len(context):] - plain[len(context):]).abs().max() > 1e-2


def test_hooks_removed_after_an_error(tiny_model):
    edit = random_edit(tiny_model)
    pairs = [PreferencePair(PROMPT, "party", "book")]
    before = preference_margins(tiny_model, pairs)
    with pytest.raises(ValueError, match="no tokens"):
        preference_margins(tiny_model, pairs + [PreferencePair(PROMPT, "party", "")], edit=edit)

    bad = FailingEdit(ZeroDivisionError("division by zero"))
    with pytest.raises(ZeroDivisionError):
        preference_margins(tiny_model, pairs, edit=bad)
    np.testing.assert_array_equal(preference_margins(tiny_model, pairs), before)


def test_random_control_edit_runs(tiny_model):
    edit = random_edit(tiny_model)
    margins = preference_margins(tiny_model, [PreferencePair(PROMPT, "party", "book")],
                                 edit=random_neuron_control(edit, seed=1))
    assert np.isfinite(margins).all()


# generation of persona pairs

def test_batched_greedy_equals_unbatched(tiny_model):
    prompts = [encode(tiny_model, text) for text in
               (PROMPT, "how do you plan money ?", "you are reserved and quiet . a friend invites you to a party .",
                "yes", "what would you do at home ?")]
    one_by_one = greedy_answers(tiny_model, prompts, max_new_tokens=12, batch_size=1)
    batched = greedy_answers(tiny_model, prompts, max_new_tokens=12, batch_size=4)
    assert batched == one_by_one
    assert all(2 not in answer for answer in batched)  # cut at EOS


def test_generate_persona_pairs_counts_drops(tiny_model):
    questions = ["what would you do on the weekend ?", "how do you plan money ?", "a friend invites you to a party ."]
    result = generate_persona_pairs(tiny_model, "extraversion", questions, ["you are outgoing .", "you love party ."],
                                    ["you are reserved .", "you are quiet ."], n_pairs=6, seed=0, max_new_tokens=6,
                                    batch_size=3)
    assert result.n_drawn == 6
    assert len(result) + result.n_identical + result.n_empty == 6
    for pair in result:
        assert pair.question in questions and pair.high_answer and pair.low_answer != pair.high_answer


def test_generate_persona_pairs_drops_identical_answers(tiny_model):
    # Forced logits make every answer the same token, so every pair is identical and dropped.
    party = token_id(tiny_model, "party")
    with tiny_model.hooks(fwd_hooks=forced_logits(tiny_model, party, 50.0)):
        result = generate_persona_pairs(tiny_model, "extraversion", ["what would you do ?"], ["you are outgoing ."],
                                        ["you are reserved .", "you are quiet ."], n_pairs=2, max_new_tokens=3)
    assert (len(result), result.n_identical, result.n_empty) == (0, 2, 0)
    eos = tiny_model.tokenizer.eos_token_id
    with tiny_model.hooks(fwd_hooks=forced_logits(tiny_model, eos, 50.0)):
        result = generate_persona_pairs(tiny_model, "extraversion", ["what would you do ?"], ["you are outgoing ."],
                                        ["you are reserved ."], n_pairs=1, max_new_tokens=3)
    assert (len(result), result.n_identical, result.n_empty) == (0, 0, 1)


def test_strip_template_echo():
    assert strip_template_echo("###Response: I would go.") == "I would go."
    assert strip_template_echo(" ### My response:  Sure ") == "Sure"
    assert strip_template_echo("I would answer: yes") == "I would answer: yes"


# (f) JSONL loading

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_preference_pairs(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        json.dumps({"question": "Q1?", "high_answer": " Yes! ", "low_answer": "No.", "note": "ignored"}),
        "",
        json.dumps({"question": "Q2?", "high_answer": "A", "low_answer": "B"}),
    ])
    pairs = load_preference_pairs(path)
    assert pairs == [PreferencePair("Q1?", "Yes!", "No.", "pairs.jsonl:1"), PreferencePair("Q2?", "A", "B", "pairs.jsonl:3")]


@pytest.mark.parametrize("line, message", [
    (json.dumps({"question": "Q", "high_answer": "A"}), r"pairs.jsonl:3 lacks the key\(s\) low_answer"),
    (json.dumps({"question": "Q", "high_answer": " ", "low_answer": "B"}), r"pairs.jsonl:3 has an empty .*'high_answer'"),
    (json.dumps({"question": 3, "high_answer": "A", "low_answer": "B"}), r"pairs.jsonl:3 has an empty or non-text 'question'"),
    (json.dumps(["Q", "A", "B"]), r"pairs.jsonl:3 is not a JSON object"),
    ("{not json", r"pairs.jsonl:3 is not valid JSON"),
])
def test_load_preference_pairs_errors_name_the_line(tmp_path, line, message):
    good = json.dumps({"question": "Q", "high_answer": "A", "low_answer": "B"})
    path = write_lines(tmp_path / "pairs.jsonl", [good, "", line])
    with pytest.raises(ValueError, match=message):
        load_preference_pairs(path)


def test_load_preference_pairs_empty_file(tmp_path):
    with pytest.raises(ValueError, match="no preference pairs"):
        load_preference_pairs(write_lines(tmp_path / "pairs.jsonl", [""]))
