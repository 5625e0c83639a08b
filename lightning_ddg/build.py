"""Building one rank's pipeline stage: ``Topology`` → ``split_module`` → ``StageLinks.create`` → ``DDGStage``.

:func:`build_stage` is the one place that puts these together; the Lightning strategy, the benchmarks and the
tests all call it. It is plain PyTorch: a script that runs the stages itself needs nothing else.

Example, in each of ``K`` processes of a gloo (or NCCL) process group::

    topology = Topology(num_stages=K)
    built = build_stage(model, topology, dist.get_rank(), split_points=["model.4"], memory="recompute")
    optimizer = torch.optim.SGD(built.stage.parameters, lr=0.1)
    for x, y in loader:
        out = built.stage.forward(x)
        if built.stage.backward(loss_fn(out, y) if built.stage.is_last else None):
            built.stage.install_gradients(); optimizer.step()
    for ready in built.stage.drain():
        if ready:
            built.stage.install_gradients(); optimizer.step()
    built.links.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import nn

from lightning_ddg.exporting import place_devices
from lightning_ddg.partition import Partition, split_module
from lightning_ddg.shard import Draw, Removed, keep_only_stage, kept_tensors, materialize, on_meta
from lightning_ddg.stage import DDGStage, MemoryMode
from lightning_ddg.topology import StageLinks, Topology

__all__ = ["BuiltStage", "build_stage"]


@dataclass
class BuiltStage:
    """What :func:`build_stage` made for one rank."""

    stage: DDGStage
    links: StageLinks | None  # None with one stage and no replicas
    partition: Partition
    removed: list[Removed] = field(default_factory=list)  # other stages' tensors taken out of the module

    @property
    def module(self) -> nn.Module:
        """The stage's traced module (in train mode)."""
        return self.stage.module


def build_stage(
    module: nn.Module,
    topology: Topology,
    rank: int,
    *,
    split_points: Sequence[str] | None = None,
    partition: Partition | None = None,
    device: torch.device | str = "cpu",
    links: StageLinks | None = None,
    timeout: timedelta = timedelta(minutes=30),
    keep_only: bool = False,
    memory: MemoryMode = "stash",
    accumulate_grad_batches: int = 1,
    check_finite: bool = False,
    init_rng_states: dict[str, torch.Tensor] | None = None,
    init_draws: list[Draw] | None = None,
) -> BuiltStage:
    """Build the stage global rank ``rank`` runs in ``topology``.

    Args:
        module: the whole model, the same in every process.
        topology: the stages and replicas of the job.
        rank: this process's global rank.
        split_points: where ``module`` is cut (see :func:`~lightning_ddg.partition.split_module`); or give
            ``partition``, an existing cut of ``module``.
        device: where the stage runs; its links' tensors live there too.
        links: channels made before (a later fit, or an in-process transport); by default they are created,
            a collective over every rank of the job.
        keep_only: take the other stages' parameters and buffers out of ``module`` (:func:`keep_only_stage`), so
            that this process holds its own stage only; :attr:`BuiltStage.removed` says what was taken.
        memory, accumulate_grad_batches, check_finite: passed to :class:`~lightning_ddg.stage.DDGStage`.
        init_rng_states: for a ``module`` built on the meta device, the random number generator states its build
            began with: this rank's stage gets real tensors, initialised as a whole build would
            (:func:`~lightning_ddg.shard.materialize`); ``init_draws``, the random values it drew
            (:func:`~lightning_ddg.shard.record_draws`), which that initialisation must draw again alike.
    """
    if partition is None:
        partition = split_module(module, split_points=split_points, num_stages=topology.num_stages)
    elif split_points is not None:
        raise ValueError("give split_points or a partition, not both")
    if partition.num_stages != topology.num_stages:
        raise ValueError(f"the partition has {partition.num_stages} stages, the topology {topology.num_stages}")
    k = topology.stage_of(rank)
    if on_meta(module):
        holders = (partition.train[k], partition.eval[k])
        kept = kept_tensors(module, partition, k)
        materialize(module, kept, torch.device(device), init_rng_states, holders, init_draws)
    for graph in (partition.train[k], partition.eval[k]) if partition.exported_with is not None else ():
        place_devices(graph, torch.device(device))  # the export wrote the devices it traced on into the graphs
    removed = keep_only_stage(module, partition, k) if keep_only else []
    module.to(device)
    if links is None and topology.world_size > 1:
        tied = [w.stages for w in partition.tied]  # each weight shared across stages gets a group of its owners
        links = StageLinks.create(topology, rank, torch.device(device), timeout, tied)
    stage = DDGStage(
        partition.train[k],
        k,
        topology.num_stages,
        links,
        memory=memory,
        accumulate_grad_batches=accumulate_grad_batches,
        eval_module=partition.eval[k],
        check_finite=check_finite,
        tied=partition.tied,
    )
    return BuiltStage(stage, links, partition, removed)
