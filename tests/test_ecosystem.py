"""The ecosystem's models (Hugging Face, timm, torchvision, Lightning's demo) train balanced with plain
``Trainer(strategy="ddg", devices=K)``: one job per K fits them all (``tests/ecosystem_job.py``)."""

from __future__ import annotations

import json

import pytest

from tests.jobs import run_job

pytest.importorskip("transformers")
pytest.importorskip("timm")

from tests.ecosystem_job import ZOO  # noqa: E402

JOB_TIMEOUT_S = 900
IMBALANCE = 1.25  # the plan's slowest stage over the mean, at most


# exporting a Hugging Face model takes seconds per rank, so the default run fits a decoder opened by torch.export
# and a transformer stack with masks (a tied GPT-2 is checked against the reference in test_tied.py)
DEFAULT_RUN = ["hf_llama", "lightning_demo_transformer"]


def test_the_ecosystem_s_kinds_of_model_train_balanced_with_no_options() -> None:
    _fit_the_zoo(2, DEFAULT_RUN)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 3])
def test_every_model_of_the_ecosystem_trains_balanced_with_no_options(devices: int) -> None:
    _fit_the_zoo(devices, list(ZOO))


def _fit_the_zoo(devices: int, names: list[str]) -> None:
    job = run_job("tests/ecosystem_job.py", str(devices), *names, timeout=JOB_TIMEOUT_S)
    out, output = job.stdout, job.stdout + job.stderr
    assert job.returncode == 0, output[-4000:]
    reports = {
        line.split()[1]: json.loads(line.split(maxsplit=2)[2]) for line in out.splitlines() if line[:10] == "ecosystem "
    }
    assert set(reports) == set(names), output[-4000:]
    for name, report in reports.items():
        if "skipped" in report:
            assert ZOO[name][2] == report["skipped"]
            continue
        assert len(report["split_points"]) == devices - 1, name
        # every parameter was updated, none is NaN, and the plan balanced the stages
        assert report["unchanged"] == [] and report["not_finite"] == [], (name, report)
        assert report["imbalance"] <= IMBALANCE, (name, report)
    # the decoder-only models are cut between their decoder layers, not inside one
    for point in reports["hf_llama"]["split_points"]:
        assert point.startswith("model.model.layers.") and point.count(".") == 3, point
    # nn.Transformer with masks is cut between its layers
    assert all(".layers." in p for p in reports["lightning_demo_transformer"]["split_points"])
