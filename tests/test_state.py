"""Gathering the whole model's state from stage processes (``state.py``, ``build.py``), without a Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_ddg import Topology, build_stage
from lightning_ddg.shard import put_back
from lightning_ddg.state import StageStates, fill_placeholders, load_stage_state
from tests.models import batches, mlp, split_points_for
from tests.multiprocess import run_processes

STAGES = 2


def _whole_model_step() -> tuple[dict[str, torch.Tensor], dict]:
    """A whole model after one SGD-with-momentum step: its state dict and its optimizer's state, by name."""
    model = mlp(batchnorm=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    names = [n for n, _ in model.named_parameters()]
    return dict(model.state_dict()), {names[i]: s for i, s in optimizer.state_dict()["state"].items()}


def _gather(rank: int, world_size: int) -> dict:
    """Each rank keeps its stage of a model that took one step, then gathers the whole state back."""
    model = mlp(batchnorm=True)
    whole = copy.deepcopy(model)
    keys, order = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    topology = Topology(num_stages=world_size)
    built = build_stage(model, topology, rank, split_points=split_points_for(model, world_size), keep_only=True)
    # the step the whole model took, on this rank's own parameters: their gradients are the whole model's
    x, y = batches(1)[0]
    nn.functional.cross_entropy(whole(x), y).backward()
    grads = {n: p.grad for n, p in whole.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for name, p in model.named_parameters():
        p.grad = grads[name]
    optimizer.step()
    with torch.no_grad():  # the BatchNorm statistics of the whole model's forward
        for name, b in model.named_buffers():
            b.copy_(whole.get_buffer(name))
    held = sorted(n for n, _ in model.named_parameters())
    states = StageStates(topology, rank, world_size, keys, order)
    names = {id(p): n for n, p in model.named_parameters()}
    checkpoint = {
        "state_dict": states.module_state_dict(model),
        "optimizer_states": [states.optimizer_state(optimizer, names)],
    }
    streamed = states.take_streamed()
    if rank == 0:
        fill_placeholders(checkpoint, streamed, states.receive_streamed(streamed))
    else:
        states.send_streamed(checkpoint, streamed)
    full = states.full_state_dict(model, dst=0)
    put_back(built.removed, states.gather_tensors(model))
    return {
        "held": held,
        "checkpoint": checkpoint if rank == 0 else None,
        "full": full,
        "put_back": dict(model.state_dict()),
        "keys": keys,
        "order": order,
    }


def test_stages_gather_the_whole_state_a_checkpoint_and_the_optimizer_state() -> None:
    results = run_processes(_gather, STAGES, timeout=120)
    expected, optimizer_state = _whole_model_step()
    # each process held only its stage: the two parts are disjoint and make the whole
    held = [set(r["held"]) for r in results]
    assert held[0] and held[1] and not held[0] & held[1]
    assert held[0] | held[1] == set(results[0]["order"])
    assert results[1]["full"] is None
    for state in (results[0]["full"], results[0]["checkpoint"]["state_dict"], results[0]["put_back"]):
        assert list(state) == results[0]["keys"]
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-12)
    torch.testing.assert_close(results[1]["put_back"], results[0]["put_back"], rtol=0, atol=0)
    saved = results[0]["checkpoint"]["optimizer_states"][0]
    order = results[0]["order"]
    assert sorted(saved["state"]) == list(range(len(order)))
    for index, entry in saved["state"].items():
        want = optimizer_state[order[index]]["momentum_buffer"]
        torch.testing.assert_close(entry["momentum_buffer"], want, rtol=0, atol=1e-12)


def test_one_process_gathers_its_own_state() -> None:
    model = mlp()
    states = StageStates(Topology(num_stages=1), rank=0, world_size=1, state_dict_keys=list(model.state_dict()))
    full = states.full_state_dict(model)
    assert full is not None and list(full) == list(model.state_dict())
    assert set(states.gather_tensors(model)) == {n for n, _ in model.named_parameters()}


def test_loading_a_stage_state_checks_names_and_shapes() -> None:
    model = mlp()
    state = {n: torch.zeros_like(t) for n, t in model.state_dict().items()}
    load_stage_state(model, state)
    assert all(t.abs().sum() == 0 for t in model.state_dict().values())
    with pytest.raises(RuntimeError, match="lacks"):
        load_stage_state(model, {})
    state["0.weight"] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="0.weight has shape"):
        load_stage_state(model, state)


def test_build_stage_in_one_process_and_its_errors() -> None:
    model = mlp()
    built = build_stage(model, Topology(num_stages=1), 0)
    assert built.links is None and built.stage.is_first and built.stage.is_last
    x, y = batches(1)[0]
    torch.testing.assert_close(built.stage.forward(x), model(x))
    with pytest.raises(ValueError, match="not both"):
        build_stage(mlp(), Topology(num_stages=1), 0, split_points=["2"], partition=built.partition)
