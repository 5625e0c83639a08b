"""Data-parallel replicas of a stage: one starting point, and gradients averaged before every optimizer step.

With ``R`` replicas of an ``S``-stage pipeline, each replica pipeline reads its own shard of the data, and the
``R`` replicas of a stage average their gradients before each optimizer step. Every replica then applies the
same update: with mean-reduced losses and replica batches of equal size, that of one pipeline whose batch is
the union of the replicas' batches.

The average is a bucketed asynchronous all-reduce over the stage's replica group, as in
``DistributedDataParallel``. Gradients are packed into flat buckets of about ``bucket_mb`` MiB in reverse
parameter order, the order in which the backward produces them. During a watched backward a bucket's
all-reduce starts as soon as all its gradients exist, so that communication overlaps the rest of the backward
and the sends that follow it. Buckets always start in order, so every replica issues the same collectives in
the same order.

Example (``group`` holds the ranks running this stage, one per replica)::

    sync_module_states(module, group)                   # every replica starts from replica 0's weights
    averager = ReplicaAverager(params, group)
    with averager.watch(leaves, partial_sums):         # buckets start while the backward fills them
        grads = torch.autograd.grad(loss, leaves)
    averaged = averager.average(summed_grads)          # starts the other buckets, waits, divides by R
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ReplicaAverager", "sync_module_states", "DEFAULT_BUCKET_MB"]

DEFAULT_BUCKET_MB = 25.0  # DistributedDataParallel's default


@dataclass
class _Bucket:
    """Flat storage for the gradients of some parameters of one dtype and device, all-reduced at once."""

    flat: torch.Tensor
    members: list[int]  # parameter positions
    offsets: list[int]
    filled: set[int] = field(default_factory=set)  # positions whose gradient is in ``flat`` this window
    work: dist.Work | None = None


class ReplicaAverager:
    """Averages the gradients of one stage's parameters over the stage's replicas.

    Args:
        parameters: the stage's trained parameters, in the order in which gradients are passed in.
        group: the ranks that run the same stage, one per replica.
        bucket_mb: about how many MiB of gradients one all-reduce carries.

    Call :meth:`average` once per optimizer step; before it, at most one backward may run inside
    :meth:`watch`, which starts buckets early.

    Example::

        averager = ReplicaAverager(stage_params, replica_group)
        for p, g in zip(stage_params, averager.average(grads)):
            p.grad = g
    """

    def __init__(
        self,
        parameters: Sequence[torch.Tensor],
        group: dist.ProcessGroup,
        bucket_mb: float = DEFAULT_BUCKET_MB,
    ) -> None:
        self.group = group
        self.num_replicas = dist.get_world_size(group)
        self._shapes = [p.shape for p in parameters]
        self._buckets = _make_buckets(parameters, int(bucket_mb * 2**20))
        self._place = {i: (b, o) for b in self._buckets for i, o in zip(b.members, b.offsets, strict=True)}
        self._next = 0  # the next bucket to start

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    def _view(self, i: int) -> torch.Tensor:
        bucket, offset = self._place[i]
        return bucket.flat[offset : offset + self._shapes[i].numel()].view(self._shapes[i])

    @contextmanager
    def watch(self, leaves: Sequence[torch.Tensor], partial: Sequence[torch.Tensor | None]) -> Iterator[None]:
        """Start buckets during the backward run inside this context, the last of an optimizer step's window.

        ``leaves[i]`` stands for parameter ``i`` in the backward (the parameter, or the copy of it the forward
        used); ``partial[i]`` is the sum of the window's earlier gradients of parameter ``i``, or ``None``.
        """
        self._settle()
        handles = [leaf.register_hook(self._hook(i, partial[i])) for i, leaf in enumerate(leaves)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, i: int, partial: torch.Tensor | None):  # noqa: ANN202 - an autograd tensor hook
        def fill(grad: torch.Tensor) -> None:
            view = self._view(i)
            if partial is None:
                view.copy_(grad)
            else:
                torch.add(partial, grad, out=view)
            bucket, _ = self._place[i]
            bucket.filled.add(i)
            while self._next < len(self._buckets) and len(self._buckets[self._next].filled) == len(
                self._buckets[self._next].members
            ):
                self._start_next()

        return fill

    def _start_next(self) -> None:
        bucket = self._buckets[self._next]
        bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
        self._next += 1

    def average(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The mean over the replicas of ``grads`` (one per parameter; ``None`` where a parameter has none).

        A collective over the replica group. The returned tensors are views of the buckets, valid until the
        next backward inside :meth:`watch` or the next call.
        """
        while self._next < len(self._buckets):
            bucket = self._buckets[self._next]
            for i in bucket.members:
                if i in bucket.filled:
                    continue
                if grads[i] is None:
                    self._view(i).zero_()
                else:
                    self._view(i).copy_(grads[i])
            self._start_next()
        self._finish()
        return [self._view(i) if g is not None else None for i, g in enumerate(grads)]

    def _finish(self) -> None:
        for bucket in self._buckets:
            assert bucket.work is not None
            bucket.work.wait()
            # gloo has no averaging reduction: sum, then divide
            bucket.flat.div_(self.num_replicas)
            bucket.work = None
            bucket.filled.clear()
        self._next = 0

    def _settle(self) -> None:
        """Wait for the buckets of a window whose average was never asked for, so a new window starts clean."""
        if self._next or any(b.filled for b in self._buckets):
            for bucket in self._buckets[: self._next]:
                assert bucket.work is not None
                bucket.work.wait()
                bucket.work = None
            for bucket in self._buckets:
                bucket.filled.clear()
            self._next = 0


def _make_buckets(parameters: Sequence[torch.Tensor], cap_bytes: int) -> list[_Bucket]:
    """Consecutive parameters in reverse order, of one dtype and device, about ``cap_bytes`` per bucket."""
    groups: list[list[int]] = []
    size = 0
    for i in reversed(range(len(parameters))):
        p = parameters[i]
        nbytes = p.numel() * p.element_size()
        if groups:
            first = parameters[groups[-1][0]]
            if (first.dtype, first.device) == (p.dtype, p.device) and size + nbytes <= cap_bytes:
                groups[-1].append(i)
                size += nbytes
                continue
        groups.append([i])
        size = nbytes
    buckets = []
    for members in groups:
        offsets, total = [], 0
        for i in members:
            offsets.append(total)
            total += parameters[i].numel()
        first = parameters[members[0]]
        flat = torch.zeros(total, dtype=first.dtype, device=first.device)
        buckets.append(_Bucket(flat, members, offsets))
    return buckets


@torch.no_grad()
def sync_module_states(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Give every replica the parameters and buffers of the group's first rank (replica 0); a collective.

    Replicas built in different processes start from different random weights unless the script seeds them
    alike; this makes them equal, as ``DistributedDataParallel`` does at construction.
    """
    source = dist.get_global_rank(group, 0)
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.detach(), src=source, group=group)
