"""Contrastive data: the embedded default, PersonalityBench and Anthropic persona builders."""

from __future__ import annotations

import json

import pytest

from dpn_lens import (TRAITS, ContrastiveSet, anthropic_persona_contrastive_set, embedded_contrastive_set,
                      personalitybench_contrastive_set)
from dpn_lens.data import ROLEPLAY_TEMPLATE, render_roleplay_prompt
from dpn_lens.traits import trait_title


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("trait", TRAITS)
def test_embedded_set_gives_1000_distinct_seeded_pairs(trait):
    pairs = embedded_contrastive_set(trait)
    assert len(pairs) == 1000 and pairs.source == "embedded" and pairs.trait == trait
    assert len({(p.question, p.high_description, p.low_description) for p in pairs.pairs}) == 1000
    assert len(set(zip(pairs.high, pairs.low))) == 1000
    again = embedded_contrastive_set(trait)
    assert again.high == pairs.high and again.low == pairs.low
    assert embedded_contrastive_set(trait, seed=7).high != pairs.high
    for pair in pairs.pairs[:50]:
        assert pair.high == render_roleplay_prompt(pair.high_description, pair.question)
        assert pair.low == render_roleplay_prompt(pair.low_description, pair.question)
        assert pair.high_description != pair.low_description


def test_embedded_personas_are_distinct_per_pole():
    pairs = embedded_contrastive_set("neuroticism", n_pairs=300)
    high = {p.high_description for p in pairs.pairs}
    low = {p.low_description for p in pairs.pairs}
    assert len(high) > 10 and len(low) > 10 and not high & low


@pytest.mark.parametrize("trait", TRAITS)
def test_personalitybench_reads_shared_data_with_the_right_poles(shared_data, trait):
    folder = shared_data / "personalitybench"
    rows = read_jsonl(folder / "description.jsonl")
    high_texts = {row[trait_title(trait)] for row in rows}
    low_texts = {row[f"{trait_title(trait)}_reversed"] for row in rows}
    questions = {row["question"].strip() for path in (folder / "test").glob("*.jsonl") for row in read_jsonl(path)}
    pairs = personalitybench_contrastive_set(shared_data, trait, n_pairs=200)
    assert len(pairs) == 200 and pairs.source.startswith("personalitybench:")
    for pair in pairs.pairs:
        assert pair.high_description in high_texts and pair.low_description in low_texts
        assert pair.question in questions
        assert pair.high.startswith(ROLEPLAY_TEMPLATE.split("{")[0])
    assert personalitybench_contrastive_set(folder, trait, n_pairs=200).high == pairs.high   # the folder itself works


def test_personalitybench_default_is_1000_pairs_from_the_459_test_questions(shared_data):
    pairs = personalitybench_contrastive_set(shared_data, "openness")
    assert len(pairs) == 1000
    assert len({p.question for p in pairs.pairs}) == 459


@pytest.mark.parametrize("trait", TRAITS)
def test_anthropic_persona_high_pole_is_what_the_persona_says(shared_data, trait):
    rows = read_jsonl(shared_data / "anthropic_persona" / f"{trait}.jsonl")
    says = {r["statement"].strip() for r in rows if r["answer_matching_behavior"] == " Yes"}
    does_not = {r["statement"].strip() for r in rows if r["answer_matching_behavior"] == " No"}
    pairs = anthropic_persona_contrastive_set(shared_data, trait)
    assert len(pairs) == min(len(says), len(does_not)) == 500
    assert set(pairs.high) == says and set(pairs.low) == does_not
    assert anthropic_persona_contrastive_set(shared_data, trait, n_pairs=50).high == pairs.high[:50]
    with pytest.raises(ValueError, match="asked for 501 pairs"):
        anthropic_persona_contrastive_set(shared_data, trait, n_pairs=501)


# ---------------------------------------------------------------- bad records


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")


def personalitybench_folder(tmp_path, description_rows, questions=("What do you do on Sunday?",)):
    folder = tmp_path / "personalitybench"
    write_jsonl(folder / "description.jsonl", description_rows)
    write_jsonl(folder / "test" / "Openness.jsonl", [{"question": q} for q in questions])
    return folder


def test_personalitybench_empty_description_is_named(tmp_path):
    personalitybench_folder(tmp_path, [{"Openness": "You are curious.", "Openness_reversed": "  "}])
    with pytest.raises(ValueError, match=r"description.jsonl:1 has an empty 'Openness_reversed' description"):
        personalitybench_contrastive_set(tmp_path, "openness", n_pairs=1)


def test_personalitybench_unknown_trait_key_is_named(tmp_path):
    folder = personalitybench_folder(tmp_path, [{"Openness": "a", "Openness_reversed": "b", "Honesty": "c"}])
    with pytest.raises(ValueError, match=r"unknown trait keys \['Honesty'\].*<Trait> or <Trait>_reversed"):
        personalitybench_contrastive_set(folder, "openness", n_pairs=1)


def test_personalitybench_unequal_pole_counts_are_refused(tmp_path):
    rows = [{"Openness": "You are curious.", "Openness_reversed": "You like routine."}, {"Openness": "You are bold."}]
    personalitybench_folder(tmp_path, rows)
    with pytest.raises(ValueError, match=r"description.jsonl:2 has an empty 'Openness_reversed' description"):
        personalitybench_contrastive_set(tmp_path, "openness", n_pairs=1)


def test_bad_question_records_and_json_are_named(tmp_path):
    rows = [{"Openness": "You are curious.", "Openness_reversed": "You like routine."}]
    personalitybench_folder(tmp_path, rows, questions=("Fine?", ""))
    with pytest.raises(ValueError, match=r"Openness.jsonl: record 2 has no non-empty 'question' field"):
        personalitybench_contrastive_set(tmp_path, "openness", n_pairs=1)
    (tmp_path / "personalitybench" / "test" / "Openness.jsonl").write_text('{"question": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"Openness.jsonl:2 is not valid JSON"):
        personalitybench_contrastive_set(tmp_path, "openness", n_pairs=1)


def test_asking_for_more_distinct_pairs_than_the_data_allow_is_refused(tmp_path):
    personalitybench_folder(tmp_path, [{"Openness": "a", "Openness_reversed": "b"}], questions=("q1?", "q2?"))
    with pytest.raises(ValueError, match="asked for 3 distinct pairs but the data allow only 2"):
        personalitybench_contrastive_set(tmp_path, "openness", n_pairs=3)


def test_anthropic_bad_records_are_named(tmp_path):
    folder = tmp_path / "anthropic_persona"
    write_jsonl(folder / "openness.jsonl", [{"statement": "I like art", "answer_matching_behavior": " Yes"},
                                            {"statement": " ", "answer_matching_behavior": " No"}])
    with pytest.raises(ValueError, match=r"openness.jsonl:2 has an empty statement"):
        anthropic_persona_contrastive_set(tmp_path, "openness")
    write_jsonl(folder / "openness.jsonl", [{"statement": "I like art", "answer_matching_behavior": "Maybe"}])
    with pytest.raises(ValueError, match=r"answer_matching_behavior must be ' Yes' or ' No', got 'Maybe'"):
        anthropic_persona_contrastive_set(tmp_path, "openness")


def test_missing_data_directory_says_how_to_point_at_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("DPN_LENS_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=r"data_dir=.*--data-dir.*\$DPN_LENS_DATA"):
        personalitybench_contrastive_set(None, "openness")
    with pytest.raises(FileNotFoundError, match=r"does not exist; point data_dir \(--data-dir, \$DPN_LENS_DATA\)"):
        anthropic_persona_contrastive_set(tmp_path / "nowhere", "openness")


def test_data_directory_from_the_environment(shared_data, monkeypatch):
    monkeypatch.setenv("DPN_LENS_DATA", str(shared_data))
    assert len(anthropic_persona_contrastive_set(None, "openness", n_pairs=5)) == 5


@pytest.mark.parametrize("name", ["honesty", "", "openess"])
def test_unknown_trait_names_the_valid_ones(name):
    with pytest.raises(ValueError, match="unknown trait .*openness, conscientiousness, extraversion"):
        embedded_contrastive_set(name, n_pairs=2)


def test_trait_aliases_are_accepted():
    assert ContrastiveSet("Extroversion", ["a"], ["b"]).trait == "extraversion"
    assert ContrastiveSet("N", ["a"], ["b"]).trait == "neuroticism"


def test_contrastive_set_refuses_unequal_empty_and_whitespace_prompts():
    with pytest.raises(ValueError, match="2 high-pole prompts but 1 low-pole prompts.*trim the longer list"):
        ContrastiveSet("openness", ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="low-pole prompt #1 is empty or whitespace; remove it"):
        ContrastiveSet("openness", ["a", "b"], ["c", " \n\t"])
    with pytest.raises(ValueError, match="the contrastive set is empty"):
        ContrastiveSet("openness", [], [])


def test_subset_and_jsonl_export(tmp_path):
    pairs = embedded_contrastive_set("agreeableness", n_pairs=20)
    small = pairs.subset(5)
    assert len(small) == 5 and small.high == pairs.high[:5]
    rows = read_jsonl(small.to_jsonl(tmp_path / "pairs.jsonl"))
    assert [r["high"] for r in rows] == small.high and {r["trait"] for r in rows} == {"agreeableness"}


def test_one_multiple_choice_builder_gives_the_questionnaire_and_capability_prompts_unchanged():
    """Golden strings written by the three separate builders before they became one."""
    from dpn_lens.data.prompts import multiple_choice_prompt
    from dpn_lens.evaluation.capability import _letters_item
    from dpn_lens.evaluation.trait import questionnaire_prompt

    assert questionnaire_prompt("I like  tea. ") == (
        'Given a statement of you: "I like  tea. "\nPlease choose from the following options to identify how '
        "accurately this statement describes you.\nOptions:\n(A). Very Accurate\n(B). Moderately Accurate\n"
        "(C). Neither Accurate Nor Inaccurate\n(D). Moderately Inaccurate\n(E). Very Inaccurate\n"
        "Answer with a single letter.\nAnswer:")
    item = _letters_item(" Which is a prime? ", ["4", "5 ", "6"], 1)
    assert item.context == "Question: Which is a prime?\nA. 4\nB. 5 \nC. 6\nAnswer:"
    assert item.choices == (" A", " B", " C")
    assert multiple_choice_prompt(" Which is a prime? ", ["4", "5 ", "6"]) == item.context
