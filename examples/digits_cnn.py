"""Train a small CNN on scikit-learn's 8x8 handwritten digits with DDG on 2 CPU processes.

The model is an ordinary LightningModule: nothing in it knows about DDG. ``Trainer(strategy="ddg", devices=2)``
cuts its forward into two stages, one per process, and trains them with decoupled parallel backpropagation
with delayed gradients (Huo et al., ICML 2018). The digits dataset (1797 images) ships with scikit-learn, so
nothing is downloaded. With the defaults (30 epochs) the run takes well under a minute on 2 CPU cores (about
20 s, process start-up included) and reaches a validation accuracy of about 0.99.

Run it from the repository root::

    python examples/digits_cnn.py                                  # DDG, 2 stages (processes)
    python examples/digits_cnn.py --memory recompute               # DDGStrategy(memory="recompute")
    python examples/digits_cnn.py --strategy ddg_spawn             # processes started with multiprocessing
    python examples/digits_cnn.py --strategy auto --devices 1      # plain backpropagation, for comparison

Metrics go to a CSV file under ``--log-dir`` (default ``lightning_logs``). The last line printed is
``final val_acc=<accuracy>``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

import lightning_ddg  # registers strategy="ddg" and strategy="ddg_spawn"


class DigitsCNN(L.LightningModule):
    """A small convolutional classifier for 1x8x8 images."""

    def __init__(self, lr: float = 3e-3, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(dim=-1) == y).float().mean(), prog_bar=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's digits as (N, 1, 8, 8) float32 images in [0, 1], split into fixed train and val sets."""

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
        labels = torch.tensor(digits.target, dtype=torch.long)
        data = TensorDataset(images, labels)
        num_val = round(len(data) * self.val_fraction)
        split = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set = random_split(data, [len(data) - num_val, num_val], generator=split)

    def train_dataloader(self) -> DataLoader:
        # a seeded generator makes the shuffled order reproducible, and the same in every process
        order = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=order)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2, help="processes, one pipeline stage each (default: 2)")
    parser.add_argument(
        "--strategy",
        default="ddg",
        help='"ddg" (default), "ddg_spawn", or any Lightning strategy, e.g. "auto" with --devices 1',
    )
    parser.add_argument("--max-epochs", type=int, default=30, help="default: 30")
    parser.add_argument("--batch-size", type=int, default=64, help="default: 64")
    parser.add_argument(
        "--memory",
        choices=["stash", "recompute", "replay"],
        default=None,
        help="DDG memory mode (default: stash); given, the script builds lightning_ddg.DDGStrategy(memory=...)",
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument(
        "--log-dir", default="lightning_logs", help="CSV logs and checkpoints (default: lightning_logs)"
    )
    parser.add_argument("--no-checkpoint", action="store_true", help="do not save a checkpoint")
    args = parser.parse_args(argv)
    if args.memory is not None and args.strategy not in ("ddg", "ddg_spawn"):
        parser.error(f"--memory applies to --strategy ddg or ddg_spawn, not {args.strategy!r}")
    return args


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    L.seed_everything(args.seed)

    strategy = args.strategy
    if args.memory is not None:
        start_method = "spawn" if args.strategy == "ddg_spawn" else "popen"
        strategy = lightning_ddg.DDGStrategy(memory=args.memory, start_method=start_method)

    model = DigitsCNN(lr=args.lr)
    datamodule = DigitsDataModule(batch_size=args.batch_size)
    trainer = L.Trainer(
        strategy=strategy,
        devices=args.devices,
        accelerator="cpu",
        max_epochs=args.max_epochs,
        logger=CSVLogger(args.log_dir, name="digits_cnn"),
        default_root_dir=args.log_dir,
        enable_checkpointing=not args.no_checkpoint,
        log_every_n_steps=5,
    )
    trainer.fit(model, datamodule=datamodule)

    # metrics are logged on the last stage, which is global rank 0
    accuracy = float(trainer.callback_metrics.get("val_acc", float("nan")))
    # inference runs through the same pipeline; the predictions come back to this script on global rank 0
    predictions = trainer.predict(model, datamodule=datamodule)
    if trainer.is_global_zero:
        print(f"predicted {sum(len(p) for p in predictions)} digits", flush=True)
        print(f"final val_acc={accuracy:.4f}", flush=True)
    return accuracy


if __name__ == "__main__":
    # the guard matters: strategy="ddg" re-runs this script, with the same arguments, for every other rank
    main()
