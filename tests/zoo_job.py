"""Fit the models of real projects with plain ``Trainer(strategy="ddg", devices=K)``: no split points, no hints.

``python tests/zoo_job.py K`` fits each model of :data:`ZOO` for a few steps on K CPU processes; for each model
rank 0 prints one line ``zoo NAME {json}`` with the plan's split points and what the fit did to the weights.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ddg  # noqa: F401 - registers strategy="ddg"

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cifar_resnet import cifar_resnet  # noqa: E402

from tests.transparency_models import TinyViT  # noqa: E402

STEPS = 2


class Classifier(L.LightningModule):
    """Unmodified user code around any network: cross-entropy on its output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def vgg() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 16), *block(16, 16), nn.MaxPool2d(2),
        *block(16, 32), *block(32, 32), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(64, 10),
    )  # fmt: skip


class TransformerClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, nhead=4, dim_feedforward=64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class Fork(nn.Module):
    """Returns a dict: its items are used on both sides of later cuts."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.aux = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": torch.relu(self.main(h)), "aux": self.aux(h)}


class ResidualSpan(nn.Module):
    """Custom glue code: a skip connection and a dict output that span candidate cuts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 32)
        self.fork = Fork()
        self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.tanh(self.stem(x))
        parts = self.fork(skip)
        h = self.b(torch.tanh(self.a(parts["main"])))
        h = self.c(h) + 0.5 * skip + parts["aux"]
        return self.head(h)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))  # fmt: skip


IMAGES = (3, 16, 16)
ZOO = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), IMAGES),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), IMAGES),
    "cifar_resnet56": (lambda: cifar_resnet(56), (3, 8, 8)),
    "cifar_resnet110": (lambda: cifar_resnet(110), (3, 8, 8)),
    "vgg": (vgg, IMAGES),
    "transformer": (TransformerClassifier, (6, 8)),
    "vit": (TinyViT, IMAGES),  # timm's layout: the attention blocks read B, N, C = x.shape
    "mlp": (mlp, (8,)),
    "residual_span": (ResidualSpan, (8,)),
}


def main(devices: int, names: list[str]) -> None:
    torch.set_num_threads(1)
    for name in names or list(ZOO):
        build, shape = ZOO[name]
        torch.manual_seed(0)
        model = Classifier(build())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(
            torch.randn(STEPS * 2, *shape, generator=g), torch.randint(0, 10, (STEPS * 2,), generator=g)
        )
        trainer = L.Trainer(
            strategy="ddg",
            devices=devices,
            accelerator="cpu",
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, DataLoader(data, batch_size=2))
        if trainer.is_global_zero:
            after = dict(model.named_parameters())
            report = {
                "split_points": trainer.strategy.plan.split_points,
                "loss": float(trainer.callback_metrics["train_loss"]),
                "unchanged": [n for n in before if torch.equal(before[n], after[n])],
                "not_finite": [n for n, p in after.items() if not torch.isfinite(p).all()],
            }
            assert math.isfinite(report["loss"])
            print(f"zoo {name} {json.dumps(report)}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
