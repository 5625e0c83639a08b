"""Stopping the whole job when one process is asked to (SIGTERM, or SLURM's requeue signal).

A signal reaches one process; the job must stop after the same step on every stage, with nothing in flight but
the pipeline's own messages. :class:`JobStop` takes note of the signal (the watchdog carries it to every
process), answers the first stage of each pipeline, which decides before its next batch
(:meth:`StageRun.before_batch <lightning_ddg.stage_run.StageRun.before_batch>`), and remembers what the pipeline
stopped for. This module is plain Python.

Example::

    stop = JobStop()
    signal.signal(signal.SIGTERM, lambda s, f: stop.on_signal(s, watchdog))
    ...
    if stage.is_first and (signum := stop.requested(watchdog)):
        stage.stop(signum)                  # the later stages see the end arrive after the same step
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from lightning_ddg.watchdog import Watchdog

__all__ = ["JobStop"]


class JobStop:
    """What a stop signal asked of this job, and what the pipeline stopped for."""

    def __init__(self) -> None:
        self.received: int | None = None  # a signal asking the job to stop, received by this process
        self.stopped_by: int | None = None  # the signal the pipeline stopped for
        self.requeue: Callable[[int, Any], None] | None = None  # saves a checkpoint and requeues (SLURM)

    def reset(self) -> None:
        self.received = self.stopped_by = None

    def on_signal(self, signum: int, watchdog: Watchdog | None) -> None:
        """Take note of ``signum`` and tell the other processes through the watchdog. A second signal, a stop
        that does not come through, ends the process at once.

        This is all a stop signal's handler does: the first stage ends the pipeline before its next training
        batch (:meth:`StageRun.before_batch <lightning_ddg.stage_run.StageRun.before_batch>`), so that all stages
        stop after the same step with nothing in flight but the pipeline's own messages."""
        if self.received is not None:
            print(f"lightning-ddg: {signal.Signals(signum).name} again; exiting now.", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        if watchdog is not None:
            watchdog.request_stop(signum)

    def requested(self, watchdog: Watchdog | None) -> int:
        """The signal the job was asked to stop for, seen here or anywhere in the job (the watchdog carries it to
        every process), else 0."""
        return self.received or (watchdog.stop_requested if watchdog is not None else None) or 0

    def after_stop(self) -> None:
        """Every stage stopped after the same step and its ``on_exception`` callbacks ran: a stop for the requeue
        signal saves the requeue checkpoint, on every stage together (a collective)."""
        if self.stopped_by is not None and self.stopped_by != signal.SIGTERM and self.requeue is not None:
            self.requeue(self.stopped_by, None)

    def stopped(self, signum: int, report: bool, step: int | str) -> None:
        """The pipeline stopped for ``signum`` after ``step``; ``report`` says so on stderr (one rank does)."""
        self.stopped_by = signum
        if report:
            name = signal.Signals(signum).name
            then = "saving the requeue checkpoint" if signum != signal.SIGTERM else "exiting"
            print(f"lightning-ddg: stopped by {name} after step {step} on every stage; {then}.", file=sys.stderr)
