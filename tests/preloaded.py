"""Scripts started as if from a shell, by a process that has already imported torch, Lightning and lightning_ddg.

Most of a small job's start is its processes importing Lightning (several seconds of CPU each). A test that runs
many short jobs starts one :class:`Preloader`, a process that imports them once; each job's launching process is
then forked from it, as the stages of ``start_method="forkserver"`` are forked from a server that imported them,
and runs the script as ``python script.py args`` would (``__main__``, ``sys.argv``, a session of its own, its
output to a file). The processes the script launches (re-launched ranks, spawned stages, a forkserver) start
from scratch, as they would from a shell.

Example::

    with Preloader() as preloader:
        job = preloader.start(["tests/reliability_job.py", "--devices", "2"], tmp_path / "job")
        output = job.communicate(timeout=60)[0]
        assert job.returncode == 0

Between the server and each job is a waiter process, forked from the server, which forks the job's launching
process, waits for it and writes its exit status to a file: the server stays single-threaded, so that every
fork copies a process in which no other thread holds a lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from tests.jobs import REPO, job_environment

PRELOAD = ("torch", "lightning", "lightning_ddg")


class PreloadedJob:
    """A job's launching process, as much like ``subprocess.Popen`` as the tests need: ``pid``, ``poll``,
    ``returncode`` (negative: killed by that signal), ``communicate`` (stdout and stderr together)."""

    def __init__(self, args: list[str], directory: Path, timeout: float = 300.0) -> None:
        self.args = args
        self.directory = directory
        deadline = time.monotonic() + timeout
        pid_file = directory / "launcher.pid"
        while not pid_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the preloaded server did not start {args} within {timeout} s")
            time.sleep(0.01)
        self.pid = int(pid_file.read_text())
        self.returncode: int | None = None

    def poll(self) -> int | None:
        status = self.directory / "launcher.status"
        if self.returncode is None and status.exists():
            self.returncode = int(status.read_text())
        return self.returncode

    def output(self) -> str:
        return (self.directory / "output").read_text(errors="replace")

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0, self.output())
            time.sleep(0.02)
        return self.output(), None


class Preloader:
    """The server process (see the module); a context manager that ends it."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        # the jobs get this process's sys.path, with the script's directory first, as `python script.py` has it
        boot = f"import sys; path = sys.path[1:]; sys.path.insert(0, {str(REPO)!r}); import tests.preloaded as p; "
        self._server = subprocess.Popen(
            [sys.executable, "-c", boot + "p.serve(path)", *preload],
            cwd=REPO,
            env=job_environment(),
            stdin=subprocess.PIPE,
            text=True,
        )
        self._writing = threading.Lock()

    def start(self, args: list[str], directory: Path) -> PreloadedJob:
        """Run ``python *args`` from the repository root, its output to ``directory / "output"``."""
        directory.mkdir(parents=True, exist_ok=True)
        assert self._server.stdin is not None
        with self._writing:  # jobs may be started from several threads
            self._server.stdin.write(json.dumps({"args": args, "directory": str(directory)}) + "\n")
            self._server.stdin.flush()
        return PreloadedJob(args, directory)  # once the server has imported its modules (the first job waits)

    def close(self) -> None:
        """End the server (it holds nothing: the jobs and their waiters go on until they end)."""
        self._server.kill()
        self._server.wait()
        if self._server.stdin is not None:
            self._server.stdin.close()

    def __enter__(self) -> Preloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(path: list[str]) -> None:
    """The server: import the modules named on the command line, then start a job for each line of input."""
    import importlib

    environment = dict(os.environ)  # as the jobs get it, whatever the imports set
    for name in sys.argv[1:]:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters are reaped as they end
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0 and _waiter(Path(request["directory"])):
            _run(request["args"], Path(request["directory"]), environment, path)
            return  # the job's script has run: this process exits as the interpreter does


def _waiter(directory: Path) -> bool:
    """In the waiter: fork the job's launching process (True returned in it), wait for it, write its exit status;
    the waiter itself never returns."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            return True
        _write(directory / "launcher.pid", pid)
        _, status, usage = os.wait4(pid, 0)
        # the CPU time of the launching process and of the processes it waited for (reported by the tests)
        (directory / "launcher.cpu").write_text(f"{usage.ru_utime + usage.ru_stime:.2f}\n")
        _write(directory / "launcher.status", os.waitstatus_to_exitcode(status))
    except BaseException:
        traceback.print_exc()
    os._exit(0)


def _write(path: Path, value: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{value}\n")
    temporary.rename(path)


def _run(args: list[str], directory: Path, environment: dict[str, str], path: list[str]) -> None:
    """In the launching process: become ``python *args`` run from a shell in a session of its own. Exits."""
    import runpy

    os.setsid()
    output = os.open(directory / "output", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((0, null), (1, output), (2, output)):
        os.dup2(target, fd)
    os.close(null)
    os.close(output)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own, closed at its exit
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
    os.environ.clear()
    os.environ.update(environment)
    script = str(REPO / args[0])
    sys.argv = [script, *args[1:]]
    sys.path[:] = [os.path.dirname(script), *path]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        raise
    except KeyboardInterrupt:  # Python ends such a process with SIGINT; 130 is how a shell shows that
        traceback.print_exc()
        sys.exit(128 + signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
