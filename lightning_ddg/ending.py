"""A fit that one stage decides to end, ended on every stage after the same batch, with no collective per step.

Two decisions are made on one stage only:

- a **time limit** (``Trainer(max_time=...)``, a ``Timer`` checking after every batch): the first stage reads the
  clock before each training batch (Lightning's ``Timer`` would broadcast rank 0's clock after every batch);
- ``trainer.should_stop`` set in ``training_step`` **after** ``self(x)``, which runs on the last stage alone: a
  request that travels up the pipeline with the gradients (:attr:`~lightning_ddg.stage.DDGStage.end_requested`).

Either way the first stage decides before a batch (:meth:`~lightning_ddg.stage_run.StageRun.before_batch`) and
marks the batch it loads next as the fit's last
(:meth:`~lightning_ddg.stage_run.StageRun.end_fit_after_next_batch`); each stage sets ``trainer.should_stop`` as it
fetches that batch (:meth:`FitEnd.batch_marked`). A decision made elsewhere from what one stage alone has (a
callback stopping on the loss) would leave that stage waiting for the others: at every validation and epoch's end
the stages check that they left training together (:meth:`FitEnd.check_together`), and such a stage raises.

Example, in the strategy's hooks::

    fit_end.start(in_band=True, timer=timer)       # setup
    signum, ends = run.before_batch(stop, watchdog, fit_end.out_of_time())  # before every training batch
    output = fit_end.training_step(run, trainer, lambda: run.training_step(...))  # on the last stage
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_ddg._compat import announce_time_limit
from lightning_ddg.checks import SHOULD_STOP_AFTER_FORWARD

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Timer

    from lightning_ddg.stage_run import StageRun

__all__ = ["FitEnd"]


class FitEnd:
    """One process's part in ending a fit together; :meth:`start` at every setup."""

    def __init__(self) -> None:
        self.in_band = False  # the batches carry the first stage's mark (load_once, more than one stage)
        self.timer: Timer | None = None  # the fit's time limit, its own per-batch check switched off
        self._checked_at: int | None = None  # the training batches begun when the stages last checked together

    def start(self, in_band: bool, timer: Timer | None) -> None:
        self.in_band, self.timer, self._checked_at = in_band, timer, None

    def out_of_time(self) -> bool:
        """Before every training batch: whether the fit's time limit is reached (the first stage's decision)."""
        remaining = self.timer.time_remaining() if self.in_band and self.timer is not None else None
        return remaining is not None and remaining <= 0

    def training_step(self, run: StageRun, trainer: pl.Trainer, step: Callable[[], Any]) -> Any:
        """``step()``, the last stage's training step: ``trainer.should_stop`` set after its ``self(x)`` becomes a
        request to the first stage (refused where the batches cannot carry the mark)."""
        at_forward: list[bool] = []
        run.forward.on_training_call = lambda: at_forward.append(trainer.should_stop)
        output = step()
        if trainer.should_stop and at_forward == [False]:
            assert run.stage is not None
            if not self.in_band:
                raise MisconfigurationException(SHOULD_STOP_AFTER_FORWARD)
            trainer.should_stop = False
            if not run.stage.end_requested:
                run.stage.end_requested = True
                rank_zero_info(
                    "lightning-ddg: trainer.should_stop was set after self(...) in training_step at step "
                    f"{trainer.global_step}; every stage stops after the same later batch, once the request has "
                    "reached the first stage."
                )
        return output

    def batch_marked(self, run: StageRun, trainer: pl.Trainer) -> None:
        """As this stage fetches the batch the first stage marked as the fit's last: stop after it."""
        trainer.should_stop = True
        if self.timer is not None and run.stage is not None and not run.stage.end_requested:
            announce_time_limit(self.timer)

    def check_together(self, run: StageRun, batches_begun: int) -> None:
        """At a validation or an epoch's end of a fit, before its collectives: raise unless every stage left
        training after the same batch (:meth:`StageRun.check_together`); once per point."""
        if self._checked_at != batches_begun:
            self._checked_at = batches_begun
            run.check_together()
