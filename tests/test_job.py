"""A process's place in the job (``job.py``) in real processes, without a Trainer: they meet, watch each other and
leave quietly (a failure ending the others is tested through the strategy in test_reliability.py)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment

from lightning_ddg.job import JobMember
from tests.multiprocess import run_processes
from tests.test_scale_out import _free_port


def _join_and_leave(rank: int, world_size: int, port: int) -> tuple[tuple[int, int], bool, bool, bool]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank))
    env = LightningEnvironment()
    member = JobMember()
    member.join(
        env, "gloo", rank, world_size, describe=lambda r: f"stage {r}", first_child_rank=world_size,
        watch_parent=False, rendezvous_timeout=timedelta(seconds=60),
    )  # fmt: skip
    met = (dist.get_rank(), dist.get_world_size())
    watched = member.watchdog is not None and member.watchdog.running
    watchdog = member.watchdog
    member.leave(None, stopped=False, stage_ran=True)
    stopped = watchdog is not None and not watchdog.running and member.watchdog is None
    dist.destroy_process_group()
    return met, watched, stopped, member.failed


def test_the_processes_of_a_job_meet_watch_each_other_and_leave_quietly() -> None:
    results = run_processes(_join_and_leave, 2, _free_port(), group=False, timeout=90)
    assert results == [((0, 2), True, True, False), ((1, 2), True, True, False)]
