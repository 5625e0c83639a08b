"""The plain parts the strategy hands work to, without a Trainer: example batches, loaders, the forward."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_ddg import Topology, build_stage
from lightning_ddg.example_input import forward_arguments
from lightning_ddg.forward import PipelinedForward
from lightning_ddg.loaders import check_sampler_shards_replicas, loader_length, seed_shuffling
from tests.models import batches, mlp


def _forward(x: torch.Tensor, mask: torch.Tensor | None = None) -> None: ...


def _forward_two(a: torch.Tensor, b: torch.Tensor) -> None: ...


def test_forward_arguments_take_the_inputs_of_a_batch() -> None:
    x, y = torch.zeros(2, 3), torch.zeros(2)
    one, two = inspect.signature(_forward), inspect.signature(_forward_two)
    assert forward_arguments(x, one)[0] is x
    assert forward_arguments((x, y), one)[0] is x and len(forward_arguments((x, y), one)) == 1
    assert len(forward_arguments([x, y, y], two)) == 2
    assert forward_arguments({"x": x, "mask": y, "labels": y}, one) == (x, y)
    assert forward_arguments({"labels": y}, one) is None
    assert forward_arguments((x,), two) is None


def test_loaders_are_seeded_alike_and_sharded_over_replicas_only() -> None:
    data = TensorDataset(torch.arange(20.0))
    orders = []
    for _ in range(2):
        loader = DataLoader(data, shuffle=True, batch_size=5)
        seed_shuffling(loader, 7)
        torch.rand(3)  # the global stream moves differently on each stage
        orders.append([b[0].tolist() for b in loader])
    assert orders[0] == orders[1]
    assert loader_length(loader) == 4 and loader_length(x for x in range(3)) is None
    sharded = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=1))
    check_sampler_shards_replicas(sharded, num_replicas=2, replica=1)
    with pytest.raises(ValueError, match="must read the same batches"):
        check_sampler_shards_replicas(sharded, num_replicas=1, replica=0)


def test_the_pipelined_forward_runs_once_per_training_step() -> None:
    model = mlp()
    built = build_stage(model, Topology(num_stages=1), 0)
    forward = PipelinedForward(built.stage, inspect.signature(model.forward))
    x, _ = batches(1)[0]
    with forward.training_step():
        out = forward(x)
    torch.testing.assert_close(out, model(x))
    with pytest.raises(RuntimeError, match="twice"), forward.training_step():
        forward(x)
        forward(x)
    with pytest.raises(RuntimeError, match="never called"), forward.training_step():
        pass
