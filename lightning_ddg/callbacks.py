"""The callbacks :class:`~lightning_ddg.strategy.DDGStrategy` adds to every Trainer it runs in.

- :class:`ShareLastStageMetrics` copies what the last stage logged to every stage, so that monitoring callbacks
  (``EarlyStopping``, ``ModelCheckpoint(monitor=...)``) decide alike everywhere, and ``trainer.validate`` and
  ``trainer.test`` return the same results on every rank.
- :class:`StopTogether` makes a stage that left training alone raise, rather than wait for the others forever.
- :func:`check_callbacks` refuses the trainer's callbacks that cannot work with a pipeline.
- :class:`LogStageFigures` logs each stage's throughput, time and memory figures as ``ddg/stage{k}/...``, and
  at the end of training how evenly the stages were loaded (``ddg/measured_imbalance``), with a warning that names
  a stage slower than the plan allows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import callbacks
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    BatchSizeFinder,
    Callback,
    GradientAccumulationScheduler,
    LearningRateFinder,
    ModelPruning,
)
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from typing_extensions import override

from lightning_ddg._compat import evaluation_results, log_figures, saves_on_metric_now, should_update_logs
from lightning_ddg.checks import (
    NO_ACCUMULATION_SCHEDULE,
    NO_BATCH_SIZE_FINDER,
    NO_FINETUNING,
    NO_PRUNING,
    NO_SPAWNED_LR_FINDER,
    NO_WEIGHT_AVERAGING,
)
from lightning_ddg.planning import IMBALANCE_WARNING, Plan, better_cut
from lightning_ddg.schedule import delay
from lightning_ddg.stage import DDGStage
from lightning_ddg.stats import MEASURED_STEPS, Snapshot, StageCounters, interval_figures, measured_imbalance

__all__ = ["LogStageFigures", "ShareLastStageMetrics", "StopTogether", "add_stage_callbacks", "check_callbacks"]

# callbacks that average a whole copy of the model with the module (WeightAveraging: Lightning 2.5 on)
_WEIGHT_AVERAGING = tuple(
    kind for kind in (callbacks.StochasticWeightAveraging, getattr(callbacks, "WeightAveraging", None)) if kind
)


class ShareLastStageMetrics(Callback):
    """Copies the metrics logged on the last stage (global rank 0) to every rank, so that callbacks monitoring
    them — ``EarlyStopping``, ``ModelCheckpoint(monitor=...)``, a ``ReduceLROnPlateau`` — decide the same way on
    every stage, and ``trainer.validate`` and ``trainer.test`` return the same results on every rank, as under
    ``strategy="ddp"``. They are copied after each validation and at each epoch's end, and after a training batch
    at which a ``ModelCheckpoint`` with a ``monitor`` may save (``every_n_train_steps``).

    Example::

        trainer = L.Trainer(strategy="ddg", devices=2, callbacks=[EarlyStopping("val_loss")])  # added for you
    """

    def __init__(self) -> None:
        self._results: list[dict[str, Any]] | None = None  # what the running validation or test will return

    def _share(self, trainer: pl.Trainer) -> None:
        results, self._results = self._results, None
        if trainer.world_size == 1:
            return
        metrics = trainer.callback_metrics
        local = {k: v.detach().cpu() for k, v in metrics.items() if isinstance(v, Tensor)}
        on_host = [{k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in r.items()} for r in results or []]
        shared, shared_results = trainer.strategy.broadcast((local, on_host if results is not None else None), src=0)
        if trainer.global_rank == 0:
            return
        metrics.update({k: v.to(trainer.strategy.root_device) for k, v in shared.items()})
        if results is not None and shared_results is not None:  # the list the loop returns, changed in place
            results[:] = shared_results

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._results = evaluation_results(trainer)  # complete by the end hook: the module's epoch-end logs added

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._results = evaluation_results(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._share(trainer)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._share(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._share(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # a ModelCheckpoint that may save now on a metric training_step logs (every_n_train_steps): every stage must
        # decide on the last stage's value, for the save is a collective; once per such step, not per step
        if any(saves_on_metric_now(checkpoint, trainer) for checkpoint in trainer.checkpoint_callbacks):
            self._share(trainer)


class StopTogether(Callback):
    """At every validation and epoch's end of a fit, before the callbacks that synchronise there: checks that every
    stage left training after the same batch (:meth:`DDGStrategy.check_stopped_together
    <lightning_ddg.strategy.DDGStrategy.check_stopped_together>`), so that a stage that stopped alone raises, rather
    than wait for the others forever."""

    @staticmethod
    def _check(trainer: pl.Trainer) -> None:
        check = getattr(trainer.strategy, "check_stopped_together", None)
        if check is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            check()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)


class LogStageFigures(Callback):
    """Logs every stage's figures as ``ddg/stage{k}/...`` whenever Lightning logs (every ``log_every_n_steps``),
    :data:`~lightning_ddg.stats.MEASURED_STEPS` batches apart at least, and at the end of each training epoch:
    samples/s; compute, waiting, sending and other time per step (ms); stashed weights and activations (MiB); the
    delay. They are averages since the previous logging.

    The figures reach the last stage in the headers of the activations it receives, so logging them costs no
    message and no synchronisation; they go straight to the loggers and ``trainer.callback_metrics``
    (:func:`~lightning_ddg._compat.log_figures`), not through ``self.log``, which would add them to every step.
    Evaluation and checkpoint saving are left out.

    When training ends, it logs ``ddg/measured_imbalance``: the slowest stage's time per step over the mean (waits
    left out, see :func:`~lightning_ddg.stats.measured_imbalance`), what the pipeline made of the plan's estimate
    (``ddg/imbalance``). Above the plan's own warning threshold, a warning names the slowest stage: the plan's
    measurements, each piece of the model timed alone, missed what the pipeline sees.

    Example::

        trainer = L.Trainer(strategy="ddg", devices=4, logger=CSVLogger("logs"))  # ddg/stage0/samples_per_s, ...
    """

    def __init__(self) -> None:
        self._evaluation_start: float | None = None
        self._logged: list[Snapshot] = []
        self._batches_unlogged = 0
        self._trainer: pl.Trainer | None = None  # for state_dict, which Lightning calls without it

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None

    @override
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this fit's figures: each stage's time per step so far (waits left out), the
        split points they were measured with and the plan's pieces, from which
        :func:`~lightning_ddg.cutting.measured_split_points` cuts a resumed fit where those times balance. Plain
        values; nothing before :data:`~lightning_ddg.stats.MEASURED_STEPS` steps, nor on the ranks that do not
        write the checkpoint."""
        trainer = self._trainer
        measured = self._measured(trainer) if trainer is not None else None
        plan = getattr(trainer.strategy, "plan", None) if trainer is not None else None
        if measured is None or plan is None or plan.pieces is None:
            return {}
        pieces = dataclasses.asdict(plan.pieces)
        return {"stage_ms": measured[1], "split_points": list(plan.split_points), "pieces": pieces}

    def _measured(self, trainer: pl.Trainer) -> tuple[float, list[float]] | None:
        stage = self._stage(trainer)
        if stage is None or not stage.is_last or not trainer.is_global_zero:
            return None
        return measured_imbalance(stage.snapshots())

    @staticmethod
    def _stage(trainer: pl.Trainer) -> DDGStage | None:
        stage = getattr(trainer.strategy, "stage", None)
        return stage if isinstance(stage, DDGStage) else None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (stage := self._stage(trainer)) is not None:
            stage.counters = StageCounters()  # training time starts now, not at setup
        self._logged = []
        self._trainer = trainer  # added by the strategy's setup, after Lightning called the callbacks' setup

    def restart(self) -> None:
        """The stages were built anew in the middle of the fit (:mod:`lightning_ddg.rebalancing`): their figures
        count from zero."""
        self._logged = []

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage(trainer)
        if self._evaluation_start is not None and stage is not None:
            stage.counters.pause(time.perf_counter() - self._evaluation_start)
        self._evaluation_start = None

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # when Lightning logs, but MEASURED_STEPS batches apart at least: figures over fewer steps are mostly noise,
        # and each logging calls every logger on the last stage, which sets the pipeline's pace
        self._batches_unlogged += 1
        if self._batches_unlogged >= MEASURED_STEPS and should_update_logs(trainer):  # the cheap test first
            self._log(trainer, epoch_end=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, epoch_end=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        measured = self._measured(trainer)
        if measured is None:
            return
        imbalance, per_step_ms = measured
        for logger in trainer.loggers:
            logger.log_metrics({"ddg/measured_imbalance": imbalance}, step=trainer.global_step)
        plan = getattr(trainer.strategy, "plan", None)
        if imbalance > IMBALANCE_WARNING and (plan is None or plan.balance_by != "memory"):  # memory: by design
            rank_zero_warn(_slow_stage_advice(imbalance, per_step_ms, plan), category=PossibleUserWarning)

    def _log(self, trainer: pl.Trainer, epoch_end: bool) -> None:
        self._batches_unlogged = 0
        stage = self._stage(trainer)
        if stage is None or not stage.is_last or not trainer.is_global_zero:
            return
        snapshots = stage.snapshots()
        figures = {}
        for k, snapshot in enumerate(snapshots):
            before = self._logged[k] if k < len(self._logged) else None
            interval = interval_figures(before, snapshot, delay=delay(k, stage.num_stages))
            figures |= {f"ddg/stage{k}/{name}": value for name, value in (interval or {}).items()}
        self._logged = snapshots
        if figures:
            log_figures(trainer, figures, epoch_end)


def _slow_stage_advice(imbalance: float, per_step_ms: list[float], plan: Plan | None) -> str:
    slowest = per_step_ms.index(max(per_step_ms))
    expected = f", where the plan expected {plan.imbalance:.2f}x ({plan.balance_by})" if plan is not None else ""
    times = ", ".join(f"{ms:.1f}" for ms in per_step_ms)
    advice = f"give stage {slowest} less of the model (split_points=[...]; the plan's table lists each stage's modules)"
    better = better_cut(plan.pieces, plan.split_points, per_step_ms) if plan and plan.pieces else None
    if better is not None:
        advice = f"DDGStrategy(split_points={better[0]}) balances the times measured here (about {better[1]:.2f}x)"
    return (
        f"in this fit, stage {slowest} of the DDG pipeline took {imbalance:.2f}x the mean stage's time per step "
        f"(waits left out; stages 0..{len(per_step_ms) - 1}: {times} ms){expected}. The pipeline runs at the speed "
        f"of its slowest stage: {advice}; its ddg/stage{slowest}/... figures show where its time goes ('Reading "
        "the per-stage figures' in docs/performance.md)."
    )


def check_callbacks(trainer: pl.Trainer, spawned: bool) -> None:
    """Refuse, at setup and with advice, the trainer's callbacks that cannot work with a pipeline: Lightning's batch
    size finder, its learning-rate finder in ``spawned`` processes, weight averaging, fine-tuning schedules
    (``BaseFinetuning``), accumulation schedules and pruning."""
    for callback in trainer.callbacks:
        if isinstance(callback, BatchSizeFinder):
            raise MisconfigurationException(NO_BATCH_SIZE_FINDER)
        if spawned and isinstance(callback, LearningRateFinder):
            raise MisconfigurationException(NO_SPAWNED_LR_FINDER)
        if isinstance(callback, _WEIGHT_AVERAGING):
            raise MisconfigurationException(NO_WEIGHT_AVERAGING.format(name=type(callback).__name__))
        if isinstance(callback, BaseFinetuning):
            raise MisconfigurationException(NO_FINETUNING.format(name=type(callback).__name__))
        if isinstance(callback, GradientAccumulationScheduler):
            raise MisconfigurationException(NO_ACCUMULATION_SCHEDULE)
        if isinstance(callback, ModelPruning):
            raise MisconfigurationException(NO_PRUNING)


def add_stage_callbacks(trainer: pl.Trainer) -> None:
    """Give ``trainer`` the strategy's callbacks, unless it has them: first, ahead of the monitoring callbacks."""
    for callback in (LogStageFigures, ShareLastStageMetrics, StopTogether):
        if not any(isinstance(c, callback) for c in trainer.callbacks):
            trainer.callbacks.insert(0, callback())
