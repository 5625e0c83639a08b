"""Real projects' models split and train with plain ``strategy="ddg"`` on 2, 3 and 4 processes, no options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.zoo_job import ZOO

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 420
# a launcher in this test process may have left these behind; a child that saw them would not launch its ranks
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE")


def _run_job(devices: int) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("PL_")}
    job = subprocess.Popen(
        [sys.executable, "tests/zoo_job.py", str(devices)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # on timeout the whole group dies: the script and the ranks it launched
    )
    try:
        out, err = job.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        pytest.fail(f"the job did not finish in {JOB_TIMEOUT_S}s:\n{(out + err)[-4000:]}")
    return job.returncode, out, err


@pytest.mark.parametrize("devices", [2, 3, 4])
def test_every_model_of_the_zoo_trains_with_no_options(devices: int) -> None:
    returncode, out, err = _run_job(devices)
    output = out + err
    assert returncode == 0, output[-4000:]
    reports = {
        line.split()[1]: json.loads(line.split(maxsplit=2)[2]) for line in out.splitlines() if line[:4] == "zoo "
    }
    assert list(reports) == list(ZOO), output[-4000:]
    for name, report in reports.items():
        assert len(report["split_points"]) == devices - 1, name
        assert report["unchanged"] == [] and report["not_finite"] == [], (name, report)
    # the transformer is cut between the layers of its nn.TransformerEncoder
    assert any(p.startswith("net.encoder") for p in reports["transformer"]["split_points"])
    # the plan of every fit is shown as a table
    assert output.count(f"DDG plan: {devices} stages") == len(ZOO)
