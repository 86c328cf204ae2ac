"""Numbers as people pass them: Python, numpy and 0-d torch scalars in, a plain ``float``/``int`` out.

A gamma read off a numpy sweep (``np.float32(1.0)``), a pandas cell (``np.float64``) or a tensor
(``torch.tensor(2.0)``) is a number; ``True``, ``"1.0"``, ``float("nan")`` and ``np.array([1.0, 2.0])``
are not, and the message names the parameter.

Example:
    >>> import numpy as np
    >>> as_float(np.float32(1.5), "gamma"), as_int(np.int64(3), "k")
    (1.5, 3)
    >>> as_float(True, "gamma")
    Traceback (most recent call last):
    ...
    ValueError: gamma must be a finite number (e.g. 1.0), got True (a bool)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["as_float", "as_int"]


def _scalar(value: Any) -> Any:
    """A 0-d numpy array or torch tensor (or a numpy scalar) as a Python scalar; anything else unchanged."""
    item = getattr(value, "item", None)
    shape = getattr(value, "shape", None)
    if callable(item) and shape is not None and tuple(shape) == ():
        return item()
    return value


def _kind(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) != ():
        return f"an array of shape {tuple(shape)}"
    return f"a {type(value).__name__}"


def as_float(value: Any, name: str, example: str = "1.0", minimum: float | None = None) -> float:
    """``value`` as a finite ``float`` (module note), at least ``minimum`` when given; else a ValueError
    naming ``name``."""
    scalar = _scalar(value)
    if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real) or not math.isfinite(float(scalar)):
        raise ValueError(f"{name} must be a finite number (e.g. {example}), got {value!r} ({_kind(value)})")
    result = float(scalar)
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, got {result:g}")
    return result


def as_int(value: Any, name: str, example: str = "8", minimum: int | None = None) -> int:
    """``value`` as an ``int`` (a float only when whole, e.g. ``8.0``), at least ``minimum`` when given; else
    a ValueError naming ``name``."""
    scalar = _scalar(value)
    whole = isinstance(scalar, numbers.Real) and not isinstance(scalar, bool) and math.isfinite(float(scalar)) \
        and float(scalar).is_integer()
    if isinstance(scalar, bool) or not whole:
        raise ValueError(f"{name} must be a whole number (e.g. {example}), got {value!r} ({_kind(value)})")
    result = int(scalar)
    if minimum is not None and result < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {result}")
    return result
