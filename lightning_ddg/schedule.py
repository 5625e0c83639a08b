"""The DDG schedule as data: what stage ``k`` of ``K`` does at each step.

Stage ``k`` has delay ``d = K-1-k`` (:func:`delay`, the one place it is derived). At step ``t`` it forwards batch
``t`` and then backwards batch ``t-d`` if there is one (:func:`backward_batch`); an optimizer step follows the
backward that completes an accumulation window (:func:`completes_window`). When training ends the drain
backwards the ``d`` batches still in flight, and steps once more if a partial window is left. In the
``"recompute"`` and ``"replay"`` memory modes a stage with a delay keeps no graph: its backward first redoes
the forward (:func:`keeps_graph`). :class:`~lightning_ddg.stage.DDGStage` asks these functions what to do;
:func:`stage_schedule` lists the same decisions step by step, and the tests pin it against the table of
``docs/semantics.md`` and against what a running stage does.

Example::

    >>> print(format_schedule(3, num_batches=4))
    step  | stage 0 (delay 2) | stage 1 (delay 1) | stage 2 (delay 0)
    0     | F0                | F0                | F0 B0 S
    1     | F1                | F1 B0 S           | F1 B1 S
    2     | F2 B0 S           | F2 B1 S           | F2 B2 S
    3     | F3 B1 S           | F3 B2 S           | F3 B3 S
    drain | B2 S, B3 S        | B3 S              | —
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Kind",
    "Action",
    "backward_batch",
    "completes_window",
    "copies_weights",
    "delay",
    "format_schedule",
    "keeps_graph",
    "stage_schedule",
]

Kind = Literal["F", "R", "B", "S"]


def delay(stage: int, num_stages: int) -> int:
    """``d = K-1-k``: how many steps stage ``k``'s backward of a batch comes after its forward."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}")
    return num_stages - 1 - stage


def backward_batch(step: int, stage_delay: int) -> int | None:
    """The batch a stage of delay ``d`` backwards at ``step`` (after forwarding batch ``step``): ``step - d``, or
    ``None`` during the warm-up."""
    batch = step - stage_delay
    return batch if batch >= 0 else None


def completes_window(batch: int, accumulate_grad_batches: int) -> bool:
    """Whether the backward of ``batch`` completes an accumulation window (windows are aligned to batch
    numbers, so that every stage sums the gradients of the same batches)."""
    return (batch + 1) % accumulate_grad_batches == 0


def keeps_graph(memory: str, stage_delay: int) -> bool:
    """Whether the forward keeps its autograd graph for the backward (else the backward recomputes it)."""
    return memory == "stash" or stage_delay == 0


def copies_weights(memory: str, stage_delay: int) -> bool:
    """Whether a batch keeps the weights its forward used (the data the live weights had, which they leave to it when
    its step ends): the backward of a delayed batch must be taken at those weights, except in ``"replay"`` (inexact:
    the current ones) and on the last stage (no delay)."""
    return stage_delay > 0 and memory != "replay"


@dataclass(frozen=True)
class Action:
    """One thing a stage does: ``F`` forward, ``R`` recompute the forward, ``B`` backward, of ``batch``; ``S``
    an optimizer step."""

    kind: Kind
    batch: int | None = None

    def __str__(self) -> str:
        return self.kind if self.batch is None else f"{self.kind}{self.batch}"


def stage_schedule(
    stage: int,
    num_stages: int,
    num_batches: int,
    accumulate_grad_batches: int = 1,
    memory: str = "stash",
) -> list[list[Action]]:
    """The actions of stage ``stage`` of ``num_stages`` at each of ``num_batches`` steps, then one entry per
    backward of the drain (the last drain entry may be a lone step that closes a partial window)."""
    d = delay(stage, num_stages)
    steps: list[list[Action]] = []
    pending = False  # gradients summed since the last step

    def backward(batch: int) -> list[Action]:
        nonlocal pending
        actions = [Action("B", batch)] if keeps_graph(memory, d) else [Action("R", batch), Action("B", batch)]
        pending = True
        if completes_window(batch, accumulate_grad_batches):
            actions.append(Action("S"))
            pending = False
        return actions

    for t in range(num_batches):
        actions = [Action("F", t)]
        b = backward_batch(t, d)
        if b is not None:
            actions += backward(b)
        steps.append(actions)
    for b in range(max(num_batches - d, 0), num_batches):
        steps.append(backward(b))
    if pending:
        steps.append([Action("S")])
    return steps


def format_schedule(num_stages: int, num_batches: int, accumulate_grad_batches: int = 1, memory: str = "stash") -> str:
    """Every stage's schedule side by side, one row per step and the drain on the last row."""
    columns = [stage_schedule(k, num_stages, num_batches, accumulate_grad_batches, memory) for k in range(num_stages)]
    header = ["step"] + [f"stage {k} (delay {delay(k, num_stages)})" for k in range(num_stages)]
    rows = [[str(t)] + [" ".join(map(str, column[t])) for column in columns] for t in range(num_batches)]
    drains = [", ".join(" ".join(map(str, a)) for a in column[num_batches:]) or "—" for column in columns]
    rows.append(["drain", *drains])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])
