"""Backpropagation against DDG on K stages, several seeds each, with ``examples/reproduce_paper.py``: one command
that trains every run, then writes a Markdown table and plots of the curves the runs logged.

Offline default (scikit-learn digits, ResNet-20, 30 epochs; about 10 minutes on 2 CPU cores)::

    python examples/compare_bp_ddg.py

The paper's CIFAR-10 runs on a machine with 4 GPUs and a network (about a day per run)::

    python examples/compare_bp_ddg.py --dataset cifar10 --depth 56 --stages 2 4 --accelerator gpu

Writes ``results.md`` and ``curves.png`` to ``--out`` (default ``docs/reproduction``) and reads the curves back
from the runs' CSV logs in ``--log-dir``.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SCRIPT = Path(__file__).with_name("reproduce_paper.py")
# variables a launcher may have left in this environment; a child that saw LOCAL_RANK would take itself for an
# already launched rank
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE")


def run(name: str, seed: int, options: list[str], args: argparse.Namespace) -> None:
    command = [sys.executable, str(SCRIPT), *options, "--seed", str(seed), "--name", name]
    command += ["--dataset", args.dataset, "--log-dir", str(args.log_dir), "--accelerator", args.accelerator]
    if args.depth:
        command += ["--depth", str(args.depth)]
    if args.max_epochs:
        command += ["--max-epochs", str(args.max_epochs)]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("PL_")}
    shutil.rmtree(args.log_dir / name / f"seed{seed}", ignore_errors=True)  # a rerun starts a fresh log
    print(f"{name} seed {seed}: {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{result.stderr[-5000:]}")
    print("   ", result.stdout.strip().splitlines()[-1], flush=True)


def curves(log_dir: Path, name: str, seed: int) -> dict[str, list[tuple[int, float]]]:
    """Per metric, (epoch, value) pairs from a run's CSV log."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(log_dir / name / f"seed{seed}" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key in ("train_loss", "test_loss", "test_acc", "wall_time_s"):
                if row.get(key):
                    out[key].append((int(row["epoch"]), float(row[key])))
    return out


def mean_curve(runs: list[dict], key: str) -> list[float]:
    length = min(len(r[key]) for r in runs)
    return [statistics.fmean(r[key][i][1] for r in runs) for i in range(length)]


def table(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    def spread(values: list[float]) -> str:
        return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"

    baseline = statistics.fmean(r["wall_time_s"][-1][1] for r in results["backprop"])
    lines = [
        "| run | final test accuracy (%) | test error (%) | wall time (s) | speedup |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        accuracy = [100 * r["test_acc"][-1][1] for r in runs]
        wall = [r["wall_time_s"][-1][1] for r in runs]
        lines.append(
            f"| {name} | {spread(accuracy)} | {spread([100 - a for a in accuracy])} | {spread(wall)} "
            f"| {baseline / statistics.fmean(wall):.2f} |"
        )
    epochs = len(results["backprop"][0]["test_acc"])
    header = (
        f"{args.dataset}, ResNet-{args.depth or (20 if args.dataset == 'digits' else 56)}, {epochs} epochs, "
        f"seeds {', '.join(map(str, args.seeds))}; mean ± standard deviation over seeds; speedup is backprop's "
        f"mean wall time over the run's.\n\n"
    )
    return header + "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for name, runs in results.items():
        for row, key in enumerate(("test_acc", "train_loss")):
            values = mean_curve(runs, key)
            wall = mean_curve(runs, "wall_time_s")[: len(values)]
            axes[row][0].plot(range(1, len(values) + 1), values, label=name)
            axes[row][1].plot(wall, values[: len(wall)], label=name)
    for row, label in enumerate(("test accuracy", "training loss")):
        axes[row][0].set_xlabel("epoch")
        axes[row][1].set_xlabel("wall-clock time (s)")
        for ax in axes[row]:
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_yscale("log")
    axes[0][0].legend()
    fig.suptitle("backpropagation vs DDG (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["digits", "cifar10", "cifar100"], default="digits")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4], help="DDG stage counts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--log-dir", type=Path, default=Path("lightning_logs/reproduction"))
    parser.add_argument("--out", type=Path, default=Path("docs/reproduction"))
    parser.add_argument("--skip-training", action="store_true", help="only read existing logs and write results")
    parser.add_argument("--only", nargs="+", default=None, help='train only these runs, e.g. --only backprop "ddg K=2"')
    args = parser.parse_args()

    configs = {"backprop": ["--strategy", "backprop"]}
    configs |= {f"ddg K={k}": ["--strategy", "ddg", "--devices", str(k)] for k in args.stages}
    results: dict[str, list[dict]] = {}
    for name, options in configs.items():
        folder = name.replace(" ", "_").replace("=", "")
        for seed in args.seeds:
            if not args.skip_training and (args.only is None or name in args.only):
                run(folder, seed, options, args)
        results[name] = [curves(args.log_dir, folder, seed) for seed in args.seeds]

    args.out.mkdir(parents=True, exist_ok=True)
    markdown = table(results, args)
    (args.out / "results.md").write_text(markdown)
    plot(results, args.out / "curves.png")
    print("\n" + markdown)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
