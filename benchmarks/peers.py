"""DDG against its peers, side by side: one command, every configuration measured in the same run.

Run from the repository root (about 10 minutes on a 2-core machine)::

    python benchmarks/peers.py                       # all models, K=2
    python benchmarks/peers.py --models mlp --steps 100

For each model (a balanced MLP, the CIFAR ResNet-20 of ``examples/cifar_resnet.py``, a transformer encoder),
on the same batches and batch size:

- ``backprop``: one process;
- ``ddp``: K processes of torch's ``DistributedDataParallel`` (what Lightning's ``strategy="ddp"`` runs), each
  on ``1/K`` of the batch, so every step is the same optimization step as backprop's;
- ``gpipe m=…`` and ``1f1b m=…``: ``torch.distributed.pipelining``'s ``ScheduleGPipe`` and ``Schedule1F1B``
  with ``m`` micro-batches, on the same K stages as DDG;
- ``ddg stash|recompute|replay``: lightning-ddg's stage runtime on K stages in each memory mode.

Every process is a CPU worker with one thread, pinned to a core of its own, so K processes use K cores where
backprop uses one. Each configuration runs in fresh processes: untimed warm-up steps (which also fill the DDG
pipeline), then timed windows of steps, each started by a barrier; a window lasts as long as its slowest rank,
and throughput is that of the best window (the one least disturbed by other work; the median is printed
too). Peak memory is each process's peak resident memory less what it held once the model was built. For DDG the
stages' own figures split each step into compute, waiting on a neighbour and sending. Also measured: the
Lightning Trainer with ``strategy="ddg"`` on one device against a plain Lightning run (the cost of the
strategy when it has nothing to pipeline).

Results go to ``--out`` (JSON) and a PNG next to it; ``docs/benchmarks.md`` shows them.
"""

from __future__ import annotations

import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and (inherited) in the workers
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]  # harness; cifar_resnet

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from cifar_resnet import cifar_resnet  # noqa: E402
from harness import can_pin, launch, peak_rss_mib  # noqa: E402
from torch import nn  # noqa: E402

from lightning_ddg import DDGStage, StageLinks, Topology, split_module  # noqa: E402

CLASSES = 10
TRACED_STEPS = 8
Step = Callable[[torch.Tensor, torch.Tensor], None]


# --- models --------------------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(512, CLASSES))


class TransformerBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TransformerClassifier(nn.Module):
    def __init__(self, features: int = 32, d: int = 128, heads: int = 4, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.blocks = nn.Sequential(*[TransformerBlock(d, heads) for _ in range(depth)])
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(dim=1))


# name: (builder, one sample's shape, batch size, K=2 split point, timed steps)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, str, int]] = {
    "mlp": (mlp, (512,), 128, "8", 100),
    "resnet": (lambda: cifar_resnet(20), (3, 32, 32), 32, "layer2.0", 20),  # the full-resolution group is slow
    "transformer": (TransformerClassifier, (64, 32), 32, "blocks.2", 30),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]()


def batches(name: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, shape, batch, _, _ = MODELS[name]
    g = torch.Generator().manual_seed(1)
    return torch.randn(count, batch, *shape, generator=g), torch.randint(0, CLASSES, (count, batch), generator=g)


# --- engines: each returns a step(x, y) and a finish() for this rank -----------------------------------------
def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def backprop(model: nn.Module, rank: int, world_size: int, cfg: dict) -> tuple[Step, Callable, dict]:
    optimizer, loss_fn = _optimizer(model.parameters()), nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step, lambda: None, {}


def ddp(model: nn.Module, rank: int, world_size: int, cfg: dict) -> tuple[Step, Callable, dict]:
    wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer, loss_fn = _optimizer(wrapped.parameters()), nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(wrapped(x.chunk(world_size)[rank]), y.chunk(world_size)[rank]).backward()
        optimizer.step()

    return step, lambda: None, {}


def _stage_modules(model: nn.Module, cfg: dict) -> list[nn.Module]:
    return split_module(model, split_points=[MODELS[cfg["model"]][3]]).train


def torch_pipelining(model: nn.Module, rank: int, world_size: int, cfg: dict) -> tuple[Step, Callable, dict]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    module = _stage_modules(model, cfg)[rank]  # torch's convention: stage k on rank k
    stage = PipelineStage(module, rank, world_size, torch.device("cpu"))
    schedule_class = ScheduleGPipe if cfg["engine"] == "gpipe" else Schedule1F1B
    schedule = schedule_class(stage, cfg["microbatches"], loss_fn=nn.CrossEntropyLoss())
    optimizer = _optimizer(module.parameters())

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(x)
        elif rank == world_size - 1:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        optimizer.step()

    return step, lambda: None, {}


def ddg(model: nn.Module, rank: int, world_size: int, cfg: dict) -> tuple[Step, Callable, dict]:
    topology = Topology(num_stages=world_size)
    k = topology.stage_of(rank)
    links = StageLinks.create(topology, rank, torch.device("cpu"))
    stage = DDGStage(_stage_modules(model, cfg)[k], k, world_size, links, memory=cfg["memory"])
    optimizer, loss_fn = _optimizer(stage.parameters), nn.CrossEntropyLoss()
    figures: dict[str, Any] = {"stage": k, "events": []}
    events = figures["events"]  # (what, batch, start, end) of the first timed steps, for the timeline picture

    def traced(what: str, batch: int, call: Callable[[], Any]) -> Any:
        if not cfg["warmup"] <= stage.batches_forwarded - (what != "forward") < cfg["warmup"] + TRACED_STEPS:
            return call()
        start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across the processes of one machine
        result = call()
        events.append((what, batch, start, time.perf_counter()))
        return result

    def update() -> None:
        stage.install_gradients()
        optimizer.step()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        out = traced("forward", stage.batches_forwarded, lambda: stage.forward(x))
        loss = loss_fn(out, y) if stage.is_last else None
        if traced("backward", stage.batches_backwarded, lambda: stage.backward(loss)):
            traced("step", stage.batches_backwarded - 1, update)
        elif events and events[-1][0] == "backward" and stage.batches_backwarded == events[-1][1]:
            events.pop()  # warm-up: nothing was backwarded

    def finish() -> None:
        figures["snapshot"] = stage.counters.snapshot(0, 0)
        figures["activations_mib"] = stage.snapshots()[-1].activation_bytes / 2**20
        figures["stashed_weights_mib"] = stage.snapshots()[-1].stashed_weight_bytes / 2**20
        for ready in stage.drain():
            if ready:
                update()
        links.close()

    def start_timing() -> None:
        figures["start"] = stage.counters.snapshot(0, 0)

    figures["start_timing"] = start_timing
    return step, finish, figures


ENGINES = {"backprop": backprop, "ddp": ddp, "gpipe": torch_pipelining, "1f1b": torch_pipelining, "ddg": ddg}


def run_rank(rank: int, world_size: int, cfg: dict) -> dict[str, Any]:
    model = build(cfg["model"])
    xs, ys = batches(cfg["model"], cfg["warmup"] + cfg["steps"])
    step, finish, figures = ENGINES[cfg["engine"]](model, rank, world_size, cfg)
    base_mib = peak_rss_mib()
    for i in range(cfg["warmup"]):
        step(xs[i], ys[i])
    if "start_timing" in figures:
        figures.pop("start_timing")()
    windows, per_window = [], cfg["steps"] // cfg["windows"]
    cpu_start = time.process_time()
    for w in range(cfg["windows"]):  # the ranks start each window together
        dist.barrier()
        start = time.perf_counter()
        for i in range(cfg["warmup"] + w * per_window, cfg["warmup"] + (w + 1) * per_window):
            step(xs[i], ys[i])
        windows.append(time.perf_counter() - start)
    elapsed, cpu = sum(windows), time.process_time() - cpu_start
    finish()
    report = {
        "rank": rank,
        "windows_s": windows,
        "elapsed_s": elapsed,
        "cpu_share": cpu / elapsed,
        "peak_mib": peak_rss_mib() - base_mib,
    }
    if "snapshot" in figures:
        before, after = figures.pop("start"), figures.pop("snapshot")
        for name in ("busy", "wait", "send"):
            report[f"{name}_share"] = (getattr(after, f"{name}_us") - getattr(before, f"{name}_us")) / 1e6 / elapsed
    return report | figures


# --- Lightning with one device --------------------------------------------------------------------------------
def lightning_rank(rank: int, world_size: int, cfg: dict) -> dict[str, Any]:
    """Seconds per step of a Lightning fit on one CPU process, plain or with ``strategy=DDGStrategy()``."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ddg import DDGStrategy

    xs, ys = batches(cfg["model"], cfg["warmup"] + cfg["steps"])

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build(cfg["model"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return _optimizer(self.parameters())

    per_window = cfg["steps"] // cfg["windows"]

    class Clock(L.Callback):
        marks: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx >= cfg["warmup"] and (batch_idx - cfg["warmup"]) % per_window == 0:
                self.marks.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            self.marks.append(time.perf_counter())

    clock = Clock()
    data = DataLoader(TensorDataset(xs.flatten(0, 1), ys.flatten()), batch_size=xs.shape[1])
    trainer = L.Trainer(
        strategy=DDGStrategy() if cfg["engine"] == "lightning ddg" else "auto",
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(Module(), data)
    windows = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)][: cfg["windows"]]
    return {"rank": rank, "windows_s": windows, "elapsed_s": sum(windows)}


# --- the run --------------------------------------------------------------------------------------------------
def configurations(stages: int, microbatches: list[int]) -> list[tuple[str, int, dict]]:
    configs = [("backprop", 1, {"engine": "backprop"}), (f"ddp ×{stages}", stages, {"engine": "ddp"})]
    for engine in ("gpipe", "1f1b"):
        configs += [(f"{engine} m={m}", stages, {"engine": engine, "microbatches": m}) for m in microbatches]
    configs += [
        (f"ddg {memory}", stages, {"engine": "ddg", "memory": memory}) for memory in ("stash", "recompute", "replay")
    ]
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--stages", type=int, default=2, help="K, for DDG, DDP and the pipeline schedules")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: per model)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--windows", type=int, default=5, help="timed windows; the best one is reported")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per configuration")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers.json"))
    args = parser.parse_args()
    if args.stages != 2:
        parser.error("the models' split points are given for K=2 only")
    pin = can_pin(args.stages)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the start: other work on this machine distorts the figures")

    results: list[dict[str, Any]] = []
    for model in args.models:
        steps = args.steps or MODELS[model][4]
        batch = MODELS[model][2]
        runs = []
        for name, world_size, options in configurations(args.stages, args.microbatches):
            cfg = {"model": model, "steps": steps, "warmup": args.warmup, "windows": args.windows, "pin": pin}
            cfg |= options
            ranks = launch(run_rank, world_size, cfg, args.timeout)
            runs.append({"name": name, "processes": world_size, "ranks": ranks} | options)
        for engine in ("plain lightning", "lightning ddg"):
            cfg = {"model": model, "steps": steps, "warmup": args.warmup, "windows": args.windows, "pin": pin}
            cfg["engine"] = engine
            runs.append({"name": engine, "processes": 1, "ranks": launch(lightning_rank, 1, cfg, args.timeout)})
        for run in runs:
            # a window takes as long as its slowest rank; the best window is the least disturbed by other work
            windows = [max(w) for w in zip(*(r["windows_s"] for r in run["ranks"]), strict=True)]
            rates = sorted(steps // args.windows * batch / w for w in windows)
            run["samples_per_s"], run["median_samples_per_s"] = rates[-1], rates[len(rates) // 2]
            run["speedup"] = run["samples_per_s"] / runs[0]["samples_per_s"]
            run["peak_mib"] = max(r.get("peak_mib", float("nan")) for r in run["ranks"])
        params = sum(p.numel() for p in build(model).parameters())
        results.append({"model": model, "parameters": params, "batch_size": batch, "steps": steps, "runs": runs})
        report(results[-1])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    environment = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_before": load,
        "pinned": pin,
    }
    args.out.write_text(json.dumps({"environment": environment, "models": results}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("".join(markdown(r) for r in results))
    plot(results, args.out.with_suffix(".png"))
    timeline = args.out.with_name(args.out.stem + "_timeline.png")
    plot_timeline(results[0], timeline)
    print(f"\nwrote {args.out} (.md, .png) and {timeline}")


def report(result: dict[str, Any]) -> None:
    runs = {run["name"]: run for run in result["runs"]}
    print(
        f"\n{result['model']}: {result['parameters'] / 1e6:.2f}M parameters, batch {result['batch_size']}, "
        f"{result['steps']} timed steps, 1 thread per process"
    )
    print(f"{'configuration':<18}{'procs':>6}{'samples/s':>11}{'median':>9}{'speedup':>9}{'peak MiB':>10}   shares")
    for run in result["runs"]:
        shares = ""
        if run["name"].startswith("ddg"):
            shares = "  ".join(
                f"s{r['stage']} busy {r['busy_share']:.0%} wait {r['wait_share']:.0%} send {r['send_share']:.0%}"
                for r in sorted(run["ranks"], key=lambda r: r["stage"])
            )
        elif run["processes"] > 1 or run["name"] == "backprop":
            shares = "  ".join(f"r{r['rank']} cpu {r['cpu_share']:.0%}" for r in run["ranks"])
        print(
            f"{run['name']:<18}{run['processes']:>6}{run['samples_per_s']:>11.1f}{run['median_samples_per_s']:>9.1f}"
            f"{run['speedup']:>9.2f}"
            f"{run['peak_mib']:>10.1f}   {shares}"
        )
    pipelines = [r["samples_per_s"] for name, r in runs.items() if name.startswith(("gpipe", "1f1b"))]
    stash, recompute = runs["ddg stash"], runs["ddg recompute"]
    print(f"ddg stash / backprop:            {stash['speedup']:.2f}")
    print(f"ddg stash / best GPipe or 1F1B:  {stash['samples_per_s'] / max(pipelines):.2f}")
    print(f"ddg recompute time / stash time: {stash['samples_per_s'] / recompute['samples_per_s']:.2f}")
    lightning = runs["lightning ddg"]["samples_per_s"] / runs["plain lightning"]["samples_per_s"]
    print(f"Lightning, one device, strategy='ddg' / plain: {lightning:.3f}")


def markdown(result: dict[str, Any]) -> str:
    """One model's results as a Markdown table, with the ratios the targets are stated in."""
    runs = {run["name"]: run for run in result["runs"]}
    lines = [
        f"### {result['model']} ({result['parameters'] / 1e6:.2f}M parameters, batch {result['batch_size']})\n",
        "| configuration | processes | samples/s | speedup | peak memory (MiB) | stage compute / wait / send |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        shares = ""
        if run["name"].startswith("ddg"):
            ranks = sorted(run["ranks"], key=lambda r: r["stage"])
            shares = ", ".join(f"{r['busy_share']:.0%} / {r['wait_share']:.0%} / {r['send_share']:.0%}" for r in ranks)
        peak = "" if run["peak_mib"] != run["peak_mib"] else f"{run['peak_mib']:.0f}"
        lines.append(
            f"| {run['name']} | {run['processes']} | {run['samples_per_s']:.0f} | {run['speedup']:.2f} | {peak} "
            f"| {shares} |"
        )
    pipelines = max(r["samples_per_s"] for name, r in runs.items() if name.startswith(("gpipe", "1f1b")))
    stash = runs["ddg stash"]
    lines += [
        "",
        f"- DDG (stash) over backprop: **{stash['speedup']:.2f}×**; over the best of GPipe and 1F1B: "
        f"**{stash['samples_per_s'] / pipelines:.2f}×**",
        f"- stash+recompute takes **{stash['samples_per_s'] / runs['ddg recompute']['samples_per_s']:.2f}×** the "
        f"time of stash; activations held at most: stash {max(r['activations_mib'] for r in stash['ranks']):.1f}"
        f" MiB, recompute {max(r['activations_mib'] for r in runs['ddg recompute']['ranks']):.1f} MiB (per stage)",
        f'- Lightning on one device, `strategy="ddg"` over a plain run: '
        f"**{runs['lightning ddg']['samples_per_s'] / runs['plain lightning']['samples_per_s']:.3f}**",
        "",
    ]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        runs = [r for r in result["runs"] if "lightning" not in r["name"]]
        colors = ["#888" if not r["name"].startswith("ddg") else "#2a7" for r in runs]
        ax.barh([r["name"] for r in runs], [r["speedup"] for r in runs], color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("speedup over backprop on 1 process")
        ax.set_title(f"{result['model']} (batch {result['batch_size']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_timeline(result: dict[str, Any], path: Path) -> None:
    """The first steps of DDG (stash) on each stage: forwards, delayed backwards and optimizer steps in time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    (run,) = [r for r in result["runs"] if r["name"] == "ddg stash"]
    zero = min(e[2] for r in run["ranks"] for e in r["events"])
    colors = {"forward": "#4a90d9", "backward": "#e8913a", "step": "#999999"}
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.8 * len(run["ranks"])))
    for r in run["ranks"]:
        for what, batch, start, end in r["events"]:
            left, width = 1e3 * (start - zero), 1e3 * (end - start)
            ax.barh(r["stage"], width, left=left, color=colors[what], edgecolor="white", linewidth=0.5)
            if what != "step":
                ax.text(left + width / 2, r["stage"], str(batch), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(run["ranks"])), [f"stage {k}" for k in range(len(run["ranks"]))])
    ax.invert_yaxis()
    ax.set_xlabel("ms (numbers: batch)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(f"DDG, {len(run['ranks'])} stages, {result['model']}: {TRACED_STEPS} steps after the warm-up")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
