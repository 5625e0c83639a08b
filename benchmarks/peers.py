"""DDG against its peers, side by side: one command, every configuration measured in the same run.

Run from the repository root (7 to 11 minutes on a 2-core machine)::

    python benchmarks/peers.py                       # all models, K=2, CPU processes
    python benchmarks/peers.py --models mlp --steps 100
    python benchmarks/peers.py --device cuda --stages 4 --models resnet --batch-size 256   # one GPU per stage

For each model (a balanced MLP, the CIFAR ResNet-20 of ``examples/cifar_resnet.py``, a transformer encoder),
on the same batches and batch size:

- ``backprop``: one process;
- ``backprop ×K apart``: K processes each running backprop on batches of its own, with no communication at
  all: the samples/s of all K together is what K processes can do on this machine, the ceiling of every
  K-process configuration;
- ``stages ×K apart``: K processes, process ``k`` training stage ``k`` of the cut below alone (forward, backward
  with its input's gradient, its optimizer's step) on inputs computed beforehand, all at once, with no weight
  copy and no message: the samples/s of the slowest stage, what any pipeline on this cut that steps every
  stage's optimizer on every batch can reach at most;
- ``ddp``: K processes of torch's ``DistributedDataParallel`` (what Lightning's ``strategy="ddp"`` runs), each
  on ``1/K`` of the batch, so every step is the same optimization step as backprop's;
- ``gpipe m=…`` and ``1f1b m=…``: ``torch.distributed.pipelining``'s ``ScheduleGPipe`` and ``Schedule1F1B``
  with ``m`` micro-batches, on the same K stages as DDG;
- ``ddg stash|recompute|replay``: lightning-ddg's stage runtime on K stages in each memory mode.

The K stages are those :func:`lightning_ddg.plan` chooses (``--balance-by``, measured time by default),
for DDG and the pipeline schedules alike. Every process is a CPU worker with one thread, pinned to a core of
its own, so K processes use K cores where backprop uses one; with ``--device cuda``, rank ``r`` computes on
GPU ``r`` and the processes talk over NCCL. Each configuration runs in fresh processes: untimed warm-up
steps (which also fill the DDG pipeline), then timed windows of steps, each started by a barrier; a window
lasts as long as its slowest rank, and a run's throughput is that of its best window (the one least
disturbed by other work). Every configuration runs ``--rounds`` times, one round of all of them after
another, and counts its best run: the speed of a shared machine drifts over minutes, and so a slow spell
costs one run of a configuration, not its figure. Peak memory is each process's peak memory (resident; on a
GPU, allocated by torch) less what it held once the model was built. For DDG the stages' own figures split
each step into compute, waiting on a neighbour and sending. Also measured: the Lightning Trainer with
``strategy="ddg"`` on one device against a plain Lightning run (the cost of the strategy when it has nothing
to pipeline), three fits of each alternated in one process in each round, compared pair by pair (the median of the
pairs' ratios); and the ``fit`` rows of ``fit_path.py``, each
timed through ``Trainer.fit`` as a user runs it: backprop on one device, K such fits at once, ``strategy="ddp"``,
``strategy="ddg"`` on the cut above, and each of its stages trained alone by a fit of its own, all at once (what a
pipeline that cost nothing beyond its stages' own work would reach).

Results go to ``--out`` (JSON) and a PNG next to it; ``docs/benchmarks.md`` shows them.
"""

from __future__ import annotations

import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and (inherited) in the workers
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]  # harness; cifar_resnet

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from cifar_resnet import cifar_resnet  # noqa: E402
from fit_path import STAGE_APART_PARTS, STAGE_PARTS, fit_rates, timed_trainer  # noqa: E402
from harness import can_pin, device_of, launch, peak_memory_mib, reset_peak_memory, synchronize  # noqa: E402
from torch import nn  # noqa: E402

from lightning_ddg import Topology, build_stage, plan, split_module  # noqa: E402

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


# name: (builder, one sample's shape, batch size, timed steps per run on a CPU, and per Trainer.fit). A fit is timed
# in one window from its start: the MLP's 60 steps of about 10 ms would last under a second, which start-up and
# one logging event weigh on, so its fits time more steps; so do the one-device fits, whose three windows would
# otherwise last a quarter of a second each, less than the machine's drift takes to move them by the few percent
# they compare.
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, int, int]] = {
    "mlp": (mlp, (512,), 128, 60, 240),
    "resnet": (lambda: cifar_resnet(20), (3, 32, 32), 32, 12, 12),
    "transformer": (TransformerClassifier, (64, 32), 32, 18, 18),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]()


def batches(name: str, count: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = MODELS[name][1]
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(count, batch, *shape, generator=g), torch.randint(0, CLASSES, (count, batch), generator=g)
    return xs.to(device), ys.to(device)


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
    device = device_of(rank, cfg)
    wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer, loss_fn = _optimizer(wrapped.parameters()), nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(wrapped(x.chunk(world_size)[rank]), y.chunk(world_size)[rank]).backward()
        optimizer.step()

    return step, lambda: None, {}


def _stage_modules(model: nn.Module, cfg: dict) -> list[nn.Module]:
    return split_module(model, split_points=cfg["split_points"]).train


def torch_pipelining(model: nn.Module, rank: int, world_size: int, cfg: dict) -> tuple[Step, Callable, dict]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    module = _stage_modules(model, cfg)[rank]  # torch's convention: stage k on rank k
    stage = PipelineStage(module, rank, world_size, device_of(rank, cfg))
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


def stage_inputs(stages: list[nn.Module], k: int, cfg: dict, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """What stage ``k`` receives for each batch of a run of ``cfg`` (warm-up and timed steps): the outputs of the
    stages before it, computed beforehand without gradients."""
    xs, _ = batches(cfg["model"], cfg["warmup"] + cfg["steps"], cfg["batch_size"], device)
    inputs: list[tuple[torch.Tensor, ...]] = [(x,) for x in xs]
    with torch.no_grad():
        for earlier in stages[:k]:
            inputs = [tuple(earlier(*values)) for values in inputs]
    return inputs


def stage_apart(model: nn.Module, rank: int, world_size: int, cfg: dict) -> tuple[Step, Callable, dict]:
    """Stage ``rank`` of the cut trained alone, every rank at once: forward, backward and its optimizer's step on
    inputs computed beforehand (what the earlier stages send), with its input's gradient where a stage sends one
    back and a stand-in for the gradient the next stage would send (the last stage computes the loss). No weight
    copies, no messages: a window lasts as long as the slowest stage, so this is the floor of any pipeline on
    this cut that steps each stage's optimizer every batch."""
    modules = _stage_modules(model, cfg)
    module, last = modules[rank], rank == world_size - 1
    optimizer, loss_fn = _optimizer(module.parameters()), nn.CrossEntropyLoss()
    fed = iter(stage_inputs(modules, rank, cfg, device_of(rank, cfg)))
    seeds: list[torch.Tensor] = []

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        values = [v.detach().requires_grad_() if rank and v.is_floating_point() else v for v in next(fed)]
        optimizer.zero_grad(set_to_none=True)
        out = module(*values)
        if last:
            loss_fn(out, y).backward()
        else:
            seeds[:] = seeds or [torch.randn_like(o) for o in out]
            torch.autograd.backward(list(out), seeds)
        optimizer.step()

    return step, lambda: None, {}


def ddg(model: nn.Module, rank: int, world_size: int, cfg: dict) -> tuple[Step, Callable, dict]:
    built = build_stage(
        model,
        Topology(num_stages=world_size),
        rank,
        split_points=cfg["split_points"],
        device=device_of(rank, cfg),
        memory=cfg["memory"],
    )
    stage, links, k = built.stage, built.links, built.stage.stage_index
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


ENGINES = {
    "backprop": backprop,
    "ddp": ddp,
    "gpipe": torch_pipelining,
    "1f1b": torch_pipelining,
    "stages apart": stage_apart,
    "ddg": ddg,
}


def run_rank(rank: int, world_size: int, cfg: dict) -> dict[str, Any]:
    device = device_of(rank, cfg)
    model = build(cfg["model"]).to(device)
    xs, ys = batches(cfg["model"], cfg["warmup"] + cfg["steps"], cfg["batch_size"], device)
    step, finish, figures = ENGINES[cfg["engine"]](model, rank, world_size, cfg)
    base_mib = reset_peak_memory(device)
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
        synchronize(device)
        windows.append(time.perf_counter() - start)
    elapsed, cpu = sum(windows), time.process_time() - cpu_start
    finish()
    report = {
        "rank": rank,
        "windows_s": windows,
        "elapsed_s": elapsed,
        "cpu_share": cpu / elapsed,
        "peak_mib": peak_memory_mib(device) - base_mib,
    }
    if "snapshot" in figures:
        before, after = figures.pop("start"), figures.pop("snapshot")
        for name in ("busy", "wait", "send"):
            report[f"{name}_share"] = (getattr(after, f"{name}_us") - getattr(before, f"{name}_us")) / 1e6 / elapsed
    return report | figures


def lightning_module(model: str) -> type:
    """A plain LightningModule class around one of the models (imports Lightning only when called)."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build(model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return _optimizer(self.parameters())

    return Module


# --- Lightning with one device --------------------------------------------------------------------------------
def lightning_rank(rank: int, world_size: int, cfg: dict) -> dict[str, Any]:
    """Seconds per window of steps of Lightning fits on one process, plain and with ``strategy=DDGStrategy()``,
    :data:`LIGHTNING_PAIRS` of each alternated in this process (so that both see the machine alike), every fit's
    windows together."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ddg import DDGStrategy

    xs, ys = batches(cfg["model"], cfg["warmup"] + cfg["steps"], cfg["batch_size"], torch.device("cpu"))
    per_window = cfg["steps"] // cfg["windows"]

    Module = lightning_module(cfg["model"])

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx >= cfg["warmup"] and (batch_idx - cfg["warmup"]) % per_window == 0:
                synchronize(pl_module.device)
                self.marks.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            synchronize(pl_module.device)
            self.marks.append(time.perf_counter())

    fits: dict[str, list[list[float]]] = {engine: [] for engine in LIGHTNING}
    for _, engine in itertools.product(range(LIGHTNING_PAIRS), LIGHTNING):  # alternated: both see the same spells
        clock = Clock()
        trainer = timed_trainer(
            clock,
            strategy=DDGStrategy() if engine == "lightning ddg" else "auto",
            accelerator="gpu" if cfg["device"] == "cuda" else "cpu",
        )
        trainer.fit(Module(), DataLoader(TensorDataset(xs.flatten(0, 1), ys.flatten()), batch_size=xs.shape[1]))
        fits[engine].append([b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)][: cfg["windows"]])
    return {"rank": rank, "fits": list(fits.items())}


LIGHTNING = ("plain lightning", "lightning ddg")
LIGHTNING_PAIRS = 3  # fits of each per round: their steps differ by a few percent, what the comparison is about


def one_device_pairs(runs: list[dict[str, Any]]) -> list[float]:
    """``strategy="ddg"`` on one device over plain Lightning, for each pair of fits run one after the other: the
    ratio of their best windows' speeds. Its median is the figure: the machine's speed drifts by more than the few
    percent compared here within seconds; each pair sees about the same spell, the best window of all fits need
    not."""
    plain, ddg = ([fit for r in runs if r["name"] == name for fit in r["fit_windows"]] for name in LIGHTNING)
    return [min(p) / min(d) for p, d in zip(plain, ddg, strict=True)]


# --- the run --------------------------------------------------------------------------------------------------
def configurations(stages: int, microbatches: list[int]) -> list[tuple[str, int, dict]]:
    """Every configuration, in the order they run in each round."""
    configs = [
        ("backprop", 1, {"engine": "backprop"}),
        (f"backprop ×{stages} apart", stages, {"engine": "backprop", "apart": True}),
        (f"ddp ×{stages}", stages, {"engine": "ddp"}),
        (f"stages ×{stages} apart", stages, {"engine": "stages apart"}),
    ]
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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per process")
    parser.add_argument("--balance-by", choices=["time", "flops", "params"], default="time", help="how to cut")
    parser.add_argument("--batch-size", type=int, default=None, help="default: per model")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: per model)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per run; the best one counts")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every configuration, one round after another")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per configuration")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers.json"))
    args = parser.parse_args()
    if args.stages < 2:
        parser.error("--stages must be at least 2: the peers are pipelines and data parallelism over K processes")
    if args.device == "cuda" and torch.cuda.device_count() < args.stages:
        parser.error(
            f"--device cuda needs one GPU per stage: {args.stages} requested, {torch.cuda.device_count()} seen"
        )
    pin = args.device == "cpu" and can_pin(args.stages)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the start: other work on this machine distorts the figures")
    if args.device == "cpu" and not pin:
        print(f"warning: fewer cores than the {args.stages} processes: they share cores, and the figures show it")

    results: list[dict[str, Any]] = []
    for model in args.models:
        steps, fit_steps = args.steps or MODELS[model][3], args.steps or MODELS[model][4]
        batch = args.batch_size or MODELS[model][2]
        stages = cut(model, args.stages, batch, args.balance_by, args.device)
        common = {"model": model, "steps": steps, "warmup": args.warmup, "windows": args.windows, "pin": pin}
        common |= {"batch_size": batch, "device": args.device, "split_points": stages.split_points}
        runs = []
        for _ in range(args.rounds):  # a slow spell of the shared machine then hits one run, not a configuration
            for name, world_size, options in configurations(args.stages, args.microbatches):
                ranks = launch(run_rank, world_size, common | options, args.timeout)
                runs.append({"name": name, "processes": world_size, "ranks": ranks} | options)
            (fits,) = launch(lightning_rank, 1, common | {"steps": fit_steps}, args.timeout)
            for engine, windows in fits["fits"]:
                every = [w for fit in windows for w in fit]
                runs.append(
                    {
                        "name": engine,
                        "processes": 1,
                        "ranks": [{"rank": 0, "windows_s": every}],
                        "fit_windows": windows,
                        "steps": fit_steps,
                    }
                )
            for name, fit in fit_rates(common | {"steps": fit_steps}, args.stages, args.timeout).items():
                processes = 1 if name == "fit backprop" else args.stages  # the fits apart: K processes, summed
                runs.append(
                    {
                        "name": name,
                        "processes": processes,
                        "ranks": [],
                        "fit_samples_per_s": fit["samples_per_s"],
                        "fit_stages": fit["stages"],
                    }
                )
        for run in runs:
            if "fit_samples_per_s" in run:  # timed inside Trainer.fit (fit_path.py)
                run["samples_per_s"], run["peak_mib"] = run["fit_samples_per_s"], float("nan")
                continue
            # a window takes as long as its slowest rank; the best window is the least disturbed by other work
            windows = [max(w) for w in zip(*(r["windows_s"] for r in run["ranks"]), strict=True)]
            run_steps = run.get("steps", steps)
            samples = run_steps // args.windows * batch * (run["processes"] if run.get("apart") else 1)
            run["samples_per_s"] = samples / min(windows)
            run["peak_mib"] = max(r.get("peak_mib", float("nan")) for r in run["ranks"])
        one_device = one_device_pairs(runs)  # before best_of_repeats keeps one round's fits
        runs = best_of_repeats(runs)
        for run in runs:
            run["speedup"] = run["samples_per_s"] / runs[0]["samples_per_s"]
        params = sum(p.numel() for p in build(model).parameters())
        results.append(
            {
                "model": model,
                "parameters": params,
                "batch_size": batch,
                "steps": steps,
                "fit_steps": fit_steps,
                "stages": args.stages,
                "split_points": stages.split_points,
                "stage_cost_shares": [s.cost_share for s in stages.stages],
                "balanced_by": stages.balance_by,
                "ratios": target_ratios(runs) | {"lightning_ddg_over_plain": statistics.median(one_device)},
                "one_device_pairs": one_device,
                "runs": runs,
            }
        )
        report(results[-1])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    environment = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "load_average_before": load,
        "pinned": pin,
    }
    args.out.write_text(json.dumps({"environment": environment, "models": results}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("".join(markdown(r) for r in results))
    plot(results, args.out.with_suffix(".png"))
    timeline = args.out.with_name(args.out.stem + "_timeline.png")
    plot_timeline(results[0], timeline)
    print(f"\nwrote {args.out} (.md, .png) and {timeline}")


def cut(model: str, stages: int, batch: int, balance_by: str, device: str):
    """The stages every pipelined configuration of ``model`` runs, as :func:`lightning_ddg.plan` chooses them."""
    example = batches(model, 1, batch, torch.device(device))[0][0]
    chosen = plan(build(model).to(device), example, stages, balance_by=balance_by, device=device)
    print(f"\n{model}: cut by {chosen.balance_by}{f' ({chosen.note})' if chosen.note else ''}\n{chosen}")
    return chosen


def best_of_repeats(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per configuration name: the fastest of its repeats, with every repeat's samples/s kept."""
    best: dict[str, dict[str, Any]] = {}
    for run in runs:
        kept = best.setdefault(run["name"], run | {"repeats": []})
        kept["repeats"].append(run["samples_per_s"])
        if run["samples_per_s"] > kept["samples_per_s"]:
            best[run["name"]] = run | {"repeats": kept["repeats"]}
    return list(best.values())


def report(result: dict[str, Any]) -> None:
    print(
        f"\n{result['model']}: {result['parameters'] / 1e6:.2f}M parameters, batch {result['batch_size']}, "
        f"{result['steps']} timed steps ({result.get('fit_steps', result['steps'])} in a fit), 1 thread per process"
    )
    print(f"{'configuration':<20}{'procs':>6}{'samples/s':>11}{'rounds':>16}{'speedup':>9}{'peak MiB':>10}   shares")
    for run in result["runs"]:
        shares = ""
        if run["name"].startswith("ddg"):
            shares = "  ".join(
                f"s{r['stage']} busy {r['busy_share']:.0%} wait {r['wait_share']:.0%} send {r['send_share']:.0%}"
                for r in sorted(run["ranks"], key=lambda r: r["stage"])
            )
        elif run.get("fit_stages"):
            shares = "  ".join(f"s{r['stage']} {_stage_parts(r, ' ')}" for r in run["fit_stages"])
        elif run["processes"] > 1 or run["name"] == "backprop":
            shares = "  ".join(f"r{r['rank']} cpu {r['cpu_share']:.0%}" for r in run["ranks"])
        print(
            f"{run['name']:<20}{run['processes']:>6}{run['samples_per_s']:>11.1f}{_rounds(run):>16}"
            f"{run['speedup']:>9.2f}"
            f"{run['peak_mib']:>10.1f}   {shares}"
        )
    ratios = result["ratios"]
    print(f"ddg stash / backprop:            {ratios['ddg_over_backprop']:.2f}")
    print(
        f"ceiling (backprop apart):        {ratios['ceiling']:.2f}; "
        f"ddg stash reaches {ratios['ddg_over_backprop'] / ratios['ceiling']:.0%} of it"
    )
    print(
        f"each stage alone, all at once:   {ratios['stages_ceiling']:.2f} (the floor of a pipeline on this cut); "
        f"ddg stash reaches {ratios['ddg_over_backprop'] / ratios['stages_ceiling']:.0%} of it"
    )
    print(f"ddg stash / best GPipe or 1F1B:  {ratios['ddg_over_best_pipeline']:.2f}")
    print(f"ddg recompute time / stash time: {ratios['recompute_time_over_stash']:.2f}")
    print(f"Lightning, one device, strategy='ddg' / plain: {ratios['lightning_ddg_over_plain']:.3f}")
    print(
        f"Trainer.fit, strategy='ddg': {ratios['fit_ddg_over_fit_backprop']:.2f}x Trainer.fit backprop, "
        f"{ratios['fit_ddg_over_fit_ddp']:.2f}x strategy='ddp', "
        f"{ratios['fit_ddg_over_runtime_ddg']:.2f}x the runtime's ddg stash; "
        f"Trainer.fit backprop apart (the ceiling): {ratios['fit_ceiling']:.2f}x, ddg reaches "
        f"{ratios['fit_ddg_over_fit_backprop'] / ratios['fit_ceiling']:.0%} of it; "
        f"each stage's own fit apart (a pipeline that costs nothing more): {ratios['fit_stages_ceiling']:.2f}x, "
        f"ddg reaches {ratios['fit_ddg_over_fit_backprop'] / ratios['fit_stages_ceiling']:.0%} of it"
    )


def target_ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The ratios the performance targets are stated in."""
    by_name = {run["name"]: run for run in runs}
    stash = by_name["ddg stash"]

    def fit(row: str) -> float:  # a Trainer.fit row, named with its process count after "×" ("fit ddg ×2")
        rows = {name.split(" ×")[0] + (" apart" if name.endswith("apart") else ""): r for name, r in by_name.items()}
        return rows[row]["samples_per_s"]

    pipelines = max(r["samples_per_s"] for name, r in by_name.items() if name.startswith(("gpipe", "1f1b")))
    return {
        "ddg_over_backprop": stash["speedup"],
        "ceiling": next(r for name, r in by_name.items() if name.startswith("backprop") and name.endswith("apart"))[
            "speedup"
        ],
        "stages_ceiling": next(r for name, r in by_name.items() if name.startswith("stages"))["speedup"],
        "fit_ceiling": fit("fit backprop apart") / fit("fit backprop"),
        "fit_stages_ceiling": fit("fit stages apart") / fit("fit backprop"),
        "ddg_over_best_pipeline": stash["samples_per_s"] / pipelines,
        "recompute_time_over_stash": stash["samples_per_s"] / by_name["ddg recompute"]["samples_per_s"],
        "fit_ddg_over_fit_backprop": fit("fit ddg") / fit("fit backprop"),
        "fit_ddg_over_fit_ddp": fit("fit ddg") / fit("fit ddp"),
        "fit_ddg_over_runtime_ddg": fit("fit ddg") / stash["samples_per_s"],
    }


def _stage_parts(figures: dict[str, float], between: str) -> str:
    """One stage's step in a fit: the DDG fit's shares of :data:`STAGE_PARTS` as the strategy logged them, or the
    milliseconds of a stage trained apart (``fit stages``: forward, backward, update, rest)."""
    if "busy_share" in figures:
        return between.join(f"{figures[f'{part}_share']:.0%}" for part in STAGE_PARTS)
    return between.join(f"{figures[f'{part}']:.1f}" for part in STAGE_APART_PARTS) + " ms"


def _rounds(run: dict[str, Any]) -> str:
    return " / ".join(f"{rate:.0f}" for rate in run["repeats"])


def markdown(result: dict[str, Any]) -> str:
    """One model's results as a Markdown table, with the ratios the targets are stated in."""
    runs = {run["name"]: run for run in result["runs"]}
    lines = [
        f"### {result['model']} ({result['parameters'] / 1e6:.2f}M parameters, batch {result['batch_size']})\n",
        f"{result['stages']} stages, cut at {', '.join(f'`{p}`' for p in result['split_points'])} (balanced by "
        f"{result['balanced_by']}: {' / '.join(f'{share:.0%}' for share in result['stage_cost_shares'])} of the "
        "cost), for DDG and the pipeline schedules alike.\n",
        "| configuration | processes | samples/s | each round | speedup | peak memory (MiB) "
        "| stage compute / wait / send (/ update / load / other) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        shares = ""
        if run["name"].startswith("ddg"):
            ranks = sorted(run["ranks"], key=lambda r: r["stage"])
            shares = ", ".join(f"{r['busy_share']:.0%} / {r['wait_share']:.0%} / {r['send_share']:.0%}" for r in ranks)
        elif run.get("fit_stages"):  # as the strategy logged them, with Lightning's loop as "other"
            shares = ", ".join(_stage_parts(r, " / ") for r in run["fit_stages"])
        peak = "" if run["peak_mib"] != run["peak_mib"] else f"{run['peak_mib']:.0f}"
        lines.append(
            f"| {run['name']} | {run['processes']} | {run['samples_per_s']:.0f} | {_rounds(run)} "
            f"| {run['speedup']:.2f} | {peak} "
            f"| {shares} |"
        )
    ratios = result["ratios"]
    lines += [
        "",
        f"- DDG (stash) over backprop: **{ratios['ddg_over_backprop']:.2f}×**; over the best of GPipe and 1F1B: "
        f"**{ratios['ddg_over_best_pipeline']:.2f}×**",
        f"- {result['stages']} processes with nothing to share reach {ratios['ceiling']:.2f}× on this machine: DDG "
        f"gets {ratios['ddg_over_backprop'] / ratios['ceiling']:.0%} of that ceiling",
        f"- Each stage of the cut trained alone, all at once (`stages apart`: its forward, backward and optimizer "
        f"step, no weight copy, no message; the floor of any pipeline on this cut): **{ratios['stages_ceiling']:.2f}×"
        f"** backprop; DDG gets {ratios['ddg_over_backprop'] / ratios['stages_ceiling']:.0%} of it",
        f"- stash+recompute takes **{ratios['recompute_time_over_stash']:.2f}×** the time of stash; activations "
        f"held at most: stash {max(r['activations_mib'] for r in runs['ddg stash']['ranks']):.1f} MiB, "
        f"recompute {max(r['activations_mib'] for r in runs['ddg recompute']['ranks']):.1f} MiB (per stage)",
        f'- Lightning on one device, `strategy="ddg"` over a plain run: **{ratios["lightning_ddg_over_plain"]:.3f}**',
        '- Through `Trainer.fit` (the `fit` rows): `strategy="ddg"` runs '
        f"**{ratios['fit_ddg_over_fit_backprop']:.2f}×** backprop, **{ratios['fit_ddg_over_fit_ddp']:.2f}×** "
        f'`strategy="ddp"` on as many processes, and **{ratios["fit_ddg_over_runtime_ddg"]:.2f}×** the stage '
        "runtime alone (`ddg stash`); "
        f"{result['stages']} `Trainer.fit` runs on one device each, with nothing to share, reach "
        f'{ratios["fit_ceiling"]:.2f}× (the ceiling of the `fit` rows): `strategy="ddg"` gets '
        f"{ratios['fit_ddg_over_fit_backprop'] / ratios['fit_ceiling']:.0%} of it",
        f"- Each stage trained alone by a `Trainer.fit` of its own, all at once (`fit stages`: what a pipeline "
        "would reach if it cost nothing beyond each stage's own work and Lightning's loop, its slowest stage's "
        f"samples/s; per stage: forward / backward / update / rest in ms): **{ratios['fit_stages_ceiling']:.2f}×** "
        f'backprop; `strategy="ddg"` gets {ratios["fit_ddg_over_fit_backprop"] / ratios["fit_stages_ceiling"]:.0%} '
        "of it",
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
        colors = [
            "#2a7" if r["name"].startswith("ddg") else "#17a" if r["name"].startswith("fit ddg") else "#888"
            for r in runs
        ]
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
