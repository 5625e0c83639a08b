"""The strategy's collectives. What a step logs exists on the last stage only, so logged values are reduced and
gathered over that stage's replicas (the replica group), never across stages; the decision to stop is the whole
job's, so that every stage leaves the loop after the same step."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from lightning_ddg._compat import distributed_is_initialized, sync_ddp_if_available

__all__ = ["StageCollectives"]


class StageCollectives:
    """Mixed into :class:`~lightning_ddg.strategy.DDGStrategy` before ``ParallelStrategy``, whose collectives it
    overrides; reads the strategy's ``_run`` (:class:`~lightning_ddg.stage_run.StageRun`) for the replica group."""

    _run: Any

    @property
    def _replica_group(self) -> Any:
        return self._run.replica_group if self._run is not None else None

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if distributed_is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        group = group if group is not None else self._replica_group
        if not isinstance(tensor, Tensor) or group is None:
            return tensor
        return sync_ddp_if_available(tensor, group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        group = group if group is not None else self._replica_group
        if group is None:
            return tensor
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)  # type: ignore[misc]

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if not distributed_is_initialized():
            return decision
        flag = torch.tensor(int(decision), device=self.root_device)  # type: ignore[attr-defined]
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return bool(flag.item() == self.world_size) if all else bool(flag.item() > 0)  # type: ignore[attr-defined]
