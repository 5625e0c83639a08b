"""``DDGStrategy``: Lightning's adapter to the DDG stage runtime.

Each process runs one stage. The strategy cuts the LightningModule's ``forward`` into stages, keeps only this
rank's stage parameters in the module (so ``configure_optimizers`` sees only those), and replaces ``forward``
with the pipeline: inside ``training_step``, ``self(x)`` forwards batch ``t`` through this stage; on every stage
but the last, the rest of ``training_step`` is skipped (there is no loss there). The loss computed on the last
stage drives the delayed backward of every stage (:class:`~lightning_ddg.stage.DDGStage`); each stage steps its
own optimizer when its accumulation window is complete. When fit ends, the pipeline drains and the full trained
weights are gathered back into the LightningModule on every rank.

Example::

    import lightning as L
    import lightning_ddg  # registers "ddg" and "ddg_spawn"

    trainer = L.Trainer(strategy="ddg", devices=4)
    trainer = L.Trainer(strategy=lightning_ddg.DDGStrategy(split_points=["model.layer3"]), devices=2)
    trainer.fit(model, datamodule)
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_ddg._compat import (
    default_process_group_backend,
    detect_anomaly,
    distributed_is_initialized,
    init_dist_connection,
    optimizers_to_device,
    replace_per_step_sigterm_broadcast,
    replace_signal_handlers,
    restore_signal_handlers,
    sync_ddp_if_available,
    trainer_if_attached,
    unwrapped_optimizer,
)
from lightning_ddg.balance import BalanceBy
from lightning_ddg.batches import ReceivedBatches, SentBatches, carried_batches
from lightning_ddg.build import build_stage
from lightning_ddg.callbacks import add_stage_callbacks
from lightning_ddg.checkpoint_io import atomic, load_mapped, writes_local_torch_files
from lightning_ddg.checks import (
    ONE_OPTIMIZER,
    check_automatic_optimization,
    check_finite,
    check_no_loss_scaling,
    check_options,
    check_same_lengths,
    check_stage_count,
    check_stages_have_parameters,
    check_tied_clipping,
    check_train_loader,
)
from lightning_ddg.comm import PipelineStopped
from lightning_ddg.cutting import given_split_points, make_plan, show_plan
from lightning_ddg.forward import PipelinedForward, StageDone
from lightning_ddg.launchers import DDGScriptLauncher, DDGSpawnLauncher, launched_ranks, pause_observer, run_ended
from lightning_ddg.lifeline import end_if_launcher_gone
from lightning_ddg.loaders import check_sampler_shards_replicas, loader_length, seed_shuffling, shuffle_seed
from lightning_ddg.metrics import quiet_epoch_sync_advice, scope_metrics
from lightning_ddg.partition import Partition, split_module
from lightning_ddg.planning import Plan
from lightning_ddg.rendezvous import init_process_group, needs_rendezvous
from lightning_ddg.shard import Removed, on_meta, put_back, rng_states
from lightning_ddg.stage import DDGStage, MemoryMode
from lightning_ddg.state import StageStates, load_stage_state, parameter_names
from lightning_ddg.stopping import JobStop
from lightning_ddg.topology import StageLinks, Topology
from lightning_ddg.watchdog import Watchdog

__all__ = ["DDGStrategy"]

log = logging.getLogger(__name__)


class DDGStrategy(ParallelStrategy):
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

    A failure in any stage ends every process of the job; see "Reliability" in ``docs/usage.md``.

    At the start of every fit the plan of the split is printed as a table (with ``enable_model_summary``) and
    logged to the loggers' hyperparameters; a warning names a stage that costs more than 1.25× the mean.

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
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        check_options(
            split_points, balance, num_stages, memory=memory, balance_by=balance_by, start_method=start_method
        )
        self.split_points = list(split_points) if split_points is not None else None
        self.balance = list(balance) if balance is not None else None
        self.balance_by = balance_by
        self.memory = memory
        self.num_stages = num_stages
        self.check_finite = check_finite
        self.load_once = load_once
        self._watchdog: Watchdog | None = None
        self._failed = False
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._rendezvous_timeout = rendezvous_timeout
        self._start_method = start_method
        self._num_nodes = 1
        self._links: StageLinks | None = None
        self.stage: DDGStage | None = None
        self.partition: Partition | None = None
        self.plan: Plan | None = None  # the split of the last setup, with its costs
        self._removed: list[Removed] = []
        self._states: StageStates | None = None  # gathers the whole model's state from the stages
        self._forward: PipelinedForward | None = None  # the module's forward while a stage runs
        self._update_due = False
        self._shuffle_seed = 0
        self._stop = JobStop()
        self._batch_loaders: list[SentBatches | ReceivedBatches] = []  # this run's loaders, reading over links
        self._init_rng_states: dict[str, Tensor] | None = None  # when configure_model began building on meta
        self._keep_stage_after_fit = False  # a model built on the meta device stays cut after fit
        self._finished = True  # no stage is running

    # --- layout ------------------------------------------------------------------------------------------
    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def topology(self) -> Topology:
        processes = self.num_nodes * self.num_processes
        stages = self.num_stages or processes
        return Topology(num_stages=stages, num_replicas=max(processes // stages, 1))

    @property
    def is_distributed(self) -> bool:
        # tells Lightning to shard the data over the replicas (distributed_sampler_kwargs) and to sync logged values
        return self.topology.num_replicas > 1

    @property
    def stage_index(self) -> int:
        return self.topology.stage_of(self.global_rank)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every stage reads the same batches in the same order: data is sharded over replicas, never stages
        return {"num_replicas": self.topology.num_replicas, "rank": self.topology.replica_of(self.global_rank)}

    @property
    @override
    def handles_gradient_accumulation(self) -> bool:
        # stages step on windows aligned to batch numbers, so each stage decides when to step
        return True

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        # here, when the Trainer is built, no process has been started yet: the error is shown once
        check_stage_count(self.num_nodes * self.num_processes, self.split_points, self.balance, self.num_stages)
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
        env = self.cluster_environment
        assert env is not None
        # the processes this one launched (strategy="ddg" on local rank 0): errors say which of them have exited
        job = {"describe": self.topology.describe, "children": launched_ranks(self.node_rank * self.num_processes + 1)}
        if needs_rendezvous(self.world_size):  # rendezvous.py: a timeout of its own, an error naming the absent
            timeouts = {"rendezvous_timeout": self._rendezvous_timeout, "timeout": self._timeout}
            init_process_group(
                backend, env.main_address, env.main_port, self.global_rank, self.world_size, **timeouts, **job
            )
        else:  # one process, a later fit, or torchrun's agent serving the store: Lightning's way
            init_dist_connection(env, backend, timeout=self._timeout)
        self._failed, self._watchdog = False, None
        if self.world_size > 1:  # every process watches the others: a failure anywhere ends the job (watchdog.py)
            pause_observer(True)  # the watchdog watches the launched ranks now
            watch_parent = self._start_method != "popen" or self.local_rank > 0
            self._watchdog = Watchdog.for_job(
                env.main_address, env.main_port, self.global_rank, self.world_size, watch_parent=watch_parent, **job
            )

    def set_world_ranks(self) -> None:
        # as DDPStrategy: ranks are numbered node by node (torchrun and SLURM set them themselves), so the
        # consecutive ranks of a pipeline share a node when a node's devices are a multiple of num_stages
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    # --- model -------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        self._check_supported(module)
        self.model = self.precision_plugin.convert_module(module)
        self.partition = self._split(trainer, module)
        check_stages_have_parameters(self.partition.train, self.partition.split_points)
        check_tied_clipping(self.partition.tied, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        self._shuffle_seed = self.broadcast(shuffle_seed())
        self._states = StageStates.of(module, self.topology, self.global_rank, self.world_size)
        self._keep_stage_after_fit = on_meta(module)  # built in configure_model: each rank keeps its stage
        self._finished = False
        built = build_stage(
            module,
            self.topology,
            self.global_rank,
            partition=self.partition,
            device=self.root_device,
            links=self._links,
            timeout=self._timeout,
            keep_only=True,
            memory=self.memory,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            check_finite=self._checks_finite(trainer),
            init_rng_states=self._init_rng_states,
        )
        self.stage, self._links, self._removed = built.stage, built.links, built.removed
        self._forward = PipelinedForward(self.stage, inspect.signature(module.forward))
        module.forward = self._forward  # instance attribute: shadows the class's forward
        if self.world_size > 1:
            self._stop.reset()
            replace_per_step_sigterm_broadcast(trainer, self._stop_if_requested)
            self._stop.requeue = replace_signal_handlers(trainer, self._on_stop_signal)
        scope_metrics(module, self._links.replica_group if self._links else None)
        quiet_epoch_sync_advice(everything=self.topology.num_replicas == 1)
        add_stage_callbacks(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            optimizers_to_device(self.optimizers, self.root_device)

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        """``configure_model`` builds the layers on the meta device, without their data; each stage process then
        gives real tensors to its own stage only (:func:`lightning_ddg.shard.materialize`), with the initial values
        a whole build from the same random state would give them."""
        with torch.device("meta"):
            yield
        # taken after the build: initialising meta tensors draws no random numbers, so these are the states the
        # layers' initialisation would have begun with, a torch.manual_seed in configure_model included
        self._init_rng_states = rng_states(self.root_device)

    def _check_supported(self, module: pl.LightningModule) -> None:
        scaled = isinstance(self.precision_plugin, MixedPrecision) and self.precision_plugin.scaler is not None
        try:
            check_automatic_optimization(module.automatic_optimization)
            check_no_loss_scaling(scaled)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        try:
            super().setup_optimizers(trainer)
        except RuntimeError as err:
            if "Training with multiple optimizers" not in str(err):
                raise
            # Lightning's advice, manual optimization, is refused too (_check_supported)
            raise MisconfigurationException(ONE_OPTIMIZER) from None

    def _split(self, trainer: pl.Trainer, module: pl.LightningModule) -> Partition:
        num_stages = self.topology.num_stages
        split_points = given_split_points(module, self.split_points, self.balance, num_stages)
        self.plan = None
        if num_stages > 1:
            # one rank measures and chooses (cutting.py), so that every stage cuts the model at the same places
            chosen = None
            if self.global_rank == 0:
                context = self.precision_plugin.forward_context
                chosen = make_plan(
                    trainer,
                    module,
                    num_stages,
                    split_points,
                    self.balance_by,
                    self.root_device,
                    context,
                    self.memory,
                    self.load_once,
                )
            self.plan = self.broadcast(chosen)
            split_points = self.plan.split_points
            log.info("plan: %d stages cut at %s (by %s)", num_stages, split_points, self.plan.balance_by)
            if self.global_rank == 0:
                show_plan(trainer, self.plan)
        example = self.plan.example_input if self.plan is not None else None  # what torch.export opens with
        opened = self.plan.opened_modules if self.plan is not None and self.plan.exported else None
        # the stages are traced in eval mode too only where something evaluates
        # eval graphs even for a fit without validation_step: a callback may call the model outside training_step
        return split_module(module, split_points, num_stages, example, opened)

    def _checks_finite(self, trainer: pl.Trainer) -> bool:
        return self.check_finite if self.check_finite is not None else detect_anomaly(trainer)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.training:
            check_train_loader(dataloader)
        if self.world_size > 1 and distributed_is_initialized():
            # a stage that reads fewer batches than the others would leave them waiting for the missing ones
            stage = trainer.state.stage.dataloader_prefix if trainer is not None and trainer.state.stage else None
            what = {"train": "training", "val": "validation"}.get(stage, stage or "a")
            lengths = self.states.all_gather_objects(loader_length(dataloader))
            check_same_lengths(lengths, f"{what} dataloader", self.topology.describe)
        topology = self.topology
        try:
            check_sampler_shards_replicas(dataloader, topology.num_replicas, topology.replica_of(self.global_rank))
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        if topology.num_stages > 1:
            seed_shuffling(dataloader, self._shuffle_seed)
        return self._load_once(dataloader)

    def _load_once(self, dataloader: object) -> object:
        """Only the first stage iterates the loader; it carries each batch to the later stages (``batches.py``)."""
        links = self._links
        if links is None or self.topology.num_stages == 1 or not self.load_once:
            return dataloader
        module = self.lightning_module
        if module is not None and module.trainer.state.fn == TrainerFn.PREDICTING:
            return dataloader  # prediction writers read the batch indices off the loader's own sampler
        last = self.stage_index == self.topology.num_stages - 1
        wrapped = carried_batches(dataloader, links, last=last, on_stop=self._stopping)
        self._batch_loaders.append(wrapped)
        return wrapped

    # --- the pipelined forward (forward.py) -------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None and self._forward is not None
        try:
            with self._forward.training_step(), self.precision_plugin.train_step_context():
                output = self.lightning_module.training_step(*args, **kwargs)
        except StageDone:
            output = None
        except PipelineStopped as stopped:
            raise self._stopping(stopped.signum) from None
        if output is None:
            # stages before the last have no loss; Lightning still expects a tensor to pass to backward
            return torch.zeros((), device=self.root_device)
        return output

    def _eval_step(self, name: str, context: Callable, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None
        try:
            with context():
                return getattr(self.lightning_module, name)(*args, **kwargs)
        except StageDone:
            return None

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("validation_step", self.precision_plugin.val_step_context, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test_step", self.precision_plugin.test_step_context, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("predict_step", self.precision_plugin.predict_step_context, *args, **kwargs)

    # --- stopping when asked (stopping.py) ---------------------------------------------------------------
    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        # the handler Lightning registers for SIGTERM (and SLURM's requeue signal): the first stage stops the
        # pipeline before its next batch; a run that is not fitting has no such batch and stops at once
        self._stop.on_signal(signum, self._watchdog)
        module = self.lightning_module
        if module is not None and module.trainer.state.fn != TrainerFn.FITTING:
            raise SIGTERMException(128 + signum)

    def _stop_if_requested(self) -> None:
        # where Lightning would broadcast rank 0's SIGTERM flag before every training batch
        assert self.stage is not None
        group = self._links.replica_group if self._links is not None else None
        src = self.topology.rank_of(0, replica=0)
        if signum := self._stop.before_batch(self.stage, self._watchdog, group, src, self.root_device):
            raise self._stopping(signum)

    def stopped_elsewhere(self, signum: int) -> None:
        """In a launching process that runs no stage: the stages stopped for ``signum`` and saved what callbacks
        save; this process's copy of the module never trained, so it saves nothing over theirs."""
        self._stop.stopped_by = signum

    def _stopping(self, signum: int) -> SIGTERMException:
        """The exception that ends this stage's fit; ``on_exception`` callbacks then run on every stage alike."""
        step = self.lightning_module.trainer.global_step if self.lightning_module is not None else "?"
        self._stop.stopped(signum, report=self.global_rank == 0, step=step)
        return SIGTERMException(128 + signum)

    # --- delayed backward and stepping -------------------------------------------------------------------
    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        assert self.stage is not None and self.lightning_module is not None
        if self.stage.is_last and self.stage.check_finite:
            check_finite(
                [closure_loss],
                f"the loss at step {self.lightning_module.trainer.global_step}",
                "Lower the learning rate, clip gradients (gradient_clip_val), or look for NaN in the batch.",
            )
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        if self.stage.backward(closure_loss if self.stage.is_last else None):
            self._update_due = True
        return self.precision_plugin.post_backward(closure_loss, self.lightning_module)

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # the closure runs training_step and the delayed backward; a step follows only when this stage's
        # accumulation window is complete (never during warm-up)
        result = closure()
        if self._update_due:
            self._update(optimizer, model)
        return result

    def _update(self, optimizer: Any, model: Any = None) -> None:
        assert self.stage is not None
        self._update_due = False
        self.stage.install_gradients()
        # through the precision plugin, so on_before_optimizer_step hooks and gradient clipping run as usual
        self.precision_plugin.optimizer_step(optimizer, model=model or self.lightning_module, closure=_no_closure)

    # --- end of a run ------------------------------------------------------------------------------------
    @override
    def on_train_end(self) -> None:
        assert self.stage is not None
        optimizer = self.optimizers[0] if self.optimizers else None
        for ready in self.stage.drain():
            if ready and optimizer is not None:
                self._update(optimizer)
        self._finish()

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
        """Close the channels and put the full module back together on every rank, unless the model was built in
        ``configure_model`` (it may not fit one process): then each rank keeps its stage, and
        :meth:`full_state_dict` collects the whole state on one rank on request."""
        module = self.lightning_module
        assert module is not None
        if self._links is not None:
            self._links.close()
        if not self._keep_stage_after_fit:
            put_back(self._removed, self.states.gather_tensors(module), self.root_device)
            self._removed = []
        self._finished = True
        module.__dict__.pop("forward", None)

    @property
    def states(self) -> StageStates:
        """Gathers the whole model's state from the stages (:mod:`lightning_ddg.state`)."""
        if self._states is None:
            self._states = StageStates(self.topology, self.global_rank, self.world_size)
        return self._states

    def full_state_dict(self, rank: int = 0) -> dict[str, Tensor] | None:
        """The whole model's state dict, with its original names, on global rank ``rank`` (``None`` on the others):
        each stage of the first replica sends its own tensors there, one at a time. A collective: every rank calls
        it, e.g. after fit of a model built in ``configure_model``, whose ranks each keep only their stage::

            state = trainer.strategy.full_state_dict()
            if trainer.is_global_zero:
                torch.save(state, "model.pt")

        Rank ``rank`` then holds the whole model; :meth:`save_full_state_dict` writes it without holding it.
        """
        assert self.lightning_module is not None
        return self.states.full_state_dict(self.lightning_module, dst=rank, whole=not self._removed)

    def save_full_state_dict(self, path: Any, rank: int = 0) -> None:
        """Write the whole model's state dict (as :meth:`full_state_dict` returns it) with ``torch.save`` to ``path``
        on global rank ``rank``, without any process holding more than its own stage and one piece of a tensor in
        flight. A collective: every rank calls it."""
        assert self.lightning_module is not None
        self.states.save_full_state_dict(self.lightning_module, path, dst=rank, whole=not self._removed)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Every rank calls it: the owners of the placeholders in ``checkpoint`` stream them to rank 0 as it writes
        the file (:meth:`StageStates.save_checkpoint`). Written under a temporary name and renamed: a job stopped
        while it saves leaves the last complete file."""
        if self._stop.stopped_by is not None and self.partition is None:
            return  # see stopped_elsewhere
        if self.is_global_zero:
            self.checkpoint_io = atomic(self.checkpoint_io)
        self.states.save_checkpoint(checkpoint, filepath, self.checkpoint_io, storage_options)

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # each process reads the checkpoint into its own stage, once it is cut (and materialised, for a model built
        # on the meta device): it reads only its stage's tensors, never the whole model
        return True

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint, its tensors mapped from the file (``mmap=True``) where it is an ordinary local file, so
        that a process reads from disk only the tensors of its own stage."""
        if not writes_local_torch_files(self.checkpoint_io, checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return load_mapped(checkpoint_path, weights_only=weights_only)

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Load this stage's parameters and buffers from the whole model's state dict."""
        assert self.lightning_module is not None
        if not self._removed:  # the whole module: its own load_state_dict, hooks and all
            return super().load_model_state_dict(checkpoint, strict=strict)
        load_stage_state(self.lightning_module, checkpoint["state_dict"], strict=strict)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full state dict with the original names (a collective: every rank calls it when saving). Only this
        stage's tensors are real; those of other stages are placeholders of their shape and dtype, which
        :meth:`save_checkpoint` fills from their owners as it writes the file."""
        if not self._removed:
            return super().lightning_module_state_dict()
        assert self.lightning_module is not None
        return self.states.module_state_dict(self.lightning_module)

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer state of the whole model, as one device would hold it (a collective: every rank calls
        it when saving), so that checkpoints resume on any number of stages; see :mod:`lightning_ddg.checkpoint`.
        As in :meth:`lightning_module_state_dict`, other stages' tensors are placeholders until saved."""
        assert self.lightning_module is not None
        optimizer = unwrapped_optimizer(optimizer)  # a LightningOptimizer wraps the real one
        return self.states.optimizer_state(
            optimizer, parameter_names(self.lightning_module), placeholders=bool(self._removed)
        )

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        module = self.lightning_module
        assert module is not None
        for optimizer, full in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            try:
                self.states.load_optimizer_state(optimizer, full, module)
            except ValueError as err:
                raise MisconfigurationException(f"cannot resume the optimizer from this checkpoint: {err}") from None
        optimizers_to_device(self.optimizers, self.root_device)

    @override
    def on_exception(self, exception: BaseException) -> None:
        if self._stop.stopped_by is not None and isinstance(exception, SIGTERMException):
            self._stop.after_stop()
            return
        # the other stages would wait forever for this one: the watchdog stops them
        log.error("rank %d failed: %s: %s", self.global_rank, type(exception).__name__, exception)
        self._failed = True
        if self._watchdog is not None:
            self._watchdog.report(exception)

    @override
    def teardown(self) -> None:
        log.info("teardown: rank %d (%s)", self.global_rank, "failed" if self._failed else "closing its channels")
        end_if_launcher_gone()  # a run that ended as its launcher went still says so, once
        if not self._failed:
            # a stopped pipeline leaves messages in flight: its channels are left to the process's exit
            if not self._finished and self.stage is not None and self._stop.stopped_by is None:
                self._finish()  # a fit without a training batch never reached on_train_end
            if self._links is not None and self._stop.stopped_by is None:
                self._links.destroy()
            if self._stop.stopped_by is not None and self.partition is not None:
                dist.barrier()  # every stage has run its on_exception callbacks before any exits
            if self._watchdog is not None:
                self._watchdog.stop()
                run_ended()
        self._links = self._watchdog = None
        for loader in self._batch_loaders:
            loader.release()
        self._batch_loaders = []
        if self.lightning_module is not None:
            self.lightning_module.__dict__.pop("forward", None)
            trainer = trainer_if_attached(self.lightning_module)
            if trainer is not None:
                restore_signal_handlers(trainer)
        self.stage = None
        super().teardown()

    # --- collectives -------------------------------------------------------------------------------------
    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if distributed_is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        # logged values exist only on the last stage: they are reduced over its replicas, never across stages
        group = group if group is not None else (self._links.replica_group if self._links else None)
        if not isinstance(tensor, Tensor) or group is None:
            return tensor
        return sync_ddp_if_available(tensor, group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        group = group if group is not None else (self._links.replica_group if self._links else None)
        if group is None:
            return tensor
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # stopping is decided for the whole job: every stage must leave the loop at the same step
        if not distributed_is_initialized():
            return decision
        flag = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return bool(flag.item() == self.world_size) if all else bool(flag.item() > 0)

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
