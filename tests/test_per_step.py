"""No collective across stages in the per-step path of a fit: a fit of 36 steps issues exactly the collectives
of a fit of 12 steps, on every rank, so that no stage waits for another beyond the pipeline's own messages; with
replicas, only the replicas of a stage meet, and the first stages once more per step than the others."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import lightning as L
import pytest
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from lightning.pytorch.callbacks import LearningRateMonitor

from lightning_ddg import DDGStrategy, Topology
from tests.lightning_models import MLPClassifier, cpu_trainer, loader

COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "monitored_barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
)


class CountCollectives(L.Callback):
    """Counts, in each process, every collective called through ``torch.distributed`` from setup to the fit's end,
    and writes the counts to ``out/rank<r>.json``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.counts: collections.Counter[str] = collections.Counter()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for namespace in (dist, c10d):
            for name in COLLECTIVES:
                function = getattr(namespace, name, None)
                if function is not None and not hasattr(function, "counted"):
                    setattr(namespace, name, self._counted(name, function))

    def _counted(self, name: str, function):
        def counted(*args, **kwargs):
            self.counts[name] += 1
            return function(*args, **kwargs)

        counted.counted = True
        return counted

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.counts))


def _collectives(tmp_path: Path, steps: int) -> list[dict[str, int]]:
    out = tmp_path / str(steps)
    out.mkdir()
    trainer = cpu_trainer(
        DDGStrategy(start_method="forkserver", balance_by="params"),
        devices=3,
        max_steps=steps,
        max_epochs=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name=str(steps)),
        log_every_n_steps=1,  # the stage figures and the loss are logged at every step
        max_time={"hours": 1},  # Lightning's Timer checks the time after every batch
        enable_progress_bar=True,
        callbacks=[CountCollectives(out), LearningRateMonitor()],
    )
    trainer.fit(MLPClassifier(step_lr=True), loader(n=8 * 40))
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(3)]


@pytest.mark.timeout(300)
def test_the_collectives_of_a_fit_do_not_grow_with_its_steps(tmp_path: Path) -> None:
    short, long = _collectives(tmp_path, 12), _collectives(tmp_path, 36)
    assert short == long
    assert all(counts for counts in short)  # the counting sees the collectives of setup


def _replica_collectives(tmp_path: Path, steps: int) -> list[dict[str, int]]:
    out = tmp_path / f"replicas{steps}"
    out.mkdir()
    trainer = cpu_trainer(
        DDGStrategy(start_method="forkserver", num_stages=2, balance_by="params"),
        devices=4,
        max_steps=steps,
        max_epochs=1,
        logger=False,
        max_time={"hours": 1},
        callbacks=[CountCollectives(out)],
    )
    trainer.fit(MLPClassifier(), loader(n=8 * 2 * 40))
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]


@pytest.mark.timeout(300)
def test_with_replicas_the_first_stages_agree_in_one_collective_per_step(tmp_path: Path) -> None:
    # per step, each stage's replicas average their gradients (one bucket here); the first stages also agree whether
    # the job stops and whether the fit ends (a time limit is set), in one all-reduce more
    short, long = _replica_collectives(tmp_path, 12), _replica_collectives(tmp_path, 36)
    topology = Topology(num_stages=2, num_replicas=2)
    for rank in range(4):
        grown = {name: long[rank].get(name, 0) - short[rank].get(name, 0) for name in long[rank] | short[rank]}
        first = topology.stage_of(rank) == 0
        assert {name: n for name, n in grown.items() if n} == {"all_reduce": 24 * (2 if first else 1)}, (rank, grown)
