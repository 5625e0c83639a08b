"""Real projects' models split and train with plain ``strategy="ddg"`` on 2, 3 and 4 processes, no options."""

from __future__ import annotations

import json

import pytest

from tests.jobs import run_job
from tests.zoo_job import ZOO

JOB_TIMEOUT_S = 420


# one of each kind of model that the rest of the suite does not train: the default run (3 processes, every model cut
# twice); the whole zoo on 2, 3 and 4 processes with -m slow
DEFAULT = ["resnet50", "cifar_resnet56", "vgg", "transformer", "vit", "residual_span"]


@pytest.mark.parametrize(
    "devices, names",
    [
        pytest.param(3, DEFAULT, id="3-default"),
        *(pytest.param(k, list(ZOO), id=str(k), marks=pytest.mark.slow) for k in (2, 3, 4)),
    ],
)
def test_every_model_of_the_zoo_trains_with_no_options(devices: int, names: list[str]) -> None:
    job = run_job("tests/zoo_job.py", str(devices), *names, timeout=JOB_TIMEOUT_S)
    out, output = job.stdout, job.stdout + job.stderr
    assert job.returncode == 0, output[-4000:]
    reports = {
        line.split()[1]: json.loads(line.split(maxsplit=2)[2]) for line in out.splitlines() if line[:4] == "zoo "
    }
    assert list(reports) == names, output[-4000:]
    for name, report in reports.items():
        assert len(report["split_points"]) == devices - 1, name
        assert report["unchanged"] == [] and report["not_finite"] == [], (name, report)
    # the transformer is cut between the layers of its nn.TransformerEncoder
    assert any(p.startswith("net.encoder") for p in reports["transformer"]["split_points"])
    # the plan of every fit is shown as a table
    assert output.count(f"DDG plan: {devices} stages") == len(names)
