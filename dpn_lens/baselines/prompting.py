"""Prompting baseline: the persona description in the prompt, the model untouched."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from dpn_lens.data.prompts import render_roleplay_prompt
from dpn_lens.steering import direction_sign
from dpn_lens.traits import normalize_trait

__all__ = ["PersonaPrompt", "persona_prompt"]


@dataclass(frozen=True)
class PersonaPrompt:
    """A persona description wrapped around every question (the paper's role-play template).

    Not a model edit: evaluation functions take it as ``persona=`` (next to ``edit=``) and call
    ``wrap`` on trait questions and prepend ``prefix`` to capability contexts.

    Example:
        >>> PersonaPrompt("openness", "increase", "You love new ideas.").wrap("Hi?").splitlines()[1]
        '###Personality description: You love new ideas.'
    """

    trait: str
    direction: str
    description: str

    @property
    def label(self) -> str:
        return f"prompting {self.trait} {self.direction}"

    def wrap(self, question: str) -> str:
        return render_roleplay_prompt(self.description, question)

    @property
    def prefix(self) -> str:
        return f"Personality description: {self.description}\n\n"


def persona_prompt(trait: str, direction: Literal["increase", "decrease"] = "increase", index: int = 0
                   ) -> PersonaPrompt:
    """The ``index``-th embedded high (increase) or low (decrease) persona description of ``trait``.

    Example:
        >>> persona_prompt("neuroticism", "decrease").direction
        'decrease'
    """
    trait = normalize_trait(trait)
    direction_sign(direction)
    path = resources.files("dpn_lens.data").joinpath("embedded", "personas.json")
    personas = json.loads(path.read_text(encoding="utf-8"))[trait]["high" if direction == "increase" else "low"]
    if not 0 <= index < len(personas):
        raise ValueError(f"persona index {index} is outside 0..{len(personas) - 1}")
    return PersonaPrompt(trait, direction, personas[index])
