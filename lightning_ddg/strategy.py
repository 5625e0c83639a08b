"""``DDGStrategy``: Lightning's adapter to the DDG stage runtime, hooks only.

Each process runs one stage. ``configure_optimizers`` sees this stage's parameters only; in ``training_step``,
``self(x)`` forwards batch ``t`` through this stage, and on every stage but the last the rest of the step is
skipped (there is no loss there); when fit ends, the whole trained model is back in the module on every rank
(see ``docs/usage.md``). Each hook hands its work to a module of its own (``docs/architecture.md``): the process
group to ``job.py``, the cut to ``cutting.py``, the stage while it runs to ``stage_run.py``, what happens before a
training batch to ``between_batches.py``, checkpoints to ``checkpoint_hooks.py``, collectives to ``collectives.py``,
ranks and devices to ``layout.py``.

Example::

    import lightning as L
    import lightning_ddg  # registers "ddg" and "ddg_spawn"

    trainer = L.Trainer(strategy="ddg", devices=4)
    trainer = L.Trainer(strategy=lightning_ddg.DDGStrategy(split_points=["model.layer3"]), devices=2)
    trainer.fit(model, datamodule)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from typing_extensions import override

from lightning_ddg._compat import (
    default_process_group_backend,
    detect_anomaly,
    distributed_is_initialized,
    optimizers_to_device,
    syncs_batchnorm,
)
from lightning_ddg.balance import BalanceBy
from lightning_ddg.between_batches import BetweenBatches
from lightning_ddg.callbacks import add_stage_callbacks, check_callbacks
from lightning_ddg.checkpoint import NothingToTrain
from lightning_ddg.checkpoint_hooks import StageCheckpointHooks
from lightning_ddg.checks import (
    ONE_OPTIMIZER,
    ONE_STAGE,
    check_automatic_optimization,
    check_defines_forward,
    check_no_loss_scaling,
    check_no_sync_batchnorm_layers,
    check_no_synced_batchnorm,
    check_not_compiled,
    check_options,
    check_plateau_per_epoch,
    check_stage_count,
    check_stages_have_parameters,
    check_tied_clipping,
    check_train_loader,
)
from lightning_ddg.collectives import StageCollectives
from lightning_ddg.cutting import cut_module
from lightning_ddg.job import JobMember
from lightning_ddg.launchers import DDGScriptLauncher, DDGSpawnLauncher
from lightning_ddg.layout import StageLayout
from lightning_ddg.loaders import read_alike, shuffle_seed
from lightning_ddg.metrics import quiet_epoch_sync_advice, scope_metrics
from lightning_ddg.partition import Partition
from lightning_ddg.planning import Plan
from lightning_ddg.rebalancing import recut_batch, recut_where_measured
from lightning_ddg.shard import Draw, record_draws, rng_states
from lightning_ddg.stage import DDGStage, MemoryMode
from lightning_ddg.stage_run import StageRun

__all__ = ["DDGStrategy"]

log = logging.getLogger(__name__)


class DDGStrategy(StageLayout, StageCheckpointHooks, StageCollectives, ParallelStrategy):
    """Train a LightningModule split into pipeline stages with DDG, one stage per device, the pipeline optionally
    replicated with data parallelism.

    Args:
        split_points: fully qualified names of the modules that begin a new stage, in forward order,
            e.g. ``["model.layer3"]``; so ``len(split_points) == num_stages - 1``.
        balance: layer counts per stage for a module whose forward runs one ``nn.Sequential``
            (torchgpipe's convention), e.g. ``[3, 2, 2, 1]``.
        num_stages: ``S``, the stages of one pipeline. The ``devices × num_nodes`` processes then run
            ``devices × num_nodes / S`` replicas of the pipeline, each on its own shard of the data, whose
            stages average their gradients before every step (see ``docs/scale-out.md``). ``None``: one stage
            per process and no replicas.
        balance_by: with neither ``split_points`` nor ``balance``, the cuts minimise the slowest stage's cost
            measured by ``"time"`` (forward + backward of each piece of the model timed on the device, with the
            example input), ``"flops"`` or ``"params"`` (see :func:`lightning_ddg.plan`). By default ``"time"``,
            and ``"flops"`` under ``Trainer(deterministic=True)``, whose runs must cut alike. The example input
            is the module's ``example_input_array``, or else the part of the first batch that fits ``forward``
            (``x`` of a batch ``(x, y)``, the items of a dict batch named like ``forward``'s parameters).
            ``"memory"``: the cuts minimise the largest stage's memory instead (see ``docs/performance.md``).
            A fit planned by time that resumes from a checkpoint which kept the stage times the pipeline measured
            is cut where those times balance (:func:`lightning_ddg.cutting.resumed_split_points`).
        memory: ``"stash"`` (default, exact), ``"recompute"`` (exact, keeps no activations) or ``"replay"``
            (inexact, keeps no weight copies); see ``docs/semantics.md``.
        timeout: how long any wait for another stage may take before the run fails.
        rendezvous_timeout: how long the processes may take to meet when a run starts (each one imports, then
            waits for the others); the error names those that did not arrive.
        start_method: ``"popen"`` re-launches the script per process (like ``strategy="ddp"``), ``"spawn"``
            starts processes with multiprocessing (``strategy="ddg_spawn"``, for notebooks), ``"forkserver"``
            forks them from a server that imported lightning_ddg once (fits after the first start at once).
        check_finite: stop with ``FloatingPointError`` when the loss, or a gradient a stage receives, holds a NaN
            or an infinity. By default on with ``Trainer(detect_anomaly=True)``.
        load_once: only the first stage iterates the data loaders and sends each batch on (whole to the last
            stage, zero tensors of its shapes to those between); ``False``: every process iterates them, for code
            before ``self(x)`` in a step that needs the real values on every stage.
        rebalance_after_steps: before this training batch of a fit (rounded up to whole accumulation windows),
            cut the stages anew where the times the pipeline measured so far balance, when that makes the slowest
            stage at least 5% of the mean faster: the pipeline drains, the modules move between stages with their
            weights and optimizer state, and training goes on (:mod:`lightning_ddg.rebalancing`). ``None``
            (default): the cut stays, as the method prescribes. Needs a cut the strategy plans; 20 or more.

    A failure in any stage ends every process of the job; see "Reliability" in ``docs/usage.md``.

    At the start of every fit the plan of the split is printed as a table (with ``enable_model_summary``) and
    logged to the loggers' hyperparameters; a warning names a stage that costs more than 1.25× the mean, and,
    when training ends, a stage that the pipeline measured that much slower (``ddg/measured_imbalance``). A
    validation, test or prediction after a fit takes that plan again (``plan``), unless it opened the model with
    ``torch.export``.

    Example::

        trainer = L.Trainer(strategy=DDGStrategy(balance=[3, 2, 2, 1]), devices=4, accelerator="cpu")
    """

    strategy_name = "ddg"

    def __init__(
        self,
        split_points: Sequence[str] | None = None,
        balance: Sequence[int] | None = None,
        num_stages: int | None = None,
        balance_by: BalanceBy | None = None,
        memory: MemoryMode = "stash",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta = default_pg_timeout,
        rendezvous_timeout: timedelta = timedelta(minutes=3),
        start_method: Literal["popen", "spawn", "forkserver"] = "popen",
        check_finite: bool | None = None,
        load_once: bool = True,
        rebalance_after_steps: int | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        check_options(
            split_points, balance, num_stages, memory, balance_by, start_method, rebalance_after_steps
        )  # fmt: skip
        self.split_points = list(split_points) if split_points is not None else None
        self.balance = list(balance) if balance is not None else None
        self.balance_by = balance_by
        self.memory = memory
        self.num_stages = num_stages
        self.check_finite = check_finite
        self.load_once = load_once
        self.rebalance_after_steps = rebalance_after_steps
        self._job = JobMember()  # the process group and the watchdog (job.py)
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._rendezvous_timeout = rendezvous_timeout
        self._start_method = start_method
        self._num_nodes = 1
        self._run: StageRun | None = None  # this rank's stage and what runs it, from setup on
        self.partition: Partition | None = None
        self.plan: Plan | None = None  # the split of the last setup, with its costs
        self.resumed_from: Any = None  # the checkpoint the run resumes from, as the Trainer chose it (launchers.py)
        self._shuffle_seed = 0
        self._between = BetweenBatches()  # stop signals, a fit's end, a recut: decided before a batch, no collective
        self._init_rng_states: dict[str, Tensor] | None = None  # when configure_model began building on meta
        self._init_draws: list[Draw] | None = None  # the random values that build drew (none: it was on meta)

    # --- processes (layout.py: devices, ranks, stages and replicas) ------------------------------------------
    @property
    @override
    def handles_gradient_accumulation(self) -> bool:
        # stages step on windows aligned to batch numbers, so each stage decides when to step
        return True

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        # here, when the Trainer is built, no process has been started yet: the error is shown once
        check_stage_count(self.num_nodes * self.num_processes, self.split_points, self.balance, self.num_stages)
        check_no_synced_batchnorm(syncs_batchnorm(self), self.topology.num_replicas)
        if self.num_stages is None and self.num_nodes * self.num_processes == 1:
            rank_zero_warn(ONE_STAGE, category=PossibleUserWarning)
        if self._start_method == "popen":
            self._launcher = DDGScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, describe=self.topology.describe
            )
        else:
            self._launcher = DDGSpawnLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        backend = self._process_group_backend or default_process_group_backend(self.root_device)
        self._process_group_backend = backend
        assert self.cluster_environment is not None
        self._job.join(  # job.py: the process group, then a watchdog over the other processes
            self.cluster_environment, backend, self.global_rank, self.world_size, describe=self.topology.describe,
            first_child_rank=self.node_rank * self.num_processes + 1,  # launched by strategy="ddg"'s local rank 0
            watch_parent=self._start_method != "popen" or self.local_rank > 0,
            rendezvous_timeout=self._rendezvous_timeout, timeout=self._timeout,
        )  # fmt: skip

    # --- model -------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        self._check_supported(module)
        check_callbacks(trainer, spawned=self._start_method != "popen")
        self.model = self.precision_plugin.convert_module(module)
        context, rank, device = self.precision_plugin.forward_context, self.global_rank, self.root_device
        self.partition, self.plan = cut_module(  # cutting.py: rank 0 plans, every rank cuts alike
            trainer, module, self.topology.num_stages, self.split_points, self.balance, self.balance_by, rank,
            device, self.broadcast, context, self.memory, self.load_once,
            self.resumed_from if trainer.state.fn == TrainerFn.FITTING else None,
            earlier=self.plan if trainer.state.fn != TrainerFn.FITTING else None,  # evaluating what it fitted
        )  # fmt: skip
        check_stages_have_parameters(self.partition.train, self.partition.split_points)
        check_tied_clipping(self.partition.tied, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        self._shuffle_seed = self.broadcast(shuffle_seed())
        finite = self.check_finite if self.check_finite is not None else detect_anomaly(trainer)
        self._stage_options = {  # as the stages are built now, and again if the fit cuts them anew
            "timeout": self._timeout, "memory": self.memory, "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "check_finite": finite,
        }  # fmt: skip
        self._run = StageRun.start(  # stage_run.py: this rank's stage built, the module's forward the pipeline
            module, self.topology, rank, partition=self.partition, world_size=self.world_size, device=device,
            init_rng_states=self._init_rng_states, init_draws=self._init_draws, on_stop=self._between.stopping,
            **self._stage_options,
        )  # fmt: skip
        if self.world_size > 1:  # between_batches.py: in place of Lightning's per-batch broadcast and signal handlers
            recut_at = recut_batch(self.rebalance_after_steps, self.topology.num_stages, trainer, self._run.keep_stage)
            self._between.start(
                trainer, self._job, in_band=self.load_once and self.topology.num_stages > 1, recut_at=recut_at,
                report=self.global_rank == 0, before_batch=self._before_batch,
            )  # fmt: skip
        scope_metrics(module, self._run.replica_group)
        quiet_epoch_sync_advice(everything=self.topology.num_replicas == 1)
        add_stage_callbacks(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            optimizers_to_device(self.optimizers, self.root_device)

    @property
    def stage(self) -> DDGStage | None:
        """This rank's stage while a run is on (:class:`~lightning_ddg.stage_run.StageRun`)."""
        return self._run.stage if self._run is not None else None

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        """``configure_model`` builds the layers on the meta device, without their data; each stage process then
        gives real tensors to its own stage only (:func:`lightning_ddg.shard.materialize`), with the initial values
        a whole build from the same random state would give them."""
        with torch.device("meta"), record_draws() as draws:
            yield
        # taken after the build: initialising meta tensors draws no random numbers, so these are the states the
        # layers' initialisation would have begun with, a torch.manual_seed in configure_model included
        self._init_rng_states, self._init_draws = rng_states(self.root_device), draws

    def _check_supported(self, module: pl.LightningModule) -> None:
        scaled = isinstance(self.precision_plugin, MixedPrecision) and self.precision_plugin.scaler is not None
        with _refused():
            check_defines_forward(type(module).forward is not pl.LightningModule.forward, type(module).__name__)
            check_automatic_optimization(module.automatic_optimization)
            check_no_loss_scaling(scaled)
            check_not_compiled(module)
            check_no_sync_batchnorm_layers(module, self.topology.num_stages)

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        try:
            super().setup_optimizers(trainer)
        except RuntimeError as err:
            if "Training with multiple optimizers" not in str(err):
                raise
            # Lightning's advice, manual optimization, is refused too (_check_supported)
            raise MisconfigurationException(ONE_OPTIMIZER) from None
        except ValueError as err:
            # torch's "optimizer got an empty parameter list": the optimizer was given none of this stage's parameters
            # (the trainable ones only, where this stage's are frozen; a head's only): as on one device, they stay
            if "empty parameter list" not in str(err) or self.topology.num_stages == 1:
                raise
            log.info("stage %d: configure_optimizers gave none of its parameters, no optimizer steps", self.stage_index)
            self.optimizers, self.lr_scheduler_configs = [NothingToTrain()], []
        with _refused():
            check_plateau_per_epoch(self.lr_scheduler_configs, self.topology.num_stages)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.training:
            check_train_loader(dataloader)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.training:
            self.check_stopped_together()  # a validation's loader, set up before the collective below
        stage = trainer.state.stage.dataloader_prefix if trainer is not None and trainer.state.stage else None
        what = {"train": "training", "val": "validation"}.get(stage, stage or "a")
        gathered = self.world_size > 1 and distributed_is_initialized()
        lengths = self.states.all_gather_objects if gathered else None
        with _refused():
            read_alike(dataloader, self.topology, self.global_rank, self._shuffle_seed, lengths, what)
        # prediction writers read the batch indices off the loader's own sampler
        if self._run is None or not self.load_once or (trainer and trainer.state.fn == TrainerFn.PREDICTING):
            return dataloader
        training = trainer is not None and trainer.training
        return self._run.carried(dataloader, training, self._batch_marked)  # only the first stage iterates it

    def _batch_marked(self) -> None:
        assert self._run is not None
        self._between.batch_marked(self._run)  # the first stage marked this batch as the fit's last

    # --- the pipelined forward (forward.py, stage_run.py) ------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None and self._run is not None and self._run.stage is not None
        step, context = self.lightning_module.training_step, self.precision_plugin.train_step_context
        run = partial(self._run.training_step, context, step, *args, **kwargs)
        if not self._run.stage.is_last or self._run.stage.num_stages == 1:
            return run()
        # should_stop set after self(x), on this stage alone: a request to the first stage (ending.py)
        return self._between.training_step(self._run, self.lightning_module.trainer, run)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        step, context = self.lightning_module.validation_step, self.precision_plugin.val_step_context
        return self._evaluation_step(context, step, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        step, context = self.lightning_module.test_step, self.precision_plugin.test_step_context
        return self._evaluation_step(context, step, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        step, context = self.lightning_module.predict_step, self.precision_plugin.predict_step_context
        return self._evaluation_step(context, step, *args, **kwargs)

    def _evaluation_step(self, context: Callable[[], Any], step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert self._run is not None
        return self._run.evaluation_step(context, step, *args, **kwargs)

    # --- between training batches (between_batches.py) ------------------------------------------------------
    def _before_batch(self) -> None:
        # where Lightning would broadcast rank 0's SIGTERM flag: the first stage decides for every stage
        assert self._run is not None and self.lightning_module is not None
        recut = partial(recut_where_measured, self, self.lightning_module.trainer, stage_options=self._stage_options)
        self._between.before_batch(self._run, recut)

    def check_stopped_together(self) -> None:
        """At a validation or an epoch's end of a fit, before its collectives: raise unless every stage left
        training after the same batch (:meth:`FitEnd.check_together <lightning_ddg.ending.FitEnd.check_together>`)."""
        if self._run is not None and self._run.stage is not None:
            self._between.check_together(self._run)

    @property
    def stopped_by(self) -> int | None:
        """The signal this job's pipeline stopped for, if it did."""
        return self._between.stop.stopped_by

    def stopped_elsewhere(self, signum: int) -> None:
        """In a launching process that runs no stage: the stages stopped for ``signum`` and saved what callbacks
        save; this process's copy of the module never trained, so it saves nothing over theirs."""
        self._between.stop.stopped_by = signum

    # --- delayed backward and stepping (stage_run.py) ----------------------------------------------------
    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        assert self._run is not None and self.lightning_module is not None
        self._run.check_loss(closure_loss, self.lightning_module.trainer.global_step)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        self._run.backward(closure_loss)
        return self.precision_plugin.post_backward(closure_loss, self.lightning_module)

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # the closure runs training_step and the delayed backward; a step follows only when this stage's
        # accumulation window is complete (never during warm-up)
        result = closure()
        if self._run is not None and self._run.update_due:
            self._run.update(partial(self._step, optimizer, model))
        return result

    def _step(self, optimizer: Any, model: Any = None) -> None:
        # through the precision plugin, so on_before_optimizer_step hooks and gradient clipping run as usual
        self.precision_plugin.optimizer_step(optimizer, model=model or self.lightning_module, closure=_no_closure)

    # --- end of a run ------------------------------------------------------------------------------------
    @override
    def on_train_end(self) -> None:
        assert self._run is not None
        self._run.drain(partial(self._step, self.optimizers[0]) if self.optimizers else None)
        self._run.finish()

    @override
    def on_validation_end(self) -> None:
        if self.lightning_module is not None and self.lightning_module.trainer.state.fn == TrainerFn.VALIDATING:
            self._finish()

    @override
    def on_test_end(self) -> None:
        self._finish()

    @override
    def on_predict_end(self) -> None:
        self._finish()

    def _finish(self) -> None:
        # the channels closed and the whole module back on every rank, unless it was built in configure_model (it
        # may not fit one process): then each rank keeps its stage, and full_state_dict collects it on request
        assert self._run is not None
        self._run.finish()

    # --- failure and teardown ----------------------------------------------------------------------------
    @override
    def on_exception(self, exception: BaseException) -> None:
        if self._between.after_stop(exception):
            return
        self._job.fail(exception, self.global_rank)  # job.py: the other stages would wait forever for this one

    @override
    def teardown(self) -> None:
        log.info("teardown: rank %d (%s)", self.global_rank, "failed" if self._job.failed else "closing its channels")
        self._job.leave(self._run, stopped=self.stopped_by is not None, stage_ran=self.partition is not None)
        self._between.finish()
        if self.lightning_module is not None:
            self.lightning_module.__dict__.pop("forward", None)
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("ddg", "popen"), ("ddg_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"DDG pipeline, one stage per device, processes started with {start_method}",
                    start_method=start_method,
                )


def _no_closure() -> None:
    return None


@contextmanager
def _refused() -> Generator[None, None, None]:
    # the checks (checks.py, loaders.py) know nothing of Lightning: their ValueError becomes Lightning's own error
    try:
        yield
    except ValueError as err:
        raise MisconfigurationException(str(err)) from None
