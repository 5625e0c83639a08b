"""Soak: a long DDG run whose memory must stay flat.

Trains a small MLP for ``--steps`` steps (default 10,000) with ``strategy="ddg"`` on ``--stages`` CPU processes
(default 3) through a Lightning Trainer, with a short validation every epoch. Every ``--sample-every`` steps each
process records its resident memory (RSS, from ``/proc/self/statm``), the batches its stage holds in flight and
the sends its channels have not yet seen complete. At the end rank 0 prints, per process, the mean RSS over the
first and over the last quarter of the run and their difference, and writes everything to ``--out`` (JSON, and a
PNG plot next to it when matplotlib is installed).

A leak of one kilobyte per step would add about 7.5 MB between the two quarters of a 10,000-step run. The run
is flat when every process grows by less than ``--max-growth-mb`` and holds at most ``delay + 1`` batches; the
script exits with code 1 otherwise.

Run from the repository root::

    python benchmarks/soak.py                                   # 10,000 steps, 3 stages: minutes on 2 cores
    python benchmarks/soak.py --steps 1500 --out /tmp/soak.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and in the re-launched ranks

import argparse
import json
import platform
import time
from pathlib import Path
from statistics import mean
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ddg  # noqa: F401 - registers strategy="ddg"

RESULTS = Path(__file__).resolve().parent / "results"


class SoakMLP(L.LightningModule):
    def __init__(self, width: int = 64, depth: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(32, width), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.model = nn.Sequential(*layers, nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemorySampler(L.Callback):
    """Records (step, seconds, RSS in MiB, batches in flight, pending sends) every ``every`` training steps, and
    gathers every process's records on every rank when training ends."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.batches = 0
        self.samples: list[tuple[int, float, float, int, int]] = []
        self.start = time.perf_counter()
        self.gathered: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.batches += 1
        if self.batches % self.every:
            return
        stage = trainer.strategy.stage
        channels = [c for c in (stage.links.act_out, stage.links.grad_out) if c is not None]
        pending = sum(c.pending_sends for c in channels)
        self.samples.append((self.batches, time.perf_counter() - self.start, rss_mb(), stage.in_flight, pending))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        local = {"rank": trainer.global_rank, "stage": strategy.stage_index, "delay": strategy.stage.delay}
        local["samples"] = self.samples
        self.gathered = [local]
        if trainer.world_size > 1:
            self.gathered = [None] * trainer.world_size
            dist.all_gather_object(self.gathered, local)


def summarize(process: dict[str, Any], steps: int, max_growth_mb: float) -> dict[str, Any]:
    samples = process.pop("samples")
    first = [rss for step, _, rss, _, _ in samples if step <= steps / 4]
    last = [rss for step, _, rss, _, _ in samples if step > 3 * steps / 4]
    summary = {
        **process,
        "rss_first_quarter_mb": mean(first),
        "rss_last_quarter_mb": mean(last),
        "growth_mb": mean(last) - mean(first),
        "rss_max_mb": max(rss for _, _, rss, _, _ in samples),
        "max_in_flight": max(n for _, _, _, n, _ in samples),
        "max_pending_sends": max(n for _, _, _, _, n in samples),
    }
    summary["flat"] = summary["growth_mb"] < max_growth_mb and summary["max_in_flight"] <= process["delay"] + 1
    names = ("step", "seconds", "rss_mb", "in_flight", "pending_sends")
    summary["samples"] = [dict(zip(names, sample, strict=True)) for sample in samples]
    return summary


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for process in result["processes"]:
        steps = [s["step"] for s in process["samples"]]
        ax.plot(steps, [s["rss_mb"] for s in process["samples"]], label=f"stage {process['stage']}")
    ax.set_xlabel("training step")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"DDG soak: {result['config']['stages']} stages, {result['config']['steps']} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--sample-every", type=int, default=50)
    parser.add_argument("--steps-per-epoch", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-growth-mb", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    samples = args.steps_per_epoch * args.batch_size
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(samples, 32, generator=g), torch.randint(0, 10, (samples,), generator=g))
    val = TensorDataset(torch.randn(160, 32, generator=g), torch.randint(0, 10, (160,), generator=g))
    sampler = MemorySampler(args.sample_every)
    trainer = L.Trainer(
        strategy="ddg",
        devices=args.stages,
        accelerator="cpu",
        max_steps=args.steps,
        limit_val_batches=5,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[sampler],
    )
    start = time.perf_counter()
    trainer.fit(
        SoakMLP(),
        DataLoader(train, batch_size=args.batch_size, shuffle=True),
        DataLoader(val, batch_size=args.batch_size),
    )
    if not trainer.is_global_zero:
        return 0
    gathered = sorted(sampler.gathered, key=lambda p: p["rank"])
    processes = [summarize(p, args.steps, args.max_growth_mb) for p in gathered]
    result = {
        "config": vars(args) | {"out": str(args.out)},
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "seconds": time.perf_counter() - start,
        "flat": all(p["flat"] for p in processes),
        "processes": processes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"{args.steps} steps on {args.stages} stages in {result['seconds']:.0f} s")
    print("stage  rank  RSS first quarter  RSS last quarter  growth   max in flight (delay)  max pending sends")
    for p in processes:
        print(
            f"{p['stage']:>5}  {p['rank']:>4}  {p['rss_first_quarter_mb']:>14.1f} MB"
            f"  {p['rss_last_quarter_mb']:>13.1f} MB  {p['growth_mb']:>+5.2f} MB"
            f"  {p['max_in_flight']:>13} ({p['delay']})  {p['max_pending_sends']:>17}"
        )
    print("flat" if result["flat"] else f"NOT flat: growth of {args.max_growth_mb} MB or more, or too many in flight")
    return 0 if result["flat"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
