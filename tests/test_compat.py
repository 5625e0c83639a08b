"""Every private Lightning and torch name lightning-ddg relies on (``_compat.py``) is still where it is expected:
an upgrade that moves one fails here, by name, before it changes any behaviour."""

from __future__ import annotations

import inspect
from datetime import timedelta

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.connectors.logger_connector import _LoggerConnector
from torch import nn
from torchmetrics import MeanMetric

from lightning_ddg import _compat


def test_the_launchers_methods_lightning_ddg_overrides_and_calls() -> None:
    wrapping = inspect.signature(_compat.MultiProcessingLauncher._wrapping_function)
    assert list(wrapping.parameters)[:5] == ["self", "process_idx", "trainer", "function", "args"]
    assert callable(_compat.SubprocessScriptLauncher._call_children_scripts)
    assert "procs" in inspect.getsource(_compat.SubprocessScriptLauncher._call_children_scripts)
    assert callable(_compat.GlobalStateSnapshot.capture) and callable(_compat.GlobalStateSnapshot.restore)


def test_the_trainer_attributes_read() -> None:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, detect_anomaly=True)
    assert _compat.detect_anomaly(trainer) is True
    assert isinstance(trainer._logger_connector, _LoggerConnector)
    assert isinstance(_compat.should_update_logs(trainer), bool)
    assert list(inspect.signature(trainer._logger_connector.log_metrics).parameters) == ["metrics", "step"]
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 0  # log_figures
    assert _compat.data_source(trainer.fit_loop) is not None
    assert isinstance(trainer.test_loop._logged_outputs, list)  # evaluation_results, during a test
    assert _compat.evaluation_results(trainer) is None  # outside a validation or test
    assert hasattr(trainer, "_signal_connector")
    for name in _compat._SIGNAL_HANDLERS:
        assert hasattr(trainer._signal_connector, name), name
    assert _compat.trainer_if_attached(pl.LightningModule()) is None
    from lightning.pytorch.trainer.call import _interrupt  # interrupt_here

    assert callable(_interrupt) and callable(trainer._teardown)


def test_the_checkpoint_a_fit_resumes_from_is_recorded_as_the_trainer_selects_it(tmp_path) -> None:
    from lightning.pytorch.trainer.states import TrainerFn

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    recorded = []
    for _ in range(2):  # a second run of the same Trainer records once, not twice
        _compat.record_resumed_checkpoint(trainer, recorded.append)
    path = tmp_path / "last.ckpt"
    select = trainer._checkpoint_connector._select_ckpt_path
    assert select(TrainerFn.FITTING, path, model_provided=True, model_connected=False) == path
    assert recorded == [path]


def test_the_torch_internals_used() -> None:
    module = nn.BatchNorm1d(3, track_running_stats=True)
    module.register_buffer("scratch", torch.zeros(1), persistent=False)
    assert set(_compat.parameter_table(module)) == {"weight", "bias"}
    assert "running_mean" in _compat.buffer_table(module)
    assert _compat.non_persistent_buffers(module) == {"scratch"}
    t = torch.zeros(4)
    assert _compat.storage_use_count(t) is not None
    a, b = [torch.zeros(2)], [torch.ones(2)]
    _compat.foreach_add_(a, b)
    _compat.foreach_copy_(b, a)
    assert torch.equal(b[0], torch.ones(2))
    leaves, spec = _compat.tree_flatten({"x": t, "y": (t, 1)})
    assert _compat.tree_unflatten(leaves, spec)["y"][1] == 1
    # the check torch.export records for a .float() (newer versions than 2.4 record one), found by its name
    assert _compat._assert_metadata is not None
    exported = torch.export.export(_Floats(), (torch.zeros(2, dtype=torch.float64),)).graph
    checks = [node for node in exported.nodes if _compat.is_export_metadata_check(node)]
    assert all(not node.users for node in checks) and len(checks) <= 1
    assert not any(_compat.is_export_metadata_check(node) for node in torch.fx.symbolic_trace(_Floats()).graph.nodes)


class _Floats(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() + 1


def test_a_metric_can_be_kept_from_synchronising() -> None:
    metric = MeanMetric()
    _compat.disable_metric_sync(metric)
    metric.update(torch.tensor(2.0))
    assert metric._to_sync is False and metric.compute() == 2.0


def test_the_timer_of_a_time_limit_is_taken_over_and_an_epoch_timer_left_alone() -> None:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_time={"hours": 1})
    timer = _compat.take_over_step_timer(trainer)
    assert isinstance(timer, pl.callbacks.Timer) and timer.time_remaining() > 0
    assert vars(timer)["on_train_batch_end"] is _compat._no_time_check  # its check, a broadcast, is off
    assert timer._verbose is True  # announce_time_limit
    epochs = pl.callbacks.Timer(duration={"hours": 1}, interval="epoch")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[epochs])
    assert _compat.take_over_step_timer(trainer) is None
    assert _compat.take_over_step_timer(pl.Trainer(logger=False, enable_checkpointing=False)) is None


def test_a_monitoring_checkpoint_is_seen_to_save_at_its_steps_only() -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    every_3 = ModelCheckpoint(monitor="train_loss", every_n_train_steps=3)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, callbacks=[every_3])
    for step, saves in ((1, False), (3, True), (4, False), (6, True)):
        trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total.completed = step  # global_step
        trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
        assert trainer.global_step == step and _compat.saves_on_metric_now(every_3, trainer) is saves, step
    every_3._last_global_step_saved = 6
    assert _compat.saves_on_metric_now(every_3, trainer) is False  # saved at this step already
    timed = ModelCheckpoint(monitor="train_loss", train_time_interval=timedelta(minutes=1))
    assert _compat.saves_on_metric_now(timed, trainer) is True  # Lightning decides inside, after a broadcast
    assert _compat.saves_on_metric_now(ModelCheckpoint(every_n_train_steps=3), trainer) is False  # no monitor
