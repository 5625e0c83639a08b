"""What posting one point-to-point transfer costs the calling thread: two processes joined by gloo, one thread
each, exchanging small tensors the way two stages' channels do (``isend`` on one side, ``irecv`` on the other, each
waited on). This is the fixed part of a message's cost that ``docs/performance.md`` ("Communication") counts per
step: one transfer for a message's header and one per tensor.

    python benchmarks/transfer_cost.py            # a few seconds; prints microseconds per call
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TRANSFERS, WARM, NUMEL = 2000, 200, 256  # 256 int64: the size of a channel's header, 2 KiB


def _run(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tensor = torch.zeros(NUMEL, dtype=torch.int64)
    posting = 0.0
    for i in range(WARM + TRANSFERS):
        start = time.perf_counter()
        work = dist.isend(tensor, 1) if rank == 0 else dist.irecv(tensor, 0)
        if i >= WARM:
            posting += time.perf_counter() - start
        work.wait()
    call = "dist.isend" if rank == 0 else "dist.irecv"
    time.sleep(0.1 * rank)  # one line each
    per_call = 1e6 * posting / TRANSFERS
    print(f"{call}: {per_call:.1f} us to post, over {TRANSFERS} transfers of {8 * NUMEL} bytes", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 29533
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_run, args=(port,), nprocs=2)


if __name__ == "__main__":
    main()
