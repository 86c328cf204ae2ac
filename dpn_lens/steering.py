"""Sparse linear steering through hook points: ``h <- h + gamma * delta`` on ``mlp.hook_post``.

An ``Intervention`` holds one dense delta vector per layer (zero except on the edited neurons), so
adding it changes exactly the selected neurons and nothing else. It is applied with the ``steer``
context manager or ``apply_intervention`` (a handle with ``remove()``), and works with the model's
``run_with_hooks``, ``run_with_cache`` and ``generate``.

Every edit, DPN-LE or baseline (``NPTIIntervention``, the CAA ``ResidualIntervention``), follows the
``Edit`` protocol: ``label``, ``positions``, ``n_edited``, ``fwd_hooks()``, ``at_positions(...)``,
``-edit`` (the opposite direction) and ``gamma * edit`` (scaled strength). ``steer`` and
``apply_intervention`` are the only two ways to apply one, and accept any of them; ``edit.masked(mask)``
(a ``MaskedEdit``) is the edit only where a ``[batch, pos]`` mask is True, for scoring paths that edit
answer tokens but not their prompt, so they too go through ``steer`` and its checks.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping, Protocol, Sequence, runtime_checkable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from dpn_lens.hooked import HOOK_NAME, HookedModel, hook_name, require_hooked_model
from dpn_lens.localization.neuron_map import NeuronMap

__all__ = ["Edit", "Intervention", "RowEdits", "MaskedEdit", "Maskable", "NeuronAblation", "steering_intervention", "additive_intervention", "combine_interventions",
           "steer",
           "apply_intervention", "InterventionHandle", "dpn_weights", "direction_sign", "check_positions",
           "check_gamma", "check_strength", "warn_gamma", "GAMMA_WARN"]

Positions = Literal["decode", "all"]
Direction = Literal["increase", "decrease"]


@runtime_checkable
class Edit(Protocol):
    """What ``steer`` applies: any model edit made of forward hooks.

    Attributes:
        label: human-readable description (used in tables and warnings).
        positions: ``"decode"`` (only forward passes over one new token, the prompt pass untouched)
            or ``"all"`` (every position of every forward pass).
        n_edited: number of MLP neurons it changes (0 for a residual-stream edit).

    ``at_positions(p)`` is a copy acting at ``p``; ``-edit`` is the edit of the opposite direction;
    ``gamma * edit`` (or ``edit * gamma``) scales its strength.

    Example:
        >>> isinstance(Intervention({0: torch.ones(4)}), Edit)
        True
    """

    label: str
    positions: str

    @property
    def n_edited(self) -> int: ...

    def fwd_hooks(self) -> list[tuple[str, Any]]: ...

    def at_positions(self, positions: Positions) -> "Edit": ...

    def __neg__(self) -> "Edit": ...

    def __mul__(self, gamma: float) -> "Edit": ...

    def __rmul__(self, gamma: float) -> "Edit": ...


Mask = Callable[[], Bool[Tensor, "batch pos"]] | Bool[Tensor, "batch pos"]


class Maskable:
    """Mixin of every edit class: ``edit.masked(mask)`` is the edit only where ``mask`` is True."""

    def masked(self, mask: Mask, label: str = "") -> "MaskedEdit":
        """This edit at every position where ``mask`` (a ``[batch, pos]`` bool tensor, or a function
        returning the current one) is True, and nowhere else; apply it with ``steer``."""
        return MaskedEdit(self, mask, label)   # type: ignore[arg-type]


@dataclass
class MaskedEdit(Maskable):
    """``edit`` only at the positions a mask marks: each hooked activation becomes
    ``where(mask, fn(activation), activation)``, ``fn`` being ``edit``'s own hook at every position.

    The edit's code decides what it does (an additive MLP delta, NPTI's boost and clamp, a residual
    vector, a frozen-norm write), the mask decides where. ``mask`` is a ``[batch, pos]`` bool tensor
    or a function returning one, called at every hook, so one application serves several batches of
    different shapes (log-prob scoring sets it per batch). ``fn`` gets a copy of the activation, so an
    in-place edit cannot leak to the masked-out positions. Its fingerprint, neuron count and map size
    are ``edit``'s, so ``steer`` checks it as it checks ``edit``; ``-masked`` and ``gamma * masked``
    keep the mask.

    Example:
        >>> delta = torch.zeros(4); delta[1] = 1.0
        >>> mask = torch.tensor([[False, True, True]])
        >>> edit = Intervention({0: delta}).masked(mask)
        >>> edit.positions, edit.n_edited
        ('all', 1)
        >>> name, hook = edit.fwd_hooks()[0]
        >>> hook(torch.zeros(1, 3, 4), None)[0, :, 1].tolist()
        [0.0, 1.0, 1.0]
    """

    edit: Edit
    mask: Mask
    label: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.edit, Edit):
            raise TypeError(f"masked() wraps an edit (Intervention, NPTI, CAA, ...), got {type(self.edit).__name__}")
        if not callable(self.mask) and not (isinstance(self.mask, Tensor) and self.mask.dtype == torch.bool
                                            and self.mask.dim() == 2):
            raise TypeError("the mask must be a [batch, pos] bool tensor or a function returning one")
        self.label = self.label or f"{self.edit.label or type(self.edit).__name__} (masked)"

    positions: Positions = field(default="all", init=False)

    @property
    def n_edited(self) -> int:
        return self.edit.n_edited

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return getattr(self.edit, "fingerprint", None)

    @property
    def map_neurons(self) -> int | None:
        return getattr(self.edit, "map_neurons", None)

    def innermost(self) -> Edit:
        """The edit under every mask (what ``steer`` guards against applying twice)."""
        return self.edit.innermost() if isinstance(self.edit, MaskedEdit) else self.edit

    def current_mask(self) -> Tensor:
        return self.mask() if callable(self.mask) else self.mask

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        def wrap(fn: Callable) -> Callable:
            def hook(activation: Tensor, hook: Any) -> Tensor:
                edited = fn(activation.clone(), hook)
                if edited is None:  # a hook that only reads leaves the activation as it is
                    return activation
                where = self.current_mask().to(activation.device)
                where = where.reshape(*where.shape, *([1] * (activation.dim() - where.dim())))
                return torch.where(where, edited, activation)
            return hook

        # At every position first; the mask then restricts it.
        return [(name, wrap(fn)) for name, fn in self.edit.at_positions("all").fwd_hooks()]

    def at_positions(self, positions: Positions) -> "MaskedEdit":
        """Itself for ``"all"``: where it acts is its mask's to say."""
        check_positions(positions)
        if positions != "all":
            raise ValueError("a masked edit acts where its mask is True; mask the decode-only edit instead")
        return self

    def __neg__(self) -> "MaskedEdit":
        return MaskedEdit(-self.edit, self.mask)

    def __mul__(self, gamma: float) -> "MaskedEdit":
        return MaskedEdit(gamma * self.edit, self.mask)   # type: ignore[operator]

    __rmul__ = __mul__


def direction_sign(direction: str) -> float:
    """``+1.0`` for ``"increase"`` (towards the high pole), ``-1.0`` for ``"decrease"``; else a ValueError.

    Example:
        >>> direction_sign("decrease")
        -1.0
    """
    if direction not in ("increase", "decrease"):
        raise ValueError(f"direction must be 'increase' or 'decrease', got {direction!r}")
    return 1.0 if direction == "increase" else -1.0


def check_positions(positions: str) -> None:
    """Raise a ValueError unless ``positions`` is ``"decode"`` or ``"all"``."""
    if positions not in ("decode", "all"):
        raise ValueError(f"positions must be 'decode' or 'all', got {positions!r}")


GAMMA_WARN = 256.0
"""|gamma| above which ``steering_intervention`` warns (a likely typo such as 1e6). The paper uses 1.0 on
8B models, but the strength an edit needs depends on the model and map: on the embedded 135M-270M
models DPN-LE reaches a KL of 0.05 nats/token around gamma 5-10, and the ``attribution-t`` rule's
neurons (small mean differences) around gamma 15-60 (``calibrate_gamma`` measures it); the
calibration grid goes to 128."""


def warn_gamma(gamma: float) -> None:
    """Warn when ``|gamma|`` exceeds ``GAMMA_WARN`` (a likely typo such as 1e6, not an error)."""
    if abs(gamma) > GAMMA_WARN:
        warnings.warn(f"gamma={gamma:g} is far outside the usual range |gamma| <= {GAMMA_WARN:g} (the paper uses 1.0 "
                      "on 8B models); measure what a gamma does on this model with calibrate_gamma or `dpn-lens control`",
                      UserWarning, stacklevel=3)


def check_gamma(gamma: Any) -> float:
    """``gamma`` as a float: Python, numpy and 0-d torch numbers are accepted; booleans, strings, arrays,
    NaN and infinity are a ValueError (``dpn_lens.numbers.as_float``)."""
    from dpn_lens.numbers import as_float

    return as_float(gamma, "gamma")


def check_strength(gamma: Any, direction: str) -> float:
    """``gamma`` for an edit with a ``direction``: a strength, never negative.

    The direction gives the sign; a negative gamma would silently reverse it, so it is refused with the
    call that does what was meant.

    Example:
        >>> check_strength(2, "increase")
        2.0
        >>> check_strength(-2.0, "increase")
        Traceback (most recent call last):
        ...
        ValueError: gamma=-2 with direction='increase' would decrease the trait; gamma is a strength (>= 0) and the direction gives the sign: pass gamma=2, direction='decrease'
    """
    value = check_gamma(gamma)
    direction_sign(direction)
    if value < 0:
        other = "decrease" if direction == "increase" else "increase"
        raise ValueError(f"gamma={value:g} with direction={direction!r} would {other} the trait; gamma is a strength "
                         f"(>= 0) and the direction gives the sign: pass gamma={-value:g}, direction={other!r}")
    return value


@dataclass
class Intervention(Maskable):
    """Additive edits of MLP neurons: ``deltas[layer]`` is added to ``blocks.{layer}.mlp.hook_post``.

    Attributes:
        deltas: ``{layer: [d_mlp] float32}``, zero except on edited neurons (gamma already applied).
        positions: ``"decode"`` adds the delta only at decode steps of KV-cached generation (forward
            passes over a single new token), leaving the prompt pass untouched, as in the paper;
            ``"all"`` adds it at every position of every forward pass.
        label: human-readable description; ``neurons_by_source`` remembers which trait each edited
            neuron came from (for overlap warnings when combining).
        fingerprint: the model fingerprint of the map the edit was built from (``steer`` checks it
            against the model by default); ``None`` when unknown (a hand-made edit).
        map_neurons: how many neurons the source map selected for this edit (``steer`` refuses 0: an
            empty map would change nothing); ``None`` when not built from a map.

    Example:
        >>> delta = torch.zeros(8); delta[3] = 0.5
        >>> Intervention({0: delta}).n_edited
        1
    """

    deltas: dict[int, Float[Tensor, "d_mlp"]]
    positions: Positions = "decode"
    hook_template: str = HOOK_NAME
    label: str = ""
    neurons_by_source: dict[str, set[tuple[int, int]]] = field(default_factory=dict, repr=False)
    fingerprint: dict[str, Any] | None = field(default=None, repr=False)
    map_neurons: int | None = None

    def __post_init__(self) -> None:
        check_positions(self.positions)
        for layer, delta in self.deltas.items():
            if not torch.isfinite(delta).all():
                raise ValueError(f"the delta of layer {layer} holds NaN or Inf; check gamma and the neuron map")
        self._cast: dict[tuple[int, Any, Any], Tensor] = {}

    @property
    def n_edited(self) -> int:
        return sum(int((delta != 0).sum()) for delta in self.deltas.values())

    def edited_neurons(self) -> dict[int, Tensor]:
        """``{layer: indices}`` of neurons with a nonzero delta."""
        return {layer: torch.nonzero(delta).flatten() for layer, delta in self.deltas.items()}

    def _delta_like(self, layer: int, activation: Tensor) -> Tensor:
        # Cast once per device/dtype: with multi-GPU placement each layer lives on its own device.
        key = (layer, activation.device, activation.dtype)
        if key not in self._cast:
            self._cast[key] = self.deltas[layer].to(activation.device, activation.dtype)
        return self._cast[key]

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        """``[(hook name, hook fn)]`` for ``model.hooks`` / ``run_with_hooks``."""
        def make_hook(layer: int):
            def hook(activation: Tensor, hook: Any) -> Tensor:
                if self.positions == "decode" and activation.shape[1] != 1:
                    return activation
                return activation + self._delta_like(layer, activation)
            return hook

        return [(hook_name(layer, self.hook_template), make_hook(layer)) for layer in sorted(self.deltas)]

    def __add__(self, other: "Intervention") -> "Intervention":
        return combine_interventions(self, other)

    def at_positions(self, positions: Positions) -> "Intervention":
        """The same deltas acting at ``positions`` (``"decode"`` or ``"all"``)."""
        if positions == self.positions:
            return self
        return self._with(self.deltas, positions, self.label)

    def __neg__(self) -> "Intervention":
        """The opposite edit, ``-delta``: for ``mode="both"`` exactly the ``direction="decrease"`` edit."""
        return self._with({layer: -delta for layer, delta in self.deltas.items()}, self.positions,
                          f"-({self.label or 'custom'})")

    def __mul__(self, gamma: float) -> "Intervention":
        """Every delta scaled by ``gamma`` (``0.5 * edit`` is the edit at half strength)."""
        gamma = check_gamma(gamma)
        return self._with({layer: gamma * delta for layer, delta in self.deltas.items()}, self.positions,
                          f"{gamma:g} x ({self.label or 'custom'})")

    __rmul__ = __mul__

    def _with(self, deltas: dict[int, Tensor], positions: Positions, label: str) -> "Intervention":
        return Intervention(deltas, positions, self.hook_template, label,
                            {source: set(neurons) for source, neurons in self.neurons_by_source.items()},
                            self.fingerprint, self.map_neurons)

    def __repr__(self) -> str:
        layers = sorted(self.deltas)
        span = f"{layers[0]}-{layers[-1]}" if layers else "none"
        return f"Intervention({self.label or 'custom'}, neurons={self.n_edited}, layers={span}, positions={self.positions!r})"


@dataclass
class RowEdits(Maskable):
    """One additive neuron edit per batch row: row ``r`` of every forward pass gets ``edits[r]`` (None: unedited).

    For running several conditions side by side in one batched pass, e.g. the unsteered answer and the
    answers under four edits to the same question in one batched generation (the demo). Every forward
    pass the model makes while it is applied must have exactly ``len(edits)`` rows (a pass with another
    batch size raises). Like any edit it is applied with ``steer``, which checks each contained edit.

    Example:
        >>> delta = torch.zeros(4); delta[1] = 2.0
        >>> rows = RowEdits([None, Intervention({0: delta}), -Intervention({0: delta})])
        >>> rows.n_edited, len(rows.edits)
        (1, 3)
    """

    edits: list[Intervention | None]
    label: str = "one edit per row"

    def __post_init__(self) -> None:
        real = [edit for edit in self.edits if edit is not None]
        if not real:
            raise ValueError("RowEdits needs at least one Intervention (None rows are unedited)")
        if any(not isinstance(edit, Intervention) for edit in real):
            raise TypeError("RowEdits holds additive neuron edits (Intervention) or None, one per row")
        positions = {edit.positions for edit in real}
        templates = {edit.hook_template for edit in real}
        if len(positions) > 1 or len(templates) > 1:
            raise ValueError(f"the rows' edits must act at the same positions and hook, got {positions} and {templates}")
        self.positions = positions.pop()
        self.hook_template = templates.pop()
        fingerprints = [edit.fingerprint for edit in real if edit.fingerprint]
        # steer() checks the fingerprint; rows from maps of different models cannot share one.
        self.fingerprint = fingerprints[0] if fingerprints and all(f == fingerprints[0] for f in fingerprints) else None
        if fingerprints and self.fingerprint is None:
            raise ValueError("the rows' edits come from maps of different models")
        counts = [edit.map_neurons for edit in real]
        self.map_neurons = 0 if 0 in counts else None

    @property
    def n_edited(self) -> int:
        return len({(layer, int(i)) for edit in self.edits if edit is not None
                    for layer, indices in edit.edited_neurons().items() for i in indices})

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        layers = sorted({layer for edit in self.edits if edit is not None for layer in edit.deltas})
        width = next(edit for edit in self.edits if edit is not None)
        d_mlp = int(next(iter(width.deltas.values())).numel())
        stacked = {layer: torch.stack([edit.deltas[layer] if edit is not None and layer in edit.deltas
                                       else torch.zeros(d_mlp) for edit in self.edits]) for layer in layers}

        def make_hook(layer: int):
            def hook(activation: Tensor, hook: Any) -> Tensor:
                if self.positions == "decode" and activation.shape[1] != 1:
                    return activation
                if activation.shape[0] != len(self.edits):
                    raise ValueError(f"RowEdits holds {len(self.edits)} rows but the forward pass has "
                                     f"{activation.shape[0]}; run exactly one row per edit")
                return activation + stacked[layer].to(activation.device, activation.dtype)[:, None, :]
            return hook

        return [(hook_name(layer, self.hook_template), make_hook(layer)) for layer in layers]

    def _each(self, change: Any) -> "RowEdits":
        return RowEdits([None if edit is None else change(edit) for edit in self.edits], self.label)

    def at_positions(self, positions: Positions) -> "RowEdits":
        return self._each(lambda edit: edit.at_positions(positions))

    def __neg__(self) -> "RowEdits":
        return self._each(lambda edit: -edit)

    def __mul__(self, gamma: float) -> "RowEdits":
        return self._each(lambda edit: gamma * edit)

    __rmul__ = __mul__


@dataclass
class NeuronAblation(Maskable):
    """Zero some MLP neurons: ``neurons[layer]`` (indices) are set to 0 at ``hook_post``.

    The ablation of the multifunctionality study (what it costs the LM loss to silence a set). It has
    no opposite and no strength, so ``-ablation`` and ``gamma * ablation`` raise.

    Example:
        >>> ablation = NeuronAblation({0: torch.tensor([1, 3])})
        >>> name, hook = ablation.fwd_hooks()[0]
        >>> name, hook(torch.ones(1, 2, 4), None)[0, 0].tolist(), ablation.n_edited
        ('blocks.0.mlp.hook_post', [1.0, 0.0, 1.0, 0.0], 2)
    """

    neurons: dict[int, Tensor]
    positions: Positions = "all"
    hook_template: str = HOOK_NAME
    label: str = "ablation"

    def __post_init__(self) -> None:
        check_positions(self.positions)
        self.neurons = {layer: torch.as_tensor(indices, dtype=torch.long).flatten()
                        for layer, indices in self.neurons.items() if len(indices)}

    @property
    def n_edited(self) -> int:
        return sum(int(indices.numel()) for indices in self.neurons.values())

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        def make_hook(indices: Tensor):
            def hook(activation: Tensor, hook: Any) -> Tensor:
                if self.positions == "decode" and activation.shape[1] != 1:
                    return activation
                activation = activation.clone()
                activation[..., indices.to(activation.device)] = 0
                return activation
            return hook

        return [(hook_name(layer, self.hook_template), make_hook(indices)) for layer, indices in sorted(self.neurons.items())]

    def at_positions(self, positions: Positions) -> "NeuronAblation":
        check_positions(positions)
        return self if positions == self.positions else NeuronAblation(self.neurons, positions, self.hook_template, self.label)

    def __neg__(self) -> "NeuronAblation":
        raise TypeError("an ablation has no opposite direction")

    def __mul__(self, gamma: float) -> "NeuronAblation":
        raise TypeError("an ablation has no strength to scale")

    __rmul__ = __mul__


def dpn_weights(abs_d: Float[Tensor, "n"]) -> Float[Tensor, "n"]:
    """DPN-LE_w weights ``0.75 + 0.25 * rank(|d|) / (n - 1)``, ranks ascending from 0.

    Example:
        >>> dpn_weights(torch.tensor([0.9, 0.3, 2.0])).tolist()
        [0.875, 0.75, 1.0]
    """
    n = abs_d.numel()
    if n <= 1:
        return torch.ones(n, dtype=torch.float32)
    ranks = torch.empty(n, dtype=torch.float32)
    ranks[torch.argsort(abs_d, stable=True)] = torch.arange(n, dtype=torch.float32)
    return 0.75 + 0.25 * ranks / (n - 1)


def steering_intervention(neuron_map: NeuronMap, gamma: float = 1.0,
                          direction: Literal["increase", "decrease"] = "increase",
                          mode: Literal["both", "directional"] = "both", weighted: bool = False,
                          positions: Positions = "decode", scale: Literal["s", "spread"] = "s") -> Intervention:
    """The DPN-LE edit of a trait.

    Args:
        neuron_map: result of ``locate``.
        gamma: strength (the paper uses 1.0 for generation, 0.8 for capability runs, sweeps [0, 2]).
        direction: ``"increase"`` adds ``+s`` (towards the high pole), ``"decrease"`` adds ``-s``.
        mode: ``"both"`` edits the union of the two pole sets; ``"directional"`` edits the high set
            to increase the trait and the low set to decrease it.
        weighted: DPN-LE_w, scaling each neuron's delta by ``dpn_weights`` of its |d|, ranked among the
            edited neurons of its own layer (as the reference does).
        positions: ``"decode"`` (default, prompt pass untouched) or ``"all"``.
        scale: ``"s"`` (the paper: ``delta_i = ±gamma * s_i``) or ``"spread"`` (``DPN-LE_sd``, a variant:
            ``delta_i = ±gamma * sign(s_i) * sigma_i`` with ``sigma_i = |s_i / d_i|`` the neuron's pooled
            standard deviation, so every edited neuron moves by the same number of its own standard
            deviations instead of by its mean difference).

    Example:
        >>> edit = steering_intervention(neuron_map, gamma=1.0, direction="decrease")   # doctest: +SKIP
        >>> with steer(model, edit):                                                    # doctest: +SKIP
        ...     model.generate(prompt, max_new_tokens=40, do_sample=False)
    """
    gamma = check_strength(gamma, direction)
    warn_gamma(gamma)
    if mode not in ("both", "directional"):
        raise ValueError(f"mode must be 'both' or 'directional', got {mode!r}")
    if scale not in ("s", "spread"):
        raise ValueError(f"scale must be 's' or 'spread', got {scale!r}")
    if mode == "both":
        sets = {layer: torch.cat([neuron_map.high[layer], neuron_map.low[layer]]) for layer in neuron_map.layers}
    else:
        sets = neuron_map.high if direction == "increase" else neuron_map.low
    selected = {layer: indices for layer, indices in sets.items() if indices.numel()}
    weights = None
    if (weighted or scale == "spread") and selected:
        weights = {}
        for layer, indices in selected.items():
            abs_d = neuron_map.values_at(layer, indices)[1].abs()
            layer_weights = torch.ones_like(abs_d, dtype=torch.float32)
            if weighted:
                # Ranked within the layer, as the reference's weights helper (called once per layer) does.
                layer_weights = layer_weights * dpn_weights(abs_d)
            if scale == "spread":
                # s_i / |d_i| = sign(s_i) * sigma_i; selected neurons have |d| > tau_d > 0.
                layer_weights = layer_weights / abs_d.to(torch.float32)
            weights[layer] = layer_weights
    variant = ("_w" if weighted else "") + ("_sd" if scale == "spread" else "")
    # The same edit whatever chose the neurons; the label says which rule did (dpn_lens.effect.rules).
    name = "DPN-LE" if neuron_map.rule == "dpn-le" else f"{neuron_map.rule} neurons:"
    label = f"{name}{variant} {neuron_map.trait} {direction} gamma={gamma:g} ({mode})"
    edit = additive_intervention(neuron_map.steering_value, neuron_map.stat_layers, selected, gamma, direction,
                                 weights=weights, positions=positions, hook_template=neuron_map.hook_name,
                                 label=label, source=neuron_map.trait)
    # Remember where the edit came from, so `steer` can refuse it on another model or for an empty map.
    edit.fingerprint = dict(neuron_map.fingerprint) or None
    edit.map_neurons = sum(int(indices.numel()) for indices in selected.values())
    return edit


def additive_intervention(steering_value: Float[Tensor, "n_stat_layers d_mlp"], stat_layers: Sequence[int],
                          neurons: Mapping[int, Tensor], gamma: float = 1.0, direction: Direction = "increase",
                          weights: Mapping[int, Tensor] | None = None, positions: Positions = "decode",
                          hook_template: str = HOOK_NAME, label: str = "", source: str | None = None
                          ) -> Intervention:
    """THE builder of a sparse ``±gamma * s`` neuron edit: ``delta[layer][i] = ±gamma * s[layer, i] (* w_i)``.

    DPN-LE (``steering_intervention``), the dense and top-|d| baselines and the edit cost of the
    multifunction study all build their deltas here, so they differ only in which neurons they pass.

    Args:
        steering_value: ``s`` per collected layer, ``[len(stat_layers), d_mlp]``.
        stat_layers: the model layers of the rows of ``steering_value``.
        neurons: ``{layer: neuron indices}``; every listed layer gets a delta (all zero for no indices).
        gamma: strength; direction: ``"increase"`` (``+s``) or ``"decrease"`` (``-s``).
        weights: optional ``{layer: [len(indices)] weights}`` (DPN-LE_w), aligned with ``neurons``.
        positions, hook_template, label: passed to the ``Intervention``.
        source: the trait the neurons come from (recorded for overlap warnings when combining).

    Example:
        >>> s = torch.tensor([[0.5, -2.0, 1.0]])
        >>> additive_intervention(s, [4], {4: torch.tensor([1])}, gamma=0.5).deltas[4].tolist()
        [0.0, -1.0, 0.0]
    """
    gamma = check_strength(gamma, direction)
    sign = direction_sign(direction)
    stat_layers = list(stat_layers)
    missing = [layer for layer in neurons if layer not in stat_layers]
    if missing:
        raise ValueError(f"layers {missing} have no steering values (they cover {stat_layers})")
    d_mlp = int(steering_value.shape[1])
    deltas: dict[int, Tensor] = {}
    for layer, indices in neurons.items():
        delta = torch.zeros(d_mlp, dtype=torch.float32)
        scale = sign * gamma * steering_value[stat_layers.index(layer), indices].to(torch.float32)
        if weights is not None:
            scale = scale * weights[layer]
        delta[indices] = scale
        deltas[layer] = delta
    sources = {} if source is None else {source: {(layer, int(i)) for layer, indices in neurons.items()
                                                  for i in indices}}
    return Intervention(deltas, positions, hook_template, label, sources)


def combine_interventions(*interventions: Intervention) -> Intervention:
    """Sum several interventions (e.g. several traits); warns naming the neurons they share.

    Example:
        >>> both = combine_interventions(openness_edit, extraversion_edit)   # doctest: +SKIP
    """
    if not interventions:
        raise ValueError("combine_interventions needs at least one intervention")
    positions = {i.positions for i in interventions}
    templates = {i.hook_template for i in interventions}
    if len(positions) > 1 or len(templates) > 1:
        raise ValueError(f"cannot combine interventions with different positions {positions} or hooks {templates}")
    deltas: dict[int, Tensor] = {}
    sources: dict[str, set[tuple[int, int]]] = {}
    for intervention in interventions:
        for layer, delta in intervention.deltas.items():
            deltas[layer] = deltas[layer] + delta if layer in deltas else delta.clone()
        for source, neurons in intervention.neurons_by_source.items():
            sources.setdefault(source, set()).update(neurons)
    names = sorted(sources)
    for a_index, a in enumerate(names):
        for b in names[a_index + 1:]:
            shared = sorted(sources[a] & sources[b])
            if shared:
                listed = ", ".join(f"L{layer}.N{neuron}" for layer, neuron in shared[:10])
                warnings.warn(f"{a} and {b} edit {len(shared)} shared neuron(s) ({listed}"
                              f"{', ...' if len(shared) > 10 else ''}); their deltas add up there", stacklevel=2)
    fingerprints = [i.fingerprint for i in interventions if i.fingerprint]
    counts = [i.map_neurons for i in interventions]
    return Intervention(deltas, positions.pop(), templates.pop(),
                        " + ".join(i.label or "custom" for i in interventions), sources,
                        fingerprints[0] if fingerprints and all(f == fingerprints[0] for f in fingerprints) else None,
                        None if None in counts else sum(counts))


class InterventionHandle:
    """Returned by ``apply_intervention``; ``remove()`` detaches the hooks (idempotent)."""

    def __init__(self, model: Any, edits: tuple[Edit, ...], context: contextlib.AbstractContextManager):
        self.model, self.edits, self._context = model, edits, context

    @property
    def intervention(self) -> Edit | None:
        """The applied edit (several additive ones combined into one; ``None`` when nothing was applied)."""
        if len(self.edits) <= 1:
            return self.edits[0] if self.edits else None
        if all(isinstance(edit, Intervention) for edit in self.edits):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # already warned about shared neurons when applied
                return combine_interventions(*self.edits)  # type: ignore[arg-type]
        raise TypeError("several kinds of edit are applied; see handle.edits")

    @property
    def active(self) -> bool:
        return self._context is not None

    def remove(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)

    def __enter__(self) -> "InterventionHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _active_set(model: Any) -> dict[int, Edit]:
    """The edits currently applied to ``model`` (by id), kept on the model object itself."""
    active = model.__dict__.get("_dpn_active_interventions")
    if active is None:
        active = {}
        model.__dict__["_dpn_active_interventions"] = active
    return active


def _shared_neurons(a: Intervention, b: Intervention) -> list[tuple[int, int]]:
    """``(layer, neuron)`` pairs that both interventions edit."""
    shared = []
    for layer in sorted(set(a.deltas) & set(b.deltas)):
        both = (a.deltas[layer] != 0) & (b.deltas[layer].to(a.deltas[layer].device) != 0)
        shared += [(layer, int(i)) for i in torch.nonzero(both).flatten()]
    return shared


def _warn_overlaps(interventions: Sequence[Intervention], active: dict[int, Edit]) -> None:
    # A second intervention built from the same map (e.g. a notebook cell run twice) is a different
    # object, so the identity check in `steer` cannot refuse it; say loudly that deltas now add up.
    earlier = [edit for edit in active.values() if isinstance(edit, Intervention)]
    for intervention in interventions:
        for other in earlier:
            shared = _shared_neurons(other, intervention)
            if shared:
                listed = ", ".join(f"L{layer}.N{neuron}" for layer, neuron in shared[:10])
                warnings.warn(
                    f"{intervention.label or 'this intervention'} edits {len(shared)} neuron(s) that "
                    f"{other.label or 'another active intervention'} already edits ({listed}"
                    f"{', ...' if len(shared) > 10 else ''}); their deltas add up there. If you applied the same "
                    "map twice (e.g. re-ran a cell), remove the first application (handle.remove()) first",
                    RuntimeWarning, stacklevel=4)
        earlier.append(intervention)


def _check_fits(model: Any, intervention: Intervention) -> None:
    n_layers = int(model.cfg.n_layers)
    bad = [layer for layer in intervention.deltas if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"intervention edits layers {bad}, but the model has layers 0..{n_layers - 1}")
    d_mlp = int(model.cfg.d_mlp)
    wrong = [layer for layer, delta in intervention.deltas.items() if delta.numel() != d_mlp]
    if wrong:
        raise ValueError(f"intervention deltas are {intervention.deltas[wrong[0]].numel()} wide but the model's "
                         f"d_mlp is {d_mlp}: the neuron map comes from another model")


def _check_fingerprints(model: Any, edits: Sequence[Edit]) -> None:
    """Refuse edits whose map was located on another model (the default check of ``steer``)."""
    from dpn_lens.models import ModelFingerprint, model_fingerprint
    from dpn_lens.errors import IncompatibleModelError

    known = [edit for edit in edits if isinstance(getattr(edit, "fingerprint", None), dict) and edit.fingerprint]
    if not known:
        return
    theirs = model_fingerprint(model)
    for edit in known:
        try:
            mine = ModelFingerprint.from_dict(edit.fingerprint)
        except KeyError:  # an incomplete fingerprint (hand-made map): nothing reliable to compare
            continue
        differences = mine.differences(theirs)
        if differences:
            raise IncompatibleModelError(
                f"{edit.label or 'this edit'} comes from a neuron map located on a different model "
                f"({'; '.join(differences)}); locate the trait on this model, or pass check=False to apply it anyway")


def _watch_decode(edits: Sequence[Edit]) -> tuple[list[tuple[str, Any]], dict[str, int]]:
    """The edits' hooks, wrapped to count whether a decode-only edit ever met a decode step."""
    seen = {"calls": 0, "decode": 0}
    hooks = []
    for edit in edits:
        for name, fn in edit.fwd_hooks():
            if getattr(edit, "positions", None) != "decode":
                hooks.append((name, fn))
                continue

            def watched(activation: Tensor, hook: Any, fn: Any = fn) -> Tensor:
                seen["calls"] += 1
                if activation.dim() >= 2 and activation.shape[1] == 1:
                    seen["decode"] += 1
                return fn(activation, hook)
            hooks.append((name, watched))
    return hooks, seen


@contextlib.contextmanager
def steer(model: HookedModel, *edits: Edit | None, check: NeuronMap | bool | None = None) -> Iterator[Any]:
    """Context manager: the model runs with the edits; hooks are removed on exit, always.

    Any ``Edit`` works: a DPN-LE ``Intervention``, an ``NPTIIntervention``, a CAA
    ``ResidualIntervention``. A ``None`` argument means "no edit" and is skipped, so
    ``steer(model, None)`` runs the model unchanged (handy for an unsteered baseline in a loop).
    Applying an edit that is already active on the model raises instead of silently doubling it;
    applying another intervention that edits some of the same neurons (e.g. one built again from the
    same map) warns, naming those neurons.

    Safety checks, none of them silent:

    * ``check=None`` (default): every edit built from a neuron map carries the map's model
      fingerprint and is refused (``IncompatibleModelError``) on a different model;
      ``check=neuron_map`` also checks that map; ``check=False`` skips the check.
    * An edit built from a map that selects no neurons is refused (it would change nothing).
    * A decode-only edit (``positions="decode"``) that never met a decode step while the context was
      open (a plain ``model(...)``, ``run_with_hooks``, ``generate(..., use_past_kv_cache=False)``)
      warns once on exit, naming ``positions="all"``.

    Example:
        >>> with steer(model, steering_intervention(neuron_map, gamma=1.0)):   # doctest: +SKIP
        ...     text = model.generate(prompt, max_new_tokens=40, do_sample=False)
        >>> with steer(model, None):                                           # doctest: +SKIP
        ...     baseline = model.generate(prompt, max_new_tokens=40, do_sample=False)
    """
    require_hooked_model(model, "steer()")
    if isinstance(check, NeuronMap):
        check.check_compatible(model)
    if not edits:
        raise ValueError("steer() needs at least one Intervention (see steering_intervention), or None for no edit")
    for edit in edits:
        if edit is not None and not isinstance(edit, Edit):
            raise TypeError(f"steer() takes Intervention objects (or another Edit: NPTI, CAA), got "
                            f"{type(edit).__name__}; build one with steering_intervention(neuron_map, gamma=...)")
    chosen = [edit for edit in edits if edit is not None]
    for edit in chosen:
        if getattr(edit, "map_neurons", None) == 0:
            raise ValueError(f"{edit.label or 'this edit'}: its neuron map selects no neurons, so it would change "
                             "nothing; locate with more pairs or a lower tau_d (see the warning of locate), or "
                             "reselect(neuron_map, q=..., tau_d=...)")
    if check is not False:
        _check_fingerprints(model, chosen)
    active = _active_set(model)
    # A masked edit is its edit: masking an edit that is already applied would double it too.
    unmasked = [edit.innermost() if isinstance(edit, MaskedEdit) else edit for edit in chosen]
    ids = [id(edit) for edit in unmasked]
    if len(set(ids)) != len(ids) or any(i in active for i in ids):
        raise RuntimeError("this intervention is already applied to the model; applying it again would double "
                           "its delta. Remove the first application, or build a new intervention with a larger gamma")
    additive = [edit for edit in unmasked if isinstance(edit, Intervention)]
    rows = [row for edit in unmasked if isinstance(edit, RowEdits) for row in edit.edits if row is not None]
    for intervention in additive + rows:
        _check_fits(model, intervention)
    _warn_overlaps(additive, active)
    hooks, seen = _watch_decode(chosen)
    active.update(zip(ids, unmasked))
    try:
        with model.hooks(fwd_hooks=hooks):
            yield model
    finally:
        for i in ids:
            active.pop(i, None)
    if seen["calls"] and not seen["decode"]:
        labels = ", ".join(edit.label or type(edit).__name__ for edit in chosen if edit.positions == "decode")
        warnings.warn(f"the decode-only edit {labels} never fired: the model ran only full-sequence passes (model(...), "
                      "run_with_hooks, or generate without the KV cache), which decode-only edits leave untouched. "
                      "Use edit.at_positions(\"all\") (positions=\"all\") to edit every position",
                      RuntimeWarning, stacklevel=3)


def apply_intervention(model: HookedModel, *edits: Edit | None, check: NeuronMap | bool | None = None
                       ) -> InterventionHandle:
    """Attach edits until ``handle.remove()`` (for notebooks, where a ``with`` is awkward).

    Takes the same arguments as ``steer`` (any ``Edit``; ``None`` is skipped).

    Example:
        >>> handle = apply_intervention(model, edit)      # doctest: +SKIP
        >>> model.generate(prompt)                        # doctest: +SKIP
        >>> handle.remove()                               # doctest: +SKIP
    """
    context = steer(model, *edits, check=check)
    context.__enter__()
    return InterventionHandle(model, tuple(edit for edit in edits if edit is not None), context)
