"""Ending the whole job when one of its processes fails.

The stages of a pipeline never meet in a collective: when one of them fails, its neighbours wait for a message
that never comes — with NCCL, forever. So every process of a job runs a :class:`Watchdog`, a daemon thread that
talks to the job's key-value store (the TCPStore the process group was set up with, on a connection of its own)
every ``interval`` seconds:

- it *beats*: it increments this process's counter;
- it *watches* for the failure another process published, for a peer whose counter stopped moving (a process
  killed with SIGKILL, or by the out-of-memory killer), for the store going away (its server lives in global
  rank 0), for the process that launched this one going away, in a launching process for a launched process
  that exited with an error and, in a process a spawning launcher started, for the launcher's word that another
  stage of the host was killed (which it sees at once, where a missing heartbeat takes ``stale_after``);
- it carries a *stop request* (:meth:`Watchdog.request_stop`: a scheduler's SIGTERM reached this process) to the
  store, and picks up one made anywhere in the job as :attr:`Watchdog.stop_requested`, so that the stage that
  decides where the pipeline stops learns of it within a beat or two, whichever process got the signal;
- when it sees one, it ends this process: one line on stderr that names the stage that failed, exit code 1. It
  ends the process from its own thread with ``os._exit``, because the main thread may be blocked in a receive.

The failing process calls :meth:`Watchdog.report` with its exception: the failure is published (the first one
published wins) and a note naming the stage is added to the exception, whose traceback the process prints as
usual, once. Peers wait for the failing process to exit before they do, so that a launcher reports its error
rather than theirs. Nothing here runs on the training path: no synchronisation, no cost per step.

Example::

    store = dist.TCPStore(host, port, is_master=False)
    watchdog = Watchdog(store, rank=dist.get_rank(), world_size=dist.get_world_size()).start()
    try:
        train()
    except BaseException as error:
        watchdog.report(error)
        raise
    watchdog.stop()
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_ddg.lifeline import claim_end, launcher_gone

__all__ = ["Failure", "Watchdog", "exit_text"]

# a job that runs several fits in the same processes gets fresh keys for each; every process creates its
# watchdogs in the same order, so the numbers agree
_generations = itertools.count()
# how long a process outlives the failing one, so that a launcher sees the failing one exit alone
_LINGER_S = 1.0
# what a store operation raises when the store's server has gone
_STORE_ERRORS = (RuntimeError, OSError)


@dataclass(frozen=True)
class Failure:
    """What ended a job: the global rank that failed (-1 if unknown), one line saying how, its traceback, and
    where the failing process runs (pid 0 if unknown)."""

    rank: int
    message: str
    details: str = ""
    pid: int = 0
    host: str = ""

    def encode(self) -> str:
        return f"{self.rank} {self.pid} {self.host}\n{self.message}\n{self.details}"

    @classmethod
    def decode(cls, raw: bytes) -> Failure:
        head, message, details = (raw.decode(errors="replace").split("\n", 2) + ["", ""])[:3]
        rank, pid, host = (head.split(" ", 2) + ["0", ""])[:3]
        return cls(int(rank), message, details, int(pid), host)


class Watchdog:
    """Heartbeat and failure watch of one process of a job (see the module's documentation).

    Args:
        store: a client of the job's store; the watchdog's keys live under a prefix of their own.
        rank: this process's global rank.
        world_size: number of processes in the job.
        describe: names a rank in messages, e.g. ``lambda r: f"stage {K - 1 - r} (rank {r})"``.
        interval: seconds between two beats and looks at the peers.
        stale_after: a peer whose counter has not moved for this long is taken for dead.
        exit_grace: longest wait for a failing process, or for this process's children, to exit.
        children: processes this one launched, by global rank; the watchdog notices when one exits with an
            error, and stops the others before this process exits.
        watch_parent: end the job when the process that launched this one goes away.
        killed: the launching process's word on a process of this job that it saw killed by a signal, as
            (global rank, pid, exit code), or None; asked every beat.

    Example::

        watchdog = Watchdog(store, rank, world_size, describe=lambda r: f"stage {r}").start()
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        describe: Callable[[int], str] | None = None,
        interval: float = 0.5,
        stale_after: float = 10.0,
        exit_grace: float = 10.0,
        children: Mapping[int, subprocess.Popen] | None = None,
        watch_parent: bool = False,
        killed: Callable[[], tuple[int, int, int] | None] | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.describe = describe or (lambda r: f"rank {r}")
        self.interval = interval
        self.stale_after = stale_after
        self.exit_grace = exit_grace
        self._store = dist.PrefixStore(f"lightning_ddg/watchdog/{next(_generations)}/", store)
        self._children = dict(children or {})
        self._parent = os.getppid() if watch_parent else None
        self._killed = killed
        self._beats: dict[int, tuple[int, float]] = {}  # rank -> (last count seen, when it last changed)
        self._rank0_done = False
        self._reported = False
        self._stop_to_publish: int | None = None
        self.stop_requested: int | None = None  # the signal that asked the job to stop, seen anywhere in it
        self._main_ended_at: float | None = None
        self._stopping = threading.Event()
        self._ending = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lightning-ddg-watchdog", daemon=True)

    @classmethod
    def for_job(
        cls,
        address: str,
        port: int,
        rank: int,
        world_size: int,
        **kwargs: Any,
    ) -> Watchdog:
        """A started watchdog on a client of the job's store, served by rank 0 at ``address:port``."""
        store = dist.TCPStore(address, port, is_master=False, timeout=timedelta(seconds=30))
        return cls(store, rank, world_size, **kwargs).start()

    # --- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> Watchdog:
        self._store.add(f"beat/{self.rank}", 1)  # fails here, not in the thread, if the store is unreachable
        self._thread.start()
        return self

    def stop(self) -> None:
        """End of a run that went well: say so, so that peers do not take the silence for a death, and stop."""
        try:
            self._store.set(f"done/{self.rank}", "1")
            if self.rank == 0:
                self._wait_for_peers_to_stop()
        except _STORE_ERRORS:
            pass  # the store has gone with rank 0, which has finished too
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 10)

    def _wait_for_peers_to_stop(self) -> None:
        """The store lives in rank 0's process: it stays until every peer has stopped watching (``exit_grace`` at
        most), so that a peer still finishing its run does not take the store's end for rank 0's death."""
        peers = [f"done/{rank}" for rank in range(1, self.world_size)]
        deadline = time.monotonic() + self.exit_grace
        while peers and not self._store.check(peers) and time.monotonic() < deadline:
            time.sleep(self.interval / 10)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def request_stop(self, signum: int) -> None:
        """Ask the whole job to stop (safe to call from a signal handler: the watchdog's thread publishes it)."""
        self._stop_to_publish = signum
        self.stop_requested = self.stop_requested or signum

    # --- the failing process ------------------------------------------------------------------------------
    def report(self, error: BaseException) -> None:
        """Publish this process's failure; call it from the exception handler, then let the error propagate.

        If another process failed first, ``error`` is a consequence of that failure (a receive from a process
        that has gone, say): this process then ends the way peers do and this call does not return. A
        communication error with no failure published yet gets a moment for the watchdog to find its cause
        (a peer killed without a word).
        """
        if self._reported:
            return
        failure = self._published_or_lost()
        if failure is None and _is_communication_error(error):
            deadline = time.monotonic() + self.stale_after + 2 * self.interval
            while failure is None and time.monotonic() < deadline:
                time.sleep(self.interval)
                failure = self._published_or_lost()
        if failure is not None and failure.rank != self.rank:
            self._end_job(failure)
        message, details = _failure_message(self.describe(self.rank), error), "".join(_format(error))
        own = Failure(self.rank, message, details, os.getpid(), socket.gethostname())
        try:
            standing = self._publish(own)
        except _STORE_ERRORS:
            standing = own  # the store has gone: the peers find out that way
        if standing.rank != self.rank:
            self._end_job(standing)  # another stage failed at the same moment: its error is the one shown
        self._reported = True
        if hasattr(error, "add_note"):  # Python >= 3.11: printed with the traceback
            error.add_note(f"lightning-ddg: raised on {self.describe(self.rank)}; the other stages are stopped.")
            if isinstance(error, torch.OutOfMemoryError):
                error.add_note(
                    "lightning-ddg: this stage ran out of memory. DDGStrategy(memory='recompute') keeps no activations"
                    " between forward and backward; other split points give this stage fewer layers."
                )
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        """The failing process is exiting: if it launched the others, it lets them go and waits for them."""
        if not self._children:
            return
        try:
            self._store.set(f"released/{self.rank}", "1")
        except _STORE_ERRORS:
            pass  # the store has gone: they notice that
        self._stop_children()

    # --- the watch ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            if self._reported:
                self._exit_if_stuck()
            try:
                self._store.add(f"beat/{self.rank}", 1)
                if self._reported:
                    continue
                self._exchange_stop_request()
                failure = self._find_failure()
            except _STORE_ERRORS as err:
                if self._stopping.is_set() or self._reported or self._rank0_done:
                    continue  # rank 0 has finished (or this process failed) and the store has gone with it
                failure = self._seen_killed(wait=True) or _store_lost(self.describe, err)
            if failure is not None:
                self._end_job(failure)

    def _exchange_stop_request(self) -> None:
        if self._stop_to_publish is not None:
            self._store.compare_set("stop", "", str(self._stop_to_publish))
            self._stop_to_publish = None
        if self.stop_requested is None and self._store.check(["stop"]):
            self.stop_requested = int(self._store.get("stop"))

    def _find_failure(self) -> Failure | None:
        published = self.published()
        if published is not None:
            return published if published.rank != self.rank else None
        for rank, child in self._children.items():
            code = child.poll()
            if code:
                message = f"{self.describe(rank)} {exit_text(code)}"
                return self._publish(Failure(rank, message, pid=child.pid, host=socket.gethostname()))
        killed = self._seen_killed()
        if killed is not None:
            return self._publish(killed)  # for the stages of other hosts
        if self._parent is not None and os.getppid() != self._parent:
            return self._publish(Failure(-1, f"the process that launched {self.describe(self.rank)} has exited"))
        if not self._rank0_done and self.rank != 0:
            self._rank0_done = self._store.check(["done/0"])
        now = time.monotonic()
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            count = self._store.add(f"beat/{rank}", 0)
            seen = self._beats.get(rank)
            if seen is None or seen[0] != count:
                self._beats[rank] = (count, now)
            elif count > 0 and now - seen[1] > self.stale_after and not self._store.check([f"done/{rank}"]):
                # a peer is only timed once it has beaten: one still on its way to this run is not dead
                message = (
                    f"{self.describe(rank)} stopped responding (no heartbeat for {self.stale_after:.0f} s): its "
                    "process was probably killed (SIGKILL, or the out-of-memory killer)"
                )
                return self._publish(Failure(rank, message))
        return None

    def published(self) -> Failure | None:
        """The failure published for this job, if any."""
        if not self._store.check(["failed"]):
            return None
        return Failure.decode(self._store.get("failed"))

    def _published_or_lost(self) -> Failure | None:
        try:
            return self.published() or self._seen_killed()
        except _STORE_ERRORS as err:
            return self._seen_killed(wait=True) or _store_lost(self.describe, err)

    def _seen_killed(self, wait: bool = False) -> Failure | None:
        """The stage the launching process saw killed, if it said so (``killed``). With ``wait``, for the store
        lost: the launching process gets a moment to say that rank 0 was killed, a more useful line than the
        store's loss."""
        if self._killed is None:
            return None
        deadline = time.monotonic() + (2 * self.interval if wait else 0.0)
        while (seen := self._killed()) is None and time.monotonic() < deadline:
            time.sleep(self.interval / 10)
        if seen is None or seen[0] == self.rank:
            return None
        rank, pid, code = seen
        return Failure(rank, f"{self.describe(rank)} {exit_text(code)}", pid=pid, host=socket.gethostname())

    def _publish(self, failure: Failure) -> Failure:
        """Publish ``failure`` unless one was published before; return the one that stands."""
        return Failure.decode(self._store.compare_set("failed", "", failure.encode()))

    # --- ending ---------------------------------------------------------------------------------------------
    def _end_job(self, failure: Failure) -> None:
        """End this process because of ``failure`` elsewhere; whichever thread comes first does it."""
        if failure.rank < 0 and launcher_gone():
            threading.Event().wait()  # the launcher's watch ends this process, with the job's one line about it
        with self._ending:
            self._wait_for_exit(failure)
            claim_end()
            line = f"lightning-ddg: {failure.message}; stopping {self.describe(self.rank)}."
            print(line, file=sys.stderr, flush=True)
            self._stop_children()
            os._exit(1)

    def _wait_for_exit(self, failure: Failure) -> None:
        """Give the failing process the time to print its error and exit, so that its error is the one shown: a
        spawning launcher reports the first process that exits, and Lightning's re-launched ranks print theirs."""
        if failure.rank < 0:
            return
        local = failure.pid > 0 and failure.host == socket.gethostname()
        deadline = time.monotonic() + self.exit_grace
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            if local and not _alive(failure.pid):
                # a spawning launcher that wakes up to two exited processes reports the one it lists first
                time.sleep(_LINGER_S)
                return
            try:
                if self._store.check([f"released/{failure.rank}"]):
                    return  # it launched this process and waits for it
                count = self._store.add(f"beat/{failure.rank}", 0)
            except _STORE_ERRORS:
                return  # the store has gone, with rank 0
            now = time.monotonic()
            if count != last:
                last, since = count, now
            elif not local and now - since > 3 * self.interval:
                return  # on another host: no longer beating means gone
            time.sleep(self.interval / 4)

    def _stop_children(self) -> None:
        """Wait for this process's children, which stop by themselves, and kill those that do not in time."""
        deadline = time.monotonic() + self.exit_grace
        for child in self._children.values():
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def _exit_if_stuck(self) -> None:
        """After a failure, the process must exit once its main thread is done, even if something hangs on."""
        if threading.main_thread().is_alive():
            return
        if self._main_ended_at is None:
            self._main_ended_at = time.monotonic()
        elif time.monotonic() - self._main_ended_at > self.exit_grace:
            os._exit(1)


def _format(error: BaseException) -> list[str]:
    return traceback.format_exception(type(error), error, error.__traceback__)


def _failure_message(name: str, error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return f"{name} was interrupted (KeyboardInterrupt)"
    lines = str(error).strip().splitlines()
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""  # the first sentence; the advice is in the traceback
    first = first if len(first) <= 200 else first[:199] + "…"
    return f"{name} failed with {type(error).__name__}" + (f": {first}" if first else "")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs; an exited process that nobody has reaped does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def exit_text(code: int) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _store_lost(describe: Callable[[int], str], err: BaseException) -> Failure:
    return Failure(
        -1,
        f"lost the job's store, which {describe(0)} holds: that process has probably died ({str(err).splitlines()[0]})",
    )


def _is_communication_error(error: BaseException) -> bool:
    """Errors a process gets because a peer went away, rather than errors of its own."""
    # ConnectionError, TimeoutError: a channel through shared memory whose sender exited or fell silent
    if isinstance(error, (dist.DistError, ConnectionError, TimeoutError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("Connection closed by peer", "Connection reset by peer", "NCCL", "gloo")
    )
