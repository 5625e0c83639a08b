"""The ecosystem's models (Hugging Face, timm, torchvision, Lightning's demo) train balanced with plain
``Trainer(strategy="ddg", devices=K)``: one job per K fits them all (``tests/ecosystem_job.py``). The default
run fits them at K=2; ``-m slow`` (which CI runs) at K=3 too, where every model has a stage between two cuts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.jobs import result_of, run_job

pytest.importorskip("transformers")
pytest.importorskip("timm")

from tests.ecosystem_job import ZOO  # noqa: E402

JOB_TIMEOUT_S = 540  # within pytest's limit, so that a job too slow fails with its output
IMBALANCE = 1.25  # the plan's slowest stage over the mean, at most


@pytest.mark.timeout(2 * JOB_TIMEOUT_S)  # the test waits for its job (tests/jobs.py)
@pytest.mark.parametrize("devices", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_every_model_of_the_ecosystem_trains_balanced_with_no_options(jobs, request, devices: int) -> None:
    # under Trainer(deterministic=True) the fit's own plan balances by FLOPs, which the load of the machine does not
    # change
    for name, report in result_of(jobs, request).items():
        assert report["balance_by"] == "flops" and report["imbalance"] <= IMBALANCE, (name, report)


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S)
@pytest.mark.parametrize("devices", [2, 3])
def test_the_fits_own_timed_plans_are_balanced(jobs, request, devices: int) -> None:
    # the plan the strategy makes by default, by time: only as steady as the machine, run it on a quiet one
    for name, report in result_of(jobs, request).items():
        assert report["balance_by"] == "time" and report["imbalance"] <= IMBALANCE, (name, report)


def _fit_the_zoo(tmp_path: Path, devices: int, timed: bool = False) -> dict[str, dict[str, Any]]:
    job = run_job("tests/ecosystem_job.py", str(devices), *(["--timed"] if timed else []), *ZOO, timeout=JOB_TIMEOUT_S)
    out, output = job.stdout, job.stdout + job.stderr
    assert job.returncode == 0, output[-4000:]
    reports = {
        line.split()[1]: json.loads(line.split(maxsplit=2)[2]) for line in out.splitlines() if line[:10] == "ecosystem "
    }
    assert set(reports) == set(ZOO), output[-4000:]
    for name, report in reports.items():
        assert "skipped" not in report, (name, report)
        assert len(report["split_points"]) == devices - 1, name
        # every parameter was updated, none is NaN
        assert report["unchanged"] == [] and report["not_finite"] == [], (name, report)
    # the decoder-only models are cut between their decoder layers, not inside one
    for point in reports["hf_llama"]["split_points"]:
        assert point.startswith("model.model.layers.") and point.count(".") == 3, point
    # nn.Transformer with masks is cut between its layers
    assert all(".layers." in p for p in reports["lightning_demo_transformer"]["split_points"])
    return reports


JOBS = {  # each test's job, run ahead (tests/jobs.py); each test checks its own
    "test_every_model_of_the_ecosystem_trains_balanced_with_no_options": _fit_the_zoo,
    "test_the_fits_own_timed_plans_are_balanced": lambda tmp_path, devices: _fit_the_zoo(tmp_path, devices, True),
}
