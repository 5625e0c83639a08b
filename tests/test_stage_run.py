"""``StageRun``, what the strategy's hooks hand work to, driven as the hooks drive it, without a Trainer: the stages
of a pipeline in one thread over in-memory channels, checked against the single-process reference."""

from __future__ import annotations

import copy
import signal
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from lightning_ddg import DDGReference, Topology, split_module
from lightning_ddg.comm import PipelineStopped
from lightning_ddg.local import local_links
from lightning_ddg.stage_run import StageRun
from lightning_ddg.stopping import JobStop
from tests.models import batches, mlp, split_points_for

LOSS = nn.functional.cross_entropy


def _stage_runs(model: nn.Module, stages: int = 2) -> tuple[list[str], list[nn.Module], list[StageRun]]:
    """The split points, and each stage's copy of ``model`` (as its process would hold) with its run, the stages
    linked by in-memory channels."""
    points, topology = split_points_for(model, stages), Topology(num_stages=stages)
    modules = [copy.deepcopy(model) for _ in range(stages)]
    runs = [
        StageRun.start(modules[k], topology, topology.rank_of(k), partition=split_module(modules[k], points), links=own)
        for k, own in enumerate(local_links(stages))
    ]
    return points, modules, runs


def _train_step(runs: list[StageRun], modules: list[nn.Module], optimizers: list, x, y) -> list[torch.Tensor]:
    """One training batch through every stage, driven as the strategy's hooks drive it; the stages' losses."""
    losses = [
        run.training_step(nullcontext, lambda m=m: LOSS(m(x), y))  # m(x): this stage on batch t
        for run, m in zip(runs, modules, strict=True)
    ]
    for run, optimizer in reversed(list(zip(runs, optimizers, strict=True))):
        if run.backward(losses[-1]):
            run.update(optimizer.step)
    return losses


def test_stage_runs_train_as_the_reference_and_give_the_module_back() -> None:
    model, data = mlp(seed=3), batches(5)
    points, modules, runs = _stage_runs(model)
    optimizers = [torch.optim.SGD(run.stage.parameters, lr=0.1) for run in runs]
    for x, y in data:
        losses = _train_step(runs, modules, optimizers, x, y)
        assert losses[0].shape == () and losses[0].item() == 0  # no loss before the last stage
    for run, optimizer in reversed(list(zip(runs, optimizers, strict=True))):
        run.drain(optimizer.step)
    trained = {n: p for m in modules for n, p in m.named_parameters()}  # each copy holds its own stage's only

    reference = mlp(seed=3)
    stages = split_module(reference, points).train
    ref = DDGReference(stages, [torch.optim.SGD(s.parameters(), lr=0.1) for s in stages], LOSS)
    for x, y in data:
        ref.step(x, y)
    ref.finish()
    expected = dict(reference.named_parameters())
    assert set(trained) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-7)

    for run, module in zip(runs, modules, strict=True):
        run.close(clean=False)  # a clean close would put the module back together: a collective across processes
        assert "forward" not in module.__dict__ and run.stage is None and run.links is None


def test_a_scheduler_stepped_through_the_warm_up_raises_no_warning(recwarn: pytest.WarningsRecorder) -> None:
    """Step-interval schedulers advance during warm-up, before stage 0's first optimizer step, as the method
    prescribes (``docs/semantics.md``): torch's warning about stepping a scheduler first is not shown."""
    _, modules, runs = _stage_runs(mlp(seed=5))
    optimizers = [torch.optim.SGD(run.stage.parameters, lr=0.1) for run in runs]
    schedulers = [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1) for optimizer in optimizers]
    for x, y in batches(3):
        _train_step(runs, modules, optimizers, x, y)
        for scheduler in schedulers:  # as Lightning steps them, after every batch
            scheduler.step()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    for run in runs:
        run.close(clean=False)


def test_a_one_stage_run_finishes_whole_with_its_own_forward() -> None:
    model, (x, y) = mlp(seed=4), batches(1)[0]
    run = StageRun.start(model, Topology(num_stages=1), 0, partition=split_module(model, []))
    assert model.forward is run.forward and run.whole
    loss = run.training_step(nullcontext, lambda: LOSS(model(x), y))
    assert run.backward(loss)  # one stage: no delay, every batch completes a window
    run.update(lambda: None)
    assert not run.update_due and all(p.grad is not None for p in model.parameters())
    run.close()  # finishes a run that was not finished
    assert run.finished and "forward" not in model.__dict__
    torch.testing.assert_close(model(x), mlp(seed=4)(x))  # its own forward, on weights that were never stepped


def test_the_first_stage_decides_before_a_batch_whether_the_job_stops_and_whether_the_fit_ends() -> None:
    _, _, runs = _stage_runs(mlp(), stages=3)
    first, middle, last = runs
    stop = JobStop()
    assert first.before_batch(stop, None) == (0, False)  # nothing asked
    assert first.before_batch(stop, None, out_of_time=True) == (0, True)  # the fit's time limit
    # only the first stage decides, whose forward every other stage waits for
    assert middle.before_batch(stop, None, out_of_time=True) == (0, False)
    last.stage.end_requested = True
    assert last.before_batch(stop, None) == (0, False)
    first.stage.end_requested = True  # a later stage's request, arrived with the gradients
    assert first.before_batch(stop, None) == (0, True)
    stop.on_signal(signal.SIGUSR1, None)
    assert middle.before_batch(stop, None) == (0, False)
    assert first.before_batch(stop, None) == (signal.SIGUSR1, True)  # the pipeline ends here
    with pytest.raises(PipelineStopped) as stopped:
        middle.stage.forward()
    assert stopped.value.signum == signal.SIGUSR1
