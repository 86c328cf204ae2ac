"""Contrastive data: the embedded default, PersonalityBench and Anthropic persona builders."""

from __future__ import annotations

import json

import numpy as np
from scipy.stats import ttest_ind

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


# ---------------------------------------------------------------- the poles mean the same thing everywhere

POLE_WORDS = {  # word stems that say high or low on the trait, from the Big Five adjective markers
    "openness": (r"imagin|creativ|curio|new (idea|thing|experience)|explor|artist|art\b|novel|abstract|adventur|"
                 r"daydream|idea", r"routine|conventional|familiar|tradition|practical|closed|common sense|"
                 r"established|no place|avoid|dislike new|not interested"),
    "conscientiousness": (r"organi[sz]ed|plan|careful|reliab|disciplin|order|tidy|duty|meticul|schedul|prepared|"
                          r"thorough|on time|deadline", r"careless|procrastinat|disorgan|mess|go-with-the-flow|"
                          r"forget|struggle|last minute|late|ignore|neglect|waste"),
    "extraversion": (r"talkative|outgoing|social|party|energetic|enthusias|people|conversation|friends|bubbly|"
                     r"crowd|attention|lively|assertive", r"reserved|quiet|shy|solitude|introvert|alone|private|"
                     r"drained|keep (to|my|your)|withdrawn|silent|background"),
    "agreeableness": (r"kind|trust|help|empath|cooperat|harmony|generous|forgiv|compassion|warm|considerate|"
                      r"polite|care about|sympath", r"competitive|guarded|suspicious|critic|hurt|self-focused|"
                      r"blunt|harsh|cold|insult|argu|revenge|manipulat|selfish|rude"),
    "neuroticism": (r"anxious|anxiety|worr|stress|tense|nervous|overwhelm|upset|panic|fear|moody|irritab|"
                    r"insecur|sad|depress", r"calm|relax|stable|easygoing|composed|unflappable|at ease|"
                    r"content|secure|resilient|rarely (feel|get)|handle stress|even-tempered|confident"),
}


def _pole_score(trait: str, text: str) -> int:
    import re

    high, low = POLE_WORDS[trait]
    text = text.lower()
    return len(re.findall(high, text)) - len(re.findall(low, text))


IPIP_ANCHORS = {  # unambiguous items of the inventory and the key that says their pole
    "openness": {"I indulge in my fantasies.": 1, "I do not have a good imagination.": -1},
    "conscientiousness": {"I like order.": 1, "I postpone decisions.": -1},
    "extraversion": {"I enjoy being part of a loud crowd.": 1, "I warm up quickly to others.": 1},
    "agreeableness": {"I make people feel welcome.": 1, "I hold a grudge.": -1},
    "neuroticism": {"I get upset easily.": 1, "Am not easily bothered by things.": -1},
}


@pytest.mark.parametrize("trait", TRAITS)
def test_the_high_pole_means_the_same_thing_in_every_data_source(shared_data, trait):
    """Neuroticism high = anxious in the embedded data, PersonalityBench, Anthropic's personas and IPIP alike
    (issue 11). Persona texts: high-pole texts use the trait's high markers more than low-pole texts do, per
    source (a source with swapped poles gives a negative difference). IPIP items are short and often negated
    ("I do not like art"), which word markers misread, so their keying is checked on anchor items."""
    from dpn_lens.evaluation.trait import load_ipip_items

    embedded = embedded_contrastive_set(trait, 1000).pairs
    bench = personalitybench_contrastive_set(shared_data, trait).pairs
    sources = {
        "embedded": ([p.high_description for p in embedded], [p.low_description for p in embedded]),
        "personalitybench": ([p.high_description for p in bench], [p.low_description for p in bench]),
        "anthropic_persona": tuple(getattr(anthropic_persona_contrastive_set(shared_data, trait), pole)
                                   for pole in ("high", "low")),
    }
    for name, (high_texts, low_texts) in sources.items():
        high_texts, low_texts = sorted(set(high_texts)), sorted(set(low_texts))
        high = [_pole_score(trait, text) for text in high_texts]
        low = [_pole_score(trait, text) for text in low_texts]
        # Negated markers ("no place for new ideas") blur single texts, so the test is on the means.
        p_value = ttest_ind(high, low, equal_var=False, alternative="greater").pvalue
        assert p_value < 0.01, (  # swapped poles would give p near 1
            f"{trait} / {name}: high-pole texts score {np.mean(high):+.2f} and low-pole texts {np.mean(low):+.2f} on "
            f"the trait's markers ({len(high)} and {len(low)} texts, p={p_value:.2g}): the poles may be swapped")
    keys = {item.text: item.key for item in load_ipip_items(shared_data) if item.trait == trait}
    assert {text: keys.get(text) for text in IPIP_ANCHORS[trait]} == IPIP_ANCHORS[trait]
