"""Typed answers: one question with its answer under each condition (unsteered, each edit).

What the demo shows and ``dpn-lens steer`` prints, kept as data: ``summary.json`` stores each one as a
dict (``to_dict``), the report reads it back (``from_dict``), and ``text()`` is only ever for printing.

Example:
    >>> g = Generation("Hi?", {"unsteered": "Hello.", "increase": "Hello!!"})
    >>> Generation.from_dict(g.to_dict()) == g
    True
    >>> print(g.text())
    Q: Hi?
      unsteered: Hello.
       increase: Hello!!
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Generation", "UNSTEERED"]

UNSTEERED = "unsteered"


@dataclass(frozen=True)
class Generation:
    """A question and its greedy answer per condition (``"unsteered"`` first), or a ``note`` saying why
    there are none (e.g. a map that selects no neurons)."""

    question: str
    answers: dict[str, str] = field(default_factory=dict)
    note: str = ""

    def steered(self) -> dict[str, str]:
        """The answers under an edit (every condition but ``"unsteered"``)."""
        return {name: text for name, text in self.answers.items() if name != UNSTEERED}

    def identical_to_unsteered(self) -> list[str]:
        """The conditions whose answer is the unsteered answer, word for word (the edit changed nothing)."""
        base = self.answers.get(UNSTEERED)
        return [] if base is None else [name for name, text in self.steered().items() if text.strip() == base.strip()]

    def text(self) -> str:
        """The block printed to a terminal: the question, then one aligned line per condition."""
        lines = [f"Q: {self.question}"] + [f"  {name:>9}: {text}" for name, text in self.answers.items()]
        return "\n".join(lines + ([f"  {self.note}"] if self.note else []))

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answers": dict(self.answers), **({"note": self.note} if self.note else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Generation":
        if not isinstance(data, dict) or "question" not in data:
            raise ValueError(f"a generation is a dict with a 'question' (and 'answers'), got {data!r:.80}")
        return cls(str(data["question"]), {str(k): str(v) for k, v in (data.get("answers") or {}).items()},
                   str(data.get("note", "")))
