"""Optimizer state mapped between stages and the whole model, without processes: a whole-model optimizer
and per-stage optimizers fed the same gradients must hold the same state after any round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ddg.checkpoint import (
    NothingToTrain,
    group_names,
    merge_optimizer_states,
    named_optimizer_state,
    stage_optimizer_state,
)

STAGES = [["0.weight", "0.bias", "2.weight"], ["2.bias", "4.weight", "4.bias"]]  # one cut inside layer 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def _groups(params: dict[str, nn.Parameter]) -> list[dict]:
    """Two param groups, biases without weight decay, as users often write them."""
    return [
        {"params": [p for n, p in params.items() if n.endswith("weight")], "weight_decay": 0.1},
        {"params": [p for n, p in params.items() if n.endswith("bias")], "weight_decay": 0.0},
    ]


def _stepped(params: dict[str, nn.Parameter], steps: int = 3) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(_groups(params), lr=0.01)
    for step in range(steps):
        for name, p in params.items():
            p.grad = torch.full_like(p, 0.1 * (step + 1) + len(name))
        optimizer.step()
    return optimizer


def _stage_setup() -> tuple[list[dict[str, nn.Parameter]], list[torch.optim.Optimizer], list[dict[int, str]]]:
    model = _model()
    named = dict(model.named_parameters())
    params = [{n: named[n] for n in stage} for stage in STAGES]
    optimizers = [_stepped(p) for p in params]
    names = [{id(p): n for n, p in stage.items()} for stage in params]
    return params, optimizers, names


def test_stage_states_merge_into_the_whole_models_state() -> None:
    whole = _stepped(dict(_model().named_parameters())).state_dict()
    _, optimizers, names = _stage_setup()
    order = [n for n, _ in _model().named_parameters()]
    parts = [named_optimizer_state(o, n) for o, n in zip(optimizers, names, strict=True)]
    merged = merge_optimizer_states(parts, order)
    assert merged["param_groups"] == whole["param_groups"]
    assert merged["state"].keys() == whole["state"].keys()
    for i, state in whole["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(merged["state"][i][key], value, rtol=0, atol=0)


def test_a_stage_that_trains_nothing_adds_nothing_to_the_whole_models_state() -> None:
    # a frozen first stage (NothingToTrain) before the stage that trains: the state one device's optimizer over the
    # trainable parameters holds, which splits back onto both stages
    def trained() -> dict[str, nn.Parameter]:  # the second stage's parameters, as a fresh model has them
        return {n: p for n, p in _model().named_parameters() if n in STAGES[1]}

    whole = _stepped(trained()).state_dict()  # one device's optimizer over the parameters it is given
    params = trained()
    optimizer = _stepped(params)
    parts = [named_optimizer_state(NothingToTrain(), {}), named_optimizer_state(optimizer, _ids(params))]
    order = [n for n, _ in _model().named_parameters()]
    merged = merge_optimizer_states(parts, order)
    assert merged["param_groups"] == whole["param_groups"] and merged["state"].keys() == whole["state"].keys()
    for i, state in whole["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(merged["state"][i][key], value, rtol=0, atol=0)
    groups = [[], group_names(optimizer, _ids(params))]
    shapes = {n: p.shape for n, p in _model().named_parameters()}
    assert stage_optimizer_state(merged, [], groups, order, shapes) == {"state": {}, "param_groups": []}
    assert NothingToTrain().step(lambda: 1.5) == 1.5 and NothingToTrain().param_groups == []


def _ids(params: dict[str, nn.Parameter]) -> dict[int, str]:
    return {id(p): n for n, p in params.items()}


def test_replicas_of_a_stage_count_once() -> None:
    """With data-parallel replicas every stage's state may arrive more than once; names keep it whole and unique."""
    _, optimizers, names = _stage_setup()
    order = [n for n, _ in _model().named_parameters()]
    parts = [named_optimizer_state(o, n) for o, n in zip(optimizers, names, strict=True)]
    once = merge_optimizer_states(parts, order)
    twice = merge_optimizer_states([parts[1], parts[0], parts[1], parts[0]], order)
    assert twice["param_groups"] == once["param_groups"]
    assert twice["state"].keys() == once["state"].keys()
    for i, state in once["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(twice["state"][i][key], value, rtol=0, atol=0)
    # resuming, the param groups of every rank arrive, the replicas' included
    params, _, _ = _stage_setup()
    all_groups = [group_names(o, n) for o, n in zip(optimizers, names, strict=True)]
    shapes = {n: p.shape for n, p in params[0].items()}
    split = stage_optimizer_state(once, all_groups[0], all_groups, order, shapes)
    assert split == stage_optimizer_state(once, all_groups[0], all_groups * 2, order, shapes)


def test_whole_models_state_splits_onto_stages() -> None:
    whole = _stepped(dict(_model().named_parameters())).state_dict()
    params, optimizers, names = _stage_setup()
    order = [n for n, _ in _model().named_parameters()]
    all_groups = [group_names(o, n) for o, n in zip(optimizers, names, strict=True)]
    for stage, optimizer, groups in zip(params, optimizers, all_groups, strict=True):
        shapes = {n: p.shape for n, p in stage.items()}
        expected = optimizer.state_dict()
        split = stage_optimizer_state(whole, groups, all_groups, order, shapes)
        assert split["param_groups"] == expected["param_groups"]
        for i, state in expected["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(split["state"][i][key], value, rtol=0, atol=0)
        optimizer.load_state_dict(split)  # torch accepts it


def test_mismatched_optimizer_configurations_are_refused() -> None:
    params, optimizers, names = _stage_setup()
    order = [n for n, _ in _model().named_parameters()]
    all_groups = [group_names(o, n) for o, n in zip(optimizers, names, strict=True)]
    shapes = {n: p.shape for stage in params for n, p in stage.items()}
    one_group = torch.optim.AdamW(_model().parameters(), lr=0.01).state_dict()
    with pytest.raises(ValueError, match="1 param group"):
        stage_optimizer_state(one_group, all_groups[0], all_groups, order, shapes)

    # a checkpoint whose groups list the parameters in another order than the model's cannot be mapped
    whole = _stepped(dict(_model().named_parameters())).state_dict()
    with pytest.raises(ValueError, match="model's order"):
        stage_optimizer_state(whole, all_groups[0], all_groups, list(reversed(order)), shapes)
