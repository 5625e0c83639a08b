"""What runs between training batches in place of Lightning's per-batch SIGTERM broadcast and its signal handlers
(``between_batches.py``), on a Trainer that is built but not run; real signals to real jobs are in
``tests/test_stopping.py`` and ``tests/test_reliability.py``."""

from __future__ import annotations

import functools
import signal

import lightning.pytorch as pl
import pytest
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_ddg import _compat
from lightning_ddg.between_batches import BetweenBatches
from lightning_ddg.job import JobMember


def _started(trainer: pl.Trainer, checks: list) -> BetweenBatches:
    between = BetweenBatches()
    check = functools.partial(checks.append, 1)
    between.start(trainer, JobMember(), in_band=True, recut_at=None, report=False, before_batch=check)
    return between


def test_it_takes_over_the_per_batch_broadcast_and_the_signal_handlers_and_gives_the_handlers_back() -> None:
    trainer, checks = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False), []
    lightnings = {name: getattr(trainer._signal_connector, name) for name in _compat._SIGNAL_HANDLERS}
    between = _started(trainer, checks)
    loop = trainer.fit_loop.epoch_loop
    if hasattr(type(loop), "_broadcast_sigterm_tensor"):  # Lightning >= 2.5; 2.4 checks in a callback
        loop._broadcast_sigterm_tensor()
        assert checks == [1]
    for name in _compat._SIGNAL_HANDLERS:
        assert getattr(trainer._signal_connector, name) == between.on_signal
    between.finish()
    assert {name: getattr(trainer._signal_connector, name) for name in _compat._SIGNAL_HANDLERS} == lightnings


def test_a_signal_is_taken_note_of_while_fitting_and_stops_at_once_otherwise() -> None:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    between = _started(trainer, [])
    trainer.state.fn = TrainerFn.FITTING
    between.on_signal(signal.SIGUSR1, None)  # the first stage stops the pipeline before its next batch
    assert between.stop.requested(None) == signal.SIGUSR1
    between.stop.reset()
    trainer.state.fn = TrainerFn.VALIDATING
    with pytest.raises(SIGTERMException):
        between.on_signal(signal.SIGTERM, None)
    stopping = between.stopping(signal.SIGTERM)  # the exception that ends the fit, and what it stopped for
    assert isinstance(stopping, SIGTERMException) and between.stop.stopped_by == signal.SIGTERM
    assert between.after_stop(stopping) and not between.after_stop(RuntimeError("a failure"))
