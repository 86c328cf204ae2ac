"""Data-parallel activation statistics with ``torch.distributed``.

Each process takes every ``world_size``-th pair of the contrastive set (rank ``r`` takes pairs
``r, r + world_size, ...``: deterministic, disjoint, and balanced to one pair), collects its local
``ContrastStatistics``, and the per-group ``(count, mean, m2)`` of all processes are all-gathered and
merged in rank order with Chan's formula. Every rank then holds bit-identical statistics, equal to a
single process's up to float64 rounding (~1e-15 relative), so ``locate`` gives the same neuron map.

Launch one process per device (or CPU worker) with ``torchrun``; the process group must be
initialised before the call (gloo on CPUs, nccl on GPUs)::

    torchrun --nproc-per-node 4 my_script.py

    # my_script.py
    import torch.distributed as dist
    import dpn_lens as dl
    from dpn_lens.collection.distributed import collect_statistics_distributed

    dist.init_process_group("nccl")                      # "gloo" for CPU processes
    rank = dist.get_rank()
    model = dl.load_model("meta-llama/Meta-Llama-3-8B-Instruct", device=f"cuda:{rank}", dtype="bfloat16")
    pairs = dl.embedded_contrastive_set("openness", n_pairs=1000)
    stats = collect_statistics_distributed(model, pairs)  # the same on every rank
    if rank == 0:
        dl.locate(stats, model_name=model.dpn_model_name).save("openness_map")
    dist.destroy_process_group()

Known torch behaviour: with gloo on a loaded CPU machine, a process occasionally aborts *at interpreter
exit*, after ``destroy_process_group`` ("terminate called without an active exception"; seen with torch
2.13 in 5 of 102 test runs with both cores busy). Everything saved before is complete; save results before exit,
as above, and treat that exit status accordingly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dpn_lens.collection.collect import CollectionConfig, collect_statistics
from dpn_lens.hooked import HookedModel, check_layers
from dpn_lens.data.contrastive import ContrastiveSet
from dpn_lens.collection.statistics import ContrastStatistics, GroupStatistics

__all__ = ["shard_indices", "shard_contrastive_set", "merge_across_processes", "collect_statistics_distributed",
           "process_rank"]


def process_rank(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when no process group is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_indices(n_items: int, rank: int, world_size: int) -> list[int]:
    """Indices of the items rank ``rank`` of ``world_size`` processes takes: ``rank, rank + world_size, ...``.

    Example:
        >>> shard_indices(7, 1, 3)
        [1, 4]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in 0..{world_size - 1}, got {rank!r}")
    if n_items < 0:
        raise ValueError(f"n_items must be non-negative, got {n_items}")
    return list(range(rank, n_items, world_size))


def shard_contrastive_set(contrastive_set: ContrastiveSet, rank: int, world_size: int) -> ContrastiveSet | None:
    """The pairs of one rank (pairs stay together), or ``None`` when the rank gets no pair.

    Example:
        >>> pairs = ContrastiveSet("openness", ["a", "b", "c"], ["x", "y", "z"])
        >>> shard_contrastive_set(pairs, 0, 2).high
        ['a', 'c']
    """
    indices = shard_indices(len(contrastive_set), rank, world_size)
    if not indices:
        return None
    pairs = [contrastive_set.pairs[i] for i in indices] if contrastive_set.pairs else []
    return ContrastiveSet(contrastive_set.trait, [contrastive_set.high[i] for i in indices],
                          [contrastive_set.low[i] for i in indices], contrastive_set.source, pairs,
                          contrastive_set.seed)


def _communication_device(group: Any) -> torch.device:
    import torch.distributed as dist

    # NCCL only moves CUDA tensors; gloo (and others) take CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shard_identity(stats: ContrastStatistics) -> dict[str, Any]:
    return {"trait": stats.trait, "layers": list(stats.layers), "hook_name": stats.hook_name,
            "token_position": stats.token_position, "fingerprint": stats.fingerprint,
            "shape": list(stats.high.shape)}


def merge_across_processes(stats: ContrastStatistics, group: Any = None) -> ContrastStatistics:
    """Merge every process's local statistics; all ranks return the same (bit-identical) result.

    A collective call: every rank of ``group`` must call it. The ``(count, mean, m2)`` of both poles
    are all-gathered as one float64 tensor and merged in rank order (rank 0 first), so the
    floating-point operations, and hence the bits, are the same on every rank. Without an
    initialised process group the statistics are returned unchanged.

    Raises:
        ValueError: on every rank, if the ranks collected different traits, layers, hook points,
            token positions or models (fingerprints), naming the first differing rank.

    Example:
        >>> local = collect_statistics(model, shard_contrastive_set(pairs, rank, world_size))  # doctest: +SKIP
        >>> stats = merge_across_processes(local)                                            # doctest: +SKIP
    """
    import torch.distributed as dist

    rank, world_size = process_rank(group)
    if world_size == 1:
        return stats
    # Check before exchanging tensors: every rank sees all descriptions and raises the same error,
    # so no rank is left waiting in a collective.
    descriptions: list[Any] = [None] * world_size
    dist.all_gather_object(descriptions, _shard_identity(stats), group=group)
    for other_rank, description in enumerate(descriptions[1:], start=1):
        for key, value in description.items():
            if value != descriptions[0][key]:
                raise ValueError(f"rank {other_rank} collected statistics with {key}={value!r} but rank 0 has "
                                 f"{descriptions[0][key]!r}; every process must load the same model and collect "
                                 "the same trait, layers and token position")
    n_layers, d_mlp = stats.high.shape
    device = _communication_device(group)
    packed = torch.cat([
        torch.tensor([stats.high.count, stats.low.count], dtype=torch.float64),  # exact below 2**53
        stats.high.mean.reshape(-1).cpu(), stats.high.m2.reshape(-1).cpu(),
        stats.low.mean.reshape(-1).cpu(), stats.low.m2.reshape(-1).cpu(),
    ]).to(device)
    gathered = [torch.empty_like(packed) for _ in range(world_size)]
    dist.all_gather(gathered, packed, group=group)

    size = n_layers * d_mlp

    def unpack(values: torch.Tensor) -> tuple[GroupStatistics, GroupStatistics]:
        values = values.cpu()
        parts = [values[2 + i * size:2 + (i + 1) * size].reshape(n_layers, d_mlp).clone() for i in range(4)]
        return (GroupStatistics(int(values[0]), parts[0], parts[1]),
                GroupStatistics(int(values[1]), parts[2], parts[3]))

    high, low = unpack(gathered[0])
    for values in gathered[1:]:
        other_high, other_low = unpack(values)
        high, low = high.merge(other_high), low.merge(other_low)
    return dataclasses.replace(stats, high=high, low=low)


def collect_statistics_distributed(model: HookedModel, contrastive_set: ContrastiveSet,
                                   config: CollectionConfig | None = None, group: Any = None) -> ContrastStatistics:
    """``collect_statistics`` split over the processes of a ``torch.distributed`` group.

    Rank ``r`` of ``W`` collects pairs ``r, r + W, ...`` with its own model replica (on its own
    device), then ``merge_across_processes`` combines them. Every rank returns the same
    statistics, which give the same neuron map as one process collecting all pairs. A rank left
    without pairs (fewer pairs than processes) contributes empty statistics. Without an initialised
    process group this is plain ``collect_statistics``.

    Args:
        model, contrastive_set, config: as for ``collect_statistics``; the progress bar (if
            ``config.progress``) is shown on rank 0 only.
        group: process group (default: the world).

    Example:
        >>> dist.init_process_group("gloo")                              # doctest: +SKIP
        >>> stats = collect_statistics_distributed(model, pairs)         # doctest: +SKIP
    """
    from dpn_lens.models import model_fingerprint

    config = CollectionConfig() if config is None else config
    rank, world_size = process_rank(group)
    config = dataclasses.replace(config, progress=config.progress and rank == 0)
    if world_size == 1:
        return collect_statistics(model, contrastive_set, config)
    shard = shard_contrastive_set(contrastive_set, rank, world_size)
    if shard is not None:
        local = collect_statistics(model, shard, config)
    else:
        chosen = check_layers(model, config.layers, config.hook_template)
        d_mlp = int(model.cfg.d_mlp)
        local = ContrastStatistics(
            trait=contrastive_set.trait, high=GroupStatistics.empty(len(chosen), d_mlp),
            low=GroupStatistics.empty(len(chosen), d_mlp), layers=chosen, hook_name=config.hook_template,
            token_position=config.token_position, fingerprint=model_fingerprint(model).to_dict(),
            source=contrastive_set.source,
        )
    return merge_across_processes(local, group)
