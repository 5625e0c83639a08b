"""One rank's stage while a fit (or a validation, test or prediction) runs: what the strategy's hooks hand work to.

:class:`StageRun` holds what :func:`~lightning_ddg.build.build_stage` made for this process — the stage, its links,
the other stages' tensors taken out of the module — and the module's pipelined ``forward``, and runs them: a
training step through the stage, the delayed backward and the optimizer step when a window is complete, the drain
at the end, the whole module put back together, and the close. The Lightning strategy is a thin adapter over it,
as Lightning's ``DDPStrategy`` is over ``DistributedDataParallel``. This module is plain PyTorch.

Example, in each of 2 processes (or in one, over :func:`~lightning_ddg.local.local_links`)::

    run = StageRun.start(model, Topology(num_stages=2), rank, partition=split_module(model, ["model.4"]))
    optimizer = torch.optim.SGD(run.stage.parameters, lr=0.1)
    for x, y in loader:
        loss = run.training_step(nullcontext, lambda: loss_fn(model(x), y))  # model(x): batch t through the stage
        if run.backward(loss):
            run.update(optimizer.step)
    run.drain(optimizer.step)
    run.finish()  # the whole model on every rank again (a collective)
    run.close()
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_ddg.batches import ReceivedBatches, SentBatches, carried_batches
from lightning_ddg.build import BuiltStage, build_stage
from lightning_ddg.checks import NONE_LOSS, check_finite
from lightning_ddg.comm import PipelineStopped
from lightning_ddg.forward import PipelinedForward, StageDone
from lightning_ddg.partition import Partition
from lightning_ddg.shard import Draw, on_meta, put_back
from lightning_ddg.stage import DDGStage, MemoryMode
from lightning_ddg.state import StageStates
from lightning_ddg.stopping import JobStop
from lightning_ddg.topology import StageLinks, Topology
from lightning_ddg.watchdog import Watchdog

__all__ = ["StageRun"]

Step = Callable[[], object]
_SCHEDULER_BEFORE_OPTIMIZER = re.escape("Detected call of `lr_scheduler.step()` before `optimizer.step()`")


class StageRun:
    """This process's stage of ``module``, running: made by :meth:`start`, ended by :meth:`close`.

    Args:
        module: the whole module, cut: it holds this stage's tensors only (unless :attr:`whole`), and its
            ``forward`` is :attr:`forward`, the pipeline.
        built: what :func:`~lightning_ddg.build.build_stage` made.
        states: gathers the whole module's state from the stages (:mod:`lightning_ddg.state`).
        device: where the stage runs.
        keep_stage: the module was built on the meta device: it may not fit one process, so :meth:`finish` leaves
            each rank its stage (:meth:`StageStates.full_state_dict` collects the whole on request).
        on_stop: the exception to raise when the first stage stopped the pipeline for a signal, else
            :class:`~lightning_ddg.comm.PipelineStopped` is raised.

    Example::

        run = StageRun.start(model, topology, rank, partition=partition, device=device)
        loss = run.training_step(nullcontext, lambda: loss_fn(model(x), y))
    """

    def __init__(
        self,
        module: nn.Module,
        built: BuiltStage,
        states: StageStates,
        device: torch.device,
        keep_stage: bool = False,
        on_stop: Callable[[int], BaseException] | None = None,
    ) -> None:
        self.module = module
        self.stage: DDGStage | None = built.stage  # None once closed
        self.links: StageLinks | None = built.links  # None once closed
        self.removed = built.removed  # other stages' tensors taken out of the module; [] once put back
        self.states = states
        self.device = device
        self.keep_stage = keep_stage
        self.on_stop = on_stop
        self.forward = PipelinedForward(built.stage, inspect.signature(module.forward), built.partition.exported_with)
        module.forward = self.forward  # an instance attribute: shadows the class's forward
        self.update_due = False  # the last backward completed this stage's accumulation window
        self._skip_warned = False  # NONE_LOSS said once
        self.finished = False  # finish() ran: the channels are closed
        self.loaders: list[SentBatches | ReceivedBatches] = []  # this run's loaders, reading over links
        self.training_batches: SentBatches | ReceivedBatches | None = None  # the training loader among them
        if built.stage.delay > 0:
            # a stage in warm-up takes no optimizer step while step-interval schedulers advance (docs/semantics.md):
            # torch's advice against stepping a scheduler first does not apply
            warnings.filterwarnings("ignore", message=_SCHEDULER_BEFORE_OPTIMIZER)

    @classmethod
    def start(
        cls,
        module: nn.Module,
        topology: Topology,
        rank: int,
        *,
        partition: Partition,
        world_size: int | None = None,
        device: torch.device | str = "cpu",
        links: StageLinks | None = None,
        timeout: timedelta = timedelta(minutes=30),
        memory: MemoryMode = "stash",
        accumulate_grad_batches: int = 1,
        check_finite: bool = False,
        init_rng_states: dict[str, Tensor] | None = None,
        init_draws: list[Draw] | None = None,
        on_stop: Callable[[int], BaseException] | None = None,
    ) -> StageRun:
        """Build global rank ``rank``'s stage of ``module`` cut as ``partition`` (:func:`build_stage`, keeping only
        this stage's tensors in ``module``) and make ``module``'s ``forward`` the pipeline. A collective where the
        links are created. ``world_size``: the job's processes, by default ``topology``'s."""
        world_size = topology.world_size if world_size is None else world_size
        states = StageStates.of(module, topology, rank, world_size)  # the names and order of the whole module
        keep_stage = on_meta(module)  # built in configure_model: each rank keeps its stage
        built = build_stage(
            module,
            topology,
            rank,
            partition=partition,
            device=device,
            links=links,
            timeout=timeout,
            keep_only=True,
            memory=memory,
            accumulate_grad_batches=accumulate_grad_batches,
            check_finite=check_finite,
            init_rng_states=init_rng_states,
            init_draws=init_draws,
        )
        return cls(module, built, states, torch.device(device), keep_stage, on_stop)

    @property
    def replica_group(self) -> Any:
        """The process group of this stage's replicas (``None`` without replicas, or once closed)."""
        return self.links.replica_group if self.links is not None else None

    @property
    def whole(self) -> bool:
        """The module holds every stage's tensors (one stage, or after :meth:`finish` put them back)."""
        return not self.removed

    # --- steps ---------------------------------------------------------------------------------------------
    def training_step(
        self, context: Callable[[], AbstractContextManager], step: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """``step(*args, **kwargs)`` in ``context()``: the user's training step, whose one call of the module's
        ``forward`` runs this stage on the next batch. Stages before the last have no loss: a zero tensor instead,
        for the backward."""
        try:
            with self.forward.training_step(), context():
                output = step(*args, **kwargs)
        except StageDone:
            return torch.zeros((), device=self.device)
        except PipelineStopped as stopped:
            if self.on_stop is None:
                raise
            raise self.on_stop(stopped.signum) from None
        if output is None:  # the user's step skipped its batch: every stage steps on it all the same
            if not self._skip_warned:
                self._skip_warned = True
                warnings.warn(NONE_LOSS, stacklevel=2)
            return torch.zeros((), device=self.device)
        return output

    def evaluation_step(
        self, context: Callable[[], AbstractContextManager], step: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """``step(*args, **kwargs)`` in ``context()`` (validation, test, prediction); ``None`` on the stages before
        the last."""
        try:
            with self.forward.evaluation_step(getattr(step, "__name__", "validation_step")), context():
                return step(*args, **kwargs)
        except StageDone:
            return None

    def before_batch(self, stop: JobStop, watchdog: Watchdog | None, out_of_time: bool = False) -> tuple[int, bool]:
        """Before a training batch, the first stage decides two things for every stage (``(0, False)`` on the
        others), with no collective across stages:

        - the signal the job was asked to stop for (:meth:`JobStop.requested`), else 0: it ends the pipeline here,
          and each later stage sees the end arrive after the same step;
        - whether the batch it loads next is the fit's last: the fit's time limit is reached (``out_of_time``) or a
          later stage asked to end the fit (:attr:`DDGStage.end_requested`, carried upstream with the gradients).
          :meth:`end_fit_after_next_batch` then marks that batch.

        With replicas, the first stages agree on both (any one's reason counts for every replica) in one all-reduce
        within their group, which averages their gradients every step anyway."""
        assert self.stage is not None
        if not self.stage.is_first:
            return 0, False
        signum, ends = stop.requested(watchdog), out_of_time or self.stage.end_requested
        if self.replica_group is not None:
            flags = torch.tensor([signum, int(ends)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.replica_group)
            signum, ends = int(flags[0]), bool(flags[1])
        if signum:
            self.stage.stop(signum)
        return signum, ends

    def end_fit_after_next_batch(self) -> None:
        """On the first stage, as :meth:`before_batch` decided: mark the batch it loads next as the fit's last. The
        mark carries the news to the later stages, and every stage calls its ``on_fit_end`` as it fetches that batch
        (:mod:`~lightning_ddg.batches`), so that all stop after it."""
        assert self.stage is not None
        if self.stage.is_first and isinstance(self.training_batches, SentBatches):
            self.training_batches.ends_fit = True

    def check_loss(self, loss: Tensor, step: int) -> None:
        """On the last stage, with ``check_finite``: raise ``FloatingPointError`` for a loss that is not finite."""
        assert self.stage is not None
        if self.stage.is_last and self.stage.check_finite:
            advice = "Lower the learning rate, clip gradients (gradient_clip_val), or look for NaN in the batch."
            check_finite([loss], f"the loss at step {step}", advice)

    def backward(self, loss: Tensor) -> bool:
        """The delayed backward of the batch due (from ``loss`` on the last stage, which the others ignore);
        ``True`` when this stage's accumulation window is complete: :meth:`update` is due."""
        assert self.stage is not None
        if self.stage.backward(loss if self.stage.is_last else None):
            self.update_due = True
        return self.update_due

    def update(self, step: Step) -> None:
        """Install the window's gradients and call ``step``, which steps the optimizer."""
        assert self.stage is not None
        self.update_due = False
        counters = self.stage.counters
        mark = counters.mark()
        self.stage.install_gradients()
        step()
        counters.update_s += counters.own_since(mark)

    def check_together(self) -> None:
        """At a point of a fit that every stage must reach after the same training batch (a validation, an epoch's
        end), before any collective there: the first stage says so to the later ones, which raise unless they are
        there too (:mod:`~lightning_ddg.batches`); nothing to check without carried batches."""
        if isinstance(self.training_batches, SentBatches):
            self.training_batches.mark_together()
        elif self.training_batches is not None:
            self.training_batches.check_together()

    def drain(self, step: Step | None) -> None:
        """Backward every batch still in flight, with an :meth:`update` when a window completes (none without
        ``step``: there is no optimizer)."""
        assert self.stage is not None
        for ready in self.stage.drain():
            if ready and step is not None:
                self.update(step)

    # --- loaders -------------------------------------------------------------------------------------------
    def carried(self, loader: Any, training: bool = False, on_fit_end: Callable[[], None] | None = None) -> Any:
        """``loader`` read once, on the first stage, which carries each batch to the later stages
        (:mod:`lightning_ddg.batches`); with one stage, ``loader`` itself. ``training``: the training loader, whose
        batches :meth:`end_fit_after_next_batch` marks; ``on_fit_end`` is called as the marked batch is fetched."""
        if self.links is None or self.stage is None or self.stage.num_stages == 1:
            return loader
        wrapped = carried_batches(
            loader, self.links, last=self.stage.is_last, on_stop=self.on_stop, on_fit_end=on_fit_end
        )
        self.loaders.append(wrapped)
        if training:
            self.training_batches = wrapped
            wrapped.timed = self._loaded
        return wrapped

    def _loaded(self, load_s: float, wait_s: float) -> None:
        # the time Lightning's loop spent fetching a training batch, in the stage's figures (load_ms, wait_ms)
        if self.stage is not None:
            self.stage.counters.load_s += load_s
            self.stage.counters.wait_s += wait_s

    # --- a new cut, in the middle of a run -----------------------------------------------------------------
    def recut(self, cut: Callable[[nn.Module], Partition], **options: Any) -> StageRun:
        """This rank's stage of the same module cut anew, over the same links; call it on every rank after
        :meth:`drain`, with nothing in flight. The module is put back together (a collective), ``cut(module)``
        cuts it, and :meth:`start` builds the new stage with ``options``. The new run takes over this run's
        loaders, which go on carrying batches on the same channels; this run is spent."""
        assert self.stage is not None and self.links is not None and not self.keep_stage
        self._put_back()
        states = self.states
        run = StageRun.start(
            self.module, states.topology, states.rank, partition=cut(self.module), world_size=states.world_size,
            device=self.device, links=self.links, on_stop=self.on_stop, **options,
        )  # fmt: skip
        run.loaders, self.loaders = self.loaders, []
        run.training_batches, self.training_batches = self.training_batches, None
        if run.training_batches is not None:
            run.training_batches.timed = run._loaded
        self.stage = self.links = None
        return run

    # --- the end -------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Close the channels and put the whole module back together on every rank (a collective), unless
        :attr:`keep_stage`; the module's own ``forward`` again."""
        if self.links is not None:
            self.links.close()
        if not self.keep_stage:
            self._put_back()
        self.finished = True
        self.module.__dict__.pop("forward", None)

    def _put_back(self) -> None:
        put_back(self.removed, self.states.gather_tensors(self.module), self.device)
        self.removed = []
        self.module.__dict__.pop("forward", None)

    def close(self, clean: bool = True) -> None:
        """End the run. ``clean``: it neither failed nor stopped, so a run not finished yet (a fit without a
        training batch) is finished now and the links' process groups are released; a stopped pipeline leaves
        messages in flight, and a failed one peers that may be gone: their channels are left to the process's
        exit."""
        if clean and not self.finished and self.stage is not None:
            self.finish()
        if clean and self.links is not None:
            self.links.destroy()
        self.links = None
        for loader in self.loaders:
            loader.release()
        self.loaders = []
        self.module.__dict__.pop("forward", None)
        self.stage = None
