"""Per-stage figures: counted cheaply by each stage, carried to the last stage on the pipeline's own messages.

Every stage keeps running totals (:class:`StageCounters`): a few clock readings per step, nothing that scales
with the model. Each activation a stage sends forward carries, in the message header, its own totals and
those it received from the stages before it, so the last stage always holds a recent snapshot of every stage
without any extra message or synchronisation. Figures over an interval are the difference of two snapshots
(:func:`interval_figures`).

Example::

    >>> before = StageCounters().snapshot(stashed_weight_bytes=0, activation_bytes=0)
    >>> after = Snapshot(steps=10, samples=640, busy_us=40_000, wait_us=5_000, send_us=1_000, active_us=50_000,
    ...                  stashed_weight_bytes=2**20, activation_bytes=0)
    >>> interval_figures(before, after, delay=1)["busy_ms"]
    4.0
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

__all__ = [
    "MEASURED_STEPS",
    "StageCounters",
    "Snapshot",
    "decode_snapshots",
    "encode_snapshots",
    "interval_figures",
    "measured_imbalance",
    "slowest_over_mean",
]

MEASURED_STEPS = 20  # over fewer steps, the pipeline's start weighs more than the stages' own speeds


@dataclass(frozen=True)
class Snapshot:
    """A stage's running totals at one moment, as integers (they travel in int64 message headers)."""

    steps: int
    samples: int
    busy_us: int  # forward and backward compute
    wait_us: int  # blocked on a neighbouring stage: a receive (the transfer included), a send it lags behind
    send_us: int  # handing tensors to the communication backend
    active_us: int  # wall time spent training (evaluation and checkpoint saving excluded)
    stashed_weight_bytes: int  # weight copies held for in-flight batches, now
    activation_bytes: int  # activations the autograd graphs of in-flight batches hold at most (sampled)
    update_us: int = 0  # the optimizer step, with the gradients installed and the live weights moved
    load_us: int = 0  # fetching the training batches: reading and sending them, or taking them as they arrive


_FIELDS = tuple(f.name for f in fields(Snapshot))
_WIDTH = len(_FIELDS)


@dataclass
class StageCounters:
    """Running totals of one stage since it was created; only :meth:`pause` changes what counts as training."""

    steps: int = 0
    samples: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0
    send_s: float = 0.0
    update_s: float = 0.0
    load_s: float = 0.0
    paused_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def mark(self) -> tuple[float, float, float]:
        """The clock, and the waits and sends counted so far, for :meth:`own_since`."""
        return time.perf_counter(), self.wait_s, self.send_s

    def own_since(self, mark: tuple[float, float, float]) -> float:
        """Seconds since ``mark`` that went to the stage's own work: the waits and sends counted meanwhile left out."""
        start, waited, sent = mark
        return time.perf_counter() - start - (self.wait_s - waited) - (self.send_s - sent)

    def pause(self, seconds: float) -> None:
        """Leave ``seconds`` of wall time (an evaluation run, say) out of the training time."""
        self.paused_s += seconds

    def snapshot(self, stashed_weight_bytes: int, activation_bytes: int) -> Snapshot:
        active = time.perf_counter() - self.start - self.paused_s
        return Snapshot(
            self.steps,
            self.samples,
            round(1e6 * self.busy_s),
            round(1e6 * self.wait_s),
            round(1e6 * self.send_s),
            round(1e6 * active),
            stashed_weight_bytes,
            activation_bytes,
            round(1e6 * self.update_s),
            round(1e6 * self.load_s),
        )


def encode_snapshots(snapshots: list[Snapshot]) -> list[int]:
    # every step: the fields by name, not dataclasses.astuple, which copies each value through a recursive walk
    return [getattr(snapshot, name) for snapshot in snapshots for name in _FIELDS]


def decode_snapshots(values: list[int] | None) -> list[Snapshot]:
    values = values or []
    return [Snapshot(*values[i : i + _WIDTH]) for i in range(0, len(values) - _WIDTH + 1, _WIDTH)]


def interval_figures(before: Snapshot | None, after: Snapshot, delay: int) -> dict[str, float] | None:
    """Per-step averages between two snapshots of one stage, plus what it holds now; ``None`` without steps."""
    zero = Snapshot(0, 0, 0, 0, 0, 0, 0, 0)
    before = before if before is not None else zero
    steps = after.steps - before.steps
    if steps <= 0:
        return None
    active_us = max(after.active_us - before.active_us, 1)
    parts = {
        name: getattr(after, f"{name}_us") - getattr(before, f"{name}_us")
        for name in ("busy", "wait", "send", "update", "load")
    }
    return {
        "delay": float(delay),
        "samples_per_s": 1e6 * (after.samples - before.samples) / active_us,
        **{f"{name}_ms": us / 1e3 / steps for name, us in parts.items()},
        "other_ms": max(active_us - sum(parts.values()), 0) / 1e3 / steps,  # Lightning's loop, hooks, logging
        "stashed_weights_mb": after.stashed_weight_bytes / 2**20,
        "activations_mb": after.activation_bytes / 2**20,
    }


def measured_imbalance(snapshots: list[Snapshot]) -> tuple[float, list[float]] | None:
    """How unevenly the pipeline's stages were loaded: the slowest stage's time per step over the mean, with every
    stage's time per step (ms). A stage's time is what it spent on its own work, its waits on its neighbours left
    out: compute, sending, the optimizer step, loading and Lightning's loop; in a pipeline the others wait for the
    slowest. ``None`` with one stage, or before :data:`MEASURED_STEPS` steps on every stage."""
    if len(snapshots) < 2 or min(s.steps for s in snapshots) < MEASURED_STEPS:
        return None
    work = [max(s.active_us - s.wait_us, 0) / 1e3 / s.steps for s in snapshots]
    return slowest_over_mean(work), work


def slowest_over_mean(costs: list[float]) -> float:
    """How unbalanced stages of these costs are: the largest over the mean; 1.0 is perfectly balanced."""
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean > 0 else 1.0
