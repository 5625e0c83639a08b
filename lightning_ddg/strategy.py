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
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, TorchCheckpointIO
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizer_to_device, _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DistributedSampler, RandomSampler

from lightning_ddg._compat import (
    replace_per_step_sigterm_broadcast,
    replace_signal_handlers,
    restore_signal_handlers,
)
from lightning_ddg.balance import BALANCE_BY, BalanceBy
from lightning_ddg.batches import ReceivedBatches, SentBatches
from lightning_ddg.checkpoint import (
    group_names,
    merge_optimizer_states,
    named_optimizer_state,
    stage_optimizer_state,
)
from lightning_ddg.checkpoint_io import AtomicCheckpointIO, atomic, chunks, save_streamed
from lightning_ddg.checks import (
    check_finite,
    check_options,
    check_same_lengths,
    check_stage_count,
    check_stages_have_parameters,
    check_train_loader,
)
from lightning_ddg.comm import PipelineStopped
from lightning_ddg.gather import broadcast_parts, gather_parts, save_parts, transfer_device
from lightning_ddg.launchers import DDGScriptLauncher, DDGSpawnLauncher, launched_processes, pause_observer
from lightning_ddg.partition import Partition, balance_to_split_points, split_module
from lightning_ddg.planning import IMBALANCE_WARNING, Plan, plan
from lightning_ddg.rendezvous import rendezvous
from lightning_ddg.shard import Removed, keep_only_stage, kept_tensors, materialize, on_meta, put_back
from lightning_ddg.stage import MEMORY_MODES, DDGStage, MemoryMode
from lightning_ddg.stats import Snapshot, StageCounters, interval_figures
from lightning_ddg.topology import StageLinks, Topology
from lightning_ddg.watchdog import Watchdog

__all__ = ["DDGStrategy"]


class _StageDone(Exception):
    """Raised by the pipelined forward on stages that hold no loss, to end the user's step there."""


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
        check_options(split_points, balance, num_stages)
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory={memory!r} is not one of {MEMORY_MODES}")
        if balance_by is not None and balance_by not in BALANCE_BY:
            raise ValueError(f"balance_by={balance_by!r} is not one of {BALANCE_BY}")
        if num_stages is not None and num_stages < 1:
            raise ValueError(f"num_stages={num_stages}: a pipeline has at least one stage")
        if start_method not in ("popen", "spawn", "forkserver"):
            raise ValueError(
                f"start_method={start_method!r}: use 'popen' (strategy='ddg'), 'spawn' ('ddg_spawn') or 'forkserver'"
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
        self._state_dict_keys: list[str] = []
        self._parameter_order: list[str] = []
        self._forward_signature: inspect.Signature | None = None
        self._in_training_step = False
        self._forward_calls = 0
        self._update_due = False
        self._shuffle_seed = 0
        self._stop_signal: int | None = None  # a signal asking the job to stop, received by this process
        self._stopped_by: int | None = None  # the signal the pipeline stopped for
        self._requeue: Callable[[int, Any], None] | None = None  # Lightning's SLURM save-and-requeue
        self._batch_loaders: list[SentBatches | ReceivedBatches] = []  # this run's loaders, reading over links
        self._streamed: list[tuple[tuple[Any, ...], int]] = []  # placeholders of the checkpoint being saved, owners
        self._optimizers_saved = 0
        self._init_rng_states: dict[str, Tensor] | None = None  # when configure_model began building on meta
        self._keep_stage_after_fit = False  # a model built on the meta device stays cut after fit
        self._finished = True  # no stage is running

    # --- layout ------------------------------------------------------------------------------------------
    @property
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
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every stage reads the same batches in the same order: data is sharded over replicas, never stages
        return {"num_replicas": self.topology.num_replicas, "rank": self.topology.replica_of(self.global_rank)}

    @property
    def handles_gradient_accumulation(self) -> bool:
        # stages step on windows aligned to batch numbers, so each stage decides when to step
        return True

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        # here, when the Trainer is built, no process has been started yet: the error is shown once
        check_stage_count(self.num_nodes * self.num_processes, self.split_points, self.balance, self.num_stages)
        if self._start_method == "popen":
            self._launcher = DDGScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = DDGSpawnLauncher(self, start_method=self._start_method)

    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        self._process_group_backend = backend
        assert self.cluster_environment is not None
        self._init_process_group(backend)
        self._failed = False
        self._watchdog = self._start_watchdog()

    def _init_process_group(self, backend: str) -> None:
        """The process group, after a rendezvous with a timeout of its own (``rendezvous.py``)."""
        env = self.cluster_environment
        assert env is not None
        if _distributed_is_initialized() or self.world_size == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE"):
            # one process, a later fit, or torchrun's agent serving the store: Lightning's way
            _init_dist_connection(env, backend, timeout=self._timeout)
            return
        first_child = self.node_rank * self.num_processes + 1
        children = {first_child + i: proc for i, proc in enumerate(launched_processes())}
        store = rendezvous(
            env.main_address,
            env.main_port,
            self.global_rank,
            self.world_size,
            timeout=self._rendezvous_timeout.total_seconds(),
            describe=self._describe,
            store_timeout=self._timeout,
            exit_codes=lambda: {rank: proc.poll() for rank, proc in children.items()},
        )
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.main_address, str(env.main_port)
        dist.init_process_group(
            backend, store=store, rank=self.global_rank, world_size=self.world_size, timeout=self._timeout
        )

    def _describe(self, rank: int) -> str:
        return f"stage {self.topology.stage_of(rank)} (rank {rank})"

    def _start_watchdog(self) -> Watchdog | None:
        """Every process watches the others, so that a failure anywhere ends the whole job (``watchdog.py``)."""
        if self.world_size == 1:
            return None
        env = self.cluster_environment
        assert env is not None
        store = dist.TCPStore(env.main_address, env.main_port, is_master=False, timeout=timedelta(seconds=30))
        first_child = self.node_rank * self.num_processes + 1
        pause_observer(True)  # the watchdog watches the launched ranks now
        return Watchdog(
            store,
            self.global_rank,
            self.world_size,
            describe=self._describe,
            children={first_child + i: proc for i, proc in enumerate(launched_processes())},
            watch_parent=self._start_method != "popen" or self.local_rank > 0,
        ).start()

    def set_world_ranks(self) -> None:
        # as DDPStrategy: ranks are numbered node by node (torchrun and SLURM set them themselves), so the
        # consecutive ranks of a pipeline share a node when a node's devices are a multiple of num_stages
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    # --- model -------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        self._check_supported(module)
        self.model = self.precision_plugin.convert_module(module)
        self.partition = self._split(trainer, module)
        check_stages_have_parameters(self.partition.train, self.partition.split_points)
        k, num_stages = self.stage_index, self.partition.num_stages
        self._forward_signature = inspect.signature(module.forward)
        self._shuffle_seed = self.broadcast(_shuffle_seed())
        self._state_dict_keys = list(module.state_dict())
        self._parameter_order = [name for name, _ in module.named_parameters()]
        self._keep_stage_after_fit = on_meta(module)
        self._finished = False
        if self._keep_stage_after_fit:  # built in configure_model: this process gives its own stage real tensors
            holders = (self.partition.train[k], self.partition.eval[k])
            kept = kept_tensors(module, self.partition, k)
            materialize(module, kept, self.root_device, self._init_rng_states, holders)
        self._removed = keep_only_stage(module, self.partition, k)
        self.model_to_device()
        if self._links is None and self.world_size > 1:
            self._links = StageLinks.create(self.topology, self.global_rank, self.root_device, self._timeout)
        self.stage = DDGStage(
            self.partition.train[k],
            k,
            num_stages,
            self._links,
            memory=self.memory,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            eval_module=self.partition.eval[k],
            check_finite=self._checks_finite(trainer),
        )
        module.forward = self._pipelined_forward  # instance attribute: shadows the class's forward
        if self.world_size > 1:
            self._stop_signal = self._stopped_by = None
            replace_per_step_sigterm_broadcast(trainer, self._stop_if_requested)
            self._requeue = replace_signal_handlers(trainer, self._on_stop_signal)
        _scope_metrics(module, self._links.replica_group if self._links else None)
        _quiet_epoch_sync_advice(everything=self.topology.num_replicas == 1)
        for callback in (_LogStageFigures, _ShareLastStageMetrics):
            if not any(isinstance(c, callback) for c in trainer.callbacks):
                trainer.callbacks.insert(0, callback())  # first, ahead of the monitoring callbacks
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        """``configure_model`` builds the layers on the meta device, without their data; each stage process then
        gives real tensors to its own stage only (:func:`lightning_ddg.shard.materialize`), with the initial values
        a whole build from the same random state would give them."""
        with torch.device("meta"):
            yield
        # taken after the build: initialising meta tensors draws no random numbers, so these are the states the
        # layers' initialisation would have begun with, a torch.manual_seed in configure_model included
        states = {"cpu": torch.get_rng_state()}
        if self.root_device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.root_device)
        self._init_rng_states = states

    def _check_supported(self, module: pl.LightningModule) -> None:
        if not module.automatic_optimization:
            raise MisconfigurationException(
                "DDGStrategy drives the optimizer of each stage itself and does not support manual optimization. "
                "Set `self.automatic_optimization = True` (the default) or use strategy='ddp'."
            )
        if isinstance(self.precision_plugin, MixedPrecision) and self.precision_plugin.scaler is not None:
            raise MisconfigurationException(
                "DDGStrategy does not support precision='16-mixed': its loss scale is a single number that every "
                "stage's gradients would have to be unscaled with and that must shrink whenever any stage "
                "overflows, but the stages step at different times on gradients of different batches. Use "
                "precision='bf16-mixed' (no loss scaling needed) or '32-true'."
            )

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        try:
            super().setup_optimizers(trainer)
        except RuntimeError as err:
            if "Training with multiple optimizers" not in str(err):
                raise
            # Lightning's advice, manual optimization, is refused too (_check_supported)
            raise MisconfigurationException(
                "DDGStrategy steps one optimizer per stage, but configure_optimizers returned several. Return one "
                "optimizer; to give parts of the model their own settings, give it param groups, e.g. "
                "torch.optim.AdamW([{'params': a, 'lr': 1e-3}, {'params': b, 'lr': 1e-4}]). Or train with "
                "strategy='ddp' and manual optimization."
            ) from None

    def _split(self, trainer: pl.Trainer, module: pl.LightningModule) -> Partition:
        num_stages = self.topology.num_stages
        split_points = self.split_points
        if self.balance is not None:
            if len(self.balance) != num_stages:
                raise ValueError(
                    f"balance {self.balance} has {len(self.balance)} stages but the pipeline has {num_stages}: give "
                    f"devices={len(self.balance)} (or num_stages={len(self.balance)}) or a balance of {num_stages} "
                    "entries."
                )
            split_points = balance_to_split_points(module, self.balance)
        self.plan = None
        if num_stages > 1:
            # one rank measures and chooses, so that every stage cuts the model at the same places
            self.plan = self.broadcast(
                self._make_plan(trainer, module, split_points) if self.global_rank == 0 else None
            )
            split_points = self.plan.split_points
            self._show_plan(trainer, self.plan)
        return split_module(module, split_points=split_points, num_stages=num_stages)

    def _make_plan(self, trainer: pl.Trainer, module: pl.LightningModule, split_points: list[str] | None) -> Plan:
        example = _example_forward_input(trainer, module)
        with self.precision_plugin.forward_context():
            return plan(
                module,
                example,
                None if split_points is not None else self.topology.num_stages,
                split_points=split_points,
                balance_by=self.balance_by or ("flops" if torch.are_deterministic_algorithms_enabled() else "time"),
                device=torch.device("meta") if on_meta(module) else self.root_device,
            )

    def _show_plan(self, trainer: pl.Trainer, plan: Plan) -> None:
        if self.global_rank != 0:
            return
        if any(isinstance(c, ModelSummary) for c in trainer.callbacks):
            last = plan.num_stages - 1
            rank_zero_info(f"DDG plan: {plan.num_stages} stages, stage k on rank {last} - k of each pipeline\n{plan}")
        for logger in trainer.loggers:
            logger.log_hyperparams(plan.to_dict())
        if plan.imbalance > IMBALANCE_WARNING:
            slowest = max(plan.stages, key=lambda s: s.cost)
            rank_zero_warn(
                f"stage {slowest.index} of the DDG pipeline costs {plan.imbalance:.2f}x the mean stage "
                f"({plan.balance_by}); the pipeline runs at the speed of its slowest stage. Move its split points "
                "(split_points=[...]) or leave the cuts to the strategy (balance_by='time').",
                category=PossibleUserWarning,
            )

    def _checks_finite(self, trainer: pl.Trainer) -> bool:
        return self.check_finite if self.check_finite is not None else bool(trainer._detect_anomaly)

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.training:
            check_train_loader(dataloader)
        if self.world_size > 1 and _distributed_is_initialized():
            # a stage that reads fewer batches than the others would leave them waiting for the missing ones
            stage = trainer.state.stage.dataloader_prefix if trainer is not None and trainer.state.stage else None
            what = {"train": "training", "val": "validation"}.get(stage, stage or "a")
            check_same_lengths(self._all_gather_objects(_length(dataloader)), f"{what} dataloader", self._describe)
        # A RandomSampler without a generator draws its order from the process's global RNG, which the stages
        # consume differently (dropout on some stages only): give it a generator seeded alike on every stage.
        sampler = getattr(dataloader, "sampler", None)
        topology = self.topology
        replica = {"num_replicas": topology.num_replicas, "rank": topology.replica_of(self.global_rank)}
        if isinstance(sampler, DistributedSampler) and {k: getattr(sampler, k) for k in replica} != replica:
            raise MisconfigurationException(
                f"a data loader's DistributedSampler shards the data over {sampler.num_replicas} ranks, this one "
                f"reading shard {sampler.rank}, but the stages of one pipeline must read the same batches: shard over "
                f"the {topology.num_replicas} pipeline replica(s) with "
                f"DistributedSampler(..., **trainer.strategy.distributed_sampler_kwargs) = {replica}, or leave the "
                "sampler to Lightning."
            )
        if topology.num_stages > 1 and isinstance(sampler, RandomSampler) and sampler.generator is None:
            sampler.generator = torch.Generator().manual_seed(self._shuffle_seed)
        return self._load_once(dataloader)

    def _load_once(self, dataloader: object) -> object:
        """Only the first stage iterates the loader; it carries each batch to the later stages (``batches.py``)."""
        links = self._links
        if links is None or self.topology.num_stages == 1 or not self.load_once:
            return dataloader
        module = self.lightning_module
        if module is not None and module.trainer.state.fn == TrainerFn.PREDICTING:
            return dataloader  # prediction writers read the batch indices off the loader's own sampler
        if links.batch_out:
            wrapped: SentBatches | ReceivedBatches = SentBatches(dataloader, links.batch_out)
        else:
            assert links.batch_in is not None
            last = self.stage_index == self.topology.num_stages - 1
            wrapped = ReceivedBatches(dataloader, links.batch_in, full=last, on_stop=self._stopping)
        self._batch_loaders.append(wrapped)
        return wrapped

    # --- the pipelined forward ---------------------------------------------------------------------------
    def _pipelined_forward(self, *args: Any, **kwargs: Any) -> Any:
        assert self.stage is not None and self._forward_signature is not None
        bound = self._forward_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if self._in_training_step:
            self._forward_calls += 1
            if self._forward_calls > 1:
                raise RuntimeError(
                    "training_step called the model's forward twice. With DDGStrategy each training step sends "
                    "one batch through the pipeline: call `self(...)` once per training_step."
                )
            output = self.stage.forward(*bound.args)
        else:
            output = self.stage.evaluate(*bound.args)
        if not self.stage.is_last:
            raise _StageDone
        return output

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None
        self._in_training_step, self._forward_calls = True, 0
        try:
            with self.precision_plugin.train_step_context():
                output = self.lightning_module.training_step(*args, **kwargs)
        except _StageDone:
            output = None
        except PipelineStopped as stopped:
            raise self._stopping(stopped.signum) from None
        finally:
            self._in_training_step = False
        if self._forward_calls == 0:
            raise RuntimeError(
                "training_step never called the model's forward. DDGStrategy pipelines `self(...)`/`self.forward(...)`"
                ": compute the model output with it inside training_step."
            )
        if output is None:
            # stages before the last have no loss; Lightning still expects a tensor to pass to backward
            return torch.zeros((), device=self.root_device)
        return output

    def _eval_step(self, name: str, context: Callable, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None
        try:
            with context():
                return getattr(self.lightning_module, name)(*args, **kwargs)
        except _StageDone:
            return None

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("validation_step", self.precision_plugin.val_step_context, *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("test_step", self.precision_plugin.test_step_context, *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step("predict_step", self.precision_plugin.predict_step_context, *args, **kwargs)

    # --- stopping when asked ------------------------------------------------------------------------------
    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        """The handler Lightning registers for SIGTERM (and, under SLURM with auto-requeue, its requeue signal).

        It only takes note: the watchdog carries the request to every process, and the first stage ends the
        pipeline before its next training batch (:meth:`_stop_if_requested`), so that all stages stop after the
        same step with nothing but the pipeline's own messages. A run that is not fitting has no such step and
        stops at once, and so does a process that gets a second signal (a stop that does not come through).
        """
        if self._stop_signal is not None:
            print(f"lightning-ddg: {signal.Signals(signum).name} again; exiting now.", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self._stop_signal = signum
        if self._watchdog is not None:
            self._watchdog.request_stop(signum)
        module = self.lightning_module
        if module is not None and module.trainer.state.fn != TrainerFn.FITTING:
            raise SIGTERMException(128 + signum)

    def _stop_if_requested(self) -> None:
        """Before every training batch, where Lightning would broadcast rank 0's SIGTERM flag to every rank: the
        first stage, whose forward every other stage waits for, checks whether the job was asked to stop. If so
        it ends the pipeline here; each later stage raises when the end reaches it, after the same step."""
        assert self.stage is not None
        if not self.stage.is_first:
            return
        signum = self._stop_signal or (self._watchdog.stop_requested if self._watchdog is not None else None) or 0
        group = self._links.replica_group if self._links is not None else None
        if group is not None:
            # the first stages of the replicas stop at the same step: replica 0's decides, in a broadcast within
            # the group that averages their gradients every step anyway
            flag = torch.tensor([signum], device=self.root_device)
            dist.broadcast(flag, src=self.topology.rank_of(0, replica=0), group=group)
            signum = int(flag.item())
        if signum:
            self.stage.stop(signum)
            raise self._stopping(signum)

    def stopped_elsewhere(self, signum: int) -> None:
        """In a launching process that runs no stage: the stages stopped for ``signum`` and saved what callbacks
        save; this process's copy of the module never trained, so it saves nothing over theirs."""
        self._stopped_by = signum

    def _stopping(self, signum: int) -> SIGTERMException:
        """The exception that ends this stage's fit; ``on_exception`` callbacks then run on every stage alike."""
        self._stopped_by = signum
        if self.global_rank == 0:
            name = signal.Signals(signum).name
            step = self.lightning_module.trainer.global_step if self.lightning_module is not None else "?"
            then = "saving the requeue checkpoint" if signum != signal.SIGTERM else "exiting"
            print(f"lightning-ddg: stopped by {name} after step {step} on every stage; {then}.", file=sys.stderr)
        return SIGTERMException(128 + signum)

    # --- delayed backward and stepping -------------------------------------------------------------------
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
    def on_train_end(self) -> None:
        assert self.stage is not None
        optimizer = self.optimizers[0] if self.optimizers else None
        for ready in self.stage.drain():
            if ready and optimizer is not None:
                self._update(optimizer)
        self._finish()

    def on_validation_end(self) -> None:
        if self.lightning_module is not None and self.lightning_module.trainer.state.fn == TrainerFn.VALIDATING:
            self._finish()

    def on_test_end(self) -> None:
        self._finish()

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
            put_back(self._removed, self._gather_tensors(), self.root_device)
            self._removed = []
        self._finished = True
        module.__dict__.pop("forward", None)

    def full_state_dict(self, rank: int = 0) -> dict[str, Tensor] | None:
        """The whole model's state dict, with its original names, on global rank ``rank`` (``None`` on the others):
        each stage of the first replica sends its own tensors there, one at a time. A collective: every rank calls
        it, e.g. after fit of a model built in ``configure_model``, whose ranks each keep only their stage::

            state = trainer.strategy.full_state_dict()
            if trainer.is_global_zero:
                torch.save(state, "model.pt")

        Rank ``rank`` then holds the whole model; :meth:`save_full_state_dict` writes it without holding it.
        """
        local, specs = self._state_parts()
        if specs is None:
            return {n: t.cpu() for n, t in local.items()} if self.global_rank == rank else None
        full = gather_parts(local, specs, self._stage_owners(), rank, transfer_device(self.root_device))
        return None if full is None else {name: full[name] for name in self._state_dict_keys if name in full}

    def save_full_state_dict(self, path: Any, rank: int = 0) -> None:
        """Write the whole model's state dict (as :meth:`full_state_dict` returns it) with ``torch.save`` to ``path``
        on global rank ``rank``, without any process holding more than its own stage and one tensor in flight. A
        collective: every rank calls it."""
        local, specs = self._state_parts()
        if specs is None:
            specs, owners = [{n: _TensorSpec.of(t) for n, t in local.items()}], [rank]
        else:
            owners = self._stage_owners()
        save_parts(local, specs, owners, rank, path, transfer_device(self.root_device), self._state_dict_keys)

    def _state_parts(self) -> tuple[dict[str, Tensor], list[dict[str, _TensorSpec]] | None]:
        """This rank's state dict, and the shapes and dtypes of each stage's (``None`` when this rank holds the
        whole module)."""
        module = self.lightning_module
        assert module is not None
        local = {n: t.detach() for n, t in module.state_dict(keep_vars=True).items()}
        if not self._removed or self.world_size == 1 or not _distributed_is_initialized():
            return local, None
        return local, self._first_replica_objects({n: _TensorSpec.of(t) for n, t in local.items()})

    def _gather_tensors(self) -> dict[str, Tensor]:
        """The parameters and buffers this rank does not hold, broadcast one at a time by the stages of replica 0
        that own them."""
        module = self.lightning_module
        assert module is not None
        local = {n: t.detach() for n, t in [*module.named_parameters(), *module.named_buffers()]}
        if self.topology.num_stages == 1:
            return local
        specs = self._first_replica_objects({n: _TensorSpec.of(t) for n, t in local.items()})
        wanted = {r.name for r in self._removed}
        return broadcast_parts(local, specs, self._stage_owners(), transfer_device(self.root_device), wanted)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Every rank calls it. The tensors of other stages in ``checkpoint`` are placeholders
        (:meth:`lightning_module_state_dict`, :meth:`optimizer_state`): their owners send them to rank 0 one at a
        time, and rank 0 streams them into the one ordinary checkpoint file (:func:`save_streamed`), so that no
        process ever holds the whole model. Written under a temporary name and renamed: a job stopped while it saves
        leaves the last complete file."""
        if self._stopped_by is not None and self.partition is None:
            return  # see stopped_elsewhere
        streamed, self._streamed = self._streamed, []
        if not self.is_global_zero:
            for key_path, owner in streamed:
                if owner == self.global_rank:
                    for piece in chunks(_as_bytes(_at(checkpoint, key_path).detach().cpu())):
                        dist.send(piece, dst=0)
            return
        self.checkpoint_io = atomic(self.checkpoint_io)

        def receive(i: int, buffer: Tensor) -> None:
            dist.recv(buffer, src=streamed[i][1])

        base = self.checkpoint_io.checkpoint_io if isinstance(self.checkpoint_io, AtomicCheckpointIO) else None
        if streamed and type(base) is TorchCheckpointIO and "://" not in str(filepath):
            save_streamed(checkpoint, filepath, [key_path for key_path, _ in streamed], receive)
            return
        for i, (key_path, _) in enumerate(streamed):  # another checkpoint IO: it gets the whole checkpoint
            target = _at(checkpoint, key_path)
            buffer = torch.empty(target.numel() * target.element_size(), dtype=torch.uint8)
            for piece in chunks(buffer):
                receive(i, piece)
            _as_bytes(target).copy_(buffer)
        self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # each process reads the checkpoint into its own stage, once it is cut (and materialised, for a model built
        # on the meta device): it reads only its stage's tensors, never the whole model
        return True

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint, its tensors mapped from the file (``mmap=True``) where it is an ordinary local file, so
        that a process reads from disk only the tensors of its own stage."""
        io = self.checkpoint_io
        base = io.checkpoint_io if isinstance(io, AtomicCheckpointIO) else io
        if type(base) is not TorchCheckpointIO or "://" in str(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"Checkpoint file not found: {checkpoint_path}")
        return torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        """Load this stage's parameters and buffers from the whole model's state dict."""
        module = self.lightning_module
        assert module is not None
        if not self._removed:  # the whole module: its own load_state_dict, hooks and all
            return super().load_model_state_dict(checkpoint, strict=strict)
        state = checkpoint["state_dict"]
        own = module.state_dict(keep_vars=True)
        missing = [name for name in own if name not in state]
        if strict and missing:
            raise RuntimeError(f"the checkpoint's state_dict lacks {missing}: it was saved from another model")
        # copied tensor by tensor: the module's own load_state_dict would visit the emptied modules of other stages
        with torch.no_grad():
            for name, tensor in own.items():
                if name not in state:
                    continue
                if state[name].shape != tensor.shape:
                    raise RuntimeError(
                        f"{name} has shape {tuple(state[name].shape)} in the checkpoint, {tuple(tensor.shape)} in the "
                        "model: it was saved from another model"
                    )
                tensor.copy_(state[name])

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full state dict with the original names (a collective: every rank calls it when saving). Only this
        stage's tensors are real; those of other stages are placeholders of their shape and dtype, which
        :meth:`save_checkpoint` fills from their owners as it writes the file."""
        if not self._removed:
            return super().lightning_module_state_dict()
        module = self.lightning_module
        assert module is not None
        local = {n: t.detach().cpu() for n, t in module.state_dict(keep_vars=True).items()}
        specs = self._first_replica_objects({n: _TensorSpec.of(t) for n, t in local.items()})
        owners = self._stage_owners()
        self._streamed, self._optimizers_saved = [], 0
        state = {}
        for j, part in enumerate(specs):
            for name, spec in part.items():
                state[name] = local[name] if owners[j] == self.global_rank else self._placeholder(spec)
                if owners[j] != 0:
                    self._streamed.append((("state_dict", name), owners[j]))
        return {name: state[name] for name in self._state_dict_keys if name in state}

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer state of the whole model, as one device would hold it (a collective: every rank calls
        it when saving), so that checkpoints resume on any number of stages; see :mod:`lightning_ddg.checkpoint`.
        As in :meth:`lightning_module_state_dict`, other stages' tensors are placeholders until saved."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one
        part = named_optimizer_state(optimizer, self._parameter_names())
        if not self._removed:
            return merge_optimizer_states(self._first_replica_objects(part), self._parameter_order)
        described = {**part, "state": {n: _described(s) for n, s in part["state"].items()}}
        parts = self._first_replica_objects(described)
        owners = self._stage_owners()
        owner_of: dict[int, int] = {}
        for j, other in enumerate(parts):
            if owners[j] == self.global_rank:
                parts[j] = part
            else:
                other["state"] = {n: self._placeholders(s) for n, s in other["state"].items()}
            owner_of |= {id(s): owners[j] for s in parts[j]["state"].values()}
        merged = merge_optimizer_states(parts, self._parameter_order)
        saved = self._optimizers_saved
        self._optimizers_saved += 1
        for index, entry in merged["state"].items():
            if owner_of[id(entry)] != 0:
                for key, value in entry.items():
                    if isinstance(value, Tensor):
                        self._streamed.append((("optimizer_states", saved, "state", index, key), owner_of[id(entry)]))
        return merged

    def _stage_owners(self) -> list[int]:
        """The global rank each part of :meth:`_first_replica_objects` comes from."""
        topology = self.topology
        if topology.num_replicas == 1:
            return list(range(self.world_size))
        return [topology.rank_of(stage, replica=0) for stage in range(topology.num_stages)]

    def _placeholder(self, spec: _TensorSpec) -> Tensor:
        # on rank 0, which writes the file, memory that is never written: the system backs it with none of its own
        return torch.empty(spec.shape, dtype=spec.dtype, device="cpu" if self.global_rank == 0 else "meta")

    def _placeholders(self, state: dict[str, Any]) -> dict[str, Any]:
        return {k: self._placeholder(v) if isinstance(v, _TensorSpec) else v for k, v in state.items()}

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        module = self.lightning_module
        assert module is not None
        names, shapes = self._parameter_names(), {name: p.shape for name, p in module.named_parameters()}
        for optimizer, full in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            groups = group_names(optimizer, names)
            try:
                state = stage_optimizer_state(
                    full, groups, self._all_gather_objects(groups), self._parameter_order, shapes
                )
            except ValueError as err:
                raise MisconfigurationException(f"cannot resume the optimizer from this checkpoint: {err}") from None
            optimizer.load_state_dict(state)
            _optimizer_to_device(optimizer, self.root_device)

    def _parameter_names(self) -> dict[int, str]:
        assert self.lightning_module is not None
        return {id(p): name for name, p in self.lightning_module.named_parameters()}

    def _first_replica_objects(self, obj: Any) -> list[Any]:
        """``obj`` of each stage of replica 0, on every rank (a collective). With replicas, one broadcast per stage:
        each rank receives the model once, not once per replica."""
        topology = self.topology
        if topology.num_replicas == 1:
            return self._all_gather_objects(obj)
        parts = []
        for stage in range(topology.num_stages):
            box = [obj]
            dist.broadcast_object_list(box, src=topology.rank_of(stage, replica=0))
            parts.append(box[0])
        return parts

    def _all_gather_objects(self, obj: Any) -> list[Any]:
        if self.world_size == 1 or not _distributed_is_initialized():
            return [obj]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def on_exception(self, exception: BaseException) -> None:
        if self._stopped_by is not None and isinstance(exception, SIGTERMException):
            # every stage stopped after the same step: they save the requeue checkpoint together
            if self._stopped_by != signal.SIGTERM and self._requeue is not None:
                self._requeue(self._stopped_by, None)
            return
        # the other stages would wait forever for this one: the watchdog stops them
        self._failed = True
        if self._watchdog is not None:
            self._watchdog.report(exception)

    def teardown(self) -> None:
        if not self._failed:
            # a stopped pipeline leaves messages in flight: its channels are left to the process's exit
            if not self._finished and self.stage is not None and self._stopped_by is None:
                self._finish()  # a fit without a training batch never reached on_train_end
            if self._links is not None and self._stopped_by is None:
                self._links.destroy()
            if self._stopped_by is not None and self.partition is not None:
                dist.barrier()  # every stage has run its on_exception callbacks before any exits
            if self._watchdog is not None:
                self._watchdog.stop()
                pause_observer(False)
        self._links = self._watchdog = None
        for loader in self._batch_loaders:
            loader.release()
        self._batch_loaders = []
        if self.lightning_module is not None:
            self.lightning_module.__dict__.pop("forward", None)
            if self.lightning_module._trainer is not None:
                restore_signal_handlers(self.lightning_module.trainer)
        self.stage = None
        super().teardown()

    # --- collectives -------------------------------------------------------------------------------------
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if _distributed_is_initialized():
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        # logged values exist only on the last stage: they are reduced over its replicas, never across stages
        group = group if group is not None else (self._links.replica_group if self._links else None)
        if not isinstance(tensor, Tensor) or group is None:
            return tensor
        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)

    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        group = group if group is not None else (self._links.replica_group if self._links else None)
        if group is None:
            return tensor
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        # stopping is decided for the whole job: every stage must leave the loop at the same step
        if not _distributed_is_initialized():
            return decision
        flag = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return bool(flag.item() == self.world_size) if all else bool(flag.item() > 0)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("ddg", "popen"), ("ddg_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"DDG pipeline, one stage per device, processes started with {start_method}",
                    start_method=start_method,
                )


class _ShareLastStageMetrics(Callback):
    """Copies the metrics logged on the last stage (global rank 0) to every rank, so that callbacks monitoring
    them — ``EarlyStopping``, ``ModelCheckpoint(monitor=...)`` — decide the same way on every stage."""

    def _share(self, trainer: pl.Trainer) -> None:
        if trainer.world_size == 1:
            return
        metrics = trainer.callback_metrics
        local = {k: v.detach().cpu() for k, v in metrics.items() if isinstance(v, Tensor)}
        shared = trainer.strategy.broadcast(local, src=0)
        if trainer.global_rank != 0:
            metrics.update({k: v.to(trainer.strategy.root_device) for k, v in shared.items()})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._share(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._share(trainer)


class _LogStageFigures(Callback):
    """Logs every stage's figures as ``ddg/stage{k}/...`` whenever Lightning logs (every ``log_every_n_steps``)
    and at the end of each training epoch: samples/s; compute, waiting, sending and other time per step (ms);
    stashed weights and activations (MiB); the delay. They are averages since the previous logging.

    The figures reach the last stage in the headers of the activations it receives, so logging them costs no
    message and no synchronisation. Evaluation time is left out.
    """

    def __init__(self) -> None:
        self._evaluation_start: float | None = None
        self._logged: list[Snapshot] = []

    @staticmethod
    def _stage(trainer: pl.Trainer) -> DDGStage | None:
        strategy = trainer.strategy
        return strategy.stage if isinstance(strategy, DDGStrategy) else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (stage := self._stage(trainer)) is not None:
            stage.counters = StageCounters()  # training time starts now, not at setup
        self._logged = []

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage(trainer)
        if self._evaluation_start is not None and stage is not None:
            stage.counters.pause(time.perf_counter() - self._evaluation_start)
        self._evaluation_start = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer._logger_connector.should_update_logs:
            self._log(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, on_step=False)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        stage = self._stage(trainer)
        if stage is None or not stage.is_last or not trainer.is_global_zero:
            return
        snapshots = stage.snapshots()
        figures = {}
        for k, snapshot in enumerate(snapshots):
            before = self._logged[k] if k < len(self._logged) else None
            interval = interval_figures(before, snapshot, delay=stage.num_stages - 1 - k)
            figures |= {f"ddg/stage{k}/{name}": value for name, value in (interval or {}).items()}
        self._logged = snapshots
        if figures:
            pl_module.log_dict(figures, on_step=on_step, on_epoch=not on_step, rank_zero_only=True)


def _scope_metrics(module: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Make torchmetrics metrics synchronise over the stage's replicas only: the other stages never update them,
    so a sync over all ranks would wait for them forever."""
    from torchmetrics import Metric

    for metric in module.modules():
        if isinstance(metric, Metric):
            if group is None:
                metric.sync_on_compute = metric.dist_sync_on_step = metric._to_sync = False
            else:
                metric.process_group = group


def _quiet_epoch_sync_advice(everything: bool) -> None:
    """Lightning advises ``sync_dist=True`` for every epoch-level metric once a process group exists. The
    strategy's own figures never need it, and with one pipeline (no replicas) nothing does: metrics are logged
    on the last stage only."""
    names = ".*" if everything else "ddg/"
    warnings.filterwarnings(
        "ignore", message=rf"It is recommended to use `self.log\('{names}", category=PossibleUserWarning
    )


_LOOP_OF = {
    TrainerFn.FITTING: "fit_loop",
    TrainerFn.VALIDATING: "validate_loop",
    TrainerFn.TESTING: "test_loop",
    TrainerFn.PREDICTING: "predict_loop",
}


def _example_forward_input(trainer: pl.Trainer, module: pl.LightningModule) -> tuple | None:
    """What ``forward`` takes, for measuring the stages: ``example_input_array``, or else the part of this run's
    first batch that fits ``forward``'s parameters (``x`` of ``(x, y)``, the named items of a dict). ``None``
    when neither can be had; no user step code runs for it."""
    signature = inspect.signature(module.forward)
    example = module.example_input_array
    if example is not None:
        if isinstance(example, dict):
            return tuple(signature.bind(**example).args)
        return example if isinstance(example, tuple) else (example,)
    source = getattr(trainer, _LOOP_OF.get(trainer.state.fn, "fit_loop"))._data_source
    try:
        with torch.random.fork_rng(devices=[]):  # a shuffling sampler draws its order from the global stream
            if not source.is_defined():
                return None
            loaders = source.dataloader()
            loader = next(iter(loaders.values())) if isinstance(loaders, dict) else loaders
            loader = loader[0] if isinstance(loader, (list, tuple)) else loader
            batch = next(iter(loader))
    except Exception:  # noqa: BLE001 - no example from the data: the plan falls back to parameter counts
        return None
    return _forward_arguments(batch, signature)


def _forward_arguments(batch: Any, signature: inspect.Signature) -> tuple | None:
    positional = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is p.empty)
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, dict):
        args = []
        for p in positional:
            if p.name not in batch:
                break
            args.append(batch[p.name])
        return tuple(args) if len(args) >= required and args else None
    if isinstance(batch, (tuple, list)) and batch and len(batch) >= required:
        return tuple(batch[: max(required, 1)])  # (x, y): the inputs come first, the targets last
    return None


def _length(dataloader: object) -> int | None:
    try:
        return len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return None  # an iterable without a length


def _shuffle_seed() -> int:
    """The seed of ``seed_everything`` if one was set, else a fresh one (rank 0's is broadcast)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else int.from_bytes(os.urandom(7), "little")


def _no_closure() -> None:
    return None


@dataclass(frozen=True)
class _TensorSpec:
    """The shape and dtype of a tensor another process holds."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(tensor: Tensor) -> _TensorSpec:
        return _TensorSpec(tuple(tensor.shape), tensor.dtype)


def _described(state: dict[str, Any]) -> dict[str, Any]:
    return {k: _TensorSpec.of(v) if isinstance(v, Tensor) else v for k, v in state.items()}


def _at(obj: Any, key_path: tuple[Any, ...]) -> Any:
    for key in key_path:
        obj = obj[key]
    return obj


def _as_bytes(tensor: Tensor) -> Tensor:
    """The tensor's data as a flat ``uint8`` tensor (a view where it is contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)
