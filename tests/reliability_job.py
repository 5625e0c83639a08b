"""A tiny pipeline job that fails on demand, run as a script by tests/test_reliability.py.

    python tests/reliability_job.py --devices 3 --fail raise --rank 1 --pid-file pids.txt

Every process appends its pid to ``--pid-file`` (the launching process first), so that the test can check that
none survives; the failing process writes the time of its failure to ``<pid-file>.failed``. The last line printed
by rank 0 after a run that went well is ``job done``.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ddg import DDGStrategy


class _PoisonGradient(torch.autograd.Function):
    """The identity, whose backward turns the gradient into NaN while ``active``."""

    active = False

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan") if _PoisonGradient.active else grad


def poison_gradient(x: torch.Tensor) -> torch.Tensor:
    return _PoisonGradient.apply(x)


torch.fx.wrap("poison_gradient")  # traced as one call, so that its backward survives the cut


class PoisonGradient(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return poison_gradient(x)


FAILURES = ("none", "raise", "shape", "oom", "kill", "nan-loss", "nan-grad", "empty", "not-a-tensor")


class Job(L.LightningModule):
    def __init__(self, args: argparse.Namespace, fails: bool) -> None:
        super().__init__()
        self.args = args
        self.fails = fails  # in this fit
        self.front = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.back = nn.Sequential(PoisonGradient(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        out = self.back(self.front(x))
        # the batch's offset is used after the cut before `back`, so it crosses it
        return out + offset if self.args.fail == "not-a-tensor" else out

    def on_fit_start(self) -> None:
        with open(self.args.pid_file, "a") as f:
            f.write(f"{os.getpid()}\n")

    def training_step(self, batch, batch_idx):
        x, y = batch
        args = self.args
        failing = self.fails and self.global_rank == args.rank and self.global_step == args.step
        if failing and args.fail != "none":
            Path(f"{args.pid_file}.failed").write_text(f"{time.time()}\n")  # when the failure happens
        if failing and args.fail == "raise":
            raise ValueError("the user's training_step broke")
        if failing and args.fail == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if failing and args.fail == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if failing and args.fail == "nan-loss":
            x = x * float("nan")  # on the first stage (the highest rank): the NaN reaches the loss
        if args.started_file and self.global_step == 2:
            Path(f"{args.started_file}.{self.global_rank}").touch()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        if args.fail == "not-a-tensor":  # the batch has an offset at every step but the failing one
            logits = self(x, None if failing else torch.zeros(()))
        else:
            logits = self(x)
        if failing and args.fail == "shape":
            logits = logits.view(5, -1)  # a shape error on the last stage
        # on the last stage, with devices=2: a finite loss and weights, but a NaN gradient for the stage before
        _PoisonGradient.active = failing and args.fail == "nan-grad"
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="ddg", choices=["ddg", "ddg_spawn"])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--fail", default="none", choices=FAILURES)
    parser.add_argument("--rank", type=int, default=1, help="global rank that fails")
    parser.add_argument("--step", type=int, default=3, help="step at which it fails")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--fits", type=int, default=1, help="fits in a row; the failure happens in the last")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--check-finite", action="store_true")
    parser.add_argument("--detect-anomaly", action="store_true")
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--started-file", default="")
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:  # the launching process, before it starts the others
        with open(args.pid_file, "a") as f:
            f.write(f"{os.getpid()}\n")

    torch.manual_seed(0)
    samples = 0 if args.fail == "empty" else 64
    data = TensorDataset(torch.randn(samples, 8), torch.randint(0, 3, (samples,)))
    for fit in range(args.fits):
        strategy = DDGStrategy(
            split_points=["back"] if args.devices == 2 else None,
            start_method="spawn" if args.strategy == "ddg_spawn" else "popen",
            check_finite=True if args.check_finite else None,
        )
        trainer = L.Trainer(
            strategy=strategy,
            devices=args.devices,
            accelerator="cpu",
            max_steps=args.max_steps,
            detect_anomaly=args.detect_anomaly,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Job(args, fails=fit == args.fits - 1), DataLoader(data, batch_size=4))
    if trainer.is_global_zero:
        print("job done", flush=True)


if __name__ == "__main__":
    main()
