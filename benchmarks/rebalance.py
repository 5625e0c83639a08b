"""A fit that cuts its stages anew where the times it measured balance, against the same fit on its plan's cut:
samples/s of ``Trainer.fit`` after the new cut, K=2, on the models of ``benchmarks/peers.py``.

Run from the repository root (about 2 minutes per model and round on a 2-core machine)::

    python benchmarks/rebalance.py                                  # cut by FLOPs, every model, 2 rounds
    python benchmarks/rebalance.py --balance-by time --models transformer

Each fit runs in fresh processes that Lightning starts itself (``DDGStrategy``'s ``"popen"``), one thread per
process, on the same batches:

- ``planned``: ``DDGStrategy(balance_by=...)``: the plan's cut all along;
- ``rebalanced``: the same with ``rebalance_after_steps=N``: before batch ``N`` the stages are cut anew where the
  times they measured balance, when that gains 5% of the mean (``lightning_ddg.rebalancing``).

Both are timed over the same batches, from ``N + --settle`` to the end, and the rounds alternate them; each
counts its best round. The plan by FLOPs (the default here) is the plan the strategy makes under
``Trainer(deterministic=True)``, and it misses what the stages' time is made of besides arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {"mlp": 128, "resnet": 32, "transformer": 32}  # batch sizes, as in peers.py
ENGINES = ("fit ddg planned", "fit ddg rebalanced")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--balance-by", choices=["time", "flops", "params"], default="flops")
    parser.add_argument("--after", type=int, default=30, help="rebalance_after_steps")
    parser.add_argument("--settle", type=int, default=6, help="batches after the new cut before the clock starts")
    parser.add_argument("--steps", type=int, default=60, help="timed batches")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per fit")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "rebalance.json")
    args = parser.parse_args()
    results = []
    for model in args.models:
        cfg = {"model": model, "batch_size": MODELS[model], "stages": 2, "steps": args.steps}
        cfg |= {"warmup": args.after + args.settle, "balance_by": args.balance_by, "rebalance_after_steps": args.after}
        fits: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
        for _ in range(args.rounds):
            for engine in ENGINES:
                fits[engine].append(_fit(engine, cfg, args.timeout))
        best = {engine: max(runs, key=lambda r: r["samples_per_s"]) for engine, runs in fits.items()}
        planned, rebalanced = (best[engine]["samples_per_s"] for engine in ENGINES)
        row = {"model": model, "fits": fits, "ratio": rebalanced / planned} | cfg
        results.append(row)
        print(f"\n{model} (batch {cfg['batch_size']}, cut by {args.balance_by}, rebalance_after_steps={args.after})")
        for engine, runs in fits.items():
            rates = ", ".join(f"{r['samples_per_s']:.0f}" for r in runs)
            cuts = " -> ".join(str(c) for c in best[engine]["cuts"])
            print(f"  {engine:20s} {best[engine]['samples_per_s']:8.0f} samples/s (rounds: {rates})  cut {cuts}")
        print(f"  rebalanced / planned: {row['ratio']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_average_before": os.getloadavg()[0], "models": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def _fit(engine: str, cfg: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate.json")
        command = [sys.executable, str(HERE / "fit_path.py"), engine, json.dumps(cfg), out]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"{engine} failed:\n{done.stderr[-3000:]}")
        return json.load(open(out))


if __name__ == "__main__":
    main()
