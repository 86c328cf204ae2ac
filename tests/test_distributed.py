"""Data-parallel statistics: two gloo processes give the same neuron map as one process."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
import torch

from dpn_lens.collection.collect import CollectionConfig
from dpn_lens import ContrastStatistics, ContrastiveSet, collect_statistics, locate
from dpn_lens.collection.distributed import (collect_statistics_distributed, merge_across_processes, shard_contrastive_set,
                                  shard_indices)

from helpers import TINY_WORDS, build_tiny_model

N_PAIRS = 25  # odd on purpose: the two shards have 13 and 12 pairs
SETTINGS = dict(q=0.75, tau_d=0.2, layers=[0, 1, 2, 3])  # loose enough to select several neurons per layer


def varied_pairs(n_pairs: int = N_PAIRS) -> ContrastiveSet:
    rng = random.Random(7)

    def prompt() -> str:
        return " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 14)))

    return ContrastiveSet("openness", [prompt() for _ in range(n_pairs)], [prompt() for _ in range(n_pairs)],
                          source="tests")


@contextlib.contextmanager
def one_thread():
    """float32 matmuls split their sums across threads, so their bits depend on the thread count; the ranks
    and the single-process reference all run on one thread (CI once saw a 9.8e-10 difference in the means
    without this: two processes sharing two cores against one process on both)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker(rank: int, world_size: int, init_file: str, folder: str) -> None:
    """One process of the 2-process gloo group; runs every scenario (one spawn keeps CI fast)."""
    import os
    import sys

    import torch.distributed as dist

    if sys.platform.startswith("linux"):
        # Gloo otherwise binds to the address the hostname resolves to, which some CI containers lack.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    folder = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)  # as one_thread() does for the reference
    try:
        # Each process builds its own replica; same seed, so the same weights (and fingerprint).
        model = build_tiny_model(folder / f"model{rank}", seed=0)
        pairs = varied_pairs()
        stats = collect_statistics_distributed(model, pairs, CollectionConfig(max_batch_size=1, progress=False))
        stats.save(folder / f"full{rank}.safetensors")
        # Fewer pairs than processes: rank 1 gets none.
        one_pair = ContrastiveSet("openness", pairs.high[:1], pairs.low[:1], source="tests")
        collect_statistics_distributed(model, one_pair, CollectionConfig(max_batch_size=1, progress=False)).save(
            folder / f"one_pair{rank}.safetensors")
        try:
            collect_statistics_distributed(model, pairs,
                                           CollectionConfig(layers=[0, 1] if rank == 0 else [0, 2], max_batch_size=1,
                                                            progress=False))
        except ValueError as error:
            (folder / f"mismatch{rank}.txt").write_text(str(error))
    finally:
        dist.destroy_process_group()
    # Reached only when every scenario ran (an exception above reaches mp.spawn as usual). Skip interpreter
    # finalization: under CPU load, torch's static teardown after a gloo group aborts now and then ("terminate
    # called without an active exception", about 1 run in 15 with the other core busy), after all work is done
    # and saved. os._exit(0) keeps that teardown crash from failing a test of our merge.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(2, str(folder / "rendezvous"), str(folder)), nprocs=2, join=True)
    return folder


def selected(neuron_map) -> dict[str, dict[int, list[int]]]:
    return {pole: {layer: sorted(int(i) for i in indices) for layer, indices in getattr(neuron_map, pole).items()}
            for pole in ("high", "low")}


def test_shards_are_disjoint_cover_everything_and_are_deterministic():
    for n_items in (0, 1, 5, 25):
        for world_size in (1, 2, 3, 7):
            shards = [shard_indices(n_items, rank, world_size) for rank in range(world_size)]
            flat = sorted(i for shard in shards for i in shard)
            assert flat == list(range(n_items))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
            assert shards == [shard_indices(n_items, rank, world_size) for rank in range(world_size)]


def test_a_shard_keeps_pairs_together():
    pairs = varied_pairs(7)
    shard = shard_contrastive_set(pairs, 1, 3)
    assert shard.high == [pairs.high[i] for i in (1, 4)] and shard.low == [pairs.low[i] for i in (1, 4)]
    assert shard.trait == pairs.trait and shard.source == pairs.source
    assert shard_contrastive_set(varied_pairs(1), 1, 2) is None


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0), (0, 1.5)])
def test_bad_rank_or_world_size_is_an_error_naming_it(rank, world_size):
    with pytest.raises(ValueError, match="rank|world_size"):
        shard_indices(10, rank, world_size)


def test_without_a_process_group_it_is_plain_collection(tiny_model):
    pairs = varied_pairs(6)
    single = collect_statistics(tiny_model, pairs, CollectionConfig(progress=False))
    assert merge_across_processes(single) is single
    again = collect_statistics_distributed(tiny_model, pairs, CollectionConfig(progress=False))
    assert torch.equal(again.high.mean, single.high.mean) and torch.equal(again.low.m2, single.low.m2)


def test_two_gloo_processes_give_the_neuron_map_of_one_process(two_process_run, tiny_model):
    rank0 = ContrastStatistics.load(two_process_run / "full0.safetensors")
    rank1 = ContrastStatistics.load(two_process_run / "full1.safetensors")
    # Every rank ends with the same statistics, bit for bit.
    for a, b in ((rank0.high, rank1.high), (rank0.low, rank1.low)):
        assert a.count == b.count and torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)

    model = tiny_model  # built by the same build_tiny_model(seed=0) as each rank's replica
    with one_thread():
        single = collect_statistics(model, varied_pairs(), CollectionConfig(max_batch_size=1, progress=False))
    assert (rank0.high.count, rank0.low.count) == (N_PAIRS, N_PAIRS)
    assert rank0.fingerprint == single.fingerprint and rank0.layers == single.layers
    # Merging shards changes only the order of float64 additions.
    for a, b in ((rank0.high, single.high), (rank0.low, single.low)):
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.m2, b.m2, rtol=1e-10, atol=1e-12)

    distributed_map, single_map = locate(rank0, **SETTINGS), locate(single, **SETTINGS)
    assert selected(distributed_map) == selected(single_map)
    assert sum(len(v) for pole in selected(single_map).values() for v in pole.values()) >= 4
    torch.testing.assert_close(distributed_map.steering_value, single_map.steering_value, rtol=0, atol=1e-6)
    torch.testing.assert_close(distributed_map.effect_size, single_map.effect_size, rtol=1e-5, atol=1e-5)
    # The data-driven settings come out the same too.
    assert locate(rank0).settings == locate(single).settings
    assert selected(locate(rank0)) == selected(locate(single))


def test_a_rank_without_pairs_contributes_nothing(two_process_run, tiny_model):
    pairs = varied_pairs()
    model = tiny_model  # built by the same build_tiny_model(seed=0) as each rank's replica
    with one_thread():
        single = collect_statistics(model, ContrastiveSet("openness", pairs.high[:1], pairs.low[:1], source="tests"),
                                    CollectionConfig(max_batch_size=1, progress=False))
    for rank in (0, 1):
        stats = ContrastStatistics.load(two_process_run / f"one_pair{rank}.safetensors")
        assert stats.high.count == 1 and torch.equal(stats.high.mean, single.high.mean)
        assert torch.equal(stats.low.m2, single.low.m2)


def test_ranks_that_collected_different_layers_all_raise(two_process_run):
    for rank in (0, 1):
        message = (two_process_run / f"mismatch{rank}.txt").read_text()
        assert "rank 1" in message and "layers" in message
