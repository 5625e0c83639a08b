"""Several seeded fits in one script, run by tests/test_reliability.py.

    python tests/repeat_job.py --devices 3 --runs 2

Every run seeds with ``seed_everything``, builds a fresh model (with dropout) and Trainer
(``deterministic=True``) and fits it with ``strategy="ddg"``. Rank 0 prints, after each run, a digest of the
trained weights and the number of threads and open file descriptors of the process, and at the end the result
of ``trainer.test`` and ``trainer.validate`` on the last Trainer, as every rank got it; with ``--lr-find``, then
the learning rate Lightning's finder suggested on every rank.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading

import lightning as L
import torch
from lightning.pytorch.tuner import Tuner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ddg  # noqa: F401 - registers strategy="ddg"


class DropoutMLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lr = 0.01  # the attribute Lightning's learning-rate finder sets
        self.model = nn.Sequential(
            nn.Linear(8, 16),
            nn.Tanh(),
            nn.Dropout(0.2),
            nn.Linear(16, 16),
            nn.Tanh(),
            nn.Dropout(0.2),
            nn.Linear(16, 16),
            nn.Tanh(),
            nn.Linear(16, 16),
            nn.Tanh(),
            nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr-find", action="store_true", help="at the end, Lightning's learning-rate finder")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 8, generator=g), torch.randint(0, 3, (40,), generator=g))
    trainer = None
    for run in range(args.runs):
        L.seed_everything(7, verbose=False)
        model = DropoutMLP()
        trainer = L.Trainer(
            strategy="ddg",
            devices=args.devices,
            accelerator="cpu",
            max_steps=args.steps,
            deterministic=True,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True))
        if trainer.is_global_zero:
            fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1
            print(f"run {run} weights {digest(model)} threads {threading.active_count()} fds {fds}", flush=True)
    assert trainer is not None
    (tested,) = trainer.test(model, DataLoader(data, batch_size=8), verbose=False)
    (validated,) = trainer.validate(model, DataLoader(data, batch_size=8), verbose=False)
    # on every rank: each returns the last stage's results, as every rank does under strategy="ddp"
    losses = f"test_loss {tested['test_loss']:.6f} val_loss {validated['val_loss']:.6f}"
    sys.stdout.write(f"rank {trainer.global_rank} {losses}\n")  # one write: the ranks share the output
    sys.stdout.flush()
    if args.lr_find:  # on the losses of the last stage; every rank gets the same suggestion
        finder = Tuner(trainer).lr_find(
            model, DataLoader(data, batch_size=4), num_training=40, early_stop_threshold=None
        )
        sys.stdout.write(f"rank {trainer.global_rank} suggested lr {finder.suggestion()} set {model.lr}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
