"""The control plan's per-pass costs (issue 25): a generation batch costs its prompt pass and the decode steps
until its longest answer ends (not ``max_new_tokens`` steps whatever the answers), the persona control is
two passes over persona prompts of the run's own length, and cost files measured before these fields
still load and plan as then."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dpn_lens.plan import ModelShape

from helpers import control_costs

SHAPE = ModelShape(n_layers=2, d_model=8, d_mlp=16, n_heads=2, n_kv_heads=2, head_dim=4, vocab=100, tied=True)


def test_a_batch_decodes_until_its_longest_answer_ends():
    """Only the steps count here (a step's per-row rate made negligible): 16 answers that all end at a
    quarter of the limit take a quarter of the steps; one long answer among them keeps its batch going."""
    from dpn_lens.plan_control import expected_longest, generation_seconds

    def seconds(shares, rows=16, batch=16):
        costs = control_costs(step_seconds=1.0, step_flops_per_s=1e30, answer_steps=shares)
        return generation_seconds(SHAPE, costs, [30], rows=rows, batch=batch, max_new_tokens=48)

    assert seconds([]) == pytest.approx(48.0)               # an older measurement: every batch runs to the limit
    assert seconds([0.25]) == pytest.approx(12.0)           # the measured length, not max_new_tokens
    mixed = [0.25] * 7 + [1.0]                              # one answer in 8 runs to the limit
    assert seconds(mixed) == pytest.approx(48 * expected_longest(mixed, 16))
    assert seconds(mixed) > 0.85 * 48                       # a batch of 16 nearly always holds one
    assert seconds(mixed, rows=16, batch=1) == pytest.approx(16 * 48 * (7 * 0.25 + 1.0) / 8)   # alone: the mean
    assert seconds(mixed, rows=20) == pytest.approx(48 * (expected_longest(mixed, 16) + expected_longest(mixed, 4)))


def test_the_expected_longest_is_the_largest_of_draws():
    """Checked against drawing: the expected largest of b draws from the sample's shares."""
    from dpn_lens.plan_control import answer_steps, expected_longest

    shares = answer_steps([3, 10, 47, 48, 20], 48)
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor(shares)[torch.randint(len(shares), (20000, 4), generator=generator)]
    assert expected_longest(shares, 4) == pytest.approx(float(draws.max(dim=1).values.mean()), rel=0.01)
    assert expected_longest(shares, 1) == pytest.approx(sum(shares) / len(shares))
    assert max(shares) == 1.0 and min(shares) == pytest.approx(4 / 48)


def test_a_batchs_prompt_pass_is_charged_at_its_padded_length():
    """With a measured prompt-pass rate, each batch pays its rows at its longest prompt, then one step fewer
    (the prompt pass makes the first token); prompts go longest first, as greedy_generate batches them."""
    from dpn_lens.plan_control import generation_seconds

    costs = control_costs(step_seconds=0.5, step_flops_per_s=1e9, prefill_flops_per_s=4e9, answer_steps=[0.5])
    got = generation_seconds(SHAPE, costs, [100, 60, 40, 20], rows=4, batch=2, max_new_tokens=10)

    def batch(rows, padded):
        prompt = rows * padded * SHAPE.forward_flops_per_token(context=padded // 2, logits=True) / 4e9
        step = SHAPE.forward_flops_per_token(context=int(padded + 5 / 2), logits=True)
        return prompt + 4 * (0.5 + rows * step / 1e9)

    assert got == pytest.approx(batch(2, 100) + batch(2, 40))
    assert generation_seconds(SHAPE, costs, [100], rows=0, batch=2, max_new_tokens=10) == 0.0


def test_the_persona_control_is_two_passes_over_the_runs_persona_prompts(tiny_folder):
    """The plan once charged one pass for the two (high, then low) and the sample's short personas: 0.36 of
    the measured time. Each pass scores both answers of every pair after its question with a persona."""
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import ControlSettings, PromptTokens, _seconds, control_work

    shape = model_shape(str(tiny_folder))
    settings = ControlSettings(ControlConfig(methods=["dpn-le"], pairs=16), maps_given=True)
    work = control_work(settings)
    costs = control_costs()
    prompts = PromptTokens(held_out=[200], persona=170.0, question=60.0, selection=[150])
    answer = costs.answer_fill * 48
    one_pass = 2 * 16 * (170 + answer) * shape.forward_flops_per_token(context=int((170 + answer) / 2), logits=True)
    persona = _seconds(shape, work, settings, costs, prompts)["persona control"]
    assert work.persona_passes == 2
    assert persona == pytest.approx(2 * one_pass / costs.persona_flops_per_s)
    assert _seconds(shape, work, settings, control_costs(persona_flops_per_s=4e9), prompts)["persona control"] \
        == pytest.approx(persona / 2)
    # without the run's prompts, the sample's persona length stands in
    assert _seconds(shape, work, settings, costs)["persona control"] < persona
    # A current measurement counts what the scorer runs: a pair's question with its persona once (no logits but
    # its last position's), then both answers from its cache.
    from dpn_lens.plan_control import persona_pass_flops

    once = control_costs(persona_context_once=True)
    assert _seconds(shape, work, settings, once, prompts)["persona control"] == pytest.approx(
        2 * persona_pass_flops(shape, 16, 170.0, 32, answer) / once.persona_flops_per_s)


def test_a_persona_pass_is_charged_its_batches_padded_contexts():
    """The scorer left-pads each batch's contexts to its longest, and a padded position costs what a token does.
    Counted batch by batch as ``answer_batches`` forms them: contexts of one length are the plain count; an
    uneven set of the same mean costs more, and sorted batches pad each to its own longest."""
    from dpn_lens.evaluation.answer_cache import answer_batches
    from dpn_lens.evaluation.preference import PairScorer
    from dpn_lens.plan_control import batch_tokens_default, persona_pass_flops, persona_scoring_flops

    assert persona_scoring_flops(SHAPE, [100] * 4, 2, 20.0) == pytest.approx(persona_pass_flops(SHAPE, 4, 100, 8, 20.0))
    uneven = persona_scoring_flops(SHAPE, [60, 140, 60, 140], 2, 20.0)
    assert uneven == pytest.approx(persona_pass_flops(SHAPE, 4, 140, 8, 20.0))       # one batch, padded to 140
    # enough contexts for several batches: each batch its own longest, its own distinct contexts
    contexts = [300 - 7 * i for i in range(40)]
    batches = answer_batches([c for c in contexts for _ in range(2)], [20] * 80, batch_tokens_default(PairScorer),
                             [i // 2 for i in range(80)])
    assert len(batches) > 2
    # a pair's two answers can fall in two batches: each batch runs the contexts it holds
    by_hand = sum(persona_pass_flops(SHAPE, len({item // 2 for item in chunk}), contexts[min(chunk) // 2], len(chunk),
                                     20.0) for chunk in batches)
    assert persona_scoring_flops(SHAPE, contexts, 2, 20.0) == pytest.approx(by_hand)
    # one answer per context (the generation check's scoring): every item its own context
    assert persona_scoring_flops(SHAPE, [100, 100], 1, 20.0) == pytest.approx(
        persona_pass_flops(SHAPE, 2, 100, 2, 20.0))


def test_a_draws_spread_stands_for_the_longest_of_a_draw():
    """A batch of n persona prompts drawn at random pads to the longest of n draws: the spread's longest is
    that on average, checked against drawing."""
    from dpn_lens.plan_control import spread_of_draw

    lengths = [int(x) for x in torch.randint(120, 240, (500,), generator=torch.Generator().manual_seed(1))]
    draws = torch.tensor(lengths)[torch.randint(len(lengths), (20000, 8), generator=torch.Generator().manual_seed(2))]
    assert max(spread_of_draw(lengths, 8)) == pytest.approx(float(draws.max(dim=1).values.float().mean()), rel=0.01)
    assert sum(spread_of_draw(lengths, 8)) / 8 == pytest.approx(sum(lengths) / len(lengths), rel=0.02)
    assert spread_of_draw([5, 7], 3) == [5, 7, 7]                         # fewer lengths than the draw: repeated


def test_a_padded_rate_plans_the_persona_control_from_the_runs_spread_of_prompts(tiny_folder):
    """A measurement that counted its padded batches (``persona_padded``) plans the persona control at the run's
    spread of persona prompts: the same mean length, spread wider, takes longer; an older file plans from the
    mean as then."""
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import (ControlSettings, PromptTokens, _seconds, control_work, persona_pass_flops,
                                       persona_scoring_flops, spread_of_draw)

    shape = model_shape(str(tiny_folder))
    settings = ControlSettings(ControlConfig(methods=["dpn-le"], pairs=8), maps_given=True)
    work = control_work(settings)
    narrow = [168, 170, 172] * 20
    wide = [120, 170, 220] * 20

    def persona_seconds(costs, personas):
        prompts = PromptTokens(held_out=[200], persona=170.0, question=60.0, selection=[150], personas=sorted(personas))
        return _seconds(shape, work, settings, costs, prompts)["persona control"]

    padded = control_costs(persona_context_once=True, persona_padded=True)
    answer = padded.answer_fill * 48
    assert persona_seconds(padded, wide) == pytest.approx(
        2 * persona_scoring_flops(shape, spread_of_draw(sorted(wide), 8), 2, answer) / padded.persona_flops_per_s)
    assert persona_seconds(padded, wide) > 1.1 * persona_seconds(padded, narrow)
    older = control_costs(persona_context_once=True)
    assert persona_seconds(older, wide) == persona_seconds(older, narrow) == pytest.approx(
        2 * persona_pass_flops(shape, 8, 170.0, 16, answer) / older.persona_flops_per_s)


def test_the_generation_checks_scoring_runs_a_context_per_answer(tiny_folder):
    """The generation check scores each generated answer after its question with a high and with a low persona:
    every answer has its own context, where the persona control's pairs share one per pair. A rate measured as
    the scorer runs (each context once) charges those contexts; the older rate, which counted every answer's
    context, planned the check's scoring at half its time."""
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import (ControlSettings, PromptTokens, _seconds, control_work, generation_seconds,
                                       persona_pass_flops)

    shape = model_shape(str(tiny_folder))
    settings = ControlSettings(ControlConfig(methods=["dpn-le"], pairs=16, generation_questions=10), maps_given=True)
    work = control_work(settings)
    prompts = PromptTokens(held_out=[200], persona=170.0, question=60.0, selection=[150])
    costs = control_costs(persona_context_once=True, answer_steps=[1.0])
    answer = costs.answer_fill * 48
    generated = work.generation_sets * generation_seconds(shape, costs, [60], 10, 16, 48)
    scored = work.generation_scored * persona_pass_flops(shape, 20, 170.0, 20, answer) / costs.persona_flops_per_s
    assert _seconds(shape, work, settings, costs, prompts)["generation check"] == pytest.approx(generated + scored)


def test_the_run_prompts_are_counted_from_its_data(tiny_folder, tmp_path):
    """PersonalityBench's persona prompts for the held-out pairs and the persona control, its questions for
    the generation check, the embedded material for the selection; the sample's lengths without data."""
    from dpn_lens.data.contrastive import embedded_questions
    from dpn_lens.data.prompts import render_for_model, render_roleplay_prompt
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.hooked import encode
    from dpn_lens.plan import rendering_stub
    from dpn_lens.plan_control import prompt_tokens_of
    from helpers import write_personalitybench

    data = write_personalitybench(tmp_path / "data")
    costs = control_costs(persona_tokens=91.0, prompt_tokens=41.0)
    counted = prompt_tokens_of(str(tiny_folder), ["openness"], ControlConfig(data_dir=str(data)), costs)
    stub = rendering_stub(str(tiny_folder))
    rows = [json.loads(line) for line in (data / "personalitybench" / "description.jsonl").read_text().splitlines()]
    questions = [json.loads(line)["question"]
                 for line in (data / "personalitybench" / "test" / "Openness.jsonl").read_text().splitlines()]
    lengths = [len(encode(stub, render_for_model(stub, render_roleplay_prompt(row[key], q))))
               for row in rows for key in ("Openness", "Openness_reversed") for q in questions]
    assert min(lengths) <= min(counted.held_out) and max(counted.held_out) <= max(lengths)
    assert min(lengths) <= counted.persona <= max(lengths)
    assert counted.held_out == sorted(counted.held_out, reverse=True)
    assert counted.question < counted.persona
    bare = [len(encode(stub, render_for_model(stub, q))) for q in embedded_questions()]
    assert min(counted.selection) > min(bare)                 # a persona on top of the embedded questions
    missing = prompt_tokens_of(str(tiny_folder), ["openness"], ControlConfig(data_dir=str(tmp_path / "none")), costs)
    assert (missing.held_out, missing.persona, missing.question) == ([91], 91.0, 41.0)
    assert missing.selection == counted.selection


def test_caas_direction_is_planned_over_its_own_persona_prompts(tiny_folder, tmp_path):
    """CAA reads its direction from persona prompts (``caa_prompts``), about 2.4x (SmolLM2) to 3.7x (Gemma 3)
    the held-out question's tokens. Planned as question-sized, Gemma's preparation was 0.38 of its 10 s."""
    from dpn_lens.baselines.caa import CAA_BATCH
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.evaluation.methods import caa_prompts
    from dpn_lens.hooked import tokenize_prompts
    from dpn_lens.plan import model_shape, rendering_stub
    from dpn_lens.plan_control import ControlSettings, PromptTokens, _seconds, caa_flops, control_work, prompt_tokens_of

    config = ControlConfig(methods=["dpn-le", "caa"], pairs=16, caa_pairs=20, data_dir=str(tmp_path / "none"))
    costs = control_costs(persona_tokens=91.0, prompt_tokens=41.0)
    counted = prompt_tokens_of(str(tiny_folder), ["openness", "agreeableness"], config, costs)
    stub = rendering_stub(str(tiny_folder))
    expected = [[len(tokens) for tokens in tokenize_prompts(stub, pole)]
                for trait in ("openness", "agreeableness") for pole in (caa_prompts(trait, config).high,
                                                                       caa_prompts(trait, config).low)]
    assert counted.contrastive == expected and all(len(lengths) == 20 for lengths in expected)
    assert min(map(min, expected)) > counted.question      # persona prompts, longer than a question

    shape = model_shape(str(tiny_folder))
    settings = ControlSettings(config, maps_given=True)
    planned = _seconds(shape, control_work(settings), settings, costs, counted)["method preparation"]
    assert planned == pytest.approx(caa_flops(shape, expected) / costs.persona_flops_per_s)
    # per trait: the two traits' four sets cost twice one trait's two
    assert caa_flops(shape, expected) == pytest.approx((caa_flops(shape, expected[:2]) + caa_flops(shape, expected[2:]))
                                                       / 2)
    # each batch of CAA_BATCH is padded to its longest prompt
    short_batch = caa_flops(shape, [[50] * CAA_BATCH] * 2) / 2
    padded_batch = caa_flops(shape, [[50] * (CAA_BATCH - 1) + [100], [50] * CAA_BATCH]) - short_batch
    assert padded_batch > 2 * short_batch                  # all its rows at 100 tokens, at a longer context
    # without the run's prompts, two sets of the persona length stand in
    bare = PromptTokens(held_out=[200], persona=170.0, question=60.0, selection=[150])
    assert _seconds(shape, control_work(settings), settings, costs, bare)["method preparation"] == pytest.approx(
        caa_flops(shape, [[170] * 20] * 2) / costs.persona_flops_per_s)
    # and a run without CAA counts none of its prompts
    assert prompt_tokens_of(str(tiny_folder), ["openness"], ControlConfig(methods=["dpn-le"]), costs).contrastive == []


def test_measured_costs_record_answer_steps_and_the_prompt_pass_and_older_files_still_load(tiny_folder, tmp_path,
                                                                                             monkeypatch):
    from dpn_lens.plan import costs_file
    from dpn_lens.plan_control import ControlCosts, measure_control_costs, saved_control_costs

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    costs = measure_control_costs(str(tiny_folder), n_pairs=4, max_new_tokens=6)
    assert len(costs.answer_steps) == 5 and all(0 < share <= 1 for share in costs.answer_steps)
    assert costs.prefill_flops_per_s > 0 and costs.step_flops_per_s > 0
    assert len(costs.persona_answer_steps) == 4 and all(0 < share <= 1 for share in costs.persona_answer_steps)
    assert costs.gradient_seconds >= 0 and costs.gradient_flops_per_s > 0
    assert costs.engine == "raw-sdpa"                   # what generated while the decode steps were timed (float32)
    threads = torch.get_num_threads()
    path = costs_file("cpu", "float32", threads, "control")
    saved = json.loads(path.read_text())
    assert saved["answer_steps"] == costs.answer_steps and saved["prefill_flops_per_s"] == costs.prefill_flops_per_s
    # A file written before the two fields: it loads, and plans as then (every batch to the limit, no
    # prompt pass apart).
    new = ("answer_steps", "prefill_flops_per_s", "persona_answer_steps", "gradient_seconds", "step_rows",
           "step_token_flops", "persona_context_once", "engine", "persona_padded")
    path.write_text(json.dumps({key: value for key, value in saved.items() if key not in new}))
    loaded = saved_control_costs("cpu", "float32", threads)
    assert loaded == dataclasses.replace(costs, answer_steps=[], prefill_flops_per_s=0.0, persona_answer_steps=[],
                                         gradient_seconds=0.0, step_rows=[], step_token_flops=0.0,
                                         persona_context_once=False, engine="bridge", persona_padded=False)
    assert isinstance(loaded, ControlCosts)


def test_answers_under_a_persona_are_charged_their_own_lengths_and_the_gradient_pass_its_fixed_cost(tiny_folder):
    """The held-out and selection pairs are generated under personas (the sample's persona answers' steps), the
    generation check without (the bare answers'); the selection's gradient pass runs over answers of the
    persona answers' length and pays its once-a-pass cost."""
    from dpn_lens.effect.rules import SELECTION_TOKENS
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan import model_shape
    from dpn_lens.plan_control import ControlSettings, PromptTokens, _seconds, control_work, generation_seconds

    shape = model_shape(str(tiny_folder))
    config = ControlConfig(methods=["dpn-le", "attribution-t"], pairs=16, selection_pairs=8, generation_questions=4)
    settings = ControlSettings(config, maps_given=True)
    work = control_work(settings)
    prompts = PromptTokens(held_out=[200, 180], persona=170.0, question=60.0, selection=[150, 140])
    costs = control_costs(answer_steps=[1.0], persona_answer_steps=[0.25])
    seconds = _seconds(shape, work, settings, costs, prompts)
    assert seconds["held-out pairs"] == pytest.approx(
        generation_seconds(shape, costs, prompts.held_out, 32, config.pair_batch, 48, [0.25]))
    assert seconds["held-out pairs"] < 0.5 * _seconds(shape, work, settings, control_costs(answer_steps=[1.0]),
                                                      prompts)["held-out pairs"]
    answer = 0.25 * SELECTION_TOKENS
    gradient = 3 * 16 * answer * shape.forward_flops_per_token(context=int(40.0 + answer / 2), logits=True) / 1e9
    generated = generation_seconds(shape, costs, prompts.selection, 16, 16, SELECTION_TOKENS, [0.25])
    assert seconds["selection"] == pytest.approx(generated + gradient)
    fixed = _seconds(shape, work, settings, dataclasses.replace(costs, gradient_seconds=7.0), prompts)
    assert fixed["selection"] == pytest.approx(seconds["selection"] + 7.0)
    # the generation check's bare answers ran to the limit in the sample: its batches do too
    bare = generation_seconds(shape, costs, [60], 4, 16, 48, [1.0])
    assert seconds["generation check"] > work.generation_sets * bare * 0.999


def test_a_decode_step_costs_what_was_measured_at_its_rows():
    """On this CPU a step's cost is concave in its rows (SmolLM2: 0.077 s at 2 rows, 0.147 at 8, 0.171 at 10);
    the line through the ends charged a 10-row batch 0.134 s. With the measured points the plan charges a
    step what was measured at those rows, interpolates between them, and keeps the line's FLOP scaling for
    another context or model."""
    from dpn_lens.plan_control import STEP_ROWS, _line, decode_step_seconds

    context = 60
    token = SHAPE.forward_flops_per_token(context=context, logits=True)
    measured = [[2, 0.077], [4, 0.114], [8, 0.147], [12, 0.183], [16, 0.165]]
    fixed, per_row = _line(measured)
    costs = control_costs(step_seconds=fixed, step_flops_per_s=token / per_row, step_rows=measured,
                          step_token_flops=token)
    for rows, seconds in measured:
        assert decode_step_seconds(SHAPE, costs, rows, context) == pytest.approx(seconds)
    assert decode_step_seconds(SHAPE, costs, 10, context) == pytest.approx((0.147 + 0.183) / 2, rel=0.02)
    assert decode_step_seconds(SHAPE, costs, 1, context) < 0.077
    line = control_costs(step_seconds=fixed, step_flops_per_s=token / per_row)     # an older file: the line alone
    assert decode_step_seconds(SHAPE, line, 10, context) == pytest.approx(fixed + 10 * per_row)
    assert decode_step_seconds(SHAPE, line, 10, context) < 0.9 * decode_step_seconds(SHAPE, costs, 10, context)
    # a longer context or a larger model: the measured bend times the line's FLOPs there
    longer = 4 * context
    ratio = decode_step_seconds(SHAPE, costs, 10, longer) / decode_step_seconds(SHAPE, line, 10, longer)
    assert ratio == pytest.approx(decode_step_seconds(SHAPE, costs, 10, context)
                                  / decode_step_seconds(SHAPE, line, 10, context))
    assert 16 in STEP_ROWS and 1 in STEP_ROWS


def test_what_context_adds_to_a_decode_step_is_fitted_from_two_contexts():
    """After 93 more tokens of context a 16-row SmolLM2 step took 21% longer where its FLOPs grew 2%: the
    cache's reads and copies. Steps timed at a second context give that cost per row, context token and
    cached number; the plan then gives back both contexts' steps, extends the line beyond them, scales it
    to another model by its cache, and an older file (no second context) plans as before."""
    from dpn_lens.plan_control import DecodeCosts, _context_seconds, _line, decode_step_seconds

    short_context, long_context = 66.0, 160.0
    token = SHAPE.forward_flops_per_token(context=int(short_context), logits=True)
    short = [[1, 0.090], [2, 0.097], [4, 0.136], [8, 0.174], [12, 0.208], [16, 0.181]]
    fixed, per_row = _line(short)
    rate = token / per_row
    long_token = SHAPE.forward_flops_per_token(context=int(long_context), logits=True)
    per_row_token = 3e-5                                        # seconds per row and context token

    def flops_only(rows, seconds):
        return seconds * (fixed + rows * long_token / rate) / (fixed + rows * token / rate)

    long = [[rows, flops_only(rows, seconds) + rows * per_row_token * (long_context - short_context)]
            for rows, seconds in short if rows in (4, 8, 16)]
    decoding = DecodeCosts(fixed, rate, 1e11, short, token, short_context, long_step_rows=long,
                           long_context=long_context)
    fitted = _context_seconds(SHAPE, decoding)
    assert fitted * SHAPE.cache_values_per_token() == pytest.approx(per_row_token)
    costs = control_costs(step_seconds=fixed, step_flops_per_s=rate, step_rows=short, step_token_flops=token,
                          step_context=short_context, step_context_seconds=fitted)
    for rows, seconds in short:
        assert decode_step_seconds(SHAPE, costs, rows, int(short_context)) == pytest.approx(seconds, rel=1e-3)
    for rows, seconds in long:
        assert decode_step_seconds(SHAPE, costs, rows, int(long_context)) == pytest.approx(seconds, rel=1e-3)
    farther = decode_step_seconds(SHAPE, costs, 16, 400) - decode_step_seconds(SHAPE, costs, 16, 300)
    older = control_costs(step_seconds=fixed, step_flops_per_s=rate, step_rows=short, step_token_flops=token)
    flops = decode_step_seconds(SHAPE, older, 16, 400) - decode_step_seconds(SHAPE, older, 16, 300)
    assert farther - flops == pytest.approx(16 * 100 * per_row_token)
    assert decode_step_seconds(SHAPE, older, 16, int(long_context)) < 0.9 * long[-1][1]
    # a model with twice the cache per token: twice the context's cost
    wide = dataclasses.replace(SHAPE, n_kv_heads=2 * SHAPE.n_kv_heads, n_heads=2 * SHAPE.n_heads)
    assert wide.cache_values_per_token() == 2 * SHAPE.cache_values_per_token()
    extra = decode_step_seconds(wide, costs, 16, 400) - decode_step_seconds(wide, older, 16, 400)
    assert extra == pytest.approx(2 * 16 * per_row_token * (400 - short_context), rel=1e-3)
    # noise that makes the longer context look cheaper adds nothing, rather than a negative cost
    cheaper = dataclasses.replace(decoding, long_step_rows=[[rows, 0.5 * seconds] for rows, seconds in long])
    assert _context_seconds(SHAPE, cheaper) == 0.0


def test_a_prompt_pass_costs_more_per_flop_when_longer():
    """A 16-row prompt pass ran at 1.22e11 FLOP/s over 69-token prompts and 1.13e11 over 203 (SmolLM2): the
    seconds per FLOP are linear in the padded length through the two, and an older file keeps one rate."""
    from dpn_lens.plan_control import generation_seconds, prefill_seconds_per_flop

    costs = control_costs(prefill_flops_per_s=1.22e11, prefill_points=[[69, 1.22e11], [203, 1.13e11]])
    assert prefill_seconds_per_flop(costs, 69) == pytest.approx(1 / 1.22e11)
    assert prefill_seconds_per_flop(costs, 203) == pytest.approx(1 / 1.13e11)
    assert 1 / 1.22e11 < prefill_seconds_per_flop(costs, 136) < 1 / 1.13e11
    assert prefill_seconds_per_flop(costs, 400) > 1 / 1.13e11
    assert prefill_seconds_per_flop(costs, 10) == pytest.approx(1 / 1.22e11)      # never faster than measured
    older = control_costs(prefill_flops_per_s=1.22e11)
    assert prefill_seconds_per_flop(older, 203) == pytest.approx(1 / 1.22e11)
    steps_free = dict(step_seconds=0.0, step_flops_per_s=1e30)
    long, once = (generation_seconds(SHAPE, dataclasses.replace(c, **steps_free), [203], 16, 16, 1, [1.0])
                  for c in (costs, older))
    assert long / once == pytest.approx(1.22 / 1.13)


def test_the_decode_line_is_a_least_squares_fit():
    from dpn_lens.plan_control import _line

    assert _line([[2, 3.0], [4, 5.0], [8, 9.0]]) == pytest.approx((1.0, 1.0))
    fixed, per_row = _line([[1, 1.0], [2, 3.0], [3, 2.0]])
    assert (fixed, per_row) == pytest.approx((1.0, 0.5))
    assert _line([[2, 1.0]]) == (0.0, 0.5)
    assert _line([[1, 0.0], [2, 10.0]]) == pytest.approx((0.0, 20.0 / 5))   # through the origin, not below 0


def test_a_decode_step_is_read_from_the_stamps_of_its_forward_calls():
    """Each forward call of a greedy batch is stamped at its embedding: the timed steps are the calls
    between the prompt pass and the last one, each a positive time, and the hook is gone afterwards, also
    when the generation fails."""
    from dpn_lens.plan_control import DECODE_STEPS, _stamped_generation
    from dpn_lens.tiny import build_tiny_model

    model = build_tiny_model()
    calls = []
    model.hook_dict["hook_embed"].add_hook(lambda activation, hook: calls.append(1))
    prompt_pass, steps = _stamped_generation(model, [[1, 2, 3], [4, 5]], "cpu")
    assert len(calls) == DECODE_STEPS                                   # a prompt pass and 32 decode steps
    assert len(steps) == DECODE_STEPS - 2 and all(step > 0 for step in steps) and prompt_pass > 0
    model.reset_hooks()
    assert not model.hook_dict["hook_embed"].fwd_hooks


def test_a_sample_whose_answers_end_at_once_cannot_time_a_step(monkeypatch):
    import dpn_lens.evaluation.preference as preference
    from dpn_lens.plan_control import _stamped_generation
    from dpn_lens.tiny import build_tiny_model

    model = build_tiny_model()

    def one_forward(model, prompts, max_new_tokens, batch):
        model(torch.tensor(prompts))                                   # the prompt pass, then EOS at once
        return [[] for _ in prompts]

    monkeypatch.setattr(preference, "greedy_answers", one_forward)
    with pytest.raises(ValueError, match="before a decode step could be timed"):
        _stamped_generation(model, [[1, 2, 3]], "cpu")
    assert not model.hook_dict["hook_embed"].fwd_hooks


def test_the_long_steps_are_timed_beside_the_short_ones(monkeypatch):
    """A machine that slows down between row counts, and a repeat that runs at half speed, move neither the
    long step's ratio to the short one nor a short step: the two are timed in turn at each row count (the
    order alternating between repeats), and each is the median over repeats."""
    import dpn_lens.plan_control as plan_control
    from dpn_lens.tiny import build_tiny_model

    short_prompts, long_prompts = [[1] * 10] * 4, [[1] * 30] * 4
    ratio = {4: 1.1, 8: 1.2, 16: 1.4}                                   # the long step's, per row count
    order = []

    def fake(model, chosen, device):
        rows, long = len(chosen), len(chosen[0]) == 30
        order.append((rows, long))
        call = len(order)
        speed = 1.0 if call <= 12 else 1.3 if call <= 21 else 0.8       # the machine's: slower, then faster
        seconds = (0.05 + 0.01 * rows) * speed * (ratio[rows] if long else 1.0)
        if len(order) in (20, 23):               # a repeat at half speed: 12 rows, and 16 rows' first long one
            seconds *= 2
        return 0.1, [seconds] * 5

    monkeypatch.setattr(plan_control, "_stamped_generation", fake)
    costs = plan_control._decode_costs(build_tiny_model(), SHAPE, short_prompts, [8] * 4, "cpu",
                                       long_prompts=long_prompts, long_lengths=[8] * 4)
    assert order[:6] == [(1, False)] * 3 + [(2, False)] * 3
    assert order[6:12] == [(4, False), (4, True), (4, True), (4, False), (4, False), (4, True)]
    short = dict((int(rows), seconds) for rows, seconds in costs.step_rows)
    for rows, seconds in costs.long_step_rows:
        assert seconds / short[int(rows)] == pytest.approx(ratio[int(rows)])
    assert order[21:24] == [(16, False), (16, True), (16, True)]
    assert short[12] == pytest.approx((0.05 + 0.12) * 1.3)              # the median repeat, not the outlier


def test_measured_costs_time_a_step_at_each_row_count(tiny_folder, tmp_path, monkeypatch):
    from dpn_lens.plan_control import CONTEXT_ROWS, STEP_ROWS, decode_step_seconds, measure_control_costs
    from dpn_lens.plan import model_shape

    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    costs = measure_control_costs(str(tiny_folder), n_pairs=4, max_new_tokens=12, save=False)
    assert [rows for rows, _ in costs.step_rows] == list(STEP_ROWS)
    assert all(seconds > 0 for _, seconds in costs.step_rows) and costs.step_token_flops > 0
    shape = model_shape(str(tiny_folder))
    # at the measurement's own context, the plan gives back the measured seconds at each row count
    context = next(c for c in range(1, 4096)
                   if shape.forward_flops_per_token(context=c, logits=True) == costs.step_token_flops)
    for rows, seconds in costs.step_rows:
        assert decode_step_seconds(shape, costs, int(rows), context) == pytest.approx(seconds)
    # and after the persona prompts, at the rows where context shows
    assert [rows for rows, _ in costs.long_step_rows] == list(CONTEXT_ROWS)
    assert costs.long_step_context > costs.step_context + 10 and costs.step_context_seconds >= 0
    assert [padded for padded, _ in costs.prefill_points][0] < costs.prefill_points[1][0]


def test_a_trait_whose_pairs_are_cached_is_not_charged_their_generation(tiny_folder):
    """Per trait: one of two traits has its held-out and selection pairs cached, so the plan charges half the
    held-out generation and only the other trait's selection answers (both gradient passes still run); a
    folder's revision is known only from its loaded weights, so the plan cannot look its pairs up, and says so."""
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.models import spec_revision
    from dpn_lens.plan_control import CachedPairs, ControlSettings, cached_pairs, plan_control, plan_control_run

    config = ControlConfig(traits=["openness", "neuroticism"], methods=["dpn-le", "attribution-t"], pairs=4,
                           selection_pairs=4, max_new_tokens=4)
    costs = control_costs()
    found = CachedPairs(held_out=["openness"], selection=["openness"])
    plan = plan_control(str(tiny_folder), config.traits, ControlSettings(config, maps_given=True, cached=found),
                        costs=costs)
    unfound = plan_control(str(tiny_folder), config.traits, ControlSettings(config, maps_given=True), costs=costs)
    every = plan_control(str(tiny_folder), config.traits, ControlSettings(
        config, maps_given=True, cached=CachedPairs(held_out=config.traits, selection=config.traits)), costs=costs)
    seconds, before, none = ({stage.name: stage.seconds for stage in p.stages} for p in (plan, unfound, every))
    assert seconds["held-out pairs (2 traits)"] == pytest.approx(before["held-out pairs (2 traits)"] / 2)
    assert "held-out pairs (2 traits)" not in none
    gradient = none["selection (2 traits)"]                 # both traits differentiate, neither generates
    assert 0 < gradient < seconds["selection (2 traits)"] < before["selection (2 traits)"]
    assert seconds["selection (2 traits)"] - gradient == pytest.approx((before["selection (2 traits)"] - gradient) / 2)
    assert "cached for openness" in plan.text() and "(the pairs are cached)" in every.text()
    assert spec_revision(str(tiny_folder)) is None
    assert cached_pairs(str(tiny_folder), "float32", config.traits, config).unknown.startswith("the revision of")
    assert "the cache was not looked up" in plan_control_run(str(tiny_folder), config, costs=costs).text()


def test_decode_costs_measured_with_another_engine_are_flagged(tiny_folder):
    """A file measured before the engines timed the bridge's loop: its generation times are kept, and the
    generating stages say to measure again; under ``--engine bridge`` they fit the run and say nothing."""
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.generation import generation_engine
    from dpn_lens.plan_control import ControlSettings, plan_control

    config = ControlConfig(traits=["openness"], methods=["dpn-le"], pairs=4, max_new_tokens=4, generation_questions=2)
    settings = ControlSettings(config, maps_given=True)
    current = plan_control(str(tiny_folder), config.traits, settings, costs=control_costs())
    older = plan_control(str(tiny_folder), config.traits, settings, costs=control_costs(engine="bridge"))
    assert [stage.seconds for stage in older.stages] == [stage.seconds for stage in current.stages]
    flagged = [stage.name for stage in older.stages if "measured with engine 'bridge'" in stage.detail]
    assert flagged == ["held-out pairs (1 traits)", "generation check (1 traits)"]
    assert "measured with engine" not in current.text()
    with generation_engine("bridge"):
        assert "measured with engine" not in plan_control(str(tiny_folder), config.traits, settings,
                                                          costs=control_costs(engine="bridge")).text()


@pytest.mark.slow
def test_the_plan_finds_the_pairs_a_run_cached_without_loading_the_model(smollm2, tmp_path, monkeypatch):
    """The held-out and selection pairs' cache files are keyed by the model's revision, which the plan finds
    from the spec (the embedded GGUF's digest): it finds the files a run wrote, and only those."""
    from dpn_lens.effect.pairs import selection_pairs
    from dpn_lens.evaluation.control import ControlConfig, held_out_pairs
    from dpn_lens.models import model_revision, spec_revision
    from dpn_lens.plan_control import cached_pairs
    from helpers import write_personalitybench

    from dpn_lens.models import cache_dir

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "gguf").symlink_to(cache_dir() / "gguf")      # the installed model, a fresh pairs cache
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    spec = "smollm2-135m-instruct"
    assert spec_revision(spec) == model_revision(smollm2)
    data = write_personalitybench(tmp_path / "data")
    config = ControlConfig(traits=["openness", "neuroticism"], methods=["dpn-le", "attribution-t"], pairs=4,
                           selection_pairs=4, data_dir=str(data), max_new_tokens=4)
    found = cached_pairs(spec, "float32", config.traits, config)
    assert (found.held_out, found.selection, found.unknown) == ([], [], None)
    held_out_pairs(smollm2, "openness", config, log=lambda message: None)
    selection_pairs(smollm2, "openness", n_pairs=4, seed=config.seed)
    found = cached_pairs(spec, "float32", config.traits, config)
    assert (found.held_out, found.selection) == (["openness"], ["openness"])
    assert cached_pairs(spec, "bfloat16", config.traits, config).held_out == []            # another dtype's key
    assert cached_pairs(spec, "float32", config.traits, dataclasses.replace(config, pairs=6)).held_out == []
    assert cached_pairs(spec, "float32", config.traits, dataclasses.replace(config, cache_pairs=False)).held_out == []


def test_the_bracket_search_makes_bracket_probes_probes_where_the_rules_edits_land():
    """``BRACKET_PROBES`` is what the calibration's bracket search makes on KL curves that grow like a power of
    γ with the target between γ = 4 and 128 (the effect rules' edits need γ 15-60): counted, not guessed."""
    import math

    from dpn_lens.evaluation.calibrate import GAMMA_GRID, CurvePoint, _kl_bracket
    from dpn_lens.plan_control import BRACKET_PROBES

    def probes(target_gamma, power):
        made = []

        def measure(gamma):
            made.append(gamma)
            return CurvePoint(gamma, 0.05 * (gamma / target_gamma) ** power, 1.0, None)

        _kl_bracket(measure, list(GAMMA_GRID), 0.05, 2.0)
        return len(made)

    inside = [probes(math.exp(x / 10), power) for x in range(14, 48) for power in (1.5, 2.0, 2.5)]   # γ 4 to 121
    assert set(inside) == {BRACKET_PROBES}
    assert max(probes(math.exp(x / 10), 2.0) for x in range(-13, 13)) < BRACKET_PROBES            # γ 0.27 to 3.7
    assert probes(500.0, 2.0) == BRACKET_PROBES - 1                                               # beyond the grid


def test_a_bounded_questions_cache_is_planned_as_reruns_and_less_memory(tiny_folder):
    """``--score-cache-gib``: the plan holds what the scorer keeps of the held-out questions' cache, and charges
    every answer pass the questions of the batches it does not keep."""
    from dpn_lens.evaluation.control import ControlConfig
    from dpn_lens.plan_control import ControlSettings, plan_control

    def plan(gib):
        config = ControlConfig(methods=["dpn-le"], pairs=64, score_cache_gib=gib)
        return plan_control(str(tiny_folder), ["openness"], ControlSettings(config, maps_given=True),
                            costs=control_costs())

    whole, none = (next(stage for stage in plan(gib).stages if stage.name.startswith("answer scoring"))
                   for gib in (None, 0))
    assert none.seconds > whole.seconds
    assert none.peak_bytes < whole.peak_bytes
    assert "(--score-cache-gib bounds it)" in whole.detail
    assert "batches' questions run again each pass" in none.detail
