"""Real projects' models split and train with plain ``strategy="ddg"`` on 2, 3 and 4 processes, no options."""

from __future__ import annotations

import json

import pytest

from tests.jobs import run_job
from tests.zoo_job import ZOO

JOB_TIMEOUT_S = 420


# the default run trains them on 3 processes, where every model is cut twice; 2 and 4 run with -m slow
@pytest.mark.parametrize(
    "devices", [pytest.param(2, marks=pytest.mark.slow), 3, pytest.param(4, marks=pytest.mark.slow)]
)
def test_every_model_of_the_zoo_trains_with_no_options(devices: int) -> None:
    job = run_job("tests/zoo_job.py", str(devices), timeout=JOB_TIMEOUT_S)
    out, output = job.stdout, job.stdout + job.stderr
    assert job.returncode == 0, output[-4000:]
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
