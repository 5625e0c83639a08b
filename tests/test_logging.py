"""The ``lightning_ddg`` logger: quiet by default, records at the lifecycle points when turned on."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

import pytest
from torch import nn

from lightning_ddg.local import LockStep
from lightning_ddg.rendezvous import rendezvous
from tests.models import batches, mlp, split_points_for


def test_records_of_the_stages_and_the_rendezvous(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lightning_ddg")
    model = mlp()
    pipeline = LockStep(model, split_points_for(model, 2))
    for x, y in batches(2):
        pipeline.step(x, lambda out, y=y: nn.functional.cross_entropy(out, y))
    pipeline.drain()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rendezvous("127.0.0.1", port, 0, 1, timeout=10.0, store_timeout=timedelta(seconds=10))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lightning_ddg")]
    assert "stage 0 of 2: first forward (delay 1, memory stash)" in messages
    assert "stage 1 of 2: first forward (delay 0, memory stash)" in messages
    assert "stage 0: draining 1 batch(es) in flight" in messages
    assert any(m.startswith("rendezvous: all 1 processes arrived") for m in messages)


def test_quiet_by_default() -> None:
    # a NullHandler keeps Python's last-resort handler from printing any record when the application configures
    # no logging; the records are at INFO and below, except failures
    logger = logging.getLogger("lightning_ddg")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert (
        logger.level == logging.NOTSET and not logger.isEnabledFor(logging.INFO) or logging.root.level <= logging.INFO
    )
