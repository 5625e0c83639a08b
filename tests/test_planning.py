"""``lightning_ddg.plan``: choosing and describing splits, and the cuts that real models' code needs."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import lightning_ddg
from lightning_ddg import plan, split_module
from lightning_ddg.balance import _cpu_times, run_segments
from lightning_ddg.planning import better_cut, rebalanced, replanned
from tests.zoo_job import ResidualSpan, TransformerClassifier


def _compose(stages: list[nn.Module], x: torch.Tensor):
    values = [x]
    for stage in stages:
        out = stage(*values)
        values = list(out) if isinstance(out, tuple) else [out]
    return out


def _assert_split_is_exact(model: nn.Module, split_points: list[str], x: torch.Tensor) -> None:
    """The stages reproduce the forward and, backward through the cuts, every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    unsplit = copy.deepcopy(model)
    torch.manual_seed(0)
    expected = unsplit(x)
    expected.square().sum().backward()
    torch.manual_seed(0)
    actual = _compose(split_module(model, split_points).train, x)
    actual.square().sum().backward()
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for (name, p), (_, q) in zip(model.named_parameters(), unsplit.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


class _FullResolutionFirst(nn.Module):
    """A CNN whose early full-resolution convolutions have few parameters and cost most of the time."""

    def __init__(self) -> None:
        super().__init__()
        self.early = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.late = nn.Sequential(*[nn.Linear(8 if i == 0 else 512, 512) for i in range(4)])
        self.head = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.late(self.pool(self.early(x)).flatten(1)))


def test_timing_sees_the_cost_that_parameter_counts_miss() -> None:
    model, x = _FullResolutionFirst(), torch.randn(8, 8, 48, 48)
    by_params = plan(model, x, 2, balance_by="params")
    by_time = plan(model, x, 2, balance_by="time")
    assert by_params.split_points[0].startswith("late")  # the convolutions hold 2% of the parameters
    assert by_time.split_points[0].startswith("early")  # they take ~5x the time of the linear layers
    assert by_time.balance_by == "time" and by_time.note is None


def _busy(ms: float) -> None:
    """Compute for ``ms`` milliseconds of this process's CPU time in its own code (what timing counts on a busy
    machine), reading the clock, a system call, only every few microseconds."""
    end = _cpu_times()[0] + ms / 1000
    while _cpu_times()[0] < end:
        for _ in range(200):
            pass


class _CostlyAtAStart(nn.Module):
    """Takes ``ms`` milliseconds, and 20 more when its input is a leaf of the autograd graph: as it is in every
    segment timed alone, but in a stage that runs whole only at the stage's start."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms, self.scale = ms, nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # control flow on x: traced as one module
        _busy(self.ms + 20 if x.is_leaf else self.ms)
        return x * self.scale


def test_a_time_split_is_checked_against_its_stages_timed_whole() -> None:
    # timed one by one the seven layers cost 30 ms each and the last 80, which cuts them 4 | 3 (120 / 140 ms);
    # timed whole, those stages take 60 / 100 ms, while 5 | 2 takes 70 / 90
    model = nn.Sequential(*[_CostlyAtAStart(10) for _ in range(6)], _CostlyAtAStart(60))
    chosen = plan(model, torch.randn(4, 3), 2)
    assert chosen.split_points == ["5"]
    assert [round(stage.cost, -1) for stage in chosen.stages] == [70, 90]  # the stages' own measured times


class _Takes(nn.Module):
    """Takes ``ms`` milliseconds forward, whatever its input."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        self.ms, self.scale = ms, nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # control flow on x: traced as one module
        if x.dim():
            _busy(self.ms)
        return x * self.scale


def test_the_first_stage_pays_for_loading_the_batch() -> None:
    # six layers of 10 ms cut 3 | 3; when loading a batch takes the first stage 40 ms, 1 | 5 balances (50 / 50)
    model, x = nn.Sequential(*[_Takes(10) for _ in range(6)]), torch.randn(4, 3)
    assert plan(model, x, 2).split_points == ["3"]
    loaded = plan(model, x, 2, loading_ms=40.0)
    assert loaded.split_points == ["1"] and loaded.loading_ms == 40.0
    assert [round(stage.cost, -1) for stage in loaded.stages] == [50, 50]  # the first stage's cost includes it
    assert "includes 40 ms per batch of loading it" in str(loaded)
    assert loaded.to_dict()["ddg/stage0/loading_ms"] == 40.0
    # milliseconds add to time alone
    assert plan(model, x, 2, balance_by="params", loading_ms=40.0).split_points == ["3"]


def test_a_plan_describes_its_stages() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    p = plan(model, x, 3, balance_by="flops")
    assert p.num_stages == 3 and len(p.split_points) == 2 and p.balance_by == "flops"
    assert [s.begins_at for s in p.stages] == [None, *p.split_points]
    assert sum(s.parameters for s in p.stages) == sum(q.numel() for q in model.parameters())
    assert sum(s.cost_share for s in p.stages) == pytest.approx(1.0)
    assert p.stages[0].modules[0] == "conv1" and p.stages[-1].modules[-1] == "fc"
    # what a stage sends is the activations crossing its cut, for this batch
    stages = split_module(model, p.split_points).train
    sent = run_segments(stages, [x], torch.device("cpu"))
    for k in range(2):
        assert p.stages[k].bytes_out == sum(t.numel() * t.element_size() for t in sent[k + 1])
    assert p.stages[-1].bytes_out is None
    assert p.imbalance == pytest.approx(max(s.cost for s in p.stages) / (sum(s.cost for s in p.stages) / 3))
    table = str(p)
    for heading in ("stage", "begins at", "modules", "params", "cost (flops)", "share", "sends/batch"):
        assert heading in table
    assert f"slowest stage: {p.imbalance:.2f}x the mean" in table
    logged = p.to_dict()
    assert logged["ddg/split_points"] == ", ".join(p.split_points)
    assert {f"ddg/stage{k}/cost_share" for k in range(3)} <= logged.keys()


def test_planning_leaves_the_module_as_it_was() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    state, x = copy.deepcopy(model.state_dict()), torch.randn(2, 3, 32, 32)
    rng = torch.get_rng_state()
    plan(model, x, 2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BatchNorm statistics included
    assert all(p.grad is None for p in model.parameters())


def test_a_given_split_is_described_with_its_costs() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    p = plan(model, torch.randn(2, 3, 32, 32), split_points=["layer3"], balance_by="params")
    assert p.split_points == ["layer3"]
    assert p.stages[0].modules == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    assert p.stages[1].modules == ["layer3", "layer4", "avgpool", "fc"]
    assert p.imbalance > 1.8  # layer3 and layer4 hold 94% of the parameters


def test_without_an_input_the_plan_balances_parameters_and_says_so() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    p = plan(model, None, 2)
    assert p.split_points == ["2"] and p.balance_by == "params"
    assert "no example input to measure time" in p.note and p.note in str(p)
    assert all(s.bytes_out is None for s in p.stages)


def test_an_input_the_model_cannot_take_falls_back_to_parameters() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    p = plan(model, torch.randn(2, 5), 2)
    assert p.balance_by == "params" and "the example input failed" in p.note


def test_bad_arguments() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="balance_by='speed' is not one of"):
        plan(model, None, 2, balance_by="speed")
    with pytest.raises(ValueError, match="give either num_stages"):
        plan(model, None)
    with pytest.raises(ValueError, match="offers 2 possible stages, fewer than the 3 requested"):
        plan(model, None, 3)
    with pytest.raises(ValueError, match=r"'0\.wieght'.*not a module called in forward"):
        plan(model, None, split_points=["0.wieght"])


def test_transformer_encoder_is_cut_between_its_layers() -> None:
    model = TransformerClassifier().eval()  # eval: no dropout, so forward and gradients compare exactly
    p = plan(model, torch.randn(2, 6, 8), 4, balance_by="flops")
    assert all(point.startswith("encoder.layers.") for point in p.split_points[1:])
    assert len({point for point in p.split_points if point.startswith("encoder.layers.")}) >= 2
    _assert_split_is_exact(model, ["encoder.layers.1", "encoder.layers.3"], torch.randn(2, 6, 8))


def test_skip_connections_tuples_and_dicts_cross_cuts() -> None:
    model = ResidualSpan()
    x = torch.randn(4, 8)
    # the skip and the dict's "aux" item cross both cuts; the dict itself never crosses
    for split_points in (["a"], ["b", "c"], ["fork.aux", "head"]):
        _assert_split_is_exact(model, split_points, x)
    first, _ = split_module(model, ["b"]).train
    assert all(isinstance(v, torch.Tensor) for v in first(x))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        out += x
        return self.relu(out)


def test_a_cut_before_an_in_place_operation_is_exact() -> None:
    model = nn.Sequential(_Block(), _Block())
    x = torch.randn(2, 4, 6, 6)
    for split_points in (["0.relu"], ["1"], ["1.relu"]):  # the stage's input is changed in place right away
        _assert_split_is_exact(model, split_points, x)


class _FlattenThenDropout(nn.Module):
    """torchvision's EfficientNet head: a view (``torch.flatten``) changed in place by the next module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)
        self.drop, self.fc = nn.Dropout(0.5, inplace=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.pool(self.conv(x)), 1)))


def test_a_stage_whose_input_is_a_view_changed_in_place_runs_on_the_leaf_it_receives() -> None:
    model, x = _FlattenThenDropout().train(), torch.randn(2, 3, 8, 8)
    first, second = split_module(model, ["drop"]).train
    (sent,) = first(x)
    received = sent.detach().requires_grad_()  # as a stage receives it: a leaf of its autograd graph
    torch.manual_seed(0)
    second(received).sum().backward()
    torch.manual_seed(0)
    kept = nn.functional.dropout(torch.ones(2, 4), 0.5)  # the mask the stage's dropout drew, scaled
    torch.testing.assert_close(received.grad, kept * model.fc.weight.sum(0))
    # the plan measures the same stages: by FLOPs, not falling back to parameter counts, also on the model this is
    # torchvision's head of
    assert plan(model, x, 2, balance_by="flops").balance_by == "flops"
    torch.manual_seed(0)
    efficientnet = torchvision.models.efficientnet_b0(num_classes=10)
    assert plan(efficientnet, torch.randn(2, 3, 32, 32), 2, balance_by="flops").balance_by == "flops"


class _Branchy(nn.Module):
    """A submodule with Python control flow on tensor values, inside an otherwise traceable model."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner(x)
        return x if x.sum() > 0 else -x


def test_a_submodule_that_cannot_be_traced_is_kept_whole() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _Branchy(), nn.Linear(4, 4), nn.Linear(4, 2))
    p = plan(model, torch.randn(3, 4), 3, balance_by="params")
    assert p.whole_modules == ["1"] and "kept whole (forward not traceable): 1" in str(p)
    assert "1.inner" not in p.split_points
    _assert_split_is_exact(model, ["1", "3"], torch.randn(3, 4))


def test_untraceable_top_level_code_is_named_with_its_line() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a(x)
            if x.sum() > 0:  # data-dependent branch
                x = -x
            return self.b(x)

    with pytest.raises(RuntimeError, match=r"(?s)test_planning\.py:\d+: if x\.sum\(\) > 0:.*split_points"):
        plan(Model(), torch.randn(2, 3), 2)


def test_the_plan_is_part_of_the_package() -> None:
    assert lightning_ddg.plan is plan and "Plan" in lightning_ddg.__all__


def test_a_plan_is_cut_anew_on_the_stage_times_a_pipeline_measured() -> None:
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    chosen = plan(model, torch.randn(16, 64), 2, balance_by="flops")  # the first layer skips its input's gradient
    assert chosen.split_points == ["4"]
    pieces = chosen.pieces
    assert rebalanced(pieces, [10.0, 10.0]) == (["4"], pytest.approx(1.0))  # as measured as planned
    # the second stage measured twice the time per layer of the first: the first takes a layer more
    assert rebalanced(pieces, [10.0, 20.0]) == (["5"], pytest.approx(1.0))
    later, imbalance = rebalanced(pieces, [30.0, 10.0])
    assert later == ["3"] and 1.0 < imbalance < 1.25
    # a cut worth moving to: another than the one measured, and at least 5% of the mean faster
    assert better_cut(pieces, ["4"], [10.0, 10.0]) is None
    assert better_cut(pieces, ["4"], [10.0, 20.0]) == (["5"], pytest.approx(1.0))
    assert better_cut(pieces, ["4"], [10.0, 20.0], least_gain=0.4) is None  # 1.33x to 1.0x
    three = plan(model, torch.randn(16, 64), 3, balance_by="flops")
    assert rebalanced(three.pieces, [10.0, 10.0]) is None  # a time for every stage, or none
    assert rebalanced(three.pieces, [10.0, 10.0, 10.0])[0] == three.split_points
    # stages balanced by memory are unequal in time on purpose: nothing to cut anew from
    assert plan(model, torch.randn(16, 64), 2, balance_by="memory").pieces is None


def test_the_plan_of_a_cut_made_anew_costs_what_the_measured_times_let_expect() -> None:
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    chosen = plan(model, torch.randn(16, 64), 2, balance_by="flops")
    anew = replanned(chosen, ["5"], [10.0, 20.0], [5 * 64 * 65, 3 * 64 * 65])
    assert anew.split_points == ["5"] and anew.balance_by == "time" and anew.note
    # per layer 10/4 ms on the first stage's layers, 20/4 ms on the second's: 5 layers, then 3
    assert [s.cost for s in anew.stages] == pytest.approx([10.0 + 5.0, 15.0])
    assert [s.parameters for s in anew.stages] == [5 * 64 * 65, 3 * 64 * 65]
    assert [s.modules for s in anew.stages] == [["0", "1", "2", "3", "4"], ["5", "6", "7"]]
    assert anew.stages[1].begins_at == "5" and "cut anew on the stage times" in str(anew)
    assert anew.pieces.stage_starts == [5] and anew.imbalance == pytest.approx(1.0)
    # measured again on the new cut, as planned: nothing to move
    assert better_cut(anew.pieces, anew.split_points, [15.0, 15.0]) is None
