"""Each batch is loaded once, by the first stage, and reaches the last stage whole: what the data loader yields,
tensors and Python values alike, in the order it yields them."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_ddg import DDGStrategy
from lightning_ddg.batches import SentBatches, _decode
from tests.lightning_models import cpu_trainer


class CountingDataset(Dataset):
    """Random samples (drawn when loaded, as an augmentation would) that note which process loaded them."""

    def __init__(self, out: Path, n: int = 24) -> None:
        self.out, self.n = out, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        with open(self.out / f"loaded.{os.getpid()}", "a") as f:
            f.write(f"{i}\n")
        x = torch.randn(8)
        return {"x": x, "y": int(x.sum() > 0), "name": f"sample-{i}", "sum": x.sum()}


class Recorder(L.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
        self.example_input_array = torch.zeros(5, 8)  # the planner's example: else it reads the first batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        logits = self(batch["x"])
        # only the last stage gets here: the batch is the one the first stage loaded and fed into the model
        assert torch.equal(batch["y"], (batch["sum"] > 0).long())
        assert torch.allclose(batch["x"].sum(1), batch["sum"])
        with open(self.out / "seen", "a") as f:
            f.write(" ".join(batch["name"]) + "\n")
        return nn.functional.cross_entropy(logits, batch["y"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch["x"]), batch["y"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.timeout(300)
def test_only_the_first_stage_loads_and_the_last_gets_the_same_batches(tmp_path: Path) -> None:
    trainer = cpu_trainer(
        DDGStrategy(start_method="forkserver", balance_by="params"), devices=3, max_epochs=2, limit_val_batches=2
    )
    loader = DataLoader(CountingDataset(tmp_path), batch_size=5)  # 24 = 4 * 5 + 4: a partial last batch
    trainer.fit(Recorder(tmp_path), loader, DataLoader(CountingDataset(tmp_path), batch_size=5))
    loaded = {f.name: f.read_text().split() for f in tmp_path.glob("loaded.*")}
    assert len(loaded) == 1  # one process loaded every batch, training and validation
    (indices,) = loaded.values()
    assert len(indices) == 2 * 24 + 2 * 2 * 5  # two epochs of training, two validations of two batches
    seen = (tmp_path / "seen").read_text().split("\n")[:-1]
    expected = [f"sample-{i}" for i in range(24)]
    assert [name for line in seen for name in line.split()] == 2 * expected


class _Channel:
    """What the first stage's loader needs of a channel: it keeps what it is sent."""

    blocked_s = 0.0

    def __init__(self) -> None:
        self.sent: list[list] = []

    def send(self, message: list, may_change: bool = False) -> None:
        self.sent.append(message)


def test_a_batch_layout_is_encoded_once_while_the_batches_keep_it() -> None:
    def batch(n: int, name: str | None = None) -> tuple:
        return (torch.zeros(n, 3), torch.zeros(n, dtype=torch.long)) + ((name,) if name else ())

    ended = []
    channel = _Channel()
    loader = SentBatches([batch(4), batch(4), batch(4), batch(2), batch(2, "a"), batch(2, "b")], [(channel, True)])
    loader.on_fit_end = lambda: ended.append(True)
    batches = iter(loader)
    next(batches), next(batches)
    loader.ends_fit = True  # the third is the fit's last: its layout says so
    for _ in batches:
        pass
    layouts = [message[0] for message in channel.sent]
    decoded = [_decode(layout) for layout in layouts]
    assert layouts[1] is layouts[0] and not decoded[0][0]
    assert layouts[2] is not layouts[0] and decoded[2][0] and ended == [True]
    assert decoded[3][1][3] == [(torch.float32, (2, 3)), (torch.int64, (2,))]  # another shape: encoded anew
    assert [d[1][1] for d in decoded[4:6]] == [[None, None, "a"], [None, None, "b"]]  # values besides tensors
    assert decoded[6] == (False, "end")
