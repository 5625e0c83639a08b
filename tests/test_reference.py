"""The single-process DDG simulation against plain training and an independently written closed form."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_ddg import DDGReference, split_module
from tests.models import batches, mlp, split_points_for

LOSS = nn.functional.cross_entropy
LR = 0.1


def _sgd(params, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=momentum)


def _run_reference(
    model: nn.Module,
    num_stages: int,
    data: list,
    momentum: float = 0.0,
    memory: str = "stash",
    accumulate: int = 1,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], DDGReference]:
    """Train a copy of ``model`` with ``DDGReference``; return its final state dict."""
    model = copy.deepcopy(model)
    points = split_points_for(model, num_stages) if num_stages > 1 else None
    stages = split_module(model, split_points=points, num_stages=num_stages).train
    optimizers = [_sgd(s.parameters(), momentum) for s in stages]
    ref = DDGReference(stages, optimizers, LOSS, memory=memory, accumulate_grad_batches=accumulate, seed=seed)
    for x, y in data:
        ref.step(x, y)
    ref.finish()
    return {k: v.clone() for k, v in model.state_dict().items()}, ref


def _plain(model: nn.Module, data: list, momentum: float = 0.0, accumulate: int = 1, seed: int = 0) -> dict:
    """Ordinary training: forward, loss / A, backward, a step every A batches and at the end of a partial window."""
    model = copy.deepcopy(model)
    optimizer = _sgd(model.parameters(), momentum)
    torch.manual_seed(seed)
    pending = False
    for i, (x, y) in enumerate(data):
        (LOSS(model(x), y) / accumulate).backward()
        pending = True
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pending = False
    if pending:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_equal(actual: dict, expected: dict, atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=f"{name} differs")


def _max_difference(a: dict, b: dict, names=None) -> float:
    names = names if names is not None else a.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in names)


# --- K = 1 is plain backpropagation -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{}, {"dropout": 0.3, "batchnorm": True}],
    ids=["mlp", "dropout-batchnorm"],
)
def test_one_stage_equals_plain_training_with_momentum(options: dict) -> None:
    model = mlp(**options)
    data = batches(7)
    actual, ref = _run_reference(model, 1, data, momentum=0.9, seed=4)
    expected = _plain(model, data, momentum=0.9, seed=4)
    _assert_equal(actual, expected)
    assert ref.step_count == len(data) and len(ref.losses) == len(data)
    assert _max_difference(actual, dict(model.state_dict())) > 1e-3  # training did something


# --- K >= 2 against the closed form -----------------------------------------------------------------------
def _closed_form(model: nn.Module, stage_names: list[list[str]], data: list) -> dict[str, torch.Tensor]:
    """DDG written as a formula, with plain SGD.

    Stage ``k`` has delay ``d_k = K-1-k``. At step ``t`` it applies ``-LR * g_k(t - d_k)``, where ``g(b)`` is the
    ordinary full-network gradient of batch ``b``'s loss evaluated at ``W(b)``: the weights of *all* stages as
    they were when batch ``b`` was forwarded (the start of step ``b``). No step while ``t - d_k < 0``; after the
    last batch, the drain applies the remaining ``g(b)``.
    """
    num_stages = len(stage_names)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = copy.deepcopy(model)
    params = dict(probe.named_parameters())
    gradients: dict[int, dict[str, torch.Tensor]] = {}
    for t in range(len(data) + num_stages - 1):
        if t < len(data):
            # forward of batch t at W(t); its full gradient is fixed from now on
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(weights[n])
            x, y = data[t]
            grads = torch.autograd.grad(LOSS(probe(x), y), list(params.values()))
            gradients[t] = dict(zip(params, grads, strict=True))
        for k, names in enumerate(stage_names):
            b = t - (num_stages - 1 - k)
            if 0 <= b < len(data):
                for n in names:
                    weights[n] = weights[n] - LR * gradients[b][n]
    return weights


def _stage_names(model: nn.Module, num_stages: int) -> list[list[str]]:
    partition = split_module(copy.deepcopy(model), split_points=split_points_for(model, num_stages))
    return [partition.parameter_names(k) for k in range(num_stages)]


@pytest.mark.parametrize("num_stages", [2, 3])
def test_stash_equals_closed_form_with_delayed_gradients(num_stages: int) -> None:
    model = mlp()  # double precision, no dropout or batch norm: the gradient depends on weights and batch only
    data = batches(6)
    actual, _ = _run_reference(model, num_stages, data)
    expected = _closed_form(model, _stage_names(model, num_stages), data)
    assert set(expected) == {n for n, _ in model.named_parameters()}
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-10, msg=f"{name} differs")


def test_recompute_mode_equals_stash_in_the_reference() -> None:
    model = mlp(dropout=0.2, batchnorm=True)
    data = batches(5)
    stash, _ = _run_reference(model, 3, data, momentum=0.9, memory="stash")
    recompute, _ = _run_reference(model, 3, data, momentum=0.9, memory="recompute")
    _assert_equal(recompute, stash)


# --- the comparisons above can fail -----------------------------------------------------------------------
def test_delays_change_the_result() -> None:
    model = mlp()
    data = batches(6)
    names = _stage_names(model, 2)
    delayed, _ = _run_reference(model, 2, data)
    undelayed, _ = _run_reference(model, 1, data)
    # differences far above the 1e-10 tolerance of the closed-form comparison
    assert _max_difference(delayed, undelayed, names[0]) > 1e-5
    # the last stage has no delay, but its inputs come from a stage 0 trained with delays, so it drifts as well
    assert _max_difference(delayed, undelayed, names[1]) > 1e-5
    # the closed form with no delays is plain SGD and does not match K = 2
    plain = _closed_form(model, [names[0] + names[1]], data)
    _assert_equal({n: undelayed[n] for n in plain}, plain, atol=1e-10)
    assert _max_difference(delayed, plain) > 1e-5


@pytest.mark.parametrize("num_stages", [2, 3])
def test_replay_differs_from_stash(num_stages: int) -> None:
    model = mlp()
    data = batches(6)
    names = _stage_names(model, num_stages)
    stash, _ = _run_reference(model, num_stages, data, memory="stash")
    replay, _ = _run_reference(model, num_stages, data, memory="replay")
    # stage 0 recomputes its forward with newer weights in replay mode
    assert _max_difference(stash, replay, names[0]) > 1e-5
    # one stage, no delay: replay recomputes with the very weights the forward used
    one_stash, _ = _run_reference(model, 1, data, memory="stash")
    one_replay, _ = _run_reference(model, 1, data, memory="replay")
    _assert_equal(one_replay, one_stash)


# --- gradient accumulation --------------------------------------------------------------------------------
@pytest.mark.parametrize("num_batches", [6, 7], ids=["full-windows", "partial-last-window"])
def test_accumulation_with_one_stage_equals_plain_accumulation(num_batches: int) -> None:
    model = mlp()
    data = batches(num_batches)
    actual, _ = _run_reference(model, 1, data, momentum=0.9, accumulate=2)
    expected = _plain(model, data, momentum=0.9, accumulate=2)
    _assert_equal(actual, expected, atol=1e-12)
    # and differs from stepping every batch
    every_batch = _plain(model, data, momentum=0.9)
    assert _max_difference(actual, every_batch) > 1e-4


def test_partial_window_is_stepped_only_at_finish() -> None:
    model = mlp()
    data = batches(3)
    copy_model = copy.deepcopy(model)
    stages = split_module(copy_model, num_stages=1).train
    ref = DDGReference(stages, [_sgd(stages[0].parameters())], LOSS, accumulate_grad_batches=2)
    for x, y in data:
        ref.step(x, y)
    before = {k: v.clone() for k, v in copy_model.state_dict().items()}
    # two windows: [0, 1] stepped, [2] still pending
    expected_before = _plain(model, data[:2], accumulate=2)
    _assert_equal(before, expected_before, atol=1e-12)
    ref.finish()
    _assert_equal(dict(copy_model.state_dict()), _plain(model, data, accumulate=2), atol=1e-12)


def test_unknown_memory_mode() -> None:
    stages = split_module(mlp(), split_points=["2"]).train
    with pytest.raises(ValueError, match="unknown memory mode 'stashh'"):
        DDGReference(stages, [_sgd(s.parameters()) for s in stages], LOSS, memory="stashh")
