"""The README's example, run as a user runs it: a real script in a fresh process, re-launched for every rank."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.jobs import REPO, result_of, run_job

EXAMPLE = REPO / "examples" / "digits_cnn.py"
TIMEOUT_S = 300
FINAL_LINE = re.compile(r"^final val_acc=(\d+(?:\.\d+)?)$")


def _run(*command: str) -> subprocess.CompletedProcess:
    return run_job(*command, timeout=TIMEOUT_S)


def _digits(tmp_path: Path, args: tuple[str, ...]) -> tuple[Path, subprocess.CompletedProcess]:
    # 3 epochs of 23 steps: about 0.87 validation accuracy with DDG on 2 stages and 0.9 with backpropagation
    # (chance is 0.1); one epoch reaches only about 0.5, too close to any threshold to be a robust check
    return tmp_path, _run(str(EXAMPLE), "--log-dir", str(tmp_path / "logs"), "--max-epochs", "3", *args)


def _cli(tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess]:
    trainer_args = ["--trainer.strategy", "ddg", "--trainer.devices", "2", "--trainer.max_epochs", "1"]
    trainer_args += ["--trainer.limit_train_batches", "8", "--trainer.limit_val_batches", "2"]
    script = str(EXAMPLE.with_name("digits_cli.py"))
    return tmp_path, _run(script, "fit", *trainer_args, "--trainer.default_root_dir", str(tmp_path))


def _causal_lm(tmp_path: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("transformers")  # skips the test that reads this run
    script = REPO / "examples" / "causal_lm.py"
    return _run(str(script), "--layers", "2", "--max-steps", "4", "--block", "32", "--devices", "2")


@pytest.mark.timeout(3 * TIMEOUT_S)
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("--strategy", "ddg", "--devices", "2"), id="ddg-2-stages"),
        pytest.param(("--strategy", "auto", "--devices", "1"), id="backprop-1-device", marks=pytest.mark.slow),
    ],
)
def test_digits_cnn_trains(jobs, request, args: tuple[str, ...]) -> None:
    tmp_path, result = result_of(jobs, request)
    assert result.returncode == 0, f"exit code {result.returncode}\nstderr:\n{result.stderr[-5000:]}"

    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    assert lines, f"nothing printed\nstderr:\n{result.stderr[-5000:]}"
    match = FINAL_LINE.match(lines[-1])
    assert match, f"the last line printed is {lines[-1]!r}, not 'final val_acc=...'"
    assert float(match.group(1)) > 0.7
    assert "predicted 359 digits" in lines  # trainer.predict returned every prediction to the script on rank 0

    metrics = list((tmp_path / "logs").rglob("metrics.csv"))
    assert len(metrics) == 1
    assert {"train_loss", "val_loss", "val_acc"} <= set(metrics[0].read_text().splitlines()[0].split(","))
    assert len(list((tmp_path / "logs").rglob("*.ckpt"))) == 1


@pytest.mark.timeout(3 * TIMEOUT_S)
def test_lightning_cli_takes_the_strategy_name(jobs, request) -> None:
    tmp_path, result = result_of(jobs, request)
    assert result.returncode == 0, f"exit code {result.returncode}\nstderr:\n{result.stderr[-5000:]}"
    assert len(list(tmp_path.rglob("*.ckpt"))) == 1


@pytest.mark.slow
def test_paper_comparison_runs_and_writes_its_table(tmp_path: Path) -> None:
    script = REPO / "examples" / "compare_bp_ddg.py"
    options = ["--depth", "8", "--max-epochs", "1", "--seeds", "0", "--stages", "2"]
    result = _run(str(script), *options, "--log-dir", str(tmp_path / "logs"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, f"exit code {result.returncode}\nstderr:\n{result.stderr[-5000:]}"
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| backprop |" in table and "| ddg K=2 |" in table
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


@pytest.mark.timeout(3 * TIMEOUT_S)
def test_causal_lm_fine_tunes_offline(jobs, request) -> None:
    result = result_of(jobs, request)
    assert result.returncode == 0, f"exit code {result.returncode}\nstderr:\n{result.stderr[-5000:]}"
    last = result.stdout.strip().splitlines()[-1]
    match = re.match(r"^final train_loss=(\d+\.\d+)$", last)
    assert match, f"the last line printed is {last!r}"
    assert float(match.group(1)) < 6.0  # ln(256) = 5.5 at the start: finite, and not diverging


JOBS = {  # each test's job, run ahead (tests/jobs.py); each test checks its own
    "test_digits_cnn_trains": _digits,
    "test_lightning_cli_takes_the_strategy_name": _cli,
    "test_causal_lm_fine_tunes_offline": _causal_lm,
}
