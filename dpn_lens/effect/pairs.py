"""Selection pairs: the model's own answers to *training* questions, which effect-based selection reads.

Effect-based rules (``dpn_lens.effect.rules``) rank neurons by what editing them does to the preference
margin ``log p(high answer) - log p(low answer)``. They need pairs of answers, and those must never be
the pairs the evaluation scores (``dpn-lens control`` uses held-out PersonalityBench test questions and
its persona descriptions). So selection pairs come only from the data shipped in the package: the
embedded everyday questions and the embedded persona descriptions (``data/embedded``; both written for
dpn-lens, disjoint from PersonalityBench). For each drawn (question, high persona, low persona) triple
the model answers greedily in the role-play template under each persona
(``preference.generate_persona_pairs``); identical and empty pairs are dropped.

Generating the answers is the slow part (about 40 s per 64 pairs for a 135M model on 2 CPU cores), so
they are cached per model under ``$DPN_LENS_CACHE/selection_pairs/``.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> pairs = selection_pairs(build_tiny_model(), "openness", n_pairs=4, max_new_tokens=4, cache=False)
    >>> len(pairs) <= 4
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Sequence

from dpn_lens.data.contrastive import embedded_personas, embedded_questions
from dpn_lens.effect.defaults import SELECTION_PAIRS, SELECTION_TOKENS
from dpn_lens.evaluation.preference import PreferencePair, generate_persona_pairs, pairs_cache_file
from dpn_lens.generation import GENERATION_BATCH
from dpn_lens.io import write_json_atomic
from dpn_lens.traits import normalize_trait

__all__ = ["selection_pairs", "SELECTION_PAIRS", "SELECTION_TOKENS"]


def selection_material(trait: str) -> tuple[list[str], list[str], list[str]]:
    """The embedded questions (all traits') and the trait's embedded high and low persona descriptions: what
    the selection pairs are drawn from (and keyed by, ``selection_pairs_key``)."""
    high, low = embedded_personas(trait)
    return embedded_questions(), high, low


def selection_pairs_key(questions: Sequence[str], highs: Sequence[str], lows: Sequence[str],
                        n_pairs: int = SELECTION_PAIRS, seed: int = 0,
                        max_new_tokens: int = SELECTION_TOKENS) -> dict[str, Any]:
    """What the selection pairs' cache file is keyed by beside the model, the trait and the batch size: the
    sizes, the seed and a digest of the material (``selection_material``; ``preference.pairs_cache_path``
    takes it as ``key``).

    Example:
        >>> sorted(selection_pairs_key(*selection_material("openness"), n_pairs=8))
        ['format', 'material', 'max_new_tokens', 'pairs', 'seed']
    """
    questions, highs, lows = list(questions), list(highs), list(lows)
    material = hashlib.sha256(json.dumps([questions, highs, lows]).encode()).hexdigest()[:16]
    return {"pairs": int(n_pairs), "seed": int(seed), "max_new_tokens": int(max_new_tokens), "material": material,
            "format": 1}


def selection_pairs(model: Any, trait: str, n_pairs: int = SELECTION_PAIRS, seed: int = 0,
                    max_new_tokens: int = SELECTION_TOKENS, cache: bool = True,
                    log: Callable[[str], None] | None = None, batch_size: int = GENERATION_BATCH) -> list[PreferencePair]:
    """The model's greedy answers to embedded questions under embedded high and low personas (module note).

    Args:
        model: the hooked model whose neurons are selected.
        trait: Big Five trait.
        n_pairs: (question, high persona, low persona) triples drawn with ``seed``; identical or empty
            answer pairs are dropped, so fewer may come back.
        max_new_tokens: greedy tokens per answer.
        cache: read and write ``$DPN_LENS_CACHE/selection_pairs`` (keyed by model, revision, dtype, trait,
            sizes, seed, batch size and a digest of the embedded data).
        batch_size: prompts generated together (64 runs about 1.3x faster than 16 on a 2-core CPU, the
            demo's choice; in bfloat16 the batch can change a greedy answer slightly, so it is part of the
            cache key).

    Returns:
        the kept pairs (question without persona, high answer, low answer).
    """
    trait = normalize_trait(trait)
    from dpn_lens.numbers import as_int

    n_pairs = as_int(n_pairs, "n_pairs (selection averages over pairs)", "128", minimum=2)
    seed = as_int(seed, "seed", "0")
    max_new_tokens = as_int(max_new_tokens, "max_new_tokens", "48", minimum=1)
    batch_size = as_int(batch_size, "batch_size", str(GENERATION_BATCH), minimum=1)
    questions, highs, lows = selection_material(trait)
    path = pairs_cache_file(model, "selection_pairs", trait, batch_size=batch_size,
                            **selection_pairs_key(questions, highs, lows, n_pairs, seed, max_new_tokens))
    if cache and path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if log:
            log(f"{trait}: {len(stored['pairs'])} selection pairs from the cache ({path})")
        return [PreferencePair(**row) for row in stored["pairs"]]
    generated = generate_persona_pairs(model, trait, questions, highs, lows, n_pairs, seed=seed,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size)
    pairs = [dataclasses.replace(pair, source=f"selection:{trait}") for pair in generated.pairs]
    if len(pairs) < 2:
        raise ValueError(f"{trait}: only {len(pairs)} usable selection pairs of {n_pairs} drawn (the others were "
                         "identical or empty); draw more with n_pairs")
    if log:
        log(f"{trait}: generated {len(pairs)} of {n_pairs} selection pairs ({generated.n_identical} identical, "
            f"{generated.n_empty} empty dropped)")
    if cache:
        write_json_atomic(path, {"pairs": [dataclasses.asdict(pair) for pair in pairs], "n_drawn": n_pairs,
                                 "n_identical": generated.n_identical, "n_empty": generated.n_empty})
    return pairs
