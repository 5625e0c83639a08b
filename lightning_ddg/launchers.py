"""Lightning's launchers, made to end a DDG job cleanly when a stage fails.

``DDGScriptLauncher`` (``strategy="ddg"``) re-launches the script once per other rank, as Lightning's does. Its
watch over the launched processes — a launched process that exits with an error takes the job down — pauses
while the stages' watchdogs run (``watchdog.py``): they end the job more gently, letting the failing process
finish printing its error. The launched processes serve every later fit of the script, and so does the watch.

``DDGSpawnLauncher`` (``strategy="ddg_spawn"``) starts the processes with multiprocessing, and differs from
Lightning's in two ways:

- Lightning tells the strategy about an exception (``Strategy.on_exception``) only in the launching process. A
  stage that fails in a started process reports it here, so that its watchdog can stop the other stages.
- Ctrl-C in the launching process stops the stages: they get SIGINT, and SIGKILL if they have not exited
  after a grace period (Lightning would otherwise wait for them to finish training); a process still starting,
  which has nothing to stop, is killed at once rather than interrupted in the middle of its imports.
- A stage killed by a signal (SIGKILL, the out-of-memory killer) ends the job with one line, not a
  ``ProcessExitedException`` traceback; none if a stage's watchdog has already said it. The launching process
  sees such a death at once (the process's sentinel), and during a run it tells the other stages of the host
  through memory they share with it (:func:`stage_killed_watch`): their watchdogs end the job within a beat,
  rather than once the killed stage's heartbeat has been missing for 10 s.
- When the stages stopped together because the job was asked to (a SIGTERM; they exit with ``128 + signal``),
  the launching process ends the same way, without a traceback, and saves no checkpoint of its own: it trained
  nothing, and the stages have saved theirs.

Both watch the job over its whole life (``lifeline.py``): a launched process ends when the launching process has
gone, whatever it is doing, and a SIGTERM to the launching process outside training stops the job at once.

Example::

    launcher = DDGSpawnLauncher(strategy, start_method="spawn")
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch.multiprocessing.spawn import ProcessExitedException
from typing_extensions import override

from lightning_ddg._compat import (
    GlobalStateSnapshot,
    MultiProcessingLauncher,
    SubprocessScriptLauncher,
    disable_module_memory_sharing,
    interrupt_here,
    record_resumed_checkpoint,
    set_num_threads_if_needed,
)
from lightning_ddg.callbacks import check_callbacks
from lightning_ddg.lifeline import (
    SignalWatch,
    end_if_launcher_gone,
    launcher_claim,
    naming_this_launcher,
    proc_stat,
    stop_processes,
    watch_launcher,
)
from lightning_ddg.watchdog import exit_text

__all__ = [
    "DDGScriptLauncher",
    "DDGSpawnLauncher",
    "launched_processes",
    "launched_ranks",
    "pause_observer",
    "run_ended",
    "stage_killed_watch",
]

log = logging.getLogger(__name__)

INTERRUPT_GRACE_S = 10.0
# how long a launching process that ends waits for the ranks it launched, which run the same script to its end
EXIT_GRACE_S = 10.0

_STOPPED_TOGETHER = 2  # in DDGSpawnLauncher._started: the stage stopped after the same step as the others
_observer: ChildObserver | None = None  # this process's watch over the ranks it launched, if it launched any
_ended: tuple[Any, int] | None = None  # in a process DDGSpawnLauncher started: where to mark that its run ended
_killed: tuple[Any, int] | None = None  # in a process DDGSpawnLauncher started: where its launcher says a stage died,
# and the global rank of the host's first process


def launched_processes() -> list[subprocess.Popen]:
    """The ranks this process launched with ``strategy="ddg"`` (none in a launched rank), in rank order."""
    return list(_observer.children) if _observer is not None else []


def launched_ranks(first_rank: int) -> dict[int, subprocess.Popen]:
    """The ranks this process launched, by global rank: the first of them is ``first_rank``."""
    return {first_rank + i: proc for i, proc in enumerate(launched_processes())}


def pause_observer(paused: bool) -> None:
    """Pause the watch over the launched ranks while a watchdog runs, and resume it after."""
    if _observer is not None:
        _observer.paused = paused


def run_ended() -> None:
    """This process's run (a fit, validate, test, predict) has ended on every stage, its watchdog stopped: the
    watch over the launched ranks resumes, and a launched process that dies from here on is reported as having
    died after the run, whose checkpoints are then complete (every save takes every stage)."""
    if _observer is not None:
        _observer.ended = True
        _observer.paused = False
    if _ended is not None:
        flags, index = _ended
        flags[index] = 1


def stage_killed_watch() -> Callable[[], tuple[int, int, int] | None] | None:
    """In a process ``DDGSpawnLauncher`` started: a function that returns the stage of this host that the launching
    process saw killed by a signal while its run was on, as (global rank, pid, exit code), or None (the watchdog
    asks it every beat). None in other processes."""
    if _killed is None:
        return None
    record, first = _killed

    def killed() -> tuple[int, int, int] | None:
        index, code, pid = record[:]
        return (first + index - 1, pid, code) if index else None

    return killed


def _died(name: str, pid: int, code: int, ended: bool) -> str:
    """The job's one line for a launched process that died."""
    after = " after the run had ended" if ended else ""
    return f"lightning-ddg: {name}, process {pid}, {exit_text(code)}{after}; stopping the job."


def check_relaunchable(argv: list[str], main: Any) -> None:
    """``strategy="ddg"`` starts every other rank by running this process's command again: a script file or a
    module (``python -m``), not code given with ``python -c`` or typed in an interpreter."""
    if getattr(main, "__spec__", None) is None and not os.path.isfile(argv[0] if argv else ""):
        raise MisconfigurationException(
            f"strategy='ddg' starts each other process by running this program again, but it was not started from a "
            f"script file (sys.argv[0] is {argv[0] if argv else ''!r}: `python -c` or an interactive interpreter). Run "
            "it as a script (python train.py) or a module (python -m package.train), or use strategy='ddg_spawn', "
            "which starts the processes from this one."
        )


class DDGScriptLauncher(SubprocessScriptLauncher):
    """Re-launches the script for every other rank; see the module's documentation.

    Args:
        describe: names a global rank in messages (``"stage 0 (rank 1)"``).
    """

    def __init__(self, *args: Any, describe: Callable[[int], str] = lambda rank: f"rank {rank}", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.describe = describe

    @override
    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        global _observer
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            check_relaunchable(sys.argv, sys.modules["__main__"])
            with naming_this_launcher():  # the launched ranks watch this process
                self._call_children_scripts()
            first = self.cluster_environment.node_rank() * self.num_processes + 1
            _observer = ChildObserver(self.procs, describe=lambda i: self.describe(first + i))
            _observer.start()
            atexit.register(_wait_for, _observer, EXIT_GRACE_S)
        set_num_threads_if_needed(num_processes=self.num_processes)
        _record_resume(trainer)
        log.info(
            "launch: %d processes per node on %d node(s), this one pid %d, %d started by it",
            self.num_processes,
            self.num_nodes,
            os.getpid(),
            len(launched_processes()),
        )
        if _observer is None:
            return function(*args, **kwargs)
        # after a run that ended: a launched rank that has died since is found here, not by the watch's next look
        if _observer.lost or (_observer.ended and _observer.say_died()):
            raise RuntimeError(
                "a launched process died after the last run (said above): the job cannot run again in this process, "
                "whose later fits run on the processes it launched for its first. Start the script again (with "
                "ckpt_path='last' and a ModelCheckpoint(save_last=True), it resumes from the last checkpoint)."
            )
        _observer.ended = False
        with SignalWatch(stop=lambda: stop_processes(launched_processes())):
            _observer.failed = True  # until the fit returns: the ranks are not waited for at exit
            result = function(*args, **kwargs)
            _observer.failed = False
            return result


class ChildObserver(threading.Thread):
    """Ends the job when a launched process exits with an error, unless ``paused`` (while a watchdog runs).

    During a run the launching process may be blocked in a collective with the process that died, so it kills
    itself too. After a run that ended (``ended``), it goes on (the script may have more to do here) and exits
    with code 1 at its end.
    """

    def __init__(
        self, children: list[subprocess.Popen], period: float = 1.0, describe: Callable[[int], str] = str
    ) -> None:
        super().__init__(daemon=True, name="lightning-ddg-child-observer")
        self.children = children
        self.period = period
        self.describe = describe  # names the i-th launched process
        self.paused = False
        self.failed = False  # the last fit raised: at exit, the launched ranks are not waited for
        self.ended = False  # the last run ended on every stage
        self.lost = ""  # the line said for a launched process that died
        self._saying = threading.Lock()

    def say_died(self) -> bool:
        """Say, once, that a launched process died (the first one found); whether one has."""
        with self._saying:
            if not self.lost:
                died = [(i, child) for i, child in enumerate(self.children) if child.poll()]
                if not died:
                    return False
                i, child = died[0]
                self.lost = _died(self.describe(i), child.pid, child.returncode, self.ended)
                print(self.lost, file=sys.stderr, flush=True)
            return True

    @override
    def run(self) -> None:
        while True:
            time.sleep(self.period)
            if self.paused:
                continue
            codes = [child.poll() for child in self.children]
            if all(code == 0 for code in codes):
                return
            ended = self.ended
            if self.say_died():
                for other in self.children:
                    if other.poll() is None:
                        other.kill()
                if not ended:
                    os.kill(os.getpid(), signal.SIGKILL)
                return


_REDUCTION = os.path.join("multiprocessing", "reduction.py")


def _raised_while_pickling(error: BaseException) -> bool:
    """Whether ``error`` came from pickling what a process is started with (multiprocessing's ``dump``)."""
    frames = [frame.f_code for frame, _ in traceback.walk_tb(error.__traceback__)]
    return any(code.co_name == "dump" and code.co_filename.endswith(_REDUCTION) for code in frames)


def _unpicklable(start_method: str, error: BaseException) -> str:
    return (
        f"the Trainer and the module cannot be sent to processes started with {start_method!r}: pickling them "
        f"failed with {type(error).__name__}: {error}. Use strategy='ddg' (start_method='popen'), which starts every "
        "process from your script, as strategy='ddp' does, so that nothing is pickled (a layer under torch's "
        "parametrizations, a lambda, an open file or connection cannot be)."
    )


class DDGSpawnLauncher(MultiProcessingLauncher):
    """Starts one process per stage with multiprocessing; see the module's documentation.

    With ``"forkserver"``, the server imports lightning_ddg (and so torch and Lightning) once, and every stage
    process forks from it ready to run: a fit starts in a fraction of the time ``"spawn"`` takes, and the stages
    share the imported modules' pages with the server (:mod:`lightning_ddg._server`). What a
    spawned process gets from this one, the environment variables (the rendezvous port, a W&B run's service)
    and Lightning's global state (random number generators, deterministic algorithms), travels with the
    launcher to the forked processes, which would otherwise see the server's, as it was when it started.
    """

    _global_states: GlobalStateSnapshot | None = None
    _started: Any = None
    _ended: Any = None
    _killed: Any = None
    _stopping = False
    _environment: dict[str, str] = {}

    @override
    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        if trainer is not None:  # here, before callbacks that cannot work are pickled for the processes
            check_callbacks(trainer, spawned=True)
        if self._start_method == "forkserver":
            if any(type(logger).__name__ == "WandbLogger" for logger in getattr(trainer, "loggers", [])):
                raise MisconfigurationException(
                    "a W&B run started in this process cannot be joined by processes forked from a server: with "
                    "WandbLogger, use DDGStrategy(start_method='spawn') (strategy='ddg_spawn') or strategy='ddg'."
                )
            multiprocessing.set_forkserver_preload(["__main__", "lightning_ddg", "lightning_ddg._server"])
            self._global_states = GlobalStateSnapshot.capture()
        # which processes have started to run the stage's code: pickled with this launcher, in shared memory
        context = multiprocessing.get_context(self._start_method)
        self._started = context.RawArray("b", self._strategy.num_processes)
        self._ended = context.RawArray("b", self._strategy.num_processes)  # which processes' runs ended (run_ended)
        # a stage killed by a signal during its run: 1 + its index, its exit code, its pid (stage_killed_watch)
        self._killed = context.RawArray("q", 3)
        # which of the processes left behind says that this one has gone: decided by a file named after it, named
        # now, while it runs (a process still starting when it is killed could no longer read its start time)
        self._claim = launcher_claim(os.getpid())
        self.procs = []  # set by the launch once the processes have started
        self._stopping = False  # this process stops the stages itself (a signal to it): their deaths are not news
        log.info("launch: %d processes started with %s", self._strategy.num_processes, self._start_method)
        launched = threading.Event()
        watch = threading.Thread(target=self._watch_stages, args=(launched,), name="lightning-ddg-stage-watch")
        watch.daemon = True
        watch.start()
        try:
            # a spawned stage watches this process from its first import: named here, in case it is gone by then
            naming = naming_this_launcher() if self._start_method == "spawn" else contextlib.nullcontext()
            with SignalWatch(stop=self._stop_stages), naming:
                return super().launch(function, *args, trainer=trainer, **kwargs)
        except KeyboardInterrupt:
            self._interrupt(getattr(self, "procs", []))
            raise
        except ProcessExitedException as exited:
            # the job has ended, and this process with it, but for the collection Python makes as it exits, which
            # walks every object torch and Lightning made: seconds on a busy machine, none once they are frozen
            gc.freeze()
            if exited.exit_code < 0:  # killed by a signal: it printed nothing, and its traceback would say nothing
                if any(p.exitcode == 1 for p in self.procs):
                    raise SystemExit(1) from None  # a stage's watchdog found it dead, and said so
                rank, ended = exited.error_index, bool(self._ended[exited.error_index])
                name = self._strategy.topology.describe(self._strategy.node_rank * self._strategy.num_processes + rank)
                print(_died(name, exited.error_pid, exited.exit_code, ended), file=sys.stderr, flush=True)
                raise SystemExit(1) from None
            if not 128 < exited.exit_code < 128 + signal.NSIG:
                raise
            self._strategy.stopped_elsewhere(exited.exit_code - 128)
            raise SIGTERMException(exited.exit_code) from None
        except Exception as error:
            if self.procs or not _raised_while_pickling(error):
                raise
            # nothing started: the trainer and module are pickled for the first process, and could not be
            raise MisconfigurationException(_unpicklable(self._start_method, error)) from error
        finally:
            launched.set()
            watch.join(timeout=5)

    def _watch_stages(self, launched: threading.Event) -> None:
        """Until the launch returns: when a stage is killed by a signal while its run is on, say so in ``_killed``,
        where the other stages' watchdogs look every beat (:func:`stage_killed_watch`). They would otherwise find out
        only once its heartbeat had been missing for 10 s: the launch's own answer, SIGTERM to every other stage,
        reaches processes that are training, which take it for a request to stop after the next step, and wait.

        The exit code is read once the launch's join has collected it (it reaps the process, or reads the code
        from the forkserver): reading it here too could take it from the join."""
        while not self.procs and not launched.wait(0.05):
            pass
        sentinels = {process.sentinel: (i, process) for i, process in enumerate(self.procs)}
        while sentinels and not launched.is_set():
            for sentinel in multiprocessing.connection.wait(list(sentinels), timeout=0.2):
                i, process = sentinels.pop(sentinel)
                deadline = time.monotonic() + 2.0
                while process._popen.returncode is None and time.monotonic() < deadline and not launched.is_set():
                    time.sleep(0.005)
                code = process._popen.returncode
                if code is not None and code < 0 and not self._ended[i] and not self._stopping:
                    self._killed[1], self._killed[2] = code, process.pid
                    self._killed[0] = i + 1  # last: a reader that sees the index sees the rest
                    return

    def _stop_stages(self) -> bool:
        """Stop the stages (SIGTERM, then SIGKILL); whether they said why: rank 0 marks in ``_started`` that every
        stage stopped after the same step, which it has printed."""
        self._stopping = True
        if not self.procs:
            self._kill_starting()
        stop_processes(self.procs)
        return self._started[0] == _STOPPED_TOGETHER

    def _interrupt(self, processes: list) -> None:
        """Ctrl-C: SIGINT to the stages, which stop as Lightning stops a run; a process still starting (importing
        the script) is killed instead, as it has nothing to stop and would print a traceback from its imports."""
        self._stopping = True
        if not processes:
            self._kill_starting()
            return
        starting = [p for i, p in enumerate(processes) if not self._started[i]]
        stop_processes(starting, 0.0, signal.SIGKILL)
        stop_processes([p for p in processes if p not in starting], INTERRUPT_GRACE_S, signal.SIGINT)

    def _kill_starting(self) -> None:
        """Stopped while the launch was starting the stages: none has got further than its imports, and each is
        killed. A forkserver may not have forked the last one asked for yet, whose pid is not known here but whose
        data, sent already, it would read once this process has gone: the server is stopped first, so that it forks
        no more, and then killed with every process it forked."""
        server = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
        if self._start_method == "forkserver" and server:
            _signal(server, signal.SIGSTOP)
            _wait_until_stopped(server)  # the signal takes effect once a fork under way has ended
            for pid in _forked_by(server):
                _signal(pid, signal.SIGKILL)
            _signal(server, signal.SIGKILL)
        stop_processes(multiprocessing.active_children(), 0.0, signal.SIGKILL)

    @override
    def get_extra_results(self, trainer: Any) -> dict[str, Any]:
        # the cut, which a later run of the module (a test after its fit) takes again instead of planning anew
        return super().get_extra_results(trainer) | {"ddg_plan": pickle.dumps(getattr(self._strategy, "plan", None))}

    @override
    def update_main_process_results(self, trainer: Any, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if "ddg_plan" in extra:
            self._strategy.plan = pickle.loads(extra["ddg_plan"])

    @override
    def __getstate__(self) -> dict[str, Any]:
        # pickled as each process starts, once the launch has set the rendezvous port
        return self.__dict__ | {"_environment": dict(os.environ)}

    @override
    def _wrapping_function(self, process_idx: int, trainer: Any, function: Any, args: Any, *rest: Any) -> None:
        global _ended, _killed
        watch_launcher(None, f"rank {process_idx}", self._claim)  # first: this process ends with the launching one
        self._started[process_idx] = 1
        _ended = self._ended, process_idx
        _killed = self._killed, self._strategy.node_rank * self._strategy.num_processes
        if self._global_states is not None:
            os.environ.clear()
            os.environ.update(self._environment)
            self._global_states.restore()
            # tensors passed to a forked process arrive in memory shared by every stage and with this process
            # (the replicas of a stage would step the same weights): each process gets its own copy
            args = disable_module_memory_sharing(args)
        _record_resume(trainer)
        try:
            super()._wrapping_function(process_idx, trainer, function, args, *rest)
            end_if_launcher_gone()  # the run ended as the launching process went: the job still says so, once
            # this process only exits now: Ctrl-C in the launching process (SIGINT to the stages) has nothing left to
            # stop here, and a KeyboardInterrupt raised in the interpreter's exit would print a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except SIGTERMException as stop:
            if getattr(self._strategy, "stopped_by", None) is not None:  # after a step
                self._started[process_idx] = _STOPPED_TOGETHER
            # the stages stopped together: Lightning runs on_exception callbacks only in the launching process, but
            # the trained state is here, and saving it (a checkpoint callback) needs every stage
            interrupt_here(trainer, stop)
            raise
        except BaseException as error:
            self._strategy.on_exception(error)
            raise


def _record_resume(trainer: Any) -> None:
    # in the process that runs the stage, before the Trainer resolves ckpt_path: the plan of a resumed fit reads the
    # stage times its checkpoint kept (cutting.cut_module)
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return
    strategy.resumed_from = None
    record_resumed_checkpoint(trainer, lambda path: setattr(strategy, "resumed_from", path))


def _forked_by(parent: int) -> list[int]:
    """The processes ``parent`` has forked and that still run (read from ``/proc``; none elsewhere)."""
    if not os.path.isdir("/proc"):
        return []
    children = []
    for entry in os.listdir("/proc"):
        fields = proc_stat(int(entry)) if entry.isdigit() else None
        if fields is not None and int(fields[1]) == parent:
            children.append(int(entry))
    return children


def _wait_until_stopped(pid: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = proc_stat(pid)
        if fields is None or fields[0] in "TtZX":  # stopped, or gone
            return
        time.sleep(0.001)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_for(observer: ChildObserver, grace: float) -> None:
    """At the launching process's exit after fits that went well: give the launched ranks, which end the same
    script, the time to end; if one of them died, say so (once) and exit with code 1."""
    if observer.failed:
        return  # they end by themselves once this process has gone (lifeline.py)
    deadline = time.monotonic() + grace
    for process in observer.children:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass  # they end by themselves once this process has gone (lifeline.py)
    if observer.say_died():
        sys.stdout.flush()
        os._exit(1)  # atexit cannot change the exit code otherwise
