"""The optional PersonalityBench judge: generation with the edit, requests to an OpenAI-compatible server.

A local HTTP server plays the judge. Its rating is a known function of the answer it receives (the
number of "Yes" words), so the test can tell that the generated answers, and nothing else, were rated.
It can also answer with a fixed reply, fail the first requests with an HTTP status, or never answer.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dpn_lens.evaluation.capability import CapabilitySizes
from dpn_lens.evaluation.compare import CompareConfig, run_comparison, write_outputs
from dpn_lens.evaluation.comparison_record import ComparisonRecord
from dpn_lens.evaluation.judge import (JudgeConfig, JudgeRating, UnparsableRating, generate_answers, judge_endpoint,
                                       judge_evaluation, judge_rating, load_test_questions, parse_rating)
from dpn_lens.evaluation.logprobs import render
from dpn_lens.hooked import encode
from helpers import ForceToken, build_letter_model, token


def rating_of(answer: str) -> tuple[int, int]:
    """The fake judge's rule: trait = 1 + number of "Yes" (at most 5); fluency 5 for a non-empty answer."""
    return min(5, 1 + answer.split().count("Yes")), 5 if answer.strip() else 1


class FakeJudge:
    """An OpenAI-compatible /chat/completions server on localhost that records every request.

    ``reply``: fixed content (default: the JSON rating of ``rating_of``); ``fail_first``: that many
    requests get HTTP ``fail_status`` first; ``hang``: seconds to wait before answering at all.
    """

    def __init__(self, reply: str | None = None, fail_first: int = 0, fail_status: int = 503, hang: float = 0.0):
        self.requests: list[dict] = []
        self.failed = 0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if hang:
                    time.sleep(hang)
                if judge.failed < fail_first:
                    judge.failed += 1
                    self.send_response(fail_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                judge.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                prompt = body["messages"][0]["content"]
                answer = re.search(r"^Answer: (.*)$", prompt, re.MULTILINE).group(1)
                trait, fluency = rating_of(answer)
                content = reply if reply is not None else json.dumps({"trait": trait, "fluency": fluency})
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # a hanging handler must not block shutdown
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def letter_model(tmp_path_factory):
    return build_letter_model(tmp_path_factory.mktemp("letters_judge"))


def greedy_without_cache(model, prompt_ids: list[int], n_new: int) -> list[int]:
    """Independent oracle: argmax of a full forward pass per step (no KV cache, no generate())."""
    ids = list(prompt_ids)
    for _ in range(n_new):
        with torch.no_grad():
            next_id = int(model(torch.tensor([ids]))[0, -1].argmax())
        if next_id == model.tokenizer.eos_token_id:
            break
        ids.append(next_id)
    return ids[len(prompt_ids):]


def test_answers_are_greedy_generations_of_the_rendered_question(letter_model):
    questions = ["the cat sat on the mat ?", "I am the life of the party ."]
    answers = generate_answers(letter_model, questions, max_new_tokens=6, repetition_penalty=1.0)
    for question, answer in zip(questions, answers):
        expected = greedy_without_cache(letter_model, encode(letter_model, render(letter_model, question)), 6)
        assert answer == letter_model.tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_judge_rates_exactly_the_generated_answers_and_sees_the_edit(letter_model, shared_data, monkeypatch):
    monkeypatch.setenv("DPN_LENS_JUDGE_KEY", "secret-key")
    questions = load_test_questions(shared_data, "extraversion", n=3, seed=1)
    assert len(questions) == 3 and len(set(questions)) == 3
    with FakeJudge() as judge:
        config = JudgeConfig(judge.url, model_name="fake-judge", max_new_tokens=4)
        plain = judge_evaluation(letter_model, "extraversion", questions, config)
        forced = judge_evaluation(letter_model, "extraversion", questions, config, edit=ForceToken(token(letter_model, "Yes")))
    assert len(judge.requests) == 6
    assert all(r["path"] == "/v1/chat/completions" and r["body"]["model"] == "fake-judge" and r["body"]["temperature"] == 0
               and r["auth"] == "Bearer secret-key" for r in judge.requests)
    for request, question, answer in zip(judge.requests, questions * 2, plain["answers"] + forced["answers"]):
        prompt = request["body"]["messages"][0]["content"]
        assert f"Question: {question}\n" in prompt and f"Answer: {answer}\n" in prompt and "extraversion" in prompt
    for result in (plain, forced):
        expected = [rating_of(a) for a in result["answers"]]
        assert result["ratings"] == [JudgeRating(float(t), float(f)) for t, f in expected]
        assert result["judge_trait"] == pytest.approx(sum(t for t, _ in expected) / 3)
    # The forcing edit makes every answer "Yes Yes Yes Yes": the judge sees it, so the score moves.
    assert forced["answers"] == ["Yes Yes Yes Yes"] * 3 and forced["judge_trait"] == 5.0
    assert plain["answers"] != forced["answers"]
    # Hooks are gone afterwards: the unsteered answers come back.
    assert generate_answers(letter_model, questions, max_new_tokens=4) == plain["answers"]


def test_persona_wraps_the_question_before_generation(letter_model):
    class Persona:
        def wrap(self, question):
            return "Yes Yes Yes " + question

    questions = ["the dog ran home ."]
    wrapped = generate_answers(letter_model, questions, persona=Persona(), max_new_tokens=5, repetition_penalty=1.0)
    expected = greedy_without_cache(letter_model, encode(letter_model, render(letter_model, "Yes Yes Yes " + questions[0])), 5)
    assert wrapped == [letter_model.tokenizer.decode(expected, skip_special_tokens=True).strip()]


@pytest.mark.parametrize("reply, expected", [('{"trait": 4, "fluency": 5}', (4, 5)),
                                             (' {"fluency": 3, "trait": 2}\n', (2, 3)),
                                             ('```json\n{"trait": 1, "fluency": 5}\n```', (1, 5))])
def test_json_ratings_are_parsed(reply, expected):
    rating = parse_rating(reply)
    assert (rating.trait, rating.fluency) == expected


@pytest.mark.parametrize("reply, reason", [
    ("Trait: 4/5, Fluency: 3/5", "not a JSON object"),   # the old regex read this as (4, 5)
    ("4 5", "not a JSON object"),
    ('{"trait": 6, "fluency": 3}', "outside 1..5"),
    ('{"trait": 0, "fluency": 3}', "outside 1..5"),
    ('{"trait": 3.5, "fluency": 4}', "not an integer"),
    ('{"trait": "4", "fluency": 4}', "not an integer"),
    ('{"trait": true, "fluency": 4}', "not an integer"),
    ('{"trait": 4}', "exactly 'trait' and 'fluency'"),
    ('{"trait": 4, "fluency": 4, "note": "good"}', "exactly 'trait' and 'fluency'"),
    ('[4, 5]', "not a JSON object"),
    ('Sure! {"trait": 4, "fluency": 5}', "not a JSON object"),
])
def test_anything_but_the_json_rating_is_unparsable(reply, reason):
    with pytest.raises(UnparsableRating, match=re.escape(reason)) as caught:
        parse_rating(reply)
    assert caught.value.reply == reply and "integers from 1 to 5" in str(caught.value)


def test_unparsable_replies_are_counted_not_guessed(letter_model):
    questions = ["the cat sat on the mat ?", "I am the life of the party ."]
    with FakeJudge(reply="Trait: 4/5, Fluency: 3/5") as judge:
        config = JudgeConfig(judge.url, max_new_tokens=2)
        with pytest.raises(UnparsableRating):
            judge_rating(config, "openness", "q", "a")
        result = judge_evaluation(letter_model, "openness", questions, config)
    assert result["judge_unparsable"] == 2 and result["ratings"] == [None, None]
    assert result["replies"] == ["Trait: 4/5, Fluency: 3/5"] * 2
    assert math.isnan(result["judge_trait"]) and math.isnan(result["judge_fluency"])


def test_the_request_asks_for_json():
    with FakeJudge() as judge:
        judge_rating(JudgeConfig(judge.url), "openness", "q", "Yes")
    body = judge.requests[0]["body"]
    assert body["response_format"] == {"type": "json_object"}
    assert '{"trait": 4, "fluency": 5}' in body["messages"][0]["content"]


def test_overloaded_judge_is_asked_again_then_answers():
    with FakeJudge(fail_first=2, fail_status=503) as judge:
        rating = judge_rating(JudgeConfig(judge.url, retries=3, backoff=0.01), "openness", "q", "Yes Yes")
    assert judge.failed == 2 and len(judge.requests) == 1 and rating == JudgeRating(*rating_of("Yes Yes"))
    with FakeJudge(fail_first=1, fail_status=429) as judge:
        judge_rating(JudgeConfig(judge.url, retries=1, backoff=0.01), "openness", "q", "a")
    assert judge.failed == 1 and len(judge.requests) == 1
    # Retries are bounded: one more failure than allowed is a clear error with the last status.
    with FakeJudge(fail_first=3, fail_status=502) as judge:
        with pytest.raises(ConnectionError, match=r"after 3 attempts \(last: HTTP 502.*--judge-url"):
            judge_rating(JudgeConfig(judge.url, retries=2, backoff=0.01), "openness", "q", "a")
    assert judge.failed == 3 and not judge.requests
    # A client error is not retried.
    with FakeJudge(fail_first=5, fail_status=401) as judge:
        with pytest.raises(ConnectionError, match=r"refused the request \(HTTP 401.*DPN_LENS_JUDGE_KEY"):
            judge_rating(JudgeConfig(judge.url, retries=3, backoff=0.01), "openness", "q", "a")
    assert judge.failed == 1


def test_a_judge_that_never_answers_times_out_clearly():
    with FakeJudge(hang=5.0) as judge:
        started = time.perf_counter()
        with pytest.raises(ConnectionError, match=r"did not answer after 2 attempts \(last: no reply within 0.3 s"
                                                  r".*--judge-url"):
            judge_rating(JudgeConfig(judge.url, timeout=0.3, retries=1, backoff=0.01), "openness", "q", "a")
        assert time.perf_counter() - started < 3.0


def test_judge_errors_name_the_problem():
    with pytest.raises(ValueError, match="must start with http"):
        JudgeConfig("localhost:8000")
    with pytest.raises(ValueError, match="retries"):
        JudgeConfig("http://localhost:8000/v1", retries=-1)
    with FakeJudge(reply="excellent") as judge:
        with pytest.raises(ValueError, match="not a rating"):
            judge_rating(JudgeConfig(judge.url), "openness", "q", "a")
        url = judge.url
    with pytest.raises(ConnectionError, match="did not answer.*--judge-url"):
        judge_rating(JudgeConfig(url, timeout=5, retries=1, backoff=0.01), "openness", "q", "a")


def test_endpoint_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv("DPN_LENS_JUDGE_URL", raising=False)
    assert judge_endpoint(None) is None
    monkeypatch.setenv("DPN_LENS_JUDGE_URL", "http://judge:1/v1")
    assert judge_endpoint(None) == "http://judge:1/v1" and judge_endpoint("http://x/v1") == "http://x/v1"


def test_comparison_with_a_judge_reports_judge_scores_and_writes_the_answers(letter_model, shared_data, tmp_path):
    with FakeJudge() as judge:
        config = CompareConfig(traits=["openness"], methods=["dpn-le", "prompting"], data_dir=str(shared_data),
                               locate_pairs=12, locate_q=0.8, locate_tau_d=0.0, questionnaire_items=2,
                               statements_per_pole=1, capability=CapabilitySizes(1, 1, 1, 16, 1, 16), gamma_sweep=[],
                               q_sweep=[], judge=JudgeConfig(judge.url, questions_per_trait=2, max_new_tokens=3))
        record = run_comparison(letter_model, config, log=lambda message: None)
    # unsteered + 2 methods x 2 directions, 2 questions each
    assert len(judge.requests) == 10 and len(record.judged) == 10
    base = next(r for r in record.rows if r.method == "unsteered")
    for row in record.rows:
        judged = [j for j in record.judged if j.method == row.method and (j.direction or "none") in
                  (row.direction, "none") and (row.method != "unsteered" or j.direction is None)]
        assert row.judge_trait == pytest.approx(sum(j.judge_trait for j in judged) / len(judged))
        sign = -1 if row.direction == "decrease" else 1
        assert row.judge_shift == pytest.approx(sign * (row.judge_trait - base.judge_trait))
    files = {p.name for p in write_outputs(record, tmp_path, make_png=False)}
    assert "judged.csv" in files and "judge_shift" in (tmp_path / "comparison.md").read_text()
    text = (tmp_path / "comparison.json").read_text()
    assert "api_key" not in text
    assert json.dumps(ComparisonRecord.from_dict(json.loads(text)).to_dict(), indent=2) + "\n" == text
    assert record.meta.judge_replies == 10 and record.meta.judge_unparsable == 0
    assert all(j.judge_parsed and json.loads(j.judge_reply)["trait"] == j.judge_trait for j in record.judged)


def test_comparison_reports_unparsable_judge_replies(letter_model, shared_data, tmp_path):
    with FakeJudge(reply="Trait: 4/5, Fluency: 3/5") as judge:
        config = CompareConfig(traits=["openness"], methods=["dpn-le"], data_dir=str(shared_data),
                               locate_pairs=12, locate_q=0.8, locate_tau_d=0.0, questionnaire_items=2,
                               statements_per_pole=1, capability=CapabilitySizes(1, 1, 1, 16, 1, 16), gamma_sweep=[],
                               q_sweep=[], judge=JudgeConfig(judge.url, questions_per_trait=2, max_new_tokens=2))
        record = run_comparison(letter_model, config, log=lambda message: None)
    assert record.meta.judge_replies == 6 and record.meta.judge_unparsable == 6
    assert all(row.judge_unparsable == 2 and math.isnan(row.judge_trait) for row in record.rows)
    assert all(j.judge_trait is None and not j.judge_parsed and j.judge_reply == "Trait: 4/5, Fluency: 3/5"
               for j in record.judged)
    write_outputs(record, tmp_path, make_png=False)
    assert "6 of 6 replies were not a rating" in (tmp_path / "comparison.md").read_text()
    text = (tmp_path / "comparison.json").read_text()   # NaN ratings and null answers read back as written
    assert json.dumps(ComparisonRecord.from_dict(json.loads(text)).to_dict(), indent=2) + "\n" == text


def test_compare_judge_timeout_and_retries_reach_the_judge_config(monkeypatch, capsys, tmp_path):
    import dpn_lens.evaluation.compare as compare_module
    from dpn_lens.cli import main

    seen = {}

    def stop(model, config, log=print):
        seen["judge"] = config.judge
        raise KeyboardInterrupt  # stop before any evaluation: only the configuration is checked here

    monkeypatch.setattr(compare_module, "run_comparison", stop)
    monkeypatch.setattr("dpn_lens.models.load_model", lambda *a, **k: object())
    argv = ["compare", "--out", str(tmp_path), "--judge-url", "http://localhost:9/v1", "--quick"]
    assert main(argv + ["--judge-timeout", "5", "--judge-retries", "1"]) == 130
    assert seen["judge"].timeout == 5.0 and seen["judge"].retries == 1
    assert main(argv + ["--judge-timeout", "0"]) == 2
    assert "--judge-timeout must be > 0" in capsys.readouterr().err
