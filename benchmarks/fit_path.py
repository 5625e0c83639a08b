"""The product path: samples/s of ``Trainer.fit`` on a model of ``benchmarks/peers.py``, as a user runs it.

Four fits, each in fresh processes that Lightning starts itself (``strategy="ddp"`` and ``"ddg"`` re-launch the
script), one thread per process, the same global batch:

- ``fit backprop``: ``Trainer(devices=1)``;
- ``fit backprop ×K apart``: K such fits at once, their samples/s summed: what K processes
  running ``Trainer.fit`` with nothing to share reach on this machine, the ceiling of the two rows below;
- ``fit ddp ×K``: ``Trainer(strategy="ddp", devices=K)``, each process on ``batch / K`` samples;
- ``fit ddg ×K``: ``Trainer(strategy=DDGStrategy(split_points=...), devices=K)``, cut where the runtime rows are.

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

ENGINES = ("fit backprop", "fit backprop apart", "fit ddp", "fit ddg")
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


def fit_rates(cfg: dict[str, Any], stages: int, timeout: float) -> dict[str, dict[str, Any]]:
    """Each fit of ``ENGINES`` for the peers' configuration ``cfg``, by row name: its ``samples_per_s``, and for
    the DDG fit its per-stage figures (``stages``, see :func:`stage_figures`)."""
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ENGINES:
            apart = engine == "fit backprop apart"
            runs = []
            for i in range(stages if apart else 1):  # the fits apart run at once
                out = os.path.join(tmp, f"rate{i}.json")
                command = [sys.executable, os.path.abspath(__file__), "fit backprop" if apart else engine]
                command += [json.dumps(cfg | {"stages": stages}), out]
                runs.append(
                    (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), out)
                )
            total, figures = 0.0, []
            for process, out in runs:
                _, stderr = process.communicate(timeout=timeout)
                if process.returncode != 0 or not os.path.exists(out):
                    raise RuntimeError(f"{engine} failed:\n{stderr[-3000:]}")
                result = json.load(open(out))
                total += result["samples_per_s"]
                figures += result.get("stages", [])
                os.remove(out)
            name = {"fit backprop": engine, "fit backprop apart": f"fit backprop ×{stages} apart"}.get(engine)
            rates[name or f"{engine} ×{stages}"] = {"samples_per_s": total, "stages": figures}
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
    trainer = L.Trainer(
        strategy=strategy,
        devices=1 if engine == "fit backprop" else stages,
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(Module(), DataLoader(data, batch_size=per_process))
    if trainer.global_rank == 0:
        result = {"samples_per_s": steps * batch / (clock.end - clock.start), "cuts": clock.cuts}
        if engine.startswith("fit ddg"):
            result["stages"] = stage_figures(trainer.callback_metrics, stages)
        with open(out, "w") as f:
            json.dump(result, f)


def _cut(trainer: Any) -> list[str]:
    plan = getattr(trainer.strategy, "plan", None)
    return list(plan.split_points) if plan is not None else []


if __name__ == "__main__":
    _fit(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])
