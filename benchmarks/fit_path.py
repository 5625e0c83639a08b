"""The product path: samples/s of ``Trainer.fit`` on a model of ``benchmarks/peers.py``, as a user runs it.

Four fits, each in fresh processes that Lightning starts itself (``strategy="ddp"`` and ``"ddg"`` re-launch the
script), one thread per process, the same global batch:

- ``fit backprop``: ``Trainer(devices=1)``;
- ``fit backprop ×K apart``: K such fits at once, their samples/s summed: what K processes
  running ``Trainer.fit`` with nothing to share reach on this machine, the ceiling of the two rows below;
- ``fit ddp ×K``: ``Trainer(strategy="ddp", devices=K)``, each process on ``batch / K`` samples;
- ``fit ddg ×K``: ``Trainer(strategy=DDGStrategy(split_points=...), devices=K)``, cut where the runtime rows are;
- ``fit stages ×K apart``: K ``Trainer(devices=1)`` fits at once, fit ``k`` training stage ``k`` of that cut alone
  on inputs computed beforehand (the earlier stages' outputs), with a stand-in for the gradient the next stage would
  send (the last stage computes the loss), and with its input's gradient where a stage sends one back: what a
  pipeline whose stages cost nothing but their own work and Lightning's loop would reach, the samples/s of its
  slowest stage. Each stage reports the milliseconds per step its fit spent in the forward (``training_step``, and
  the ``zero_grad`` Lightning runs before the backward), the backward, the optimizer step and the rest (loading the
  batch, Lightning's loop), to set beside the DDG fit's stage figures.

``benchmarks/rebalance.py`` runs two more: ``fit ddg planned`` (``DDGStrategy(balance_by=...)``, the strategy's own
plan) and ``fit ddg rebalanced`` (the same with ``rebalance_after_steps``); every fit reports the cut it trained on
when it started and when it ended.

The clock runs on global rank 0 from the end of the warm-up steps to the end of the last step. A DDG fit also
reports the per-stage figures the strategy logged last (``ddg/stage{k}/busy_ms``, ``wait_ms``, ``send_ms``,
``update_ms``, ``load_ms``, ``other_ms``: at the end of the epoch, over the steps since the previous logging), which
show what the optimizer step, loading the batches and Lightning's loop (``other``) add to each stage's step.
``benchmarks/peers.py`` calls :func:`fit_rates` in every round, next to the runtime configurations;
``python benchmarks/fit_path.py ENGINE CONFIG_JSON OUT_JSON`` runs one fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ["OMP_NUM_THREADS"] = "1"

import lightning as L  # noqa: E402

ENGINES = ("fit backprop", "fit backprop apart", "fit ddp", "fit ddg", "fit stages apart")
STAGE_PARTS = ("busy", "wait", "send", "update", "load", "other")  # a stage's step, as the strategy logs it


class FitClock(L.Callback):
    """Times a fit's batches after the first ``warmup``: ``start`` when batch ``warmup - 1`` ended, ``end`` when the
    last one did (the clock of every ``Trainer.fit`` these benchmarks time)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def timed_trainer(
    clock: L.Callback, strategy: Any = "auto", devices: int = 1, accelerator: str = "cpu", **options: Any
) -> L.Trainer:
    """A Trainer for one epoch with ``clock`` as its one callback and nothing else that writes or prints;
    ``options`` go to the Trainer as well."""
    return L.Trainer(
        strategy=strategy,
        accelerator=accelerator,
        devices=devices,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        **options,
    )


def fit_rates(cfg: dict[str, Any], stages: int, timeout: float) -> dict[str, dict[str, Any]]:
    """Each fit of ``ENGINES`` for the peers' configuration ``cfg``, by row name: its ``samples_per_s``, and for
    the DDG fit and the stages apart their per-stage figures (``stages``, see :func:`stage_figures` and
    :func:`_fit_stage`)."""
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ENGINES:
            apart = engine.endswith("apart")
            runs = []
            for i in range(stages if apart else 1):  # the fits apart run at once
                out = os.path.join(tmp, f"rate{i}.json")
                command = [sys.executable, os.path.abspath(__file__), engine.removesuffix(" apart")]
                command += [json.dumps(cfg | {"stages": stages, "stage": i}), out]
                runs.append(
                    (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out)
                )
            rates_here, figures = [], []
            for process, out in runs:
                _, stderr = process.communicate(timeout=timeout)
                if process.returncode != 0 or not os.path.exists(out):
                    raise RuntimeError(f"{engine} failed:\n{stderr[-3000:]}")
                result = json.load(open(out))
                rates_here.append(result["samples_per_s"])
                figures += result.get("stages", [])
                os.remove(out)
            # K fits of the whole model add up; K stages of one pipeline go as fast as the slowest
            total = min(rates_here) if engine == "fit stages apart" else sum(rates_here)
            if apart:
                name = engine.replace(" apart", f" ×{stages} apart")
            else:
                name = engine if engine == "fit backprop" else f"{engine} ×{stages}"
            rates[name] = {"samples_per_s": total, "stages": figures}
    return rates


def stage_figures(metrics: dict[str, Any], stages: int) -> list[dict[str, float]]:
    """The per-stage figures among a trainer's ``callback_metrics``, one dict per stage: the milliseconds per step of
    each of :data:`STAGE_PARTS`, and each one's share of their sum."""
    figures = []
    for k in range(stages):
        ms = {part: float(metrics[f"ddg/stage{k}/{part}_ms"]) for part in STAGE_PARTS}
        step = sum(ms.values()) or 1.0
        shares = {f"{part}_share": value / step for part, value in ms.items()}
        figures.append({"stage": k} | {f"{part}_ms": value for part, value in ms.items()} | shares)
    return figures


def _fit(engine: str, cfg: dict[str, Any], out: str) -> None:
    sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
    import torch

    if engine == "fit stages":
        return _fit_stage(cfg, out)
    from peers import batches, lightning_module
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ddg import DDGStrategy

    torch.set_num_threads(1)
    warmup, steps, batch, stages = cfg["warmup"], cfg["steps"], cfg["batch_size"], cfg["stages"]

    Module = lightning_module(cfg["model"])

    class Clock(FitClock):
        def __init__(self) -> None:
            super().__init__(warmup)
            self.cuts: list[list[str]] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.cuts.append(_cut(trainer))

        def on_train_end(self, trainer, pl_module) -> None:
            self.cuts.append(_cut(trainer))  # another, when the fit cut its stages anew

    xs, ys = batches(cfg["model"], warmup + steps, batch, torch.device("cpu"))
    data = TensorDataset(xs.flatten(0, 1), ys.flatten())
    per_process = batch // stages if engine == "fit ddp" else batch
    strategy: Any
    if engine == "fit ddg":
        strategy = DDGStrategy(split_points=[f"model.{p}" for p in cfg["split_points"]])  # names under Module
    elif engine in ("fit ddg planned", "fit ddg rebalanced"):  # benchmarks/rebalance.py: the strategy's own plan
        after = cfg["rebalance_after_steps"] if engine == "fit ddg rebalanced" else None
        strategy = DDGStrategy(balance_by=cfg["balance_by"], rebalance_after_steps=after)
    else:
        strategy = {"fit backprop": "auto", "fit ddp": "ddp"}[engine]
    clock = Clock()
    trainer = timed_trainer(clock, strategy=strategy, devices=1 if engine == "fit backprop" else stages)
    trainer.fit(Module(), DataLoader(data, batch_size=per_process))
    if trainer.global_rank == 0:
        result = {"samples_per_s": steps * batch / (clock.end - clock.start), "cuts": clock.cuts}
        if engine.startswith("fit ddg"):
            result["stages"] = stage_figures(trainer.callback_metrics, stages)
        with open(out, "w") as f:
            json.dump(result, f)


STAGE_APART_PARTS = ("forward", "backward", "update", "rest")  # a stage's step in a fit of its own


def _fit_stage(cfg: dict[str, Any], out: str) -> None:
    """``fit stages apart``: stage ``cfg["stage"]`` of the cut at ``cfg["split_points"]`` trained alone by a plain
    ``Trainer.fit``, timed as :func:`_fit` times a fit, with what its steps spent in each of
    :data:`STAGE_APART_PARTS`."""
    import torch
    from peers import _optimizer, batches, build, stage_inputs
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ddg import split_module

    torch.set_num_threads(1)
    warmup, steps, batch, k = cfg["warmup"], cfg["steps"], cfg["batch_size"], cfg["stage"]
    stages = split_module(build(cfg["model"]), cfg["split_points"]).train
    last = k == len(stages) - 1
    _, ys = batches(cfg["model"], warmup + steps, batch, torch.device("cpu"))
    sent = stage_inputs(stages, k, cfg, torch.device("cpu"))  # what the earlier stages send, batch by batch
    inputs = [torch.cat(values) for values in zip(*sent, strict=True)]

    class Stage(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.stage = stages[k]
            self.seeds: list[torch.Tensor] | None = None  # the stand-in for the next stage's gradient

        def training_step(self, batch, batch_idx):
            *values, targets = batch
            if k:  # a stage after the first computes its input's gradient, to send it back
                values = [v.requires_grad_() if v.is_floating_point() else v for v in values]
            output = self.stage(*values)
            if last:
                return nn.functional.cross_entropy(output, targets)
            if self.seeds is None:
                self.seeds = [torch.randn_like(o) for o in output]
            return sum((o * g).sum() for o, g in zip(output, self.seeds, strict=True))

        def configure_optimizers(self):
            return _optimizer(self.parameters())

    class Parts(FitClock):
        """The clock, and each step's parts from Lightning's hooks, summed over the timed steps."""

        def __init__(self) -> None:
            super().__init__(warmup)
            self.spent = dict.fromkeys(STAGE_APART_PARTS, 0.0)
            self.marks: dict[str, float] = {}

        def _mark(self, what: str) -> None:
            self.marks[what] = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._mark("start")

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            self._mark("backward")

        def on_after_backward(self, trainer, pl_module) -> None:
            self._mark("backward done")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self._mark("update")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx >= warmup:
                m, now = self.marks, time.perf_counter()
                self.spent["forward"] += m["backward"] - m["start"]
                self.spent["backward"] += m["backward done"] - m["backward"]
                self.spent["update"] += now - m["update"]
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    clock = Parts()
    trainer = timed_trainer(clock)
    trainer.fit(Stage(), DataLoader(TensorDataset(*inputs, ys.flatten()), batch_size=batch))
    elapsed = clock.end - clock.start
    ms = {part: 1e3 * spent / steps for part, spent in clock.spent.items()}
    ms["rest"] = 1e3 * elapsed / steps - sum(ms.values())  # loading the batch, Lightning's loop
    with open(out, "w") as f:
        json.dump({"samples_per_s": steps * batch / elapsed, "stages": [{"stage": k} | ms]}, f)


def _cut(trainer: Any) -> list[str]:
    plan = getattr(trainer.strategy, "plan", None)
    return list(plan.split_points) if plan is not None else []


if __name__ == "__main__":
    _fit(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])
