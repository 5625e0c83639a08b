"""Running a script as a user runs it: a fresh process in a session of its own, re-launching its ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


def run_ahead(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    runs: dict[str, Callable[..., Any]],
    at_once: int = 2,
) -> dict[str, Any]:
    """For every test of this module selected to run whose name is a key of ``runs``: ``runs[name](tmp_path,
    **its parameters)``, ``at_once`` at a time, before the first of these tests runs; their results (or what they
    raised) by test node id, for :func:`result_of`.

    A job spends most of its life in one process at a time (the launching process imports, then each rank it
    starts, then they wait for each other), so two jobs at once keep two cores busy where one job leaves one idle.
    The checks stay in the tests, each on its own job's result."""
    items = [i for i in request.session.items if i.module is request.module and i.originalname in runs]

    def run(item: pytest.Item) -> Any:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        try:
            return runs[item.originalname](tmp_path_factory.mktemp(item.originalname[:40]), **params)
        except BaseException as error:  # noqa: BLE001 - raised again in the test it belongs to
            return error

    with ThreadPoolExecutor(at_once) as pool:
        return dict(zip([i.nodeid for i in items], pool.map(run, items), strict=True))


def result_of(results: dict[str, Any], request: pytest.FixtureRequest) -> Any:
    """This test's result from :func:`run_ahead`, or what its run raised (a failed check, a timeout), raised here."""
    result = results[request.node.nodeid]
    if isinstance(result, BaseException):
        raise result
    return result
