"""Data-parallel replicas of stages in real gloo processes: the bucketed average, and S=2 stages × R=2 replicas
of the stage runtime against the reference run on the union of the replicas' batches."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_ddg import DDGReference, Topology, build_stage, split_module
from lightning_ddg.replicas import ReplicaAverager
from tests.models import TiedLM, batches, lm_loss, make_optimizer, mlp, split_points_for, token_batches
from tests.multiprocess import run_processes

LOSS = nn.functional.cross_entropy
STAGES, REPLICAS = 2, 2


def _average(rank: int, world_size: int) -> dict:
    torch.manual_seed(rank)
    params = [torch.zeros(shape, dtype=torch.float64, requires_grad=True) for shape in [(2,), (40, 30), (30,), (50,)]]
    averager = ReplicaAverager(params, dist.group.WORLD, bucket_mb=60 * 8 / 2**20)  # 60 elements per bucket
    grads = [torch.randn(p.shape, dtype=p.dtype) for p in params]
    grads[0] = None  # a parameter without a gradient in this window
    # a watched backward produces the gradients of parameters 1, 2 and 3, on top of partial sums for 1 and 3
    partial = [None, torch.ones_like(params[1]), None, torch.ones_like(params[3])]
    leaves = [p.detach().clone().requires_grad_() for p in params]
    with averager.watch(leaves, partial):
        loss = sum((leaf * g).sum() for leaf, g in zip(leaves, grads, strict=True) if g is not None)
        torch.autograd.grad(loss, leaves[1:])
    started_early = averager._next  # buckets whose all-reduce the backward started
    summed = [None] + [g + p if p is not None else g for g, p in zip(grads[1:], partial[1:], strict=True)]
    watched = [g.clone() if g is not None else None for g in averager.average(summed)]  # views, reused next
    again = averager.average(grads)  # an unwatched window
    return {
        "buckets": averager.num_buckets,
        "started_early": started_early,
        "summed": summed,
        "watched": watched,
        "grads": grads,
        "again": again,
    }


def test_bucketed_average_equals_the_mean_of_the_replicas_gradients() -> None:
    results = run_processes(_average, 2, timeout=60)
    # in reverse order, at most 60 elements a bucket, a larger parameter alone: [50], [30], [1200], [2]
    assert results[0]["buckets"] == 4
    assert results[0]["started_early"] == 3  # all but the bucket of the parameter without a gradient
    for key, inputs in (("watched", "summed"), ("again", "grads")):
        assert results[0][key][0] is None and results[1][key][0] is None
        for i in range(1, 4):
            mean = (results[0][inputs][i] + results[1][inputs][i]) / 2
            for result in results:
                torch.testing.assert_close(result[key][i], mean, rtol=1e-12, atol=0)


def _replica_batches(num_batches: int, replica: int, tied: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Replica ``r``'s half of every batch of the stream; the reference reads the whole batches."""
    return [(x.chunk(REPLICAS)[replica], y.chunk(REPLICAS)[replica]) for x, y in _union_batches(num_batches, tied)]


def _union_batches(num_batches: int, tied: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if tied:  # token sequences for a model whose embedding and head share a weight
        return token_batches(num_batches, batch_size=8, last=6)
    return batches(num_batches, batch_size=12, last=8)


def _model(options: dict, replica: int) -> nn.Module:
    if options.get("tied"):
        model = TiedLM()
        if replica:  # replicas start apart: the stage gives them replica 0's weights
            torch.nn.init.normal_(model.embed.weight)
        return model
    return mlp(seed=replica)


def _train_replica(rank: int, world_size: int, options: dict) -> dict[str, torch.Tensor]:
    topology = Topology(num_stages=STAGES, num_replicas=REPLICAS)
    replica = topology.replica_of(rank)
    model = _model(options, replica)  # replicas start apart: the stage gives them replica 0's weights
    accumulate = options["accumulate"]
    built = build_stage(
        model,
        topology,
        rank,
        split_points=split_points_for(model, STAGES),
        memory=options["memory"],
        accumulate_grad_batches=accumulate,
    )
    stage, links = built.stage, built.links
    loss_fn = lm_loss if options.get("tied") else LOSS
    optimizer = make_optimizer(options["optimizer"], stage.parameters)

    def step() -> None:
        stage.install_gradients()
        optimizer.step()

    for x, y in _replica_batches(options["batches"], replica, options.get("tied", False)):
        out = stage.forward(x)
        if stage.backward(loss_fn(out, y) / accumulate if stage.is_last else None):
            step()
    for ready in stage.drain():
        if ready:
            step()
    links.close()
    return {name: p.detach().clone() for name, p in stage.module.named_parameters()}


def _reference(options: dict) -> dict[str, torch.Tensor]:
    model = _model(options, replica=0)
    stages = split_module(model, split_points_for(model, STAGES)).train
    optimizers = [make_optimizer(options["optimizer"], s.parameters()) for s in stages]
    loss_fn = lm_loss if options.get("tied") else LOSS
    ref = DDGReference(stages, optimizers, loss_fn, accumulate_grad_batches=options["accumulate"])
    for x, y in _union_batches(options["batches"], options.get("tied", False)):
        ref.step(x, y)
    ref.finish()
    return dict(model.state_dict())


@pytest.mark.parametrize(
    ("memory", "optimizer", "accumulate", "tied"),
    [("stash", "sgd", 2, False), ("recompute", "adam", 1, False), ("stash", "adam", 2, True)],
)
def test_replicated_stages_match_the_reference_on_the_union_batch(
    memory: str, optimizer: str, accumulate: int, tied: bool
) -> None:
    # 7 batches with windows of 2: the drain closes a partial window, averaged like the others; with a weight tied
    # between the two stages, its four copies (two stages, two replicas) stay bitwise equal
    options = {"memory": memory, "optimizer": optimizer, "accumulate": accumulate, "batches": 7, "tied": tied}
    results = run_processes(_train_replica, STAGES * REPLICAS, options, timeout=120)
    topology = Topology(STAGES, REPLICAS)
    expected = _reference(options)
    for rank, result in enumerate(results):
        twin = results[topology.rank_of(topology.stage_of(rank), replica=0)]
        for name, value in result.items():
            torch.testing.assert_close(value, twin[name], rtol=0, atol=0, msg=f"replicas differ on {name}")
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7, msg=f"{name} differs")
    assert set().union(*results) == set(expected)
    if tied:
        assert torch.equal(results[topology.rank_of(0)]["embed.weight"], results[topology.rank_of(1)]["head.weight"])
