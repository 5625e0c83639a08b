"""The stage runtime against the single-process reference.

The stages run in one process, stepped in lock-step over in-memory channels (``local.py``): the runtime is the
one of a real job, only the transport differs. A few cases run in real gloo processes, to prove the transport
(buffer reuse, figures in headers, the same results across processes)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_ddg import DDGReference, DDGStage, StageLinks, Topology, build_stage, plan, split_module
from lightning_ddg.local import LockStep
from lightning_ddg.stage import MEMORY_MODES
from tests.models import (
    PassingThrough,
    TiedLM,
    batches,
    lm_loss,
    make_optimizer,
    mlp,
    split_points_for,
    token_batches,
)
from tests.multiprocess import run_processes

LOSS = nn.functional.cross_entropy


def _model(options: dict) -> nn.Module:
    dtype = options.get("dtype", torch.float64)
    if options.get("model") == "passing through":
        return PassingThrough(dtype)
    if options.get("model") == "tied lm":
        return TiedLM(
            dtype,
            tie_blocks=options.get("tie_blocks", False),
            dropout=options.get("dropout", 0.0),
            tie_head=options.get("tie_head", True),
        )
    return mlp(
        dropout=options.get("dropout", 0.0),
        batchnorm=options.get("batchnorm", False),
        dtype=dtype,
        recomputed=options.get("recomputed", False),
        parametrized=options.get("parametrized", False),
    )


def _batches(options: dict) -> list[tuple[Any, torch.Tensor]]:
    if options.get("model") == "tied lm":
        return token_batches(options["batches"])
    data = batches(options["batches"], dtype=options.get("dtype", torch.float64))
    if options.get("mask"):  # the optional mask given: it crosses the first cut as a tensor, not as None
        return [((x, torch.randn(len(x), 1, 1, dtype=x.dtype)), y) for x, y in data]
    return data


def _loss(options: dict):  # noqa: ANN202 - a loss function
    return lm_loss if options.get("model") == "tied lm" else LOSS


def _train_cases(rank: int, world_size: int, cases: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Several trainings in one launch of the processes, which costs more than the trainings themselves."""
    return [_train_stage(rank, world_size, options) for options in cases]


def _train_stage(rank: int, world_size: int, options: dict) -> dict[str, torch.Tensor]:
    topology = Topology(num_stages=world_size)
    model = _model(options)
    accumulate = options.get("accumulate", 1)
    built = build_stage(
        model,
        topology,
        rank,
        split_points=split_points_for(model, world_size),
        memory=options["memory"],
        accumulate_grad_batches=accumulate,
    )
    stage, links = built.stage, built.links
    loss_fn = _loss(options)
    optimizer = make_optimizer(options["optimizer"], stage.parameters)
    torch.manual_seed(options["seed"])

    def step() -> None:
        stage.install_gradients()
        optimizer.step()

    data = _batches(options)
    for _epoch in range(options.get("epochs", 1)):
        for x, y in data:
            out = stage.forward(*x) if isinstance(x, tuple) else stage.forward(x)
            loss = loss_fn(out, y) / accumulate if stage.is_last else None
            if stage.backward(loss):
                step()
    figures = stage.snapshots()
    for ready in stage.drain():
        if ready:
            step()
    links.close()
    links.destroy()
    if options.get("figures"):
        return figures
    return {name: p.detach().clone() for name, p in stage.module.named_parameters()} | {
        name: b.clone() for name, b in stage.module.named_buffers()
    }


def _reference(num_stages: int, options: dict) -> dict[str, torch.Tensor]:
    model = _model(options)
    stages = split_module(model, split_points_for(model, num_stages)).train
    optimizers = [make_optimizer(options["optimizer"], s.parameters()) for s in stages]
    ref = DDGReference(
        stages,
        optimizers,
        _loss(options),
        memory="replay" if options["memory"] == "replay" else "stash",
        accumulate_grad_batches=options.get("accumulate", 1),
        seed=options["seed"],
    )
    for _ in range(options.get("epochs", 1)):
        for x, y in _batches(options):
            ref.step(x, y)
    ref.finish()
    return dict(model.state_dict())


def _train_in_one_process(num_stages: int, options: dict) -> dict[str, torch.Tensor]:
    """The same training as :func:`_train_stage` in every process, with every stage in this one."""
    model = _model(options)
    accumulate = options.get("accumulate", 1)
    pipeline = LockStep(
        model,
        split_points_for(model, num_stages),
        seed=options["seed"],
        memory=options["memory"],
        accumulate_grad_batches=accumulate,
    )
    optimizers = [make_optimizer(options["optimizer"], stage.parameters) for stage in pipeline.stages]
    loss_fn = _loss(options)
    data = _batches(options)
    for _epoch in range(options.get("epochs", 1)):
        for x, y in data:
            pipeline.step(x, lambda out, y=y: loss_fn(out, y) / accumulate, optimizers)
    pipeline.drain(optimizers)
    return dict(model.state_dict())


def _check(num_stages: int, *cases: dict, processes: bool = False) -> None:
    """Each case trained by the runtime matches the reference: in one process, or with ``processes`` in
    ``num_stages`` gloo processes."""
    if processes:
        results = run_processes(_train_cases, num_stages, list(cases), timeout=120)
        trained = [{name: t for part in results for name, t in part[i].items()} for i in range(len(cases))]
    else:
        trained = [_train_in_one_process(num_stages, options) for options in cases]
    for merged, options in zip(trained, cases, strict=True):
        _assert_matches_reference(num_stages, options, merged)


def _assert_matches_reference(num_stages: int, options: dict, merged: dict[str, torch.Tensor]) -> None:
    expected = _reference(num_stages, options)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(
            merged[name], value, rtol=1e-5, atol=1e-7, msg=lambda m, name=name, o=options: f"{name}, {o}: {m}"
        )
    # a tied weight: one tensor under several names in the reference, a copy per stage here, kept bitwise equal
    names_of: dict[int, list[str]] = {}
    for name, value in expected.items():
        names_of.setdefault(value.data_ptr(), []).append(name)
    for first, *others in names_of.values():
        for other in others:
            assert torch.equal(merged[first], merged[other]), f"{first} and {other} differ, {options}"


# stash on a plain MLP; recompute with dropout (its masks must be drawn again alike) and BatchNorm (its statistics
# must not be updated twice); each in fp32 and fp64
MEMORY_MODELS = [
    {"memory": "stash", "batches": 7, "seed": 3},
    {"memory": "recompute", "batches": 6, "seed": 5, "dropout": 0.3, "batchnorm": True},
]


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_stash_and_recompute_match_reference_with_sgd_and_adam(num_stages: int) -> None:
    cases = [
        model | {"optimizer": optimizer, "dtype": dtype}
        for model in MEMORY_MODELS
        for optimizer in ("sgd", "adam")
        for dtype in (torch.float32, torch.float64)
    ]
    _check(num_stages, *cases)


def test_a_layer_that_recomputes_in_backward_uses_the_weights_of_its_batch() -> None:
    # gradient checkpointing runs a layer's forward again during its backward: on a stage with a delay, that must be
    # on the weights the batch's forward used, not on those updated since
    cases = ({"memory": m, "optimizer": "sgd", "batches": 6, "seed": 2, "recomputed": True} for m in MEMORY_MODES)
    _check(3, *cases)


def test_layers_under_parametrizations_train_as_the_reference_does() -> None:
    # weight norm's weight is computed from two parameters at every forward; spectral norm's power iteration updates
    # its buffers at every training forward and reads them back
    cases = ({"memory": m, "optimizer": "adam", "batches": 6, "seed": 3, "parametrized": True} for m in MEMORY_MODES)
    _check(3, *cases)


def test_the_plan_of_layers_under_parametrizations_raises_no_false_alarm() -> None:
    # the check of a plan runs the whole model and then the split one: both from the same power-iteration buffers
    model = mlp(width=64, parametrized=True, dtype=torch.float32)  # far from converged: every iteration counts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan(model, torch.randn(6, 8), 3)


class _CheckpointedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(TiedLM.VOCAB, 16)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.embed, tokens, use_reentrant=False)


def test_an_embedding_weight_is_not_copied_for_the_batches_in_flight() -> None:
    # its gradient reads the indices, not the weight: a stage with a delay keeps the embedding itself for each batch
    # in flight, not a copy, and trains as the reference does (tied to the head on another stage: the test above)
    _check(3, {"model": "tied lm", "memory": "stash", "optimizer": "adam", "batches": 6, "seed": 4, "tie_head": False})
    for memory in MEMORY_MODES:
        first = LockStep(TiedLM(tie_head=False), TiedLM.SPLIT_POINTS[3], memory=memory).stages[0]
        copied = first._live_weights()
        kept = [name for name, p, c in zip(first._names, first.parameters, copied, strict=True) if c is p]
        # and the bias of the linear layer after it, whose gradient sums the output's gradient
        assert kept == (["embed.weight", "blocks.0.bias"] if memory == "stash" else []), memory  # recompute runs again
    # a first stage of the embedding alone copies nothing, and trains
    model = TiedLM(tie_head=False)
    pipeline = LockStep(model, ["blocks.0", "blocks.4"], memory="stash")
    first = pipeline.stages[0]
    assert [c is p for c, p in zip(first._live_weights(), first.parameters, strict=True)] == [True]
    optimizers = [make_optimizer("sgd", stage.parameters) for stage in pipeline.stages]
    before = model.embed.weight.detach().clone()
    for x, y in token_batches(4):
        pipeline.step(x, lambda out, y=y: lm_loss(out, y), optimizers)
    pipeline.drain(optimizers)
    assert not torch.equal(model.embed.weight, before)
    # an embedding that a module called whole runs under a checkpoint is read again in backward: copied
    model = nn.Sequential(_CheckpointedEmbedding(), nn.Linear(16, 16), nn.Linear(16, 16))
    first = LockStep(model, ["2"], memory="stash").stages[0]
    live = [name for name, p, c in zip(first._names, first.parameters, first._live_weights(), strict=True) if c is p]
    assert live == ["1.bias"], live  # the linear layer's bias, which its own graph node sums the gradient into


class _ScaledInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x * self.scale)))


def test_a_first_stage_keeps_no_copy_of_its_first_linear_weight_nor_of_any_bias() -> None:
    # autograd saves neither: a bias's gradient sums the output's gradient, and the first stage's first linear layer
    # takes the stage's input, whose gradient (the one reader of the weight) the first stage never computes
    _check(3, {"memory": "stash", "optimizer": "adam", "batches": 6, "seed": 5})
    model = mlp(depth=4)
    stages = LockStep(model, split_points_for(model, 2), memory="stash").stages
    live = [
        name
        for name, p, c in zip(stages[0]._names, stages[0].parameters, stages[0]._live_weights(), strict=True)
        if c is p
    ]
    assert live == ["0.weight", "0.bias", "2.bias"], live
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)  # the first stage detaches its input
    stages[0].forward(x)
    assert not stages[0]._inflight[0].inputs[0].requires_grad
    # a linear layer whose input went through another parameter first is read by the backward: copied
    first = LockStep(_ScaledInput(), ["second"], memory="stash").stages[0]
    live = [name for name, p, c in zip(first._names, first.parameters, first._live_weights(), strict=True) if c is p]
    assert live == ["first.bias"], live


# over the real transport, one launch of three gloo processes serves three tests (a launch costs more than them)
GLOO_CASES = [model | {"optimizer": "adam", "dtype": torch.float64} for model in MEMORY_MODELS]
FIGURES_CASE = {"memory": "stash", "optimizer": "sgd", "batches": 5, "seed": 1, "figures": True}
STORAGE_STEPS = 40


def _over_gloo(rank: int, world_size: int) -> tuple[list, list[tuple[int, list[int]]]]:
    trained = _train_cases(rank, world_size, [*GLOO_CASES, FIGURES_CASE])
    storages = [_received_storages(rank, world_size, STORAGE_STEPS, shared) for shared in (False, True)]
    return trained, storages


@pytest.fixture(scope="module")
def three_gloo_processes() -> list[tuple[list, list[tuple[int, list[int]]]]]:
    return run_processes(_over_gloo, 3, timeout=180)


@pytest.mark.parametrize("memory", ["stash", "recompute"])
def test_a_stage_with_delay_d_holds_d_weight_copies(memory: str) -> None:
    """The batch a stage forwards reads the live weights until its step ends; each of the ``d`` batches before it
    holds the data the live weights had in its own step: ``d`` copies on a stage of delay ``d`` (none on the last),
    allocated in the first ``d`` steps and reused from then on."""
    model = mlp(depth=8)
    pipeline = LockStep(model, split_points_for(model, 4), memory=memory)
    optimizers = [make_optimizer("sgd", stage.parameters) for stage in pipeline.stages]
    storages: list[set[int]] = [set() for _ in pipeline.stages]
    for t, (x, y) in enumerate(batches(9)):
        pipeline.step(x, lambda out, y=y: LOSS(out, y), optimizers)
        for stage, seen in zip(pipeline.stages, storages, strict=True):
            copies = {id(item.copy) for item in stage._inflight if item.copy is not None}
            assert len(copies) == min(t + 1, stage.delay)
            # the first of the stashed weights, in the copies and live (a bias is never copied, nor in "stash" the
            # first stage's first layer, whose input needs no gradient)
            seen.update(data[0].data_ptr() for data in [*(item.copy for item in stage._inflight if item.copy)])
            seen.add(stage._stashed_parameters[0].data_ptr())
            held = stage.snapshots()[-1].stashed_weight_bytes
            assert held == len(copies) * sum(p.numel() * p.element_size() for p in stage._stashed_parameters)
    assert [len(seen) for seen in storages] == [4, 3, 2, 1]  # the live weights' data and the d copies, in turn
    pipeline.drain(optimizers)
    assert all(not stage._inflight for stage in pipeline.stages)


def test_a_weight_changed_in_place_between_a_forward_and_its_step_is_refused() -> None:
    # the batch just forwarded reads the live weights until its step ends: a change before then is caught, not used
    model = mlp()
    pipeline = LockStep(model, split_points_for(model, 2), memory="stash")
    optimizers = [make_optimizer("sgd", stage.parameters) for stage in pipeline.stages]
    first_weight = pipeline.stages[0].parameters[2]  # the second linear layer's: its backward reads it

    def loss_changing_a_weight(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            first_weight.mul_(0.5)  # after every stage's forward, before the backwards and the steps
        return LOSS(out, y)

    (x, y), (x2, y2) = batches(2)
    pipeline.step(x, lambda out: LOSS(out, y), optimizers)
    with pytest.raises(RuntimeError, match=r"'2.weight' of stage 0 was changed in place after batch 1's forward"):
        pipeline.step(x2, lambda out: loss_changing_a_weight(out, y2), optimizers)


def test_stash_and_recompute_match_reference_across_gloo_processes(three_gloo_processes: list) -> None:
    for i, options in enumerate(GLOO_CASES):
        merged = {name: t for trained, _ in three_gloo_processes for name, t in trained[i].items()}
        _assert_matches_reference(3, options, merged)


def test_dropout_batchnorm_across_epochs() -> None:
    options = {"optimizer": "sgd", "batches": 4, "epochs": 2, "seed": 7, "dropout": 0.2, "batchnorm": True}
    _check(3, options | {"memory": "stash"}, options | {"memory": "replay"})


def test_gradient_accumulation_windows_aligned_to_batches() -> None:
    _check(3, {"memory": "stash", "optimizer": "sgd", "batches": 7, "seed": 2, "accumulate": 3})


PASSING_THROUGH = [
    *({"memory": m, "optimizer": "adam", "batches": 9, "seed": 4, "model": "passing through"} for m in MEMORY_MODES),
    {"memory": "recompute", "optimizer": "adam", "batches": 9, "seed": 4, "model": "passing through", "mask": True},
]


def test_values_received_and_sent_on_are_not_reused_too_early() -> None:
    # received buffers are reused once backwarded, except those that left the stage again: a property of the
    # gloo channels, which reuse their buffers (the in-memory ones never do); None, a flag and a row count cross
    # in the headers
    _check(4, *PASSING_THROUGH, processes=True)


def test_values_passing_through_stages_match_the_reference_in_one_process() -> None:
    _check(4, *PASSING_THROUGH)


def _received_storages(rank: int, world_size: int, steps: int, shared_memory: bool) -> tuple[int, list[int]]:
    """How many distinct buffers this rank's stage received its inputs and gradients in, over ``steps`` steps."""
    model = mlp()
    topology = Topology(num_stages=world_size)
    links = StageLinks.create(topology, rank, torch.device("cpu"), shared_memory=shared_memory)
    built = build_stage(model, topology, rank, split_points=split_points_for(model, world_size), links=links)
    stage, links, k = built.stage, built.links, built.stage.stage_index
    # every tensor received stays referenced here, so that no address is freed and handed out again
    seen: dict[str, list[torch.Tensor]] = {"act_in": [], "grad_in": []}
    for name in seen:
        channel = getattr(links, name)
        if channel is not None:
            recv = channel.recv
            channel.recv = lambda recv=recv, name=name: [seen[name].append(t) or t for t in recv()]
    for x, y in batches(steps, last=6):
        out = stage.forward(x)
        stage.backward(LOSS(out, y) if stage.is_last else None)
    list(stage.drain())
    links.close()
    links.destroy()
    return k, [len({t.untyped_storage().data_ptr() for t in seen[name]}) for name in ("act_in", "grad_in")]


def test_weights_tied_across_stages_match_reference() -> None:
    # tied copies are kept equal by collectives over their owners' group: gloo processes
    # the embedding and the head in the first and the last stage; with three stages, two blocks in the first and the
    # second stage too (a tie whose owners both have delays, so the drain and warm-up differ from the last stage's)
    lm = {"model": "tied lm", "batches": 7, "seed": 3}
    _check(
        2,
        lm | {"memory": "stash", "optimizer": "sgd"},
        lm | {"memory": "recompute", "optimizer": "adam", "accumulate": 2, "tie_blocks": True},
        processes=True,
    )
    _check(
        3,
        lm | {"memory": "stash", "optimizer": "adam", "tie_blocks": True},
        lm | {"memory": "recompute", "optimizer": "sgd", "accumulate": 2, "tie_blocks": True, "dropout": 0.2},
        lm | {"memory": "replay", "optimizer": "sgd", "accumulate": 3, "tie_blocks": True},
        # one batch: the embedding's owners backward it at steps 0 and 2, and step 1 updates nothing
        lm | {"memory": "stash", "optimizer": "adam", "batches": 1},
        processes=True,
    )


def test_receiving_allocates_nothing_in_steady_state(three_gloo_processes: list) -> None:
    over_gloo = dict(storages[0] for _, storages in three_gloo_processes)
    # stage k holds the inputs of d+1 batches and the one posted ahead; a gradient and the one posted ahead
    assert over_gloo == {0: [0, 2], 1: [3, 2], 2: [2, 0]}
    through_shared_memory = dict(storages[1] for _, storages in three_gloo_processes)
    # nothing is posted ahead: a message is copied into a buffer as it arrives
    assert through_shared_memory == {0: [0, 1], 1: [2, 1], 2: [1, 0]}


class _ReturnsItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3).double()

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(h), h


def _kept_outputs(rank: int, world_size: int) -> bool:
    """The last stage returns the tensor it received as it is; the caller keeps it over later steps."""
    topology = Topology(num_stages=world_size)
    k = topology.stage_of(rank)
    links = StageLinks.create(topology, rank, torch.device("cpu"))
    torch.manual_seed(0)
    module = nn.Linear(8, 16).double() if k == 0 else _ReturnsItsInput()
    stage = DDGStage(module, k, world_size, links)
    kept = []
    for x, y in batches(12, last=6):
        out = stage.forward(x)
        if stage.is_last:
            kept.append((out[1], out[1].detach().clone()))
        stage.backward(LOSS(out[0], y) if stage.is_last else None)
    list(stage.drain())
    links.close()
    links.destroy()
    return all(torch.equal(tensor, value) for tensor, value in kept)


def test_a_received_tensor_the_last_stage_returns_is_not_reused() -> None:
    assert run_processes(_kept_outputs, 2, timeout=120) == [True, True]


def test_last_stage_receives_every_stages_figures(three_gloo_processes: list) -> None:
    snapshots = [trained[len(GLOO_CASES)] for trained, _ in three_gloo_processes]
    by_stage = {len(s) - 1: s for s in snapshots}  # stage k knows the figures of stages 0..k
    last = by_stage[2]
    assert [s.steps for s in last] == [5, 5, 5]
    assert [s.samples for s in last] == [4 * 6 + 4] * 3
    assert all(s.busy_us > 0 and s.active_us >= s.busy_us for s in last)
    assert last[1].wait_us > 0  # stage 1 waits for stage 0's activations
    # stage 1 (delay 1) holds a weight copy, when it sends an activation as after the step: the batch it forwards
    # reads the live weights until the optimizer step; stage 0's one linear layer takes the input, whose gradient
    # it never computes, so that no backward reads its weight: it holds none, as the last stage
    assert last[1].stashed_weight_bytes == by_stage[1][1].stashed_weight_bytes > 0
    assert last[0].stashed_weight_bytes == last[2].stashed_weight_bytes == 0
    assert all(s.activation_bytes > 0 for s in last)
