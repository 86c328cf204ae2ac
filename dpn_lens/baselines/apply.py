"""One context manager for every kind of edit (additive ``Intervention`` or hook-based baseline)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

__all__ = ["apply_edit"]


@contextlib.contextmanager
def apply_edit(model: Any, edit: Any) -> Iterator[Any]:
    """Run ``model`` with ``edit``; hooks are removed on exit, also after an exception.

    ``Intervention`` objects go through ``dpn_lens.steer`` (which validates their deltas); any other
    object must provide ``fwd_hooks()``; ``None`` or a ``PersonaPrompt`` (which edits the prompt, not
    the model) leave the model unchanged.

    Example:
        >>> with apply_edit(model, npti_intervention(stats, "increase")):    # doctest: +SKIP
        ...     model.generate(prompt, max_new_tokens=40, do_sample=False)
    """
    from dpn_lens.steering import Intervention, steer

    if edit is None or not edit.fwd_hooks():
        yield model
    elif isinstance(edit, Intervention):
        with steer(model, edit):
            yield model
    else:
        with model.hooks(fwd_hooks=edit.fwd_hooks()):
            yield model
