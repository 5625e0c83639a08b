"""What shared memory between the stages gives a user: ``Trainer.fit`` of ``strategy="ddg"`` with K=2 on an MLP of
eight 1024-wide layers (batch 256, cut in the middle, SGD; the model of ``fit_speed``; ``--width`` and ``--batch``
change it), with the channels carrying their messages through shared memory (the default: tensors in memory both
processes map, headers through a pipe) and over gloo alone, in alternating rounds. Each stage then sends a 1 MiB
activation or gradient per step, and the first stage carries each 2 MiB batch to the last.

"gloo" fits skip the setup handshake (``lightning_ddg.topology.share_memory``), so every channel stays on gloo, in
every process of the fit: Lightning starts the other ranks by running this script again with the same arguments.

    python benchmarks/shared_memory.py            # about 5 minutes: 4 rounds of 2 fits of 400 steps
    python benchmarks/shared_memory.py --width 512 --batch 128 --out benchmarks/results/shared_memory_512.json
                                                  # steps of about 10 ms, 256 KiB messages: about 2 minutes

Prints each fit's samples/s (timed on global rank 0 after 10 steps) and the first stage's ``send_ms`` and
``load_ms`` as the strategy logged them over its last 100 steps; results go to ``--out``
(``benchmarks/results/shared_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"

MODES = ("shared memory", "gloo")
WARMUP, LAYERS = 10, 8


def _fit(mode: str, steps: int, width: int, batch: int, out: str) -> None:
    import lightning as L
    import torch
    from fit_path import FitClock, stage_figures, timed_trainer
    from torch import nn

    from lightning_ddg import DDGStrategy, topology

    if mode == "gloo":
        topology.share_memory = lambda sending, receiving: None  # every channel stays on gloo

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(width, width), nn.ReLU())])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return ((self(x) - y) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(batch * steps, width), torch.randn(batch * steps, width))
    clock = FitClock(WARMUP)
    trainer = timed_trainer(
        clock, strategy=DDGStrategy(split_points=[f"net.{LAYERS}"]), devices=2, max_steps=steps, log_every_n_steps=100
    )
    trainer.fit(MLP(), torch.utils.data.DataLoader(data, batch_size=batch))
    if trainer.global_rank == 0:
        rate = (steps - WARMUP) * batch / (clock.end - clock.start)
        figures = stage_figures(trainer.callback_metrics, 2)
        with open(out, "w") as f:
            json.dump({"samples_per_s": rate, "stages": figures}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--width", type=int, default=1024, help="of the MLP's eight layers")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shared_memory.json")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                out = os.path.join(tmp, "fit.json")
                command = [sys.executable, os.path.abspath(__file__), "fit", mode]
                command += [str(args.steps), str(args.width), str(args.batch), out]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0 or not os.path.exists(out):
                    raise RuntimeError(f"the {mode} fit failed:\n{done.stderr[-3000:]}")
                result = json.load(open(out))
                os.remove(out)
                runs[mode].append(result)
                first = result["stages"][0]
                print(
                    f"round {round_ + 1}, {mode:>13}: {result['samples_per_s']:6.0f} samples/s, first stage "
                    f"send_ms {first['send_ms']:.2f}, load_ms {first['load_ms']:.2f}",
                    flush=True,
                )
    ratios = [s["samples_per_s"] / g["samples_per_s"] for s, g in zip(runs[MODES[0]], runs[MODES[1]], strict=True)]
    print("shared memory / gloo, round by round: " + ", ".join(f"{r:.3f}" for r in ratios))
    config = {"steps": args.steps, "width": args.width, "batch": args.batch}
    args.out.write_text(json.dumps(config | {"runs": runs, "ratios": ratios}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fit":
        sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
        _fit(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        main()
