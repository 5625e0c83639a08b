"""A scheduler's signal stops every stage after the same step, with real processes: ``on_exception`` callbacks
save a whole checkpoint, SLURM's requeue signal saves ``hpc_ckpt``, the job exits non-zero and nothing is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.jobs import REPO, finish_job, result_of, start_job
from tests.test_reliability import LIMIT_S, _wait_until_gone
from tests.test_scale_out import _free_port

STOP_JOB = REPO / "tests" / "stop_job.py"
TIMEOUT_S = 240  # a job shares the cores with another (tests/jobs.py)
AHEAD_TIMEOUT_S = 3 * TIMEOUT_S + 60  # a test waits for its job, which may start after the module's others


def _stopped_steps(out: Path, devices: int) -> list[int]:
    """The step each stage process stopped at (not ddg_spawn's launching process, which trained nothing)."""
    pids = (out / "pids").read_text().split()
    steps = {int(f.name.split(".")[1]): int(f.read_text()) for f in out.glob("stopped.*") if f.suffix[1:] in pids}
    assert sorted(steps) == list(range(devices)), steps
    return list(steps.values())


def _check_stopped_alike(out: Path, output: str, returncode: int, devices: int, name: str = "SIGTERM") -> int:
    report = f"exit code {returncode}\n{output[-6000:]}"
    assert returncode != 0, report
    steps = _stopped_steps(out, devices)
    assert len(set(steps)) == 1, f"stages stopped at different steps {steps}\n{report}"
    line = f"lightning-ddg: stopped by {name} after step {steps[0]} on every stage"
    assert output.count(line) == 1, report
    assert "Traceback" not in output, report
    return steps[0]


def _check_checkpoint(path: Path, step: int) -> None:
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["global_step"] == step
    names = {f"net.{i}.{kind}" for i in (0, 2, 4) for kind in ("weight", "bias")}
    assert set(checkpoint["state_dict"]) == names  # every stage's weights, under their own names
    assert len(checkpoint["optimizer_states"][0]["state"]) in (0, len(names))


def _run(tmp_path: Path, *args: str) -> tuple[str, int]:
    """Run the stop job with ``args``; its output and exit code once every process of it has gone."""
    proc = start_job(str(STOP_JOB), str(tmp_path), *args, stderr=subprocess.STDOUT)
    output, _ = finish_job(proc, TIMEOUT_S)
    _wait_until_gone(_pids(tmp_path), within=LIMIT_S)
    return output, proc.returncode


def _pids(out: Path) -> list[int]:
    return [int(p) for name in ("launcher", "pids") for p in (out / name).read_text().split()]


def _stop_the_launcher(tmp_path: Path, strategy: str) -> tuple[str, int, float]:
    """Send SIGTERM to the launching process once every stage has started; also how long the job took to go."""
    proc = start_job(str(STOP_JOB), str(tmp_path), "--devices", "2", "--strategy", strategy, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S - 30  # a busy machine starts slowly
    while len(list(tmp_path.glob("started.*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    output, _ = finish_job(proc, TIMEOUT_S)
    _wait_until_gone(_pids(tmp_path), within=LIMIT_S)
    return output, proc.returncode, time.monotonic() - signalled_at


def _requeue(tmp_path: Path) -> tuple[str, list[int]]:
    """Two processes with the variables ``srun`` sets stand for a SLURM job with auto-requeue; stage 0 (rank 1)
    gets SIGUSR1, as ``sbatch --signal=USR1@90`` sends it before the time limit."""
    job = {
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    command = [sys.executable, str(STOP_JOB), str(tmp_path), "--devices", "2", "--signal", "SIGUSR1", "--rank", "1"]
    procs = []
    for rank in range(2):
        env = os.environ | job | {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0"}
        env = {k: v for k, v in env.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR")}
        output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, **output))
    outputs = [finish_job(proc, TIMEOUT_S)[0] for proc in procs]
    return "\n".join(outputs), [proc.returncode for proc in procs]


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
@pytest.mark.parametrize(
    ("strategy", "rank", "devices"),
    [
        pytest.param("ddg", 2, 3, id="first-stage-popen", marks=pytest.mark.slow),
        pytest.param("ddg", 1, 3, id="middle-stage-popen"),
        pytest.param("ddg_spawn", 0, 2, id="last-stage-spawn"),  # rank 0 runs the last stage
    ],
)
def test_sigterm_to_any_stage_stops_every_stage_after_the_same_step(
    jobs, request, strategy: str, rank: int, devices: int
) -> None:
    out, output, returncode = result_of(jobs, request)
    step = _check_stopped_alike(out, output, returncode, devices=devices)
    assert step >= 4
    _check_checkpoint(out / "on_exception.ckpt", step)


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
def test_sigterm_to_one_replica_stops_every_replica_after_the_same_step(jobs, request) -> None:
    out, output, returncode = result_of(jobs, request)
    _check_checkpoint(out / "on_exception.ckpt", _check_stopped_alike(out, output, returncode, 4))


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
@pytest.mark.parametrize("strategy", [pytest.param("ddg", marks=pytest.mark.slow), "ddg_spawn"])
def test_sigterm_to_the_launcher_stops_every_stage(jobs, request, strategy: str) -> None:
    out, output, returncode, seconds = result_of(jobs, request)
    assert seconds < LIMIT_S
    assert returncode == 128 + signal.SIGTERM
    _check_checkpoint(out / "on_exception.ckpt", _check_stopped_alike(out, output, returncode, 2))


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
def test_slurm_requeue_signal_saves_the_requeue_checkpoint_on_every_stage(jobs, request) -> None:
    out, output, returncodes = result_of(jobs, request)
    assert all(code == 128 + signal.SIGUSR1 for code in returncodes), output[-6000:]
    step = _check_stopped_alike(out, output, 1, devices=2, name="SIGUSR1")
    _check_checkpoint(out / "hpc_ckpt_1.ckpt", step)


JOBS = {  # each test's job, run ahead (tests/jobs.py); each test checks its own
    "test_sigterm_to_any_stage_stops_every_stage_after_the_same_step": lambda tmp, strategy, rank, devices: (
        tmp,
        *_run(tmp, "--devices", str(devices), "--strategy", strategy, "--rank", str(rank)),
    ),
    "test_sigterm_to_one_replica_stops_every_replica_after_the_same_step": lambda tmp: (
        tmp,
        *_run(tmp, "--devices", "4", "--num-stages", "2", "--rank", "3"),  # rank 3: stage 0 of replica 1
    ),
    "test_sigterm_to_the_launcher_stops_every_stage": lambda tmp, strategy: (
        tmp,
        *_stop_the_launcher(tmp, strategy),
    ),
    "test_slurm_requeue_signal_saves_the_requeue_checkpoint_on_every_stage": lambda tmp: (tmp, *_requeue(tmp)),
}
