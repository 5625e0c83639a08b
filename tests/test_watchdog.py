"""The watchdog's record of a failure, in one process (ending processes is tested in test_reliability.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_ddg.watchdog import Failure, Watchdog


def test_a_failure_survives_the_store_encoding() -> None:
    failure = Failure(3, "stage 0 (rank 3) failed with ValueError: a", "Traceback\n  line\nValueError: a", 41, "h")
    assert Failure.decode(failure.encode().encode()) == failure


def test_the_first_report_stands_and_names_the_stage() -> None:
    store = dist.HashStore()
    watchdog = Watchdog(store, rank=1, world_size=2, describe=lambda r: f"stage {1 - r} (rank {r})").start()
    assert watchdog.running
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB. More advice follows.")
    try:
        raise error
    except torch.OutOfMemoryError as caught:
        watchdog.report(caught)
    published = watchdog.published()
    assert published.rank == 1
    assert published.message == "stage 0 (rank 1) failed with OutOfMemoryError: CUDA out of memory"
    assert "raise error" in published.details  # the traceback travels with it
    assert error.__notes__[0] == "lightning-ddg: raised on stage 0 (rank 1); the other stages are stopped."
    assert "memory='recompute'" in error.__notes__[1]
    watchdog.stop()
    assert not watchdog.running
