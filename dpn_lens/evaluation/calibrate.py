"""Calibrated strength: the gamma at which an edit reaches a target cost (KL) or a target trait shift.

A fixed gamma means different things on different models and maps: gamma 1 barely moves SmolLM2 for
one trait and wrecks it for another. ``calibrate_gamma`` reads the gamma off a measured curve
instead: it evaluates the edit on a log grid of gammas and interpolates where the curve crosses the
target, returning the gamma together with the curve it read it from, so the choice can be checked.

Cost is ``KL(unsteered || steered)`` of next-token distributions on fixed text (512 tokens of the
package's everyday questions, ``probe_chunks``), with the edit at every position, averaged over
tokens (``KLProbe``); the same pass gives the perplexity of that text.

Example:
    >>> round(gamma_at([0.5, 1.0, 2.0, 4.0], [0.01, 0.04, 0.16, 0.64], 0.08), 6)   # KL = 0.04 gamma^2: sqrt(2)
    1.414214
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from dpn_lens.evaluation.logprobs import (batched_logits, continuation_logprobs, kl_from_reference, scoring_edit,
                                          token_logprobs)
from dpn_lens.hooked import HookedModel, encode
from dpn_lens.steering import Edit, MaskedEdit, steer

__all__ = ["GAMMA_GRID", "MAX_KL", "DEFAULT_TARGET_KL", "KLProbe", "gamma_at", "CurvePoint", "Calibration", "calibrate_gamma",
           "calibrate_directions", "probe_chunks", "sweep_edit", "PROBE_CHUNKS", "PROBE_CHUNK_TOKENS"]

GAMMA_GRID: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
"""The log grid of strengths the sweeps and the calibration evaluate (factor 2 from 0.25 to 128). It reaches
128 because the neurons the ``attribution-t`` rule selects have small mean differences ``s``: its edits
need gamma 15-60 for a KL of 0.05 on the embedded models (docs/RESULTS.md). Sweeps stop at the first
gamma whose KL exceeds ``MAX_KL``."""
MAX_KL = 2.0
"""KL (nats/token) past which a sweep stops: the model's capability is gone by then."""

DEFAULT_TARGET_KL = 0.05
"""Default calibration target, nats/token of KL(unsteered || steered) on the probe text."""


PROBE_CHUNKS = 4
PROBE_CHUNK_TOKENS = 128
"""The KL probe's default size: ``PROBE_CHUNKS`` chunks of ``PROBE_CHUNK_TOKENS`` tokens (``ControlConfig``'s
``kl_chunks`` and ``kl_tokens``; the plan sizes the probe's reference logits from them)."""


def probe_chunks(model: HookedModel, n_chunks: int = PROBE_CHUNKS, chunk_tokens: int = PROBE_CHUNK_TOKENS
                 ) -> list[list[int]]:
    """``n_chunks`` chunks of ``chunk_tokens`` tokens of the text KL is measured on.

    The text is the package's own everyday questions (``data/embedded/questions.jsonl``, joined in file
    order), so a calibration needs no data folder and gives the same gamma wherever it runs.
    """
    from dpn_lens.data.contrastive import embedded_questions

    if n_chunks < 1 or chunk_tokens < 2:
        raise ValueError(f"need n_chunks >= 1 and chunk_tokens >= 2, got {n_chunks} and {chunk_tokens}")
    text = "\n".join(embedded_questions())
    ids = encode(model, text, add_bos=False)
    if len(ids) < n_chunks * chunk_tokens:
        raise ValueError(f"the probe text has {len(ids)} tokens, fewer than the {n_chunks * chunk_tokens} asked for; "
                         "lower n_chunks or chunk_tokens")
    return [ids[i * chunk_tokens:(i + 1) * chunk_tokens] for i in range(n_chunks)]


class KLProbe:
    """KL from the unsteered model and perplexity on fixed text, one forward pass per edit.

    The unsteered log-probabilities are computed once (``[tokens, vocab]`` float32 per chunk: about
    100 MB for 512 tokens of a 49k vocabulary) and every edit is compared with them.

    Each chunk is read after a one-token context (the model's BOS). By default (``edit_context=False``)
    the edit acts on the chunk's own tokens only, as decode-only use edits the generated tokens and never
    the prompt's; ``edit_context=True`` edits the BOS token too, as every run before 2026-12-05 did. The
    difference matters where the edit is large at the BOS token: on Gemma 3 a neuron edit rewrites the
    BOS token's MLP output, whose scale there is 30x or more below other tokens', and the old probe
    charged it for that; on SmolLM2 the calibrated γ moves by about 1% (docs/RESULTS.md).

    Example:
        >>> probe = KLProbe(model, probe_chunks(model))                        # doctest: +SKIP
        >>> probe(steering_intervention(neuron_map, gamma=2.0))                # doctest: +SKIP
        (0.031, 21.7)
    """

    def __init__(self, model: HookedModel, chunks: Sequence[list[int]], edit_context: bool = False):
        if not chunks or any(len(chunk) < 2 for chunk in chunks):
            raise ValueError("KLProbe needs at least one chunk of 2 or more tokens")
        self.model, self.chunks, self.edit_context = model, [list(chunk) for chunk in chunks], bool(edit_context)
        self.context = encode(model, "")[:1] or [int(model.tokenizer.eos_token_id)]
        self.reference = [score.distributions for score in self._scores(None)]

    def _scores(self, edit: Edit | None) -> list[Any]:
        with steer(self.model, scoring_edit(edit)):
            return continuation_logprobs(self.model, [self.context] * len(self.chunks), self.chunks, full=True)

    def _edited(self, edit: Edit | None, where: dict[str, Tensor]) -> Any:
        """The model with ``edit`` at every position, or (``edit_context=False``) at the chunk's positions only
        (``where["mask"]``, set for each batch)."""
        if self.edit_context or edit is None:
            return steer(self.model, scoring_edit(edit))
        return steer(self.model, MaskedEdit(edit, lambda: where["mask"]))

    def __call__(self, edit: Edit | None) -> tuple[float, float]:
        """``(KL nats/token, perplexity)`` of the text under ``edit`` (at every position)."""
        sequences = [self.context + chunk for chunk in self.chunks]
        spans = [(len(self.context) - 1, len(sequence) - 1) for sequence in sequences]
        total, count, nll = 0.0, 0, []
        where: dict[str, Tensor] = {}

        def on_batch(rows: list[int]) -> None:
            # Every row starts with the context and is right-padded: one mask row fits the whole batch.
            mask = torch.ones((1, max(len(sequences[i]) for i in rows)), dtype=torch.bool)
            mask[:, :len(self.context)] = False
            where["mask"] = mask

        with self._edited(edit, where):
            # The KL is summed block by block from the logits, never holding a second float32 copy.
            for index, logits in batched_logits(self.model, sequences, 2048, on_batch, spans=spans):
                base = self.reference[index]
                total += kl_from_reference(base, logits)
                count += base.shape[0]
                nll.append(-token_logprobs(logits, torch.tensor(self.chunks[index])).double())
        # KL is >= 0; float rounding can leave a tiny negative for an edit that changes nothing.
        return max(total / count, 0.0), float(torch.exp(torch.cat(nll).mean()))


def sweep_edit(edit_at: Callable[[float], Edit], gamma: float) -> Edit:
    """``edit_at(gamma)`` without the large-gamma warning: a sweep goes past it on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"gamma=.* is far outside the usual range")
        return edit_at(gamma)


def gamma_at(gammas: Sequence[float], values: Sequence[float], target: float, log_values: bool = True) -> float:
    """The gamma where a curve measured at ``gammas`` first reaches ``target`` (NaN if it never does).

    Interpolates linearly in log gamma, and in log value when ``log_values`` (right for KL, which
    grows like a power of gamma). Points are taken in increasing gamma; the first segment that
    crosses the target is used, so a curve that rises and falls again gives its first crossing.

    Example:
        >>> gamma_at([1, 2, 4], [0.1, 0.2, 0.4], 0.2)
        2.0
        >>> math.isnan(gamma_at([1, 2], [0.1, 0.2], 0.5))
        True
    """
    order = np.argsort(np.asarray(gammas, dtype=np.float64))
    xs = np.log(np.asarray(gammas, dtype=np.float64)[order])
    ys = np.asarray(values, dtype=np.float64)[order]
    if xs.size == 0 or not np.all(np.isfinite(xs)):
        raise ValueError("gammas must be positive and finite (the curve is read on a log scale)")
    if log_values:
        if target <= 0:
            raise ValueError(f"a log-scale target must be positive, got {target}")
        ys = np.log(np.maximum(ys, 1e-12))
        target = math.log(target)
    for index in range(xs.size):
        if ys[index] == target:
            return float(np.exp(xs[index]))
        if index and (ys[index - 1] - target) * (ys[index] - target) < 0:
            fraction = (target - ys[index - 1]) / (ys[index] - ys[index - 1])
            return float(np.exp(xs[index - 1] + fraction * (xs[index] - xs[index - 1])))
    return math.nan


@dataclass(frozen=True)
class CurvePoint:
    """One strength of a calibration curve: KL, perplexity and (when pairs were given) the trait shift."""

    gamma: float
    kl: float
    ppl: float
    shift: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"gamma": self.gamma, "kl": self.kl, "ppl": self.ppl, "shift": self.shift}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CurvePoint":
        shift = data.get("shift")
        return cls(float(data["gamma"]), float(data["kl"]), float(data["ppl"]), None if shift is None else float(shift))


@dataclass(frozen=True)
class Calibration:
    """A calibrated gamma and the curve it was read from (JSON: ``to_dict``/``from_dict``).

    Attributes:
        gamma: the calibrated strength (the largest grid gamma below the target if it was never reached).
        target: ``"kl"`` or ``"shift"``; ``target_value`` its value.
        reached: whether the curve crossed the target (else ``gamma`` is the grid's best).
        points: the measured curve.

    Example:
        >>> c = Calibration(3.0, "kl", 0.05, True, (CurvePoint(2.0, 0.02, 23.0), CurvePoint(4.0, 0.09, 23.4)))
        >>> Calibration.from_dict(c.to_dict()) == c, c.describe()
        (True, 'gamma 3 (reaches KL 0.05 nats/token)')
    """

    gamma: float
    target: str
    target_value: float
    reached: bool
    points: tuple[CurvePoint, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "target": self.target, "target_value": self.target_value,
                "reached": self.reached, "points": [point.to_dict() for point in self.points]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        if not isinstance(data, dict) or not {"gamma", "target", "target_value", "reached"} <= set(data):
            raise ValueError(f"a calibration is a dict with gamma, target, target_value and reached; got {data!r:.80}")
        return cls(float(data["gamma"]), str(data["target"]), float(data["target_value"]), bool(data["reached"]),
                   tuple(CurvePoint.from_dict(point) for point in data.get("points") or ()))

    def describe(self) -> str:
        """One line: the gamma and what it was calibrated to."""
        what = f"KL {self.target_value:g} nats/token" if self.target == "kl" else f"trait shift {self.target_value:+g}"
        if self.reached:
            return f"gamma {self.gamma:.3g} (reaches {what})"
        return f"gamma {self.gamma:.3g} ({what} not reached on gammas {self.points[0].gamma:g}-{self.points[-1].gamma:g})"


def _kl_bracket(measure: Callable[[float], CurvePoint], grid: Sequence[float], target: float, max_kl: float,
                start: float = 1.0) -> list[CurvePoint]:
    """The grid points around the target KL, found in a few probes instead of a sweep from the smallest gamma.

    The first probe (at the grid point nearest ``start``, default 1) predicts where the target lies, taking KL to grow like
    gamma^2; later predictions use the log-log slope of the two latest probes. Each prediction jumps to
    the grid point at or below it, and the search ends when two neighbouring grid points bracket the
    target (or the grid ends, or KL passes ``max_kl``). On a KL curve that rises with gamma this finds the
    same bracket, and so the same interpolated gamma, as sweeping the grid from its smallest point.
    Below the grid it halves, at most 6 times.
    """
    measured: dict[float, CurvePoint] = {}
    order: list[CurvePoint] = []

    def at(gamma: float) -> CurvePoint:
        if gamma not in measured:
            measured[gamma] = measure(gamma)
            order.append(measured[gamma])
        return measured[gamma]

    def predicted_index(fallback: int) -> int:
        last = order[-1]
        slope = 2.0
        if len(order) > 1 and order[-2].kl > 0 and last.kl > 0 and order[-2].gamma != last.gamma:
            slope = math.log(last.kl / order[-2].kl) / math.log(last.gamma / order[-2].gamma)
        if last.kl <= 0 or slope <= 0.1:
            return fallback
        gamma = last.gamma * (target / last.kl) ** (1 / slope)
        return max([i for i in range(len(grid)) if grid[i] <= gamma] or [0])

    grid = list(grid)
    index = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / start)))
    for _ in range(2 * len(grid)):
        low = at(grid[index])
        if low.kl >= target:
            if index == 0:
                break
            index = min(index - 1, predicted_index(index - 1))
            continue
        if low.kl > max_kl or index + 1 == len(grid):
            break
        high = at(grid[index + 1])
        if high.kl >= target or high.kl > max_kl:
            break
        index = max(index + 1, predicted_index(index + 1))
    points = sorted(measured.values(), key=lambda p: p.gamma)
    # Already past the target at the grid's smallest gamma: halve until below it (at most 6 times).
    while points[0].kl > target and points[0].gamma == grid[0] * 2 ** -(len(points) - len(measured)) \
            and len(points) - len(measured) < 6:
        points.insert(0, measure(points[0].gamma / 2))
    return points


def calibrate_gamma(model: HookedModel, neuron_map: Any = None, target_kl: float | None = None,
                    target_shift: float | None = None, *, edit_at: Callable[[float], Edit] | None = None,
                    probe: KLProbe | None = None, pairs: Sequence[Any] | None = None,
                    direction: str = "increase", gammas: Sequence[float] = GAMMA_GRID,
                    max_kl: float = MAX_KL, start: float | None = None) -> Calibration:
    """The gamma at which the edit reaches ``target_kl`` (default 0.05) or ``target_shift``.

    Args:
        model: the hooked model.
        neuron_map: a DPN-LE ``NeuronMap``; the edit is ``steering_intervention(map, gamma, direction)``.
            Or pass ``edit_at`` (gamma -> edit) for any other edit.
        target_kl: KL(unsteered || steered) nats/token on neutral text to reach.
        target_shift: preference-margin shift (nats/token, signed by ``direction``) to reach instead;
            needs ``pairs`` (``PreferencePair`` list).
        probe: a ``KLProbe`` to reuse (default: ``KLProbe(model, probe_chunks(model))``).
        gammas: the grid. For a KL target a few grid points around it are measured (``_kl_bracket``); for
            a shift target the grid is evaluated from the smallest up. Either stops after the first point
            whose KL exceeds ``max_kl`` (capability is gone by then) or that passes the target.
        start: for a KL target, a guess of the gamma (e.g. the other direction's): the first probe is the
            grid point nearest it (None: the one nearest 1). It saves probes, not changes the result.

    Returns:
        a ``Calibration``; ``gamma`` is interpolated on the curve (log-log for KL, log gamma for shift).

    Example:
        >>> calibration = calibrate_gamma(model, neuron_map, target_kl=0.05)       # doctest: +SKIP
        >>> calibration.describe()                                                                  # doctest: +SKIP
        'gamma 3.1 (reaches KL 0.05 nats/token)'
    """
    from dpn_lens.steering import direction_sign, steering_intervention

    if (target_kl is None) == (target_shift is None):
        if target_shift is None:
            target_kl = DEFAULT_TARGET_KL
        else:
            raise ValueError("pass target_kl or target_shift, not both")
    from dpn_lens.numbers import as_float

    if target_kl is not None:
        target_kl = as_float(target_kl, "target_kl (nats/token)", "0.05")
        if target_kl <= 0:
            raise ValueError(f"target_kl must be positive (nats/token), got {target_kl}")
    if target_shift is not None:
        target_shift = as_float(target_shift, "target_shift (nats/token)", "0.02")
    max_kl = as_float(max_kl, "max_kl (nats/token)", "1.0")
    if start is not None:
        start = as_float(start, "start (a gamma guess)", "1.0")
    if target_shift is not None and not pairs:
        raise ValueError("target_shift needs pairs=... (PreferencePair list) to measure the shift on")
    if (neuron_map is None) == (edit_at is None):
        raise ValueError("pass a neuron_map or edit_at=(gamma -> edit), exactly one")
    grid = sorted(float(g) for g in gammas)
    if not grid or grid[0] <= 0:
        raise ValueError(f"gammas must be positive, got {list(gammas)}")
    sign = direction_sign(direction)
    if edit_at is None:
        def edit_at(gamma: float) -> Edit:
            return steering_intervention(neuron_map, gamma, direction)
    probe = probe or KLProbe(model, probe_chunks(model))
    from dpn_lens.evaluation.preference import PairScorer

    # The questions run once; each gamma runs only the answers.
    scorer = PairScorer(model, pairs) if target_shift is not None else None
    base = scorer.margins() if scorer is not None else None
    target_name = "kl" if target_kl is not None else "shift"
    target_value = float(target_kl if target_kl is not None else target_shift)

    def measure(gamma: float) -> CurvePoint:
        edit = sweep_edit(edit_at, gamma)
        kl, ppl = probe(edit)
        shift = None if scorer is None else float(sign * (scorer.margins(edit=edit) - base).mean())
        return CurvePoint(gamma, kl, ppl, shift)

    def value(point: CurvePoint) -> float:
        return point.kl if target_name == "kl" else float(point.shift)

    if target_name == "kl":
        points = _kl_bracket(measure, grid, target_value, max_kl, 1.0 if start is None else float(start))
    else:
        points = [measure(grid[0])]
        # Already past the target at the grid's smallest gamma: halve until below it (at most 6 times).
        while value(points[0]) > target_value and len(points) <= 6:
            points.insert(0, measure(points[0].gamma / 2))
        for gamma in grid[1:]:
            if value(points[-1]) >= target_value or points[-1].kl > max_kl:
                break
            points.append(measure(gamma))
    gamma = gamma_at([p.gamma for p in points], [value(p) for p in points], target_value,
                     log_values=target_name == "kl")
    reached = not math.isnan(gamma)
    if not reached:
        # Never reached: the largest gamma still below the target and within max_kl (else the smallest tried).
        below = [p for p in points if value(p) < target_value and p.kl <= max_kl]
        gamma = below[-1].gamma if below else points[0].gamma
    return Calibration(float(gamma), target_name, target_value, reached, tuple(points))


def calibrate_directions(model: HookedModel, target_kl: float = DEFAULT_TARGET_KL, *, neuron_map: Any = None,
                         edit_at: Callable[[str, float], Edit] | None = None, probe: KLProbe | None = None,
                         directions: Sequence[str] = ("increase", "decrease")) -> dict[str, Calibration]:
    """``{direction: Calibration}``: each direction's gamma at ``target_kl`` (``calibrate_gamma``).

    The one per-direction calibration of ``dpn-lens steer`` and the demo. The edit is a DPN-LE
    ``neuron_map``'s, or ``edit_at(direction, gamma)`` for any other. The two directions cost about
    the same KL, so the first's gamma is where the second's search starts (fewer probes, the same
    result).

    Example:
        >>> calibrations = calibrate_directions(model, 0.05, neuron_map=neuron_map)      # doctest: +SKIP
        >>> {direction: round(c.gamma, 2) for direction, c in calibrations.items()}     # doctest: +SKIP
        {'increase': 3.1, 'decrease': 2.9}
    """
    calibrations: dict[str, Calibration] = {}
    for direction in directions:
        at = None if edit_at is None else (lambda gamma, d=direction: edit_at(d, gamma))
        start = next(iter(calibrations.values())).gamma if calibrations else None
        calibrations[direction] = calibrate_gamma(model, neuron_map, target_kl=target_kl, edit_at=at, probe=probe,
                                                  direction=direction, start=start)
    return calibrations
