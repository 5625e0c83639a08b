"""The schedule as data (``schedule.py``): pinned against the table of ``docs/semantics.md`` and against what
running stages do (in one process, ``local.py``)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_ddg.local import LockStep
from lightning_ddg.schedule import Action, delay, format_schedule, stage_schedule
from tests.models import batches, mlp, split_points_for

SEMANTICS = Path(__file__).resolve().parents[1] / "docs" / "semantics.md"


def _documented_table() -> list[list[str]]:
    """The rows of the schedule table in docs/semantics.md: step, then one cell per stage."""
    text = SEMANTICS.read_text()
    start = text.index("| step | stage 0")
    rows = []
    for line in text[start:].splitlines():
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [r for r in rows[2:]]  # past the header and the rule


def _without_steps(actions: list[Action]) -> str:
    return " ".join(str(a) for a in actions if a.kind != "S")


def test_the_schedule_is_the_documented_table() -> None:
    table = _documented_table()
    num_stages, num_batches = len(table[0]) - 1, len(table) - 1
    for k in range(num_stages):
        schedule = stage_schedule(k, num_stages, num_batches)
        for t in range(num_batches):
            assert _without_steps(schedule[t]) == table[t][k + 1], (k, t)
        drain = ", ".join(_without_steps(step) for step in schedule[num_batches:]) or "—"
        assert drain == table[num_batches][k + 1], k
        # each backward is followed by that stage's optimizer step
        assert all(a.kind != "B" or step[step.index(a) + 1] == Action("S") for step in schedule for a in step)


def test_the_documented_delays() -> None:
    text = SEMANTICS.read_text()
    documented = [int(d) for d in re.findall(r"stage \d \(delay (\d)\)", text)]
    assert documented == [delay(k, 3) for k in range(3)] == [2, 1, 0]
    with pytest.raises(ValueError, match="outside"):
        delay(3, 3)


def test_accumulation_and_recompute_in_the_schedule() -> None:
    schedule = stage_schedule(0, 2, num_batches=3, accumulate_grad_batches=2, memory="recompute")
    assert [" ".join(map(str, s)) for s in schedule] == ["F0", "F1 R0 B0", "F2 R1 B1 S", "R2 B2", "S"]
    assert "drain | R3 B3 S, R4 B4, S" in format_schedule(3, 5, accumulate_grad_batches=2, memory="recompute")


@pytest.mark.parametrize(
    ("num_stages", "memory", "accumulate", "num_batches"),
    [(3, "stash", 1, 4), (3, "recompute", 2, 5), (4, "replay", 3, 7), (2, "recompute", 1, 1), (1, "stash", 2, 3)],
)
def test_running_stages_follow_the_schedule(num_stages: int, memory: str, accumulate: int, num_batches: int) -> None:
    model = mlp()
    pipeline = LockStep(model, split_points_for(model, num_stages), memory=memory, accumulate_grad_batches=accumulate)
    for stage in pipeline.stages:
        stage.trace = []
    optimizers = [torch.optim.SGD(s.parameters, lr=0.1) for s in pipeline.stages]
    for x, y in batches(num_batches):
        pipeline.step(x, lambda out, y=y: nn.functional.cross_entropy(out, y), optimizers)
    pipeline.drain(optimizers)
    for k, stage in enumerate(pipeline.stages):
        expected = list(itertools.chain(*stage_schedule(k, num_stages, num_batches, accumulate, memory)))
        assert stage.trace == expected, k


def test_stages_driven_out_of_schedule_fail_at_once() -> None:
    model = mlp()
    pipeline = LockStep(model, split_points_for(model, 2))
    (x, _), (x1, y1) = batches(2)
    first, last = pipeline.stages
    first.forward(x)
    last.forward()
    with pytest.raises(RuntimeError, match="nothing to receive"):
        last.forward()  # stage 0 has not forwarded batch 1
    first.forward(x1)
    out = last.forward()  # batch 1, while batch 0 still waits for its backward
    with pytest.raises(RuntimeError, match="due to backward batch 1, but the oldest batch it holds is 0"):
        last.backward(nn.functional.cross_entropy(out, y1))
