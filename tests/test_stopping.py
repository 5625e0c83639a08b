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

from tests.jobs import REPO, finish_job, start_job
from tests.test_reliability import LIMIT_S, _wait_until_gone
from tests.test_scale_out import _free_port

STOP_JOB = REPO / "tests" / "stop_job.py"
TIMEOUT_S = 150


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


@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize(
    ("strategy", "rank"),
    [
        pytest.param("ddg", 2, id="first-stage-popen", marks=pytest.mark.slow),
        pytest.param("ddg", 1, id="middle-stage-popen"),
        pytest.param("ddg_spawn", 0, id="last-stage-spawn"),
    ],
)
def test_sigterm_to_any_stage_stops_every_stage_after_the_same_step(tmp_path: Path, strategy: str, rank: int) -> None:
    args = (str(STOP_JOB), str(tmp_path), "--strategy", strategy, "--rank", str(rank))
    proc = start_job(*args, stderr=subprocess.STDOUT)
    output, _ = finish_job(proc, TIMEOUT_S)
    pids = [int(p) for name in ("launcher", "pids") for p in (tmp_path / name).read_text().split()]
    _wait_until_gone(pids, within=LIMIT_S)
    step = _check_stopped_alike(tmp_path, output, proc.returncode, devices=3)
    assert step >= 4
    _check_checkpoint(tmp_path / "on_exception.ckpt", step)


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_sigterm_to_one_replica_stops_every_replica_after_the_same_step(tmp_path: Path) -> None:
    # 2 stages x 2 replicas: rank 3 runs the first stage of replica 1
    args = (str(STOP_JOB), str(tmp_path), "--devices", "4", "--num-stages", "2", "--rank", "3")
    proc = start_job(*args, stderr=subprocess.STDOUT)
    output, _ = finish_job(proc, TIMEOUT_S)
    pids = [int(p) for name in ("launcher", "pids") for p in (tmp_path / name).read_text().split()]
    _wait_until_gone(pids, within=LIMIT_S)
    _check_checkpoint(tmp_path / "on_exception.ckpt", _check_stopped_alike(tmp_path, output, proc.returncode, 4))


@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("strategy", [pytest.param("ddg", marks=pytest.mark.slow), "ddg_spawn"])
def test_sigterm_to_the_launcher_stops_every_stage(tmp_path: Path, strategy: str) -> None:
    args = (str(STOP_JOB), str(tmp_path), "--devices", "2", "--strategy", strategy)
    proc = start_job(*args, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while len(list(tmp_path.glob("started.*"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    output, _ = finish_job(proc, TIMEOUT_S)
    pids = [int(p) for name in ("launcher", "pids") for p in (tmp_path / name).read_text().split()]
    _wait_until_gone(pids, within=LIMIT_S)
    assert time.monotonic() - signalled_at < LIMIT_S
    assert proc.returncode == 128 + signal.SIGTERM
    _check_checkpoint(tmp_path / "on_exception.ckpt", _check_stopped_alike(tmp_path, output, proc.returncode, 2))


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_slurm_requeue_signal_saves_the_requeue_checkpoint_on_every_stage(tmp_path: Path) -> None:
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
    output = "\n".join(outputs)
    assert all(proc.returncode == 128 + signal.SIGUSR1 for proc in procs), output[-6000:]
    step = _check_stopped_alike(tmp_path, output, 1, devices=2, name="SIGUSR1")
    _check_checkpoint(tmp_path / "hpc_ckpt_1.ckpt", step)
