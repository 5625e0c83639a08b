"""One stage of decoupled parallel backpropagation with delayed gradients (DDG).

Stage ``k`` of ``K`` has delay ``d = K-1-k``. At step ``t`` it forwards batch ``t`` and then backwards batch
``t-d``: the gradient at its output is the input gradient that stage ``k+1`` computed for that batch one
step earlier, and the gradient of its own weights is taken at the weights batch ``t-d``'s forward used.
The first ``d`` steps have no backward (warm-up); :meth:`DDGStage.drain` finishes the last ``d`` batches.
This module is plain PyTorch: it knows nothing of Lightning.

A weight that several stages use (``Partition.tied``) has a copy on each of them. Its gradients are kept apart
from the stage's accumulation window: at the steps where its owner with the least delay completes a window (and
at the last step of the drain), every owner sums the gradients all owners computed since the previous update
(:class:`~lightning_ddg.comm.TiedGroup`) and steps its copy with them, also in warm-up, so the copies stay equal.

Memory modes (see ``docs/semantics.md``):

- ``"stash"``: keep each in-flight batch's autograd graph, built on the data the live weights had when its forward
  ran (of those its backward reads: not an embedding's), which the batch keeps when its step ends: the live weights
  then move to a copy of it.
- ``"recompute"``: keep the stage input, the weight copy and the RNG state; redo the forward at backward.
- ``"replay"``: keep the stage input and RNG state; redo the forward with the *current* weights (inexact).

Example, driving stage ``k`` by hand (``links`` from :class:`~lightning_ddg.topology.StageLinks`)::

    stage = DDGStage(module, stage_index=k, num_stages=K, links=links)
    for x, y in loader:
        out = stage.forward(x)                        # None except on the last stage
        loss = loss_fn(out, y) if stage.is_last else None
        if stage.backward(loss):                       # an accumulation window is complete
            stage.install_gradients(); optimizer.step()
    for ready in stage.drain():
        if ready:
            stage.install_gradients(); optimizer.step()
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_ddg._compat import (
    buffer_table,
    foreach_add_,
    foreach_copy_,
    parameter_table,
    tree_flatten,
    version_counter,
)
from lightning_ddg.checks import check_finite, check_trainable_unchanged, crossing_values
from lightning_ddg.comm import PipelineStopped, TiedGroup
from lightning_ddg.partition import TiedWeight
from lightning_ddg.replicas import ReplicaAverager, sync_module_states
from lightning_ddg.schedule import Action, Kind, backward_batch, completes_window, copies_weights, delay, keeps_graph
from lightning_ddg.stats import Snapshot, StageCounters, decode_snapshots, encode_snapshots
from lightning_ddg.topology import StageLinks

__all__ = ["DDGStage", "MemoryMode", "MEMORY_MODES"]

log = logging.getLogger(__name__)

MemoryMode = Literal["stash", "recompute", "replay"]
MEMORY_MODES = ("stash", "recompute", "replay")


@dataclass
class _InFlight:
    """What a stage keeps of one batch between its forward and its delayed backward."""

    batch: int
    inputs: list[Any]
    outputs: list[torch.Tensor] | None  # autograd graph (stash) or None (recompute, replay)
    # the weights its forward used, None when the live weights are exact: leaves on the data the live weights had
    # then, which they leave to the batch when its step ends (``copy``)
    weights: list[torch.Tensor] | None
    rng: tuple[torch.Tensor, torch.Tensor | None] | None
    autocast: tuple[str, torch.dtype, bool] | None
    returned: list[torch.Tensor]  # received inputs the last stage returned as they are: the caller may keep them
    buffers: dict[int, torch.Tensor] | None = None  # recompute: the buffers the forward updates, as it read them
    versions: list[int] | None = None  # of the live weights when the forward read them
    copy: list[torch.Tensor] | None = None  # that data, once the live weights moved on


@dataclass
class _TiedCopy:
    """This stage's copy of a weight several stages use, and the gradients it summed since the last update."""

    index: int  # position among the stage's trained parameters
    delays: list[int]  # of every stage holding a copy
    group: TiedGroup | None  # None for a stage driven without links
    grad: torch.Tensor | None = None
    updated: int = -1  # the step of the last update

    def contributed(self, after: int, until: int, last_batch: int) -> bool:
        """Whether any owner backwarded a batch at a step in ``(after, until]`` (owner ``j`` backwards batch ``b`` at
        step ``b + d_j``, for ``0 <= b <= last_batch``)."""
        return any(max(after + 1, d) <= min(until, last_batch + d) for d in self.delays)


# the saved activations of one batch are measured on every this-many-th batch, so that the cost of measuring
# them (a hook on every saved tensor) stays off the usual step
_ACTIVATION_SAMPLE_EVERY = 100


class DDGStage:
    """Forward, delayed backward and gradient accumulation of one pipeline stage.

    Args:
        module: the stage's module in train mode; its ``forward`` takes the tensors crossing into the stage
            (for the first stage: the model input) and returns those crossing out (last stage: the output).
        stage_index: ``k``, counted from 0 in forward order.
        num_stages: ``K``.
        links: channels to the neighbouring stages (``None`` when ``K == 1``). With a ``replica_group``, the
            replicas of this stage start from replica 0's weights and average their gradients in
            :meth:`install_gradients` (see :mod:`lightning_ddg.replicas`); constructing the stage is then a
            collective over that group.
        memory: ``"stash"`` (default), ``"recompute"`` or ``"replay"``.
        accumulate_grad_batches: a window of batches whose gradients are summed before a step, aligned to
            batch numbers: the window is complete after the backward of batch ``b`` when ``(b+1) % A == 0``.
        eval_module: the stage traced in eval mode, used by :meth:`evaluate` (defaults to ``module``).
        check_finite: raise ``FloatingPointError`` when a gradient received from the next stage holds a NaN
            or an infinity (one check per backward; on a GPU it waits for the gradient).
        tied: the weights shared across stages (``Partition.tied``); ``links.tied`` holds their groups, and the
            copies held by this stage start from the first owner's values (constructing the stage is then a
            collective over each group).
    """

    def __init__(
        self,
        module: nn.Module,
        stage_index: int,
        num_stages: int,
        links: StageLinks | None = None,
        memory: MemoryMode = "stash",
        accumulate_grad_batches: int = 1,
        eval_module: nn.Module | None = None,
        check_finite: bool = False,
        tied: Sequence[TiedWeight] = (),
    ) -> None:
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory={memory!r} is not one of {MEMORY_MODES}")
        if not 0 <= stage_index < num_stages:
            raise ValueError(f"stage_index {stage_index} is outside 0..{num_stages - 1}")
        if num_stages > 1 and links is None:
            raise ValueError("a pipeline of more than one stage needs links to the neighbouring stages")
        self.module = module
        self.eval_module = eval_module if eval_module is not None else module
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.delay = delay(stage_index, num_stages)
        self.links = links or StageLinks()
        self.memory = memory
        self.accumulate_grad_batches = accumulate_grad_batches
        self.check_finite = check_finite
        self._every_parameter = list(module.named_parameters())
        self._trainable = [p.requires_grad for _, p in self._every_parameter]  # fixed: weights are stashed by them
        named = [(n, p) for n, p in self._every_parameter if p.requires_grad]
        self._names = [n for n, _ in named]
        self._weight_slots = _slots(module, parameter_table, [p for _, p in named])
        self._buffer_slots = _slots(module, buffer_table, list(module.buffers()))
        self._updated_buffers: set[int] | None = None  # those a training forward changes in place, once one ran
        self.parameters = [p for _, p in named]
        # a batch's weights hold the live tensor, not a copy, where its backward reads no value (a bias's, say)
        first_of_several = stage_index == 0 and num_stages > 1
        unread = (
            _unread_by_backward(module, self.parameters, first_of_several) if keeps_graph(memory, self.delay) else set()
        )
        self._stashed = [i for i in range(len(self.parameters)) if i not in unread]
        self._stashed_parameters = [self.parameters[i] for i in self._stashed]
        self._weight_bytes = sum(p.numel() * p.element_size() for p in self._stashed_parameters)  # of one stash
        self._inflight: deque[_InFlight] = deque()
        self._spare_copies: list[list[torch.Tensor]] = []  # copies no batch in flight reads any more
        self._grads: list[torch.Tensor | None] = [None] * len(self.parameters)
        self._has_grads = False
        self.batches_forwarded = 0
        self.batches_backwarded = 0
        # the fit was asked to end on a later stage (the last stage's training_step set trainer.should_stop): the
        # request travels upstream in the headers of the gradients, so that the first stage ends the fit
        self.end_requested = False
        self.counters = StageCounters()
        self._upstream: list[Snapshot] = []  # the latest snapshots of the stages before this one
        self._activation_bytes = 0  # saved activations of one batch, last measured
        self._tied = self._tied_copies(tied)
        tied_positions = {c.index for c in self._tied}
        self._own = [i for i in range(len(self.parameters)) if i not in tied_positions]  # stepped on its windows
        self._own_due = False
        self._tied_due: list[_TiedCopy] = []
        self._replicas: ReplicaAverager | None = None
        self.trace: list[Action] | None = None  # a list here records every action taken (lightning_ddg.schedule)
        if self.links.replica_group is not None:
            sync_module_states(module, self.links.replica_group)
            self._replicas = ReplicaAverager([self.parameters[i] for i in self._own], self.links.replica_group)
        for copy in self._tied:
            if copy.group is not None:
                copy.group.broadcast(self.parameters[copy.index].detach())

    def _tied_copies(self, tied: Sequence[TiedWeight]) -> list[_TiedCopy]:
        copies = []
        positions = {name: i for i, name in enumerate(self._names)}
        for i, weight in enumerate(tied):
            if self.stage_index not in weight.stages:
                continue
            name = weight.name_in(self.stage_index)
            if name not in positions:
                continue  # frozen: nothing to keep in step
            group = self.links.tied[i] if i < len(self.links.tied) else None
            if group is None and self.num_stages > 1:
                raise ValueError(
                    f"{weight.name} is used by stages {list(weight.stages)}, whose copies must be kept equal: create "
                    "the links with StageLinks.create(..., tied=[w.stages for w in partition.tied])"
                )
            delays = [delay(k, self.num_stages) for k in weight.stages]
            copies.append(_TiedCopy(positions[name], delays, group))
        return copies

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def in_flight(self) -> int:
        """Batches forwarded whose backward has not run yet."""
        return len(self._inflight)

    # forward ---------------------------------------------------------------------------------------------
    def _receive(self, channel: Any) -> list[torch.Tensor]:
        start, copied = time.perf_counter(), channel.copied_s
        tensors = channel.recv()
        copying = channel.copied_s - copied  # out of shared memory: the cost of receiving, not waiting
        self.counters.wait_s += time.perf_counter() - start - copying
        self.counters.send_s += copying
        return tensors

    def _receive_inputs(self) -> list[torch.Tensor]:
        assert self.links.act_in is not None
        tensors = self._receive(self.links.act_in)
        self._upstream = decode_snapshots(self.links.act_in.note)
        return tensors

    def _send(self, channel: Any, tensors: list[Any], note: list[int] | None = None) -> None:
        start, blocked = time.perf_counter(), channel.blocked_s
        channel.send(tensors, note)
        waited = channel.blocked_s - blocked  # for the peer to take older messages: waiting on it, not sending
        self.counters.send_s += time.perf_counter() - start - waited
        self.counters.wait_s += waited

    def _send_outputs(self, outputs: list[Any]) -> None:
        # the header carries this stage's figures and those of the stages before it on to the last stage
        assert self.links.act_out is not None
        sent = [t.detach() if isinstance(t, torch.Tensor) else t for t in outputs]
        self._send(self.links.act_out, sent, encode_snapshots(self.snapshots()))

    def _run(
        self, inputs: list[Any], weights: list[torch.Tensor] | None, buffers: dict[int, torch.Tensor] | None = None
    ) -> Any:
        """Run the module, on ``weights`` instead of the live parameters if given; with ``buffers`` (a
        recomputation), on those (by index) and on copies of the other buffers, so that the live ones (BatchNorm
        statistics) stay as they are."""
        if weights is None and buffers is None:
            return self.module(*inputs)
        swaps = []
        if weights is not None:
            swaps += [(slot, weights[i]) for slot, i in self._weight_slots]
        if buffers is not None:
            kept = [buffers[i] if i in buffers else b.clone() for i, b in enumerate(self.module.buffers())]
            swaps += [(slot, kept[i]) for slot, i in self._buffer_slots]
        with _swapped(swaps):
            return self.module(*inputs)

    def _run_keeping_buffers(self, inputs: list[Any], weights: list[torch.Tensor] | None) -> tuple[Any, dict]:
        """A training forward whose batch is recomputed later (``"recompute"``): run it, and return with its output
        the buffers it updates (BatchNorm statistics, spectral norm's vectors) as it read them, for the
        recomputation to read them alike. Those are the buffers the first forward changed, and any a later one
        changes in place (the first such forward is recomputed on the buffer as it is then)."""
        live = list(self.module.buffers())
        first = self._updated_buffers is None
        kept = {i: live[i].clone() for i in (range(len(live)) if first else self._updated_buffers or ())}
        before = [version_counter(b) for b in live]
        output = self._run(inputs, weights)
        # a kernel may write a buffer without counting it (BatchNorm's statistics): the first forward compares values
        changed = {
            i for i, b in enumerate(live) if version_counter(b) != before[i] or (first and not torch.equal(b, kept[i]))
        }
        self._updated_buffers = changed | (self._updated_buffers or set())
        return output, {i: t for i, t in kept.items() if i in self._updated_buffers}

    def forward(self, *args: Any) -> Any:
        """Forward the next batch with the current weights.

        The first stage takes the model input as ``args``; other stages ignore ``args`` and receive their
        input from the previous stage. The last stage returns the model output (compute the loss from it
        and pass it to :meth:`backward`); the others send their output on and return ``None``.
        """
        mark = self.counters.mark()
        if [p.requires_grad for _, p in self._every_parameter] != self._trainable:
            check_trainable_unchanged(self._every_parameter, self._trainable)
        if self.is_first and self.is_last:
            inputs = list(args)
        elif self.is_first:  # its input's gradient goes nowhere: never computed (_unread_by_backward counts on it)
            inputs = [x.detach() if isinstance(x, torch.Tensor) else x for x in args]
        else:
            try:
                received = self._receive_inputs()
            except PipelineStopped as stopped:
                self.stop(stopped.signum)
                raise
            inputs = [t.requires_grad_() if _is_float_tensor(t) else t for t in received]
        counters = self.counters
        counters.steps += 1
        counters.samples += _batch_size(inputs)
        weights = self._live_weights() if copies_weights(self.memory, self.delay) else None
        keep_graph = keeps_graph(self.memory, self.delay)
        rng = autocast = None
        if not keep_graph:
            rng = (torch.get_rng_state(), _device_rng_state(inputs))
            autocast = _autocast_state(inputs)
        measure = keep_graph and self.batches_forwarded % _ACTIVATION_SAMPLE_EVERY == 0
        kept_buffers = None
        with nullcontext() if keep_graph else torch.no_grad(), self._measured(measure, weights):
            if self.memory == "recompute" and not keep_graph:
                output, kept_buffers = self._run_keeping_buffers(inputs, weights)
            else:
                output = self._run(inputs, weights)
        outputs = crossing_values(output, self.module, self.stage_index) if not self.is_last else None
        returned = [] if self.is_first or not self.is_last else _among(inputs, output)
        kept = outputs if keep_graph else None
        versions = [version_counter(p) for p in self._stashed_parameters] if weights is not None else None
        self._inflight.append(
            _InFlight(self.batches_forwarded, inputs, kept, weights, rng, autocast, returned, kept_buffers, versions)
        )
        self._record("F", self.batches_forwarded)
        if self.batches_forwarded == 0:
            log.info(
                "stage %d of %d: first forward (delay %d, memory %s)",
                self.stage_index,
                self.num_stages,
                self.delay,
                self.memory,
            )
        self.batches_forwarded += 1
        if outputs is not None:
            self._send_outputs(outputs)
        if not self.is_last and self.links.grad_in is not None:
            self.links.grad_in.prefetch()
        counters.busy_s += counters.own_since(mark)
        return output if self.is_last else None

    def stop(self, signum: int) -> None:
        """End the pipeline before this step's forward because the job was asked to stop (by signal ``signum``):
        the next stage's :meth:`forward` then raises :class:`~lightning_ddg.comm.PipelineStopped` after passing
        the stop on, and so does the next batch each later stage receives from the first (``batches.py``), so
        that every stage stops after the same step. Nothing is drained."""
        for channel in [self.links.act_out, *(channel for channel, _ in self.links.batch_out)]:
            if channel is not None:
                channel.send_end(signum)

    @torch.no_grad()
    def evaluate(self, *args: Any) -> Any:
        """Forward-only pass of an evaluation batch with the eval-mode module; in-flight state is untouched."""
        assert self.is_first or self.links.act_in is not None
        inputs = list(args) if self.is_first else self.links.act_in.recv()  # not counted in the training stats
        output = self.eval_module(*inputs)
        if self.is_last:
            return output
        self._send_outputs(crossing_values(output, self.eval_module, self.stage_index))
        return None

    # backward --------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor | None = None) -> bool:
        """Backward the batch whose delay has elapsed, if any; call once per step after :meth:`forward`.

        The last stage passes the loss of the batch it just forwarded. Returns ``True`` when an accumulation
        window is complete or a tied weight is due (in warm-up too), and :meth:`install_gradients` followed by an
        optimizer step is due: every owner of a tied weight must then step, for its copy to stay equal.
        """
        step = self.batches_forwarded - 1
        due = backward_batch(step, self.delay)
        completes = False
        if due is not None:  # in warm-up batch t-d does not exist yet; a tied weight may still be due
            if not self._inflight or self._inflight[0].batch != due:
                held = self._inflight[0].batch if self._inflight else None
                raise RuntimeError(
                    f"stage {self.stage_index} is due to backward batch {due}, but the oldest batch it holds is "
                    f"{held}: call backward() once after each forward()"
                )
            completes = self._backward_oldest(loss)
        return self._leave_unless(self._updates_due(step, completes, draining=False))

    def drain(self) -> Iterator[bool]:
        """The steps after the last batch: backward the batches still in flight, one per step, until every owner
        of the stage's tied weights has backwarded its last batch; yields what :meth:`backward` returns.

        After the last batch, a final incomplete accumulation window also yields ``True``. The gradients installed
        for the previous step are released before each backward (as Lightning's training loop does before each of
        its own), so that the drain holds one set of gradients, not two.
        """
        log.info("stage %d: draining %d batch(es) in flight", self.stage_index, len(self._inflight))
        last = self.batches_forwarded - 1
        end = last + max([self.delay, *(max(c.delays) for c in self._tied)])
        for step in range(last + 1, end + 1):
            batch = backward_batch(step, self.delay)
            due = bool(self._inflight) and batch is not None and self._inflight[0].batch <= batch
            if due:
                for p in self.parameters:
                    p.grad = None  # already stepped with; install_gradients sets every p.grad again
            completes = self._backward_oldest(None) if due else False
            yield self._leave_unless(self._updates_due(step, completes, draining=True))
        if self._has_grads:
            self._own_due, self._tied_due = True, []
            yield True

    def _leave_unless(self, update_due: bool) -> bool:
        """Where no optimizer step follows, the step ends here: the live weights move on now (what the caller does
        until the next forward, a callback that changes weights, say, then leaves the batches in flight alone)."""
        if not update_due:
            self._leave_live_weights()
        return update_due

    def _updates_due(self, step: int, window_complete: bool, draining: bool) -> bool:
        """Whether an optimizer step follows ``step``: the stage's window is complete, or a tied weight is due.

        A tied weight is due when the window of its owner with the least delay ends (windows aligned to that
        owner's batches), and at the last step of the drain at which an owner backwards, provided some owner
        backwarded since its last update; every owner reaches the same decision on its own.
        """
        last_batch = self.batches_forwarded - 1
        self._own_due = window_complete
        self._tied_due = []
        for copy in self._tied:
            least, most = min(copy.delays), max(copy.delays)
            ends = step >= least and completes_window(step - least, self.accumulate_grad_batches)
            final = draining and step == last_batch + most
            if (ends or final) and copy.contributed(copy.updated, step, last_batch):
                self._tied_due.append(copy)
                copy.updated = step
        return window_complete or bool(self._tied_due)

    def _backward_oldest(self, loss: torch.Tensor | None) -> bool:
        mark = self.counters.mark()
        item = self._inflight.popleft()
        if self.is_last:
            if loss is None:
                raise ValueError("the last stage needs the loss of the batch it forwarded")
            targets, grad_targets = [loss], [None]
        else:
            assert self.links.grad_in is not None
            grad_targets = self._receive(self.links.grad_in)
            self.end_requested = self.end_requested or bool(self.links.grad_in.note[:1] == [1])
            if self.check_finite:
                check_finite(grad_targets, *_gradient_blame(self.stage_index, item.batch))
            targets = item.outputs if item.outputs is not None else self._recompute(item)
        # a value that crossed in the header (None, a number) has no gradient
        pairs = [(t, g) for t, g in zip(targets, grad_targets, strict=False) if _requires_grad(t)]
        weights = item.weights if item.weights is not None else self.parameters
        float_inputs = [x for x in item.inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        leaves = list(weights) + float_inputs
        completes = completes_window(item.batch, self.accumulate_grad_batches)
        # the window's last backward starts the replicas' all-reduce of each bucket as soon as it is full
        replicas = self._replicas if completes and pairs and leaves else None
        watching = nullcontext()
        if replicas is not None:  # the lists only when a window's all-reduce starts: this is the per-step path
            watching = replicas.watch([weights[i] for i in self._own], [self._grads[i] for i in self._own])
        # a layer that runs its forward again during backward (gradient checkpointing) reads the batch's own weights
        stashed = [(slot, item.weights[i]) for slot, i in self._weight_slots] if item.weights is not None else []
        with watching, _swapped(stashed):
            grads = _gradients([t for t, _ in pairs], [g for _, g in pairs], leaves)
        weight_grads = grads[: len(weights)]
        for copy in self._tied:  # summed apart from the window, and over every owner before an update
            g, weight_grads[copy.index] = weight_grads[copy.index], None
            if g is not None:
                copy.grad = g if copy.grad is None else copy.grad.add_(g)
        self._accumulate(weight_grads)
        if item.copy is not None and not any(other.copy is item.copy for other in self._inflight):
            self._spare_copies.append(item.copy)  # no graph reads it any more: it serves a later update
        if not self.is_first:
            input_grads = dict(zip(map(id, float_inputs), grads[len(weights) :], strict=False))
            self._send_input_gradients(item.inputs, input_grads)
            # the channel reuses only tensors whose data nothing else holds; a tensor object handed back to the
            # caller as it is would not show in that count
            self.links.act_in.release([x for x in item.inputs if not any(x is r for r in item.returned)])  # type: ignore[union-attr]
        if not self.is_last:
            self.links.grad_in.release(grad_targets)  # type: ignore[union-attr]
        self.batches_backwarded += 1
        self._record("B", item.batch)
        counters = self.counters
        counters.busy_s += counters.own_since(mark)
        return completes

    def _live_weights(self) -> list[torch.Tensor]:
        """The weights a forward runs on: leaves on the live weights' data, with version counters of their own (the
        optimizer's in-place update bumps the live weights' counters); when the step ends, the live weights move to
        new data and leave this data to the batch (:meth:`_leave_live_weights`)."""
        weights = list(self.parameters)
        for i in self._stashed:
            weights[i] = weights[i].data.requires_grad_()
        return weights

    def _leave_live_weights(self) -> None:
        """At the end of a step (before its optimizer step, if any): the live weights move to new data, a copy of
        their values, and leave the data they had to the batch forwarded in the step, whose graph holds it (through
        views too). Copying here rather than at the forward keeps ``d`` copies on a stage with delay ``d``, not
        ``d + 1``: the batch forwarded last reads the live weights until its step ends. After the first ``d`` steps,
        moving allocates nothing."""
        sharing = [item for item in self._inflight if item.weights is not None and item.copy is None]
        if not sharing or not self._stashed:  # a stage whose weights no backward reads copies nothing
            return
        for item in sharing:
            self._check_unchanged(item)
        if self._spare_copies:
            fresh = self._spare_copies.pop()
        else:
            fresh = [torch.empty_like(p, memory_format=torch.preserve_format) for p in self._stashed_parameters]
        with torch.no_grad():
            foreach_copy_(fresh, self._stashed_parameters)
        left = [p.data for p in self._stashed_parameters]
        for p, data in zip(self._stashed_parameters, fresh, strict=True):
            p.data = data
        for item in sharing:
            item.copy = left

    def _check_unchanged(self, item: _InFlight) -> None:
        assert item.versions is not None
        for j, p in enumerate(self._stashed_parameters):
            if version_counter(p) != item.versions[j]:
                name = self._names[self._stashed[j]]
                raise RuntimeError(
                    f"the weight {name!r} of stage {self.stage_index} was changed in place after batch {item.batch}'s "
                    "forward and before the end of its step. The stage reads a batch's weights for its delayed "
                    "backward from the live ones until its step ends, so the backward would read values the forward "
                    "did not use. Change weights in the optimizer step or after the step (from on_train_batch_end, "
                    "say), not between the forward and the optimizer step."
                )

    def _recompute(self, item: _InFlight) -> list[torch.Tensor]:
        """Redo the forward of ``item`` with its RNG state, and in recompute mode with the buffers it read, leaving
        the live buffers (BatchNorm statistics) unchanged."""
        assert item.rng is not None and item.autocast is not None
        self._record("R", item.batch)
        cpu_state, device_state = item.rng
        device = [torch.cuda.current_device()] if device_state is not None else []
        device_type, dtype, enabled = item.autocast
        with torch.random.fork_rng(devices=device), torch.enable_grad():
            torch.set_rng_state(cpu_state)
            if device_state is not None:
                torch.cuda.set_rng_state(device_state)
            measure = item.batch % _ACTIVATION_SAMPLE_EVERY == 0
            with torch.autocast(device_type, dtype=dtype, enabled=enabled), self._measured(measure, item.weights):
                output = self._run(item.inputs, item.weights, buffers=item.buffers or {})
        return crossing_values(output, self.module, self.stage_index)

    def _send_input_gradients(self, inputs: list[Any], grads: dict[int, torch.Tensor | None]) -> None:
        assert self.links.grad_out is not None
        out = []
        for x in inputs:
            if not isinstance(x, torch.Tensor):  # None or a number: no gradient goes back
                out.append(None)
                continue
            g = grads.get(id(x))
            out.append(g if g is not None else torch.zeros_like(x))
        self._send(self.links.grad_out, out, [1] if self.end_requested else None)

    # figures ---------------------------------------------------------------------------------------------
    def snapshots(self) -> list[Snapshot]:
        """The running totals of stages ``0..k`` as this stage last knew them; on the last stage, every stage's.

        Weight copies are counted as held now; activations as the most the in-flight graphs hold at once (the
        saved tensors of one batch, measured every so often, times the graphs kept).
        """
        weights = self._weight_bytes * len({id(item.copy) for item in self._inflight if item.copy is not None})
        if keeps_graph(self.memory, self.delay):
            activations = self._activation_bytes * (self.delay + 1)
        else:  # the inputs kept for recomputation, and one recomputed graph at a time
            inputs = (x for item in self._inflight for x in item.inputs if isinstance(x, torch.Tensor))
            activations = self._activation_bytes + sum(x.numel() * x.element_size() for x in inputs)
        own = self.counters.snapshot(weights, activations)
        return [*self._upstream[: self.stage_index], own]

    @contextmanager
    def _measured(self, enabled: bool, weights: list[torch.Tensor] | None) -> Iterator[None]:
        """With ``enabled``, count the bytes the autograd graph saves for backward, the weights left out."""
        if not enabled:
            yield
            return
        skip = {t.untyped_storage().data_ptr() for t in (weights if weights is not None else self.parameters)}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            # the tensor's own bytes, not its storage's: an input may be a view of a whole dataset
            if t.untyped_storage().data_ptr() not in skip:
                saved[t.data_ptr()] = max(saved.get(t.data_ptr(), 0), t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self._activation_bytes = sum(saved.values())

    # gradients -------------------------------------------------------------------------------------------
    def _accumulate(self, grads: list[torch.Tensor | None]) -> None:
        if not self._has_grads:  # the first batch of a window: its gradients are the sums so far
            self._grads = list(grads)
        elif all(a is not None for a in self._grads) and all(g is not None for g in grads):
            foreach_add_(self._grads, grads)  # one fused call, not one per parameter
        else:
            for i, g in enumerate(grads):
                if g is not None:
                    self._grads[i] = g if self._grads[i] is None else self._grads[i].add_(g)
        self._has_grads = self._has_grads or any(g is not None for g in grads)

    def install_gradients(self) -> None:
        """Put the gradients of the update that :meth:`backward` or :meth:`drain` announced into ``p.grad`` of the
        live parameters, ``None`` for the others: a complete window's sums, averaged over the replicas if any (a new
        window starts), and each due tied weight's sum over its owners (a collective over its group). The live weights
        move to new data first (:meth:`_leave_live_weights`): the optimizer step then changes them in place."""
        self._leave_live_weights()
        if self._own_due:
            own = [self._grads[i] for i in self._own]
            if self._replicas is not None:
                own = self._replicas.average(own)
            for i, g in zip(self._own, own, strict=True):
                self.parameters[i].grad = g
            self._grads = [None] * len(self.parameters)
            self._has_grads = False
        else:
            for i in self._own:
                self.parameters[i].grad = None
        for copy in self._tied:
            p = self.parameters[copy.index]
            if not any(copy is due for due in self._tied_due):
                p.grad = None
                continue
            grad = copy.grad if copy.grad is not None else torch.zeros_like(p)
            if copy.group is not None:
                start = time.perf_counter()
                copy.group.combine(grad)
                self.counters.wait_s += time.perf_counter() - start
            p.grad, copy.grad = grad, None
        self._own_due, self._tied_due = False, []
        self._record("S")

    def _record(self, kind: Kind, batch: int | None = None) -> None:
        if self.trace is not None:
            self.trace.append(Action(kind, batch))


def _gradients(
    targets: list[torch.Tensor], grad_targets: list[torch.Tensor | None], leaves: list[torch.Tensor]
) -> list[torch.Tensor | None]:
    """The gradients of ``targets`` (seeded with ``grad_targets``) with respect to ``leaves``; ``None`` for a
    leaf they do not depend on. Through ``.grad`` fields, which costs markedly less than ``autograd.grad``."""
    if not targets or not leaves:
        return [None] * len(leaves)
    saved = [leaf.grad for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    torch.autograd.backward(targets, grad_targets, inputs=leaves)
    grads = [leaf.grad for leaf in leaves]
    for leaf, grad in zip(leaves, saved, strict=True):
        leaf.grad = grad
    return grads


_Slot = tuple[dict, str]  # a module's _parameters or _buffers table, and the attribute name


_BIAS_UNREAD = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # their bias's gradient sums the output's gradient


def _unread_by_backward(module: nn.Module, parameters: list[torch.Tensor], input_needs_no_grad: bool) -> set[int]:
    """The indices of ``parameters`` whose values no backward reads, so that a batch's stash needs no copy of them:

    - the weight of an ``nn.Embedding`` (its gradient scatters the output's gradient by the indices alone);
    - the bias of an ``nn.Linear`` or ``nn.Conv{1,2,3}d`` (its gradient sums the output's gradient);
    - with ``input_needs_no_grad`` (a first stage of several, which detaches its input), the weight of an
      ``nn.Linear`` whose every call takes the stage's input: its gradient reads that input, and the input's
      gradient, the one reader of the weight, is never computed (autograd does not even save the weight);

    each held by nothing else, in a module without hooks of its own that the stage's graph calls directly and never
    from inside a module it calls whole, and in a graph that calls no checkpoint (a recomputed forward would read
    it). Empty for a module that is no graph. Should a backward read one after all, autograd raises: the batch's
    graph holds the live parameter, which the optimizer step changes in place."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return set()
    if any(node.op == "call_function" and "checkpoint" in str(node.target) for node in graph.nodes):
        return set()
    calls = [node for node in graph.nodes if node.op == "call_module"]
    called = {node.target for node in calls}
    on_input = called - {n.target for n in calls if not (n.args and getattr(n.args[0], "op", None) == "placeholder")}
    holders: dict[int, list[tuple[str, str, nn.Module]]] = {}
    index = {id(p): i for i, p in enumerate(parameters)}
    for name, m in module.named_modules(remove_duplicate=False):
        for attr, t in parameter_table(m).items():
            if t is not None and id(t) in index:
                holders.setdefault(index[id(t)], []).append((name, attr, m))

    def unread_there(name: str, attr: str, m: nn.Module) -> bool:
        if name not in called or m._forward_hooks or m._forward_pre_hooks:
            return False
        if type(m) is nn.Embedding:
            return attr == "weight" and m.max_norm is None
        if type(m) is nn.Linear and attr == "weight":
            return input_needs_no_grad and name in on_input
        return type(m) in _BIAS_UNREAD and attr == "bias"

    unread = set()
    for i, held in holders.items():
        # a module called whole whose code calls this one may run it under a checkpoint of its own
        inside = any(c != name and name.startswith(c + ".") for name, _, _ in held for c in called)
        if all(unread_there(*h) for h in held) and not inside:
            unread.add(i)
    return unread


def _slots(
    module: nn.Module, table: Callable[[nn.Module], dict], tensors: list[torch.Tensor]
) -> list[tuple[_Slot, int]]:
    """Every place in ``module`` that holds one of ``tensors`` (a shared tensor has several), with its index."""
    index = {id(t): i for i, t in enumerate(tensors)}
    return [
        ((table(m), attr), index[id(t)])
        for _, m in module.named_modules(remove_duplicate=False)
        for attr, t in table(m).items()
        if t is not None and id(t) in index
    ]


@contextmanager
def _swapped(swaps: list[tuple[_Slot, torch.Tensor]]) -> Iterator[None]:
    """Put tensors in the modules' places for the duration of a call (what ``torch.func.functional_call`` does,
    without its per-call cost of walking the module tree)."""
    saved = [(table, attr, table[attr]) for (table, attr), _ in swaps]
    for (table, attr), tensor in swaps:
        table[attr] = tensor
    try:
        yield
    finally:
        for table, attr, tensor in saved:
            table[attr] = tensor


def _among(tensors: list[Any], values: Any) -> list[Any]:
    """Those of ``tensors`` that are themselves among ``values`` (any nesting of lists, tuples and dicts)."""
    ids = {id(v) for v in tree_flatten(values)[0]}
    return [t for t in tensors if isinstance(t, torch.Tensor) and id(t) in ids]


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _requires_grad(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _batch_size(inputs: list[Any]) -> int:
    x = next((v for v in inputs if isinstance(v, torch.Tensor)), None)  # the first may be None or a number
    return x.shape[0] if x is not None and x.dim() else 0


def _gradient_blame(stage_index: int, batch: int) -> tuple[str, str]:
    return (
        f"the gradient stage {stage_index} received from stage {stage_index + 1} for batch {batch}",
        f"Stage {stage_index + 1}'s backward produced it from a finite gradient: Trainer(detect_anomaly=True) names "
        "the operation; a lower learning rate or gradient clipping (gradient_clip_val) may prevent it.",
    )


def _device_rng_state(inputs: list[Any]) -> torch.Tensor | None:
    if any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs):
        return torch.cuda.get_rng_state()
    return None


def _autocast_state(inputs: list[Any]) -> tuple[str, torch.dtype, bool]:
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    device_type = "cuda" if cuda else "cpu"
    return device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)
