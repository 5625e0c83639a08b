"""Where a strategy process sits: its device, its global rank, the stage and replica that rank runs
(:class:`~lightning_ddg.topology.Topology`), and the shard of the data Lightning gives it. Ranks are numbered
node by node, as ``DDPStrategy`` numbers them, so that the consecutive ranks of a pipeline share a node when a
node's devices are a multiple of the stages."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from typing_extensions import override

from lightning_ddg.topology import Topology

__all__ = ["StageLayout"]


class StageLayout:
    """Mixed into :class:`~lightning_ddg.strategy.DDGStrategy` before ``ParallelStrategy``, whose layout it gives;
    reads the strategy's ``num_stages`` (``None``: one stage per process) and the ``ParallelStrategy`` attributes
    (``parallel_devices``, ``cluster_environment``, the ranks)."""

    num_stages: int | None
    parallel_devices: list[torch.device] | None
    cluster_environment: Any
    _num_nodes: int
    _process_group_backend: str | None

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def topology(self) -> Topology:
        processes = self.num_nodes * self.num_processes
        stages = self.num_stages or processes
        return Topology(num_stages=stages, num_replicas=max(processes // stages, 1))

    @property
    def is_distributed(self) -> bool:
        # tells Lightning to shard the data over the replicas (distributed_sampler_kwargs) and to sync logged values
        return self.topology.num_replicas > 1

    @property
    def stage_index(self) -> int:
        return self.topology.stage_of(self.global_rank)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every stage reads the same batches in the same order: data is sharded over replicas, never stages
        replica = self.topology.replica_of(self.global_rank)
        return {"num_replicas": self.topology.num_replicas, "rank": replica}

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def set_world_ranks(self) -> None:
        # torchrun and SLURM set the ranks themselves; otherwise node by node, as DDPStrategy
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank
