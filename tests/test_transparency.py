"""A module that holds no cut behaves under the pipeline as in the unsplit model (after torchgpipe's
``test_transparency.py``): its forward runs at every step with its Python state, randomness, side effects,
exceptions and hooks; the plan never picks a cut that then fails; planning leaves the module as it was."""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
from torch import nn

from lightning_ddg import DDGReference, DDGStrategy, plan, split_module
from lightning_ddg.opening import frozen_python
from lightning_ddg.planning import check_split
from tests.lightning_models import MLPClassifier, cpu_trainer, loader, make_optimizer
from tests.models import PassingThrough
from tests.transparency_models import (
    Counting,
    Holder,
    LayerDrop,
    Raising,
    SeededLayerDrop,
    StatefulNet,
    TinyViT,
)
from tests.zoo_job import Classifier


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


# --- opening a module with care ---------------------------------------------------------------------------
def test_python_that_tracing_would_freeze_is_found_with_its_line() -> None:
    found = frozen_python(Counting(), "net.1")
    assert [f.what for f in found] == ["assigns self.calls"]
    assert found[0].where.endswith("self.calls += 1") and "transparency_models.py:" in found[0].where
    assert [f.what for f in frozen_python(LayerDrop(), "x")] == ["draws Python or NumPy random numbers (random.random)"]
    assert [f.what for f in frozen_python(SeededLayerDrop(4, 0), "x")] == ["draws random numbers from self.rng"]
    assert frozen_python(Raising(), "x") == [] and frozen_python(nn.Linear(2, 2), "x") == []
    hooked = nn.Sequential(nn.Linear(2, 2))
    hooked.register_forward_hook(lambda m, args, out: None)
    assert [f.what.split(",")[0] for f in frozen_python(hooked, "x")] == ["has a forward hook"]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


class _CountingBlock(_Block):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.second(torch.tanh(self.first(x)))


def _blocks(counting: bool = True) -> nn.Sequential:
    """Five equal blocks; block 2 counts its calls."""
    return nn.Sequential(*[_CountingBlock() if i == 2 and counting else _Block() for i in range(5)])


def test_the_planner_prefers_a_cut_that_opens_no_module_with_python_state() -> None:
    balanced = plan(_blocks(counting=False), torch.randn(2, 4), 2, balance_by="params")
    assert balanced.split_points == ["2.second"] and balanced.opened_modules == ["2"]  # 100 parameters a stage
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = plan(_blocks(), torch.randn(2, 4), 2, balance_by="params")
    assert p.split_points in (["2"], ["3"]) and p.opened_modules == []  # 80 against 120: within the tolerance


def test_a_cut_that_must_open_such_a_module_is_warned_about() -> None:
    model = _blocks()
    line = r"test_transparency\.py:\d+: self\.calls \+= 1 \(assigns self\.calls\)"
    advice = r"name '2' or a module after it in split_points"
    with pytest.warns(UserWarning, match=rf"(?s)cut at '2.second' opens '2'.*{line}.*{advice}"):
        p = plan(model, torch.randn(2, 4), split_points=["2.second"])
    assert p.opened_modules == ["2"] and "opened for the cuts (traced, not called): 2" in str(p)
    assert model[2].calls == 0


class _GradModeBranch(nn.Module):
    """Branches in Python on the grad mode: a trace takes the branch of the mode it runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if not torch.is_grad_enabled():
            h = -h
        return self.second(h)


def test_a_split_that_does_not_reproduce_the_forward_is_warned_about() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _GradModeBranch(), nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan(model, torch.randn(2, 4), split_points=["1"])  # the module is called, as written
    with pytest.warns(UserWarning, match=r"split at \['1.second'\], the model does not reproduce its own forward"):
        plan(model, torch.randn(2, 4), split_points=["1.second"])  # traced with gradients on, checked without
    # the strategy's order: the plan first (sent to the other ranks), then the check, which warns the same
    example = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unchecked = plan(model, example, split_points=["1.second"], check=False)
    with pytest.warns(UserWarning, match=r"split at \['1.second'\], the model does not reproduce its own forward"):
        check_split(model, unchecked, example)


# --- planning leaves the module as it was -----------------------------------------------------------------
def test_planning_leaves_python_attributes_and_generators_as_they_were() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Holder(Counting()), Counting(), LayerDrop(), nn.Linear(4, 4))
    model[1].inner.history = []
    state = random.getstate()
    p = plan(model, torch.randn(2, 4), 3)
    split_module(model, p.split_points)
    assert model[1].inner.calls == 0 and model[2].calls == 0 and model[1].inner.history == []
    assert random.getstate() == state
    assert not any(name.startswith("_tensor_constant") for name in vars(model))


# --- every cut that reaches training has run --------------------------------------------------------------
class _ShapeAcross(nn.Module):
    """The shape of ``b``'s output, read between ``b`` and ``c``, is used after ``c``: no cut at ``c`` can work,
    as a ``torch.Size`` cannot be sent."""

    def __init__(self, whole_shape: bool = True) -> None:
        super().__init__()
        self.whole_shape = whole_shape
        self.a, self.b, self.c, self.d = nn.Linear(8, 8), nn.Linear(8, 64), nn.Linear(64, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x))
        if self.whole_shape:
            shape = h.size()
            return self.d(self.c(h).reshape(shape[:1] + (-1,)))  # a Size crosses
        rows = h.shape[0]  # an int crosses
        return self.d(self.c(h).reshape(rows, -1))


@pytest.mark.parametrize("example", [True, False], ids=["with-input", "without-input"])
def test_the_planner_never_chooses_a_cut_that_a_python_value_would_cross(example: bool) -> None:
    model, x = _ShapeAcross(), torch.randn(3, 8)
    p = plan(model, x if example else None, 2, balance_by="params")  # by parameters 'c' would be best
    assert p.split_points in (["b"], ["d"])
    assert torch.equal(_compose(split_module(model, p.split_points).train, x), model(x))


@pytest.mark.parametrize("example", [True, False], ids=["with-input", "without-input"])
def test_a_given_cut_that_a_python_value_would_cross_is_refused_when_planned(example: bool) -> None:
    kind = "of type Size" if example else "not a tensor"
    message = rf"'getitem' is computed before the cut at 'c' .* from stage 0 to stage 1; it is {kind}.*only tensors"
    with pytest.raises(TypeError, match=message):
        plan(_ShapeAcross(), torch.randn(3, 8) if example else None, split_points=["c"])


def test_a_size_read_from_a_shape_crosses_as_a_number() -> None:
    model, x = _ShapeAcross(whole_shape=False), torch.randn(3, 8)
    p = plan(model, x, 2, balance_by="params")
    assert p.split_points == ["c"]
    first, second = split_module(model, p.split_points).train
    sent = first(x)
    assert type(sent[1]) is int  # the row count travels in the message's header
    assert torch.equal(_compose([first, second], x), model(x))


class _MaskOrNone(nn.Module):
    """Takes an optional mask, as timm's and Hugging Face's models do, and uses it in every block."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=mask)))
        return self.head(x.mean(dim=1))


def test_an_optional_mask_crosses_the_cut_as_none_or_as_a_tensor() -> None:
    model, x = _MaskOrNone(), torch.randn(3, 5, 8)
    p = plan(model, x, 2, balance_by="params")  # the example gives x only: mask is None
    assert p.note is None  # the example input ran
    assert p.split_points == ["blocks.2"]  # balanced, though every block uses the mask
    stages = split_module(model, p.split_points).train
    assert torch.equal(_compose(stages, x), model(x))
    mask = torch.randn(5, 5)
    assert torch.equal(_compose(stages, x, mask), model(x, mask))


def test_a_timm_vit_called_bare_is_cut_between_its_blocks() -> None:
    # forward(x, attn_mask=None, is_causal=False) hands both to every block: they cross every cut between blocks
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=48, depth=4, num_heads=3)
    x = torch.randn(2, 3, 16, 16)
    p = plan(model.eval(), x, 2, balance_by="flops")
    assert p.split_points == ["blocks.2"]
    torch.testing.assert_close(_compose(split_module(model, p.split_points).eval, x), model(x), rtol=0, atol=0)


def test_a_vit_reading_shapes_in_attention_plans_cuts_that_run() -> None:
    model, x = TinyViT(), torch.randn(2, 3, 16, 16)
    for num_stages in (2, 3, 4, 6):
        p = plan(model, x, num_stages, balance_by="flops")
        stages = split_module(model, p.split_points).train
        torch.testing.assert_close(_compose(stages, x), model(x), rtol=0, atol=0)
    # inside attention, the sizes read from the input's shape cross as numbers
    stages = split_module(model, ["blocks.1.attn.qkv"]).train
    assert any(type(value) is int for value in stages[0](x))
    torch.testing.assert_close(_compose(stages, x), model(x), rtol=0, atol=0)


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


# --- the pipeline against the reference run on the unsplit modules ----------------------------------------
def _reference_on_unsplit_modules(model: StatefulNet, num_stages: int, epochs: int = 2) -> dict:
    model = copy.deepcopy(model)
    net = model.net
    bounds = [0, *[int(p.split(".")[1]) for p in StatefulNet.SPLIT_POINTS.get(num_stages, [])], len(net)]
    stages = [net[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]  # the blocks themselves, untraced
    optimizers = [torch.optim.SGD(s.parameters(), lr=0.05, momentum=0.9) for s in stages]
    ref = DDGReference(stages, optimizers, nn.functional.cross_entropy)
    for _ in range(epochs):
        for x, y in loader():
            ref.step(x, y)
    ref.finish()
    return dict(model.state_dict())


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_blocks_with_python_state_match_the_reference_on_the_unsplit_modules(num_stages: int) -> None:
    model = StatefulNet()
    expected = _reference_on_unsplit_modules(model, num_stages)
    points = StatefulNet.SPLIT_POINTS.get(num_stages)
    strategy = DDGStrategy(start_method="forkserver", split_points=points)
    cpu_trainer(strategy, num_stages, max_epochs=2).fit(model, loader())
    actual = dict(model.state_dict())
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


class _OptionalArguments(MLPClassifier):
    """Its forward takes an optional mask and a flag, as timm's models do, and its steps leave both out: they cross
    the cuts as None and False, beside a row count read from a shape (``tests.models.PassingThrough``)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = PassingThrough()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        return self.model(x, mask, causal)


def test_none_a_flag_and_a_number_crossing_the_cuts_of_a_fit_match_the_reference() -> None:
    model = _OptionalArguments()
    reference = copy.deepcopy(model.model)
    stages = split_module(reference, ["b", "c"]).train
    optimizers = [make_optimizer("sgd", s.parameters()) for s in stages]
    ref = DDGReference(stages, optimizers, nn.functional.cross_entropy)
    for _ in range(2):
        for x, y in loader():
            ref.step(x, y)
    ref.finish()
    strategy = DDGStrategy(start_method="forkserver", split_points=["model.b", "model.c"])
    trainer = cpu_trainer(strategy, 3, max_epochs=2)
    trainer.fit(model, loader(), loader(n=16))  # validation sends them through the evaluation stages too
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[name], expected, rtol=1e-5, atol=1e-7, msg=name)


def test_a_vit_reading_shapes_in_attention_trains_with_no_options() -> None:
    torch.manual_seed(0)
    model = Classifier(TinyViT())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    )
    trainer = cpu_trainer(DDGStrategy(start_method="forkserver"), 2, max_steps=3)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=2))  # planned by time, on rank 0
    assert all(not torch.equal(before[n], p) and torch.isfinite(p).all() for n, p in model.named_parameters())
