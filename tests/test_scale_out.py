"""Stages × data-parallel replicas with a real Trainer: 2 stages × 2 replicas on 4 processes against the reference
run on the union of the replicas' batches, checkpoints and synced metrics as with one pipeline, and a two-node
launch with torchrun."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, DistributedSampler

from lightning_ddg import DDGReference, DDGStrategy, Topology, split_module
from lightning_ddg.planning import balanced_split_points
from tests.lightning_models import MLPClassifier, cpu_trainer, dataset, loader, make_optimizer

REPO = Path(__file__).resolve().parent.parent


def _union_batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What 2 replicas read together from ``loader()`` (batches of 8) at each step of ``epoch``. Lightning gives
    each replica a shuffling DistributedSampler, as with DDP, seeded by ``seed_everything`` (else 0)."""
    data, seed = dataset(), int(os.environ.get("PL_GLOBAL_SEED", 0))
    orders = []
    for replica in range(2):
        sampler = DistributedSampler(data, num_replicas=2, rank=replica, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    return [data[orders[0][i : i + 8] + orders[1][i : i + 8]] for i in range(0, len(orders[0]), 8)]


def _reference(model: MLPClassifier, epochs: int, steps: int | None = None) -> tuple[dict, dict, dict]:
    """One 2-stage pipeline on the union batches (the first ``steps`` of them, if given): weights and momentum after
    the last step (before the drain), and weights after the drain."""
    model = copy.deepcopy(model)
    stages = split_module(
        model, split_points=balanced_split_points(copy.deepcopy(model), 2, loader().dataset[:8][0])
    ).train
    optimizers = [make_optimizer("sgd", s.parameters()) for s in stages]
    schedulers = []
    if model.hparams.step_lr:
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in optimizers]
    ref = DDGReference(stages, optimizers, torch.nn.functional.cross_entropy, lr_schedulers=schedulers)
    union = [batch for epoch in range(epochs) for batch in _union_batches(epoch)]
    for x, y in union[:steps]:
        ref.step(x, y)
    before_drain = copy.deepcopy(dict(model.state_dict()))
    momentum = {
        name: optimizer.state[p]["momentum_buffer"].clone()
        for stage, optimizer in zip(stages, optimizers, strict=True)
        for name, p in stage.named_parameters()
    }
    ref.finish()
    return before_drain, momentum, dict(model.state_dict())


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-7, msg=f"{name} differs")


class _SyncedMetrics(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(optimizer="sgd", step_lr=True)
        import torchmetrics

        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.accuracy(logits, y)
        self.log("val_acc", self.accuracy)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), sync_dist=True)


def test_two_stages_times_two_replicas_match_one_pipeline_on_the_union_batch(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    model = _SyncedMetrics()
    before_drain, momentum, after_fit = _reference(model, epochs=2)
    trainer = cpu_trainer(
        DDGStrategy(num_stages=2, balance_by="params", start_method="forkserver"),
        devices=4,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        enable_checkpointing=True,
    )
    trainer.fit(model, loader(), loader())
    _assert_same(dict(model.state_dict()), after_fit)

    # one checkpoint of the whole model, written after the last validation, before the drain
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    _assert_same(checkpoint["state_dict"], before_drain)
    state = checkpoint["optimizer_states"][0]
    names = [name for name, _ in model.named_parameters()]
    assert state["param_groups"][0]["params"] == list(range(len(names)))
    for i, name in enumerate(names):
        torch.testing.assert_close(state["state"][i]["momentum_buffer"], momentum[name], rtol=1e-5, atol=1e-7)

    # validation metrics were reduced over the last stage's replicas: those of one process on the whole data
    header, *rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    assert {f"ddg/stage{k}/samples_per_s" for k in range(2)} <= set(columns)
    last_val = [row.split(",") for row in rows if row.split(",")[columns.index("val_loss")]][-1]
    plain = _SyncedMetrics()
    plain.load_state_dict(checkpoint["state_dict"])
    (expected,) = cpu_trainer("auto", 1).validate(plain, loader(), verbose=False)
    for key in ("val_loss", "val_acc"):
        assert float(last_val[columns.index(key)]) == pytest.approx(expected[key], rel=1e-6)


class _OutOfTimeOnOneRank(Timer):
    """A time limit reached on global rank ``rank`` alone, once ``batches`` training batches have begun there."""

    def __init__(self, rank: int, batches: int) -> None:
        super().__init__(duration=timedelta(days=1))
        self.rank, self.batches, self.begun, self.here = rank, batches, 0, False

    def on_train_batch_start(self, trainer, *args: Any) -> None:
        self.begun, self.here = self.begun + 1, trainer.global_rank == self.rank

    def time_remaining(self, stage: str = "train") -> float:
        return 0.0 if self.here and self.begun >= self.batches else 1.0


@pytest.mark.timeout(180)  # replicas that do not agree wait for each other's gradients
def test_a_time_limit_reached_on_one_replica_stops_every_replica_after_the_same_batch() -> None:
    # replica 1's first stage finds the time up before its batch 4 (in the second epoch of 3 batches) and marks it as
    # the last: the first stages agree before each batch, so every process trains 5 batches of the union, then drains
    model = MLPClassifier(optimizer="sgd", step_lr=True)
    _, _, expected = _reference(model, epochs=3, steps=5)
    timer = _OutOfTimeOnOneRank(Topology(num_stages=2, num_replicas=2).rank_of(0, replica=1), batches=4)
    strategy = DDGStrategy(num_stages=2, balance_by="params", start_method="forkserver")
    cpu_trainer(strategy, devices=4, max_epochs=3, callbacks=[timer]).fit(model, loader())
    _assert_same(dict(model.state_dict()), expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_nodes(launches: list[tuple[list[str], dict[str, str]]]) -> None:
    """Start every ``(command, environment)`` at once and wait for all; a hanging launch is killed with its workers."""
    base = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE")}
    processes = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=base | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"} | env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for command, env in launches
    ]
    try:
        outputs = [p.communicate(timeout=150)[0].decode() for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert all(p.returncode == 0 for p in processes), "\n".join(o[-3000:] for o in outputs)


def _assert_two_nodes_trained_as_one_pipeline_on_the_union_batch(out_dir: Path, environment: str) -> None:
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(4)]
    # a pipeline per node, its last stage first: global rank 0 holds the loss, the loggers and the progress bar
    assert [(r["node"], r["replica"], r["stage"]) for r in ranks] == [(0, 0, 1), (0, 0, 0), (1, 1, 1), (1, 1, 0)]
    assert {r["environment"] for r in ranks} == {environment}
    *_, expected = _reference(MLPClassifier(optimizer="sgd", seed=0), epochs=1)
    for r in ranks:
        _assert_same(r["weights"], expected)


def test_two_nodes_launched_with_torchrun(tmp_path) -> None:
    """Two torchrun launches on one machine stand for two nodes of 2 processes each (TorchElasticEnvironment)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2"]
    address = ["--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    job = ["-m", "tests.two_nodes", str(tmp_path)]
    _run_nodes([([*torchrun, f"--node-rank={node}", *address, *job], {}) for node in range(2)])
    _assert_two_nodes_trained_as_one_pipeline_on_the_union_batch(tmp_path, "TorchElasticEnvironment")


@pytest.mark.slow  # the two-node path runs by default through torchrun; this checks SLURM's environment
def test_two_nodes_launched_by_slurm(tmp_path) -> None:
    """Four processes with the variables ``srun`` sets for ``--nodes=2 --ntasks-per-node=2`` stand for a SLURM job
    (SLURMEnvironment): SLURM gives each process its rank, and Lightning launches none."""
    job = {
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),  # else one derived from the job id
    }
    launches = [
        (
            [sys.executable, "-m", "tests.two_nodes", str(tmp_path)],
            job | {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 2), "SLURM_NODEID": str(rank // 2)},
        )
        for rank in range(4)
    ]
    _run_nodes(launches)
    _assert_two_nodes_trained_as_one_pipeline_on_the_union_batch(tmp_path, "SLURMEnvironment")


def test_each_pipeline_lies_on_one_node_when_a_nodes_devices_are_a_multiple_of_its_stages() -> None:
    topology = Topology(num_stages=4, num_replicas=4)  # 2 nodes × 8 devices
    for replica in range(4):
        ranks = [topology.rank_of(stage, replica) for stage in range(4)]
        assert len({rank // 8 for rank in ranks}) == 1
        assert sorted(ranks) == list(range(4 * replica, 4 * replica + 4))
    assert topology.stage_of(0) == 3 and topology.replica_of(0) == 0
    assert topology.replica_ranks(stage=3) == [0, 4, 8, 12]


def test_processes_that_cannot_hold_whole_pipelines_are_refused_with_advice() -> None:
    with pytest.raises(ValueError, match=r"devices x num_nodes to a multiple of 2"):
        cpu_trainer(DDGStrategy(num_stages=2), devices=3)
    with pytest.raises(ValueError, match="num_stages=2 contradicts split_points, which makes 3 stages"):
        DDGStrategy(num_stages=2, split_points=["model.2", "model.4"])


def test_a_sampler_sharding_over_stages_is_refused_with_advice() -> None:
    strategy = DDGStrategy(num_stages=2)
    cpu_trainer(strategy, devices=4)  # 2 replicas; this process is rank 0, replica 0
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    data = dataset()
    right = DataLoader(data, sampler=DistributedSampler(data, **strategy.distributed_sampler_kwargs))
    assert strategy.process_dataloader(right) is right
    with pytest.raises(MisconfigurationException, match="must read the same batches"):
        strategy.process_dataloader(DataLoader(data, sampler=DistributedSampler(data, num_replicas=4, rank=0)))
