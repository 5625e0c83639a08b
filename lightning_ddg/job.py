"""This process's place in the job: it meets the others when a run starts, tells them when it fails, and leaves
when the run ends, so that a failure anywhere ends every process and a run that went well ends quietly.

Meeting is the process group (through :mod:`lightning_ddg.rendezvous`, whose error names the processes that did
not arrive), then a :class:`~lightning_ddg.watchdog.Watchdog` over the others. The strategy calls
:meth:`JobMember.join` from ``setup_environment``, :meth:`JobMember.fail` from ``on_exception`` and
:meth:`JobMember.leave` from ``teardown``.

Example::

    member = JobMember()
    member.join(env, "gloo", rank, world_size, describe=topology.describe, first_child_rank=1, watch_parent=False)
    try:
        run()
    except BaseException as err:
        member.fail(err, rank)
        raise
    finally:
        member.leave(stage_run, stopped=False, stage_ran=True)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist
from lightning.fabric.plugins import ClusterEnvironment

from lightning_ddg._compat import init_dist_connection
from lightning_ddg.launchers import launched_ranks, pause_observer, run_ended, stage_killed_watch
from lightning_ddg.lifeline import end_if_launcher_gone
from lightning_ddg.rendezvous import init_process_group, needs_rendezvous
from lightning_ddg.watchdog import Watchdog

if TYPE_CHECKING:
    from lightning_ddg.stage_run import StageRun

__all__ = ["JobMember"]

log = logging.getLogger(__name__)


class JobMember:
    """The process group and the watchdog of one process of the job, from the start of a run to its end."""

    def __init__(self) -> None:
        self.watchdog: Watchdog | None = None  # with more than one process: watches the others, carries stop signals
        self.failed = False

    def join(
        self,
        env: ClusterEnvironment,
        backend: str,
        rank: int,
        world_size: int,
        *,
        describe: Callable[[int], str],
        first_child_rank: int,
        watch_parent: bool,
        rendezvous_timeout: timedelta = timedelta(minutes=3),
        timeout: timedelta = timedelta(minutes=30),
    ) -> None:
        """Create the default process group with the job's other processes and start watching them.

        Args:
            first_child_rank: the global rank of the first process this one launched (errors say which of its
                launched processes have exited).
            watch_parent: end this process when the process that launched it ends.
            rendezvous_timeout: how long the processes may take to meet; ``timeout`` bounds every later wait.
        """
        job = {"describe": describe, "children": launched_ranks(first_child_rank)}
        if needs_rendezvous(world_size):  # a timeout of its own, an error naming the absent
            timeouts = {"rendezvous_timeout": rendezvous_timeout, "timeout": timeout}
            init_process_group(backend, env.main_address, env.main_port, rank, world_size, **timeouts, **job)
        else:  # one process, a later fit, or torchrun's agent serving the store: Lightning's way
            init_dist_connection(env, backend, timeout=timeout)
        self.failed, self.watchdog = False, None
        if world_size > 1:  # every process watches the others: a failure anywhere ends the job (watchdog.py)
            pause_observer(True)  # the watchdog watches the launched ranks now
            self.watchdog = Watchdog.for_job(
                env.main_address,
                env.main_port,
                rank,
                world_size,
                watch_parent=watch_parent,
                killed=stage_killed_watch(),  # what a spawning launcher saw
                **job,
            )

    def fail(self, error: BaseException, rank: int) -> None:
        """This process failed: the others would wait for it forever, so the watchdog tells them to end."""
        log.error("rank %d failed: %s: %s", rank, type(error).__name__, error)
        self.failed = True
        if self.watchdog is not None:
            self.watchdog.report(error)

    def leave(self, run: StageRun | None, stopped: bool, stage_ran: bool) -> None:
        """The end of a run: close the stage's channels and stop watching. ``stopped``: the job stopped for a
        signal, and ``stage_ran``: this process ran a stage, so it waits until every stage has run its
        ``on_exception`` callbacks before it exits."""
        end_if_launcher_gone()  # a run that ended as its launcher went still says so, once
        if run is not None:  # a stopped pipeline leaves messages in flight: its channels to the process's exit
            run.close(clean=not self.failed and not stopped)
        if not self.failed:
            if stopped and stage_ran:
                dist.barrier()
            if self.watchdog is not None:
                self.watchdog.stop()
                run_ended()
        self.watchdog = None
