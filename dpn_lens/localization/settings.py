"""Localization settings: which layers to search, the |s| quantile q and the effect-size threshold tau_d.

Its own module so that both ``localize`` (which produces settings) and ``neuron_map`` (which stores
them) import it without importing each other.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["LocalizationSettings", "REFERENCE_SETTINGS", "reference_settings"]


@dataclass(frozen=True)
class LocalizationSettings:
    """Which layers to search, the |s| quantile q and the effect-size threshold tau_d.

    ``layers`` are model layer indices; ``source`` and ``reason`` say where the numbers came from.

    Example:
        >>> LocalizationSettings(layers=list(range(12, 32)), q=0.995, tau_d=0.8).layer_range
        '12-31'
    """

    layers: list[int]
    q: float = 0.995
    tau_d: float = 0.5
    source: str = "user"
    reason: str = ""

    def __post_init__(self) -> None:
        from dpn_lens.numbers import as_float, as_int

        # numpy / torch scalars (a q from a sweep) become plain numbers; bool, NaN and strings are refused.
        # (a frozen dataclass: fields are set through object.__setattr__)
        object.__setattr__(self, "q", as_float(self.q, "q", "0.995"))
        object.__setattr__(self, "tau_d", as_float(self.tau_d, "tau_d", "0.5"))
        object.__setattr__(self, "layers", [as_int(layer, "each layer", "12", minimum=0) for layer in self.layers])
        if not 0.0 < self.q < 1.0:
            raise ValueError(f"q must lie strictly between 0 and 1 (e.g. 0.995 keeps 0.5%), got {self.q}")
        if not math.isfinite(self.tau_d) or self.tau_d < 0:
            raise ValueError(f"tau_d must be a finite non-negative effect size (e.g. 0.3-0.8), got {self.tau_d}")
        if not self.layers:
            raise ValueError("settings need at least one layer")

    @property
    def layer_range(self) -> str:
        return f"{self.layers[0]}-{self.layers[-1]}" if len(self.layers) > 1 else str(self.layers[0])


REFERENCE_SETTINGS: dict[str, LocalizationSettings] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": LocalizationSettings(
        list(range(12, 32)), 0.995, 0.8, "reference", "DPN-LE reference settings for LLaMA-3-8B-Instruct"),
    "Qwen/Qwen2.5-7B-Instruct": LocalizationSettings(
        list(range(14, 28)), 0.995, 0.3, "reference", "DPN-LE reference settings for Qwen2.5-7B-Instruct"),
}
"""The paper's settings, keyed by hub name; matched on the last path component, case-insensitively."""


def reference_settings(model_name: str | None) -> LocalizationSettings | None:
    """Reference settings for a known model name or local folder of it (else ``None``)."""
    if not model_name:
        return None
    key = re.sub(r"[^a-z0-9.]", "", str(model_name).rstrip("/").split("/")[-1].lower())
    for name, settings in REFERENCE_SETTINGS.items():
        if re.sub(r"[^a-z0-9.]", "", name.split("/")[-1].lower()) == key:
            return settings
    return None
