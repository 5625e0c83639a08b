"""Running a script as a user runs it: a fresh process in a session of its own, re-launching its ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# variables a launcher in this test process may have left behind; a child that saw LOCAL_RANK, say, would take
# itself for an already launched rank instead of launching the others
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE")


def job_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("PL_")}


def start_job(*command: str, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    """``python *command`` from the repository root; a session of its own, so that on timeout the whole
    process group dies: the script and the ranks it launched."""
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=REPO,
        env=job_environment(),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def finish_job(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The job's stdout and stderr once it has exited; after ``timeout`` seconds it is killed and the test fails."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"{' '.join(proc.args)} ran longer than {timeout} s:\n{(stdout or '')[-3000:]}\n{(stderr or '')[-3000:]}"
        )
    return stdout, stderr or ""


def run_job(*command: str, timeout: float) -> subprocess.CompletedProcess:
    proc = start_job(*command)
    stdout, stderr = finish_job(proc, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


class JobsAhead:
    """The jobs of the selected tests whose modules name them in a ``JOBS`` dict (test name to
    ``run(tmp_path, **the test's parameters)``), run ahead of those tests on the cores the running test leaves free.

    A job spends most of its life in one process at a time (the launching process imports, then each rank it
    starts, then they wait for each other), and a test that runs in the test process keeps about one core busy: so
    the jobs start in the order their tests will run, while the test that runs counts for one core, or for none
    when it only waits for its job, or for every core when it asks for them (``@pytest.mark.cores(2)``). The checks
    stay in the tests, each on its own job's result (:func:`result_of`)."""

    def __init__(self, cores: int = 2) -> None:
        self.cores = cores
        self._state = threading.Condition()
        self._running = 0  # jobs started and not finished
        self._started = 0  # jobs started so far: the next to start is the one submitted as number _started
        self._foreground = 1  # cores the running test counts for
        self._pool = ThreadPoolExecutor(cores)
        self._results: dict[str, Future] = {}
        self._closed = False

    def submit(self, nodeid: str, run: Callable[[], Any]) -> None:
        self._results[nodeid] = self._pool.submit(self._run, len(self._results), run)

    def _run(self, number: int, run: Callable[[], Any]) -> Any:
        # in the order submitted: a worker that has just finished a job would otherwise take the next one before the
        # other worker, which has waited longer with an earlier job, wakes up
        def may_start() -> bool:
            return self._started == number and self._running + self._foreground < self.cores

        with self._state:
            self._state.wait_for(lambda: self._closed or may_start())
            if self._closed:  # the session ended before this job's test ran
                return None
            self._running += 1
            self._started += 1
            self._state.notify_all()
        try:
            return run()
        except BaseException as error:  # noqa: BLE001 - raised again in the test it belongs to
            return error
        finally:
            with self._state:
                self._running -= 1
                self._state.notify_all()

    def foreground(self, cores: int) -> None:
        """The test about to run counts for ``cores``; with every core, it waits until the running jobs are done."""
        with self._state:
            self._foreground = cores
            self._state.notify_all()
            if cores >= self.cores:
                self._state.wait_for(lambda: self._running == 0)

    def result(self, nodeid: str) -> Any:
        return self._results[nodeid].result()

    def close(self) -> None:
        """At the end of the session: no more jobs start; those running finish (each within its own timeout)."""
        with self._state:
            self._closed = True
            self._state.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)


def run_later(
    run: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory, item: pytest.Item
) -> Callable[[], Any]:
    """``run(a fresh tmp_path, **item's parameters)``, to call later."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    return lambda: run(tmp_path_factory.mktemp(item.originalname[:40]), **params)


def result_of(jobs: JobsAhead, request: pytest.FixtureRequest) -> Any:
    """This test's job's result (:class:`JobsAhead`), or what its run raised (a failed check, a timeout), raised
    here."""
    result = jobs.result(request.node.nodeid)
    if isinstance(result, BaseException):
        raise result
    return result
