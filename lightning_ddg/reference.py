"""A single-process simulation of DDG, written straight from the specification.

Use it to check a distributed run, to debug a model under delayed gradients without starting processes,
or to study the method on a laptop. It follows ``docs/semantics.md`` step by step and shares no code with
the distributed runtime: every backward is recomputed from a snapshot of the weights (and, except in replay
mode, the buffers) that the batch's forward used, with the stage's own random-number stream restored, so
dropout masks are those of the forward.

Each stage has its own random-number stream, as each stage has its own process in a real run; all streams
start from ``seed``.

A parameter that several stages hold (the same ``Parameter`` object, as :func:`~lightning_ddg.partition.split_module`
leaves tied embeddings) is a *tied weight*. A real run keeps a copy per stage and gives every copy the same
update; the reference keeps the one tensor and applies that update once, with the optimizer of the first stage
that holds it: the rule of ``docs/semantics.md`` ("Weights shared across stages").

Example::

    >>> import torch, torch.nn as nn
    >>> from lightning_ddg.partition import split_module
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> stages = split_module(model, split_points=["2"]).train
    >>> opts = [torch.optim.SGD(s.parameters(), lr=0.1) for s in stages]
    >>> ref = DDGReference(stages, opts, loss_fn=nn.functional.mse_loss)
    >>> for _ in range(3):
    ...     loss = ref.step(torch.randn(5, 4), torch.randn(5, 1))
    >>> ref.finish()   # drain: every batch has now updated every stage
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["DDGReference"]


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, torch.Tensor) else list(value)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)  # else None or a Python number, which crosses as it is


class _Tied:
    """A weight several stages hold, with the gradients its owners contributed since its last update."""

    def __init__(self, param: torch.Tensor, owners: list[int]) -> None:
        self.param = param
        self.owners = owners
        self.grad: torch.Tensor | None = None


class DDGReference:
    """Simulate a ``K``-stage DDG pipeline in one process.

    Args:
        stages: the stage modules in forward order (they are trained in place).
        optimizers: one optimizer per stage, over that stage's parameters.
        loss_fn: ``loss_fn(output, target)`` computed on the last stage's output.
        memory: ``"stash"`` and ``"recompute"`` (both exact, identical results) or ``"replay"``.
        accumulate_grad_batches: ``A``; the loss is divided by ``A``, as Lightning does, and stage ``k`` steps
            after the backward of batch ``b`` when ``(b+1) % A == 0``.
        lr_schedulers: stepped after every step that completes an accumulation window (never in the drain),
            so that every stage sees the same learning rate at a given step.
        seed: start of every stage's random-number stream.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        memory: str = "stash",
        accumulate_grad_batches: int = 1,
        lr_schedulers: Sequence[Any] = (),
        seed: int = 0,
    ) -> None:
        if memory not in ("stash", "recompute", "replay"):
            raise ValueError(f"unknown memory mode {memory!r}")
        self.stages = list(stages)
        self.optimizers = list(optimizers)
        self.loss_fn = loss_fn
        self.memory = memory
        self.accumulate = accumulate_grad_batches
        self.lr_schedulers = list(lr_schedulers)
        self.num_stages = len(self.stages)
        self._scratch = [copy.deepcopy(s) for s in self.stages]
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self._rng = [torch.get_rng_state() for _ in self.stages]
        torch.set_rng_state(saved)
        # per stage: batch number -> (input, weights, buffers, rng state, target)
        self._kept: list[dict[int, tuple]] = [{} for _ in self.stages]
        # gradient for the output of stage k, produced by stage k+1 one step earlier
        self._mailbox: list[dict[int, list[torch.Tensor]]] = [{} for _ in self.stages]
        self._acc: list[list[torch.Tensor | None]] = [[None] * len(list(s.parameters())) for s in self.stages]
        self._tied, self._tied_at = self._find_tied()
        self.step_count = 0
        self.losses: list[float] = []

    def delay(self, k: int) -> int:
        return self.num_stages - 1 - k

    def _find_tied(self) -> tuple[list[_Tied], list[dict[int, _Tied]]]:
        """The parameters held by more than one stage, and per stage: parameter position -> its tied weight."""
        owners: dict[int, tuple[torch.Tensor, list[int]]] = {}
        for k, stage in enumerate(self.stages):
            for p in stage.parameters():
                owners.setdefault(id(p), (p, []))[1].append(k)
        tied = {key: _Tied(p, ks) for key, (p, ks) in owners.items() if len(ks) > 1}
        at = [{i: tied[id(p)] for i, p in enumerate(s.parameters()) if id(p) in tied} for s in self.stages]
        return list(tied.values()), at

    def step(self, inputs: Any, target: Any) -> torch.Tensor:
        """One step: forward batch ``t`` through all stages, then every stage backwards and steps its due batch."""
        t = self.step_count
        x = _as_list(inputs)
        output = None
        for k, stage in enumerate(self.stages):
            weights = [p.detach().clone() for p in stage.parameters()]
            buffers = [b.detach().clone() for b in stage.buffers()]
            torch.set_rng_state(self._rng[k])
            rng = torch.get_rng_state()
            with torch.no_grad():
                output = stage(*x)
            self._rng[k] = torch.get_rng_state()
            self._kept[k][t] = ([v.detach() if _is_tensor(v) else v for v in x], weights, buffers, rng, target)
            x = _as_list(output)
        loss = self.loss_fn(output, target)
        self.losses.append(float(loss))
        self._backward_due(t)
        self.step_count += 1
        if (t + 1) % self.accumulate == 0:
            with warnings.catch_warnings():
                # schedulers advance during warm-up too, before a stage's first optimizer step
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                for scheduler in self.lr_schedulers:
                    scheduler.step()
        return loss.detach()

    def finish(self) -> None:
        """Drain: backward-only steps until every batch has updated every stage; then close partial windows."""
        last = self.step_count - 1
        for t in range(self.step_count, self.step_count + self.num_stages - 1):
            self._backward_due(t, last_batch=last)
        for k in range(self.num_stages):
            if any(g is not None for g in self._acc[k]):
                self._apply(k)

    def _backward_due(self, t: int, last_batch: int | None = None) -> None:
        outgoing: list[tuple[int, int, list[torch.Tensor | None]]] = []
        for k in range(self.num_stages):
            b = t - self.delay(k)
            if b < 0 or (last_batch is not None and b > last_batch):
                continue
            grad_in = self._input_gradients(k, b)
            if k > 0:
                outgoing.append((k - 1, b, grad_in))
            if (b + 1) % self.accumulate == 0:
                self._apply(k)
        for tied in self._tied:
            if tied.grad is not None and self._tied_update_due(tied, t, last_batch):
                self._apply_tied(tied)
        # gradients reach the previous stage at the next step
        for k, b, grads in outgoing:
            self._mailbox[k][b] = grads

    def _input_gradients(self, k: int, b: int) -> list[torch.Tensor | None]:
        inputs, weights, buffers, rng, target = self._kept[k].pop(b)
        scratch = self._scratch[k]
        live = list(self.stages[k].parameters())
        with torch.no_grad():
            if self.memory == "replay":
                weights = [p.detach() for p in live]
                buffers = [v.detach() for v in self.stages[k].buffers()]
            for p, w in zip(scratch.parameters(), weights, strict=False):
                p.copy_(w)
                p.grad = None
            for v, w in zip(scratch.buffers(), buffers, strict=False):
                v.copy_(w)
        leaves = [v.clone().requires_grad_(v.is_floating_point()) if _is_tensor(v) else v for v in inputs]
        saved = torch.get_rng_state()
        torch.set_rng_state(rng)
        output = scratch(*leaves)
        torch.set_rng_state(saved)
        if k == self.num_stages - 1:
            (self.loss_fn(output, target) / self.accumulate).backward()
        else:
            outs = _as_list(output)
            grads = self._mailbox[k].pop(b)
            pairs = [(o, g) for o, g in zip(outs, grads, strict=False) if _is_tensor(o) and o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        for i, p in enumerate(scratch.parameters()):
            if p.grad is not None:
                tied = self._tied_at[k].get(i)
                if tied is not None:  # summed over its owners, not in the stage's window
                    tied.grad = p.grad.clone() if tied.grad is None else tied.grad + p.grad
                    continue
                acc = self._acc[k][i]
                self._acc[k][i] = p.grad.clone() if acc is None else acc + p.grad
        return [(v.grad if v.grad is not None else torch.zeros_like(v)) if _is_tensor(v) else None for v in leaves]

    def _tied_update_due(self, tied: _Tied, t: int, last_batch: int | None) -> bool:
        """A tied weight steps when the window of its owner with the least delay ends, aligned to that owner's
        batches, and at the last step of the drain at which any owner still backwards."""
        least = self.delay(max(tied.owners))
        if t >= least and (t - least + 1) % self.accumulate == 0:
            return True
        return last_batch is not None and t == last_batch + self.delay(min(tied.owners))

    def _apply_tied(self, tied: _Tied) -> None:
        optimizer = self.optimizers[tied.owners[0]]
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        tied.param.grad = tied.grad
        optimizer.step()
        tied.param.grad = tied.grad = None

    def _apply(self, k: int) -> None:
        for p, g in zip(self.stages[k].parameters(), self._acc[k], strict=False):
            p.grad = g
        self.optimizers[k].step()
        self.optimizers[k].zero_grad(set_to_none=True)
        self._acc[k] = [None] * len(self._acc[k])
