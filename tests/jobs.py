"""Running a script as a user runs it: a fresh process in a session of its own, re-launching its ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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
