"""Which rank runs which stage, and the process groups between them.

A job runs ``num_replicas`` copies (*replicas*) of a pipeline of ``num_stages`` stages. Ranks are laid out
pipeline by pipeline: replica ``r`` takes the consecutive ranks ``r*S … r*S+S-1``, and within a pipeline the
*last* stage (the one that computes the loss) takes the lowest rank. So global rank 0 holds the loss, the logged
metrics and the progress bar, exactly where Lightning's loggers and callbacks expect them.

Launchers number ranks node by node (``rank = node_rank * devices + local_rank``), so whenever the devices of a
node are a multiple of ``S`` every pipeline lies within one node: the point-to-point traffic between
neighbouring stages, every step in both directions, stays on the node's fast links, and only the gradient
all-reduce between replicas of a stage, once per optimizer step, crosses nodes.

Example, 2 stages × 3 replicas::

    >>> topo = Topology(num_stages=2, num_replicas=3)
    >>> [(topo.stage_of(rank), topo.replica_of(rank)) for rank in range(6)]
    [(1, 0), (0, 0), (1, 1), (0, 1), (1, 2), (0, 2)]
    >>> topo.replica_ranks(stage=0)
    [1, 3, 5]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from lightning_ddg.comm import Channel, TiedGroup, share_memory

__all__ = ["Topology", "StageLinks"]


@dataclass(frozen=True)
class Topology:
    """``num_replicas`` copies of a pipeline of ``num_stages`` stages."""

    num_stages: int
    num_replicas: int = 1

    @property
    def world_size(self) -> int:
        return self.num_stages * self.num_replicas

    def stage_of(self, rank: int) -> int:
        return self.num_stages - 1 - rank % self.num_stages

    def replica_of(self, rank: int) -> int:
        return rank // self.num_stages

    def rank_of(self, stage: int, replica: int = 0) -> int:
        return replica * self.num_stages + self.num_stages - 1 - stage

    def describe(self, rank: int) -> str:
        """How messages name a rank: ``"stage 1 (rank 2)"``."""
        return f"stage {self.stage_of(rank)} (rank {rank})"

    def replica_ranks(self, stage: int) -> list[int]:
        """The ranks running ``stage``, replica 0 first: the group that averages the stage's gradients."""
        return [self.rank_of(stage, r) for r in range(self.num_replicas)]


@dataclass
class StageLinks:
    """One rank's channels to its neighbouring stages and its group of replicas.

    ``act_in``/``act_out`` carry activations from the previous / to the next stage, ``grad_in``/``grad_out``
    carry gradients from the next / to the previous stage; the first and last stage lack some of them.
    ``replica_group`` holds the ranks running this rank's stage in every replica (``None`` with one replica).
    ``batch_out`` (first stage) carries each batch to every later stage, whole to the last one (``True``) and as
    its layout to the others; ``batch_in`` receives it there (see :mod:`lightning_ddg.batches`). They always use
    gloo: batches come from the host's data loader. ``tied[i]`` holds the ranks with a copy of the ``i``-th weight
    shared across stages (``Partition.tied``), ``None`` where this rank holds none.
    """

    act_in: Channel | None = None
    act_out: Channel | None = None
    grad_in: Channel | None = None
    grad_out: Channel | None = None
    replica_group: dist.ProcessGroup | None = None
    batch_out: list[tuple[Channel, bool]] = field(default_factory=list)
    batch_in: Channel | None = None
    tied: list[TiedGroup | None] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        topology: Topology,
        rank: int,
        device: torch.device,
        timeout: timedelta = timedelta(minutes=30),
        tied: Sequence[Sequence[int]] = (),
        shared_memory: bool = True,
    ) -> StageLinks:
        """Create every group of the job (a collective: all ranks call it) and keep this rank's channels.

        ``tied`` lists, per weight shared across stages, the stages that use it (``[w.stages for w in
        partition.tied]``): each gets a :class:`~lightning_ddg.comm.TiedGroup` of those stages' ranks in every
        replica, whose copies start from the first stage's in replica 0. With ``shared_memory``, the channels
        between stages on one host carry their messages through shared memory and a pipe
        (:func:`~lightning_ddg.comm.share_memory`).
        """
        links = cls()
        stage, replica = topology.stage_of(rank), topology.replica_of(rank)
        last = topology.num_stages - 1
        for r in range(topology.num_replicas):
            for s in range(topology.num_stages - 1):
                low, high = topology.rank_of(s, r), topology.rank_of(s + 1, r)
                forward = dist.new_group([low, high], timeout=timeout)
                backward = dist.new_group([low, high], timeout=timeout)
                if r != replica:
                    continue
                if s == stage:
                    links.act_out = Channel(high, forward, device, timeout)
                    links.grad_in = Channel(high, backward, device, timeout)
                if s + 1 == stage:
                    links.act_in = Channel(low, forward, device, timeout)
                    links.grad_out = Channel(low, backward, device, timeout)
        for s in range(topology.num_stages):
            ranks = topology.replica_ranks(s)
            group = dist.new_group(ranks, timeout=timeout) if topology.num_replicas > 1 else None
            if s == stage:
                links.replica_group = group
        # the first stage runs ahead of stage s by up to K-1-s steps, plus the loader's one batch fetched ahead
        ahead = topology.num_stages + 1
        for r in range(topology.num_replicas):
            first = topology.rank_of(0, r)
            for s in range(1, topology.num_stages):
                group = dist.new_group([first, topology.rank_of(s, r)], timeout=timeout, backend="gloo")
                if r != replica:
                    continue
                if stage == 0:
                    links.batch_out.append((Channel(topology.rank_of(s, r), group, "cpu", timeout, ahead), s == last))
                if s == stage:
                    links.batch_in = Channel(first, group, "cpu", timeout, ahead)
        for stages in tied:
            ranks = sorted(topology.rank_of(s, r) for r in range(topology.num_replicas) for s in stages)
            group = dist.new_group(ranks, timeout=timeout)
            source = topology.rank_of(min(stages), replica=0)
            links.tied.append(TiedGroup(group, source, topology.num_replicas) if rank in ranks else None)
        if shared_memory:
            share_memory(links.sending(), links.receiving())
        return links

    def sending(self) -> list[Channel]:
        """The channels this rank sends on."""
        return [c for c in (self.act_out, self.grad_out) if c is not None] + [c for c, _ in self.batch_out]

    def receiving(self) -> list[Channel]:
        """The channels this rank receives on."""
        return [c for c in (self.act_in, self.grad_in, self.batch_in) if c is not None]

    def close(self) -> None:
        """End every channel so that no receive is left posted; a collective between neighbours."""
        # every rank posts its end markers before it waits, so no two ranks wait on each other
        senders = self.sending()
        for channel in senders:
            channel.send_end()
        for channel in self.receiving():
            channel.close_recv()
        for channel in senders:
            channel.flush()

    def destroy(self) -> None:
        """Release this rank's process groups, after :meth:`close`; the links cannot be used afterwards.

        A script that runs several fits creates new groups for each, so the old ones must not pile up.
        """
        channels = self.sending() + self.receiving()
        for channel in channels:
            channel.release_memory()
        groups = {id(c.group): c.group for c in channels}
        if self.replica_group is not None:
            groups[id(self.replica_group)] = self.replica_group
        groups |= {id(t.group): t.group for t in self.tied if t is not None}
        for group in groups.values():
            dist.destroy_process_group(group)
        self.act_in = self.act_out = self.grad_in = self.grad_out = self.replica_group = self.batch_in = None
        self.batch_out = []
        self.tied = []
