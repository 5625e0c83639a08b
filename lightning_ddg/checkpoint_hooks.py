"""The strategy's checkpoint hooks: a stage process holds only its own stage's tensors, so every hook that saves is a
collective that gathers the whole model's state from the stages (:class:`~lightning_ddg.state.StageStates`), and
every hook that loads reads this stage's part only.

Other stages' tensors are placeholders in what a hook returns; ``save_checkpoint`` fills them from their owners as
rank 0 writes the file, so that no process holds more than its own stage and one piece of a tensor in flight. The
file is an ordinary Lightning checkpoint of the whole model, which loads without lightning_ddg and resumes on any
number of stages.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_ddg._compat import optimizers_to_device, unwrapped_optimizer
from lightning_ddg.checkpoint_io import atomic, load_mapped, writes_local_torch_files
from lightning_ddg.state import StageStates, load_stage_state, parameter_names

__all__ = ["StageCheckpointHooks"]


class StageCheckpointHooks:
    """Mixed into :class:`~lightning_ddg.strategy.DDGStrategy` before ``ParallelStrategy``, whose hooks it overrides;
    reads the strategy's ``_run`` (:class:`~lightning_ddg.stage_run.StageRun`), ``topology`` and ``partition``."""

    _run: Any
    _saving_since: float | None = None  # when the checkpoint being saved began gathering the model's state

    @property
    def states(self) -> StageStates:
        """Gathers the whole model's state from the stages (:mod:`lightning_ddg.state`)."""
        run = self._run
        return run.states if run is not None else StageStates(self.topology, self.global_rank, self.world_size)

    @property
    def _whole(self) -> bool:
        return self._run is None or self._run.whole  # the module holds every stage's tensors

    def full_state_dict(self, rank: int = 0) -> dict[str, Tensor] | None:
        """The whole model's state dict, with its original names, on global rank ``rank`` (``None`` elsewhere), e.g.
        after fit of a model built in ``configure_model``, whose ranks each keep only their stage. A collective:
        every rank calls it (see "Memory: each process holds its own stage" in ``docs/usage.md``)."""
        assert self.lightning_module is not None
        return self.states.full_state_dict(self.lightning_module, dst=rank, whole=self._whole)

    def save_full_state_dict(self, path: Any, rank: int = 0) -> None:
        """Write :meth:`full_state_dict` with ``torch.save`` to ``path`` on global rank ``rank``, no process holding
        more than its own stage and one piece of a tensor in flight. A collective: every rank calls it."""
        assert self.lightning_module is not None
        self.states.save_full_state_dict(self.lightning_module, path, dst=rank, whole=self._whole)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.stopped_by is not None and self.partition is None:
            return  # see DDGStrategy.stopped_elsewhere
        if self.is_global_zero:  # under a temporary name, renamed when whole: a stopped save leaves the last file
            self.checkpoint_io = atomic(self.checkpoint_io)
        self.states.save_checkpoint(checkpoint, filepath, self.checkpoint_io, storage_options)

    @override
    def barrier(self, name: str | None = None) -> None:
        super().barrier(name)  # type: ignore[misc]
        if name == "Trainer.save_checkpoint" and self._saving_since is not None:
            # the save is over on every rank: its gathers, its writing and the waits on each other are no part of
            # the stages' steps, and their figures leave it out as they do validation
            stage = self._run.stage if self._run is not None else None
            if stage is not None:
                stage.counters.pause(time.perf_counter() - self._saving_since)
            self._saving_since = None

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # into each stage once it is cut (and materialised): a process reads its own tensors only

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if not writes_local_torch_files(self.checkpoint_io, checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return load_mapped(checkpoint_path, weights_only=weights_only)  # mmap: only this stage's tensors are read

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        assert self.lightning_module is not None
        if self._whole:  # its own load_state_dict, hooks and all
            return super().load_model_state_dict(checkpoint, strict=strict)
        load_stage_state(self.lightning_module, checkpoint["state_dict"], strict=strict)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        self._saving_since = time.perf_counter()  # the first thing Trainer.save_checkpoint asks for
        if self._whole:
            return super().lightning_module_state_dict()
        return self.states.module_state_dict(self.lightning_module)

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        # the whole model's, as one device would hold it, so that checkpoints resume on any number of stages
        assert self.lightning_module is not None
        names = parameter_names(self.lightning_module)
        return self.states.optimizer_state(unwrapped_optimizer(optimizer), names, placeholders=not self._whole)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        assert self.lightning_module is not None
        for optimizer, full in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            try:
                self.states.load_optimizer_state(optimizer, full, self.lightning_module)
            except ValueError as err:
                raise MisconfigurationException(f"cannot resume the optimizer from this checkpoint: {err}") from None
        optimizers_to_device(self.optimizers, self.root_device)
