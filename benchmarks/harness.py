"""Running one benchmark configuration in fresh CPU worker processes, one thread each, and collecting reports.

``launch(fn, world_size, cfg)`` starts ``world_size`` fresh processes, pins rank ``r`` to core ``r`` when
``cfg["pin"]``, joins them in a process group (gloo; NCCL with rank ``r`` on GPU ``r`` when
``cfg["device"] == "cuda"``), calls ``fn(rank, world_size, cfg)`` in each and returns what every rank
returned, by rank. A configuration that fails or hangs raises in the parent, and its processes are killed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and (inherited) in the workers

import ctypes
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
    """The most resident memory this process has held since :func:`reset_peak_memory` (or since it began)."""
    return _proc_status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> float:
    """Start counting the peak afresh; returns the memory held now (MiB), the base the peak is measured from.

    On the CPU, heap pages that imports used and freed stay resident, and a later allocation reuses them
    without the resident size growing: they are handed back to the system first (``malloc_trim``) and the
    resident high-water mark is reset (Linux's ``clear_refs``), so that the peak counts what the work needs.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass
    return _proc_status_mib("VmRSS") or peak_rss_mib()


def can_pin(world_size: int) -> bool:
    return hasattr(os, "sched_setaffinity") and world_size <= len(os.sched_getaffinity(0))


def device_of(rank: int, cfg: dict) -> torch.device:
    """Where rank ``rank`` computes: GPU ``rank`` for ``cfg["device"] == "cuda"``, else the CPU."""
    return torch.device("cuda", rank) if cfg.get("device") == "cuda" else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``, so that a clock reading after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """The most memory this process has held since :func:`reset_peak_memory`: on a GPU, allocated by torch; on
    the CPU, resident."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib()


def _worker(rank: int, world_size: int, fn: Callable, cfg: dict, init_file: str, results: Any) -> None:
    torch.set_num_threads(1)
    try:
        if cfg.get("pin"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})  # gloo's threads inherit it
        device = device_of(rank, cfg)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            device_id=device if cuda else None,
        )
        report = fn(rank, world_size, cfg)
        reports: list[Any] = [None] * world_size
        dist.all_gather_object(reports, report)
        dist.destroy_process_group()
        if rank == 0:
            results.put(("ok", reports))
    except BaseException:  # noqa: BLE001 - reported to the parent, which then kills the other ranks
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def _context(cfg: dict) -> Any:
    # Fresh processes, forked from a server that imported torch and the benchmark once: a configuration
    # starts in well under a second instead of the ~10 s a spawned interpreter takes to import everything.
    # Not for GPUs: importing may touch the CUDA driver, which a forked process can then not use.
    if cfg.get("device") == "cuda":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "torch", "lightning_ddg"])
    return ctx


def launch(fn: Callable[[int, int, dict], Any], world_size: int, cfg: dict, timeout: float = 600) -> list[Any]:
    """Run ``fn`` in ``world_size`` fresh processes; return the per-rank results, sorted by rank."""
    ctx = _context(cfg)
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
