"""What happens between two training batches of a fit, decided on the first stage with no collective across stages.

Lightning broadcasts rank 0's SIGTERM flag before every training batch, a collective that would make every stage
wait for the last one. :class:`BetweenBatches` runs in its place and takes three decisions there:

- the job **stops** for a signal any process received (:class:`~lightning_ddg.stopping.JobStop`): the first stage
  ends the pipeline, and every stage raises ``SIGTERMException`` after the same step;
- the fit **ends** after the next batch (:class:`~lightning_ddg.ending.FitEnd`: ``max_time``, or
  ``trainer.should_stop`` set on the last stage after ``self(x)``);
- once, the stages are **cut anew** where the times they measured balance (:mod:`lightning_ddg.rebalancing`).

The signal handlers Lightning registers (SIGTERM, SLURM's requeue signal) become :meth:`BetweenBatches.on_signal`,
which only takes note. The stage work itself is :class:`~lightning_ddg.stage_run.StageRun`'s.

Example, in a strategy's hooks::

    between.start(trainer, job, in_band=True, recut_at=None, report=rank == 0, before_batch=...)  # setup
    between.before_batch(run, recut)                         # where Lightning broadcast its SIGTERM flag
    output = between.training_step(run, trainer, step)       # the last stage's training step
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_ddg._compat import (
    replace_per_step_sigterm_broadcast,
    replace_signal_handlers,
    restore_signal_handlers,
    take_over_step_timer,
)
from lightning_ddg.ending import FitEnd
from lightning_ddg.stopping import JobStop

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_ddg.job import JobMember
    from lightning_ddg.stage_run import StageRun

__all__ = ["BetweenBatches"]


class BetweenBatches:
    """One process's part in what happens between the training batches of a fit; :meth:`start` at every setup of a
    run with more than one process."""

    def __init__(self) -> None:
        self.stop = JobStop()
        self.fit_end = FitEnd()
        self.recut_at: int | None = None  # the training batch of this fit before which the stages may be cut anew
        self.batches_begun = 0  # training batches of this fit begun
        self._trainer: pl.Trainer | None = None
        self._job: JobMember | None = None
        self._report = False

    def start(
        self,
        trainer: pl.Trainer,
        job: JobMember,
        *,
        in_band: bool,
        recut_at: int | None,
        report: bool,
        before_batch: Callable[[], None],
    ) -> None:
        """Take Lightning's per-batch broadcast (``before_batch`` runs there) and its signal handlers over.
        ``in_band``: the batches carry the first stage's decision that the fit ends (``load_once``, more than one
        stage; otherwise a ``max_time`` keeps its own collective after every batch). ``report``: this process says on
        stderr when the job stopped (one process does)."""
        self._trainer, self._job, self._report = trainer, job, report
        self.recut_at, self.batches_begun = recut_at, 0
        self.stop.reset()
        replace_per_step_sigterm_broadcast(trainer, before_batch)
        self.stop.requeue = replace_signal_handlers(trainer, self.on_signal)
        self.fit_end.start(in_band, take_over_step_timer(trainer) if in_band else None)

    def on_signal(self, signum: int, frame: Any) -> None:
        """The handler of SIGTERM (and SLURM's requeue signal): take note, for the first stage to stop the pipeline
        before its next batch; a run that is not fitting has no such batch and stops at once."""
        self.stop.on_signal(signum, self._job.watchdog if self._job is not None else None)
        if self._trainer is not None and self._trainer.state.fn != TrainerFn.FITTING:
            raise SIGTERMException(128 + signum)

    def before_batch(self, run: StageRun, recut: Callable[[int], StageRun]) -> None:
        """Before every training batch: stop the job, cut the stages anew (``recut(batch)`` returns the run from
        then on), and mark the next batch as the fit's last, as the first stage decides."""
        watchdog = self._job.watchdog if self._job is not None else None
        signum, ends = run.before_batch(self.stop, watchdog, self.fit_end.out_of_time())
        if signum:
            raise self.stopping(signum)
        if self.batches_begun == self.recut_at:  # every stage is before the same batch
            run = recut(self.batches_begun)
        if ends:
            run.end_fit_after_next_batch()  # on the stages the recut may have built
        self.batches_begun += 1

    def stopping(self, signum: int) -> SIGTERMException:
        """The exception that ends this stage's fit; ``on_exception`` callbacks then run on every stage alike."""
        step = self._trainer.global_step if self._trainer is not None else "?"
        self.stop.stopped(signum, report=self._report, step=step)
        return SIGTERMException(128 + signum)

    def training_step(self, run: StageRun, trainer: pl.Trainer, step: Callable[[], Any]) -> Any:
        """The last stage's training step (of more than one): ``trainer.should_stop`` set after ``self(x)`` becomes a
        request to the first stage (:meth:`FitEnd.training_step <lightning_ddg.ending.FitEnd.training_step>`)."""
        return self.fit_end.training_step(run, trainer, step)

    def batch_marked(self, run: StageRun) -> None:
        """As this stage fetches the batch the first stage marked as the fit's last."""
        assert self._trainer is not None
        self.fit_end.batch_marked(run, self._trainer)

    def check_together(self, run: StageRun) -> None:
        """At a validation or an epoch's end of a fit: raise unless every stage left training after the same batch."""
        self.fit_end.check_together(run, self.batches_begun)

    def after_stop(self, exception: BaseException) -> bool:
        """In ``on_exception``: whether ``exception`` is the stop this process raised (then the requeue checkpoint is
        saved, for SLURM's signal, on every stage together)."""
        if self.stop.stopped_by is None or not isinstance(exception, SIGTERMException):
            return False
        self.stop.after_stop()
        return True

    def finish(self) -> None:
        """At teardown: Lightning's own signal handlers back."""
        if self._trainer is not None:
            restore_signal_handlers(self._trainer)
