"""What every stage's data loader must agree on: the same batches, in the same order, of the same number.

Data is sharded over pipeline replicas, never over stages: every stage of one pipeline reads the same batches.
These checks and the seeding are plain PyTorch.

Example::

    seed_shuffling(loader, shuffle_seed())      # the same order on every stage
    read_alike(loader, topology, rank, seed, lengths=gather_objects, what="training")  # all of the above
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.utils.data import DistributedSampler, RandomSampler

from lightning_ddg.checks import check_same_lengths
from lightning_ddg.topology import Topology

__all__ = ["check_sampler_shards_replicas", "loader_length", "read_alike", "seed_shuffling", "shuffle_seed"]


def read_alike(
    dataloader: object,
    topology: Topology,
    rank: int,
    seed: int,
    lengths: Callable[[int | None], list[int | None]] | None,
    what: str,
) -> None:
    """Make global rank ``rank``'s ``dataloader`` read what the other stages of its pipeline read, or raise
    ``ValueError``: as many batches as every other process (``lengths`` gathers each one's count, a collective;
    ``None`` where there is no other), its replica's shard, and, with more than one stage, an order shuffled alike
    (``seed``, the same on every rank)."""
    if lengths is not None:  # a stage that read fewer batches would leave the others waiting for the missing ones
        check_same_lengths(lengths(loader_length(dataloader)), f"{what} dataloader", topology.describe)
    check_sampler_shards_replicas(dataloader, topology.num_replicas, topology.replica_of(rank))
    if topology.num_stages > 1:
        seed_shuffling(dataloader, seed)


def shuffle_seed() -> int:
    """The seed of ``seed_everything`` if one was set, else a fresh one (the strategy broadcasts rank 0's)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else int.from_bytes(os.urandom(7), "little")


def seed_shuffling(dataloader: object, seed: int) -> None:
    """A ``RandomSampler`` without a generator draws its order from the process's global RNG, which the stages
    consume differently (dropout on some stages only): give it a generator seeded alike on every stage."""
    sampler = getattr(dataloader, "sampler", None)
    if isinstance(sampler, RandomSampler) and sampler.generator is None:
        sampler.generator = torch.Generator().manual_seed(seed)


def check_sampler_shards_replicas(dataloader: object, num_replicas: int, replica: int) -> None:
    """Raise ``ValueError`` when the loader's ``DistributedSampler`` shards the data otherwise than over the
    pipeline replicas: the stages of one pipeline must read the same batches."""
    sampler = getattr(dataloader, "sampler", None)
    expected = {"num_replicas": num_replicas, "rank": replica}
    if isinstance(sampler, DistributedSampler) and {k: getattr(sampler, k) for k in expected} != expected:
        raise ValueError(
            f"a data loader's DistributedSampler shards the data over {sampler.num_replicas} ranks, this one "
            f"reading shard {sampler.rank}, but the stages of one pipeline must read the same batches: shard over "
            f"the {num_replicas} pipeline replica(s) with "
            f"DistributedSampler(..., **trainer.strategy.distributed_sampler_kwargs) = {expected}, or leave the "
            "sampler to Lightning."
        )


def loader_length(dataloader: object) -> int | None:
    """``len(dataloader)``, or ``None`` for an iterable without a length."""
    try:
        return len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return None
