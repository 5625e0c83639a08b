"""What each piece of a model costs, and the cuts that make the slowest stage as fast as possible.

A pipeline runs at the speed of its slowest stage, so the stages are chosen to minimise the largest stage cost
(:func:`solve`). The cost of a *segment* (the run of the forward between two candidate cuts) is measured in one
of three ways, from most to least faithful:

- ``"time"``: forward + backward of the segment, timed on the device with a real input (torchgpipe's
  ``balance_by_time``): it sees what parameter counts miss, such as the full-resolution convolutions of a CNN
  that cost much time for few parameters.
- ``"flops"``: floating-point operations of forward + backward, counted by ``torch.utils.flop_counter``.
- ``"params"``: parameter count; needs no input at all.

Or the stages are chosen to make the *largest* stage as small as possible in memory (``"memory"``, for a model that
fits the devices only when its memory is spread evenly): what a stage holds depends on its delay
(:mod:`lightning_ddg.stage_memory`), so the cost of a stage is a function of the stage, not a sum of segment
costs (:func:`solve_stages`).

Plain PyTorch; the segments come from :mod:`lightning_ddg.partition`.

Example::

    >>> solve([4.0, 1.0, 1.0, 2.0], [0, 9, 1], num_stages=2)   # bytes crossing after segments 0, 1, 2
    [1]
    >>> solve([1.0, 1.0, 1.0, 1.0], [5, 1, 5], num_stages=2, tolerance=0.6)  # near-ties go to fewer bytes
    [2]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_ddg._compat import tree_flatten, tree_map

try:
    import resource
except ImportError:  # Windows has no resource module
    resource = None  # type: ignore[assignment]

__all__ = ["BalanceBy", "BALANCE_BY", "solve", "solve_stages", "segment_times", "segment_flops", "run_segments"]

BalanceBy = Literal["time", "flops", "params", "memory"]
BALANCE_BY = ("time", "flops", "params", "memory")


def solve(costs: Sequence[float], cut_bytes: Sequence[float], num_stages: int, tolerance: float = 0.0) -> list[int]:
    """Group consecutive segments into ``num_stages`` non-empty stages.

    Minimises the cost of the most expensive stage; among the groupings whose most expensive stage is within
    ``tolerance`` (a fraction) of that minimum, takes one that sends the fewest bytes across its cuts.

    Args:
        costs: the cost of each segment, in forward order.
        cut_bytes: ``cut_bytes[i]``: what crosses a cut placed after segment ``i`` (``len(costs) - 1`` entries).
        num_stages: how many stages; at most ``len(costs)``.
        tolerance: how much slower than the best a grouping may be and still win on bytes.

    Returns:
        the segment index each stage after the first begins at, ascending.
    """
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    return solve_stages(lambda k, i, j: prefix[j] - prefix[i], len(costs), cut_bytes, num_stages, tolerance)


def solve_stages(
    stage_cost: Callable[[int, int, int], float],
    num_segments: int,
    cut_bytes: Sequence[float],
    num_stages: int,
    tolerance: float = 0.0,
) -> list[int]:
    """:func:`solve` for costs that depend on the stage: ``stage_cost(k, i, j)`` is what segments ``i..j-1``
    cost as stage ``k`` (what a stage holds in memory depends on its delay, so on ``k``)."""
    m = num_segments
    if not 1 <= num_stages <= m:
        raise ValueError(f"cannot group {m} segments into {num_stages} stages")
    inf = float("inf")
    # slowest[s][j]: the smallest largest-stage cost of segments 0..j-1 in s stages
    slowest = [[inf] * (m + 1) for _ in range(num_stages + 1)]
    slowest[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(s, m - (num_stages - s) + 1):
            slowest[s][j] = min(max(slowest[s - 1][i], stage_cost(s - 1, i, j)) for i in range(s - 1, j))
    best = slowest[num_stages][m]
    bound = best * (1 + tolerance) + 1e-12 * max(abs(best), 1.0)

    # fewest[s][j]: the fewest bytes across the cuts of segments 0..j-1 in s stages, no stage above the bound
    fewest = [[inf] * (m + 1) for _ in range(num_stages + 1)]
    start = [[-1] * (m + 1) for _ in range(num_stages + 1)]
    fewest[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for j in range(s, m - (num_stages - s) + 1):
            for i in range(s - 1, j):
                if fewest[s - 1][i] == inf or stage_cost(s - 1, i, j) > bound:
                    continue
                value = fewest[s - 1][i] + (float(cut_bytes[i - 1]) if i > 0 else 0.0)
                if value < fewest[s][j]:
                    fewest[s][j], start[s][j] = value, i
    cuts, j = [], m
    for s in range(num_stages, 0, -1):
        j = start[s][j]
        cuts.append(j)
    return sorted(cuts)[1:]  # the first stage begins at segment 0


# --- measuring segments -------------------------------------------------------------------------------------
def run_segments(segments: Sequence[nn.Module], inputs: Sequence[Any], device: torch.device) -> list[list[Any]]:
    """The inputs each segment receives when ``inputs`` go through the chain (forward only, no gradients).

    Each segment runs on ``device`` and goes back where it was; the recorded inputs stay on ``device``.
    """
    values = [_to(x, device) for x in inputs]
    recorded = []
    with torch.no_grad():
        for segment in segments:
            recorded.append(values)
            with _on(segment, device):
                # ``forward``, not the call: torch.fx prints the traceback of a failing graph call to stderr, and a
                # failing example here is the caller's to report (planning falls back or refuses the cut)
                out = segment.forward(*values)
            values = list(out) if isinstance(out, tuple) else [out]
    return recorded


def segment_times(
    segments: Sequence[nn.Module], inputs: Sequence[Sequence[Any]], device: torch.device, repeats: int = 5
) -> list[float]:
    """Seconds of forward + backward per segment, the second fastest of ``repeats`` runs after one warm-up run.

    Not the fastest: on the CPU a run's user time can read well under what it took (see :func:`_own_cpu_time`),
    and a machine shared with others runs faster for a moment now and then; the fastest of a few runs keeps such a
    reading for whichever pieces happened to get one. Not the median either: the runs of the first layers of a CNN
    pay page faults on some runs and not on others, which a stage that trains step after step does not pay (see
    below), and the median counts them where they came in more than half of the runs.

    ``segments`` run in forward order from the model's input: the first one's backward computes no gradient for
    that input, as the first stage of a pipeline does not. Where every segment is already on ``device``, the runs
    go in rounds, each segment once per round, as a step of training runs them: a machine whose speed drifts over
    the second or two of timing then slows every segment alike, not the later ones more than the earlier ones
    (which moved a cut by a whole layer from one plan to the next), and no segment is timed on caches its own
    previous run left warm. Segments that have to move to ``device`` are timed one after the other.

    On the CPU a run counts the CPU time this process spent in it where that is less than the wall time: on a
    machine busy with other work, the wall time of each run grows by however long the process waited for a core,
    which differs from piece to piece, and the CPU time does not. Where the system reports it, that is the time
    spent in the process's own code: the kernel's time is mostly page faults, taken anew on each run as the
    allocator returns the freed activations to the system and asks for them again, a few thousand per run of a
    layer on large images, as many or none depending on where the heap ended; a stage that runs step after step
    reuses its memory (a tensor larger than the most glibc serves from its heap, 32 MiB, is mapped anew every time,
    in training too: that cost is left out)."""
    runs = list(zip(segments, inputs, strict=True))
    took: list[list[float]] = [[] for _ in runs]
    if all(_on(segment, device).stays for segment in segments):
        for run in range(repeats + 1):
            for index, (segment, args) in enumerate(runs):
                seconds = _timed_run(segment, args, index, device)
                if run:  # the first round warms caches and allocators up
                    took[index].append(seconds)
        return [_typical(t) for t in took]
    for index, (segment, args) in enumerate(runs):
        with _on(segment, device):
            for run in range(repeats + 1):
                seconds = _timed_run(segment, args, index, device)
                if run:
                    took[index].append(seconds)
    return [_typical(t) for t in took]


def _typical(seconds: list[float]) -> float:
    """What a piece's runs say it takes: the second fastest of them (see :func:`segment_times`)."""
    return sorted(seconds)[min(1, len(seconds) - 1)]


def _timed_run(segment: nn.Module, args: Sequence[Any], index: int, device: torch.device) -> float:
    """Seconds of one forward + backward of ``segment``, the ``index``-th of the chain (see :func:`segment_times`)."""
    _synchronize(device)
    begin, cpu_begin = time.perf_counter(), _cpu_times()
    _forward_backward(segment, args, input_grads=index > 0)
    _synchronize(device)
    took = time.perf_counter() - begin
    return min(took, _own_cpu_time(cpu_begin, _cpu_times())) if device.type == "cpu" else took


def _cpu_times() -> tuple[float, float]:
    """Seconds of CPU time this process has spent so far: in its own code (user time, or all of it where the system
    does not tell), and in all."""
    every = time.process_time()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_utime if resource is not None else every), every


def _own_cpu_time(begin: tuple[float, float], end: tuple[float, float]) -> float:
    """The user time between two :func:`_cpu_times`; all the CPU time where the user time is less than half of it.
    Linux derives the user time from the exact CPU time, split by where clock ticks found the process, and holds it
    still while it corrects that split: a run of a fraction of a millisecond can show no user time at all, which
    would count a piece of the model as free. The kernel's time of a run that pays page faults stays well under
    half (see :func:`segment_times`)."""
    user, every = end[0] - begin[0], end[1] - begin[1]
    return user if user >= every / 2 else every


def segment_flops(segments: Sequence[nn.Module], inputs: Sequence[Sequence[Any]], device: torch.device) -> list[int]:
    """Floating-point operations of forward + backward per segment (the first one's without its input's gradient, as
    in :func:`segment_times`)."""
    flops = []
    for index, (segment, args) in enumerate(zip(segments, inputs, strict=True)):
        with _on(segment, device), FlopCounterMode(display=False) as counter:
            _forward_backward(segment, args, input_grads=index > 0)
        flops.append(counter.get_total_flops())
    return flops


def _forward_backward(segment: nn.Module, args: Sequence[Any], input_grads: bool = True) -> None:
    # without input_grads (the model's own input), the backward stops at the parameters, as the first stage's does
    leaves = [
        x.detach().requires_grad_(input_grads and x.is_floating_point()) if isinstance(x, torch.Tensor) else x
        for x in args
    ]
    out, _ = tree_flatten(segment(*leaves))
    outputs = [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]
    wrt = [p for p in segment.parameters() if p.requires_grad]
    wrt += [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    if outputs and wrt:
        saved = [leaf.grad for leaf in wrt]
        for leaf in wrt:
            leaf.grad = None
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs], inputs=wrt)
        for leaf, grad in zip(wrt, saved, strict=True):
            leaf.grad = grad


class _on:
    """Run a segment on ``device``: its parameters and buffers move there and back, one segment at a time, so
    that measuring needs the memory of one segment, not of the whole model."""

    def __init__(self, segment: nn.Module, device: torch.device) -> None:
        self.segment, self.device = segment, device
        tensors = list(segment.parameters()) + list(segment.buffers())
        self.home = tensors[0].device if tensors else device

    @property
    def stays(self) -> bool:
        """The segment is on ``device`` already: nothing moves."""
        return self.home == self.device

    def __enter__(self) -> None:
        if not self.stays:
            self.segment.to(self.device)

    def __exit__(self, *exc: object) -> None:
        if not self.stays:
            self.segment.to(self.home)


def _to(x: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
