"""The private Lightning and torch names lightning-ddg relies on, in one place.

Each name says what it is for and what happens if its owner moves it: a renamed name must show up as an error at
import or as a failing test (``tests/test_compat.py`` looks every one of them up), never as a silent change of
behaviour. Where the package can go on without a name, it warns once (:func:`_warn_once`) and says what it does
instead. Nothing else in the package imports a private name of Lightning or torch, or reads a private attribute
of their objects.

Versions: ``pyproject.toml`` states the range CI tests (the newest pair, and a fast part of the suite on the
oldest supported pair; see ``.ci/run``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies.launchers.multiprocessing import (
    _disable_module_memory_sharing as disable_module_memory_sharing,
)
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized as distributed_is_initialized,
)
from lightning.fabric.utilities.distributed import (
    _get_default_process_group_backend_for_device as default_process_group_backend,
)
from lightning.fabric.utilities.distributed import _init_dist_connection as init_dist_connection
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed as set_num_threads_if_needed
from lightning.fabric.utilities.distributed import _sync_ddp_if_available as sync_ddp_if_available
from lightning.fabric.utilities.optimizer import _optimizer_to_device as optimizer_to_device
from lightning.fabric.utilities.optimizer import _optimizers_to_device as optimizers_to_device
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO as WrappingCheckpointIO
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher as MultiProcessingLauncher
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher as SubprocessScriptLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import (
    _GlobalStateSnapshot as GlobalStateSnapshot,
)
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

# The private names imported above; if one moves, `import lightning_ddg` fails with an ImportError naming it.
# - distributed_is_initialized: whether the default process group exists.
# - default_process_group_backend: "nccl" for CUDA devices, else "gloo".
# - init_dist_connection: Lightning's own process group set-up, for torchrun's agent store and a later fit.
# - set_num_threads_if_needed: OMP threads per process, as DDP sets them.
# - sync_ddp_if_available: the all-reduce behind self.log(sync_dist=True), over a stage's replicas.
# - optimizer(s)_to_device: an optimizer's state moved to the stage's device after setup and after a resume.
# - MultiProcessingLauncher, SubprocessScriptLauncher, GlobalStateSnapshot, disable_module_memory_sharing: the
#   launchers launchers.py extends. It overrides launch() and, for the spawning one, _wrapping_function(process_idx,
#   trainer, function, args, ...), and calls _call_children_scripts() and reads .procs; tests/test_compat.py checks
#   those names and that argument order.
# - WrappingCheckpointIO: a checkpoint IO that wraps another (AsyncCheckpointIO), whose wrapped IO checkpoint_io.py
#   makes write atomically.
# - pytree, tree_flatten, tree_map, tree_unflatten: nested batches and stage outputs flattened into tensors and back
#   (torch.utils._pytree is what torch.fx and torch.export use; its public twin appeared only in torch 2.5).

# --- torch.export's module swap --------------------------------------------------------------------------------------
# exporting.py opens the modules torch.fx cannot trace by exporting them and swapping the real modules back in for the
# calls that hold no cut (torch.export._swap, which appeared after torch 2.4). Without it, export_trace raises and the
# fx trace stands: such modules are kept whole, as before the export path existed.
try:
    from torch.export import _swap as export_swap
except ImportError:  # older torch
    export_swap = None

__all__ = [
    "GlobalStateSnapshot",
    "is_export_metadata_check",
    "announce_time_limit",
    "export_swap",
    "MultiProcessingLauncher",
    "SubprocessScriptLauncher",
    "WrappingCheckpointIO",
    "buffer_table",
    "data_source",
    "default_process_group_backend",
    "detect_anomaly",
    "disable_metric_sync",
    "disable_module_memory_sharing",
    "distributed_is_initialized",
    "foreach_add_",
    "foreach_copy_",
    "init_dist_connection",
    "interrupt_here",
    "log_figures",
    "non_persistent_buffers",
    "optimizer_to_device",
    "optimizers_to_device",
    "parameter_table",
    "pytree",
    "replace_per_step_sigterm_broadcast",
    "replace_signal_handlers",
    "restore_signal_handlers",
    "saves_on_metric_now",
    "set_num_threads_if_needed",
    "set_wrapped_checkpoint_io",
    "should_update_logs",
    "storage_use_count",
    "sync_ddp_if_available",
    "take_over_step_timer",
    "trainer_if_attached",
    "tree_flatten",
    "tree_map",
    "tree_unflatten",
    "unwrapped_optimizer",
    "version_counter",
]


# --- torch: module tables and fused kernels -------------------------------------------------------------------------
def parameter_table(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """``module._parameters``: the dict ``nn.Module`` keeps its own parameters in. Removing a stage's parameters
    from a process (shard.py) and swapping weight copies in for a delayed backward (stage.py) edit it in place,
    which no public API does without walking the module tree per call. Stable since torch 1.0; if it moves, every
    stage test fails."""
    return module._parameters  # type: ignore[return-value]


def buffer_table(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """``module._buffers``: as :func:`parameter_table`, for buffers."""
    return module._buffers


def version_counter(tensor: torch.Tensor) -> int:
    """``tensor._version``: how often it was changed in place, which autograd keeps to detect a saved tensor that
    changed. A stage in recompute mode reads it to find the buffers its forward updates (spectral norm's power
    iteration; BatchNorm's kernel writes its statistics uncounted, found by their values), and keeps those as the
    forward read them. Stable since torch 1.0; if it moves, the recompute tests fail."""
    return tensor._version


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """``module._non_persistent_buffers_set``: the buffers left out of ``state_dict``, kept so when a removed
    buffer is registered again."""
    return module._non_persistent_buffers_set


def foreach_copy_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``torch._foreach_copy_``: one fused copy of a stage's weights into its stash; a loop if it is gone."""
    fused = getattr(torch, "_foreach_copy_", None)
    if fused is None:
        _warn_once("torch._foreach_copy_", "weights are copied one tensor at a time")
        for t, s in zip(targets, sources, strict=True):
            t.copy_(s)
        return
    fused(targets, sources)


def foreach_add_(targets: list[torch.Tensor], others: list[torch.Tensor]) -> None:
    """``torch._foreach_add_``: one fused sum of a window's gradients; a loop if it is gone."""
    fused = getattr(torch, "_foreach_add_", None)
    if fused is None:
        _warn_once("torch._foreach_add_", "gradients are summed one tensor at a time")
        for t, o in zip(targets, others, strict=True):
            t.add_(o)
        return
    fused(targets, others)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def storage_use_count(tensor: torch.Tensor) -> int | None:
    """How many references hold ``tensor``'s storage (``torch._C._storage_Use_Count``): a channel reuses a
    received buffer only when nothing else holds its data. ``None`` if torch lacks it: then no buffer is reused
    (correct, but receiving allocates every time) and a warning says so."""
    if _storage_use_count is None:
        _warn_once("torch._C._storage_Use_Count", "received buffers are not reused")
        return None
    return int(_storage_use_count(tensor.untyped_storage()._cdata))


def is_export_metadata_check(node: Any) -> bool:
    """Whether an exported graph's ``node`` is ``aten._assert_tensor_metadata``, the check ``torch.export`` records
    for a ``.to()`` or ``.float()``: it computes nothing, and ``exporting._sink`` drops it. If torch renames it, the
    checks stay where the export put them (a cut before a layer converting its parameters may then measure an
    empty stage) and a warning says so."""
    if _assert_metadata is None:
        _warn_once("torch.ops.aten._assert_tensor_metadata", "an export's dtype checks stay at the top of its graph")
        return False
    return node.op == "call_function" and node.target is _assert_metadata


_assert_metadata = getattr(getattr(torch.ops.aten, "_assert_tensor_metadata", None), "default", None)


# --- Lightning: attributes of its objects ---------------------------------------------------------------------------
def trainer_if_attached(module: pl.LightningModule) -> pl.Trainer | None:
    """``module._trainer``: the Trainer, or ``None`` where ``module.trainer`` would raise (teardown after a
    failed setup)."""
    return module._trainer


def unwrapped_optimizer(optimizer: Any) -> Any:
    """The optimizer a ``LightningOptimizer`` wraps (``._optimizer``); the optimizer itself otherwise."""
    return getattr(optimizer, "_optimizer", optimizer)


def set_wrapped_checkpoint_io(wrapper: Any, checkpoint_io: Any) -> None:
    """Replace the IO a wrapping checkpoint IO (``AsyncCheckpointIO``) writes through: ``wrapper._checkpoint_io``,
    whose public property has no setter."""
    wrapper._checkpoint_io = checkpoint_io


def disable_metric_sync(metric: Any) -> None:
    """A torchmetrics ``Metric`` that never synchronises: ``sync_on_compute`` and ``dist_sync_on_step`` off, and
    ``_to_sync``, torchmetrics' flag for a sync in ``compute()`` that ``sync_on_compute`` alone leaves set. If the
    flag moves, a metric on a pipeline without replicas would wait in ``compute()`` for stages that never update
    it: tests/test_strategy.py's torchmetrics test hangs into its timeout."""
    metric.sync_on_compute = metric.dist_sync_on_step = metric._to_sync = False


_SIGNAL_HANDLERS = ("_sigterm_notifier_fn", "_slurm_sigusr_handler_fn")


def replace_per_step_sigterm_broadcast(trainer: pl.Trainer, check: Callable[[], None]) -> None:
    """Run ``check`` where Lightning's training loop broadcasts rank 0's SIGTERM flag before every batch.

    That broadcast (``_TrainingEpochLoop._broadcast_sigterm_tensor``, Lightning >= 2.5) is a collective per step:
    every stage would wait for the last one before each batch, which undoes the pipeline. If Lightning renames
    it, the per-step collective comes back and ``tests/test_per_step.py`` fails. Lightning 2.4 has none (each
    process stops by itself where it got the signal): there ``check`` runs in ``on_train_batch_start``, after the
    batch is fetched, before it is trained on.
    """
    loop = trainer.fit_loop.epoch_loop
    if hasattr(type(loop), "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = check  # an instance attribute shadows the method
        return
    before = next((c for c in trainer.callbacks if isinstance(c, _BeforeEachBatch)), None)
    if before is None:
        before = _BeforeEachBatch()
        trainer.callbacks.append(before)
    before.check = check


class _BeforeEachBatch(pl.Callback):
    """Runs ``check`` before each training batch (Lightning 2.4: :func:`replace_per_step_sigterm_broadcast`)."""

    check: Callable[[], None] = staticmethod(lambda: None)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.check()


def take_over_step_timer(trainer: pl.Trainer) -> Timer | None:
    """The fit's time limit (``Trainer(max_time=...)``: a ``Timer`` callback that checks after every training
    batch), its own check switched off, for the strategy to decide on the first stage instead; ``None`` without
    one, or where it checks once per epoch (a collective per epoch: left as it is).

    Lightning's check broadcasts rank 0's answer to every rank after each batch (``Timer._check_time_remaining``):
    a collective per step, which would make every stage wait for the last. Reads ``Timer._interval``; if it moves,
    the timer is left as it is (it still stops every stage after the same batch, with a collective per step, and
    ``tests/test_per_step.py`` fails) and a warning says so."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None), None)
    if timer is None:
        return None
    if not hasattr(timer, "_interval"):
        _warn_once("Timer._interval", "a fit with max_time waits for its last stage after every batch")
        return None
    if timer._interval != "step":
        return None
    timer.on_train_batch_end = _no_time_check  # an instance attribute shadows the hook
    return timer


def _no_time_check(*args: Any, **kwargs: Any) -> None:
    return None


def saves_on_metric_now(checkpoint: Any, trainer: pl.Trainer) -> bool:
    """Whether ``checkpoint`` (a ``ModelCheckpoint`` with a ``monitor``) may save in this training batch's
    ``on_train_batch_end``, reading the metric there: every ``every_n_train_steps`` steps, at any step with a
    ``train_time_interval`` (whose decision Lightning broadcasts from rank 0 inside the hook), never at a step it
    saved at already. Reads ``_every_n_train_steps``, ``_train_time_interval`` and ``_last_global_step_saved``; if
    they move, every step counts (the metric is then shared after every batch: correct, and slower) and a warning
    says so."""
    if getattr(checkpoint, "monitor", None) is None or trainer.fast_dev_run or trainer.sanity_checking:
        return False
    try:
        every, interval = checkpoint._every_n_train_steps, checkpoint._train_time_interval
        saved = checkpoint._last_global_step_saved
    except AttributeError:
        _warn_once(
            "ModelCheckpoint._every_n_train_steps", "a monitoring checkpoint waits for the last stage every step"
        )
        return True
    if saved == trainer.global_step:
        return False
    return interval is not None or (every >= 1 and trainer.global_step % every == 0)


def announce_time_limit(timer: Timer) -> None:
    """What Lightning's ``Timer`` says when it stops a fit (with ``verbose``, ``Timer._verbose``: said if it
    moves)."""
    if getattr(timer, "_verbose", True):
        elapsed = timedelta(seconds=int(timer.time_elapsed()))
        rank_zero_info(f"Time limit reached. Elapsed time is {elapsed}. Signaling Trainer to stop.")


def replace_signal_handlers(trainer: pl.Trainer, handler: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
    """Make ``handler`` the function Lightning registers for SIGTERM and for SLURM's requeue signal.

    Lightning's own handlers broadcast from inside the signal handler (a collective at an arbitrary point of one
    process) and save the requeue checkpoint there (collectives again). The handlers are looked up on the
    ``_SignalConnector`` instance when ``Trainer`` registers them, after ``Strategy.setup``; if Lightning renames
    them, its own handlers run and the signal tests fail. Returns Lightning's requeue handler, which saves the
    ``hpc_ckpt`` checkpoint and requeues the job, for the strategy to call where every stage can take part.
    """
    connector = trainer._signal_connector
    requeue = connector._slurm_sigusr_handler_fn
    for name in _SIGNAL_HANDLERS:
        setattr(connector, name, handler)
    return requeue


def restore_signal_handlers(trainer: pl.Trainer) -> None:
    connector = trainer._signal_connector
    for name in _SIGNAL_HANDLERS:
        connector.__dict__.pop(name, None)


def interrupt_here(trainer: pl.Trainer, exception: BaseException) -> None:
    """What ``Trainer`` does with an exception that ends a run (``on_exception`` hooks, loggers finalised,
    teardown), in a process started by a spawning launcher, where Lightning itself does it only in the launching
    process. ``lightning.pytorch.trainer.call._interrupt``; if it moves, the spawn stop test fails."""
    from lightning.pytorch.trainer.call import _interrupt

    _interrupt(trainer, exception)
    trainer._teardown()


def should_update_logs(trainer: pl.Trainer) -> bool:
    """Whether Lightning logs at this training step (every ``log_every_n_steps``): the stage figures are logged
    then. ``trainer._logger_connector.should_update_logs``; if it moves, the figures are logged at epoch ends only
    and a warning says so."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None or not hasattr(connector, "should_update_logs"):
        _warn_once("Trainer._logger_connector.should_update_logs", "stage figures are logged at epoch ends only")
        return False
    return bool(connector.should_update_logs)


def log_figures(trainer: pl.Trainer, figures: dict[str, float], epoch_end: bool = False) -> None:
    """Hand ``figures`` to the trainer's loggers at the step Lightning logs the module's metrics at (after a training
    batch, or at an epoch's end: ``epoch_end``), with ``epoch``, and put them in ``trainer.callback_metrics``,
    without keeping them among the epoch's logged results, which Lightning's loop reads again after every batch:
    tens of figures there cost the last stage, which sets the pipeline's pace, 0.17 ms per step in
    ``benchmarks/logging_cost.py`` (``docs/performance.md``). Uses
    ``trainer._logger_connector.log_metrics`` and ``trainer.fit_loop.epoch_loop._batches_that_stepped``; if either
    moves, each logger's ``log_metrics`` at ``trainer.global_step``, and a warning says so."""
    connector = getattr(trainer, "_logger_connector", None)
    stepped = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", None)
    if connector is not None and hasattr(connector, "log_metrics") and isinstance(stepped, int):
        # Lightning logs an epoch's end at the step of its last batch
        connector.log_metrics({**figures, "epoch": trainer.current_epoch}, step=stepped - 1 if epoch_end else stepped)
    else:
        _warn_once("Trainer._logger_connector.log_metrics", "stage figures are logged at trainer.global_step")
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)
    trainer.callback_metrics.update({name: torch.tensor(value) for name, value in figures.items()})


def record_resumed_checkpoint(trainer: pl.Trainer, record: Callable[[Any], None]) -> None:
    """Call ``record`` with the checkpoint the next run of ``trainer`` resumes from (``None``: none), as the Trainer
    resolves ``ckpt_path`` (``"last"``, ``"hpc"``, a path) before the strategy's setup; Lightning hands the path to
    the strategy only after it. Wraps ``trainer._checkpoint_connector._select_ckpt_path``; if it moves, nothing is
    recorded (a resumed fit is planned as a new one) and a warning says so."""
    connector = getattr(trainer, "_checkpoint_connector", None)
    select = getattr(connector, "_select_ckpt_path", None)
    if select is None:
        _warn_once(
            "Trainer._checkpoint_connector._select_ckpt_path",
            "a resumed fit is planned anew, not cut where the stage times its checkpoint kept balance",
        )
        return
    if isinstance(select, _RecordedSelection):  # a later run of the same Trainer: one wrapper, the latest record
        select = select.select
    connector._select_ckpt_path = _RecordedSelection(select, record)


class _RecordedSelection:
    """``_select_ckpt_path`` that also hands its answer to ``record`` (:func:`record_resumed_checkpoint`)."""

    def __init__(self, select: Callable[..., Any], record: Callable[[Any], None]) -> None:
        self.select, self.record = select, record

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        path = self.select(*args, **kwargs)
        self.record(path)
        return path


def detect_anomaly(trainer: pl.Trainer) -> bool:
    """``Trainer(detect_anomaly=...)``, which turns the stages' finite checks on by default. Lightning keeps it
    in ``trainer._detect_anomaly`` only; if it moves, the checks stay off unless ``check_finite=True`` is given,
    and a warning says so."""
    if not hasattr(trainer, "_detect_anomaly"):
        _warn_once("Trainer._detect_anomaly", "give DDGStrategy(check_finite=True) to check for NaN")
        return False
    return bool(trainer._detect_anomaly)


def data_source(loop: Any) -> Any:
    """The ``_DataLoaderSource`` of a fit/validate/test/predict loop, from which the strategy draws one example
    batch to measure the stages. ``loop._data_source``; if it moves, there is no example batch: the plan balances
    by parameter counts and a warning says so."""
    source = getattr(loop, "_data_source", None)
    if source is None:
        _warn_once(f"{type(loop).__name__}._data_source", "the stages are balanced by parameter counts")
    return source


def syncs_batchnorm(strategy: Any) -> bool:
    """Whether the Trainer was given ``sync_batchnorm=True``: Lightning then hands the strategy a layer sync in its
    private ``_layer_sync`` before ``_configure_launcher``. If it moves, ``False``: the option is not checked."""
    return getattr(strategy, "_layer_sync", None) is not None


def evaluation_results(trainer: pl.Trainer) -> list[dict[str, Any]] | None:
    """The list of metric dicts, one per dataloader, that the running validation or test will return from
    ``trainer.validate`` or ``trainer.test``, as far as it is filled (Lightning's private
    ``trainer._evaluation_loop._logged_outputs``). If it moves, ``None``: each rank returns what it logged itself,
    and a warning says so."""
    try:
        loop = trainer._evaluation_loop
    except RuntimeError:  # outside a validation or test
        return None
    outputs = getattr(loop, "_logged_outputs", None)
    if not isinstance(outputs, list):
        _warn_once(
            f"{type(loop).__name__}._logged_outputs",
            "trainer.validate and trainer.test return the last stage's metrics on its ranks only",
        )
        return None
    return outputs


_warned: set[str] = set()


def _warn_once(name: str, consequence: str) -> None:
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"lightning-ddg relies on Lightning's private {name}, which this Lightning version lacks: {consequence}. "
        "Use a Lightning version lightning-ddg supports (see pyproject.toml).",
        RuntimeWarning,
        stacklevel=3,
    )
