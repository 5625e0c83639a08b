"""What logging costs a step: Trainer.fit of a small MLP whose steps take a few milliseconds, so that the fixed
per-step costs show, with ``log_every_n_steps=1`` and the default 50; plain Lightning on one process and
``strategy="ddg"`` with K=2 (which logs every stage's figures when Lightning logs, 20 batches apart at least).
Each ``training_step`` logs its loss, as most do; the logger is a ``CSVLogger``. One thread per process.

    python benchmarks/logging_cost.py            # about two minutes; prints milliseconds per step

Every configuration runs twice, in two rounds, and counts its faster run. Results go to
``benchmarks/results/logging_cost.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

STEPS, WARMUP, BATCH, WIDTH, LAYERS = 300, 50, 8, 32, 8
ENGINES = ("plain lightning", "ddg K=2")
EVERY = (1, 50)


def _fit(engine: str, every: int, out: str) -> None:
    import lightning as L
    import torch
    from fit_path import FitClock  # the clock of every timed fit here
    from lightning.pytorch.loggers import CSVLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ddg import DDGStrategy

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())])

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    clock = FitClock(WARMUP)
    ddg = engine.startswith("ddg")
    trainer = L.Trainer(
        strategy=DDGStrategy(split_points=[f"net.{LAYERS}"]) if ddg else "auto",
        devices=2 if ddg else 1,
        accelerator="cpu",
        max_epochs=1,
        logger=CSVLogger(os.path.dirname(out)),
        log_every_n_steps=every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    n = (WARMUP + STEPS) * BATCH
    data = TensorDataset(torch.randn(n, WIDTH), torch.randn(n, WIDTH))
    trainer.fit(MLP(), DataLoader(data, batch_size=BATCH))
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps({"ms_per_step": 1e3 * (clock.end - clock.start) / STEPS}))


def main() -> None:
    best: dict[str, dict[int, float]] = {engine: {} for engine in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):  # rounds: a slow spell of the machine costs one run, not a configuration's figure
            for engine in ENGINES:
                for every in EVERY:
                    out = os.path.join(tmp, "step.json")
                    command = [sys.executable, __file__, engine, str(every), out]
                    run = subprocess.run(command, capture_output=True, text=True)
                    if run.returncode != 0:
                        sys.exit(f"{engine}, log_every_n_steps={every} failed:\n{run.stderr[-3000:]}")
                    ms = json.loads(Path(out).read_text())["ms_per_step"]
                    best[engine][every] = min(ms, best[engine].get(every, ms))
    for engine in ENGINES:
        every_step, default = best[engine][1], best[engine][50]
        print(
            f"{engine:<16} log_every_n_steps=1: {every_step:.2f} ms/step, =50: {default:.2f} ms/step "
            f"(logging every step adds {every_step - default:+.2f} ms)"
        )
    result = Path(__file__).parent / "results" / "logging_cost.json"
    result.write_text(json.dumps({"ms_per_step": best, "steps": STEPS, "batch": BATCH}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 3:
        _fit(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    else:
        main()
