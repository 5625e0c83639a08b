"""LightningModules used by the strategy tests: unmodified user code, nothing DDG-specific in them."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.models import TiedLM, lm_loss, mlp, token_batches


class MLPClassifier(L.LightningModule):
    def __init__(
        self,
        optimizer: str = "sgd",
        dropout: float = 0.0,
        batchnorm: bool = False,
        depth: int = 4,
        step_lr: bool = False,
        lr_interval: str = "step",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = mlp(depth=depth, dropout=dropout, batchnorm=batchnorm, seed=seed)

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
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).double().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.hparams.optimizer, self.parameters())
        if not self.hparams.step_lr:
            return optimizer
        interval = self.hparams.lr_interval
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3 if interval == "step" else 1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def cpu_trainer(strategy, devices: int, **overrides) -> L.Trainer:
    """A quiet CPU Trainer for tests: no logger, checkpoints, progress bar, summary or sanity check."""
    options = dict(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(strategy=strategy, devices=devices, **(options | overrides))


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


def dataset(n: int = 44, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def loader(n: int = 44, batch_size: int = 8) -> DataLoader:
    """``n`` samples in batches of ``batch_size``: the last batch is partial (44 = 5 * 8 + 4)."""
    return DataLoader(dataset(n), batch_size=batch_size)


class TiedLanguageModel(L.LightningModule):
    """A tiny language model whose head shares the embedding's weight (``tests.models.TiedLM``)."""

    def __init__(self, tie_blocks: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TiedLM(tie_blocks=tie_blocks)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        loss = lm_loss(self(tokens), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return make_optimizer("sgd", self.parameters())


def token_loader() -> DataLoader:
    """Six batches of token sequences, the last one partial."""
    tokens, targets = (torch.cat(parts) for parts in zip(*token_batches(6), strict=True))
    return DataLoader(TensorDataset(tokens, targets), batch_size=4)
