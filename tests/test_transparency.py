"""A module that holds no cut behaves under the pipeline as in the unsplit model (after torchgpipe's
``test_transparency.py``): its forward runs at every step with its Python state, randomness, side effects,
exceptions and hooks."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lightning_ddg import plan, split_module
from tests.transparency_models import Counting, Holder, LayerDrop, Raising


def _compose(stages: list[nn.Module], *inputs):
    values: tuple = inputs
    out = None
    for stage in stages:
        out = stage(*values)
        values = out if isinstance(out, tuple) else (out,)
    return out


def _net(module: nn.Module, where: str) -> tuple[nn.Module, str, list[str]]:
    """``module`` in a small net, at the top level or inside a block that the cut opens; the net, the module's
    name and a split point."""
    if where == "outside":
        return (
            nn.Sequential(nn.Linear(4, 4), module, nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)),
            "1",
            ["3"],
        )
    net = nn.Sequential(nn.Linear(4, 4), Holder(module), nn.Tanh(), nn.Linear(4, 4))
    return net, "1.inner", ["1.out"]  # the cut opens block 1, whose child runs as written


WHERE = ["outside", "inside"]


# --- the three modules of the issue, outside and inside opened modules -------------------------------------
@pytest.mark.parametrize("where", WHERE)
def test_a_module_counting_its_calls_runs_at_every_step(where: str) -> None:
    net, name, points = _net(Counting(), where)
    counting = net.get_submodule(name)
    stages = split_module(net, points).train
    plan(net, torch.randn(2, 4), split_points=points)
    assert counting.calls == 0  # splitting and planning ran it on copies
    for _ in range(20):
        _compose(stages, torch.randn(2, 4))
    assert counting.calls == 20


@pytest.mark.parametrize("where", WHERE)
def test_python_randomness_is_drawn_at_every_step(where: str) -> None:
    net, name, points = _net(LayerDrop(), where)
    stages = split_module(net, points).train
    x = torch.randn(2, 4)
    skipped = []
    for seed in range(20):
        random.seed(seed)
        expected = net(x)
        random.seed(seed)
        assert torch.equal(_compose(stages, x), expected)
        skipped.append(random.Random(seed).random() < 0.5)
    assert 0 < sum(skipped) < 20  # both branches were taken, as drawn at each step


@pytest.mark.parametrize("where", WHERE)
def test_an_exception_in_forward_is_raised_at_the_step(where: str) -> None:
    net, name, points = _net(Raising(), where)
    stages = split_module(net, points).train
    x = torch.randn(2, 4)
    _compose(stages, x)
    net.get_submodule(name).fail = True
    with pytest.raises(RuntimeError, match="Raising was asked to fail"):
        _compose(stages, x)


def test_forward_hooks_fire_on_the_stage_that_holds_the_module() -> None:
    net = nn.Sequential(nn.Linear(4, 4), Counting(), nn.Tanh(), nn.Linear(4, 4), Holder(Counting()), nn.Linear(4, 2))
    fired: list[tuple[str, type]] = []
    net[1].register_forward_pre_hook(lambda m, args: fired.append(("pre 1", type(args[0]))))
    net[1].register_forward_hook(lambda m, args, out: fired.append(("1", type(out))))
    net[4].inner.register_forward_hook(lambda m, args, out: fired.append(("4.inner", type(out))))
    first, second = split_module(net, ["4.out"]).train  # opens 4, not its child
    plan(net, torch.randn(2, 4), split_points=["4.out"])
    assert fired == []
    (h,) = first(torch.randn(2, 4))
    assert fired == [("pre 1", torch.Tensor), ("1", torch.Tensor), ("4.inner", torch.Tensor)]
    fired.clear()
    second(h)
    assert fired == []


# --- structures returned by called modules ----------------------------------------------------------------
class _DictWithNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, options: object = None):
        return {"main": self.fc(x), "extra": None, "parts": (x, x * 2)}


class _Reader(nn.Module):
    """Reads a dict holding None and a tuple from the children it calls; passes one a Python object."""

    def __init__(self) -> None:
        super().__init__()
        self.child, self.other, self.after = _DictWithNone(), _DictWithNone(), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.child(x)
        h = out["main"] if out["extra"] is None else out["extra"]
        h = h + sum(out["parts"])
        return self.after(h + self.other(h, options=object())["main"])


def test_an_opened_module_reads_what_its_called_children_return() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _Reader(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    for points in (["1.after"], ["1"], ["2"]):
        partition = split_module(model, points)
        torch.testing.assert_close(_compose(partition.train, x), model(x), rtol=0, atol=0)
    # a graph cannot hold the object passed to 'other': it is traced into as well; 'child' is called
    assert split_module(model, ["1.after"]).opened == ["1", "1.other"]
