"""What a weight tied between the first and the last stage costs per step, on stages whose compute is emulated.

Run from the repository root (about a minute)::

    python benchmarks/tied.py
    python benchmarks/tied.py --stages 2 3 4 --forward-ms 10 --backward-ms 20

Each stage's forward sleeps ``--forward-ms`` and its backward ``--backward-ms`` (an autograd function that sleeps),
so the figures show the schedule, not how busy the machine is. The first and the last stage each scale their
activations by a small weight: once a copy of one weight shared by both (``tied``), once two weights of their own
(``untied``). Untied, a step costs about ``F + B`` on every stage; tied, the first stage cannot forward batch
``t+1`` before batch ``t`` has gone forward through every stage and the last stage has backwarded it, so a step
costs about ``K·F + B`` (see "Weights shared across stages" in ``docs/semantics.md``). Prints the ms per step of
both and their ratio; writes ``--out`` (JSON).
"""

from __future__ import annotations

import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from harness import launch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_ddg import DDGStage, StageLinks, Topology  # noqa: E402
from lightning_ddg.partition import TiedWeight  # noqa: E402


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:  # noqa: ANN001
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        time.sleep(ctx.backward_s)
        return grad, None, None


class _Stage(nn.Module):
    """Sleeps as a stage computes; the first and the last stage scale by ``w``."""

    def __init__(self, first: bool, last: bool, cfg: dict) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.w = nn.Parameter(torch.ones(64)) if first or last else None
        self.b = nn.Parameter(torch.zeros(64))
        self.forward_s, self.backward_s = cfg["forward_ms"] / 1e3, cfg["backward_ms"] / 1e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.w if self.first else x
        x = _Sleep.apply(x + self.b, self.forward_s, self.backward_s)
        return x * self.w if self.last else x


def _run(rank: int, world_size: int, cfg: dict) -> float:
    k = Topology(world_size).stage_of(rank)
    tied = [TiedWeight("w", (0, world_size - 1), ("w", "w"))] if cfg["tied"] else []
    links = StageLinks.create(Topology(world_size), rank, torch.device("cpu"), tied=[w.stages for w in tied])
    module = _Stage(k == 0, k == world_size - 1, cfg)
    stage = DDGStage(module, k, world_size, links, tied=tied)
    optimizer = torch.optim.SGD(stage.parameters, lr=1e-3)
    x = torch.randn(8, 64)
    start = 0.0
    for step in range(cfg["warmup"] + cfg["steps"]):
        if step == cfg["warmup"]:
            torch.distributed.barrier()
            start = time.perf_counter()
        out = stage.forward(x)
        if stage.backward(out.square().mean() if stage.is_last else None):
            stage.install_gradients()
            optimizer.step()
    elapsed = time.perf_counter() - start
    for ready in stage.drain():
        if ready:
            stage.install_gradients()
            optimizer.step()
    links.close()
    links.destroy()
    return elapsed / cfg["steps"] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--forward-ms", type=float, default=10.0)
    parser.add_argument("--backward-ms", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tied.json"))
    args = parser.parse_args()
    base = {"forward_ms": args.forward_ms, "backward_ms": args.backward_ms, "steps": args.steps}
    base["warmup"] = args.warmup
    rows = []
    print(f"forward {args.forward_ms} ms, backward {args.backward_ms} ms per stage; ms per step (slowest stage)")
    print("stages  untied  tied   tied/untied  K*F+B")
    for k in args.stages:
        untied = max(launch(_run, k, base | {"tied": False}))
        tied = max(launch(_run, k, base | {"tied": True}))
        model = k * args.forward_ms + args.backward_ms
        rows.append({"stages": k, "untied_ms": untied, "tied_ms": tied, "ratio": tied / untied, "k_f_plus_b": model})
        print(f"{k:<7} {untied:<7.1f} {tied:<6.1f} {tied / untied:<12.2f} {model:.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    Path(args.out).write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
