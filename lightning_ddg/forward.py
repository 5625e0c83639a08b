"""The module's ``forward`` replaced by the pipeline, while a training or evaluation step runs.

Inside ``training_step``, ``self(x)`` forwards batch ``t`` through this process's stage; on every stage but the
last there is no loss, so the rest of the user's step is skipped (:class:`StageDone` ends it), in evaluation steps
too. Outside a step (a callback that calls the model on every rank, as Lightning's ``ModelSummary`` does with
``example_input_array``) the call evaluates through the pipeline and returns ``None`` on the stages before the
last. This module is plain Python over :class:`~lightning_ddg.stage.DDGStage`.

Example::

    forward = PipelinedForward(stage, inspect.signature(module.forward))
    module.forward = forward                      # an instance attribute shadows the class's forward
    with forward.training_step():
        try:
            loss = module.training_step(batch, 0)  # calls self(x) once
        except StageDone:
            loss = None                            # a stage before the last
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lightning_ddg.checks import check_exported_arguments
from lightning_ddg.stage import DDGStage

__all__ = ["PipelinedForward", "StageDone"]


class StageDone(Exception):
    """Raised by the pipelined forward on stages that hold no loss, to end the user's step there."""


class PipelinedForward:
    """``forward`` of a module cut into stages, as this process runs it: training steps go through
    :meth:`DDGStage.forward`, evaluation through :meth:`DDGStage.evaluate`."""

    def __init__(self, stage: DDGStage, signature: inspect.Signature, exported_with: tuple | None = None) -> None:
        self.stage = stage
        self.signature = signature
        # on the first stage of a model opened with torch.export: the example's arguments, by name, that every
        # call must match in which are None (Partition.exported_with)
        self._exported_with = None
        if exported_with is not None and stage.is_first:
            example = signature.bind(*exported_with)
            example.apply_defaults()
            self._exported_with = dict(example.arguments)
        self._training = False
        self._in_step: str | None = None  # the name of the user's training or evaluation step that runs
        self._calls = 0
        self.on_training_call: Callable[[], None] | None = None  # called as a training step calls the forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if self._exported_with is not None:
            check_exported_arguments(bound.arguments, self._exported_with)
        if self._in_step is not None:
            self._calls += 1
            # the stages before the last ended the step at the first call (one stage evaluates as often as it likes)
            if self._calls > 1 and (self._training or self.stage.num_stages > 1):
                raise RuntimeError(
                    f"{self._in_step} called the model's forward twice. With DDGStrategy each step sends one batch "
                    f"through the pipeline, and the stages before the last end the step at its first `self(...)`: "
                    f"call `self(...)` once per {self._in_step}. For two views of a batch (test-time augmentation, "
                    "R-Drop), send them as one: `self(torch.cat([x, x.flip(-1)]))`, then split the output."
                )
        if self._training:
            if self.on_training_call is not None:
                self.on_training_call()
            output = self.stage.forward(*bound.args)
        else:
            output = self.stage.evaluate(*bound.args)
        if self.stage.is_last:
            return output
        if self._in_step:
            raise StageDone
        return None

    @contextmanager
    def training_step(self) -> Iterator[None]:
        """Within it, the one forward call of a training step; raises when the step never called forward."""
        self._training, self._in_step, self._calls = True, "training_step", 0
        try:
            yield
        finally:
            self._training, self._in_step = False, None
        if self._calls == 0:
            raise RuntimeError(
                "training_step never called the model's forward. DDGStrategy pipelines `self(...)`/`self.forward(...)`"
                ": compute the model output with it inside training_step."
            )

    @contextmanager
    def evaluation_step(self, name: str = "validation_step") -> Iterator[None]:
        """Within it, a validation, test or prediction step (``name``), which ends at the forward on the stages before
        the last."""
        self._in_step, self._calls = name, 0
        try:
            yield
        finally:
            self._in_step = None
