"""The Big Five traits and their two poles, with forgiving name parsing and strict errors."""

from __future__ import annotations

from typing import Literal

__all__ = ["TRAITS", "POLES", "Pole", "normalize_trait", "normalize_pole", "trait_title"]

TRAITS: tuple[str, ...] = ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")
"""The Big Five, lower case, in the conventional OCEAN order."""

POLES: tuple[str, ...] = ("high", "low")

Pole = Literal["high", "low"]

_ALIASES = {
    "o": "openness", "c": "conscientiousness", "e": "extraversion", "a": "agreeableness", "n": "neuroticism",
    "extroversion": "extraversion",
    "openness to experience": "openness",
    "emotional stability": "neuroticism",
}
_POLE_ALIASES = {"high": "high", "low": "low", "+": "high", "-": "low", "reversed": "low", "positive": "high", "negative": "low"}


def normalize_trait(name: str) -> str:
    """Return the canonical lower-case trait name.

    Example:
        >>> normalize_trait("Extroversion")
        'extraversion'
        >>> normalize_trait("O")
        'openness'
    """
    if not isinstance(name, str):
        raise TypeError(f"trait must be a string, got {type(name).__name__}; use one of {', '.join(TRAITS)}")
    key = name.strip().lower().replace("_", " ")
    key = _ALIASES.get(key, key)
    if key not in TRAITS:
        raise ValueError(f"unknown trait {name!r}; use one of {', '.join(TRAITS)} (or O, C, E, A, N)")
    return key


def normalize_pole(pole: str) -> Pole:
    """Return ``"high"`` or ``"low"``.

    Example:
        >>> normalize_pole("reversed")
        'low'
    """
    key = str(pole).strip().lower()
    if key not in _POLE_ALIASES:
        raise ValueError(f"unknown pole {pole!r}; use 'high' or 'low'")
    return _POLE_ALIASES[key]  # type: ignore[return-value]


def trait_title(trait: str) -> str:
    """``"openness"`` -> ``"Openness"`` (the capitalisation PersonalityBench files use)."""
    return normalize_trait(trait).capitalize()
