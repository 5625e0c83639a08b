"""The private Lightning names lightning-ddg relies on, in one place.

Each function says what it is for and what happens if Lightning moves the name: a renamed attribute must show up
as a failing test, never as a silent change of behaviour.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

__all__ = [
    "data_source",
    "detect_anomaly",
    "interrupt_here",
    "replace_per_step_sigterm_broadcast",
    "replace_signal_handlers",
    "restore_signal_handlers",
    "should_update_logs",
]

_SIGNAL_HANDLERS = ("_sigterm_notifier_fn", "_slurm_sigusr_handler_fn")


def replace_per_step_sigterm_broadcast(trainer: pl.Trainer, check: Callable[[], None]) -> None:
    """Run ``check`` where Lightning's training loop broadcasts rank 0's SIGTERM flag before every batch.

    That broadcast (``_TrainingEpochLoop._broadcast_sigterm_tensor``, Lightning >= 2.5) is a collective per step:
    every stage would wait for the last one before each batch, which undoes the pipeline. If Lightning renames
    it, the per-step collective comes back and ``tests/test_per_step.py`` fails.
    """
    loop = trainer.fit_loop.epoch_loop
    if hasattr(type(loop), "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = check  # an instance attribute shadows the method


def replace_signal_handlers(trainer: pl.Trainer, handler: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
    """Make ``handler`` the function Lightning registers for SIGTERM and for SLURM's requeue signal.

    Lightning's own handlers broadcast from inside the signal handler (a collective at an arbitrary point of one
    process) and save the requeue checkpoint there (collectives again). The handlers are looked up on the
    ``_SignalConnector`` instance when ``Trainer`` registers them, after ``Strategy.setup``; if Lightning renames
    them, its own handlers run and the signal tests fail. Returns Lightning's requeue handler, which saves the
    ``hpc_ckpt`` checkpoint and requeues the job, for the strategy to call where every stage can take part.
    """
    connector = trainer._signal_connector
    requeue = connector._slurm_sigusr_handler_fn
    for name in _SIGNAL_HANDLERS:
        setattr(connector, name, handler)
    return requeue


def restore_signal_handlers(trainer: pl.Trainer) -> None:
    connector = trainer._signal_connector
    for name in _SIGNAL_HANDLERS:
        connector.__dict__.pop(name, None)


def interrupt_here(trainer: pl.Trainer, exception: BaseException) -> None:
    """What ``Trainer`` does with an exception that ends a run (``on_exception`` hooks, loggers finalised,
    teardown), in a process started by a spawning launcher, where Lightning itself does it only in the launching
    process. ``lightning.pytorch.trainer.call._interrupt``; if it moves, the spawn stop test fails."""
    from lightning.pytorch.trainer.call import _interrupt

    _interrupt(trainer, exception)
    trainer._teardown()


def should_update_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning logs at this training step (every ``log_every_n_steps``): the stage figures are logged
    then. ``trainer._logger_connector.should_update_logs``; if it moves, the figures are logged at epoch ends only
    and a warning says so."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or not hasattr(connector, "should_update_logs"):
        _warn_once("Trainer._logger_connector.should_update_logs", "stage figures are logged at epoch ends only")
        return False
    return bool(connector.should_update_logs)


def detect_anomaly(trainer: pl.Trainer) -> bool:
    """``Trainer(detect_anomaly=...)``, which turns the stages' finite checks on by default. Lightning keeps it
    in ``trainer._detect_anomaly`` only; if it moves, the checks stay off unless ``check_finite=True`` is given,
    and a warning says so."""
    if not hasattr(trainer, "_detect_anomaly"):
        _warn_once("Trainer._detect_anomaly", "give DDGStrategy(check_finite=True) to check for NaN")
        return False
    return bool(trainer._detect_anomaly)


def data_source(loop: Any) -> Any:
    """The ``_DataLoaderSource`` of a fit/validate/test/predict loop, from which the strategy draws one example
    batch to measure the stages. ``loop._data_source``; if it moves, there is no example batch: the plan balances
    by parameter counts and a warning says so."""
    source = getattr(loop, "_data_source", None)
    if source is None:
        _warn_once(f"{type(loop).__name__}._data_source", "the stages are balanced by parameter counts")
    return source


_warned: set[str] = set()


def _warn_once(name: str, consequence: str) -> None:
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"lightning-ddg relies on Lightning's private {name}, which this Lightning version lacks: {consequence}. "
        "Use a Lightning version lightning-ddg supports (see pyproject.toml).",
        RuntimeWarning,
        stacklevel=3,
    )
