"""Errors that several stages raise: a map or artifact meets the wrong model, or the wrong rule's map.

They live in this small module, apart from ``localization.neuron_map``, so that ``models`` can raise
them without importing the map module (which imports ``models`` for fingerprints).

Example:
    >>> from dpn_lens.errors import IncompatibleModelError
    >>> issubclass(IncompatibleModelError, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["IncompatibleModelError", "WrongRuleError"]


class IncompatibleModelError(ValueError):
    """A neuron map was applied to a model other than the one it was located on."""


class WrongRuleError(ValueError):
    """A neuron map made by one selection rule was given where another rule's map was asked for."""
