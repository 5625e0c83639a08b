"""Training throughput: plain backprop on one process versus DDG on K stages, one process per stage.

Run from the repository root::

    python benchmarks/throughput.py                 # backprop vs DDG K=2, stash memory
    python benchmarks/throughput.py --stages 2 3 --steps 300 --memory recompute

Every process is a CPU worker with exactly one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``),
pinned to a core of its own unless ``--no-pin`` (rank r on core r), so DDG on K stages uses K cores where
backprop uses one. All configurations train the same MLP (``--depth``
blocks of Linear(width, width) + ReLU and a linear head, in an ``nn.Sequential``, cut into stages of equal
parameter count) with SGD (momentum 0.9) on the same synthetic batches. Each process runs ``--warmup`` untimed
steps (which also fill the pipeline), meets the others at a barrier, and times ``--steps`` steps with
``time.perf_counter``; a configuration's throughput is the timed samples over the slowest rank's time. The
backprop baseline runs in the same invocation, before DDG. The table and a per-rank breakdown are printed
(milliseconds per step in forward, backward and optimizer step; ``wait`` is the part of forward and backward
spent receiving from a neighbour; ``cpu`` is the CPU time of the whole process, gloo's threads included), and
everything is written to ``--out`` as JSON.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and (inherited) in the spawned workers

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_ddg import Topology, build_stage
from lightning_ddg.comm import Channel
from lightning_ddg.planning import balanced_split_points

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import can_pin, launch  # noqa: E402

CLASSES = 10
Clock = defaultdict[str, float]


def make_model(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, CLASSES))


@contextmanager
def tick(clock: Clock, key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    clock[key] += time.perf_counter() - start


def time_receives(channel: Channel | None, clock: Clock) -> None:
    """Count the time ``channel.recv`` blocks as ``wait`` (patches this one instance)."""
    if channel is None:
        return
    recv = channel.recv

    def timed() -> list[torch.Tensor]:
        with tick(clock, "wait"):
            return recv()

    channel.recv = timed  # type: ignore[method-assign]


def make_trainer(
    rank: int, world_size: int, cfg: dict[str, Any], clock: Clock
) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], Callable[[], None]]:
    """A ``step(x, y)`` that trains on one batch and a ``finish()``: backprop if alone, else DDG stage."""
    model = make_model(cfg["width"], cfg["depth"])
    loss_fn = nn.CrossEntropyLoss()
    if world_size == 1:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def backprop_step(x: torch.Tensor, y: torch.Tensor) -> None:
            with tick(clock, "forward"):
                loss = loss_fn(model(x), y)
            with tick(clock, "backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with tick(clock, "step"):
                optimizer.step()

        return backprop_step, lambda: None

    split_points = balanced_split_points(model, world_size)
    built = build_stage(model, Topology(num_stages=world_size), rank, split_points=split_points, memory=cfg["memory"])
    stage, links = built.stage, built.links
    time_receives(links.act_in, clock)
    time_receives(links.grad_in, clock)
    optimizer = torch.optim.SGD(stage.parameters, lr=0.01, momentum=0.9)

    def optimizer_step() -> None:
        with tick(clock, "step"):
            stage.install_gradients()
            optimizer.step()

    def ddg_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with tick(clock, "forward"):
            out = stage.forward(x)
            loss = loss_fn(out, y) if stage.is_last else None
        with tick(clock, "backward"):
            due = stage.backward(loss)
        if due:
            optimizer_step()

    def finish() -> None:
        for ready in stage.drain():
            if ready:
                optimizer_step()
        links.close()

    return ddg_step, finish


def run_rank(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train on this rank: untimed warm-up steps, a barrier, then the timed steps; return the timings."""
    clock: Clock = defaultdict(float)
    step, finish = make_trainer(rank, world_size, cfg, clock)
    n, g = cfg["warmup"] + cfg["steps"], torch.Generator().manual_seed(1)
    xs = torch.randn(n, cfg["batch_size"], cfg["width"], generator=g)
    ys = torch.randint(0, CLASSES, (n, cfg["batch_size"]), generator=g)
    for i in range(cfg["warmup"]):
        step(xs[i], ys[i])
    dist.barrier()
    clock.clear()
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(cfg["warmup"], n):
        step(xs[i], ys[i])
    elapsed, clock["cpu"] = time.perf_counter() - start, time.process_time() - cpu_start
    finish()
    stage = Topology(world_size).stage_of(rank) if world_size > 1 else 0
    return {"rank": rank, "stage": stage, "elapsed_s": elapsed, **{f"{k}_s": v for k, v in clock.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2], help="DDG stage counts to measure")
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8, help="number of Linear(width, width)+ReLU blocks")
    parser.add_argument("--memory", choices=["stash", "recompute", "replay"], default="stash")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="let the OS place the processes")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per configuration")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = parser.parse_args()
    if min(args.stages) < 2 or args.warmup < max(args.stages) - 1:
        parser.error("--stages must be >= 2, and --warmup >= max(stages) - 1 so the pipeline is full when timed")
    cfg = {k: getattr(args, k) for k in ("steps", "warmup", "batch_size", "width", "depth", "memory", "pin")}
    cfg["pin"] = cfg["pin"] and can_pin(max(args.stages))
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the start: other work on this machine distorts the figures")

    runs = []
    for name, world_size in [("backprop", 1)] + [(f"ddg K={k} {args.memory}", k) for k in args.stages]:
        ranks = launch(run_rank, world_size, cfg, args.timeout)
        throughput = args.steps * args.batch_size / max(r["elapsed_s"] for r in ranks)
        runs.append({"name": name, "processes": world_size, "samples_per_s": throughput, "ranks": ranks})
    for run in runs:
        run["ratio"] = run["samples_per_s"] / runs[0]["samples_per_s"]

    params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
    print(
        f"MLP width {args.width} depth {args.depth} ({params / 1e6:.2f}M parameters), batch {args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup}, 1 thread per process"
        f"{', rank r pinned to core r' if cfg['pin'] else ''}, torch {torch.__version__}"
    )
    print(f"\n{'configuration':<22}{'processes':>10}{'samples/s':>12}{'ratio':>8}")
    for run in runs:
        print(f"{run['name']:<22}{run['processes']:>10}{run['samples_per_s']:>12.1f}{run['ratio']:>8.2f}")
    columns = {"total": "elapsed", "fwd": "forward", "bwd": "backward", "opt": "step", "wait": "wait", "cpu": "cpu"}
    print(f"\nms per step{'rank':>14}{'stage':>7}" + "".join(f"{c:>8}" for c in columns))
    for run in runs:
        for r in run["ranks"]:
            ms = [1e3 * r.get(f"{key}_s", 0.0) / args.steps for key in columns.values()]
            print(f"{run['name']:<22}{r['rank']:>3}{r['stage']:>7}" + "".join(f"{v:>8.2f}" for v in ms))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    environment = {"torch": torch.__version__, "python": platform.python_version(), "load_average_before": load}
    args.out.write_text(json.dumps({"config": cfg, "environment": environment, "runs": runs}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
