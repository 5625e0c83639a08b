"""The setup of Huo et al. (ICML 2018), "Decoupled Parallel Backpropagation with Convergence Guarantee":
a CIFAR ResNet trained with backpropagation or with DDG on K stages.

Paper setup (a GPU machine with a network; CIFAR is downloaded by torchvision)::

    python examples/reproduce_paper.py --dataset cifar10 --depth 56 --strategy ddg --devices 2
    python examples/reproduce_paper.py --dataset cifar10 --depth 56 --strategy backprop

SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, learning rate 0.01 divided by 10 at 50% and 75%
of the epochs (150 and 225 of 300), random crops with 4 pixels of padding and horizontal flips.

Offline default, on 2 CPU cores: the same network family (ResNet-20) on scikit-learn's 8×8 digits, 30 epochs::

    python examples/reproduce_paper.py --strategy ddg --devices 2

Every epoch logs ``train_loss``, ``test_loss``, ``test_acc`` and ``wall_time_s`` through Lightning's loggers
(CSV in ``--log-dir``; W&B too with ``--wandb``). ``examples/compare_bp_ddg.py`` runs the comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

import lightning_ddg  # noqa: F401 - registers strategy="ddg"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cifar_resnet import cifar_resnet  # noqa: E402


class PaperModule(L.LightningModule):
    """A CIFAR ResNet with the paper's optimizer and learning-rate schedule; the test set is evaluated every
    epoch (the paper reports test error)."""

    def __init__(
        self,
        depth: int = 56,
        num_classes: int = 10,
        in_channels: int = 3,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        milestones: tuple[int, ...] = (150, 225),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = cifar_resnet(depth, num_classes, in_channels)
        self._start = time.perf_counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_start(self) -> None:
        self._start = time.perf_counter()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", (logits.argmax(dim=1) == y).float().mean(), prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log("wall_time_s", time.perf_counter() - self._start)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=True, weight_decay=hp.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class _Augmented(Dataset):
    def __init__(self, data: Dataset, transform) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        return self.transform(x), y


def _random_crop(padding: int, flip: bool):
    def transform(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded = F.pad(x, (padding,) * 4)
        i, j = torch.randint(0, 2 * padding + 1, (2,)).tolist()
        x = padded[..., i : i + h, j : j + w]
        return x.flip(-1) if flip and torch.rand(()) < 0.5 else x

    return transform


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's 1,797 8×8 digits (shipped with the package): 80% train, 20% test, random crops with one
    pixel of padding (no flips: a flipped digit is another symbol)."""

    num_classes, in_channels = 10, 1

    def __init__(self, batch_size: int = 128) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = (x - x.mean()) / x.std()
        data = TensorDataset(x, torch.tensor(digits.target))
        test = round(0.2 * len(data))
        self.train_set, self.test_set = random_split(
            data, [len(data) - test, test], generator=torch.Generator().manual_seed(0)
        )

    def train_dataloader(self) -> DataLoader:
        augmented = _Augmented(self.train_set, _random_crop(padding=1, flip=False))
        return DataLoader(augmented, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10 or CIFAR-100 through torchvision (downloaded on first use), with the paper's augmentation."""

    in_channels = 3

    def __init__(self, name: str = "cifar10", data_dir: str = "data", batch_size: int = 128) -> None:
        super().__init__()
        self.name, self.data_dir, self.batch_size = name, data_dir, batch_size
        self.num_classes = 10 if name == "cifar10" else 100

    def prepare_data(self) -> None:
        self._dataset(train=True, download=True)
        self._dataset(train=False, download=True)

    def _dataset(self, train: bool, download: bool = False):
        from torchvision import datasets, transforms

        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train else []
        transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
        cls = datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100
        return cls(self.data_dir, train=train, transform=transform, download=download)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(train=True), batch_size=self.batch_size, shuffle=True, num_workers=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(train=False), batch_size=512, num_workers=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["digits", "cifar10", "cifar100"], default="digits")
    parser.add_argument("--depth", type=int, default=None, help="6n+2; default 20 on digits, 56 on CIFAR")
    parser.add_argument("--strategy", choices=["ddg", "backprop"], default="ddg")
    parser.add_argument("--devices", type=int, default=2, help="DDG stages (backprop: 1 device)")
    parser.add_argument("--accelerator", default="cpu", help='"cpu" (default) or "gpu"')
    parser.add_argument("--max-epochs", type=int, default=None, help="default 30 on digits, 300 on CIFAR")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data", help="where torchvision keeps CIFAR")
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--name", default=None, help="run name in the logs (default: strategy and devices)")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases as well (offline if no login)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    L.seed_everything(args.seed)
    digits = args.dataset == "digits"
    depth = args.depth or (20 if digits else 56)
    epochs = args.max_epochs or (30 if digits else 300)
    if digits:
        data = DigitsDataModule(args.batch_size)
    else:
        data = CIFARDataModule(args.dataset, args.data_dir, args.batch_size)
    model = PaperModule(
        depth,
        data.num_classes,
        data.in_channels,
        lr=args.lr,
        milestones=(epochs // 2, epochs * 3 // 4),
    )
    ddg = args.strategy == "ddg"
    name = args.name or (f"ddg_k{args.devices}" if ddg else "backprop")
    loggers = [CSVLogger(args.log_dir, name=name, version=f"seed{args.seed}")]
    if args.wandb:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project="lightning-ddg-reproduction", name=f"{name}-seed{args.seed}"))
    trainer = L.Trainer(
        strategy="ddg" if ddg else "auto",
        devices=args.devices if ddg else 1,
        accelerator=args.accelerator,
        max_epochs=epochs,
        logger=loggers,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    if trainer.is_global_zero:
        metrics = trainer.callback_metrics
        print(f"final test_acc={float(metrics['test_acc']):.4f} wall_time_s={float(metrics['wall_time_s']):.1f}")


if __name__ == "__main__":
    main()
