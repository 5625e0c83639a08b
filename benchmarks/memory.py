"""Memory per process: backprop on one process against DDG stages, next to what each stage needs.

Run from the repository root::

    python benchmarks/memory.py                          # MLP 16 x 2048x2048 (67M parameters), batch 8
    python benchmarks/memory.py --width 4096             # the 268M-parameter MLP (1 GiB of fp32 weights)
    python benchmarks/memory.py --stages 2 --memory stash --build init
    python benchmarks/memory.py --width 4096 --memory stash --plan layers memory   # also the memory-balanced cut
    python benchmarks/memory.py --plot benchmarks/results/memory.json              # only the plot, of that JSON

The model is an MLP of ``--layers`` square linear layers, trained with SGD + momentum for ``--steps`` steps with
``Trainer.fit``: plain Lightning on one process (backprop), and ``DDGStrategy`` with K = 2 and 4 stages, in each
memory mode, cut into equal layer counts (``--plan layers``: ``balance``) or where the largest stage holds least
(``--plan memory``: ``balance_by="memory"``). The LightningModule builds its layers in ``__init__`` (``init``)
or in ``configure_model`` (``configure_model``). Every configuration runs as a user runs a script: a fresh
``python`` process that launches the others (``strategy="ddg"``).

Each process reports its host memory (on the CPU; on a GPU it would be ``torch.cuda.max_memory_allocated``) in
two measures, both from ``/proc/self/status``. What every process holds after its imports depends on torch's build:
on a machine without a GPU, measure with the CPU build (``pip install torch --index-url
https://download.pytorch.org/whl/cpu``), since a CUDA build loads its CUDA libraries there too (about 500 MiB more
resident per process, ``docs/performance.md``).

- *resident* (RSS): ``VmRSS``, and its high-water mark ``VmHWM`` (reset before each phase); exact, and what a
  process counts against a node's memory, but it includes the pages of the shared libraries it maps (torch's
  ``.so`` files and Python's), which every process of a node maps from the same page cache: K stages on one node
  hold them once, not K times;
- *private*: the resident memory less those file pages (``VmRSS - RssFile``: the process's own heap, tensors and
  Python objects, which no other process shares). Its peak in a phase is bounded from above by ``VmHWM`` less the
  ``RssFile`` at the phase's start (file pages only grow while a process runs, so this is never below the true
  peak; it counts as private the pages of a checkpoint file the process maps or writes).

The moments and phases:

With ``--start-method forkserver`` the stage processes are forked from a server that imported torch, Lightning and
lightning_ddg once: the pages those imports wrote are shared with the server and between the stages until one of
them writes to them. Both measures above count such pages in every process that maps them (anonymous pages count as
private however many processes share them), so each process also reports, at the moments below that are not peaks,
its *unique* memory (``Private_Clean + Private_Dirty`` of ``/proc/self/smaps_rollup``: the pages no other process
maps, what ending it frees) and its *PSS* (each shared page divided among the processes that map it).

- ``imports``: what it holds before the model is built (Python, torch, Lightning, lightning_ddg; for a process
  forked from the server, what it holds when its fit begins), with the
  breakdown ``baseline`` (after ``import torch``, ``import lightning``, ``import lightning_ddg``) and the optional
  packages loaded by then (``heavy_modules``; ``loaded_during_fit``: those loaded after the imports, by the time
  training begins);
- ``setup``: the most it held from its start until training began (building the model, the cut);
- ``after_setup``: what it holds when training begins;
- ``train``: the most it held during the training steps (the high-water mark is reset when they begin);
- ``save``: the most it held while a checkpoint was saved after the last step (``trainer.save_checkpoint``);
- ``resume``: the most it held in a second fit, of a new model, from its setup until training began, which
  includes reading that checkpoint (``ckpt_path``);
- ``end``: the most it held after the save until fit ended: the drain, and the full weights gathered back into
  the module of a model built in ``__init__``;

next to the formula of what the stage needs (:func:`lightning_ddg.stage_memory.stage_memory`, the formula the
planner balances by with ``balance_by="memory"``): its parameters, their gradients, the optimizer state, the weight
copies of in-flight batches (``d_k`` copies on a stage with delay ``d_k > 0`` in ``stash`` and ``recompute``,
none in ``replay`` and on the last stage) and the activations of ``d_k + 1`` in-flight batches. Prints a table and
the memory targets, met or not, in both measures; writes JSON to ``--out`` and a PNG beside it.
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

MIB = 2**20
_FIELDS = ("VmRSS", "VmHWM", "RssFile")


def _status() -> dict[str, float]:
    """``VmRSS``, ``VmHWM`` and ``RssFile`` of this process, in MiB."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            field = line.split(":")[0]
            if field in _FIELDS:
                found[field] = int(line.split()[1]) / 1024
    return found


def _private(status: dict[str, float]) -> float:
    return status["VmRSS"] - status["RssFile"]


def _unique() -> dict[str, float]:
    """``unique``: the pages only this process maps (``Private_Clean + Private_Dirty`` of ``smaps_rollup``, what
    ending it would free), and ``pss``: its resident memory with each shared page divided among the processes that
    map it; in MiB."""
    found = {}
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if parts[0] in ("Pss:", "Private_Clean:", "Private_Dirty:"):
                found[parts[0][:-1]] = int(parts[1]) / 1024
    return {"unique": found["Private_Clean"] + found["Private_Dirty"], "pss": found["Pss"]}


def _file_pages() -> dict[str, float]:
    """The resident pages of the files this process maps (``Rss - Anonymous`` of each mapping in
    ``/proc/self/smaps``), by library, in MiB: clean pages of the page cache, which every process mapping the same
    file shares."""
    groups: dict[str, float] = {}
    group = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping's header: addresses, permissions, offset, device, inode, path
                path = parts[5] if len(parts) > 5 else ""
                name = path.rsplit("/", 1)[-1]
                if not path.startswith("/"):
                    group = None
                elif name.startswith(("libcu", "libnv", "libcudnn", "libnccl")) or "_cuda" in name:
                    group = "CUDA libraries"
                elif name.startswith(("libtorch_cpu", "libtriton", "libtorch_python")):
                    group = name.split(".")[0]
                else:
                    group = "other files"
            elif group is not None and parts[0] in ("Rss:", "Anonymous:"):
                groups[group] = groups.get(group, 0.0) + int(parts[1]) / 1024 * (1 if parts[0] == "Rss:" else -1)
    return groups


# what each import adds to a process, measured as it happens (the stages re-run this script, so theirs too)
BASELINE = [("python", _status())]
import torch  # noqa: E402

BASELINE.append(("import torch", _status()))
import lightning as L  # noqa: E402

BASELINE.append(("import lightning", _status()))
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

# optional packages a stage does not need, which Lightning may import (through torchmetrics) when installed
HEAVY = (
    "torchvision",
    "transformers",
    "timm",
    "matplotlib",
    "sklearn",
    "scipy",
    "wandb",
    "tensorboard",
    "tensorboardX",
    "torch._dynamo",
    "torch._inductor",
    "triton",
    "sympy",
)


def _heavy_loaded() -> list[str]:
    return [name for name in HEAVY if name in sys.modules]


ROOT = Path(__file__).resolve().parents[1]


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

    def __init__(self, out: str, imports: dict[str, Any], resume: bool = False) -> None:
        self.out = out
        self.imports = imports
        self.resume = resume
        self.report: dict[str, Any] = {}
        self.base = imports["status"]  # the status at the start of the phase being measured

    def _phase(self, name: str) -> None:
        """Record the peak of the phase that ends now, and start the next one."""
        now = _status()
        self.report[f"{name}_peak_mib"] = now["VmHWM"]
        self.report[f"{name}_private_peak_mib"] = now["VmHWM"] - self.base["RssFile"]
        _reset_peak()
        self.base = _status()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.resume and self.imports["pid"] != os.getpid():  # forked from the server: its own start
            _reset_peak()
            self.base = _status()
            self.imports = {**self.imports, "status": self.base, "unique": _unique()}
        if self.resume:
            _reset_peak()  # the resumed fit: from here to training, the cut and the reading of the checkpoint
            self.base = _status()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stage = getattr(trainer.strategy, "stage", None)
        now = _status()
        self.report = {
            "rank": trainer.global_rank,
            "stage": stage.stage_index if stage is not None else 0,
            "delay": stage.delay if stage is not None else 0,
            "parameters": sum(p.numel() for p in pl_module.parameters()),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in pl_module.parameters()),
            "layers": sum(1 for m in pl_module.modules() if isinstance(m, nn.Linear) and "weight" in m._parameters),
            "imports_mib": self.imports["status"]["VmRSS"],
            "imports_private_mib": _private(self.imports["status"]),
            "imports_unique_mib": self.imports["unique"]["unique"],
            "imports_pss_mib": self.imports["unique"]["pss"],
            "forked": self.imports["pid"] != os.getpid(),
            "imports_file_pages_mib": self.imports["file_pages"],
            "after_setup_unique_mib": _unique()["unique"],
            "after_setup_pss_mib": _unique()["pss"],
            "baseline": self.imports["baseline"],
            "heavy_modules": self.imports["heavy_modules"],
            "loaded_during_fit": [m for m in _heavy_loaded() if m not in self.imports["heavy_modules"]],
            "after_setup_mib": now["VmRSS"],
            "after_setup_private_mib": _private(now),
        }
        self._phase("setup" if not self.resume else "resume")
        if self.resume:
            self._write(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.resume or trainer.global_step < trainer.max_steps:
            return
        self._phase("train")
        self.report["after_train_unique_mib"] = _unique()["unique"]
        self.report["after_train_pss_mib"] = _unique()["pss"]
        optimizer = trainer.optimizers[0]
        self.report["optimizer_state_bytes"] = sum(
            v.numel() * v.element_size()
            for state in optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        trainer.save_checkpoint(os.path.join(self.out, "last.ckpt"))
        self._phase("save")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.resume:
            self._phase("end")  # the drain, and the gathering after fit
            self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        name = f"rank{trainer.global_rank}{'_resume' if self.resume else ''}.json"
        with open(os.path.join(self.out, name), "w") as f:
            json.dump(self.report, f)


def run_one(args: argparse.Namespace) -> None:
    """One configuration, in this process and the ones it launches (each writes its own reports): a fit that
    saves a checkpoint at its last step, then a fit of a new model that resumes from it."""
    from lightning_ddg import DDGStrategy

    status = _status()
    baseline = [*BASELINE, ("import lightning_ddg", status)]
    imports = {
        "status": status,  # Python, torch, Lightning, lightning_ddg: what every process holds before the model
        "baseline": [{"after": n, "rss_mib": st["VmRSS"], "private_mib": _private(st)} for n, st in baseline],
        "heavy_modules": _heavy_loaded(),
        "unique": _unique(),
        "pid": os.getpid(),
        "file_pages": _file_pages(),
    }
    torch.set_num_threads(1)
    stages, layers = args.stages[0], args.layers
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(args.steps * args.batch, args.width, generator=g)), args.batch)
    for resume in (False, True):
        model = MLP(args.width, layers, args.build[0])
        if stages == 1:
            strategy: Any = "auto"
        else:
            if args.plan[0] == "memory":
                strategy = DDGStrategy(balance_by="memory", memory=args.memory[0], start_method=args.start_method)
            else:
                balance = [layers // stages] * stages
                strategy = DDGStrategy(balance=balance, memory=args.memory[0], start_method=args.start_method)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=stages,
            strategy=strategy,
            max_steps=args.steps + (1 if resume else 0),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[_Measure(args.report_dir, imports, resume)],
        )
        ckpt_path = os.path.join(args.report_dir, "last.ckpt") if resume else None
        trainer.fit(model, data, ckpt_path=ckpt_path)
        del model, trainer, strategy
        gc.collect()


def formula(report: dict[str, Any], memory: str, args: argparse.Namespace) -> dict[str, float]:
    """What the stage needs, in MiB: parameters, gradients, optimizer state, weight copies, activations."""
    from lightning_ddg.stage_memory import stage_memory

    batch_bytes = args.batch * args.width * 4  # one layer's input for one batch, fp32: what each layer saves
    parts = stage_memory(
        parameter_bytes=report["parameter_bytes"],
        activation_bytes=report["layers"] * batch_bytes,
        input_bytes=batch_bytes,
        delay=report["delay"],
        memory=memory,
        optimizer_state_bytes=report.get("optimizer_state_bytes", 0),
    )
    return {k: v / MIB for k, v in parts.items()}


def configurations(args: argparse.Namespace) -> list[tuple[int, str, str, str]]:
    configs = []
    for build in args.build:
        for stages in args.stages:
            for memory in args.memory if stages > 1 else ["-"]:
                for cut in args.plan if stages > 1 else ["-"]:
                    configs.append((stages, memory, build, cut))
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
    parser.add_argument("--plan", nargs="+", choices=["layers", "memory"], default=["layers"])
    parser.add_argument("--start-method", choices=["popen", "forkserver"], default="popen")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    parser.add_argument("--plot", type=Path, help="only draw the plot of an earlier run's JSON, beside it")
    parser.add_argument("--report-dir", help=argparse.SUPPRESS)  # set for the run of one configuration
    args = parser.parse_args()
    if args.plot is not None:  # an environment kept free of matplotlib measures; another one draws
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    if args.report_dir is not None:
        run_one(args)
        return

    rows = []
    for stages, memory, build, cut in configurations(args):
        with tempfile.TemporaryDirectory() as report_dir:
            command = [sys.executable, __file__, "--width", str(args.width), "--layers", str(args.layers)]
            command += ["--batch", str(args.batch), "--steps", str(args.steps), "--stages", str(stages)]
            command += ["--memory", memory if memory != "-" else "stash", "--build", build, "--report-dir", report_dir]
            command += ["--plan", cut if cut != "-" else "layers", "--start-method", args.start_method]
            start = time.perf_counter()
            subprocess.run(command, check=True, cwd=ROOT, timeout=1800, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            reports = [json.loads((Path(report_dir) / f"rank{r}.json").read_text()) for r in range(stages)]
            for report in reports:
                resumed = json.loads((Path(report_dir) / f"rank{report['rank']}_resume.json").read_text())
                report["resume_peak_mib"] = resumed["resume_peak_mib"]
                report["resume_private_peak_mib"] = resumed["resume_private_peak_mib"]
        model_bytes = sum(r["parameter_bytes"] for r in reports)
        for report in sorted(reports, key=lambda r: r["stage"]):
            need = formula(report, memory, args)
            # after fit, a model built in __init__ is whole again on every rank: the other stages' weights too
            gathered = (model_bytes - report["parameter_bytes"]) / MIB if build == "init" and stages > 1 else 0.0
            row = {"stages": stages, "memory": memory, "build": build, "plan": cut, **report, "formula_mib": need}
            row["after_fit_formula_mib"] = need["total"] + gathered
            rows.append(row)
            peaks = "  ".join(
                f"{phase} {report[f'{phase}_peak_mib']:5.0f}/{report[f'{phase}_private_peak_mib']:5.0f}"
                for phase in PHASES
            )
            print(
                f"{build:>15} K={stages} {memory:>9} {cut:>6} stage {report['stage']} ({report['layers']:2d} layers): "
                f"formula {need['total']:5.0f}  "
                f"imports {report['imports_mib']:4.0f}/{report['imports_private_mib']:4.0f}  "
                f"after setup {report['after_setup_mib']:5.0f}/{report['after_setup_private_mib']:5.0f}  "
                f"peaks: {peaks}  "
                f"unique/PSS: imports {report['imports_unique_mib']:.0f}/{report['imports_pss_mib']:.0f} "
                f"after setup {report['after_setup_unique_mib']:.0f}/{report['after_setup_pss_mib']:.0f} "
                f"after training {report['after_train_unique_mib']:.0f}/{report['after_train_pss_mib']:.0f}"
                f"{' (forked)' if report['forked'] else ''}  ({seconds:.0f} s)",
                flush=True,
            )
    print("(MiB; resident/private; peaks of the phases setup, train, save, resume and end of fit)")
    first = rows[0]
    print(
        "baseline of a process (resident/private MiB): "
        + ", ".join(f"{b['after']} {b['rss_mib']:.0f}/{b['private_mib']:.0f}" for b in first["baseline"])
        + f"; optional packages loaded by the imports: {', '.join(first['heavy_modules']) or 'none'}; "
        + f"loaded later during fit: {', '.join(sorted({m for r in rows for m in r['loaded_during_fit']})) or 'none'}"
    )
    pages = sorted(first["imports_file_pages_mib"].items(), key=lambda item: -item[1])
    print("file pages after the imports (MiB): " + ", ".join(f"{name} {mib:.0f}" for name, mib in pages))
    verdicts = targets(rows)
    for line in verdicts:
        print(line)
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "report_dir")},
        "load_average": os.getloadavg(),
        "parameters": args.layers * (args.width * args.width + args.width),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "rows": rows,
        "targets": verdicts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    plot(result, args.out.with_suffix(".png"))


PHASES = ("setup", "train", "save", "resume", "end")
ALLOWANCE_MIB = 512  # the targets' "+ 0.5 GiB (imports, buffers)"


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The memory targets, met or not, in both measures (resident and private, whole process), and above the
    imports."""
    lines = []
    measures = (("resident", "_peak_mib", "imports_mib"), ("private", "_private_peak_mib", "imports_private_mib"))

    def worst(selected: list[dict[str, Any]], phases: tuple[str, ...], bound: str = "formula") -> str:
        def need(r: dict[str, Any]) -> float:
            return r["formula_mib"]["total"] if bound == "formula" else r[bound]

        parts = []
        for name, suffix, imports in measures:
            over = [(r[f"{phase}{suffix}"] - need(r), r, phase) for r in selected for phase in phases]
            excess, r, phase = max(over, key=lambda o: o[0])
            verdict = "met" if excess <= ALLOWANCE_MIB else "NOT met"
            parts.append(
                f"{name}: {verdict}, at most formula {excess:+.0f} MiB (K={r['stages']} stage {r['stage']}, "
                f"{phase}; imports {r[imports]:.0f} of it)"
            )
        above = max(r[f"{phase}_peak_mib"] - r["imports_mib"] - need(r) for r in selected for phase in phases)
        return "; ".join(parts) + f"; above the imports: formula {above:+.0f} MiB"

    ddg = [r for r in rows if r["stages"] > 1]
    built = [r for r in ddg if r["build"] == "configure_model"]
    if built:
        lines.append(f"configure_model, every stage's peak <= formula + 0.5 GiB: {worst(built, PHASES)}")
    backprop = [r for r in rows if r["stages"] == 1 and r["build"] == "configure_model"]
    k4 = [r for r in built if r["stages"] == 4]
    if backprop and k4:
        b = backprop[0]
        for memory, cut in sorted({(r["memory"], r["plan"]) for r in k4}):
            largest = max(
                (r for r in k4 if (r["memory"], r["plan"]) == (memory, cut)), key=lambda r: r["train_peak_mib"]
            )
            ratios = [
                largest["train_peak_mib"] / b["train_peak_mib"],
                largest["train_private_peak_mib"] / b["train_private_peak_mib"],
                (largest["train_peak_mib"] - largest["imports_mib"]) / (b["train_peak_mib"] - b["imports_mib"]),
            ]
            verdicts = ["met" if ratio <= 0.6 else "NOT met" for ratio in ratios]
            lines.append(
                f"configure_model K=4 {memory}, cut by {cut}, largest stage's training peak <= 0.6x backprop's "
                f"(stage {largest['stage']}, {largest['layers']} layers): resident {ratios[0]:.2f}x ({verdicts[0]}), "
                f"private {ratios[1]:.2f}x ({verdicts[1]}), above the imports {ratios[2]:.2f}x"
            )
    init = [r for r in ddg if r["build"] == "init"]
    if init:
        parts = []
        for name, key in (("resident", "after_setup_mib"), ("private", "after_setup_private_mib")):
            excess = max(r[key] - r["formula_mib"]["total"] for r in init)
            parts.append(
                f"{name}: {'met' if excess <= ALLOWANCE_MIB else 'NOT met'}, at most formula {excess:+.0f} MiB"
            )
        lines.append(f"__init__, after setup each process <= formula + 0.5 GiB: {'; '.join(parts)}")
        lines.append(f"__init__, saving <= formula + 0.5 GiB: {worst(init, ('save',))}")
        lines.append(
            "__init__, end of fit (the whole model gathered back on every rank) <= formula + the other stages' "
            f"weights + 0.5 GiB: {worst(init, ('end',), 'after_fit_formula_mib')}"
        )
    if built:
        lines.append(f"configure_model, saving and resuming <= formula + 0.5 GiB: {worst(built, ('save', 'resume'))}")
    return lines


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
        ("setup_private_peak_mib", "peak until training"),
        ("train_private_peak_mib", "peak in training"),
        ("save_private_peak_mib", "peak saving a checkpoint"),
        ("resume_private_peak_mib", "peak resuming"),
        ("end_private_peak_mib", "peak at the end of fit"),
    ]
    for ax, build in zip(axes[0], builds, strict=True):
        rows = [r for r in result["rows"] if r["build"] == build]
        labels = [
            f"K={r['stages']} {r['memory']} {r['plan']}\nstage {r['stage']}" if r["stages"] > 1 else "backprop"
            for r in rows
        ]
        width = 0.8 / (len(bars) + 1)
        for b, (key, label) in enumerate(bars):
            values = [r[key] / 1024 for r in rows]
            ax.bar([i - 0.4 + width * (b + 0.5) for i in range(len(rows))], values, width, label=label)
        formula_x = [i - 0.4 + width * (len(bars) + 0.5) for i in range(len(rows))]
        needs = [(r["formula_mib"]["total"] + r["imports_private_mib"]) / 1024 for r in rows]
        ax.bar(formula_x, needs, width, label="formula + imports", color="black")
        ax.set_xticks(list(range(len(rows))), labels, fontsize=7, rotation=90)
        ax.set_title(f"model built in {build}")
        ax.set_ylabel("private memory per process, GiB")
    axes[0][0].legend(fontsize=8)
    millions = result["parameters"] / 1e6
    imports = result["rows"][0]["imports_private_mib"] / 1024
    fig.suptitle(
        f"Private host memory per process (resident less shared library pages), MLP of {millions:.0f}M parameters, "
        f"SGD + momentum ({imports:.2f} GiB of it after the imports)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
