"""Default sizes of effect-based selection, shared by the rules (``effect.rules``) and the pairs they read
(``effect.pairs``), which would otherwise import each other.

Example:
    >>> from dpn_lens.effect.defaults import SELECTION_PAIRS, SELECTION_TOKENS
    >>> SELECTION_PAIRS, SELECTION_TOKENS
    (128, 48)
"""

from __future__ import annotations

__all__ = ["SELECTION_PAIRS", "SELECTION_TOKENS"]

SELECTION_TOKENS = 48
"""Greedy answer tokens per persona of a selection pair (as for the held-out evaluation pairs)."""
SELECTION_PAIRS = 128
"""Selection pairs drawn per trait by default (``effect.pairs``; identical or empty answer pairs are dropped).
With 64 the attribution rules' top sets changed a lot between draws on SmolLM2 (docs/RESULTS.md)."""
