"""Balancing by measured time against balancing by parameter count, on torchvision's ResNet-18.

Run from the repository root::

    python benchmarks/balance.py                    # ResNet-18, 32x32 images, batch 32, K=2
    python benchmarks/balance.py --stages 3 --steps 20

A pipeline runs at the speed of its slowest stage. ResNet-18 holds 75% of its parameters in ``layer4``, where
the images are smallest, so a split by parameter count gives the first stage most of the compute. The script
plans both splits with :func:`lightning_ddg.plan` (``balance_by="params"`` and ``"time"``), then for each:

- times every stage alone, forward + backward, in one process (the slowest stage bounds the pipeline);
- trains with the DDG runtime on K processes, one thread each, pinned to their own cores where possible, and
  measures samples/s over ``--steps`` steps after ``--warmup``, the fastest of ``--rounds`` trainings.

Backprop on one process, trained in each round too, is the baseline. Prints a table, writes JSON to ``--out``
and a PNG beside it.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and (inherited) in the spawned workers

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torchvision
from torch import nn

from lightning_ddg import Topology, build_stage, plan, split_module
from lightning_ddg.balance import run_segments, segment_times

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import can_pin, launch  # noqa: E402


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def batches(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n, size = cfg["warmup"] + cfg["steps"], cfg["image_size"]
    x = torch.randn(n, cfg["batch_size"], 3, size, size, generator=g)
    return x, torch.randint(0, 10, (n, cfg["batch_size"]), generator=g)


def train(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, float]:
    """Backprop when alone, else this rank's DDG stage; the seconds of the timed steps."""
    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    xs, ys = batches(cfg)
    if world_size == 1:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()

        finish = lambda: None  # noqa: E731
    else:
        built = build_stage(model, Topology(num_stages=world_size), rank, split_points=cfg["split_points"])
        stage, links = built.stage, built.links
        optimizer = torch.optim.SGD(stage.parameters, lr=0.01, momentum=0.9)

        def update() -> None:
            stage.install_gradients()
            optimizer.step()

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            out = stage.forward(x)
            if stage.backward(loss_fn(out, y) if stage.is_last else None):
                update()

        def finish() -> None:
            for ready in stage.drain():
                if ready:
                    update()
            links.close()

    for i in range(cfg["warmup"]):
        step(xs[i], ys[i])
    dist.barrier()
    start = time.perf_counter()
    for i in range(cfg["warmup"], len(xs)):
        step(xs[i], ys[i])
    elapsed = time.perf_counter() - start
    finish()
    return {"rank": rank, "elapsed_s": elapsed}


BY = ("params", "time")


def stage_times_ms(split_points: list[str], cfg: dict[str, Any]) -> list[float]:
    """Forward + backward of each stage alone, in this process: what the stage costs the pipeline per step."""
    model = make_model()
    stages = split_module(model, split_points).train
    x = batches(cfg)[0][0]
    inputs = run_segments(stages, [x], torch.device("cpu"))
    return [1000 * t for t in segment_times(stages, inputs, torch.device("cpu"), repeats=cfg["repeats"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs of each stage alone (the second fastest counts)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="trainings of each split; the fastest counts")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="let the OS place the processes")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/balance.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = {k: getattr(args, k) for k in ("steps", "warmup", "batch_size", "image_size", "repeats", "rounds", "pin")}
    cfg["pin"] = cfg["pin"] and can_pin(args.stages)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the start: other work on this machine distorts the figures")

    example = batches(cfg)[0][0]
    splits = {balance_by: plan(make_model(), example, args.stages, balance_by=balance_by) for balance_by in BY}
    # every training runs once per round and counts its fastest: a slow spell of the machine costs one run
    elapsed_by: dict[str, list[float]] = {name: [] for name in ("backprop", *BY)}
    for _ in range(args.rounds):
        elapsed_by["backprop"].append(launch(train, 1, cfg)[0]["elapsed_s"])
        for balance_by, split in splits.items():
            ranks = launch(train, args.stages, cfg | {"split_points": split.split_points})
            elapsed_by[balance_by].append(max(r["elapsed_s"] for r in ranks))
    baseline = min(elapsed_by["backprop"])
    runs = []
    for balance_by, split in splits.items():
        times = stage_times_ms(split.split_points, cfg)
        elapsed = min(elapsed_by[balance_by])
        runs.append(
            {
                "balance_by": balance_by,
                "split_points": split.split_points,
                "stage_ms": times,
                "slowest_stage_ms": max(times),
                "samples_per_s": args.steps * args.batch_size / elapsed,
                "samples_per_s_each_round": [args.steps * args.batch_size / e for e in elapsed_by[balance_by]],
                "speedup_over_backprop": baseline / elapsed,
                "plan": str(split),
            }
        )
    backprop = args.steps * args.batch_size / baseline
    by_params, by_time = runs
    print(
        f"ResNet-18, {args.image_size}x{args.image_size} images, batch {args.batch_size}, K={args.stages}, "
        f"{args.steps} timed steps after {args.warmup}, 1 thread per process"
        f"{', rank r pinned to core r' if cfg['pin'] else ''}, torch {torch.__version__}\n"
    )
    print(f"{'split':<10}{'split points':<36}{'stage ms (fwd+bwd)':<26}{'slowest':>9}{'samples/s':>11}{'x bp':>7}")
    print(f"{'backprop':<10}{'-':<36}{'-':<26}{'-':>9}{backprop:>11.1f}{1.0:>7.2f}")
    for run in runs:
        stage_ms = " / ".join(f"{t:.1f}" for t in run["stage_ms"])
        print(
            f"{run['balance_by']:<10}{', '.join(run['split_points']):<36}{stage_ms:<26}{run['slowest_stage_ms']:>9.1f}"
            f"{run['samples_per_s']:>11.1f}{run['speedup_over_backprop']:>7.2f}"
        )
    slowest = by_params["slowest_stage_ms"] / by_time["slowest_stage_ms"]
    faster = by_time["samples_per_s"] / by_params["samples_per_s"]
    print(f"\nby time over by params: slowest stage {slowest:.2f}x faster, throughput {faster:.2f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    environment = {"torch": torch.__version__, "python": platform.python_version(), "load_average_before": load}
    result = {"config": cfg | {"stages": args.stages}, "environment": environment, "backprop_samples_per_s": backprop}
    args.out.write_text(json.dumps(result | {"runs": runs}, indent=2) + "\n")
    plot(runs, backprop, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(runs: list[dict[str, Any]], backprop: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [f"by {run['balance_by']}" for run in runs]
    stages = len(runs[0]["stage_ms"])
    width = 0.8 / stages
    for k in range(stages):
        positions = [i + (k - (stages - 1) / 2) * width for i in range(len(runs))]
        left.bar(positions, [run["stage_ms"][k] for run in runs], width=width, label=f"stage {k}")
    left.set_xticks(range(len(runs)), names)
    left.set_ylabel("forward + backward (ms)")
    left.set_title("time per stage")
    left.legend()
    right.bar(["backprop", *names], [backprop, *[run["samples_per_s"] for run in runs]], color=["grey", "C1", "C2"])
    right.set_ylabel("samples/s")
    right.set_title("training throughput")
    fig.suptitle("ResNet-18 cut into stages by parameter count vs by measured time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
