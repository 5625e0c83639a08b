"""The rendezvous of a job's processes, with a timeout of its own and an error that names who did not arrive.

``torch.distributed.init_process_group`` waits for every rank as long as the timeout of every later collective
(30 minutes by default), and then says only that it timed out. Here the processes meet first in the job's
key-value store (a TCPStore served by global rank 0, at ``MASTER_ADDR:MASTER_PORT``): each one writes that it has
arrived, and each one waits, in Python (so that signals are handled at once), until all have, for at most
``timeout`` seconds. Then the process group is created on that store, which no longer waits for anyone.

Example::

    store = rendezvous("127.0.0.1", 29500, rank, world_size, timeout=180.0, describe=lambda r: f"rank {r}")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from datetime import timedelta

import torch.distributed as dist

__all__ = ["RendezvousTimeout", "init_process_group", "needs_rendezvous", "rendezvous"]

log = logging.getLogger(__name__)

_POLL_S = 0.05
_ARRIVED = "lightning_ddg/rendezvous/arrived/"


class RendezvousTimeout(RuntimeError):
    """Some processes of the job did not reach the rendezvous in time."""


def rendezvous(
    address: str,
    port: int,
    rank: int,
    world_size: int,
    timeout: float,
    describe: Callable[[int], str] = lambda r: f"rank {r}",
    store_timeout: timedelta = timedelta(minutes=30),
    exit_codes: Callable[[], Mapping[int, int | None]] = dict,
) -> dist.TCPStore:
    """Meet every process of the job in the store served by rank 0 (``address:port``); return this process's
    client (or server, on rank 0) of that store.

    Args:
        timeout: seconds to wait for every process to arrive.
        describe: names a rank in messages.
        store_timeout: the store's own timeout, for the process group's later waits on it.
        exit_codes: the launched processes' exit codes by rank (``None`` while running), to say which ones have
            already exited when the time is up.

    Raises:
        RendezvousTimeout: naming the ranks that did not arrive, or rank 0's store that cannot be reached.
    """
    start = time.monotonic()
    deadline = start + timeout
    log.info("rendezvous: %s waits for %d processes at %s:%d", describe(rank), world_size, address, port)
    if rank == 0:
        store = dist.TCPStore(address, port, world_size, is_master=True, timeout=store_timeout, wait_for_workers=False)
    else:
        _wait_until_listening(address, port, deadline, timeout, describe, rank)
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=store_timeout)
    store.set(f"{_ARRIVED}{rank}", f"{socket.gethostname()} {os.getpid()}")
    others = [r for r in range(world_size) if r != rank]
    while True:
        missing = [r for r in others if not store.check([f"{_ARRIVED}{r}"])]
        if not missing:
            log.info("rendezvous: all %d processes arrived after %.1f s", world_size, time.monotonic() - start)
            return store
        if time.monotonic() > deadline:
            log.error("rendezvous: %s still missing after %.0f s", [describe(r) for r in missing], timeout)
            raise RendezvousTimeout(_missing_message(missing, describe, rank, timeout, address, port, exit_codes()))
        time.sleep(_POLL_S)


def _wait_until_listening(
    address: str, port: int, deadline: float, timeout: float, describe: Callable[[int], str], rank: int
) -> None:
    """Wait, quietly (TCPStore logs every failed attempt), until rank 0's store accepts connections."""
    while True:
        try:
            with socket.create_connection((address, port), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() > deadline:
                raise RendezvousTimeout(
                    f"{describe(rank)} could not reach the job's store at {address}:{port}, served by {describe(0)}, "
                    f"within {timeout:.0f} s ({err}). {describe(0)} may have failed before the rendezvous (look "
                    "for its error), still be starting (slow imports), or be unreachable at that address "
                    "(MASTER_ADDR, MASTER_PORT, a firewall). Raise DDGStrategy(rendezvous_timeout=...) if starting "
                    "takes longer."
                ) from None
            time.sleep(_POLL_S * 4)


def _missing_message(
    missing: list[int],
    describe: Callable[[int], str],
    rank: int,
    timeout: float,
    address: str,
    port: int,
    exit_codes: Mapping[int, int | None],
) -> str:
    names = ", ".join(describe(r) for r in missing)
    exited = [f"{describe(r)} exited with code {exit_codes[r]}" for r in missing if exit_codes.get(r) is not None]
    why = (
        "; ".join(exited) + " (its error is above)."
        if exited
        else "Such a process may have failed before the rendezvous (look for its error), still be starting (slow "
        f"imports, a busy machine), not have been started (check the number of nodes and devices on every node), "
        f"or be unable to reach {address}:{port} (MASTER_ADDR, MASTER_PORT, a firewall)."
    )
    return (
        f"{names} did not arrive at the rendezvous within {timeout:.0f} s, seen from {describe(rank)}. {why} "
        "Raise DDGStrategy(rendezvous_timeout=...) if starting takes longer."
    )


def needs_rendezvous(world_size: int) -> bool:
    """Whether the job's processes meet here before their process group exists. Not with one process, nor in a
    later fit (the group exists), nor under torchrun's agent, which serves the store and has met them already."""
    initialized = dist.is_available() and dist.is_initialized()
    return world_size > 1 and not initialized and not os.environ.get("TORCHELASTIC_USE_AGENT_STORE")


def init_process_group(
    backend: str,
    address: str,
    port: int,
    rank: int,
    world_size: int,
    *,
    rendezvous_timeout: timedelta,
    timeout: timedelta,
    describe: Callable[[int], str] = lambda r: f"rank {r}",
    children: Mapping[int, subprocess.Popen] | None = None,
) -> None:
    """The default process group, created on the store of a :func:`rendezvous` (which waits at most
    ``rendezvous_timeout``); ``timeout`` bounds every later collective. ``children``: the processes this one
    launched, by rank, whose exits the rendezvous error names."""
    children = dict(children or {})
    store = rendezvous(
        address,
        port,
        rank,
        world_size,
        timeout=rendezvous_timeout.total_seconds(),
        describe=describe,
        store_timeout=timeout,
        exit_codes=lambda: {r: proc.poll() for r, proc in children.items()},
    )
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
