"""Holding one stage of a module in a process, and putting the whole module back together.

A stage process needs its own stage's parameters and buffers and nothing else. :func:`keep_only_stage` takes the
other stages' tensors out of the module (the module keeps its structure: emptied submodules cost nothing) and
replaces the other stages' traced modules in the :class:`~lightning_ddg.partition.Partition` by placeholders, so
that no reference to another stage's tensors remains and they are freed. :func:`put_back` registers the full
tensors again, from a state gathered from the stages that own them. This module is plain PyTorch.

Example::

    partition = split_module(model, split_points=["model.4"])
    removed = keep_only_stage(model, partition, stage=1)   # model now holds stage 1's tensors only
    ...                                                     # train stage 1
    put_back(removed, full_state)                           # the whole model again
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ddg.partition import Partition

__all__ = ["Removed", "keep_only_stage", "put_back", "OtherStage"]


@dataclass
class Removed:
    """A parameter or buffer of another stage, taken out of this process's copy of the module."""

    module: nn.Module
    attr: str
    name: str
    is_parameter: bool
    requires_grad: bool
    persistent: bool


class OtherStage(nn.Module):
    """Stands in a :class:`Partition` for a stage that runs in another process: it holds nothing."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"stage {self.index} runs in another process; this one holds only its own stage")


def keep_only_stage(module: nn.Module, partition: Partition, stage: int) -> list[Removed]:
    """Remove from ``module`` the parameters and buffers of other stages, and from ``partition`` the other stages'
    modules (which hold tensors of their own: those their graphs read with ``get_attr``); return what was removed
    from ``module``. The removed tensors are freed once nothing else refers to them.

    Tensors no stage uses (a loss module's weights, an unused head) stay with the last stage, which runs the
    rest of ``training_step``.
    """
    removed = _take_out(module, partition, stage)
    for modules in (partition.train, partition.eval):
        for j in range(len(modules)):
            if j != stage:
                modules[j] = OtherStage(j)
    gc.collect()  # traced modules refer to themselves: free the other stages' tensors now
    _give_back_heap()
    return removed


def _give_back_heap() -> None:
    """Return freed heap pages to the system (glibc keeps freed blocks below its mmap threshold, a few MiB, in
    the heap): without it, a process that dropped the other stages' smaller tensors would stay as large."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _take_out(module: nn.Module, partition: Partition, stage: int) -> list[Removed]:
    owned = {id(t) for t in [*partition.train[stage].parameters(), *partition.train[stage].buffers()]}
    used = {id(t) for s in partition.train for t in [*s.parameters(), *s.buffers()]}
    last = stage == partition.num_stages - 1
    names = {id(t): n for n, t in [*module.named_parameters(), *module.named_buffers()]}
    removed = []
    for mod in module.modules():
        for table, is_param in ((mod._parameters, True), (mod._buffers, False)):
            for attr, tensor in list(table.items()):
                if tensor is None or id(tensor) in owned or (last and id(tensor) not in used):
                    continue
                removed.append(
                    Removed(
                        mod,
                        attr,
                        names[id(tensor)],
                        is_param,
                        tensor.requires_grad,
                        attr not in mod._non_persistent_buffers_set,
                    )
                )
                del table[attr]
    return removed


def put_back(removed: list[Removed], full: dict[str, Tensor], device: torch.device | None = None) -> None:
    """Register the removed parameters and buffers again, with the values of ``full`` (names as in the module's
    ``state_dict``), on ``device``."""
    for r in removed:
        value = full[r.name].to(device) if device is not None else full[r.name]
        if r.is_parameter:
            r.module.register_parameter(r.attr, nn.Parameter(value, r.requires_grad))
        else:
            r.module.register_buffer(r.attr, value, persistent=r.persistent)
