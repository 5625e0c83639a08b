"""A pipeline job that is asked to stop by a signal, run as a script by tests/test_stopping.py.

    python tests/stop_job.py OUT --devices 3 --signal SIGTERM --rank 2 --step 4

At ``--step``, global rank ``--rank`` sends ``--signal`` to its own process (``--rank -1``: none does; the test
signals a process itself once every rank has written ``OUT/started.<rank>``). The launching process writes its pid
to ``OUT/launcher``, every stage process appends its pid to ``OUT/pids`` and, when its fit ends with an exception,
writes the global step it stopped at to ``OUT/stopped.<rank>.<pid>``. ``OnExceptionCheckpoint`` saves
``OUT/on_exception.ckpt``. Under SLURM (the variables set by the test) no process is launched, and the requeue
checkpoint goes to ``OUT/hpc_ckpt_1.ckpt``.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ddg import DDGStrategy


class Job(L.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_fit_start(self) -> None:
        with open(Path(self.args.out) / "pids", "a") as f:
            f.write(f"{os.getpid()}\n")

    def training_step(self, batch, batch_idx):
        x, y = batch
        args = self.args
        if self.global_step == 2:
            (Path(args.out) / f"started.{self.global_rank}").touch()
        if self.global_rank == args.rank and self.global_step == args.step:
            os.kill(os.getpid(), getattr(signal, args.signal))
        time.sleep(0.01)
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordStop(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # with ddg_spawn the launching process runs this too, with the untrained module it kept
        (Path(self.out) / f"stopped.{trainer.global_rank}.{os.getpid()}").write_text(str(trainer.global_step))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--strategy", default="ddg", choices=["ddg", "ddg_spawn"])
    parser.add_argument("--signal", default="SIGTERM")
    parser.add_argument("--rank", type=int, default=-1)
    parser.add_argument("--step", type=int, default=4)
    parser.add_argument("--num-stages", type=int, default=None, help="fewer than --devices: replicas")
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ and "SLURM_PROCID" not in os.environ:  # the launching process
        (Path(args.out) / "launcher").write_text(f"{os.getpid()}\n")
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(4096, 8), torch.randint(0, 3, (4096,)))
    trainer = L.Trainer(
        strategy=DDGStrategy(
            num_stages=args.num_stages,
            balance_by="params",
            start_method="spawn" if args.strategy == "ddg_spawn" else "popen",
        ),
        devices=args.devices,
        accelerator="cpu",
        max_epochs=1,
        default_root_dir=args.out,
        callbacks=[RecordStop(args.out), OnExceptionCheckpoint(dirpath=args.out)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Job(args), DataLoader(data, batch_size=4))


if __name__ == "__main__":
    main()
