"""Running one benchmark configuration in fresh CPU worker processes, one thread each, and collecting reports.

``launch(fn, world_size, cfg)`` starts ``world_size`` spawned processes, pins rank ``r`` to core ``r`` when
``cfg["pin"]``, joins them in a gloo process group, calls ``fn(rank, world_size, cfg)`` in each and returns
what every rank returned, by rank. A configuration that fails or hangs raises in the parent, and its
processes are killed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and (inherited) in the workers

import queue
import resource
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def peak_rss_mib() -> float:
    """The most resident memory this process has held so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def can_pin(world_size: int) -> bool:
    return hasattr(os, "sched_setaffinity") and world_size <= len(os.sched_getaffinity(0))


def _worker(rank: int, world_size: int, fn: Callable, cfg: dict, init_file: str, results: Any) -> None:
    torch.set_num_threads(1)
    try:
        if cfg.get("pin"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})  # gloo's threads inherit it
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        report = fn(rank, world_size, cfg)
        reports: list[Any] = [None] * world_size
        dist.all_gather_object(reports, report)
        dist.destroy_process_group()
        if rank == 0:
            results.put(("ok", reports))
    except BaseException:  # noqa: BLE001 - reported to the parent, which then kills the other ranks
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def launch(fn: Callable[[int, int, dict], Any], world_size: int, cfg: dict, timeout: float = 600) -> list[Any]:
    """Run ``fn`` in ``world_size`` fresh processes; return the per-rank results, sorted by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, fn, cfg, init_file, results)) for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    status, value = results.get(timeout=0.5)
                    break
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{world_size} process(es) took longer than {timeout}s") from None
                    if not any(p.is_alive() for p in procs) and results.empty():
                        raise RuntimeError("the worker processes died without a report") from None
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    if status != "ok":
        raise RuntimeError(value)
    return value
