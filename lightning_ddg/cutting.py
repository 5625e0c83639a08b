"""Where the strategy cuts a LightningModule: the plan made on one rank with what the Trainer knows, and shown.

The plan itself (:func:`lightning_ddg.plan`) is plain PyTorch. What the Trainer adds: the example batch
(:mod:`lightning_ddg.example_input`), the precision's forward context to measure in, and where the plan is shown:
the model summary's printout, the loggers' hyperparameters and a warning for an unbalanced cut.

Example, on every rank when a fit begins (a collective: rank 0 plans, the others receive its plan)::

    partition, chosen = cut_module(trainer, module, 2, None, balance=[3, 2], balance_by=None, rank=rank,
                                   device=device, broadcast=strategy.broadcast)

or, its parts on rank 0::

    points = given_split_points(module, split_points=None, balance=[3, 2], num_stages=2)
    chosen, _ = make_plan(trainer, module, 2, points, balance_by=None, device=device)
    show_plan(trainer, chosen)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from lightning_ddg.balance import BalanceBy
from lightning_ddg.checkpoint_io import load_mapped
from lightning_ddg.checks import check_balance_length
from lightning_ddg.example_input import example_forward_input, loading_ms, run_loader
from lightning_ddg.partition import Partition, balance_to_split_points, split_module
from lightning_ddg.planning import IMBALANCE_WARNING, Pieces, Plan, better_cut, check_split, plan
from lightning_ddg.shard import on_meta
from lightning_ddg.stage import MemoryMode

__all__ = [
    "cut_module",
    "given_split_points",
    "make_plan",
    "measured_split_points",
    "planned_by",
    "resumed_split_points",
    "show_plan",
]

log = logging.getLogger(__name__)


def cut_module(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    num_stages: int,
    split_points: Sequence[str] | None,
    balance: Sequence[int] | None,
    balance_by: BalanceBy | None,
    rank: int,
    device: torch.device,
    broadcast: Callable[[Any], Any],
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
    memory: MemoryMode = "stash",
    first_stage_loads: bool = True,
    resumed_from: str | os.PathLike | None = None,
    earlier: Plan | None = None,
) -> tuple[Partition, Plan | None]:
    """``module`` cut into ``num_stages`` stages, and the plan of the cuts (``None`` with one stage). Rank 0 plans
    (:func:`make_plan`: the cuts given, measured, or chosen) and shows the plan; ``broadcast`` gives every rank its
    plan, so that every stage cuts the model at the same places. A collective. ``first_stage_loads``: as for
    :func:`make_plan`. ``resumed_from``: the checkpoint a fit resumes from; where the cuts are left to a plan by
    time, they are those of :func:`resumed_split_points`, when it has any. ``earlier``: the plan of an earlier run
    of the module (a validation or test after its fit), taken again where the cuts are left to a plan and it
    still fits the module, so that the model is cut alike and not planned anew."""
    points = given_split_points(module, split_points, balance, num_stages)
    chosen = None
    if num_stages > 1:
        made = planned_with = None
        if rank == 0 and points is None and resumed_from is not None and planned_by(balance_by) == "time":
            points = resumed_split_points(resumed_from, num_stages)
        if rank == 0 and points is None and earlier is not None and _fits(earlier, module, num_stages):
            made = earlier
            rank_zero_info(f"DDG plan: the cut of the last run, at {', '.join(earlier.split_points)}")
        elif rank == 0:
            made, planned_with = make_plan(
                trainer,
                module,
                num_stages,
                points,
                balance_by,
                device,
                forward_context,
                memory,
                first_stage_loads,
                check=False,
            )
        chosen = broadcast(made)
        points = chosen.split_points
        log.info("plan: %d stages cut at %s (by %s)", num_stages, points, chosen.balance_by)
        if rank == 0 and made is not earlier:
            # checked once sent: the other ranks build their stages meanwhile (an export each, for a model torch.fx
            # cannot trace); a check that fails ends the job from here, as a failed plan would
            with forward_context():
                check_split(module, chosen, planned_with, _planned_on(module, device))
            show_plan(trainer, chosen)
    example = chosen.example_input if chosen is not None else None  # what torch.export opens with
    opened = chosen.opened_modules if chosen is not None and chosen.exported else None
    # the stages are traced in eval mode too, even for a fit without validation_step: a callback may call the
    # model outside training_step
    return split_module(module, points, num_stages, example, opened), chosen


def _fits(earlier: Plan, module: pl.LightningModule, num_stages: int) -> bool:
    """Whether ``earlier`` cut ``module`` as it is now: as many stages, the same split points and parameters. A
    plan that opened the module with torch.export is made anew: its graphs take the arguments of its example, and
    this run's first batch may give others (a prediction without labels)."""
    names = {name for name, _ in module.named_modules()}
    return (
        not earlier.exported
        and earlier.num_stages == num_stages
        and all(point in names for point in earlier.split_points)
        and sum(s.parameters for s in earlier.stages) == sum(p.numel() for p in module.parameters())
    )


def given_split_points(
    module: pl.LightningModule, split_points: Sequence[str] | None, balance: Sequence[int] | None, num_stages: int
) -> list[str] | None:
    """The cuts the user gave, as module names (``balance`` counts layers of a sequential); ``None``: none given."""
    if balance is not None:
        check_balance_length(list(balance), num_stages)
        return balance_to_split_points(module, list(balance))
    return list(split_points) if split_points is not None else None


def measured_split_points(
    checkpoint_path: str | os.PathLike | None, num_stages: int | None = None, least_gain: float = 0.05
) -> list[str] | None:
    """Where to cut a fit resumed from ``checkpoint_path`` so that the stage times measured before it was saved
    balance, for ``DDGStrategy(split_points=...)``: the plan's candidate cuts, each stage's pieces scaled by what
    it measured (:func:`lightning_ddg.planning.rebalanced`). ``None`` (the strategy then plans as usual) without a
    checkpoint, for one saved before 20 steps or without ``strategy="ddg"``, for another number of stages than
    ``num_stages``, and where the new cut would make the slowest stage less than ``least_gain`` (a fraction of the
    mean) faster. A resumed fit may be cut anywhere: every stage reads its own tensors from the checkpoint. A fit
    whose cuts the strategy plans by time does this itself when it resumes (:func:`resumed_split_points`).

    Example::

        last = "checkpoints/last.ckpt" if os.path.exists("checkpoints/last.ckpt") else None
        strategy = DDGStrategy(split_points=measured_split_points(last, num_stages=4))
        L.Trainer(strategy=strategy, devices=4).fit(model, ckpt_path=last)
    """
    measured = _measured_cut(checkpoint_path, num_stages, least_gain)
    if measured is None or measured[1] is None:
        return None
    figures, (points, _) = measured
    log.info(
        "cut at %s: balances the stage times %s ms measured before %s", points, figures["stage_ms"], checkpoint_path
    )
    return points


def resumed_split_points(checkpoint_path: str | os.PathLike, num_stages: int) -> list[str] | None:
    """The cuts of a fit resumed from ``checkpoint_path`` that the strategy plans by time: where the stage times
    measured before it was saved balance (:func:`measured_split_points`), or, when no other cut is enough faster,
    the cuts they were measured on; ``None`` (a new plan) where the checkpoint kept no such times for
    ``num_stages`` stages. Measured over the fit's steps, those times see what timing each piece once misses."""
    measured = _measured_cut(checkpoint_path, num_stages)
    if measured is None:
        return None
    figures, found = measured
    measured_on, times = list(figures["split_points"]), ", ".join(f"{ms:.1f}" for ms in figures["stage_ms"])
    if found is None:
        rank_zero_info(
            f"DDG: resuming from {checkpoint_path}: cut at {measured_on} again, where the stage times measured before "
            f"it was saved ({times} ms per step) are as balanced as any cut would make them"
        )
        return measured_on
    rank_zero_info(
        f"DDG: resuming from {checkpoint_path}: cut at {found[0]}, where the stage times measured before it was saved "
        f"({times} ms per step, cut at {measured_on}) balance (the slowest stage about {found[1]:.2f}x the mean)"
    )
    return found[0]


def _measured_cut(
    checkpoint_path: str | os.PathLike | None, num_stages: int | None, least_gain: float = 0.05
) -> tuple[dict[str, Any], tuple[list[str], float] | None] | None:
    """The stage times a checkpoint kept (``LogStageFigures``' state: the times, the cuts and the plan's pieces they
    were measured on) and the better cut they give (:func:`~lightning_ddg.planning.better_cut`, ``None``: none);
    ``None`` for a checkpoint without them, or with times of another number of stages than ``num_stages``."""
    if checkpoint_path is None or not os.path.isfile(checkpoint_path):
        return None
    figures = load_mapped(checkpoint_path).get("callbacks", {}).get("LogStageFigures", {})
    times = figures.get("stage_ms")
    if not times or (num_stages is not None and len(times) != num_stages):
        return None
    return figures, better_cut(Pieces(**figures["pieces"]), figures["split_points"], times, least_gain)


def planned_by(balance_by: BalanceBy | None) -> BalanceBy:
    """What a plan balances when ``balance_by`` is not given: time, and FLOPs under ``Trainer(deterministic=True)``,
    whose runs must cut alike."""
    return balance_by or ("flops" if torch.are_deterministic_algorithms_enabled() else "time")


def make_plan(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    num_stages: int,
    split_points: list[str] | None,
    balance_by: BalanceBy | None,
    device: torch.device,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
    memory: MemoryMode = "stash",
    first_stage_loads: bool = True,
    check: bool = True,
) -> tuple[Plan, Any]:
    """The plan of the cuts (``split_points`` described, or chosen), measured with the Trainer's example batch, and
    that batch's forward input. By default by time, and by FLOPs under ``Trainer(deterministic=True)``, whose runs
    must cut alike; a model built on the meta device is measured there. ``memory``: the strategy's memory mode,
    which what a stage holds depends on. With ``first_stage_loads`` (the strategy's ``load_once``), a cut chosen by
    time counts the loader's time per batch in the first stage's cost. Without ``check``, the split is not yet run
    on the example (:func:`lightning_ddg.planning.check_split`)."""
    balance_by = planned_by(balance_by)
    where = _planned_on(module, device)
    loads = first_stage_loads and balance_by == "time" and where.type != "meta" and split_points is None
    # the user's *_dataloader hook runs once for both the example batch and the loading time
    loader = _loader_or_none(trainer) if loads or module.example_input_array is None else None
    example = example_forward_input(trainer, module, loader)
    with forward_context():
        planned = plan(
            module,
            example,
            None if split_points is not None else num_stages,
            split_points=split_points,
            balance_by=balance_by,
            device=where,
            memory=memory,
            loading_ms=loading_ms(loader) if loads else 0.0,
            check=check,
        )
    return planned, example


def _planned_on(module: pl.LightningModule, device: torch.device) -> torch.device:
    return torch.device("meta") if on_meta(module) else device


def show_plan(trainer: pl.Trainer, plan: Plan) -> None:
    """Print the plan as a table (with the Trainer's model summary), log it to the loggers' hyperparameters, and
    warn of a plan that could not measure the stages' costs, and of a stage that costs more than
    ``IMBALANCE_WARNING`` times the mean. On one rank."""
    if any(isinstance(c, ModelSummary) for c in trainer.callbacks):
        last = plan.num_stages - 1
        rank_zero_info(f"DDG plan: {plan.num_stages} stages, stage k on rank {last} - k of each pipeline\n{plan}")
    for logger in trainer.loggers:
        logger.log_hyperparams(plan.to_dict())
    if plan.balance_by == "params" and plan.note is not None:  # asked for another measure, which could not be had
        rank_zero_warn(
            f"the DDG plan could not measure what each stage costs and balances parameter counts ({plan.note}), "
            "which can leave one stage much slower than the others. Set the module's example_input_array to what "
            "forward takes, or give split_points=[...].",
            category=PossibleUserWarning,
        )
    if plan.imbalance > IMBALANCE_WARNING and plan.balance_by != "memory":  # memory: the stages' speeds differ
        slowest = max(plan.stages, key=lambda s: s.cost)
        rank_zero_warn(
            f"stage {slowest.index} of the DDG pipeline costs {plan.imbalance:.2f}x the mean stage "
            f"({plan.balance_by}); the pipeline runs at the speed of its slowest stage. Move its split points "
            "(split_points=[...]) or leave the cuts to the strategy (balance_by='time').",
            category=PossibleUserWarning,
        )


def _loader_or_none(trainer: pl.Trainer) -> Any:
    try:
        return run_loader(trainer)
    except Exception:  # noqa: BLE001 - the example batch has warned of a loader that fails
        return None
