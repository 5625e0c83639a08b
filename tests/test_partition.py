"""Cutting a forward into stages: exactness, parameter ownership, mode-dependent graphs and error messages."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_ddg.partition import balance_to_split_points, split_module
from lightning_ddg.planning import balanced_split_points, plan


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _compose(stages: list[nn.Module], *inputs: torch.Tensor):
    """Run the stages in order, feeding each stage's outputs to the next, as the pipeline does."""
    values: tuple = inputs
    out = None
    for stage in stages:
        out = stage(*values)
        values = out if isinstance(out, tuple) else (out,)
    return out


def _stage_inputs(stage: nn.Module) -> list[str]:
    return [n.name for n in stage.graph.nodes if n.op == "placeholder"]


RESNET_SPLITS = [
    pytest.param({"split_points": ["layer3"]}, id="top-level-layer3"),
    pytest.param({"split_points": ["layer2.1"]}, id="residual-stage-layer2.1"),
    pytest.param({"split_points": ["layer3.0.bn2"]}, id="inside-residual-block"),
    pytest.param({"planned": 3}, id="time-planned-3"),
]


def _split(model: nn.Module, how: dict):
    """Cut at the named split points, or where a plan timed on an example batch cuts into ``planned`` stages
    (the plan must leave the module, its BatchNorm statistics included, as it was)."""
    points = how["split_points"] if "split_points" in how else plan(model, _images(seed=7), how["planned"]).split_points
    return split_module(model, points)


# --- exactness --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", RESNET_SPLITS)
def test_resnet_stages_reproduce_forward_in_train_mode(how: dict) -> None:
    model = _resnet().train()
    unsplit = copy.deepcopy(model)
    partition = _split(model, how)
    assert partition.num_stages == (len(how["split_points"]) + 1 if "split_points" in how else how["planned"])
    x = _images()
    expected = unsplit(x)
    actual = _compose(partition.train, x)
    assert actual.shape == (2, 10)
    assert torch.equal(actual, expected)
    # BatchNorm running statistics were updated exactly once, as by the unsplit forward
    for (name, b), (_, ref) in zip(model.named_buffers(), unsplit.named_buffers(), strict=True):
        assert torch.equal(b, ref), name


@pytest.mark.parametrize("how", RESNET_SPLITS)
def test_resnet_stages_reproduce_forward_in_eval_mode(how: dict) -> None:
    model = _resnet()
    # make running statistics non-trivial so eval differs from train
    with torch.no_grad():
        model.train()(_images(seed=5))
    partition = _split(model, how)
    model.eval()
    x = _images()
    with torch.no_grad():
        expected = model(x)
        actual = _compose(partition.eval, x)
        # the train-mode graphs also follow eval() of their leaf modules (BatchNorm)
        actual_train_graph = _compose(partition.train, x)
    assert torch.equal(actual, expected)
    assert torch.equal(actual_train_graph, expected)


def test_balanced_default_cuts_resnet_into_three_stages() -> None:
    model = _resnet()
    points = balanced_split_points(model, 3)
    assert len(points) == 2
    names = dict(model.named_modules())
    assert all(p in names for p in points)
    partition = split_module(model, points, num_stages=3)
    assert partition.split_points == points
    assert partition.num_stages == 3
    sizes = [sum(p.numel() for p in s.parameters()) for s in partition.train]
    assert all(size > 0 for size in sizes)
    assert sum(sizes) == sum(p.numel() for p in model.parameters())
    # minimising the largest stage keeps every stage well under half of the model
    assert max(sizes) < sum(sizes) / 2


def test_skip_connection_crosses_a_cut_inside_a_residual_block() -> None:
    model = _resnet()
    partition = split_module(model, split_points=["layer3.0.bn2"])
    first, second = partition.train
    # the block input (for the downsample shortcut) and conv2's output both cross the cut
    assert len(_stage_inputs(second)) == 2
    x = _images()
    with torch.no_grad():
        crossing = first(x)
    assert isinstance(crossing, tuple) and len(crossing) == 2
    # a cut between residual blocks carries a single tensor
    partition = split_module(model, split_points=["layer3"])
    assert len(_stage_inputs(partition.train[1])) == 1


# --- parameter ownership ----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", RESNET_SPLITS)
def test_stage_parameters_are_the_original_parameters(how: dict) -> None:
    model = _resnet()
    original = dict(model.named_parameters())
    partition = _split(model, how)
    owner: dict[str, int] = {}
    for k, (train_stage, eval_stage) in enumerate(zip(partition.train, partition.eval, strict=True)):
        params = dict(train_stage.named_parameters())
        assert params, f"stage {k} has no parameters"
        assert partition.parameter_names(k) == list(params)
        for name, p in params.items():
            assert name in original, name
            assert p is original[name], name
            assert name not in owner, f"{name} in stages {owner.get(name)} and {k}"
            owner[name] = k
        # the eval graph of a stage holds the very same parameters
        eval_params = dict(eval_stage.named_parameters())
        assert eval_params.keys() == params.keys()
        assert all(eval_params[n] is p for n, p in params.items())
    assert set(owner) == set(original)


def test_stage_buffers_are_the_original_buffers() -> None:
    model = _resnet()
    original = dict(model.named_buffers())
    partition = split_module(model, split_points=["layer2.1"])
    seen = []
    for k, stage in enumerate(partition.train):
        for name, b in stage.named_buffers():
            assert b is original[name], name
            seen.append(name)
        assert partition.buffer_names(k) == [n for n, _ in stage.named_buffers()]
    assert sorted(seen) == sorted(original)


# --- a Python branch on self.training ---------------------------------------------------------------------
class _FunctionalDropout(nn.Module):
    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p
        self.fc1 = nn.Linear(8, 64)
        self.fc2 = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = F.dropout(h, self.p, training=self.training)  # branch baked into the traced graph
        return self.fc2(h)


def test_functional_dropout_follows_the_mode_of_the_traced_graph() -> None:
    torch.manual_seed(0)
    model = _FunctionalDropout()
    x = torch.randn(16, 8)
    model.train()
    partition = split_module(model, split_points=["fc2"])
    assert model.training and all(m.training for m in model.modules())  # tracing left the modes alone

    with torch.no_grad():
        expected_eval = model.eval()(x)
        model.train()
        # eval stages are deterministic and equal the eval-mode output, whatever mode the module is in
        assert torch.equal(_compose(partition.eval, x), expected_eval)
        assert torch.equal(_compose(partition.eval, x), expected_eval)
        hidden = torch.tanh(model.fc1(x))
        (eval_hidden,) = partition.eval[0](x)
        assert torch.equal(eval_hidden, hidden)

        # train stages drop units (and scale the rest by 1 / (1 - p))
        (dropped,) = partition.train[0](x)
        zeros = dropped == 0
        assert 0.2 < zeros.double().mean() < 0.8
        torch.testing.assert_close(dropped[~zeros], hidden[~zeros] / (1 - model.p), rtol=1e-6, atol=0)
        assert not torch.equal(_compose(partition.train, x), expected_eval)

        # with the same random stream, train stages reproduce the unsplit train forward
        torch.manual_seed(7)
        expected_train = model.train()(x)
        torch.manual_seed(7)
        assert torch.equal(_compose(partition.train, x), expected_train)


# --- errors -----------------------------------------------------------------------------------------------
def test_unknown_split_point_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"'layr3' is not a module called in forward\. Did you mean .*'layer3'"):
        split_module(_resnet(), split_points=["layr3"])


def test_split_points_out_of_forward_order() -> None:
    with pytest.raises(ValueError, match="in the order forward calls them"):
        split_module(_resnet(), split_points=["layer4", "layer3"])


def test_split_point_at_the_first_module_leaves_an_empty_stage() -> None:
    with pytest.raises(ValueError, match="in the order forward calls them"):
        split_module(_resnet(), split_points=["conv1"])


def test_split_points_disagreeing_with_num_stages() -> None:
    with pytest.raises(ValueError, match="2 split points make 3 stages, but 2 devices"):
        split_module(_resnet(), split_points=["layer2", "layer3"], num_stages=2)


def test_several_stages_need_split_points() -> None:
    with pytest.raises(ValueError, match=r"2 stages need 1 split points; lightning_ddg\.plan"):
        split_module(_resnet(), num_stages=2)


def test_more_stages_than_candidate_cuts() -> None:
    tiny = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    assert balanced_split_points(tiny, 2) == ["1"]
    with pytest.raises(ValueError, match="offers 3 possible stages, fewer than the 4 requested"):
        balanced_split_points(tiny, 4)
    with pytest.raises(ValueError, match="fewer than the 4 requested"):
        plan(tiny, torch.randn(3, 2), 4)
    # three places to cut, but a stage made of the ReLU alone would have nothing to train
    with pytest.raises(ValueError, match=r"offers 2 piece\(s\) that hold parameters, .* use at most 2 devices"):
        plan(tiny, torch.randn(3, 2), 3)


@pytest.mark.parametrize("balance", [[1, 1], [2, 2], [1, 0, 2], [4, -1]])
def test_balance_must_sum_to_the_sequential_length(balance: list[int]) -> None:
    tiny = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"must be positive layer counts summing to the 3 layers"):
        balance_to_split_points(tiny, balance)


class _TwoTrunks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def test_balance_needs_a_single_sequential_trunk() -> None:
    with pytest.raises(ValueError, match=r"found 2 top-level nn\.Sequential modules \['encoder', 'decoder'\]"):
        balance_to_split_points(_TwoTrunks(), [1, 1])
    # split points still work on such a module
    assert split_module(_TwoTrunks(), split_points=["decoder"]).num_stages == 2


class _TiedEnds(nn.Module):
    """The same Linear runs at the start and at the end of forward."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.middle = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.tanh(self.middle(self.shared(x))))


def test_weights_shared_across_stages_are_listed_as_tied() -> None:
    model = _TiedEnds()
    partition = split_module(model, split_points=["middle"])
    assert [(w.name, w.stages) for w in partition.tied] == [("shared.weight", (0, 1)), ("shared.bias", (0, 1))]
    # each stage holds the module's own parameter, under its original name
    for k in range(2):
        assert dict(partition.train[k].named_parameters())["shared.weight"] is model.shared.weight


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if x.sum() > 0:
            x = -x
        return self.b(x)


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.b(self.a(x)) * scale


class _Variadic(nn.Module):
    """A wrapper whose forward hands its keyword arguments on, as wrappers of Hugging Face models often do."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Named()

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs)


def test_a_forward_taking_kwargs_that_cannot_be_traced_is_told_to_name_them() -> None:
    message = r"(?s)_Variadic\.forward takes \*args or \*\*kwargs, which a trace cannot unpack: name the arguments"
    with pytest.raises(RuntimeError, match=message):
        split_module(_Variadic(), split_points=["model.b"])


def test_data_dependent_control_flow_cannot_be_traced() -> None:
    message = r"(?s)could not trace the forward of _DataDependent with torch\.fx.*Python control flow on tensor values"
    with pytest.raises(RuntimeError, match=message):
        split_module(_DataDependent(), split_points=["b"])
    with pytest.raises(RuntimeError, match=message):
        balanced_split_points(_DataDependent(), 2)


def test_a_single_stage_needs_no_tracing() -> None:
    model = _DataDependent()
    partition = split_module(model, num_stages=1)
    assert partition.num_stages == 1 and partition.split_points == []
    x = torch.randn(2, 3)
    assert torch.equal(partition.train[0](x), model(x))
    assert [n for n, _ in partition.train[0].named_parameters()] == ["module." + n for n, _ in model.named_parameters()]


# --- split point helpers on a Sequential ------------------------------------------------------------------
def _eight_linears() -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])


@pytest.mark.parametrize(
    ("balance", "expected"),
    [([3, 2, 2, 1], ["3", "5", "7"]), ([4, 4], ["4"]), ([1] * 8, [str(i) for i in range(1, 8)]), ([8], [])],
)
def test_balance_to_split_points_on_a_sequential(balance: list[int], expected: list[str]) -> None:
    assert balance_to_split_points(_eight_linears(), balance) == expected


@pytest.mark.parametrize(
    ("num_stages", "expected"),
    [(2, ["4"]), (4, ["2", "4", "6"]), (8, [str(i) for i in range(1, 8)])],
)
def test_balanced_split_points_on_equal_layers(num_stages: int, expected: list[str]) -> None:
    model = _eight_linears()
    assert balanced_split_points(model, num_stages) == expected
    partition = split_module(model, balanced_split_points(model, num_stages))
    assert [len(partition.parameter_names(k)) for k in range(num_stages)] == [16 // num_stages] * num_stages


def test_balance_to_split_points_names_a_nested_trunk() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = _eight_linears()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    wrapper = Wrapper()
    points = balance_to_split_points(wrapper, [5, 3])
    assert points == ["model.5"]
    partition = split_module(wrapper, split_points=points)
    x = torch.randn(3, 4)
    assert torch.equal(_compose(partition.train, x), wrapper(x))


def test_stages_traced_for_training_only_refuse_to_evaluate() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    partition = split_module(model, ["2"], evaluation=False)
    assert partition.train[0](torch.randn(3, 4))[0].shape == (3, 8)
    with pytest.raises(RuntimeError, match="traced for training only"):
        partition.eval[0](torch.randn(3, 4))
