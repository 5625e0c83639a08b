"""Cutting a fit's stages anew, once, in the middle of training, where the stage times the pipeline measured balance.

The plan cuts the model from its pieces timed alone, before training; the pipeline then measures what each stage
takes per step with everything around it (the optimizer step, Lightning's loop, the other processes on the
machine). With ``DDGStrategy(rebalance_after_steps=N)``, before training batch ``N`` of the fit the last stage
compares those times (:func:`~lightning_ddg.planning.better_cut`); when another cut makes the slowest stage at
least 5% of the mean faster, every stage

1. drains the pipeline: every batch in flight updates every stage, as at the end of training;
2. puts the model back together and cuts it at the new split points, over the same channels, so that the modules
   that change stage take their weights with them (:meth:`StageRun.recut <lightning_ddg.stage_run.StageRun.recut>`);
3. builds its optimizers anew with ``configure_optimizers``, for its new parameters, and gives them their part of
   the whole model's optimizer state, and the schedulers theirs, as a fit resumed on another cut would;
4. trains on from batch ``N`` with an empty pipeline, which warms up again.

In terms of the method it is a drain followed by a resume on the new cut: the weights equal those of
:class:`~lightning_ddg.reference.DDGReference` run to batch ``N`` on the first cut, finished, and continued on the
second. It costs one broadcast when the cut stays, and a drain, a gather of the whole model and a trace of the new
cut when it moves: once per fit, never per step.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_ddg._compat import optimizers_to_device, unwrapped_optimizer
from lightning_ddg.callbacks import LogStageFigures
from lightning_ddg.checks import check_rebalancing_setup
from lightning_ddg.partition import Partition, split_module
from lightning_ddg.planning import Plan, better_cut, replanned
from lightning_ddg.state import parameter_names
from lightning_ddg.stats import measured_imbalance

if TYPE_CHECKING:
    from lightning_ddg.stage_run import StageRun
    from lightning_ddg.strategy import DDGStrategy

__all__ = ["recut_batch", "recut_where_measured"]

log = logging.getLogger(__name__)


def recut_batch(after_steps: int | None, num_stages: int, trainer: pl.Trainer, on_meta: bool) -> int | None:
    """The training batch of this fit before which :func:`recut_where_measured` runs: ``after_steps`` rounded up to
    whole accumulation windows, so that the drain closes no window early; ``None`` when there is none. Raises at
    setup where the fit rules it out (:func:`~lightning_ddg.checks.check_rebalancing_setup`)."""
    if after_steps is None or num_stages == 1 or trainer.state.fn != TrainerFn.FITTING:
        return None
    try:
        check_rebalancing_setup(torch.are_deterministic_algorithms_enabled(), on_meta)
    except ValueError as err:
        raise MisconfigurationException(str(err)) from None
    windows = -(-after_steps // trainer.accumulate_grad_batches)
    return windows * trainer.accumulate_grad_batches


def recut_where_measured(
    strategy: DDGStrategy, trainer: pl.Trainer, batch: int, stage_options: dict[str, Any]
) -> StageRun:
    """Before training batch ``batch``, on every rank: cut the stages anew where the times measured so far balance,
    or keep the cut (see the module's docstring). A collective. ``stage_options``: the stage's build options, as
    :meth:`StageRun.start <lightning_ddg.stage_run.StageRun.start>` takes them. Returns the strategy's run from
    then on."""
    plan, old, run, module = strategy.plan, strategy.partition, strategy._run, strategy.lightning_module
    assert plan is not None and old is not None and run is not None and module is not None
    decided = strategy.broadcast(_better_cut(strategy, plan, batch) if strategy.global_rank == 0 else None)
    if decided is None:
        return run
    points, measured_ms = decided
    optimizers = strategy.optimizers
    run.drain(partial(strategy._step, optimizers[0]) if optimizers else None)
    # the whole model's optimizer state, on every rank, named as in the module: each new stage takes its part
    gathered = partial(strategy.states.optimizer_state, names=parameter_names(module), placeholders=False)
    optimizer_states = [gathered(unwrapped_optimizer(optimizer)) for optimizer in optimizers]
    scheduler_states = [config.scheduler.state_dict() for config in strategy.lr_scheduler_configs]
    every_rank_schedules = strategy.states.all_gather_objects(scheduler_states)  # for a stage that stepped nothing
    made: list[tuple[Partition, list[int]]] = []

    def cut(whole: nn.Module) -> Partition:
        example, opened = plan.example_input, plan.opened_modules if plan.exported else None
        partition = split_module(whole, points, old.num_stages, example, opened)
        if not _can_run(partition, old):
            partition = split_module(whole, old.split_points, old.num_stages, example, opened)
        # counted while every stage's parameters are in the module: the stage built next keeps only its own
        made.append((partition, [sum(p.numel() for p in stage.parameters()) for stage in partition.train]))
        return partition

    strategy._run = new_run = run.recut(cut, **stage_options)
    ((partition, parameters),) = made
    strategy.partition = partition
    strategy.setup_optimizers(trainer)  # configure_optimizers, on the new stage's parameters
    for optimizer, state in zip(strategy.optimizers, optimizer_states, strict=True):
        strategy.states.load_optimizer_state(unwrapped_optimizer(optimizer), state, module)
    fresh = [config.scheduler.state_dict() for config in strategy.lr_scheduler_configs]
    resumed = _resumed_schedules(scheduler_states, every_rank_schedules, fresh)
    for config, state in zip(strategy.lr_scheduler_configs, resumed, strict=True):
        config.scheduler.load_state_dict(state)
    optimizers_to_device(strategy.optimizers, strategy.root_device)
    for callback in trainer.callbacks:
        if isinstance(callback, LogStageFigures):
            callback.restart()  # the new stages count their figures from zero
    if partition.split_points == old.split_points:
        rank_zero_info(f"DDG: the cut at {points} cannot run (a stage without parameters, or a weight shared by "
                       f"other stages): the stages stay cut at {old.split_points}")  # fmt: skip
        return new_run
    strategy.plan = replanned(plan, points, measured_ms, parameters)
    if strategy.global_rank == 0 and any(isinstance(c, ModelSummary) for c in trainer.callbacks):
        rank_zero_info(f"DDG plan from batch {batch}:\n{strategy.plan}")
    log.info("recut: stage %d of the cut at %s from batch %d", strategy.stage_index, points, batch)
    return new_run


def _resumed_schedules(own: list[dict], every_rank: list[list[dict]], fresh: list[dict]) -> list[dict]:
    """The states the learning-rate schedulers of a stage cut anew (``fresh``, as configured) resume from: the
    stage's own; for a stage whose optimizer stepped nothing until now (it held only parameters that optimizer was
    not given), those of a stage that did, which every stage steps alike; none for one that steps nothing now."""
    if len(fresh) == len(own) or not fresh:
        return own[: len(fresh)]
    return next((states for states in every_rank if len(states) == len(fresh)), fresh)


def _better_cut(strategy: DDGStrategy, plan: Plan, batch: int) -> tuple[list[str], list[float]] | None:
    """On the last stage of the first pipeline, which has every stage's figures: the better cut and the times it was
    found on, or ``None`` to keep the cut; either is said on the console."""
    stage = strategy.stage
    measured = measured_imbalance(stage.snapshots()) if stage is not None else None
    if measured is None or plan.pieces is None:
        rank_zero_info(f"DDG: before batch {batch}, the stages have not all been measured yet: the cut stays")
        return None
    imbalance, measured_ms = measured
    found = better_cut(plan.pieces, plan.split_points, measured_ms)
    times = ", ".join(f"{ms:.1f}" for ms in measured_ms)
    said = f"DDG: before batch {batch}, the stages took {times} ms per step (the slowest {imbalance:.2f}x the mean)"
    if found is None:
        rank_zero_info(f"{said}; no other cut is 5% of the mean faster: the cut stays at {plan.split_points}")
        return None
    rank_zero_info(
        f"{said}: cutting at {found[0]} instead of {plan.split_points}, where they balance (about {found[1]:.2f}x "
        "the mean); the pipeline drains first, then warms up again"
    )
    return found[0], measured_ms


def _can_run(partition: Partition, old: Partition) -> bool:
    """A new cut the stages can switch to in place: every stage has parameters (an optimizer needs some), and the
    weights shared across stages are shared by the same stages, whose channels exist."""
    tied = [w.stages for w in partition.tied] == [w.stages for w in old.tied]
    return tied and all(any(True for _ in stage.parameters()) for stage in partition.train)
