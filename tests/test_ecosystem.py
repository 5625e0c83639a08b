"""The ecosystem's models (Hugging Face, timm, torchvision, Lightning's demo) train balanced with plain
``Trainer(strategy="ddg", devices=K)``: one job per K fits them all (``tests/ecosystem_job.py``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.jobs import run_job

pytest.importorskip("transformers")
pytest.importorskip("timm")

from tests.ecosystem_job import ZOO  # noqa: E402

JOB_TIMEOUT_S = 540  # within pytest's limit, so that a job too slow fails with its output
IMBALANCE = 1.25  # the plan's slowest stage over the mean, at most


@pytest.mark.parametrize("devices", [2, 3])
def test_every_model_of_the_ecosystem_trains_balanced_with_no_options(devices: int) -> None:
    # each fit uses the plan it makes by default (timed); the balance is checked on the plan by FLOPs, which the
    # load of the machine does not change
    for name, report in _fit_the_zoo(devices).items():
        assert report["flops_imbalance"] <= IMBALANCE, (name, report)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 3])
def test_the_fits_own_timed_plans_are_balanced(devices: int) -> None:
    # timings are only as steady as the machine: run this one on a quiet machine
    for name, report in _fit_the_zoo(devices).items():
        assert report["balance_by"] == "time" and report["imbalance"] <= IMBALANCE, (name, report)


def _fit_the_zoo(devices: int) -> dict[str, dict[str, Any]]:
    job = run_job("tests/ecosystem_job.py", str(devices), *ZOO, timeout=JOB_TIMEOUT_S)
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
    for point in reports["hf_llama"]["split_points"] + reports["hf_llama"]["flops_split_points"]:
        assert point.startswith("model.model.layers.") and point.count(".") == 3, point
    # nn.Transformer with masks is cut between its layers
    assert all(".layers." in p for p in reports["lightning_demo_transformer"]["split_points"])
    return reports
