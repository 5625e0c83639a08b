"""A real W&B run in offline mode, its history read back from the run file W&B writes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_ddg import DDGStrategy
from tests.lightning_models import MLPClassifier, cpu_trainer, loader

wandb = pytest.importorskip("wandb")


def _records(path: Path) -> Iterator[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header, then a LevelDB-style log in 32 KiB blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            yield b"".join(chunks)
            chunks = []


def _history(run_file: Path) -> list[dict[str, str]]:
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in _records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def _wait_for_history(run_file: Path, rows: int, timeout: float = 60) -> list[dict[str, str]]:
    """W&B's service writes the run file in the background, after the training process is gone."""
    deadline = time.monotonic() + timeout
    history = _history(run_file)
    while len(history) < rows and time.monotonic() < deadline:
        time.sleep(0.5)
        history = _history(run_file)
    return history


def test_wandb_offline_run_records_user_and_stage_metrics(tmp_path, monkeypatch) -> None:
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-ddg-tests")
    trainer = cpu_trainer(DDGStrategy(start_method="spawn"), 3, logger=logger, log_every_n_steps=3)
    trainer.fit(MLPClassifier(), loader(n=8 * 24), loader())
    # the figures reach the callbacks too, as the module's metrics do (for a monitor, a benchmark)
    assert {f"ddg/stage{k}/busy_ms" for k in range(3)} | {"train_loss"} <= set(trainer.callback_metrics)

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = _wait_for_history(run_file, rows=16 + 2)  # logged steps, validations
    logged = [row for row in history if "train_loss" in row]
    assert len(logged) == 16  # 2 epochs of 24 steps, logged every 3 steps
    assert sum("val_loss" in row for row in history) == 2
    # the stage figures are logged at steps where the user's metrics are: when Lightning logs, 20 batches apart at
    # least (the 21st and 45th batch), and at each epoch's end (the 24th and 48th); in rows of their own, as they
    # stay out of the module's logged results
    with_figures = [row for row in history if "ddg/stage0/busy_ms" in row]
    steps = [int(row["trainer/global_step"]) for row in with_figures]
    assert steps == [20, 23, 44, 47]
    assert set(steps) <= {int(row["trainer/global_step"]) for row in logged}
    for row in with_figures:
        for k in range(3):
            assert float(row[f"ddg/stage{k}/delay"]) == 2 - k
            for name in ("samples_per_s", "busy_ms", "activations_mb"):
                assert float(row[f"ddg/stage{k}/{name}"]) > 0
            for name in ("wait_ms", "send_ms", "update_ms", "load_ms", "other_ms"):
                assert float(row[f"ddg/stage{k}/{name}"]) >= 0
        # stage 1 holds a weight copy for its in-flight batch; the last stage holds none (and stage 0 none of its
        # first linear layer, whose input needs no gradient: perhaps none at all)
        assert float(row["ddg/stage1/stashed_weights_mb"]) > 0
        assert float(row["ddg/stage2/stashed_weights_mb"]) == 0


def test_wandb_with_processes_forked_from_a_server_is_refused_with_advice(tmp_path) -> None:
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    logger = WandbLogger(project="lightning-ddg-tests", save_dir=str(tmp_path), offline=True)
    trainer = cpu_trainer(DDGStrategy(start_method="forkserver"), 2, logger=logger)
    with pytest.raises(MisconfigurationException, match=r"with WandbLogger, use DDGStrategy\(start_method='spawn'\)"):
        trainer.fit(MLPClassifier(), loader())
