"""DDGStrategy in real Lightning Trainer runs (gloo, spawned processes) against the reference simulation."""

from __future__ import annotations

import copy
import functools
import os
import pickletools
import re
import struct
import time
import warnings
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader

import lightning_ddg
from lightning_ddg import DDGReference, DDGStrategy, plan, split_module, stats
from lightning_ddg.planning import IMBALANCE_WARNING, balanced_split_points
from tests.lightning_models import MLPClassifier, cpu_trainer, loader, make_optimizer
from tests.multiprocess import run_processes

EPOCHS = 2
REPO = Path(__file__).resolve().parents[1]


def _trainer(strategy, devices: int, **overrides) -> L.Trainer:
    return cpu_trainer(strategy, devices, **({"max_epochs": EPOCHS} | overrides))


def _fit_ddg(model: L.LightningModule, devices: int, accumulate: int = 1, **strategy_options) -> dict:
    strategy = DDGStrategy(start_method="forkserver", **strategy_options)
    trainer = _trainer(strategy, devices, accumulate_grad_batches=accumulate)
    trainer.fit(model, loader(), loader())
    return {k: v.clone() for k, v in model.state_dict().items()}


def _reference(
    model: MLPClassifier,
    split_points: list[str],
    memory: str = "stash",
    accumulate: int = 1,
    epochs: int = EPOCHS,
    max_steps: int | None = None,
    clip: float | None = None,
    seed: int = 0,
    drain: bool = True,
    batches_per_epoch: int | None = None,
) -> dict:
    """The reference's weights after ``epochs`` of ``loader()`` (or ``max_steps`` batches), then the drain; with
    ``clip``, each stage clips the norm of its own gradients before it steps, as ``gradient_clip_val`` does."""
    model = copy.deepcopy(model)
    stages = split_module(model, split_points=split_points).train
    optimizers = [make_optimizer(model.hparams.optimizer, s.parameters()) for s in stages]
    for optimizer in optimizers if clip is not None else ():
        optimizer.register_step_pre_hook(functools.partial(_clip_gradients, max_norm=clip))
    schedulers = []
    per_epoch = model.hparams.lr_interval == "epoch"
    if model.hparams.step_lr:
        size = 1 if per_epoch else 3
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=size, gamma=0.5) for o in optimizers]
    ref = DDGReference(
        stages,
        optimizers,
        torch.nn.functional.cross_entropy,
        memory=memory,
        accumulate_grad_batches=accumulate,
        lr_schedulers=[] if per_epoch else schedulers,
        seed=seed,
    )
    for _ in range(epochs):
        for batch, (x, y) in enumerate(loader()):
            if ref.step_count == max_steps or batch == batches_per_epoch:
                break
            ref.step(x, y)
        for scheduler in schedulers if per_epoch else []:
            scheduler.step()  # between epochs, with batches still in flight
    if drain:
        ref.finish()
    return dict(model.state_dict())


def _clip_gradients(optimizer: torch.optim.Optimizer, args, kwargs, max_norm: float) -> None:
    """What ``gradient_clip_val`` does before a step: clip the norm of this optimizer's gradients."""
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)


def _assert_same(actual: dict, expected: dict, rtol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=1e-7, msg=f"{name} differs")


def test_strategy_names_are_registered() -> None:
    assert {"ddg", "ddg_spawn"} <= set(L.pytorch.strategies.StrategyRegistry.available_strategies())
    assert lightning_ddg.DDGStrategy is DDGStrategy


def test_one_stage_equals_plain_lightning() -> None:
    model = MLPClassifier(optimizer="sgd", batchnorm=True, step_lr=True)
    plain = copy.deepcopy(model)
    _trainer("auto", 1).fit(plain, loader(), loader())
    _assert_same(_fit_ddg(model, devices=1), dict(plain.state_dict()), rtol=0)


def test_one_process_is_one_stage_and_is_said_so() -> None:
    # Trainer(strategy="ddg") on a CPU: devices="auto" is one process, and the pipeline a user asked for is backprop
    with pytest.warns(PossibleUserWarning, match=r"one process, so the model trains as one stage: .*devices=4"):
        L.Trainer(strategy="ddg", accelerator="cpu", logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.Trainer(strategy=DDGStrategy(num_stages=1), devices=1, accelerator="cpu", logger=False)  # meant


@pytest.mark.parametrize(
    ("devices", "optimizer", "memory", "split_points"),
    [
        (2, "sgd", "stash", ["model.4"]),
        (3, "adam", "stash", ["model.2", "model.6"]),
        (4, "sgd", "recompute", ["model.2", "model.4", "model.6"]),
        (3, "adam", "replay", ["model.4", "model.6"]),
    ],
)
def test_matches_reference(devices: int, optimizer: str, memory: str, split_points: list[str]) -> None:
    model = MLPClassifier(optimizer=optimizer, batchnorm=True, step_lr=True)
    expected = _reference(model, split_points, memory="replay" if memory == "replay" else "stash")
    _assert_same(_fit_ddg(model, devices, split_points=split_points, memory=memory), expected)


class _ClampWeights(L.Callback):
    """A weight constraint applied after each training step, in place, as max-norm or clipping callbacks do."""

    BOUND = 0.05

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            for p in pl_module.parameters():
                p.clamp_(-self.BOUND, self.BOUND)


def test_weights_changed_in_place_after_each_step_leave_the_batches_in_flight_their_own() -> None:
    # each batch's delayed backward reads the weights its forward read, also when a callback changes the live ones
    # after a step that does not update them (accumulation)
    model = MLPClassifier(optimizer="sgd")
    points = ["model.2", "model.6"]
    reference = copy.deepcopy(model)
    stages = split_module(reference, split_points=points).train
    optimizers = [make_optimizer("sgd", s.parameters()) for s in stages]
    ref = DDGReference(stages, optimizers, torch.nn.functional.cross_entropy, accumulate_grad_batches=2)
    for _ in range(EPOCHS):
        for x, y in loader():
            ref.step(x, y)
            _ClampWeights().on_train_batch_end(None, reference, None, None, 0)
    ref.finish()
    strategy = DDGStrategy(start_method="forkserver", split_points=points)
    trainer = _trainer(strategy, 3, accumulate_grad_batches=2, callbacks=[_ClampWeights()])
    trainer.fit(model, loader())
    _assert_same({k: v.clone() for k, v in model.state_dict().items()}, dict(reference.state_dict()))


def test_epoch_interval_scheduler_matches_reference() -> None:
    model = MLPClassifier(optimizer="sgd", step_lr=True, lr_interval="epoch")
    expected = _reference(model, ["model.2", "model.6"])
    _assert_same(_fit_ddg(model, 3, split_points=["model.2", "model.6"]), expected)


def test_default_split_and_accumulation_match_reference() -> None:
    model = MLPClassifier(optimizer="sgd")
    first_input = next(iter(loader()))[0]  # what training_step passes to forward first
    points = balanced_split_points(copy.deepcopy(model), 3, first_input)
    expected = _reference(model, points, accumulate=2)
    _assert_same(_fit_ddg(model, 3, accumulate=2, balance_by="params"), expected)


def test_balance_names_the_same_cuts_as_split_points() -> None:
    model = MLPClassifier(optimizer="adam", depth=3)  # trunk of 6 layers: Linear Tanh Linear Tanh Linear Tanh Linear
    expected = _reference(model, ["model.2"])
    _assert_same(_fit_ddg(model, 2, balance=[2, 5]), expected)


class _LoaderWithItsOwnGenerator(L.LightningDataModule):
    """``loader()``, leaving the global random stream to the dropout masks (a DataLoader without a generator draws
    from it each epoch). The generator is made in each process: a spawned process cannot receive one."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(loader().dataset, batch_size=8, generator=torch.Generator())


def test_recompute_reproduces_dropout_masks_of_the_reference() -> None:
    """Each stage draws its masks from its own stream, seeded by seed_everything, as the reference's stages do."""
    model = MLPClassifier(optimizer="sgd", dropout=0.3, batchnorm=True)
    split_points = ["model.4", "model.8"]  # a Dropout on every stage
    expected = _reference(model, split_points, seed=11)
    L.seed_everything(11)
    strategy = DDGStrategy(start_method="forkserver", split_points=split_points, memory="recompute")
    _trainer(strategy, 3).fit(model, datamodule=_LoaderWithItsOwnGenerator())
    _assert_same(dict(model.state_dict()), expected)


def test_fit_ending_at_max_steps_drains_the_batches_that_entered() -> None:
    model = MLPClassifier(optimizer="adam")
    split_points = ["model.2", "model.6"]
    expected = _reference(model, split_points, max_steps=9)  # in the second epoch
    _trainer(DDGStrategy(start_method="forkserver", split_points=split_points), 3, max_steps=9).fit(model, loader())
    _assert_same(dict(model.state_dict()), expected)


class _OutOfTimeAfter(Timer):
    """A time limit reached once ``batches`` training batches have begun in this process: a clock that the load of
    the machine does not move."""

    def __init__(self, batches: int) -> None:
        super().__init__(duration=timedelta(days=1))
        self.batches, self.begun = batches, 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.begun += 1

    def time_remaining(self, stage: str = "train") -> float:
        return 1.0 if self.begun < self.batches else 0.0


def test_a_fit_out_of_time_stops_every_stage_after_the_same_batch() -> None:
    # the first stage finds the time up before batch 7 begins there (in the second epoch) and marks that batch as the
    # last: every stage trains 8 batches, then the drain, with no collective after each batch (tests/test_per_step.py)
    model = MLPClassifier(optimizer="adam")
    split_points = ["model.2", "model.6"]
    expected = _reference(model, split_points, max_steps=8)
    strategy = DDGStrategy(start_method="forkserver", split_points=split_points)
    _trainer(strategy, 3, callbacks=[_OutOfTimeAfter(batches=7)]).fit(model, loader())
    _assert_same(dict(model.state_dict()), expected)


class _StopsAfterForward(MLPClassifier):
    """Sets ``trainer.should_stop`` in ``training_step`` after ``self(x)``, at batch ``at``: on the last stage only."""

    def __init__(self, at: int) -> None:
        super().__init__(optimizer="adam")
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.at:
            self.trainer.should_stop = True
        return loss


def test_should_stop_set_after_the_forward_stops_every_stage_after_the_same_later_batch() -> None:
    # set on the last stage at batch 3, the request reaches the first stage with batch 3's gradients two steps later
    # (after it forwarded batches 4 and 5): it marks batch 6, and every stage trains 7 batches, then drains. Lightning
    # 2.4 has no hook before a batch is fetched: there the first stage reads the request once batch 6 has been
    # fetched, and marks batch 7
    model = _StopsAfterForward(at=3)
    split_points = ["model.2", "model.6"]
    batches = 7 if hasattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor") else 8
    expected = _reference(model, split_points, max_steps=batches)
    _trainer(DDGStrategy(start_method="forkserver", split_points=split_points), 3).fit(model, loader())
    _assert_same(dict(model.state_dict()), expected)


def test_should_stop_set_after_the_forward_without_load_once_is_refused_with_advice() -> None:
    strategy = DDGStrategy(start_method="forkserver", load_once=False)
    with pytest.raises(Exception, match=r"set trainer.should_stop after self\(...\).*Keep the default load_once"):
        _trainer(strategy, 2).fit(_StopsAfterForward(at=1), loader())


class _StopsOnTheLoss(L.Callback):
    """Stops the fit at batch 3 from the logged loss, which only the last stage has: that stage alone stops."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 3 and "train_loss" in trainer.callback_metrics:
            trainer.should_stop = True


@pytest.mark.parametrize("validation", [False, True], ids=["epoch-end", "validation"])
def test_a_stage_that_stops_alone_raises_instead_of_waiting_for_the_others(validation: bool) -> None:
    # the last stage then runs a validation (whose loader is set up first) or the epoch's end, where every stage
    # should be after the same batch: it finds the first stage went on, and the job ends with the advice
    trainer = _trainer(DDGStrategy(start_method="forkserver"), 2, callbacks=[_StopsOnTheLoss()])
    with pytest.raises(Exception, match=r"did not stop after the same batch.*Set trainer.should_stop in training_step"):
        trainer.fit(MLPClassifier(), loader(n=200), loader() if validation else None)


@pytest.mark.parametrize(
    "limits", [dict(max_steps=2), dict(limit_train_batches=1)], ids=["max_steps=2", "limit_train_batches=1"]
)
def test_fewer_steps_than_stages_with_an_empty_validation_loader(limits: dict) -> None:
    # two steps through three stages: no batch reaches stage 0's backward before the drain, which applies them all
    model = MLPClassifier(optimizer="sgd")
    split_points = ["model.2", "model.6"]
    expected = _reference(
        model,
        split_points,
        max_steps=limits.get("max_steps"),
        batches_per_epoch=1 if "limit_train_batches" in limits else None,
    )
    trainer = _trainer(DDGStrategy(start_method="forkserver", split_points=split_points), 3, **limits)
    trainer.fit(model, loader(), loader(n=0))  # the empty validation loader is skipped
    _assert_same(dict(model.state_dict()), expected)


class _LateTeardown(DDGStrategy):
    """Rank 1 tears down 2 s after the others: rank 0, whose process serves the job's store, ends first."""

    def teardown(self) -> None:
        if self.global_rank == 1:
            time.sleep(2)
        super().teardown()


def test_a_stage_that_tears_down_last_ends_the_fit_well() -> None:
    strategy = _LateTeardown(start_method="forkserver", split_points=["model.4"])
    _trainer(strategy, 2, max_steps=2).fit(MLPClassifier(), loader())  # no stage takes rank 0's end for a failure


def test_last_stage_metrics_reach_the_logger_and_checkpoints_are_whole(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    model = MLPClassifier(optimizer="sgd")
    trainer = _trainer(
        DDGStrategy(start_method="forkserver", balance_by="params"),  # the reference's cut, on a busy machine too
        2,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        enable_checkpointing=True,
        num_sanity_val_steps=2,
    )
    trainer.fit(model, loader(), loader())
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert {"train_loss", "val_loss", "val_acc"} <= set(metrics.splitlines()[0].split(","))
    header = metrics.splitlines()[0].split(",")
    for k in range(2):
        expected = {"delay", "samples_per_s", "busy_ms", "wait_ms", "send_ms", "update_ms", "load_ms", "other_ms"}
        expected |= {"stashed_weights_mb", "activations_mb"}
        assert {f"ddg/stage{k}/{name}" for name in expected} <= set(header)
    split_points = balanced_split_points(copy.deepcopy(MLPClassifier(optimizer="sgd")), 2)
    _assert_same(dict(model.state_dict()), _reference(MLPClassifier(optimizer="sgd"), split_points))
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    # written after the last validation, before the drain; nothing in it needs lightning_ddg to load
    assert not [name for name in _pickled_globals(checkpoint) if name.startswith("lightning_ddg")]
    loaded = MLPClassifier.load_from_checkpoint(checkpoint)
    before_drain = _reference(MLPClassifier(optimizer="sgd"), split_points, drain=False)
    _assert_same(dict(loaded.state_dict()), before_drain)


_SLEEP_S = 0.05  # far above what a step of the tests' MLP takes otherwise


def _slow_collate(samples: list) -> Any:
    time.sleep(_SLEEP_S)
    return torch.utils.data.default_collate(samples)


class _SlowOptimizerStep(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        time.sleep(_SLEEP_S)


def test_the_stage_figures_give_loading_and_the_optimizer_step_their_own_share(tmp_path) -> None:
    # a loader and an optimizer step that each take 50 ms: on the first stage, which loads, load_ms holds the one;
    # on every stage update_ms holds the other; other_ms (Lightning's loop) holds neither
    from lightning.pytorch.loggers import CSVLogger

    data = DataLoader(loader(n=24 * 4).dataset, batch_size=4, collate_fn=_slow_collate)
    trainer = _trainer(
        DDGStrategy(start_method="forkserver", split_points=["model.4"]),
        2,
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[_SlowOptimizerStep()],
    )
    trainer.fit(MLPClassifier(optimizer="sgd"), data)
    figures = _figures_at_the_epochs_end(tmp_path / "run" / "version_0" / "metrics.csv")
    ms = _SLEEP_S * 1e3
    assert figures["ddg/stage0/load_ms"] >= ms, figures  # the first stage's loader
    assert figures["ddg/stage1/load_ms"] < ms / 2, figures  # the last stage takes the batches as they arrive
    for k in range(2):
        assert figures[f"ddg/stage{k}/update_ms"] >= 0.8 * ms, figures  # stage 0 does not update in its first step
        assert figures[f"ddg/stage{k}/other_ms"] < ms / 2, figures


def _figures_at_the_epochs_end(metrics_csv: Path) -> dict[str, float]:
    header, *rows = [row.split(",") for row in metrics_csv.read_text().split()]
    logged = [dict(zip(header, row, strict=True)) for row in rows]
    (row,) = [row for row in logged if row["ddg/stage0/busy_ms"]]  # in a fit of fewer than 20 steps, the only one
    return {name: float(value) for name, value in row.items() if name.startswith("ddg/stage")}


class _SlowCheckpoint(L.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        time.sleep(_SLEEP_S)


def test_the_stage_figures_leave_checkpoint_saving_out(tmp_path) -> None:
    # a checkpoint after every step, each taking 50 ms on every stage: no part of a step, as validation is not
    from lightning.pytorch.loggers import CSVLogger

    trainer = _trainer(
        DDGStrategy(start_method="forkserver", split_points=["model.4"]),
        2,
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1), _SlowCheckpoint()],
    )
    trainer.fit(MLPClassifier(optimizer="sgd"), loader(n=12 * 4, batch_size=4))
    assert len(list(tmp_path.glob("*.ckpt"))) == 12  # it did save after every step
    figures = _figures_at_the_epochs_end(tmp_path / "run" / "version_0" / "metrics.csv")
    for k in range(2):
        assert figures[f"ddg/stage{k}/other_ms"] < _SLEEP_S * 1e3 / 2, figures


class _SlowLayer(torch.nn.Module):
    """Stands for a part of a model that is slower in the pipeline than it was when the plan timed it: it sleeps
    ``seconds`` (10 ms) a call, where each stage computes well under 1 ms, while ``slow``."""

    def __init__(self, slow: bool) -> None:
        super().__init__()
        self.slow = slow
        self.seconds = 0.01

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slow:
            time.sleep(self.seconds)
        return x


class _SlowLastStage(MLPClassifier):
    def __init__(self, slow: bool = True, step_lr: bool = False) -> None:
        super().__init__(step_lr=step_lr)
        self.model = torch.nn.Sequential(*self.model, _SlowLayer(slow))


class _SlowInTraining(L.Callback):
    """Makes the slow layer slow once training starts: the plan, made before, timed it fast."""

    def __init__(self, seconds: float = 0.01) -> None:
        self.seconds = seconds

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.model[-1].slow = True
        pl_module.model[-1].seconds = self.seconds


class _RecordCut(L.Callback):
    """Writes the split points each stage process was cut at to ``cut{rank}.txt``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_start(self, trainer, pl_module) -> None:
        (self.directory / f"cut{trainer.global_rank}.txt").write_text(" ".join(trainer.strategy.plan.split_points))


class _RecordWarnings(L.Callback):
    """Writes the warnings each stage process gives while it trains to ``rank{r}.txt``, one a line."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.caught, self.recording = directory, [], None

    def on_train_start(self, trainer, pl_module) -> None:
        self.recording = warnings.catch_warnings(record=True)
        self.caught = self.recording.__enter__()
        warnings.simplefilter("always")

    def on_train_end(self, trainer, pl_module) -> None:  # after the strategy's own callbacks
        self.recording.__exit__(None, None, None)
        lines = [str(w.message).replace("\n", " ") for w in self.caught]
        lines.append(f"plan {trainer.strategy.plan.split_points}")
        (self.directory / f"rank{trainer.global_rank}.txt").write_text("\n".join(lines))


def test_a_stage_slower_than_the_others_is_measured_and_named(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    trainer = _trainer(
        DDGStrategy(start_method="forkserver", balance_by="flops"),  # FLOPs miss the sleep
        2,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[_RecordWarnings(tmp_path)],
        max_epochs=-1,
        max_steps=stats.MEASURED_STEPS + 4,
    )
    model = _SlowLastStage()
    # well above the stages' own time per step even when the job beside this test slows both stages down (each
    # stage's step took 55 ms once, on a slow machine, where 30 ms of sleep left the measured imbalance at 1.26)
    model.model[-1].seconds = 0.1
    trainer.fit(model, loader())
    rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("ddg/measured_imbalance")
    (measured,) = [float(row.split(",")[column]) for row in rows[1:] if row.split(",")[column]]
    assert measured > IMBALANCE_WARNING
    expected = re.compile(
        r"in this fit, stage 1 of the DDG pipeline took (\S+)x .* the plan expected (\S+)x .*"
        r"DDGStrategy\(split_points=\['model\.(\d)'\]\) balances the times measured here"
    )
    lines = (tmp_path / "rank0.txt").read_text().splitlines()
    (advice,) = [m for line in lines if (m := expected.search(line))]
    assert float(advice[1]) == pytest.approx(measured, abs=0.005) and float(advice[2]) < IMBALANCE_WARNING
    (planned,) = re.findall(r"^plan \['model\.(\d)'\]$", "\n".join(lines), re.MULTILINE)
    assert int(advice[3]) > int(planned)  # more of the model on the first stage, which waited for the second
    assert not expected.search((tmp_path / "rank1.txt").read_text())  # global rank 0 alone says it


def test_the_measured_imbalance_needs_enough_steps_on_every_stage() -> None:
    def snapshot(steps: int, active_ms: float, wait_ms: float) -> stats.Snapshot:
        return stats.Snapshot(steps, 8 * steps, 0, int(wait_ms * 1e3), 0, int(active_ms * 1e3), 0, 0)

    steps = stats.MEASURED_STEPS
    assert stats.measured_imbalance([snapshot(steps - 1, 100, 0), snapshot(steps, 300, 200)]) is None
    imbalance, per_step = stats.measured_imbalance([snapshot(steps, 300, 200), snapshot(steps, 300, 0)])
    assert per_step == pytest.approx([100 / steps, 300 / steps]) and imbalance == pytest.approx(1.5)


def _pickled_globals(path: Path) -> list[str]:
    """The ``module.name`` of every class and function a ``torch.save`` file refers to: what loading it imports."""
    with zipfile.ZipFile(path) as archive:
        (pickled,) = [info for info in archive.infolist() if info.filename.endswith("/data.pkl")]
    # read as stored, past its local header: streamed checkpoints carry no checksums, which zipfile would check
    assert pickled.compress_type == zipfile.ZIP_STORED
    with open(path, "rb") as f:
        f.seek(pickled.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(name_length + extra_length, os.SEEK_CUR)
        ops = list(pickletools.genops(f.read(pickled.compress_size)))
    found, strings = [], []
    for op, arg, _ in ops:
        if op.name == "GLOBAL":
            found.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.append(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    assert found, "no global found: not a pickle of a checkpoint"
    return found


class _RecordsOptimizedNames(MLPClassifier):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def configure_optimizers(self):
        names = [name for name, _ in self.named_parameters()]
        with open(f"{self.out_dir}/rank{self.global_rank}.txt", "w") as f:
            f.write("\n".join(names))
        return super().configure_optimizers()


def test_each_stage_optimizes_only_its_own_parameters(tmp_path) -> None:
    model = _RecordsOptimizedNames(str(tmp_path))
    all_names = {name for name, _ in model.named_parameters()}
    _fit_ddg(model, 3, split_points=["model.4", "model.6"])
    seen = [set((tmp_path / f"rank{r}.txt").read_text().split()) for r in range(3)]
    assert set.union(*seen) == all_names
    assert sum(len(s) for s in seen) == len(all_names)
    # rank 0 runs the last stage
    assert seen[0] == {"model.6.weight", "model.6.bias", "model.8.weight", "model.8.bias"}


def test_early_stopping_drains_and_the_best_checkpoint_alone_remains(tmp_path) -> None:
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import CSVLogger

    model = MLPClassifier(optimizer="sgd")
    split_points = ["model.2", "model.6"]
    expected = _reference(model, split_points, epochs=4)
    trainer = _trainer(
        DDGStrategy(start_method="forkserver", split_points=split_points),
        3,
        max_epochs=20,
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=True,
        callbacks=[
            EarlyStopping(monitor="val_loss", min_delta=10.0, patience=3),  # stops after 4 epochs, on every stage
            ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", monitor="val_loss", save_top_k=1),
        ],
    )
    trainer.fit(model, loader(), loader())
    _assert_same(dict(model.state_dict()), expected)  # 4 epochs of batches, then the drain

    header, *rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("val_loss")
    losses = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert len(losses) == 4
    best = losses.index(min(losses))
    assert best > 0  # a better epoch came later: the checkpoints of the earlier ones were removed, on every stage
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [f"epoch={best}.ckpt"]


SPLITS = {1: [], 2: ["model.4"], 3: ["model.2", "model.6"]}


def _checkpointing_trainer(
    tmp_path, devices: int, epochs: int, split_points=None, callbacks=(), planned: bool = False
) -> L.Trainer:
    """A DDG trainer on ``devices`` stages saving ``last.ckpt``, cut at ``split_points`` (by default ``SPLITS``;
    ``planned``: where the strategy's plan cuts); one device is a plain Lightning run."""

    split_points = None if planned else SPLITS[devices] if split_points is None else split_points
    strategy = DDGStrategy(start_method="forkserver", split_points=split_points) if devices > 1 else "auto"
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callbacks = [checkpoint, *callbacks]
    return _trainer(strategy, devices, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=True)


def _continue_from(checkpoint: dict, devices: int, step_lr: bool = False, split_points=None) -> dict:
    """The reference of one more epoch: a new pipeline from the saved weights, momentum buffers, learning rate and
    scheduler."""
    model = MLPClassifier(optimizer="sgd")
    model.load_state_dict(checkpoint["state_dict"])
    state = checkpoint["optimizer_states"][0]
    momentum = {name: state["state"][i]["momentum_buffer"] for i, (name, _) in enumerate(model.named_parameters())}
    split_points = SPLITS[devices] if split_points is None else split_points
    stages = split_module(model, split_points=split_points).train if devices > 1 else [model]
    optimizers = [make_optimizer("sgd", s.parameters()) for s in stages]
    for stage, optimizer in zip(stages, optimizers, strict=True):
        for name, p in stage.named_parameters():
            optimizer.state[p]["momentum_buffer"] = momentum[name].clone()
    schedulers = []
    for optimizer in optimizers if step_lr else ():
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        scheduler.load_state_dict(checkpoint["lr_schedulers"][0])
        optimizer.param_groups[0]["lr"] = state["param_groups"][0]["lr"]
        schedulers.append(scheduler)
    ref = DDGReference(stages, optimizers, torch.nn.functional.cross_entropy, lr_schedulers=schedulers)
    for x, y in loader():
        ref.step(x, y)
    ref.finish()
    return dict(model.state_dict())


@pytest.mark.parametrize(
    ("saved_on", "resumed_on", "step_lr"), [(3, 2, False), (1, 3, False), (2, 1, False), (2, 2, True)]
)
def test_resume_on_any_number_of_stages(tmp_path, saved_on: int, resumed_on: int, step_lr: bool) -> None:
    """Checkpoints hold the optimizer state one device would hold, so they resume on any number of stages;
    one device is a plain Lightning run. The in-flight gradients are not saved: the pipeline warms up again.
    The learning-rate schedule goes on where it was."""
    model = MLPClassifier(optimizer="sgd", step_lr=step_lr)
    _checkpointing_trainer(tmp_path, saved_on, 1).fit(model, loader(), loader())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = checkpoint["optimizer_states"][0]
    assert state["param_groups"][0]["params"] == list(range(10))  # 5 layers, weight then bias, in model order
    assert [state["state"][i]["momentum_buffer"].shape for i in range(10)] == [
        p.shape for p in MLPClassifier().parameters()
    ]
    if step_lr:  # StepLR(step_size=3, gamma=0.5) after the 6 steps of an epoch
        assert state["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.5**2)

    resumed = MLPClassifier(optimizer="sgd", step_lr=step_lr)
    _checkpointing_trainer(tmp_path, resumed_on, 2).fit(resumed, loader(), loader(), ckpt_path=tmp_path / "last.ckpt")
    _assert_same(dict(resumed.state_dict()), _continue_from(checkpoint, resumed_on, step_lr))


def test_a_fit_resumed_where_the_measured_stage_times_balance_continues_the_method(tmp_path) -> None:
    """A checkpoint keeps the stage times the pipeline measured; a resumed fit whose cuts the strategy plans is cut
    where they balance (lightning_ddg.measured_split_points names that cut), and it is the method on that cut, from
    the saved state."""
    epochs = -(-stats.MEASURED_STEPS // len(loader()))  # enough steps to be measured
    slow = _SlowInTraining(seconds=0.03)  # well above what a loaded machine adds to a stage's step
    _checkpointing_trainer(tmp_path, 2, epochs, callbacks=[slow]).fit(_SlowLastStage(slow=False), loader())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    figures = checkpoint["callbacks"]["LogStageFigures"]
    assert figures["split_points"] == SPLITS[2] and figures["stage_ms"][1] > figures["stage_ms"][0] + 5  # ms: the sleep
    assert not [name for name in _pickled_globals(tmp_path / "last.ckpt") if name.startswith("lightning_ddg")]
    balanced = lightning_ddg.measured_split_points(tmp_path / "last.ckpt", num_stages=2)
    assert balanced is not None and int(balanced[0].split(".")[1]) > int(SPLITS[2][0].split(".")[1])
    assert lightning_ddg.measured_split_points(tmp_path / "last.ckpt", num_stages=3) is None
    assert lightning_ddg.measured_split_points(None) is None  # a first run: the strategy plans as usual

    resumed = _SlowLastStage(slow=False)  # timed alone, its pieces would be cut where the first fit was
    trainer = _checkpointing_trainer(tmp_path, 2, epochs + 1, callbacks=[_RecordCut(tmp_path)], planned=True)
    trainer.fit(resumed, loader(), ckpt_path="last")
    assert [(tmp_path / f"cut{r}.txt").read_text().split() for r in (0, 1)] == [balanced, balanced]
    _assert_same(dict(resumed.state_dict()), _continue_from(checkpoint, 2, split_points=balanced))


class _RecordCuts(L.Callback):
    """Writes the split points each stage process trains on, when training starts and when it ends, to
    ``cuts{rank}.txt``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _write(self, trainer) -> None:
        with open(self.directory / f"cuts{trainer.global_rank}.txt", "a") as f:
            f.write(" ".join(trainer.strategy.partition.split_points) + "\n")
        fit_plan = trainer.strategy.plan  # the plan of the cut it trains on, the parameters of each stage with it
        parameters = " ".join(str(s.parameters) for s in fit_plan.stages)
        (self.directory / f"plan{trainer.global_rank}.txt").write_text(parameters)

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer)


@pytest.mark.parametrize(("devices", "accumulate"), [(2, 1), (3, 2)])
def test_a_fit_cut_anew_where_the_measured_stage_times_balance_continues_the_method(
    tmp_path, devices: int, accumulate: int
) -> None:
    """With rebalance_after_steps, before that batch the stages are cut where the times measured so far balance;
    the method is then a drain followed by a resume on the new cut: the modules that change stage take their
    weights, momentum and learning-rate schedule with them."""
    after, epochs = stats.MEASURED_STEPS + 4, 6  # 6 batches an epoch: 12 batches on the new cut
    model = _SlowLastStage(step_lr=True)  # the last layer sleeps on the last stage, which FLOPs miss
    model.model[-1].seconds = 0.04  # far more than the loop's time per step, however loaded the machine
    initial = copy.deepcopy(model)
    strategy = DDGStrategy(start_method="forkserver", balance_by="flops", rebalance_after_steps=after)
    callbacks = [_RecordCuts(tmp_path)]
    _trainer(strategy, devices, max_epochs=epochs, accumulate_grad_batches=accumulate, callbacks=callbacks).fit(
        model, loader()
    )
    cuts = [(tmp_path / f"cuts{r}.txt").read_text().splitlines() for r in range(devices)]
    assert all(cut == cuts[0] for cut in cuts)  # every stage cut alike
    first, second = (line.split() for line in cuts[0])
    stage_parameters = [int(n) for n in (tmp_path / "plan0.txt").read_text().split()]
    assert sum(stage_parameters) == sum(p.numel() for p in model.parameters()) and min(stage_parameters) > 0
    assert [int(p.split(".")[1]) for p in second] > [int(p.split(".")[1]) for p in first]  # more before the last
    initial.model[-1].slow = False
    expected = _reference_cut_anew(initial, first, second, after, epochs * len(loader()), accumulate)
    _assert_same(dict(model.state_dict()), expected)


class _FrozenFirstLayers(MLPClassifier):
    """Fine-tunes its linear layers after the first ``frozen`` with a learning-rate schedule; a layer that does
    nothing (``_SlowLayer``) sleeps in the pipeline, at the start or at the end, where the plan timed none. Its
    optimizer is given the parameters that train, so a stage of frozen layers alone is given none."""

    def __init__(self, frozen: int, slow_first: bool) -> None:
        super().__init__(step_lr=True, depth=frozen + 3)
        layers = [*self.model, _SlowLayer(True)] if not slow_first else [_SlowLayer(True), *self.model]
        self.model = torch.nn.Sequential(*layers)
        linears = [m for m in self.model if isinstance(m, torch.nn.Linear)]
        for linear in linears[:frozen]:
            linear.requires_grad_(False)
        self.slow = self.model[0] if slow_first else self.model[-1]
        self.slow.seconds = 0.04  # far more than the loop's time per step, however loaded the machine

    def configure_optimizers(self):
        optimizer = make_optimizer("sgd", [p for p in self.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize(("frozen", "slow_first"), [(2, True), (5, False)])
def test_a_stage_whose_layers_to_train_come_or_go_when_cut_anew_trains_them_on_the_schedule(
    tmp_path, frozen: int, slow_first: bool
) -> None:
    # the cut moves the first stage's only trainable layer to the next stage (slow first), or a trainable layer to
    # a first stage that held frozen layers alone (slow last): a stage whose optimizer had nothing to step, or has
    # nothing from then on; the layers go on training on the learning rate the schedule has reached, as on one device
    after, epochs = stats.MEASURED_STEPS + 4, 6
    model = _FrozenFirstLayers(frozen, slow_first)
    initial = copy.deepcopy(model)
    strategy = DDGStrategy(start_method="forkserver", balance_by="flops", rebalance_after_steps=after)
    _trainer(strategy, 2, max_epochs=epochs, callbacks=[_RecordCuts(tmp_path)]).fit(model, loader())
    first, second = ((tmp_path / "cuts0.txt").read_text().splitlines()[i].split() for i in (0, 1))
    trains = [any(p.requires_grad for p in split_module(initial, cut).train[0].parameters()) for cut in (first, second)]
    assert trains == [slow_first, not slow_first], (first, second)
    initial.slow.slow = False
    _assert_same(dict(model.state_dict()), _reference_cut_anew(initial, first, second, after, epochs * len(loader())))


class _StopsAfterForwardOnTheSlowStage(_SlowLastStage):
    """Sets ``trainer.should_stop`` after ``self(x)`` in its training step number ``at`` of the fit (from 0)."""

    def __init__(self, at: int) -> None:
        super().__init__(step_lr=True)
        self.at, self.steps = at, 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)  # returns on the last stage only
        if self.steps == self.at:
            self.trainer.should_stop = True
        self.steps += 1
        return loss


def test_a_stop_requested_by_the_last_stage_is_kept_when_the_stages_are_cut_anew(tmp_path) -> None:
    # set at batch 22 on the last of 2 stages, the request reaches the first stage with that batch's gradients before
    # batch 24, where the stages are cut anew: the first stage marks batch 24, and every stage trains it on the new
    # cut, then drains. On Lightning 2.4 the first stage decides once batch 24 has been fetched, and marks batch 25
    after = stats.MEASURED_STEPS + 4
    batches = after + 1 if hasattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor") else after + 2
    model = _StopsAfterForwardOnTheSlowStage(at=after - 2)
    model.model[-1].seconds = 0.04  # far more than the loop's time per step, however loaded the machine
    initial = copy.deepcopy(model)
    strategy = DDGStrategy(start_method="forkserver", balance_by="flops", rebalance_after_steps=after)
    _trainer(strategy, 2, max_epochs=6, callbacks=[_RecordCuts(tmp_path)]).fit(model, loader())
    first, second = ((tmp_path / "cuts0.txt").read_text().splitlines()[i].split() for i in (0, 1))
    assert first != second
    initial.model[-1].slow = False
    _assert_same(dict(model.state_dict()), _reference_cut_anew(initial, first, second, after, batches))


def _reference_cut_anew(
    model: MLPClassifier, first: list[str], second: list[str], at: int, steps: int, accumulate: int = 1
) -> dict:
    """The reference of a fit cut anew before batch ``at`` of ``steps``: the method on the ``first`` cut, drained,
    then on the ``second`` from the weights, momentum buffers, learning rate and scheduler it left."""
    batches = [batch for _ in range(-(-steps // len(loader()))) for batch in loader()][:steps]
    momentum: dict[str, torch.Tensor] = {}
    scheduler_state: dict | None = None
    for split_points, run in ((first, batches[:at]), (second, batches[at:])):
        stages = split_module(model, split_points=split_points).train
        optimizers = [make_optimizer("sgd", s.parameters()) for s in stages]
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in optimizers]
        for stage, optimizer, scheduler in zip(stages, optimizers, schedulers, strict=True):
            for name, p in stage.named_parameters():
                if name in momentum:
                    optimizer.state[p]["momentum_buffer"] = momentum[name].clone()
            if scheduler_state is not None:
                scheduler.load_state_dict(scheduler_state)
                optimizer.param_groups[0]["lr"] = scheduler.get_last_lr()[0]
        loss = torch.nn.functional.cross_entropy
        ref = DDGReference(stages, optimizers, loss, accumulate_grad_batches=accumulate, lr_schedulers=schedulers)
        for x, y in run:
            ref.step(x, y)
        ref.finish()
        for stage, optimizer in zip(stages, optimizers, strict=True):
            trained = [(name, p) for name, p in stage.named_parameters() if p.requires_grad]
            momentum |= {name: optimizer.state[p]["momentum_buffer"] for name, p in trained}
        scheduler_state = schedulers[0].state_dict()
    return dict(model.state_dict())


class _WithTorchmetrics(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        import torchmetrics

        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.accuracy(logits, y)
        self.log("val_acc", self.accuracy)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), sync_dist=True)


def test_torchmetrics_and_sync_dist_on_the_last_stage() -> None:
    model = _WithTorchmetrics()
    _trainer(DDGStrategy(start_method="forkserver"), 2, max_epochs=1).fit(model, loader(), loader())
    (piped,) = _trainer(DDGStrategy(start_method="forkserver"), 2).validate(model, loader(), verbose=False)
    # the same weights evaluated in one process give the same values
    (plain,) = _trainer("auto", 1).validate(model, loader(), verbose=False)
    assert piped["val_acc"] == pytest.approx(plain["val_acc"], abs=1e-6)
    assert piped["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)


def test_bf16_mixed_recompute_reproduces_stash() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    x, y = loader().dataset.tensors
    data = DataLoader(TensorDataset(x.float(), y), batch_size=8)
    results = []
    for memory in ("stash", "recompute"):
        model = MLPClassifier(optimizer="adam").float()
        strategy = DDGStrategy(start_method="forkserver", memory=memory, split_points=["model.4"])
        _trainer(strategy, 2, precision="bf16-mixed").fit(model, data, data)
        results.append(dict(model.state_dict()))
    _assert_same(results[1], results[0], rtol=0)


class _RecordsBatches(MLPClassifier):
    """Dropout on the first stage only draws randomness there; batch order must not depend on it."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(dropout=0.5)
        self.out_dir = out_dir

    def training_step(self, batch, batch_idx):
        with open(f"{self.out_dir}/rank{self.global_rank}.txt", "a") as f:
            f.write(f"{self.current_epoch} {batch_idx} {batch[0][:, 0].sum().item():.8f}\n")
        return super().training_step(batch, batch_idx)


def test_every_stage_reads_the_same_shuffled_batches(tmp_path) -> None:
    from torch.utils.data import DataLoader

    shuffled = DataLoader(loader().dataset, batch_size=8, shuffle=True)  # no generator of its own
    _trainer(DDGStrategy(start_method="forkserver", split_points=["model.9"]), 2, max_epochs=3).fit(
        _RecordsBatches(str(tmp_path)), shuffled
    )
    first, last = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (1, 0))
    assert len(first) == 3 * 6
    assert first == last


def test_a_test_after_the_fit_cuts_the_model_where_the_fit_did() -> None:
    model = MLPClassifier(optimizer="sgd")
    trainer = _trainer(DDGStrategy(start_method="forkserver"), 2, max_steps=4)
    trainer.fit(model, loader())
    fitted = trainer.strategy.plan  # sent back by the stages
    (piped,) = trainer.test(model, loader(), verbose=False)
    # the same plan, measured times and all: a plan by time made anew would not measure the same
    assert trainer.strategy.plan == fitted and fitted.balance_by == "time"
    (plain,) = _trainer("auto", 1).test(model, loader(), verbose=False)
    assert piped["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-9)


class _SavePredictions(L.pytorch.callbacks.BasePredictionWriter):
    """Spawned processes cannot return predictions to the test: rank 0 saves what predict_step returned."""

    def __init__(self, path) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        if trainer.is_global_zero:
            torch.save(predictions, self.path)


def test_test_and_predict_run_through_the_pipeline(tmp_path) -> None:
    model = MLPClassifier(optimizer="sgd")
    (piped,) = _trainer(DDGStrategy(start_method="forkserver"), 3).test(model, loader(), verbose=False)
    (plain,) = _trainer("auto", 1).test(model, loader(), verbose=False)
    assert piped["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-9)

    writer = _SavePredictions(tmp_path / "predictions.pt")
    _trainer(DDGStrategy(start_method="forkserver"), 3, callbacks=[writer]).predict(
        model, loader(), return_predictions=False
    )
    predictions = torch.load(tmp_path / "predictions.pt")
    expected = _trainer("auto", 1).predict(model, loader())
    assert [p.tolist() for p in predictions] == [p.tolist() for p in expected]


def test_clipping_and_learning_rate_monitor_run_per_stage(tmp_path) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    model = MLPClassifier(optimizer="sgd", step_lr=True)
    trainer = _trainer(
        DDGStrategy(start_method="forkserver", balance_by="params"),  # the reference's cut, on a busy machine too
        2,
        gradient_clip_val=0.01,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step")],
    )
    expected = copy.deepcopy(model)
    trainer.fit(model, loader(), loader())
    split_points = balanced_split_points(copy.deepcopy(expected), 2)
    clipped = _reference(expected, split_points, clip=0.01)  # each stage clips the norm of its own gradients
    _assert_same(dict(model.state_dict()), clipped)
    unclipped = _reference(expected, split_points)
    assert not torch.allclose(unclipped["model.0.weight"], clipped["model.0.weight"], rtol=1e-3)
    header, *rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("lr-SGD")
    rates = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    # StepLR(step_size=3, gamma=0.5) over 12 steps: the same schedule the stages stepped with
    assert rates == [0.05 * 0.5 ** (step // 3) for step in range(12)]


class _ManualOptimization(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class _TwoViews(MLPClassifier):
    """Averages the outputs of two views of the batch, each sent through ``self(...)``, in ``step``."""

    def __init__(self, step: str) -> None:
        super().__init__()
        self.step = step

    def _loss(self, batch, step: str):
        x, y = batch
        logits = self(x)
        if step == self.step:
            logits = (logits + self(-x)) / 2
        return torch.nn.functional.cross_entropy(logits, y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch, "training_step")

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch, "validation_step"))


@pytest.mark.parametrize("step", ["training_step", "validation_step"])
def test_a_step_that_calls_the_model_twice_is_stopped_with_advice_not_left_waiting(step: str) -> None:
    # the stages before the last end the step at its first self(...): the last stage's second call would wait for
    # activations that never come (validation) or train on the wrong ones
    strategy = DDGStrategy(start_method="forkserver", timeout=timedelta(seconds=60))
    message = rf"{step} called the model's forward twice.*send them as one: `self\(torch.cat\(\[x, x.flip\(-1\)\]\)\)`"
    with pytest.raises(Exception, match=message):
        _trainer(strategy, 2, max_epochs=1).fit(_TwoViews(step), loader(), loader())
    if step == "validation_step":  # one stage evaluates as often as the step asks
        _trainer(DDGStrategy(start_method="forkserver"), 1, max_epochs=1).fit(_TwoViews(step), loader(), loader())


class _SkipsABatch(MLPClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx == 2 else loss


def _warnings_of_a_fit_skipping_a_batch(rank: int, world_size: int) -> list[str]:
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _trainer(DDGStrategy(), 1).fit(_SkipsABatch(), loader())  # one stage: the fit runs in this process
    return [str(w.message) for w in said]


def test_a_training_step_that_returns_none_is_said_to_train_on_a_zero_loss() -> None:
    # the stage steps with zero gradients for that batch, which is no skip under momentum: said, once (2 epochs)
    (said,) = run_processes(_warnings_of_a_fit_skipping_a_batch, 1, group=False, timeout=120)
    told = [m for m in said if m.startswith("training_step returned None")]
    assert len(told) == 1 and "zero loss" in told[0] and "Said once per run" in told[0], said


class _SyncBatchNormed(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(batchnorm=True)
        self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # as a DDP codebase builds it


def test_sync_batchnorm_layers_are_refused_at_setup_with_advice() -> None:
    # on a GPU the stage holding one would wait in its all-gather for stages that never join
    with pytest.raises(Exception, match=r"'model.2' is a SyncBatchNorm \(3 in the model\).*Use BatchNorm layers"):
        _trainer(DDGStrategy(start_method="forkserver"), 2).fit(_SyncBatchNormed(), loader())


class _WeightNormed(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        torch.nn.utils.parametrizations.weight_norm(self.model[0])  # torch cannot pickle a parametrized layer


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_module_that_cannot_be_pickled_for_started_processes_is_refused_with_advice(start_method: str) -> None:
    message = rf"(?s)cannot be sent to processes started with '{start_method}'.*Use strategy='ddg' \(start_method="
    with pytest.raises(L.pytorch.utilities.exceptions.MisconfigurationException, match=message):
        _trainer(DDGStrategy(start_method=start_method), 2).fit(_WeightNormed(), loader())


def test_manual_optimization_is_refused_with_advice() -> None:
    with pytest.raises(Exception, match="does not support manual optimization"):
        _trainer(DDGStrategy(start_method="forkserver"), 2).fit(_ManualOptimization(), loader())


class _NoForward(MLPClassifier):
    """The habit of calling the inner model in training_step: the LightningModule defines no forward."""

    forward = L.LightningModule.forward

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(x), y)


def test_a_module_without_forward_is_refused_at_setup_with_advice() -> None:
    # it failed in the trace of Lightning's own forward, naming neither the module nor what to write
    with pytest.raises(Exception, match=r"_NoForward defines no forward: .*def forward\(self, x\)"):
        _trainer(DDGStrategy(start_method="forkserver"), 2).fit(_NoForward(), loader())


class _FirstLayersKept(MLPClassifier):
    """Fine-tuning the last layers: ``"trainable"``, the first two linear layers are frozen and the optimizer is given
    the parameters that train, as such code usually does; ``"all"``, the same layers frozen and every parameter given;
    ``"last"``, nothing frozen and the optimizer given the last layers' parameters only."""

    def __init__(self, given: str) -> None:
        super().__init__()
        self.given = given
        if given != "last":
            self.model[:4].requires_grad_(False)

    def configure_optimizers(self):
        params = {
            "trainable": [p for p in self.parameters() if p.requires_grad],
            "all": list(self.parameters()),
            "last": list(self.model[4:].parameters()),
        }[self.given]
        return torch.optim.AdamW(params, lr=1e-2)


def test_a_stage_whose_parameters_the_optimizer_is_not_given_steps_none(tmp_path) -> None:
    # the first stage holds the first two layers: the optimizer configure_optimizers builds there has none of its
    # parameters, where torch raised "optimizer got an empty parameter list"
    trained = {}
    for given in ("trainable", "all", "last"):
        model = _FirstLayersKept(given)
        before = copy.deepcopy(model.state_dict())
        strategy = DDGStrategy(split_points=["model.4"], start_method="forkserver")
        checkpoint = ModelCheckpoint(dirpath=tmp_path / given, save_last=True)
        _trainer(strategy, 2, callbacks=[checkpoint], enable_checkpointing=True).fit(model, loader())
        trained[given] = model.state_dict()
    for given in ("all", "last"):  # AdamW skips a parameter without a gradient: the same updates
        for name, value in trained["trainable"].items():
            assert torch.equal(value, trained[given][name]), (given, name)
    assert torch.equal(trained["last"]["model.0.weight"], before["model.0.weight"])
    assert not torch.equal(trained["last"]["model.8.weight"], before["model.8.weight"])
    # the checkpoint's optimizer state is the one a single device holds: the six parameters given, in one group
    last = tmp_path / "trainable" / "last.ckpt"
    (state,) = torch.load(last, weights_only=False)["optimizer_states"]
    assert [len(group["params"]) for group in state["param_groups"]] == [6] and len(state["state"]) == 6
    _trainer("auto", 1, max_epochs=EPOCHS + 1).fit(_FirstLayersKept("trainable"), loader(), ckpt_path=last)


class _Compiled(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.compile(self.model)


def test_a_compiled_submodule_is_refused_with_advice() -> None:
    message = r"'model' is compiled with torch.compile, and a compiled module cannot be cut .* not torch.compile\(net\)"
    with pytest.raises(Exception, match=message):
        _trainer(DDGStrategy(start_method="forkserver"), 2).fit(_Compiled(), loader())
    with pytest.raises(ValueError, match=message):  # and by the planner, called directly
        plan(_Compiled(), torch.randn(2, 8, dtype=torch.float64), 2)


class _BatchSize(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 4

    def train_dataloader(self):
        return torch.utils.data.DataLoader(loader().dataset, batch_size=self.batch_size)


def test_the_batch_size_finder_is_refused_at_setup_with_advice() -> None:
    from lightning.pytorch.tuner import Tuner

    trainer = _trainer(DDGStrategy(start_method="forkserver"), 2)
    with pytest.raises(Exception, match=r"batch size finder .* does not support DDGStrategy.*Set the batch size"):
        Tuner(trainer).scale_batch_size(_BatchSize(), max_trials=2, steps_per_trial=1)


class _OnPlateau(MLPClassifier):
    """Halves its learning rate whenever ``train_loss`` does not improve 10-fold, i.e. at every step of the
    scheduler; on every stage, ``on_train_end`` checks that its own optimizer took each of those steps."""

    def __init__(self, interval: str) -> None:
        super().__init__()
        self.interval = interval

    @staticmethod
    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5, threshold=10.0)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = {"scheduler": self.scheduler(optimizer), "monitor": "train_loss", "interval": self.interval}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_train_end(self) -> None:
        expected = self.scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
        for _ in range(self.trainer.current_epoch):
            expected.step(1.0)
        lrs = [group["lr"] for group in self.trainer.optimizers[0].param_groups]
        assert lrs == [expected.get_last_lr()[0]] and lrs[0] < 0.1, (self.trainer.global_rank, lrs)


def test_a_plateau_scheduler_on_a_training_metric_reduces_every_stage_alike_per_epoch() -> None:
    # train_loss is logged on the last stage only; it reaches every stage at each epoch's end
    _trainer(DDGStrategy(start_method="forkserver"), 3, max_epochs=3).fit(_OnPlateau("epoch"), loader())


def test_a_plateau_scheduler_stepped_every_batch_is_refused_at_setup_with_advice() -> None:
    with pytest.raises(Exception, match=r"ReduceLROnPlateau that steps every training batch .* 'train_loss'.*"
                       r"Step it once per epoch \(interval='epoch'"):  # fmt: skip
        _trainer(DDGStrategy(start_method="forkserver"), 2).fit(_OnPlateau("step"), loader())


def test_a_checkpoint_every_n_steps_on_a_training_metric_saves_the_best_on_every_stage_together(tmp_path) -> None:
    # train_loss exists on the last stage only; each save is a collective, so every stage must decide on its value
    checkpoint = ModelCheckpoint(tmp_path, monitor="train_loss", every_n_train_steps=3, save_top_k=2)
    strategy = DDGStrategy(start_method="forkserver", timeout=timedelta(seconds=60))
    _trainer(strategy, 3, callbacks=[checkpoint], enable_checkpointing=True).fit(MLPClassifier(), loader())
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert len(saved) == 2 and Path(checkpoint.best_model_path).name in saved, saved
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    assert best["state_dict"].keys() == MLPClassifier().state_dict().keys()
    (kept,) = [state for key, state in best["callbacks"].items() if key.startswith("ModelCheckpoint")]
    assert torch.isfinite(kept["best_model_score"]) and len(kept["best_k_models"]) == 2


def test_the_learning_rate_finder_in_spawned_processes_is_refused_at_setup_with_advice() -> None:
    from lightning.pytorch.tuner import Tuner

    trainer = _trainer(DDGStrategy(start_method="forkserver"), 2)
    with pytest.raises(Exception, match=r"learning-rate finder .* Run it with strategy='ddg'"):
        Tuner(trainer).lr_find(MLPClassifier(), loader(), num_training=5)


def test_weight_averaging_is_refused_at_setup_with_advice() -> None:
    from lightning.pytorch import callbacks

    averaging = [callbacks.StochasticWeightAveraging(swa_lrs=0.01)]
    if hasattr(callbacks, "EMAWeightAveraging"):  # Lightning 2.5 on
        averaging.append(callbacks.EMAWeightAveraging())
    for callback in averaging:
        name = type(callback).__name__
        with pytest.raises(Exception, match=rf"{name} does not support DDGStrategy: .* Train without it"):
            _trainer(DDGStrategy(start_method="forkserver"), 2, callbacks=[callback]).fit(MLPClassifier(), loader())


class _Unfreeze(L.Callback):
    """Unfreezes the first layer at the second epoch, as a fine-tuning schedule would."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            pl_module.model[0].requires_grad_(True)


class _FrozenFirstLayer(MLPClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.model[0].requires_grad_(False)


def test_a_parameter_unfrozen_during_the_fit_stops_it_with_advice() -> None:
    # a stage would go on training the parameters it was built with: the unfrozen layer would silently stay frozen
    message = r"'model.0.weight' was made trainable \(requires_grad=True\) during the fit, with 2 parameter.*fit once"
    with pytest.raises(Exception, match=message):
        _trainer(DDGStrategy(start_method="forkserver"), 2, callbacks=[_Unfreeze()]).fit(_FrozenFirstLayer(), loader())


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        ("BackboneFinetuning", r"BackboneFinetuning does not support DDGStrategy: .* Fine-tune in phases"),
        (
            "GradientAccumulationScheduler",
            r"GradientAccumulationScheduler .*Trainer\(accumulate_grad_batches=N\)",
        ),
        ("ModelPruning", r"ModelPruning does not support DDGStrategy: .* Prune before the fit or after it"),
    ],
)
def test_callbacks_that_change_what_or_how_the_stages_train_are_refused_at_setup(callback: str, message: str) -> None:
    from lightning.pytorch import callbacks

    made = {
        "BackboneFinetuning": callbacks.BackboneFinetuning,
        "GradientAccumulationScheduler": lambda: callbacks.GradientAccumulationScheduler({0: 1, 1: 2}),
        "ModelPruning": lambda: callbacks.ModelPruning("l1_unstructured", amount=0.5),
    }[callback]()
    with pytest.raises(Exception, match=message):
        _trainer(DDGStrategy(start_method="forkserver"), 2, callbacks=[made]).fit(MLPClassifier(), loader())


def test_cutting_anew_under_deterministic_is_refused_at_setup(monkeypatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # set by Trainer(deterministic=True), put back after the test
    strategy = DDGStrategy(start_method="forkserver", rebalance_after_steps=stats.MEASURED_STEPS)
    try:
        with pytest.raises(Exception, match=r"rebalance_after_steps .* Trainer\(deterministic=True\) rules out"):
            _trainer(strategy, 2, deterministic=True).fit(MLPClassifier(), loader())
    finally:  # the Trainer made this process deterministic: the tests after it plan by time again
        torch.use_deterministic_algorithms(False)


class _TwoOptimizers(MLPClassifier):
    def configure_optimizers(self):
        weights = [p for name, p in self.named_parameters() if name.endswith("weight")]
        biases = [p for name, p in self.named_parameters() if name.endswith("bias")]
        return torch.optim.SGD(weights, lr=0.05), torch.optim.Adam(biases, lr=0.01)


def test_multiple_optimizers_are_refused_with_advice() -> None:
    with pytest.raises(Exception, match=r"DDGStrategy steps one optimizer per stage.* give it param groups"):
        _trainer(DDGStrategy(start_method="forkserver"), 2).fit(_TwoOptimizers(), loader())


def test_synced_batchnorm_over_replicas_is_refused_when_the_trainer_is_built() -> None:
    with pytest.raises(ValueError, match=r"sync_batchnorm=True\) is not supported with DDGStrategy's 2 replicas"):
        L.Trainer(strategy=DDGStrategy(num_stages=2), devices=4, accelerator="cpu", sync_batchnorm=True)
    # over one pipeline there is nothing to synchronise: the option changes nothing
    L.Trainer(strategy=DDGStrategy(), devices=2, accelerator="cpu", sync_batchnorm=True, logger=False)


def test_float16_loss_scaling_is_refused_with_advice() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    # CPU runs refuse "16-mixed" before any strategy sees it: check the strategy's own refusal directly
    scaler = torch.amp.GradScaler("cpu")
    strategy = DDGStrategy(precision_plugin=MixedPrecision("16-mixed", "cpu", scaler=scaler))
    with pytest.raises(Exception, match="bf16-mixed"):
        strategy._check_supported(MLPClassifier())


def test_the_plan_is_logged_from_the_first_batch(tmp_path) -> None:
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    model = MLPClassifier(optimizer="sgd")  # 4 Linear layers; the cut leaves the last one alone on stage 1
    strategy = DDGStrategy(split_points=["model.8"], balance_by="params", start_method="forkserver")
    _trainer(strategy, 2, max_epochs=1, logger=CSVLogger(tmp_path, name="run")).fit(model, loader())
    hparams = yaml.safe_load((tmp_path / "run" / "version_0" / "hparams.yaml").read_text())
    assert hparams["ddg/split_points"] == "model.8" and hparams["ddg/balance_by"] == "params"
    assert hparams["ddg/stage1/parameters"] == 16 * 3 + 3
    # the example came from the first training batch: 8 rows of 16 float64 activations cross the cut
    assert hparams["ddg/stage0/bytes_out"] == 8 * 16 * 8


def test_the_model_summary_runs_the_example_input_array_through_the_pipeline() -> None:
    # Lightning's ModelSummary calls the model on example_input_array on every rank before the fit, outside any step:
    # the call runs through the pipeline and returns None on the stages before the last, instead of failing there
    model = MLPClassifier(optimizer="sgd")
    model.example_input_array = next(iter(loader()))[0]
    before = copy.deepcopy(model.state_dict())
    strategy = DDGStrategy(split_points=["model.8"], start_method="forkserver")
    _trainer(strategy, 2, max_steps=3, enable_model_summary=True).fit(model, loader())  # raised on stage 0 before
    assert all(not torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_the_plan_is_shown_logged_and_warns_of_a_slow_stage(tmp_path, caplog) -> None:
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    from lightning_ddg.cutting import show_plan
    from lightning_ddg.planning import plan

    model = MLPClassifier(optimizer="sgd")
    chosen = plan(model, (next(iter(loader()))[0],), split_points=["model.8"], balance_by="params")
    logger = CSVLogger(tmp_path, name="run")
    trainer = _trainer("auto", 1, logger=logger, enable_model_summary=True)
    with pytest.warns(PossibleUserWarning) as warned:
        show_plan(trainer, chosen)
    logger.save()
    assert f"stage 0 of the DDG pipeline costs {chosen.imbalance:.2f}x the mean stage (params)" in str(
        warned[0].message
    )
    assert "DDG plan: 2 stages" in caplog.text and "model.0 … model.7" in caplog.text
    assert (tmp_path / "run" / "version_0" / "hparams.yaml").read_text().count("ddg/") == len(chosen.to_dict())


def test_a_plan_that_could_not_measure_the_stages_warns_that_it_balanced_parameter_counts() -> None:
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    from lightning_ddg.cutting import show_plan
    from lightning_ddg.planning import plan

    model = MLPClassifier(optimizer="sgd")
    wrong = torch.randn(8, 5)  # not what the first layer takes: the example fails, as a mismatched batch would
    chosen = plan(model, (wrong,), num_stages=2, balance_by="time")
    assert chosen.balance_by == "params" and "the example input failed" in chosen.note
    with pytest.warns(PossibleUserWarning, match="could not measure what each stage costs"):
        show_plan(_trainer("auto", 1, logger=False), chosen)


def test_a_cut_chosen_by_time_counts_the_batches_the_first_stage_loads() -> None:
    from lightning_ddg.cutting import make_plan

    class SlowToLoad(torch.utils.data.Dataset):
        def __init__(self, data) -> None:
            self.data = data

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int):
            time.sleep(0.002)  # decoding and augmenting, say
            return self.data[i]

    class Loads(MLPClassifier):
        loaders_made = 0

        def train_dataloader(self):
            self.loaders_made += 1
            return DataLoader(SlowToLoad(loader().dataset), batch_size=8)

    class Planned(L.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            self.loading, self.loaders_made = [], []
            for first_stage_loads in (True, False):
                made = pl_module.loaders_made
                chosen, _ = make_plan(
                    trainer, pl_module, 2, None, None, torch.device("cpu"), first_stage_loads=first_stage_loads
                )
                self.loading.append(chosen.loading_ms)
                self.loaders_made.append(pl_module.loaders_made - made)

    planned = Planned()
    _trainer("auto", 1, max_steps=1, callbacks=[planned]).fit(Loads(optimizer="sgd"))
    assert planned.loading[0] >= 16  # eight samples of 2 ms per batch, in the first stage's cost
    assert planned.loading[1] == 0.0  # with load_once=False every stage loads: no stage pays more than another
    assert planned.loaders_made == [1, 1]  # the user's hook runs once for the example batch and the loading time
