"""Every process of a job is watched from its first moment to its last.

The watchdog (``watchdog.py``) watches a job's processes once their process group exists. Before that — while a
launched rank imports torch, waits for the others at the rendezvous, plans its split — and after it, between
fits and while a script ends, two smaller watches keep a job from leaving a process behind:

- :func:`watch_launcher`: a process started by a launcher ends when the launcher ends, whatever it is doing. A
  daemon thread notices that the launching process has gone (the process's parent changed, for a rank that
  ``strategy="ddg"`` re-launched; the parent's sentinel closed, for one started by multiprocessing) and exits
  with code 1. Of the processes the launcher leaves behind on a host, one prints one line that says so (the
  first to claim a file named after the launcher); the others end without a word. A rank re-launched by
  ``strategy="ddg"``, and a process that ``start_method="spawn"`` starts, begin their watch when they import
  ``lightning_ddg``, before torch or Lightning are imported (import it first in a script); a process forked
  from a forkserver, as it enters the strategy's code.
- :class:`SignalWatch`: in the launching process, a SIGTERM that arrives while no one else handles it (before
  Lightning installs its handlers for training, and after it removes them) stops the job at once: one line,
  the launched processes are stopped, exit code 143. Python runs signal handlers in the main thread only, and
  not while it waits inside C++ (a rendezvous, a receive): the signal reaches a thread of its own through
  ``signal.set_wakeup_fd``, and that thread ends the process. A SIGTERM that another handler takes (Lightning's,
  during training) is left to it, unless the main thread shows no sign of life for ``STUCK_S`` seconds after it
  — blocked in a wait no handler can interrupt —: then the job is stopped the same way; and if that handler
  found no step left to stop after (the signal came during the drain), the job is stopped as the run ends. A
  spawning launcher whose stages stopped together after a step, and said so, adds no line of its own.

Only the standard library is used here, so that the watch can start before the heavy imports.

Example::

    watch_launcher(launcher_pid, "rank 1")  # in a launched process: exits when the launcher has gone
    with SignalWatch(stop=lambda: [p.kill() for p in children]):  # in the launching process
        run_the_job()
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

__all__ = [
    "LAUNCHER_PID",
    "SignalWatch",
    "claim_end",
    "launcher_claim",
    "launcher_gone",
    "naming_this_launcher",
    "proc_stat",
    "watch_launcher",
    "watch_launcher_from_environment",
]

# set by the "ddg" launcher for the ranks it re-launches, and taken out of the environment by them (so that their
# own children, data loader workers say, do not take themselves for ranks)
LAUNCHER_PID = "LIGHTNING_DDG_LAUNCHER_PID"
LAUNCHER_CLAIM = "LIGHTNING_DDG_LAUNCHER_CLAIM"  # and the launcher's claim (launcher_claim), named while it runs
POLL_S = 0.2
STUCK_S = 10.0  # after a SIGTERM another handler takes, how long the main thread may stay in one place
CLAIM_S = 1.0  # how long the process that speaks for the others keeps its claim

_watching = 0  # the pid of the process whose launcher is watched
_ending = threading.Lock()  # one line, and one exit, per process


def watch_launcher_from_environment() -> None:
    """Start the watch of a process that imports ``lightning_ddg`` as a launched one: a rank re-launched by
    ``strategy="ddg"`` (the environment names its launcher), or a process started with multiprocessing's
    "spawn" that is still importing the script (multiprocessing marks it as inheriting)."""
    launcher, claim = os.environ.pop(LAUNCHER_PID, None), os.environ.pop(LAUNCHER_CLAIM, None)
    launcher_pid = int(launcher) if launcher and launcher.isdigit() and int(launcher) != os.getpid() else None
    current = multiprocessing.current_process()
    if getattr(current, "_inheriting", False) and current.name != "MainProcess":  # not a forkserver preloading
        # named by the launcher: one that died as this process started has left it with another parent already
        watch_launcher(launcher_pid or os.getppid(), f"process {os.getpid()}, which was still starting", claim)
        # Ctrl-C in the launching process reaches its stages as SIGINT (launchers.py): one still starting has
        # nothing to stop gracefully, and a KeyboardInterrupt would print a traceback from inside its imports
        signal.signal(signal.SIGINT, _exit_quietly)
    elif launcher_pid is not None:
        watch_launcher(launcher_pid, f"rank {os.environ.get('LOCAL_RANK', '?')}", claim)


@contextmanager
def naming_this_launcher() -> Iterator[None]:
    """While in it, the processes this one starts inherit its pid and its claim in their environment, and watch it
    from their first import of lightning_ddg (:func:`watch_launcher_from_environment`)."""
    claim = launcher_claim(os.getpid())
    os.environ[LAUNCHER_PID] = str(os.getpid())
    if claim is not None:
        os.environ[LAUNCHER_CLAIM] = claim
    try:
        yield
    finally:
        os.environ.pop(LAUNCHER_PID, None)
        os.environ.pop(LAUNCHER_CLAIM, None)


def watch_launcher(launcher_pid: int | None, name: str, claim: str | None = None) -> None:
    """End this process, with one line on stderr, when the process that launched it has gone.

    ``launcher_pid`` is the launching process, this process's parent; ``None`` in a process started by
    multiprocessing, whose parent's sentinel tells when it has gone. ``claim``: the launcher's
    :func:`launcher_claim`, taken while it ran (by default read now, which a launcher already gone leaves
    ``None``: then this process speaks whatever the others do). One watch per process: later calls do nothing.
    """
    global _watching, _gone
    parent = multiprocessing.parent_process() if launcher_pid is None else None
    if parent is not None and signal.getsignal(signal.SIGINT) is _exit_quietly:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # started: Ctrl-C stops the run as usual
    if parent is not None:
        # torch.multiprocessing asks the kernel for a SIGINT when the parent dies, which raises KeyboardInterrupt
        # in whatever the main thread runs (if it runs Python at all): the watch says why and ends the process
        _set_parent_death_signal(0)
    if _watching == os.getpid():  # a process forked from a watched one is not watched: its thread stayed behind
        return
    if launcher_pid is None and parent is None:
        return  # not a launched process
    _watching = os.getpid()
    pid = launcher_pid if launcher_pid is not None else parent.pid  # type: ignore[union-attr]
    claim = claim or launcher_claim(pid)

    def gone() -> bool:
        if parent is not None:
            parent.join(POLL_S)  # returns when the parent's end of the pipe closes, or after POLL_S
            return not parent.is_alive()
        time.sleep(POLL_S)
        return os.getppid() != launcher_pid  # re-parented: the launcher has exited

    def run() -> None:
        while not gone():
            pass
        end_if_launcher_gone()

    global _end_line
    _end_line = claim, f"lightning-ddg: the launching process ({pid}) has exited; stopping {name}."
    _gone = (lambda: not parent.is_alive()) if parent is not None else (lambda: os.getppid() != launcher_pid)
    if launcher_pid is not None and os.getppid() != launcher_pid:
        run()  # the launcher ended before this process got this far
    threading.Thread(target=run, name="lightning-ddg-launcher-watch", daemon=True).start()
    # a process that ends (its run over) between the launcher's end and the watch's next look says so too; one
    # started by multiprocessing runs no atexit handlers: its launcher calls this as the process's last act
    atexit.register(end_if_launcher_gone)


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def claim_end() -> None:
    """Called by a thread about to end this process: the first one goes on, any later one waits for the end, so
    that a process says once why it ends (its launcher's watch, the watchdog)."""
    if not _ending.acquire(blocking=False):
        threading.Event().wait()


def launcher_gone() -> bool:
    """Whether this process's launcher is watched and has gone: then the watch ends this process, with the one
    line the job gets for it, within ``POLL_S``."""
    return _watching == os.getpid() and _gone is not None and _gone()


_gone: Callable[[], bool] | None = None  # the watch's test, without its wait
_end_line: tuple[str | None, str] | None = None  # the watch's claim file and the line it says


def end_if_launcher_gone() -> None:
    """End this process as its watch does, with the job's one line, if its launcher has gone. Also called as a run
    ends (the strategy's teardown): a run that finishes between the launcher's end and the watch's next look
    would otherwise end with no word."""
    if _end_line is not None and launcher_gone():
        _end_for_launcher(*_end_line)


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command's name (state, parent pid, ...: ``man 5 proc``, from the
    third on); None for a process that has gone, or where there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def launcher_claim(launcher_pid: int) -> str | None:
    """The file whose creation decides which of the processes a launcher leaves behind says so: named after the
    launcher's pid and start time (read while it runs), so that a later job with the same pid has its own."""
    fields = proc_stat(launcher_pid)
    if fields is None:
        return None  # not Linux, or the launcher has already gone: this process speaks
    return os.path.join(tempfile.gettempdir(), f"lightning-ddg-launcher-{launcher_pid}-{fields[19]}")


def _end_for_launcher(claim: str | None, line: str) -> None:
    """End this process for its launcher's end, with ``line`` if it is the first of the job's processes on this
    host to claim ``claim``; the claim is dropped once the others, which notice within ``POLL_S``, have seen it."""
    claim_end()
    try:
        if claim is not None:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        os._exit(1)  # another process said it
    except OSError:
        pass
    print(line, file=sys.stderr, flush=True)
    if claim is not None:
        time.sleep(CLAIM_S)
        try:
            os.unlink(claim)
        except OSError:
            pass
    os._exit(1)


class SignalWatch:
    """In the launching process, a SIGTERM that no other handler takes ends the job at once (see the module).

    Args:
        stop: called before this process exits, to stop the processes it launched; returns True if they said
            why they stopped (stages that stopped together after a step), and then this process says nothing.

    Nothing is installed where it could take something from the program: outside the main thread, when a SIGTERM
    handler is already installed, or when another wakeup fd is set (an event loop's, say).
    """

    def __init__(self, stop: Callable[[], bool | None]) -> None:
        self._stop = stop
        self._installed = False
        self._ending = threading.Lock()
        self._read_fd = self._write_fd = -1
        self._thread: threading.Thread | None = None
        self._checking = False
        self._taken = False  # a SIGTERM that another handler took

    def __enter__(self) -> SignalWatch:
        if threading.current_thread() is not threading.main_thread():
            return self
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            return self
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        previous = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        if previous != -1:
            signal.set_wakeup_fd(previous)
            self._close()
            return self
        signal.signal(signal.SIGTERM, self._handler)
        self._installed = True
        self._thread = threading.Thread(target=self._run, name="lightning-ddg-signal-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        if not self._installed:
            return
        if kind is None and self._taken:
            # the handler that took the SIGTERM (Lightning's, in training) found no step left to stop after: the
            # run ended as usual, and the job stops now
            self._end(signal.SIGTERM, " as the run ended")
        if self._owns_sigterm():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        self._installed = False
        os.write(self._write_fd, b"\0")  # wakes the thread, which then leaves
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._close()

    def _close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1

    def _owns_sigterm(self) -> bool:
        return signal.getsignal(signal.SIGTERM) == self._handler  # a bound method: equal, not the same object

    def _handler(self, signum: int, frame: object) -> None:
        # runs in the main thread when it runs Python; chained behind a later handler (Lightning's, during
        # training), it leaves the signal to that one
        if self._owns_sigterm():
            self._end(signum)

    def _run(self) -> None:
        while True:
            try:
                received = os.read(self._read_fd, 64)
            except OSError:
                return
            if not received or b"\0" in received:
                return
            if signal.SIGTERM not in received:
                continue
            if self._owns_sigterm():
                self._end(signal.SIGTERM)
                continue
            self._taken = True
            if not self._checking:
                self._checking = True
                threading.Thread(target=self._end_if_stuck, name="lightning-ddg-stuck-watch", daemon=True).start()

    def _end_if_stuck(self) -> None:
        """After a SIGTERM another handler took: end the job if the main thread stays in one place too long."""
        main = threading.main_thread()
        last, since = None, time.monotonic()
        while main.is_alive() and self._installed:
            frame = sys._current_frames().get(main.ident or -1)
            where = (id(frame), frame.f_lasti) if frame is not None else None
            now = time.monotonic()
            if where != last:
                last, since = where, now
            elif now - since > STUCK_S:
                place = f" (in {frame.f_code.co_name}, {frame.f_code.co_filename}:{frame.f_lineno})" if frame else ""
                self._end(signal.SIGTERM, f"; the main thread has not moved for {STUCK_S:.0f} s{place}")
            time.sleep(POLL_S)

    def _end(self, signum: int, why: str = "") -> None:
        if not self._ending.acquire(blocking=False):
            return
        name = signal.Signals(signum).name
        said = False
        try:
            said = bool(self._stop())
        finally:
            if not said:
                print(f"lightning-ddg: {name} received{why}; stopping the job.", file=sys.stderr, flush=True)
            os._exit(128 + signum)


def _set_parent_death_signal(signum: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, signum)`` on Linux; nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signum, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_processes(processes: list, grace: float = 10.0, signum: int = signal.SIGTERM) -> None:
    """``signum`` to each process still running, SIGKILL to those still running ``grace`` seconds later.

    ``processes`` are ``subprocess.Popen`` or ``multiprocessing.Process`` objects.
    """
    running = [p for p in processes if _running(p)]
    for process in running:
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [p for p in running if _running(p)]
    for process in running:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _running(process: object) -> bool:
    poll = getattr(process, "poll", None)
    if poll is not None:
        return poll() is None
    return process.is_alive()  # type: ignore[attr-defined]
