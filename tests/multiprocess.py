"""Run a function in several real processes joined by a gloo process group, with a hard timeout."""

from __future__ import annotations

import io
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str | None, fn: Callable, args: tuple, queue: Any) -> None:
    torch.set_num_threads(1)
    try:
        if init_file is not None:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        if init_file is not None:
            dist.barrier()
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(result, buffer)  # tensors travel as bytes: the process may exit before they are read
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_processes(fn: Callable, world_size: int, *args: Any, timeout: float = 120, group: bool = True) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results by rank. ``group``:
    the processes are joined by a gloo process group before ``fn`` runs (else ``fn`` makes its own).

    Every process is killed after ``timeout`` seconds, so a hanging pipeline fails the test instead of CI.
    """
    # a fork server imports torch and lightning_ddg once; every process forks from it ready to run
    mp.set_forkserver_preload(["__main__", "lightning_ddg"])
    ctx = mp.get_context("forkserver")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init") if group else None
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size and time.monotonic() < deadline:
            if queue.empty():
                if not any(p.is_alive() for p in procs) and queue.empty():
                    break
                time.sleep(0.05)
                continue
            rank, ok, value = queue.get()
            if ok:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
        hung = set()
        for r, p in enumerate(procs):
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                hung.add(r)
                p.kill()
                p.join()
    # a rank that died (a signal, os._exit) or hung reports nothing itself
    reported = set(results) | {int(e.split()[1].rstrip(":")) for e in errors}
    silent = [
        f"rank {r}: no result, " + ("still running, killed" if r in hung else f"exit code {procs[r].exitcode}")
        for r in range(world_size)
        if r not in reported
    ]
    if errors:
        raise AssertionError("a process failed:\n" + "\n".join(errors + silent))
    if silent:
        raise AssertionError(f"processes timed out ({timeout} s) or died:\n" + "\n".join(silent))
    return [results[r] for r in range(world_size)]
