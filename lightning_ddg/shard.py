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
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_ddg._compat import buffer_table, non_persistent_buffers, parameter_table
from lightning_ddg.partition import Partition

__all__ = [
    "Removed",
    "keep_only_stage",
    "put_back",
    "OtherStage",
    "kept_tensors",
    "on_meta",
    "materialize",
    "rng_states",
    "aliases",
]


@dataclass
class Removed:
    """A parameter or buffer of another stage, taken out of this process's copy of the module."""

    module: nn.Module
    attr: str
    name: str
    is_parameter: bool
    requires_grad: bool
    persistent: bool
    # the hook that makes a call of a module emptied by the removal say so (on one entry under that module)
    hook: RemovableHandle | None = None


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
    _refuse_calls_of_emptied(module, removed)
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


def kept_tensors(module: nn.Module, partition: Partition, stage: int) -> set[int]:
    """The ``id`` s of the parameters and buffers of ``module`` that the process of ``stage`` keeps: its stage's,
    and on the last stage those no stage uses (a loss module's weights, an unused head)."""
    owned = {id(t) for t in [*partition.train[stage].parameters(), *partition.train[stage].buffers()]}
    if stage < partition.num_stages - 1:
        return owned
    used = {id(t) for s in partition.train for t in [*s.parameters(), *s.buffers()]}
    return owned | {id(t) for t in [*module.parameters(), *module.buffers()] if id(t) not in used}


def _take_out(module: nn.Module, partition: Partition, stage: int) -> list[Removed]:
    kept = kept_tensors(module, partition, stage)
    names = {id(t): n for n, t in [*module.named_parameters(), *module.named_buffers()]}
    removed = []
    for mod in module.modules():
        for table, is_param in ((parameter_table(mod), True), (buffer_table(mod), False)):
            for attr, tensor in list(table.items()):
                if tensor is None or id(tensor) in kept:
                    continue
                removed.append(
                    Removed(
                        mod,
                        attr,
                        names[id(tensor)],
                        is_param,
                        tensor.requires_grad,
                        attr not in non_persistent_buffers(mod),
                    )
                )
                del table[attr]
    return removed


def _refuse_calls_of_emptied(module: nn.Module, removed: list[Removed]) -> None:
    """Give each outermost submodule that the removal left with no parameter or buffer a hook that raises, when it is
    called, an error that says why, instead of an ``AttributeError`` deep inside it: a step calling a part of the
    model directly (``self.model.generate(...)``, ``self.encoder(x)``) rather than through ``self(...)``."""
    hooked: list[str] = []
    for name, mod in module.named_modules():
        if not name or any(name.startswith(h + ".") for h in hooked) or _holds_tensors(mod):
            continue
        first = next((r for r in removed if r.name.startswith(name + ".")), None)
        if first is None:
            continue  # held nothing to begin with (an activation, a dropout): it runs anywhere
        first.hook = mod.register_forward_pre_hook(partial(_held_elsewhere, name))
        hooked.append(name)


def _holds_tensors(module: nn.Module) -> bool:
    return next(itertools.chain(module.parameters(), module.buffers()), None) is not None


def _held_elsewhere(name: str, module: nn.Module, args: object) -> None:
    raise RuntimeError(
        f"{name!r} was called, but its parameters and buffers belong to another pipeline stage, which another "
        "process holds: under DDGStrategy a step runs the model only through self(...). Call it inside forward, so "
        "that self(...) runs it where it is held; or, after trainer.fit, on the whole model that fit puts back in "
        "the module (text generation, say)."
    )


def put_back(removed: list[Removed], full: dict[str, Tensor], device: torch.device | None = None) -> None:
    """Register the removed parameters and buffers again, with the values of ``full`` (names as in the module's
    ``state_dict``), on ``device``."""
    for r in removed:
        if r.hook is not None:
            r.hook.remove()
            r.hook = None
        value = full[r.name].to(device) if device is not None else full[r.name]
        if r.is_parameter:
            r.module.register_parameter(r.attr, nn.Parameter(value, r.requires_grad))
        else:
            r.module.register_buffer(r.attr, value, persistent=r.persistent)


def aliases(state: dict[str, Tensor]) -> dict[str, str]:
    """The names of a ``state_dict(keep_vars=True)`` that hold the same tensor as an earlier name (a tied weight
    under each of its names), mapped to that earlier name: a checkpoint stores such a tensor once."""
    first: dict[int, str] = {}
    found = {}
    for name, tensor in state.items():
        if id(tensor) in first:
            found[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return found


def on_meta(module: nn.Module) -> bool:
    """Whether ``module`` holds a parameter or buffer on the meta device (built without its data)."""
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def rng_states(device: torch.device) -> dict[str, Tensor]:
    """The random number generator states :func:`materialize` starts from: the CPU's, and ``device``'s if a GPU."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def materialize(
    module: nn.Module,
    kept: set[int],
    device: torch.device,
    rng_states: dict[str, Tensor] | None = None,
    holders: Sequence[nn.Module] = (),
) -> None:
    """Give the meta-device tensors of ``module`` whose ``id`` is in ``kept`` real storage on ``device``, initialised
    as building the whole model would: module by module in the order of ``module.modules()``, each with its own
    ``reset_parameters()``, from the random number generator states ``rng_states`` (``"cpu"``, and ``"cuda"`` for a
    GPU ``device``) that the build began with. The modules of other stages are initialised too, one at a time on
    temporary tensors that are freed at once, so that every stage draws from the same random stream as one whole
    build: memory holds the kept tensors and one other module at most. The generators are left as the whole build
    would have left them.

    ``holders`` (traced stage modules) have their references to the kept meta tensors replaced as well. A tensor
    several modules hold (a tied weight) stays one tensor, with the values its first module gives it.

    Raises ``ValueError`` when a meta tensor's module has no ``reset_parameters`` (its values would be unknown).
    """
    pending = [m for m in module.modules() if _meta_tensors(m)]
    missing = [type(m).__name__ for m in pending if not callable(getattr(m, "reset_parameters", None))]
    if missing:
        names = [n for n, m in module.named_modules() if m in set(pending) and type(m).__name__ in missing]
        hugging_face = [n or "the module" for n, m in module.named_modules() if _is_hugging_face_model(m)]
        if hugging_face:
            raise ValueError(
                f"{hugging_face[0]} is a Hugging Face model built on the meta device (in configure_model): such a "
                "model initialises its weights with its own _init_weights, over the whole model, which a stage "
                f"process cannot replay for its stage alone ({names[:3]}{' ...' if len(names) > 3 else ''} have no "
                "reset_parameters()). Build it in __init__ (from_config or from_pretrained): each stage process still "
                "keeps only its own stage's tensors once the model is cut."
            )
        raise ValueError(
            f"the modules {names} were built on the meta device (in configure_model) but have no reset_parameters() "
            "to initialise their tensors on the stage that holds them: give them a reset_parameters() method, or "
            "build them in __init__"
        )
    if rng_states is not None:
        torch.set_rng_state(rng_states["cpu"])
        if "cuda" in rng_states and device.type == "cuda":
            torch.cuda.set_rng_state(rng_states["cuda"], device)
    replaced: dict[int, Tensor] = {}
    done: dict[int, Tensor] = {}  # meta tensor -> what its first module made of it (a tied weight has several)
    for m in pending:
        before = _meta_tensors(m)
        for table, attr, old in before:
            empty = torch.empty_like(old, device=device)
            table[attr] = nn.Parameter(empty, old.requires_grad) if isinstance(old, nn.Parameter) else empty
        if any(id(old) not in done for _, _, old in before):
            with torch.no_grad():
                m.reset_parameters()
        for table, attr, old in before:
            if id(old) in done:  # a tied weight keeps the values of the module that holds it first
                table[attr] = done[id(old)]
            elif id(old) in kept:
                replaced[id(old)] = done[id(old)] = table[attr]
            else:
                table[attr] = done[id(old)] = old  # another stage's: back to meta, the values drawn are dropped
    for holder in holders:
        for m in holder.modules():
            for table in (parameter_table(m), buffer_table(m)):
                for attr, t in table.items():
                    if t is not None and id(t) in replaced:
                        table[attr] = replaced[id(t)]


def _is_hugging_face_model(module: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__)


def _meta_tensors(module: nn.Module) -> list[tuple[dict, str, Tensor]]:
    return [
        (table, attr, t)
        for table in (parameter_table(module), buffer_table(module))
        for attr, t in table.items()
        if t is not None and t.is_meta
    ]
