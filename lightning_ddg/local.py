"""All stages of one pipeline in one process and one thread, stepped in lock-step.

:class:`LocalChannel` has the interface of :class:`~lightning_ddg.comm.Channel` over a queue in memory;
:func:`local_links` joins ``K`` stages with them; :class:`LockStep` builds the stages and drives them the way
``K`` processes would run, one step at a time: every stage forwards batch ``t`` in forward order, then every
stage backwards the batch its delay makes due. The stages run the very runtime of a real job
(:class:`~lightning_ddg.stage.DDGStage`); only the transport differs. Each stage draws from its own random
number streams, as a process of its own would. This is what the runtime-vs-reference tests use: no process to
start, a result in milliseconds, and on one GPU the CUDA paths of the runtime can be checked in one process.

Example::

    pipeline = LockStep(model, split_points=["4"], memory="recompute", seed=0)
    optimizers = [torch.optim.SGD(s.parameters, lr=0.1) for s in pipeline.stages]
    for x, y in batches:
        pipeline.step(x, lambda out: loss_fn(out, y), optimizers)
    pipeline.drain(optimizers)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_ddg.build import build_stage
from lightning_ddg.comm import PipelineStopped
from lightning_ddg.partition import split_module
from lightning_ddg.stage import DDGStage, MemoryMode
from lightning_ddg.topology import StageLinks, Topology

__all__ = ["LocalChannel", "LockStep", "local_links"]

_Message = tuple[str, list[Any], list[int]]


class LocalChannel:
    """One direction of a link between two stages of this process: a queue of messages.

    A received tensor is a copy, as one that crossed processes would be: the sender may reuse its tensors and the
    receiver owns what it gets. Receiving from an empty queue raises at once: in one thread nothing else could
    fill it, so the stages were stepped out of order.
    """

    def __init__(self, queue: deque[_Message], name: str, device: torch.device | str = "cpu") -> None:
        self._queue = queue
        self.name = name
        self.device = torch.device(device)
        self.note: list[int] = []  # the note of the last message received
        self.pending_sends = 0
        self.blocked_s = 0.0  # a send never waits here
        self.copied_s = 0.0  # nor copies out of shared memory

    def send(self, message: list[Any], note: list[int] | None = None) -> None:
        copies = [v.detach().to(self.device, copy=True) if isinstance(v, torch.Tensor) else v for v in message]
        self._queue.append(("data", copies, list(note or [])))

    def recv(self) -> list[Any]:
        kind, tensors, note = self._take()
        self.note = note
        if kind == "end":
            if note and note[0]:
                raise PipelineStopped(note[0])
            raise RuntimeError(f"{self.name}: the sender closed the channel while data was still expected")
        return tensors

    def _take(self) -> _Message:
        if not self._queue:
            raise RuntimeError(
                f"{self.name}: nothing to receive. In one process the stages must be stepped in lock-step: every "
                "stage forwards in forward order, then every stage backwards (LockStep does so)."
            )
        return self._queue.popleft()

    def send_end(self, signum: int = 0) -> None:
        self._queue.append(("end", [], [signum]))

    def close_recv(self) -> None:
        kind, _, _ = self._take()
        if kind != "end":
            raise RuntimeError(f"{self.name}: the sender sent data that was never received")

    def prefetch(self) -> None:
        pass  # nothing to post: messages are in memory

    def release(self, received: list[Any]) -> None:
        pass  # every received tensor is a fresh copy

    def flush(self) -> None:
        pass  # sends complete at once


def local_links(num_stages: int, device: torch.device | str = "cpu") -> list[StageLinks]:
    """Links joining stages ``0 .. K-1`` of one pipeline in this process, indexed by stage."""
    links = [StageLinks() for _ in range(num_stages)]
    for k in range(num_stages - 1):
        activations: deque[_Message] = deque()
        gradients: deque[_Message] = deque()
        links[k].act_out = LocalChannel(activations, f"activations {k}->{k + 1}", device)  # type: ignore[assignment]
        links[k + 1].act_in = LocalChannel(activations, f"activations {k}->{k + 1}", device)  # type: ignore[assignment]
        links[k + 1].grad_out = LocalChannel(gradients, f"gradients {k + 1}->{k}", device)  # type: ignore[assignment]
        links[k].grad_in = LocalChannel(gradients, f"gradients {k + 1}->{k}", device)  # type: ignore[assignment]
    return links


class LockStep:
    """``K`` stages of ``module`` cut at ``split_points``, run in this thread as ``K`` processes would run them.

    Args:
        module: the whole model; its stages share its parameters (each stage holds its own part).
        split_points: where it is cut; ``K = len(split_points) + 1``.
        device: where every stage runs.
        seed: each stage's random number streams start from ``torch.manual_seed(seed)``, as in a process of its
            own (and as :class:`~lightning_ddg.reference.DDGReference` gives each stage its own stream).
        memory, accumulate_grad_batches, check_finite: as for :class:`~lightning_ddg.stage.DDGStage`.
        example_input: one batch of what ``forward`` takes, for a model ``torch.fx`` cannot trace (see
            :func:`~lightning_ddg.partition.split_module`).
    """

    def __init__(
        self,
        module: nn.Module,
        split_points: Sequence[str],
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        memory: MemoryMode = "stash",
        accumulate_grad_batches: int = 1,
        check_finite: bool = False,
        example_input: tuple | None = None,
    ) -> None:
        num_stages = len(split_points) + 1
        topology = Topology(num_stages=num_stages)
        partition = split_module(module, list(split_points), num_stages, example_input=example_input)
        links = local_links(num_stages, device)
        self.device = torch.device(device)
        self.stages: list[DDGStage] = [
            build_stage(
                module,
                topology,
                topology.rank_of(k),
                partition=partition,
                device=device,
                links=links[k],
                memory=memory,
                accumulate_grad_batches=accumulate_grad_batches,
                check_finite=check_finite,
            ).stage
            for k in range(num_stages)
        ]
        self._rng = [self._seeded(seed) for _ in self.stages]

    def _seeded(self, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(seed)
            return torch.get_rng_state(), self._cuda_state()

    def _cuda_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    def _cuda_state(self) -> torch.Tensor | None:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    @contextmanager
    def _as_stage(self, k: int) -> Iterator[DDGStage]:
        """Run with stage ``k``'s own random number streams, as in its own process."""
        cpu, cuda = self._rng[k]
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.device)
            try:
                yield self.stages[k]
            finally:
                self._rng[k] = (torch.get_rng_state(), self._cuda_state())

    def step(
        self,
        inputs: Any,
        loss_fn: Callable[[Any], torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer] | None = None,
    ) -> Any:
        """One step of every stage: stage 0 forwards ``inputs`` (a tensor or a tuple of them), the last stage's
        output goes to ``loss_fn``, and each stage backwards the batch due; a stage whose accumulation window
        is complete installs its gradients and steps ``optimizers[k]``. Returns the last stage's output."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        output = None
        for k in range(len(self.stages)):
            with self._as_stage(k) as stage:
                result = stage.forward(*args) if stage.is_first else stage.forward()
                if stage.is_last:
                    output, loss = result, loss_fn(result)
        for k in reversed(range(len(self.stages))):
            with self._as_stage(k) as stage:
                if stage.backward(loss if stage.is_last else None) and optimizers is not None:
                    _update(stage, optimizers[k])
        return output

    def drain(self, optimizers: Sequence[torch.optim.Optimizer] | None = None) -> None:
        """Finish every batch still in flight, a drain step of every stage at a time."""
        drains = [stage.drain() for stage in self.stages]
        active = set(range(len(self.stages)))
        while active:
            for k in sorted(active, reverse=True):
                with self._as_stage(k):
                    ready = next(drains[k], None)
                if ready is None:
                    active.discard(k)
                elif ready and optimizers is not None:
                    _update(self.stages[k], optimizers[k])
        self.close()

    def close(self) -> None:
        """End every channel, as :meth:`StageLinks.close` does in each process: every end marker is sent first."""
        for stage in self.stages:
            for channel in (stage.links.act_out, stage.links.grad_out):
                if channel is not None:
                    channel.send_end()
        for stage in self.stages:
            for channel in (stage.links.act_in, stage.links.grad_in):
                if channel is not None:
                    channel.close_recv()


def _update(stage: DDGStage, optimizer: torch.optim.Optimizer) -> None:
    stage.install_gradients()
    optimizer.step()
