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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
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
    "record_draws",
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
    draws: list[Draw] | None = None,
) -> None:
    """Give the meta-device tensors of ``module`` whose ``id`` is in ``kept`` real storage on ``device``, initialised
    as building the whole model would, from the random number generator states ``rng_states`` (``"cpu"``, and
    ``"cuda"`` for a GPU ``device``) that the build began with: the build is replayed module by module in the order
    it made them, children before the ``reset_parameters()`` that ends a module's ``__init__``; a Hugging Face model
    (``PreTrainedModel``) then initialises its modules as its ``post_init`` does, with its own ``_init_weights``.
    The modules of other stages are initialised too, one at a time on temporary tensors that are freed at once, so
    that every stage draws from the same random stream as one whole build: memory holds the kept tensors and one
    other module at most. The generators are left as the whole build would have left them.

    ``holders`` (traced stage modules) have their references to the kept meta tensors replaced as well. A tensor
    several modules hold (a tied weight) stays one tensor, with the values its first module gives it; the others
    draw into temporary tensors of their own, as each built its own before it was tied.

    ``draws``: the random values the build drew (:func:`record_draws`; on the meta device they drew nothing), which
    the replay must draw again alike.

    Raises ``ValueError`` when a meta tensor's values would be unknown: its module has no ``reset_parameters``
    (outside a Hugging Face model, whose ``_init_weights`` sets them), an initialisation wrote no value into a tensor
    this stage keeps or drew values into another stage's, or the replay drew other values than ``draws``.
    """
    replay = _Replay(module, kept, device)
    replay.check()
    if rng_states is not None:
        torch.set_rng_state(rng_states["cpu"])
        if "cuda" in rng_states and device.type == "cuda":
            torch.cuda.set_rng_state(rng_states["cuda"], device)
    replay.build(module)
    replay.tie()
    replay.check_written()
    replayed = replay.drawn.draws
    if draws is not None and replayed != draws:
        raise ValueError(
            f"building the model drew random values that its modules' reset_parameters() do not draw again "
            f"({_first_difference(draws, replayed)}), so a stage cannot initialise its part as a whole build would: "
            "build the model in __init__, or give each module a reset_parameters() that draws what its __init__ does"
        )
    for holder in holders:
        for m in holder.modules():
            for table in (parameter_table(m), buffer_table(m)):
                for attr, t in table.items():
                    if t is not None and id(t) in replay.made:
                        table[attr] = replay.made[id(t)]


class _Replay:
    """A whole build of ``module`` on the meta device replayed one module at a time (:func:`materialize`)."""

    def __init__(self, module: nn.Module, kept: set[int], device: torch.device) -> None:
        self.module, self.kept, self.device = module, kept, device
        # each module's own meta tensors, as built; the first module holding a tensor is the one whose values it keeps
        self.own = {id(m): _meta_tensors(m) for m in module.modules()}
        self.first: dict[int, int] = {}
        for m in module.modules():
            for _, _, t in self.own[id(m)]:
                self.first.setdefault(id(t), id(m))
        self.made: dict[int, Tensor] = {}  # meta tensor -> the real tensor this stage keeps
        self.built: set[int] = set()
        self.drawn = _Recorder()  # what the resets draw: what a build on the meta device records (record_draws)
        # the modules the replay initialises: built on the meta device (their tensors, or those below them), none of
        # their own tensors real (a part built in __init__, pretrained weights, say, keeps its values)
        self.replayed = {
            id(m)
            for m in module.modules()
            if on_meta(m) and not any(not t.is_meta for t in [*m.parameters(False), *m.buffers(False)])
        }

    def check(self) -> None:
        in_hugging_face = {
            id(m) for h in self.module.modules() if self._hugging_face(h) for m in h.modules() if id(m) in self.replayed
        }
        missing = [
            name
            for name, m in self.module.named_modules()
            if self.own[id(m)] and _reset(m) is None and id(m) not in in_hugging_face
        ]
        if in_hugging_face and not _replays_hugging_face():
            names = [n or "the module" for n, m in self.module.named_modules() if self._hugging_face(m)]
            raise ValueError(
                f"{names[0]} is a Hugging Face model built on the meta device (in configure_model): its weights are "
                "initialised as a whole build would only with transformers 5 or later. Upgrade transformers, or build "
                "it in __init__ (from_config or from_pretrained): each stage process still keeps only its own stage's "
                "tensors once the model is cut."
            )
        if missing:
            raise ValueError(
                f"the modules {missing[:5]}{' ...' if len(missing) > 5 else ''} were built on the meta device (in "
                "configure_model) but have no reset_parameters() to initialise their tensors on the stage that holds "
                "them: give them a reset_parameters() method, or build them in __init__"
            )

    @contextmanager
    def real(self, m: nn.Module) -> Iterator[None]:
        """``m``'s own tensors real while its initialisation runs: the tensor this stage keeps where ``m`` is the
        first to hold it (made once, then written again by a later initialisation, as in a whole build), a temporary
        one otherwise; back to what they were afterwards."""
        own = self.own[id(m)]
        for table, attr, old in own:
            if id(old) in self.kept and self.first[id(old)] == id(m):
                if id(old) not in self.made:
                    self.made[id(old)] = _filled(old, self.device, keep=True)
                table[attr] = self.made[id(old)]
            else:
                table[attr] = _filled(old, self.device, keep=False)
        try:
            with _RefuseMetaWrites(m):
                yield
        finally:
            for table, attr, old in own:
                table[attr] = self.made.get(id(old), old)

    def build(self, m: nn.Module) -> None:
        """``m`` as a whole build made it: its children, then its own ``reset_parameters()``, which ends a layer's
        ``__init__`` (``nn.MultiheadAttention`` sets its child's bias there); a Hugging Face model ends with its
        ``post_init``: each of its modules initialised by ``_init_weights``, children first."""
        if id(m) in self.built:
            return
        self.built.add(id(m))
        for child in m.children():
            self.build(child)
        if id(m) not in self.replayed:
            return  # built in __init__: its values are the ones it has
        reset = _reset(m)
        if reset is not None:  # nn.Transformer's holds no tensor of its own, and draws its layers' values
            with self.real(m), torch.no_grad(), self.drawn:
                reset()
        if self._hugging_face(m):
            from transformers import initialization  # a Hugging Face model is built: transformers is there

            with torch.no_grad(), initialization.guard_torch_init_functions():
                self._initialise(m, m._initialize_weights, m.is_custom_code())

    def _hugging_face(self, m: nn.Module) -> bool:
        return id(m) in self.replayed and _is_hugging_face_model(m)

    def _initialise(self, m: nn.Module, init: Callable[..., None], custom_code: bool) -> None:
        for child in m.children():  # as PreTrainedModel.initialize_weights: a sub-model brings its own
            self._initialise(child, child._initialize_weights if _is_hugging_face_model(child) else init, custom_code)
        if getattr(m, "_is_hf_initialized", False) or id(m) not in self.replayed:
            return
        with self.real(m):
            init(m, custom_code)

    def tie(self) -> None:
        """Every holder of a kept tensor holds it, the values its first holder gave it."""
        for m in self.module.modules():
            for table, attr, old in self.own[id(m)]:
                if id(old) in self.made:
                    table[attr] = self.made[id(old)]

    def check_written(self) -> None:
        unwritten = [
            f"{name}.{attr}" if name else attr
            for name, m in self.module.named_modules()
            for _, attr, old in self.own[id(m)]
            if id(old) in self.made and self.first[id(old)] == id(m) and _still_filled(self.made[id(old)])
        ]
        if unwritten:
            raise ValueError(
                f"{unwritten[:5]} were built on the meta device (in configure_model), and their module's "
                "initialisation gave them no values: build the model in __init__, or give the module a "
                "reset_parameters() that sets them"
            )


_UNWRITTEN = frozenset({torch.bool})  # no value of these marks a tensor that no initialisation wrote


def _filled(like: Tensor, device: torch.device, keep: bool) -> Tensor:
    """A real tensor shaped like ``like``; one this stage keeps starts as NaN (or its dtype's largest value), so that
    :meth:`_Replay.check_written` finds values no initialisation wrote."""
    t = torch.empty_like(like, device=device)
    if keep and not t.dtype.is_complex and t.dtype not in _UNWRITTEN:
        t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max)
    return nn.Parameter(t, like.requires_grad) if isinstance(like, nn.Parameter) else t


def _still_filled(t: Tensor) -> bool:
    if t.dtype.is_complex or t.dtype in _UNWRITTEN or t.numel() == 0:
        return False
    values = t.detach()
    return bool(values.isnan().any() if t.is_floating_point() else (values == torch.iinfo(t.dtype).max).all())


_RANDOM_FILLS = {"normal_", "uniform_", "bernoulli_", "exponential_", "random_", "cauchy_", "log_normal_", "geometric_"}


class _RefuseMetaWrites(TorchFunctionMode):
    """Raises when ``module``'s initialisation draws random values into a meta tensor: another stage's tensor of
    another module, which this one initialised in a whole build, drawing random numbers that the replay would miss."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        random_fill = getattr(func, "__name__", "") in _RANDOM_FILLS
        if random_fill and args and isinstance(args[0], Tensor) and args[0].is_meta:
            raise ValueError(
                f"the initialisation of {type(self.module).__name__} (built on the meta device, in configure_model) "
                "draws random values into the tensors of other modules, which a stage cannot replay for its part "
                "alone: build the model in __init__"
            )
        return func(*args, **kwargs)


def _is_hugging_face_model(module: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" for cls in type(module).__mro__)


def _replays_hugging_face() -> bool:
    """Whether transformers initialises a model module by module as :class:`_Replay` calls it (transformers 5)."""
    try:
        from transformers import PreTrainedModel, initialization
    except ImportError:
        return False
    needed = ("_initialize_weights", "is_custom_code")
    return hasattr(initialization, "guard_torch_init_functions") and all(hasattr(PreTrainedModel, n) for n in needed)


def _reset(module: nn.Module) -> Callable[[], None] | None:
    """What sets a module's own tensors as its ``__init__`` did: ``reset_parameters()`` (``_reset_parameters()`` for
    ``nn.MultiheadAttention``)."""
    reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    return reset if callable(reset) else None


Draw = tuple[str, tuple[int, ...]]  # a random function and the shape of what it filled or made

_RANDOM_MADE = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson"}
_RANDOM_MADE |= {f"{name}_like" for name in ("rand", "randn", "randint")}


class _Recorder(TorchFunctionMode):
    """Lists the random values drawn while it is active (:func:`record_draws`)."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[Draw] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if (name in _RANDOM_FILLS or name in _RANDOM_MADE) and isinstance(result, Tensor):
            self.draws.append((name, tuple(result.shape)))
        return result


@contextmanager
def record_draws() -> Iterator[list[Draw]]:
    """The random values drawn in the ``with`` block, as ``(function, shape)`` in order: on the meta device a build
    draws none, but the calls are made and listed, for :func:`materialize` to draw them again alike."""
    with _Recorder() as recorder:
        yield recorder.draws


def _first_difference(built: list[Draw], replayed: list[Draw]) -> str:
    for i, (a, b) in enumerate(zip(built, replayed, strict=False)):
        if a != b:
            return f"draw {i}: the build's {a[0]} of shape {a[1]}, the replay's {b[0]} of shape {b[1]}"
    return f"the build drew {len(built)} times, the replay {len(replayed)}"


def _meta_tensors(module: nn.Module) -> list[tuple[dict, str, Tensor]]:
    return [
        (table, attr, t)
        for table in (parameter_table(module), buffer_table(module))
        for attr, t in table.items()
        if t is not None and t.is_meta
    ]
