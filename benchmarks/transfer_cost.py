"""What one point-to-point transfer costs: two processes joined by gloo, one thread each, exchanging tensors the way
two stages' channels do (``isend`` on one side, ``irecv`` on the other, each waited on), for a channel's header
(2 KiB) and for payloads of 256 KiB and 1 MiB. For each: what posting the call costs the calling thread, and the CPU
time the process spends per transfer in all its threads (gloo's included), which is what a transfer takes from a
stage's compute on a machine whose cores are all busy. ``docs/performance.md`` ("Communication") counts these per
step: one transfer for a message's header and one per tensor. Then the same per message of one tensor, sent on a
stage's :class:`~lightning_ddg.comm.Channel` over gloo and through shared memory (``lightning_ddg.shared_memory``:
the tensors in memory both processes map, the header through a pipe), and of a header alone, next to what the
spacing of the messages costs alone.

    python benchmarks/transfer_cost.py            # a few seconds; prints microseconds per transfer
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TRANSFERS, WARM = 1000, 100
MESSAGES = 500
COMPUTE_S = 0.002  # between two messages of a channel
SIZES = {"header, 2 KiB": 256, "256 KiB": 2**16, "1 MiB": 2**18}  # in float32 / int64 elements of 4 or 8 bytes


def _run(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    call = "dist.isend" if rank == 0 else "dist.irecv"
    for name, numel in SIZES.items():
        tensor = torch.zeros(numel, dtype=torch.int64 if name.startswith("header") else torch.float32)
        posting = 0.0
        for i in range(WARM + TRANSFERS):
            if i == WARM:
                dist.barrier()
                cpu = time.process_time()
            start = time.perf_counter()
            work = dist.isend(tensor, 1) if rank == 0 else dist.irecv(tensor, 0)
            if i >= WARM:
                posting += time.perf_counter() - start
            work.wait()
        cpu = time.process_time() - cpu
        time.sleep(0.1 * rank)  # one line each
        print(
            f"{name:>14}, {call}: {1e6 * posting / TRANSFERS:5.0f} us to post, "
            f"{1e6 * cpu / TRANSFERS:5.0f} us of CPU time per transfer (every thread), over {TRANSFERS} transfers",
            flush=True,
        )
        dist.barrier()
    _spacing_alone(rank)
    for shared in (False, True):
        _channel_messages(rank, shared)
    dist.destroy_process_group()


def _spacing_alone(rank: int) -> None:
    """The CPU time of the sleeps that space a channel's messages, without the messages: waking up costs some."""
    dist.barrier()
    cpu = time.process_time()
    for _ in range(MESSAGES):
        time.sleep(COMPUTE_S)
    cpu = time.process_time() - cpu
    time.sleep(0.1 * rank)
    side = "sending" if rank == 0 else "receiving"
    print(f"{'':>14} the spacing alone, {side}: {1e6 * cpu / MESSAGES:5.0f} us of CPU time per message", flush=True)
    dist.barrier()


def _channel_messages(rank: int, shared: bool) -> None:
    """A stage's channel sending messages of one tensor, over gloo or through shared memory, as a stage does: each
    side sleeps a few milliseconds between messages in place of its compute, so that messages are waiting when
    they are received. The CPU time each side spends per message, in all its threads (the header's transfer
    included, and the spacing: see :func:`_spacing_alone`)."""
    from lightning_ddg.comm import Channel, share_memory

    channel = Channel(peer=1 - rank, group=dist.new_group([0, 1]))
    if shared:
        share_memory([channel], []) if rank == 0 else share_memory([], [channel])
    how = "through shared memory" if channel.shares_memory else "over gloo"
    for name, numel in SIZES.items():
        # a message of a number alone is its header alone; the others hold one tensor of that size
        message = [numel] if name.startswith("header") else [torch.ones(numel)]
        for i in range(WARM + MESSAGES):
            if i == WARM:
                dist.barrier()
                cpu = time.process_time()
            if rank == 0:
                channel.send(message)
            else:
                channel.release(channel.recv())
            time.sleep(COMPUTE_S)
        if rank == 0:
            channel.flush()
        cpu = time.process_time() - cpu
        time.sleep(0.1 * rank)
        side = "sending" if rank == 0 else "receiving"
        print(
            f"{name:>14} messages {how}, {side}: {1e6 * cpu / MESSAGES:5.0f} us of CPU time per message",
            flush=True,
        )
        dist.barrier()
    channel.send_end() if rank == 0 else channel.close_recv()
    channel.flush()
    channel.release_memory()


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 29533
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_run, args=(port,), nprocs=2)


if __name__ == "__main__":
    main()
