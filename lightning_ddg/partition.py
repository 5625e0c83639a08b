"""Cutting a module's ``forward`` into pipeline stages.

The forward is traced symbolically with :mod:`torch.fx`; a *cut* is the name of a module that begins a new
stage (the ``SplitPoint.BEGINNING`` convention of ``torch.distributed.pipelining``). Every value defined
before a cut and used after it crosses the cut, so skip connections are carried through intermediate
stages. Stage modules are ``GraphModule`` s built on the original module: they hold the original modules and
``Parameter`` objects under their original names.

Only the modules on the path to a cut are *opened*: the module being split and the ancestors of each split
point (:func:`lightning_ddg.opening.opened_by`). Their ``forward`` is traced into the stage graphs, so the Python
in it runs once, at trace time. Every other module is *called*: its own ``forward`` runs at every step, with its
Python state, Python-level randomness, side effects, exceptions and hooks, as in the unsplit model. A cut at the
start of a module's first child is a cut before the module, which then stays closed.

Candidate cuts come from a trace that opens every module (:func:`trace`, as the planner uses it), and so does
what a module call returns: an opened module that reads a tuple, a dict or ``None`` from a called child sees the
same structure as in that trace.

Tracing happens once per mode (train and eval), because a traced graph bakes in Python branches on
``self.training`` (``F.dropout(x, training=self.training)`` in an opened block, say). Both graphs share
every parameter and buffer; called modules such as ``BatchNorm`` keep following ``train()``/``eval()``. Tracing
runs on a copy of the module that shares its tensors, so it leaves the module's Python attributes, and Python's,
NumPy's and PyTorch's random number generators, as they were.

Example::

    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> stages = split_module(model, split_points=["2"]).train
    >>> [list(dict(s.named_parameters())) for s in stages]
    [['0.weight', '0.bias'], ['2.weight', '2.bias']]
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import inspect
import linecache
import operator
import os
import random
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lightning_ddg._compat import buffer_table, parameter_table, pytree
from lightning_ddg.exporting import (
    OPENED_KEY,
    READS_TRAINING_KEY,
    REPEATED_KEY,
    example_spec,
    export_trace,
    with_repeated,
)
from lightning_ddg.layer_stacks import STACKS, stack_forward
from lightning_ddg.opening import opened_by

__all__ = ["Partition", "TiedWeight", "split_module", "balance_to_split_points"]

CUT_KEY = "lightning_ddg_cut"  # in a stage's ``meta``: the name of the module that begins the next stage


@dataclass
class Partition:
    """The stages of one module, traced in train and in eval mode.

    ``train[k]`` and ``eval[k]`` are stage ``k``'s module for each mode; ``split_points[k-1]`` names the
    module that begins stage ``k``; ``opened`` names the modules traced into the stages for the cuts (the module
    being split is always traced); every other module runs as a module.
    """

    split_points: list[str]
    train: list[nn.Module]
    eval: list[nn.Module]
    opened: list[str] = field(default_factory=list)
    tied: list[TiedWeight] = field(default_factory=list)
    # opened with torch.export: the example input it was exported with (tensors as meta tensors), whose arguments
    # the graph expects in every call; None for a torch.fx trace
    exported_with: tuple | None = None

    @property
    def num_stages(self) -> int:
        return len(self.train)

    def parameter_names(self, stage: int) -> list[str]:
        return [name for name, _ in self.train[stage].named_parameters()]

    def buffer_names(self, stage: int) -> list[str]:
        return [name for name, _ in self.train[stage].named_buffers()]


class _WholeForward(nn.Module):
    """A one-stage 'partition' that runs the module's own forward, untraced."""

    def __init__(self, module: nn.Module, forward) -> None:
        super().__init__()
        self.module = module
        self._forward = forward

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


class _TrainingOnly(nn.Module):
    """Stands in ``Partition.eval`` for a stage traced for training only."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"stage {self.index} was traced for training only (split_module(..., evaluation=False), as DDGStrategy "
            "splits a fit whose LightningModule has no validation_step): the model's forward runs within "
            "training_step only. Define validation_step to evaluate during the fit."
        )


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with the changes that give the cut points users expect and keep called modules intact.

    - With ``opened=None`` it enters every module but PyTorch's own layers, and enters ``nn.TransformerEncoder``,
      ``nn.TransformerDecoder`` and ``nn.Transformer`` (leaves for plain torch.fx) as loops over their layers
      (:mod:`lightning_ddg.layer_stacks`), masks included, so that stages can begin between their layers. It
      records what each entered module's call returns (``structures``).
    - With a set ``opened`` it enters only those modules; every other module becomes one ``call_module`` node,
      which calls the real module at run time. Where the full trace saw such a module return a tuple, a dict or
      constants, the node's result is taken apart into the same structure.
    - Modules named in ``whole`` are kept as single calls. :func:`trace` fills it with the modules whose
      forward cannot be traced (Python control flow on tensor values, say): they run whole within one stage.
    """

    def __init__(
        self,
        whole: set[str],
        opened: set[str] | None = None,
        structures: dict[str, list[Any]] | None = None,
        closed: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.whole = whole
        self.closed = set(closed)
        self.opened = opened
        self.structures: dict[str, list[Any]] = {} if structures is None else structures
        self.entered: set[str] = set()  # called modules that had to be traced: their arguments cannot be recorded
        self.calls: dict[str, int] = {}
        self.failed: str | None = None  # the innermost module whose forward failed to trace

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.whole or qualname in self.closed:
            return True
        if self.opened is not None:
            return qualname not in self.opened and qualname not in self.entered
        if isinstance(m, STACKS):
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if self.opened is not None and self.is_leaf_module(m, qualname) and not _recordable((args, kwargs)):
            self.entered.add(qualname)  # a node cannot hold such arguments: the call is traced into instead
        leaf = self.is_leaf_module(m, qualname)
        if isinstance(m, STACKS) and not leaf:
            forward = stack_forward(m)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None and not leaf:
                self.failed = qualname
            raise
        if self.opened is None:
            if not leaf:
                self.structures.setdefault(qualname, []).append(_structure(out))
        elif leaf and qualname not in self.whole:
            recorded = self.structures.get(qualname) or [None]
            call = self.calls.get(qualname, 0)
            self.calls[qualname] = call + 1
            out = _take_apart(out, recorded[min(call, len(recorded) - 1)])
        return out


_PROXY = object()  # in a recorded structure: a value computed at run time
_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)


def _structure(out: Any) -> tuple[Any, list[tuple[Any, Any]]] | None:
    """What a module call returned in the full trace: its pytree spec and, per leaf, its key path and either
    ``_PROXY`` or the constant itself. None for a single traced value, or a structure that cannot be rebuilt."""
    if isinstance(out, fx.Proxy):
        return None
    leaves, spec = pytree.tree_flatten_with_path(out)
    recorded = []
    for path, leaf in leaves:
        if isinstance(leaf, fx.Proxy):
            recorded.append((path, _PROXY))
        elif isinstance(leaf, _CONSTANTS):
            recorded.append((path, leaf))
        else:
            return None  # an object that may hold traced values: leave the call's result whole
    return spec, recorded


def _take_apart(proxy: Any, structure: tuple[Any, list[tuple[Any, Any]]] | None) -> Any:
    """The result of a ``call_module`` node, in the structure the module returned in the full trace."""
    if structure is None or not isinstance(proxy, fx.Proxy):
        return proxy
    spec, recorded = structure
    values = []
    for path, leaf in recorded:
        if leaf is not _PROXY:
            values.append(leaf)
            continue
        value = proxy
        for key in path:
            if isinstance(key, pytree.SequenceKey):
                value = value[key.idx]
            elif isinstance(key, pytree.MappingKey):
                value = value[key.key]
            elif isinstance(key, pytree.GetAttrKey):
                value = getattr(value, key.name)
            else:
                return proxy
        values.append(value)
    return pytree.tree_unflatten(values, spec)


def _recordable(value: Any) -> bool:
    """Whether a ``call_module`` node can hold ``value`` as an argument."""
    if isinstance(value, (fx.Proxy, nn.Module, slice, range, type(None), type(Ellipsis), *fx.node.base_types)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_recordable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _recordable(v) for k, v in value.items())
    return False


WHOLE_KEY = "lightning_ddg_whole"  # in a traced module's ``meta``: the modules kept whole because untraceable
STRUCTURES_KEY = "lightning_ddg_structures"  # in a full trace's ``meta``: what each entered module returned
ENTERED_KEY = "lightning_ddg_entered"  # in a selective trace's ``meta``: modules traced into though not opened


EXPORTED_KEY = "lightning_ddg_exported"  # in a traced module's ``meta``: True when torch.export opened it


def trace(
    module: nn.Module,
    train: bool = True,
    opened: Sequence[str] | None = None,
    structures: dict[str, list[Any]] | None = None,
    closed: Sequence[str] = (),
    example_input: tuple | None = None,
) -> fx.GraphModule:
    """Trace ``module.forward`` for the cuts: with ``torch.fx`` (:func:`trace_fx`), or, where that fails or keeps
    whole a module with submodules of its own, and an example input is given, with ``torch.export`` on that input
    (:func:`lightning_ddg.exporting.export_trace`), which opens the modules ``torch.fx`` cannot. The result of the
    export has ``meta[EXPORTED_KEY]`` set; the fx trace is kept where the export fails too."""
    try:
        gm: fx.GraphModule | None = trace_fx(module, train, opened, structures, closed)
        fx_error = None
    except RuntimeError as err:
        if example_input is None:
            raise
        gm, fx_error = None, err
    if example_input is None or (gm is not None and not any(_has_layers(module, m) for m in gm.meta[WHOLE_KEY])):
        return gm  # traced, or kept whole only modules with no layers of their own to cut between
    try:
        with _shadow(module, user_hooks=opened is not None) as copied, _generators_kept():
            exported = export_trace(
                copied, example_input, train, None if opened is None else set(opened) | {""}, owner=module
            )
    except Exception as err:  # noqa: BLE001 - the fx trace, or its error, stands
        if gm is None:
            raise fx_error from err
        return gm
    _hoist_item_access(exported.graph)
    exported.recompile()
    # modules traced into though not opened: those called more than once, which the export cannot keep whole
    entered = set(exported.meta.get(OPENED_KEY, ())) - set(opened or ()) - {""}
    exported.meta.update({WHOLE_KEY: [], STRUCTURES_KEY: {}, ENTERED_KEY: sorted(entered), EXPORTED_KEY: True})
    return exported


def _has_layers(module: nn.Module, name: str) -> bool:
    """Whether the module ``name`` has submodules with parameters: a kept-whole module worth opening."""
    whole = module.get_submodule(name)
    return any(any(True for _ in child.parameters()) for child in whole.children())


def trace_fx(
    module: nn.Module,
    train: bool = True,
    opened: Sequence[str] | None = None,
    structures: dict[str, list[Any]] | None = None,
    closed: Sequence[str] = (),
) -> fx.GraphModule:
    """Symbolically trace ``module.forward`` in train or eval mode.

    With ``opened=None`` every module but PyTorch's own layers is traced into, and ``meta[STRUCTURES_KEY]`` of
    the result records what each returned; otherwise only the modules named in ``opened`` are, and every other
    module is called (give the full trace's ``structures`` so that their results keep their structure). A
    submodule whose forward cannot be traced is kept whole (one call, no cut inside it); the names of such
    modules are in ``meta[WHOLE_KEY]`` of the result. Only code in the top module's own forward must trace.

    The trace runs on a copy of ``module`` that shares its tensors (:func:`_shadow`): the module's modes,
    Python attributes and the random number generators are left as they were. The full trace is built on that
    copy, without the hooks users registered, so that measuring its pieces fires none of them; a selective trace
    is built on the module's own modules, hooks included.
    """
    whole: set[str] = set()
    recorded: dict[str, list[Any]] = {}
    with _shadow(module, user_hooks=opened is not None) as traced, _generators_kept():
        modes = {m: m.training for m in traced.modules()}
        traced.train(train)
        try:
            while True:
                tracer = _Tracer(whole, None if opened is None else set(opened), structures, closed)
                try:
                    graph = tracer.trace(traced)
                    break
                except Exception as err:  # noqa: BLE001 - any tracing failure gets the same advice
                    if tracer.failed is not None and tracer.failed not in whole:
                        whole.add(tracer.failed)
                        continue
                    raise RuntimeError(
                        f"lightning-ddg could not trace the forward of {type(module).__name__} with torch.fx: {err}\n"
                        f"{_user_code(err)}{_variadic_advice(module)}"
                        "Cutting a model into stages needs a forward without Python control flow on tensor values. "
                        "Move such code into a submodule (it then runs whole, inside one stage) or into "
                        "`training_step`, or run with a single stage (devices=1). Stages begin only at modules the "
                        "trace reaches: split_points can name those."
                    ) from err
            recorded = tracer.structures
        finally:
            for m, mode in modes.items():
                m.training = mode
        _hoist_item_access(graph)
        roots = (traced, module) if opened is None else (module, traced)
        gm = fx.GraphModule(_attributes(graph, *roots), graph)
    gm.meta[WHOLE_KEY] = sorted(whole)
    if opened is None:
        gm.meta[STRUCTURES_KEY] = recorded
    else:
        gm.meta[ENTERED_KEY] = sorted(tracer.entered)
    return gm


def trace_for_cuts(
    module: nn.Module, split_points: Sequence[str], train: bool = True, example_input: tuple | None = None
) -> fx.GraphModule:
    """The full trace (:func:`trace`), in which every split point names a module call.

    A module whose forward computes nothing in the trace (a layer drop that took its skip branch at trace time)
    leaves no node to cut before: such split points are traced as single calls, since a cut before a module
    does not open it.
    """
    gm = trace(module, train=train, example_input=example_input)
    body = _body(gm.graph)
    missing = [name for name in split_points if _find_cut(body, name) is None]
    if (
        missing
        and not gm.meta.get(EXPORTED_KEY)
        and not any(other.startswith(name + ".") for name in missing for other in split_points)
    ):
        gm = trace(module, train=train, closed=missing)
    return gm


def _attributes(graph: fx.Graph, *roots: nn.Module) -> dict[str, Any]:
    """The modules, parameters and buffers the graph names, from the first of ``roots`` that has them (constants
    that the trace made, ``_tensor_constant0``, are only on the traced copy)."""
    found = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            for root in roots:
                try:
                    found[target] = functools.reduce(getattr, target.split("."), root)
                    break
                except AttributeError:
                    continue
    return found


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_TORCH_DIR = os.path.dirname(torch.__file__)


@contextlib.contextmanager
def _shadow(module: nn.Module, user_hooks: bool = True) -> Iterator[nn.Module]:
    """A copy of ``module`` to run its Python on, sharing its tensors (parameters, buffers, tensor attributes) and
    its hooks; with ``user_hooks=False``, without the hooks that are not PyTorch's own (``weight_norm``, pruning).
    Where the module cannot be copied, the module itself, its Python attributes restored afterwards (rebound;
    changes inside mutable attributes stay)."""
    memo: dict[int, Any] = {}
    for m in module.modules():
        for name, value in vars(m).items():
            if isinstance(value, torch.Tensor):
                memo[id(value)] = value
            elif value is parameter_table(m) or value is buffer_table(m):
                memo.update((id(t), t) for t in value.values() if t is not None)
            elif name.endswith("hooks") and isinstance(value, dict):
                memo.update((id(h), h) for h in value.values())
    try:
        copied = copy.deepcopy(module, memo)
    except Exception:  # noqa: BLE001 - an attribute that cannot be copied (a lock, a file): work on the module
        copied = None
    if copied is not None:
        if not user_hooks:
            _drop_user_hooks(copied)
        yield copied
        return
    saved = [(m, dict(vars(m))) for m in module.modules()]
    try:
        if not user_hooks:
            for m in module.modules():  # fresh tables, so that the restored attributes hold the hooks again
                for table in _HOOK_TABLES:
                    setattr(m, table, type(getattr(m, table))(getattr(m, table)))
            _drop_user_hooks(module)
        yield module
    finally:
        for m, attributes in saved:
            vars(m).clear()
            vars(m).update(attributes)


def _drop_user_hooks(module: nn.Module) -> None:
    for m in module.modules():
        for table in _HOOK_TABLES:
            hooks = getattr(m, table)
            for key in [k for k, hook in hooks.items() if not _from_torch(hook)]:
                del hooks[key]


def _from_torch(hook: Any) -> bool:
    code = getattr(getattr(hook, "__func__", hook), "__code__", None)
    if code is not None:
        return code.co_filename.startswith(_TORCH_DIR)
    return (type(hook).__module__ or "").startswith("torch.")  # a callable object, as weight_norm's


@contextlib.contextmanager
def _generators_kept() -> Iterator[None]:
    """Leave the states of Python's, NumPy's and PyTorch's (CPU) random number generators as they were."""
    state = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    torch_state = torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


def _variadic_advice(module: nn.Module) -> str:
    """Advice for a forward that takes ``*args`` or ``**kwargs``, which a trace passes on as one value that cannot be
    unpacked (``self.model(**batch)``)."""
    kinds = {p.kind for p in inspect.signature(module.forward).parameters.values()}
    if not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        return ""
    return (
        f"{type(module).__name__}.forward takes *args or **kwargs, which a trace cannot unpack: name the arguments "
        "it takes (def forward(self, input_ids, attention_mask=None, labels=None): return self.model(input_ids="
        "input_ids, attention_mask=attention_mask, labels=labels)), or take the batch as one dict "
        "(def forward(self, batch): return self.model(**batch)).\n"
    )


def _user_code(err: BaseException) -> str:
    """'file:line: source' of the innermost frame outside torch, where the untraceable construct is."""
    # walked by line numbers only: traceback.extract_tb reads positions, which the code torch.fx generates may lack
    # (Python 3.11 then raises "generator raised StopIteration", hiding the error being reported)
    frames = [
        (frame.f_code.co_filename, line)
        for frame, line in traceback.walk_tb(err.__traceback__)
        if line is not None and not frame.f_code.co_filename.startswith(_TORCH_DIR)
    ]
    if not frames:
        return ""
    filename, line = frames[-1]
    return f"The construct is at {filename}:{line}: {linecache.getline(filename, line).strip()}\n"


def _hoist_item_access(graph: fx.Graph) -> None:
    """Move ``value[key]`` right after ``value`` when that is all ``value`` is used for, so that the items of a
    tuple or dict (a module returning several tensors, a dict input), not the container, cross a later cut."""
    for node in list(graph.nodes):
        users = list(node.users)
        if users and all(u.op == "call_function" and u.target is operator.getitem for u in users):
            # the items count as part of the call that made them, so no cut falls between the two
            stack = dict(node.meta.get("nn_module_stack") or {})
            if node.op == "call_module":
                stack[str(node.target)] = (str(node.target), None)
            anchor = node
            for user in users:
                if all(a is node or not isinstance(a, fx.Node) for a in user.args):
                    anchor.append(user)
                    user.meta["nn_module_stack"] = stack
                    anchor = user


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()]
    if node.op == "call_module":
        paths.append(str(node.target))
    return paths


def _body(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op not in ("placeholder", "output")]


def _find_cut(body: list[fx.Node], name: str) -> int | None:
    for i, node in enumerate(body):
        paths = _module_paths(node)
        if name in paths or (node.op == "get_attr" and str(node.target).startswith(name + ".")):
            return i
    return None


def _cut_index(body: list[fx.Node], name: str, known: Sequence[str]) -> int:
    index = _find_cut(body, name)
    if index is not None:
        return index
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean one of {close}?" if close else ""
    raise ValueError(
        f"split point {name!r} is not a module called in forward.{hint} Split points are fully qualified module "
        "names as in `model.named_modules()`, for example 'model.layer3'."
    )


def _stage_graphs(gm: fx.GraphModule, cuts: list[int], root: nn.Module | None = None) -> list[fx.GraphModule]:
    """The stages of ``gm`` cut before ``body[i]`` for each ``i`` in ``cuts``, built on ``root`` (``gm`` itself by
    default, which holds the traced module's own modules and tensors)."""
    root = gm if root is None else root
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    body = _body(graph)
    order = {n: i for i, n in enumerate(placeholders + body)}
    bounds = [0, *cuts, len(body)]

    def crossing(cut: int) -> list[fx.Node]:
        """Values defined before body[cut] and used at or after it, in definition order."""
        later = set(body[cut:]) | {output}
        defined = placeholders + body[:cut]
        return [v for v in defined if any(user in later for user in v.users)]

    stages = []
    for k in range(len(bounds) - 1):
        new = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inputs = placeholders if k == 0 else crossing(bounds[k])
        mutated = _mutated_in_place(body[bounds[k] : bounds[k + 1]], gm) if k > 0 else set()
        for v in inputs:
            # the first stage takes the forward's arguments, with their defaults
            default = v.args[0] if k == 0 and v.args else inspect.Signature.empty
            env[v] = new.placeholder(v.name, default_value=default)
            if v in mutated:
                # a received value is a leaf of the stage's autograd graph, which may not change in place: the
                # stage works on a copy, as the rest of the model would have seen the change
                env[v] = new.call_method("clone", (env[v],))
        for node in body[bounds[k] : bounds[k + 1]]:
            env[node] = new.node_copy(node, env.__getitem__)
        if k == len(bounds) - 2:
            new.output(fx.map_arg(output.args[0], env.__getitem__))
        else:
            outs = sorted(crossing(bounds[k + 1]), key=order.__getitem__)
            new.output(tuple(env[v] for v in outs))
        new.lint()
        stages.append(fx.GraphModule(root, new, class_name=f"Stage{k}"))
    return stages


_VIEWS = {
    "view",
    "view_as",
    "reshape",
    "transpose",
    "permute",
    "flatten",
    "unsqueeze",
    "squeeze",
    "expand",
    "narrow",
    "select",
    "t",
    "unflatten",
    "chunk",
    "split",
    "unbind",
}


def _mutated_in_place(nodes: list[fx.Node], gm: fx.GraphModule) -> set[fx.Node]:
    """The values that ``nodes`` change in place (``ReLU(inplace=True)``, ``x += y``, ``x.add_(y)``), with the
    views and items they are taken from, back to the value those belong to."""
    mutated = set()
    for node in nodes:
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if node.op == "call_module":
            in_place = getattr(gm.get_submodule(str(node.target)), "inplace", False) is True
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            in_place = (
                node.kwargs.get("inplace") is True
                or (name.endswith("_") and not name.startswith("_") and name != "requires_grad_")
                or name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "ipow", "iand", "ior", "ixor")
            )
        else:
            continue
        if in_place:
            value = node.args[0]
            mutated.add(value)  # the view itself may be what crosses the cut (a flatten before an in-place dropout)
            while value.op in ("call_method", "call_function") and value.args and isinstance(value.args[0], fx.Node):
                name = value.target if isinstance(value.target, str) else getattr(value.target, "__name__", "")
                if name not in _VIEWS and value.target is not operator.getitem:
                    break
                value = value.args[0]
                mutated.add(value)
    return mutated


@dataclass(frozen=True)
class TiedWeight:
    """A parameter that several stages use (tied input and output embeddings, say).

    ``name`` is its name in the module being split (the first ``named_parameters()`` gives it), ``stages`` the
    stages that use it in forward order, and ``names[i]`` its name in stage ``stages[i]``'s module. Each of those
    stages holds a copy of it; the runtime keeps the copies equal (see ``docs/semantics.md``).
    """

    name: str
    stages: tuple[int, ...]
    names: tuple[str, ...]

    def name_in(self, stage: int) -> str:
        return self.names[self.stages.index(stage)]


def _tied_weights(module: nn.Module, stages: list[nn.Module]) -> list[TiedWeight]:
    """The parameters used by more than one stage, in the module's ``named_parameters()`` order."""
    users: dict[int, list[tuple[int, str]]] = {}
    for k, stage in enumerate(stages):
        for name, p in stage.named_parameters():
            users.setdefault(id(p), []).append((k, name))
    tied = []
    for name, p in module.named_parameters():
        found = users.get(id(p), [])
        if len(found) > 1:
            tied.append(TiedWeight(name, tuple(k for k, _ in found), tuple(n for _, n in found)))
    return tied


def split_module(
    module: nn.Module,
    split_points: Sequence[str] | None = None,
    num_stages: int | None = None,
    example_input: tuple | None = None,
    opened: Sequence[str] | None = None,
    evaluation: bool = True,
) -> Partition:
    """Cut ``module.forward`` into stages at ``split_points``.

    Args:
        module: the module to cut (a ``LightningModule`` works: names are relative to it).
        split_points: names of the modules that begin a new stage, in forward order; none for one stage.
            :func:`lightning_ddg.plan` chooses them.
        num_stages: if given, the number of stages the split points must make.
        example_input: positional arguments of ``forward`` (only their shapes and dtypes matter), with which a
            module ``torch.fx`` cannot trace is opened by ``torch.export`` (:func:`trace`).
        opened: the modules these split points open, from a plan that opened the model with ``torch.export``
            (``Plan.opened_modules`` where ``Plan.exported``): the export of the whole model that finds them is
            then skipped, and only the stages' own graph is exported.
        evaluation: also trace the stages in eval mode, for validation, test and predict; without it the
            stages of ``Partition.eval`` refuse to run.
    """
    if not split_points:
        if num_stages not in (None, 1):
            raise ValueError(
                f"{num_stages} stages need {num_stages - 1} split points; lightning_ddg.plan(module, example_input, "
                f"num_stages={num_stages}) chooses balanced ones."
            )
        whole = _WholeForward(module, module.forward)
        return Partition([], [whole], [whole])
    split_points = list(split_points)
    if num_stages is not None and len(split_points) != num_stages - 1:
        raise ValueError(
            f"{len(split_points)} split points make {len(split_points) + 1} stages, but {num_stages} devices were "
            f"requested: give devices={len(split_points) + 1} or {num_stages - 1} split points."
        )

    known = [name for name, _ in module.named_modules() if name]
    result: dict[bool, list[fx.GraphModule]] = {}
    found: set[str] = set()
    full = None
    for mode in (True, False):
        if opened is not None and example_input is not None:
            opening = set(opened) | {""}
            # a split point inside a module that stays closed cuts before that module
            begins = [next(m for m in [*opened_by(name), name] if m not in opening) for name in split_points]
            structures: dict[str, list[Any]] = {}  # an export records none
        else:
            if full is None or not full.meta.get(EXPORTED_KEY):  # an export's cuts are the same in both modes
                full = trace_for_cuts(module, split_points, train=mode, example_input=example_input)
            body = _body(full.graph)
            # a cut names the outermost module that begins there, which it does not open
            begins = [
                _outermost_at(body, i) or name
                for i, name in zip(_cut_indices(body, split_points, known), split_points, strict=True)
            ]
            opening = {m for name in begins for m in opened_by(name)}
            if full.meta.get(EXPORTED_KEY):  # a module called twice cannot be kept whole by torch.export
                opening = with_repeated(module, opening, full.meta.get(REPEATED_KEY, ()))
            structures = full.meta[STRUCTURES_KEY]
        gm = trace(module, train=mode, opened=opening, structures=structures, example_input=example_input)
        found |= (opening - {""}) | set(gm.meta[ENTERED_KEY])
        result[mode] = _stage_graphs(gm, _cut_indices(_body(gm.graph), begins, known, split_points), gm)
        for stage, name in zip(result[mode], split_points, strict=False):
            stage.meta[CUT_KEY] = name  # for errors about the values crossing this cut
        if not evaluation:
            result[False] = [_TrainingOnly(k) for k in range(len(result[True]))]
            break
        if gm.meta.get(EXPORTED_KEY) and not gm.meta.get(READS_TRAINING_KEY, True):
            # no code traced into the stages looked at a training flag: the graph is the same in eval mode, where
            # the modules it calls follow eval() as they run
            result[False] = list(result[True])
            break
    tied = _tied_weights(module, result[True])
    exported_with = example_spec(example_input) if gm.meta.get(EXPORTED_KEY) else None
    return Partition(split_points, result[True], result[False], sorted(found), tied, exported_with)


def _cut_indices(
    body: list[fx.Node], names: Sequence[str], known: Sequence[str], split_points: Sequence[str] | None = None
) -> list[int]:
    """Where in ``body`` each of ``names`` begins, in forward order; raises when a name is not called there or the
    order is not that of the forward."""
    cuts = [_cut_index(body, name, known) for name in names]
    if any(b <= a for a, b in zip([-1, *cuts], cuts, strict=False)) or cuts[0] == 0:
        raise ValueError(
            f"split points {list(split_points or names)} must name modules in the order forward calls them, each "
            "after some computation of the stage before it."
        )
    return cuts


def _outermost_at(body: list[fx.Node], i: int) -> str | None:
    """The outermost module whose call begins at ``body[i]``."""
    previous = set(_module_paths(body[i - 1])) if i > 0 else set()
    entered = [path for path in _module_paths(body[i]) if path not in previous]
    return entered[0] if entered else None


def _candidate_cuts(body: list[fx.Node]) -> list[tuple[int, str]]:
    """Indices where a module call begins, with the outermost module that begins there."""
    cuts, previous, seen = [], set(), set()
    for i, node in enumerate(body):
        paths = _module_paths(node)
        entered = [p for p in paths if p not in previous]
        # a module called twice (a shared ReLU) names only its first call
        if i > 0 and entered and entered[0] not in seen:
            cuts.append((i, entered[0]))
        seen.update(paths)
        previous = set(paths)
    return cuts


def balance_to_split_points(module: nn.Module, balance: Sequence[int]) -> list[str]:
    """Turn torchgpipe-style layer counts of the module's ``nn.Sequential`` trunk into split points."""
    sequentials = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Sequential)]
    trunks = [
        (name, m)
        for name, m in sequentials
        if not any(other != name and (other == "" or name.startswith(other + ".")) for other, _ in sequentials)
    ]
    if len(trunks) != 1:
        found = [name or "<root>" for name, _ in trunks]
        raise ValueError(
            "balance needs a module whose forward runs one nn.Sequential; found "
            f"{len(trunks)} top-level nn.Sequential modules {found}. Use split_points to name the cuts instead."
        )
    name, trunk = trunks[0]
    if any(b < 1 for b in balance) or sum(balance) != len(trunk):
        raise ValueError(
            f"balance {list(balance)} must be positive layer counts summing to the {len(trunk)} layers of "
            f"{name or 'the model'}."
        )
    prefix = f"{name}." if name else ""
    points, offset = [], 0
    for count in balance[:-1]:
        offset += count
        points.append(f"{prefix}{offset}")
    return points
