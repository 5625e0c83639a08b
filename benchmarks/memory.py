"""Memory per process: backprop on one process against DDG stages, next to what each stage needs.

Run from the repository root::

    python benchmarks/memory.py                          # MLP 16 x 2048x2048 (67M parameters), batch 8
    python benchmarks/memory.py --width 4096             # the 268M-parameter MLP (1 GiB of fp32 weights)
    python benchmarks/memory.py --stages 2 --memory stash --build init

The model is an MLP of ``--layers`` square linear layers, trained with SGD + momentum for ``--steps`` steps with
``Trainer.fit``: plain Lightning on one process (backprop), and ``DDGStrategy`` with K = 2 and 4 stages of equal
layer counts (``balance``), in each memory mode. The LightningModule builds its layers in ``__init__`` (``init``)
or in ``configure_model`` (``configure_model``). Every configuration runs as a user runs a script: a fresh
``python`` process that launches the others (``strategy="ddg"``).

Each process reports its host memory (on the CPU: the resident set, ``VmRSS``/``VmHWM`` of ``/proc/self/status``;
on a GPU it would be ``torch.cuda.max_memory_allocated``):

- ``imports``: what it holds before the model is built (Python, torch, Lightning, lightning_ddg);
- ``setup_peak``: the most it held from its start until training began (building the model, the cut);
- ``after_setup``: what it holds when training begins;
- ``train_peak``: the most it held during the training steps (the high-water mark is reset when they begin);
- ``save_peak``: the most it held while a checkpoint was saved after the last step (``trainer.save_checkpoint``);
- ``resume_peak``: the most it held in a second fit, of a new model, from its setup until training began, which
  includes reading that checkpoint (``ckpt_path``);
- ``end_peak``: the most it held after the save until fit ended: the drain, and the full weights gathered back
  into the module of a model built in ``__init__``;

next to the formula of what the stage needs: its parameters, their gradients, the optimizer state, the weight
copies of in-flight batches (``d_k + 1`` copies on a stage with delay ``d_k > 0`` in ``stash`` and ``recompute``,
none in ``replay`` and on the last stage) and the activations of ``d_k + 1`` in-flight batches. Prints a table,
writes JSON to ``--out`` and a PNG beside it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and (inherited) in the stages

import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the high-water mark VmHWM starts again from the resident size


def make_net(width: int, layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


class MLP(L.LightningModule):
    """Square linear layers; the loss is the mean square of the output."""

    def __init__(self, width: int, layers: int, build: str) -> None:
        super().__init__()
        self.width, self.layers, self.build = width, layers, build
        self.net = make_net(width, layers) if build == "init" else None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = make_net(self.width, self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4, momentum=0.9)


class _Measure(L.Callback):
    """Each process's memory at the moments listed in the module docstring, written to ``out/rank{r}.json``
    (``out/rank{r}_resume.json`` for the fit that resumes from the checkpoint)."""

    def __init__(self, out: str, imports_mib: float, resume: bool = False) -> None:
        self.out = out
        self.imports_mib = imports_mib
        self.resume = resume
        self.report: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.resume:
            _reset_peak()  # the resumed fit: from here to training, the cut and the reading of the checkpoint

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stage = getattr(trainer.strategy, "stage", None)
        self.report = {
            "rank": trainer.global_rank,
            "stage": stage.stage_index if stage is not None else 0,
            "delay": stage.delay if stage is not None else 0,
            "parameters": sum(p.numel() for p in pl_module.parameters()),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in pl_module.parameters()),
            "layers": sum(1 for m in pl_module.modules() if isinstance(m, nn.Linear) and "weight" in m._parameters),
            "imports_mib": self.imports_mib,
            "setup_peak_mib": _status_mib("VmHWM"),
            "after_setup_mib": _status_mib("VmRSS"),
        }
        _reset_peak()
        if self.resume:
            self._write(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.resume or trainer.global_step < trainer.max_steps:
            return
        self.report["train_peak_mib"] = _status_mib("VmHWM")
        optimizer = trainer.optimizers[0]
        self.report["optimizer_state_bytes"] = sum(
            v.numel() * v.element_size()
            for state in optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        _reset_peak()
        trainer.save_checkpoint(os.path.join(self.out, "last.ckpt"))
        self.report["save_peak_mib"] = _status_mib("VmHWM")
        _reset_peak()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.resume:
            self.report["end_peak_mib"] = _status_mib("VmHWM")  # the drain, and the gathering after fit
            self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        name = f"rank{trainer.global_rank}{'_resume' if self.resume else ''}.json"
        with open(os.path.join(self.out, name), "w") as f:
            json.dump(self.report, f)


def run_one(args: argparse.Namespace) -> None:
    """One configuration, in this process and the ones it launches (each writes its own reports): a fit that
    saves a checkpoint at its last step, then a fit of a new model that resumes from it."""
    from lightning_ddg import DDGStrategy

    torch.set_num_threads(1)
    imports_mib = _status_mib("VmRSS")  # Python, torch, Lightning: what every process holds before the model
    stages, layers = args.stages[0], args.layers
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(args.steps * args.batch, args.width, generator=g)), args.batch)
    for resume in (False, True):
        model = MLP(args.width, layers, args.build[0])
        if stages == 1:
            strategy: Any = "auto"
        else:
            strategy = DDGStrategy(balance=[layers // stages] * stages, memory=args.memory[0])
        trainer = L.Trainer(
            accelerator="cpu",
            devices=stages,
            strategy=strategy,
            max_steps=args.steps + (1 if resume else 0),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[_Measure(args.report_dir, imports_mib, resume)],
        )
        ckpt_path = os.path.join(args.report_dir, "last.ckpt") if resume else None
        trainer.fit(model, data, ckpt_path=ckpt_path)
        del model, trainer, strategy
        gc.collect()


def formula(report: dict[str, Any], memory: str, args: argparse.Namespace) -> dict[str, float]:
    """What the stage needs, in MiB: parameters, gradients, optimizer state, weight copies, activations."""
    params = report["parameter_bytes"]
    delay = report["delay"]
    copies = delay + 1 if delay > 0 and memory != "replay" else 0
    batch_bytes = args.batch * args.width * 4  # one layer's input for one batch, fp32
    if memory == "stash" or delay == 0:
        activations = (delay + 1) * report["layers"] * batch_bytes
    else:  # the inputs of the in-flight batches, and one batch's activations while it is recomputed
        activations = (delay + 1) * batch_bytes + report["layers"] * batch_bytes
    parts = {
        "parameters": params,
        "gradients": params,
        "optimizer_state": report.get("optimizer_state_bytes", 0),
        "weight_copies": copies * params,
        "activations": activations,
    }
    parts = {k: v / MIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def configurations(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    configs = []
    for build in args.build:
        for stages in args.stages:
            for memory in args.memory if stages > 1 else ["-"]:
                configs.append((stages, memory, build))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--memory", nargs="+", default=["stash", "recompute", "replay"])
    parser.add_argument("--build", nargs="+", default=["init", "configure_model"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--report-dir", help=argparse.SUPPRESS)  # set for the run of one configuration
    args = parser.parse_args()
    if args.report_dir is not None:
        run_one(args)
        return

    rows = []
    for stages, memory, build in configurations(args):
        with tempfile.TemporaryDirectory() as report_dir:
            command = [sys.executable, __file__, "--width", str(args.width), "--layers", str(args.layers)]
            command += ["--batch", str(args.batch), "--steps", str(args.steps), "--stages", str(stages)]
            command += ["--memory", memory if memory != "-" else "stash", "--build", build, "--report-dir", report_dir]
            start = time.perf_counter()
            subprocess.run(command, check=True, cwd=ROOT, timeout=1800, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            reports = [json.loads((Path(report_dir) / f"rank{r}.json").read_text()) for r in range(stages)]
            for report in reports:
                resumed = json.loads((Path(report_dir) / f"rank{report['rank']}_resume.json").read_text())
                report["resume_peak_mib"] = resumed["setup_peak_mib"]
        for report in sorted(reports, key=lambda r: r["stage"]):
            need = formula(report, memory, args)
            rows.append({"stages": stages, "memory": memory, "build": build, **report, "formula_mib": need})
            print(
                f"{build:>15} K={stages} {memory:>9} stage {report['stage']}: formula {need['total']:7.0f} MiB  "
                f"imports {report['imports_mib']:5.0f}  "
                f"setup peak {report['setup_peak_mib']:7.0f}  after setup {report['after_setup_mib']:7.0f}  "
                f"train peak {report['train_peak_mib']:7.0f}  save peak {report['save_peak_mib']:7.0f}  "
                f"resume peak {report['resume_peak_mib']:7.0f}  end peak {report['end_peak_mib']:7.0f}  "
                f"({seconds:.0f} s)",
                flush=True,
            )
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "report_dir")},
        "parameters": args.layers * (args.width * args.width + args.width),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    plot(result, args.out.with_suffix(".png"))


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    builds = sorted({r["build"] for r in result["rows"]}, key=["init", "configure_model"].index)
    fig, axes = plt.subplots(1, len(builds), figsize=(7 * len(builds), 4.5), squeeze=False, sharey=True)
    bars = [
        ("setup_peak_mib", "peak until training"),
        ("train_peak_mib", "peak in training"),
        ("save_peak_mib", "peak saving a checkpoint"),
        ("resume_peak_mib", "peak resuming"),
    ]
    for ax, build in zip(axes[0], builds, strict=True):
        rows = [r for r in result["rows"] if r["build"] == build]
        labels = [f"K={r['stages']} {r['memory']}\nstage {r['stage']}" if r["stages"] > 1 else "backprop" for r in rows]
        width = 0.8 / (len(bars) + 1)
        for b, (key, label) in enumerate(bars):
            values = [(r[key] - r["imports_mib"]) / 1024 for r in rows]
            ax.bar([i - 0.4 + width * (b + 0.5) for i in range(len(rows))], values, width, label=label)
        formula_x = [i - 0.4 + width * (len(bars) + 0.5) for i in range(len(rows))]
        ax.bar(formula_x, [r["formula_mib"]["total"] / 1024 for r in rows], width, label="formula", color="black")
        ax.set_xticks(list(range(len(rows))), labels, fontsize=7, rotation=90)
        ax.set_title(f"model built in {build}")
        ax.set_ylabel("GiB per process above the imports")
    axes[0][0].legend(fontsize=8)
    millions = result["parameters"] / 1e6
    imports = result["rows"][0]["imports_mib"] / 1024
    fig.suptitle(
        f"Host memory per process, MLP of {millions:.0f}M parameters, SGD + momentum "
        f"(above the {imports:.2f} GiB every process holds after its imports)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
