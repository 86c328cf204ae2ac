"""Contrastive prompt sets: paired high-pole and low-pole prompts for one Big Five trait."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dpn_lens.data.prompts import render_roleplay_prompt
from dpn_lens.io import read_jsonl
from dpn_lens.traits import TRAITS, normalize_trait, trait_title

__all__ = [
    "embedded_questions",
    "embedded_personas",
    "ContrastivePair",
    "ContrastiveSet",
    "embedded_contrastive_set",
    "personalitybench_contrastive_set",
    "anthropic_persona_contrastive_set",
    "load_question_jsonl",
    "resolve_data_dir",
    "find_data_dir",
    "DATA_DIR_ENV",
]

DATA_DIR_ENV = "DPN_LENS_DATA"


@dataclass(frozen=True)
class ContrastivePair:
    """One contrastive pair: the same question asked of a high-trait and a low-trait persona."""

    high: str
    low: str
    question: str = ""
    high_description: str = ""
    low_description: str = ""


@dataclass
class ContrastiveSet:
    """Paired high-pole and low-pole user messages for one trait.

    The messages are model-independent; ``collect_statistics`` renders them through each model's
    chat template. ``source`` says where they came from.

    Example:
        >>> pairs = ContrastiveSet("openness", high=["I love new ideas."], low=["I like routine."])
        >>> len(pairs)
        1
    """

    trait: str
    high: list[str]
    low: list[str]
    source: str = "user"
    pairs: list[ContrastivePair] = field(default_factory=list, repr=False)
    seed: int | None = None

    def __post_init__(self) -> None:
        self.trait = normalize_trait(self.trait)
        self.high, self.low = list(self.high), list(self.low)
        if len(self.high) != len(self.low):
            raise ValueError(
                f"{self.trait}: {len(self.high)} high-pole prompts but {len(self.low)} low-pole prompts; "
                "a contrastive set needs one low prompt per high prompt (trim the longer list)"
            )
        if not self.high:
            raise ValueError(f"{self.trait}: the contrastive set is empty; give at least one pair of prompts")
        for pole, prompts in (("high", self.high), ("low", self.low)):
            for index, prompt in enumerate(prompts):
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError(
                        f"{self.trait}: {pole}-pole prompt #{index} is empty or whitespace; "
                        "remove it (and its partner) or fill in its text"
                    )

    def __len__(self) -> int:
        return len(self.high)

    def __repr__(self) -> str:
        return f"ContrastiveSet(trait={self.trait!r}, n_pairs={len(self)}, source={self.source!r})"

    def subset(self, n_pairs: int) -> "ContrastiveSet":
        """The first ``n_pairs`` pairs (handy for quick runs)."""
        return ContrastiveSet(self.trait, self.high[:n_pairs], self.low[:n_pairs], self.source,
                              self.pairs[:n_pairs], self.seed)

    def to_jsonl(self, path: str | os.PathLike) -> Path:
        """Write the pairs as JSON Lines (``high``, ``low`` and, when known, the parts)."""
        from dpn_lens.io import write_text_atomic

        rows = self.pairs or [ContrastivePair(h, l) for h, l in zip(self.high, self.low)]
        lines = [json.dumps({"trait": self.trait, **row.__dict__}) for row in rows]
        return write_text_atomic(path, "\n".join(lines) + "\n")


def resolve_data_dir(data_dir: str | os.PathLike | None, subfolder: str) -> Path:
    """Find ``subfolder`` under the data folder the user named (argument or ``$DPN_LENS_DATA``)."""
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if root is None:
        raise FileNotFoundError(
            f"no data folder given for {subfolder!r}; pass data_dir=... (command line: --data-dir) or set "
            f"${DATA_DIR_ENV} to the folder that holds {subfolder}/ (in this repository: ../shared/data)"
        )
    root = Path(root).expanduser()
    candidate = root if root.name == subfolder else root / subfolder
    if not candidate.is_dir():
        raise FileNotFoundError(
            f"data folder {candidate} does not exist; point data_dir (--data-dir, ${DATA_DIR_ENV}) at the "
            f"folder that holds {subfolder}/ (in this repository: ../shared/data)"
        )
    return candidate


def find_data_dir(subfolder: str = "capability", start: str | os.PathLike | None = None) -> Path:
    """The data folder (the one that holds ``subfolder``/) for notebooks and scripts run inside a checkout.

    ``$DPN_LENS_DATA`` when it is set (checked by ``resolve_data_dir``); otherwise the nearest
    ``shared/data`` folder holding ``subfolder`` in ``start`` (default: the working directory) or above
    it. If neither exists, ``resolve_data_dir``'s error says how to name the folder.

    Example:
        >>> find_data_dir("capability")                     # doctest: +SKIP
        PosixPath('/work/shared/data')
    """
    if os.environ.get(DATA_DIR_ENV) is None:
        here = Path(start if start is not None else Path.cwd()).resolve()
        for folder in [here, *here.parents]:
            if (folder / "shared" / "data" / subfolder).is_dir():
                return folder / "shared" / "data"
    # resolve_data_dir returns root/subfolder (or root itself when it is named like subfolder).
    return resolve_data_dir(None, subfolder).parent


def load_question_jsonl(paths: Iterable[str | os.PathLike], key: str = "question") -> list[str]:
    """Read questions (field ``key``) from JSONL files, dropping exact duplicates, in file order."""
    questions: list[str] = []
    seen: set[str] = set()
    for path in paths:
        path = Path(path)
        for line_number, row in enumerate(read_jsonl(path), 1):
            text = row.get(key) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}: record {line_number} has no non-empty {key!r} field; fix or remove it")
            if text not in seen:
                seen.add(text)
                questions.append(text.strip())
    if not questions:
        raise ValueError(f"no questions found in {', '.join(map(str, paths))}")
    return questions


def draw_pairs(trait: str, questions: Sequence[str], high_descriptions: Sequence[str],
                low_descriptions: Sequence[str], n_pairs: int, seed: int, source: str) -> ContrastiveSet:
    """Pair question i with a random high and a random low description, all triples distinct.

    Questions are visited in a seeded random order and reused cyclically once exhausted; a triple
    that was already drawn is redrawn, so every pair of the set is distinct.
    """
    from dpn_lens.numbers import as_int

    n_pairs, seed = as_int(n_pairs, "n_pairs", "500", minimum=1), as_int(seed, "seed", "42")
    capacity = len(questions) * len(high_descriptions) * len(low_descriptions)
    if n_pairs > capacity:
        raise ValueError(f"{trait}: asked for {n_pairs} distinct pairs but the data allow only {capacity}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(questions))
    seen: set[tuple[int, int, int]] = set()
    pairs: list[ContrastivePair] = []
    while len(pairs) < n_pairs:
        question_index = int(order[len(pairs) % len(order)])
        while True:
            triple = (question_index, int(rng.integers(len(high_descriptions))), int(rng.integers(len(low_descriptions))))
            if triple not in seen:
                break
        seen.add(triple)
        question, high_description, low_description = (
            questions[triple[0]], high_descriptions[triple[1]], low_descriptions[triple[2]]
        )
        pairs.append(ContrastivePair(
            high=render_roleplay_prompt(high_description, question),
            low=render_roleplay_prompt(low_description, question),
            question=question, high_description=high_description, low_description=low_description,
        ))
    return ContrastiveSet(trait, [p.high for p in pairs], [p.low for p in pairs], source, pairs, seed)


def _embedded_file(name: str) -> Path:
    return Path(str(resources.files("dpn_lens.data").joinpath("embedded", name)))


def embedded_questions() -> list[str]:
    """The everyday questions shipped with dpn-lens (all traits', in file order).

    Example:
        >>> len(embedded_questions()) > 100
        True
    """
    return [row["question"] for row in read_jsonl(_embedded_file("questions.jsonl"))]


def embedded_personas(trait: str) -> tuple[list[str], list[str]]:
    """The high- and low-pole persona descriptions of ``trait`` shipped with dpn-lens.

    Example:
        >>> high, low = embedded_personas("openness")
        >>> len(high) == len(low) > 0
        True
    """
    personas = json.loads(_embedded_file("personas.json").read_text(encoding="utf-8"))
    trait = normalize_trait(trait)
    return list(personas[trait]["high"]), list(personas[trait]["low"])


def embedded_contrastive_set(trait: str, n_pairs: int = 1000, seed: int = 42,
                             questions: str = "all") -> ContrastiveSet:
    """Contrastive set built from the persona descriptions and questions shipped with dpn-lens.

    Args:
        trait: Big Five trait.
        n_pairs: number of distinct (question, high persona, low persona) pairs.
        seed: seed of the draw (the paper uses 42).
        questions: ``"all"`` (the everyday situations written for all five traits) or ``"trait"``
            (only those written for this trait).

    Example:
        >>> pairs = embedded_contrastive_set("neuroticism", n_pairs=10)
        >>> len(pairs), pairs.source
        (10, 'embedded')
    """
    trait = normalize_trait(trait)
    personas = json.loads(_embedded_file("personas.json").read_text(encoding="utf-8"))
    rows = read_jsonl(_embedded_file("questions.jsonl"))
    if questions not in ("all", "trait"):
        raise ValueError(f"questions must be 'all' or 'trait', got {questions!r}")
    pool = [row["question"] for row in rows if questions == "all" or row["trait"] == trait]
    return draw_pairs(trait, pool, personas[trait]["high"], personas[trait]["low"], n_pairs, seed, "embedded")


def personalitybench_contrastive_set(data_dir: str | os.PathLike | None, trait: str, n_pairs: int = 1000,
                                     seed: int = 42, question_files: Sequence[str | os.PathLike] | None = None
                                     ) -> ContrastiveSet:
    """PersonalityBench-style pairs: its persona descriptions x situational questions.

    Reads ``description.jsonl`` (keys ``<Trait>`` and ``<Trait>_reversed``) from
    ``data_dir/personalitybench`` (or ``data_dir`` itself), and questions from ``question_files``
    (any JSONL with a ``question`` field) or, by default, from all ``test/*.jsonl`` files there.

    The paper draws its 1,000 questions from the 180k-question "search" split; our copy holds only
    the 459 test questions, so questions are reused with different description pairs.

    Example:
        >>> pairs = personalitybench_contrastive_set("../shared/data", "openness", n_pairs=100)  # doctest: +SKIP
    """
    trait = normalize_trait(trait)
    folder = resolve_data_dir(data_dir, "personalitybench")
    description_file = folder / "description.jsonl"
    if not description_file.exists():
        raise FileNotFoundError(f"{description_file} is missing; the PersonalityBench folder must hold description.jsonl")
    high_key, low_key = trait_title(trait), f"{trait_title(trait)}_reversed"
    high_descriptions, low_descriptions = [], []
    for line_number, row in enumerate(read_jsonl(description_file), 1):
        unknown = set(row) - {t.capitalize() for t in TRAITS} - {f"{t.capitalize()}_reversed" for t in TRAITS}
        if unknown:
            raise ValueError(f"{description_file}:{line_number} has unknown trait keys {sorted(unknown)}; "
                             "keys must be <Trait> or <Trait>_reversed for the Big Five")
        for key, bucket in ((high_key, high_descriptions), (low_key, low_descriptions)):
            text = row.get(key)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{description_file}:{line_number} has an empty {key!r} description; fix or remove it")
            bucket.append(text)
    if question_files is None:
        question_files = sorted((folder / "test").glob("*.jsonl"))
        if not question_files:
            raise FileNotFoundError(f"no question files in {folder / 'test'}; pass question_files=[...]")
    questions = load_question_jsonl(question_files)
    return draw_pairs(trait, questions, high_descriptions, low_descriptions, n_pairs, seed,
                       f"personalitybench:{folder}")


def anthropic_persona_contrastive_set(data_dir: str | os.PathLike | None, trait: str,
                                      n_pairs: int | None = None, seed: int = 42) -> ContrastiveSet:
    """Statement-style pairs from Anthropic's persona evals: a statement a high-trait persona
    says (``answer_matching_behavior == " Yes"``) vs one it does not (``" No"``).

    Example:
        >>> pairs = anthropic_persona_contrastive_set("../shared/data", "agreeableness", 100)  # doctest: +SKIP
    """
    from dpn_lens.numbers import as_int

    trait = normalize_trait(trait)
    seed = as_int(seed, "seed", "42")
    if n_pairs is not None:
        n_pairs = as_int(n_pairs, "n_pairs", "500", minimum=1)
    folder = resolve_data_dir(data_dir, "anthropic_persona")
    path = folder / f"{trait}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the anthropic_persona folder must hold <trait>.jsonl files")
    says, does_not_say = [], []
    for line_number, row in enumerate(read_jsonl(path), 1):
        statement, answer = row.get("statement"), row.get("answer_matching_behavior")
        if not isinstance(statement, str) or not statement.strip():
            raise ValueError(f"{path}:{line_number} has an empty statement; fix or remove it")
        if answer not in (" Yes", " No"):
            raise ValueError(f"{path}:{line_number}: answer_matching_behavior must be ' Yes' or ' No', got {answer!r}")
        (says if answer == " Yes" else does_not_say).append(statement.strip())
    rng = np.random.default_rng(seed)
    says = [says[i] for i in rng.permutation(len(says))]
    does_not_say = [does_not_say[i] for i in rng.permutation(len(does_not_say))]
    count = min(len(says), len(does_not_say)) if n_pairs is None else n_pairs
    if count > min(len(says), len(does_not_say)):
        raise ValueError(f"{path} has {len(says)} high and {len(does_not_say)} low statements; "
                         f"asked for {count} pairs")
    pairs = [ContrastivePair(high=h, low=l) for h, l in zip(says[:count], does_not_say[:count])]
    return ContrastiveSet(trait, [p.high for p in pairs], [p.low for p in pairs],
                          f"anthropic_persona:{folder}", pairs, seed)
