"""What a neuron reads: its top-activating contexts, streamed with a bounded top-k.

``scan`` runs token sequences through the model in batches, reads the watched neurons at
``blocks.{l}.mlp.hook_post`` (every position), and keeps, per neuron, only the ``k`` highest activations
seen so far with a window of tokens around each and the neuron's activation on every token of that window
(for per-token colouring). Memory is ``n_neurons x k x window``, whatever the corpus size: nothing per
token of the corpus is stored. It also returns each sequence's last-token activation (the paper's
readout), which the cards' histograms use.

``text_windows`` streams a text file (WikiText-2) as windows of tokens without reading the file at once.

Example:
    >>> from dpn_lens.tiny import build_tiny_model
    >>> model = build_tiny_model()
    >>> ids = [model.tokenizer("you are calm . hello world", add_special_tokens=False)["input_ids"]]
    >>> found = scan(model, [(1, 3), (2, 0)], ids, k=2, before=2, after=1)
    >>> found.contexts.values.shape, found.contexts.tokens.shape, found.last_token.shape
    (torch.Size([2, 2]), torch.Size([2, 2, 4]), torch.Size([2, 1]))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpn_lens.hooked import (forward_until_stopped, hook_name, input_device, pad_token_id, pad_token_lists, read_hooks,
                             require_fired, StopForward)

__all__ = ["TopContexts", "ScanResult", "scan", "text_windows", "Neuron"]

Neuron = tuple[int, int]
"""``(layer, index)`` of one MLP neuron."""

EMPTY_TOKEN = -1
"""Token id of a window slot outside its sequence."""


@dataclass
class TopContexts:
    """Per neuron, the ``k`` highest activations seen, with their context windows (module note).

    Attributes:
        neurons: the watched ``(layer, index)`` pairs; row ``r`` of every tensor is ``neurons[r]``.
        values: ``[n, k]`` activations, highest first; ``-inf`` marks an unused slot.
        where: ``[n, k, 2]`` (sequence number, position) of each activation; ``-1`` when unused.
        tokens: ``[n, k, before + 1 + after]`` token ids around it (``-1`` outside the sequence).
        activations: the neuron's activation on each of those tokens (NaN outside the sequence).
    """

    neurons: list[Neuron]
    before: int
    after: int
    values: Float[Tensor, "n k"]
    where: Int[Tensor, "n k 2"]
    tokens: Int[Tensor, "n k window"]
    activations: Float[Tensor, "n k window"]

    @classmethod
    def empty(cls, neurons: Sequence[Neuron], k: int, before: int, after: int) -> "TopContexts":
        if k < 1 or before < 0 or after < 0:
            raise ValueError(f"need k >= 1 and before, after >= 0; got k={k}, before={before}, after={after}")
        n, width = len(neurons), before + 1 + after
        return cls(list(neurons), before, after, torch.full((n, k), -torch.inf), torch.full((n, k, 2), -1, dtype=torch.long),
                   torch.full((n, k, width), EMPTY_TOKEN, dtype=torch.long), torch.full((n, k, width), torch.nan))

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    def update(self, activations: Float[Tensor, "batch pos n"], input_ids: Int[Tensor, "batch pos"],
               mask: Tensor, sequence_numbers: Int[Tensor, "batch"]) -> None:
        """Fold one batch in: keep the ``k`` best of what was kept and this batch's activations.

        ``mask`` is True on real tokens (padding never enters the top-k or a window).
        """
        batch, positions, n = activations.shape
        mask = mask.bool()
        masked = activations.float().masked_fill(~mask[..., None], -torch.inf).permute(2, 0, 1)   # [n, batch, pos]
        take = min(self.k, batch * positions)
        values, flat = masked.reshape(n, batch * positions).topk(take, dim=1)                    # [n, take]
        rows, cols = flat // positions, flat % positions
        offsets = torch.arange(-self.before, self.after + 1)
        window = cols[..., None] + offsets                                                      # [n, take, width]
        inside = (window >= 0) & (window < positions)
        clamped = window.clamp(0, positions - 1)
        row_index = rows[..., None].expand_as(clamped)
        inside &= mask[row_index, clamped]
        tokens = torch.where(inside, input_ids.long()[row_index, clamped], EMPTY_TOKEN)
        neuron_index = torch.arange(n)[:, None, None].expand_as(clamped)
        window_acts = torch.where(inside, masked[neuron_index, row_index, clamped], torch.nan)
        where = torch.stack([sequence_numbers.long()[rows], cols], dim=-1)
        where = torch.where(torch.isfinite(values)[..., None], where, -1)
        all_values = torch.cat([self.values, values], dim=1)
        best = all_values.topk(self.k, dim=1).indices                                          # [n, k]

        def pick(kept: Tensor, new: Tensor) -> Tensor:
            joined = torch.cat([kept, new], dim=1)
            index = best.reshape(*best.shape, *([1] * (joined.dim() - 2))).expand(-1, -1, *joined.shape[2:])
            return joined.gather(1, index)

        self.values = all_values.gather(1, best)
        self.where, self.tokens = pick(self.where, where), pick(self.tokens, tokens)
        self.activations = pick(self.activations, window_acts)


@dataclass
class ScanResult:
    """What ``scan`` saw: the top contexts and each sequence's last-token activation ``[n, n_sequences]``."""

    contexts: TopContexts
    last_token: Float[Tensor, "n n_sequences"]


def scan(model: Any, neurons: Sequence[Neuron], token_lists: Iterable[Sequence[int]], k: int = 8, before: int = 12,
         after: int = 3, batch_size: int = 16) -> ScanResult:
    """Stream ``token_lists`` through ``model`` and keep each neuron's top-``k`` contexts (module note).

    Args:
        model: a ``TransformerBridge``.
        neurons: ``(layer, index)`` pairs to watch.
        token_lists: token id sequences (any iterable: a generator keeps memory flat).
        k: contexts kept per neuron.
        before, after: tokens of context kept before and after the activating token.
        batch_size: sequences per forward pass.

    Returns:
        ``ScanResult`` with the contexts (sequence numbers count from 0 in the order given) and each
        sequence's last-token activation.
    """
    if not neurons:
        raise ValueError("scan needs at least one (layer, index) neuron to watch")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    neurons = [(int(layer), int(index)) for layer, index in neurons]
    layers = sorted({layer for layer, _ in neurons})
    # Each layer's hook gathers its neurons; the concatenated columns are then put back in the order of
    # ``neurons`` (column j of the concatenation is neuron ``concatenated[j]``).
    by_layer = {layer: torch.tensor([index for l, index in neurons if l == layer]) for layer in layers}
    concatenated = [row for layer in layers for row, (l, _) in enumerate(neurons) if l == layer]
    permutation = torch.argsort(torch.tensor(concatenated))
    captured: dict[int, Tensor] = {}

    def make_hook(layer: int):
        index = by_layer[layer]

        def hook(activation: Tensor, hook: Any) -> Tensor:
            captured[layer] = activation[..., index.to(activation.device)].float().cpu()
            if layer == layers[-1]:
                raise StopForward
            return activation
        return hook

    found = TopContexts.empty(neurons, k, before, after)
    last_values: list[Tensor] = []
    pad = pad_token_id(model.tokenizer)
    device = input_device(model)
    counter = 0

    def run(chunk: list[Sequence[int]]) -> None:
        nonlocal counter
        ids, mask = pad_token_lists(chunk, pad, "right")
        captured.clear()
        forward_until_stopped(model, ids.to(device), attention_mask=mask.to(device))
        require_fired(len(captured), len(layers))
        activations = torch.cat([captured[layer] for layer in layers], dim=-1)[..., permutation]   # [batch, pos, n]
        numbers = torch.arange(counter, counter + len(chunk))
        found.update(activations, ids, mask, numbers)
        last = torch.tensor([len(tokens) - 1 for tokens in chunk])
        last_values.append(activations[torch.arange(len(chunk)), last].T)
        counter += len(chunk)

    hooks = [(hook_name(layer), make_hook(layer)) for layer in layers]
    with torch.inference_mode(), read_hooks(model, hooks):
        chunk: list[Sequence[int]] = []
        for tokens in token_lists:
            if len(tokens) == 0:
                raise ValueError(f"sequence #{counter + len(chunk)} is empty; drop empty texts before scanning")
            chunk.append(list(tokens))
            if len(chunk) == batch_size:
                run(chunk)
                chunk = []
        if chunk:
            run(chunk)
    last_token = torch.cat(last_values, dim=1) if last_values else torch.empty(len(neurons), 0)
    return ScanResult(found, last_token)


def text_windows(tokenizer: Any, path: str | Path, window: int = 64, max_windows: int | None = None,
                 skip_windows: int = 0) -> Iterator[list[int]]:
    """Consecutive windows of ``window`` tokens of a text file, read line by line (BOS first when the
    tokenizer has one).

    Memory stays flat in the file's size: only the current window's tokens are held. Blank lines and
    WikiText's ``= heading =`` lines are skipped (they carry no prose).

    Example:
        >>> from dpn_lens.tiny import build_tiny_tokenizer
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
        >>> _ = path.write_text("hello world hello world\\n = title =\\nhello world\\n")
        >>> tokenizer = build_tiny_tokenizer(words=["hello", "world"])     # BOS id 1, hello 4, world 5
        >>> list(text_windows(tokenizer, path, window=3))                    # the heading is skipped
        [[1, 4, 5], [1, 4, 5], [1, 4, 5]]
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a text file; pass the WikiText-2 file, e.g. "
                                "../shared/data/capability/wikitext2_test/test.txt")
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if isinstance(bos, int) else []
    body = window - len(head)
    buffer: list[int] = []
    produced = skipped = 0
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            text = line.strip()
            if not text or (text.startswith("=") and text.endswith("=")):
                continue
            buffer += tokenizer(" " + text, add_special_tokens=False)["input_ids"]
            while len(buffer) >= body:
                chunk, buffer = buffer[:body], buffer[body:]
                if skipped < skip_windows:
                    skipped += 1
                    continue
                yield head + chunk
                produced += 1
                if max_windows is not None and produced >= max_windows:
                    return
