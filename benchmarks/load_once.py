"""Loading each batch once: Trainer.fit with a CPU-heavy augmentation in the data loader, K=2 on the MLP of
``benchmarks/peers.py``, with ``DDGStrategy(load_once=True)`` (the first stage loads, the last receives) against
``load_once=False`` (both stages load every batch) and backprop on one process; one loader worker per loading
process, one thread per process.

    python benchmarks/load_once.py            # about a minute; prints samples/s and the ratios

Results go to ``benchmarks/results/load_once.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

STEPS, WARMUP, BATCH, WIDTH = 40, 5, 128, 512
AUGMENT_ROUNDS = 6  # per sample: a few small tensor ops, as random crops, flips and jitter are


def _fit(mode: str, out: str) -> None:
    import lightning as L
    import torch
    from fit_path import FitClock, timed_trainer  # the clock of every timed fit here
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from lightning_ddg import DDGStrategy

    torch.set_num_threads(1)

    class Augmented(Dataset):
        def __len__(self) -> int:
            return (STEPS + WARMUP) * BATCH

        def __getitem__(self, i: int):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(WIDTH, generator=g)
            for _ in range(AUGMENT_ROUNDS):  # CPU-heavy per-sample work
                x = torch.roll(x, int(torch.randint(0, WIDTH, (1,), generator=g))) * torch.rand(1, generator=g)
                x = torch.fft.irfft(torch.fft.rfft(x), n=WIDTH)
            return x, i % 10

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for _ in range(8):
                layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
            self.net = nn.Sequential(*layers, nn.Linear(WIDTH, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    clock = FitClock(WARMUP)
    strategy = "auto" if mode == "backprop" else DDGStrategy(split_points=["net.8"], load_once=mode == "ddg load once")
    trainer = timed_trainer(clock, strategy=strategy, devices=1 if mode == "backprop" else 2)
    loader = DataLoader(Augmented(), batch_size=BATCH, num_workers=1, persistent_workers=False)
    trainer.fit(MLP(), loader)
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps({"samples_per_s": STEPS * BATCH / (clock.end - clock.start)}))


def main() -> None:
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("backprop", "ddg every stage loads", "ddg load once"):
            out = os.path.join(tmp, "rate.json")
            run = subprocess.run([sys.executable, __file__, mode, out], capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{mode} failed:\n{run.stderr[-3000:]}")
            rates[mode] = json.loads(Path(out).read_text())["samples_per_s"]
            print(f"{mode:<24}{rates[mode]:>10.1f} samples/s  {rates[mode] / rates['backprop']:.2f}x backprop")
    gain = rates["ddg load once"] / rates["ddg every stage loads"]
    print(f"load once / every stage loads: {gain:.2f}")
    result = Path(__file__).parent / "results" / "load_once.json"
    result.write_text(json.dumps({"samples_per_s": rates, "load_once_over_every_stage": gain}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        _fit(sys.argv[1], sys.argv[2])
    else:
        main()
