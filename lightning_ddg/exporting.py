"""A second way to open a module for the cuts: ``torch.export`` (non-strict) with an example input.

``torch.fx`` traces a forward with proxies in place of tensors, so Python that looks at values (a mask builder
that checks ``attention_mask is None or mask.all()``, a key/value cache object, ``if seq_len > 1:``) stops it.
Most Hugging Face models are written that way. ``torch.export`` runs the forward on fake tensors of the example
input's shapes instead, so such Python runs, and its outcome is recorded (as ``torch.distributed.pipelining``'s
``pipeline()`` does). :func:`export_trace` gives a ``GraphModule`` in the form :mod:`lightning_ddg.partition`
cuts:

- with ``opened=None``, every module is traced into, each node tagged with the modules it belongs to, for the
  planner's candidate cuts and measurements;
- with a set ``opened``, only those modules are traced into: every other module is one ``call_module`` node that
  calls the real module (``preserve_module_call_signature`` and ``torch.export``'s module swap), so that modules
  holding no cut run as written, hooks and Python included. Parameter names stay those of the module.

Sizes are exported as symbols (``Dim.AUTO``), so the stages take batches and sequences of other lengths; a size
used on both sides of a cut is recomputed where it is used, so that only tensors cross. While exporting, the key/
value cache of Hugging Face models is switched off (``config.use_cache = False``): training does not use it, and
a cache object cannot cross between stages. What an opened module computes in Python from values other than
shapes is fixed at export time, as with ``torch.fx``.

Example::

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> gm = export_trace(model, (torch.randn(3, 4),), opened={""})
    >>> [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    ['0', '1', '2']
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim
from torch.export.exported_program import ConstantArgument
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from lightning_ddg._compat import export_swap as _swap
from lightning_ddg._compat import is_export_metadata_check
from lightning_ddg.layer_stacks import STACKS, stack_forward

__all__ = [
    "export_trace",
    "place_devices",
    "example_spec",
    "no_cache",
    "with_repeated",
    "READS_TRAINING_KEY",
    "REPEATED_KEY",
    "OPENED_KEY",
]

READS_TRAINING_KEY = "lightning_ddg_reads_training"  # in an export's meta: whether its code read a ``training`` flag
REPEATED_KEY = "lightning_ddg_repeated"  # in a full export's meta: the modules the forward calls more than once
OPENED_KEY = "lightning_ddg_opened"  # in a selective export's meta: the modules it traced into

_SCALARS = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


def example_spec(example: Any) -> Any:
    """The example input with each tensor replaced by an empty one of its shape and dtype on the meta device: what
    exporting needs (its values are never read), small enough to send to every rank."""
    return pytree.tree_map_only(torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), example)


def export_trace(
    module: nn.Module,
    example: tuple,
    train: bool = True,
    opened: set[str] | None = None,
    owner: nn.Module | None = None,
) -> fx.GraphModule:
    """``module.forward`` exported on ``example`` (positional arguments), in train or eval mode, as a graph whose
    nodes carry ``nn_module_stack`` like a ``torch.fx`` trace; modules outside ``opened`` are called as written
    (every module is traced into when ``opened`` is None): those of ``owner`` when ``module`` is a copy of it that
    shares its tensors. Raises what ``torch.export`` raises."""
    if _swap is None:
        raise RuntimeError("opening a module with torch.export needs a torch with torch.export._swap (torch >= 2.5)")
    # where the parameters are; on the meta device (a model built without its data) the example goes there too:
    # torch < 2.14 refuses an export whose weights and inputs are on different devices
    devices = [t.device for t in module.parameters()]
    device = next((d for d in devices if d.type != "meta"), torch.device("meta" if devices else "cpu"))
    signature = inspect.signature(module.forward)
    bound = signature.bind(*pytree.tree_map_only(torch.Tensor, lambda t: _concrete(t, device), example))
    bound.apply_defaults()
    args = tuple(bound.args)
    dynamic = pytree.tree_map_only(torch.Tensor, lambda t: {i: Dim.AUTO for i in range(t.dim())}, args)
    dynamic = pytree.tree_map(
        lambda d: d if isinstance(d, dict) else None, dynamic, is_leaf=lambda d: isinstance(d, dict)
    )
    if opened is None:
        return _exported(module, args, dynamic, train, {}, owner or module, signature)
    opened = set(opened)
    try:
        try:
            result = _exported(module, args, dynamic, train, _called_whole(module, opened), owner or module, signature)
        except _CalledTwice as twice:  # a module called twice cannot be kept whole: traced into instead
            opened = with_repeated(module, opened, twice.modules)
            result = _exported(module, args, dynamic, train, _called_whole(module, opened), owner or module, signature)
    except Exception:  # noqa: BLE001 - torch.export could not keep these calls whole: trace into them too
        result = _exported(module, args, dynamic, train, {}, owner or module, signature)
        opened = {name for name, _ in module.named_modules()}
    result.meta[OPENED_KEY] = sorted(opened)
    return result


def with_repeated(module: nn.Module, opened: set[str], repeated: Sequence[str]) -> set[str]:
    """``opened`` with the modules of ``repeated`` (called more than once by the forward) that it would keep whole,
    and those that opening them would keep whole in turn: ``torch.export`` keeps a module whole where it is
    called once only."""
    opened, repeated = set(opened), set(repeated)
    while twice := repeated.intersection(_called_whole(module, opened)):
        opened |= twice
    return opened


class _CalledTwice(Exception):
    def __init__(self, modules: list[str]) -> None:
        super().__init__(f"called more than once: {modules}")
        self.modules = modules


def _exported(
    module: nn.Module,
    args: tuple,
    dynamic: Any,
    train: bool,
    called: dict[str, nn.Module],
    owner: nn.Module,
    signature: inspect.Signature,
) -> fx.GraphModule:
    ep, reads_training, repeated = _export(module, args, dynamic, train, tuple(called))
    if not called:
        repeated = _repeated_calls(ep.graph)
    elif repeated:
        raise _CalledTwice(repeated)
    _sizes_out_of_calls(ep.graph, set(called))
    with warnings.catch_warnings(), _swap_fixed():
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node with no underlying reference")
        gm = _swap._swap_modules(ep, {name: owner.get_submodule(name) for name in called})
    in_spec = ep.module_call_graph[0].signature.in_spec
    graph = _folded(gm, in_spec, list(signature.parameters.values())[: len(args)])
    _localize(graph, lambda n: n.op == "get_attr" or _is_size(n))
    _sink(graph)
    result = fx.GraphModule(gm, graph)
    result.graph.eliminate_dead_code()
    result.graph.lint()
    result.recompile()
    result.meta[READS_TRAINING_KEY] = reads_training
    result.meta[REPEATED_KEY] = repeated
    return result


def _repeated_calls(graph: fx.Graph) -> list[str]:
    """The modules a full export saw called more than once: their second call's nodes are tagged ``path@1``."""
    return sorted(
        {path for n in graph.nodes for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items() if "@" in key}
    )


def _sizes_out_of_calls(graph: fx.Graph, called: set[str]) -> None:
    """Take the sizes computed inside a module to be kept whole, and used outside it too, out of that module.

    The export records a size (``sym_size(input, 0) * 2``) where it was first needed, often inside a module, and
    reuses it after; swapping the module for its call would make the size one of the module's outputs, which it
    is not. A size computed from the module's own tensors stays: then the export is traced into the module.
    """

    def call_of(node: fx.Node) -> str | None:
        paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        return next((p for p in paths if p in called), None)

    for node in reversed(graph.nodes):
        where = call_of(node)
        if where is None or not _is_size(node) or all(call_of(u) == where for u in node.users):
            continue
        if any(call_of(a) == where and not _is_size(a) for a in node.all_input_nodes):
            continue
        stack = node.meta["nn_module_stack"]
        outer = list(stack)[: [path for path, _ in stack.values()].index(where)]
        node.meta["nn_module_stack"] = {key: stack[key] for key in outer}


_CACHE: OrderedDict[tuple, tuple[torch.export.ExportedProgram, bool, list[str]]] = OrderedDict()
_CACHE_SIZE = 4


def _export(
    module: nn.Module, args: tuple, dynamic: Any, train: bool, called: tuple[str, ...]
) -> tuple[torch.export.ExportedProgram, bool, list[str]]:
    """``torch.export.export``, whether the code it traced read a module's ``training`` flag
    (:func:`_training_reads`), and which of the ``called`` modules it called more than once; remembered for the
    last few modules: planning and building the stages export the same forward (or a copy of it that shares its
    tensors) several times."""
    shapes = pytree.tree_map_only(torch.Tensor, lambda t: (tuple(t.shape), t.dtype), args)
    key = (type(module), tuple(id(p) for p in module.parameters()), train, called, repr(shapes))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    modes = {m: m.training for m in module.modules()}
    module.train(train)
    try:
        with no_cache(module), _stacks_as_loops(module), _no_stack_traces(), torch.random.fork_rng(devices=[]):
            with _training_reads(module, called) as reads, _calls(module, called) as calls:
                ep = torch.export.export(
                    module, args, strict=False, dynamic_shapes=dynamic, preserve_module_call_signature=called
                )
    finally:
        for m, mode in modes.items():
            m.training = mode
    _CACHE[key] = ep, bool(reads), sorted(name for name, n in calls.items() if n > 1)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return _CACHE[key]


@contextlib.contextmanager
def _calls(module: nn.Module, names: tuple[str, ...]) -> Iterator[dict[str, int]]:
    """Yields how many times each module of ``names`` is called while inside the ``with``."""
    counts = dict.fromkeys(names, 0)

    def counter(name: str) -> Callable[..., None]:
        def count(*_: Any) -> None:
            counts[name] += 1

        return count

    handles = [module.get_submodule(name).register_forward_pre_hook(counter(name)) for name in names]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


# where torch.export's own code reads training flags (a GraphModule takes its root's), outside the traced code
_EXPORT_MACHINERY = tuple(
    os.path.join(os.path.dirname(torch.__file__), d, "")
    for d in ("fx", "export", "_export", "_dynamo", "_functorch", "_subclasses", "_higher_order_ops")
)


@contextlib.contextmanager
def _training_reads(module: nn.Module, called: tuple[str, ...]) -> Iterator[list[str]]:
    """Yields a list that gathers, while ``module`` is exported, the modules whose ``training`` flag the traced code
    reads (``F.dropout(x, training=self.training)``, ``if self.training:``): a graph exported in one mode holds the
    other mode's computation too only where none was read. Reads by the code of a module in ``called`` (its
    ``forward``, a ``__call__`` of its own, what they call) do not count: such a module runs as written at every
    step, in the mode of the moment. A class that defines ``training`` itself cannot be watched and counts as
    read."""
    inside = {id(m) for name in called for m in module.get_submodule(name).modules()}
    depth = [0]  # how many called modules' forwards are running
    reads = [
        type(m).__name__
        for m in module.modules()
        if id(m) not in inside and any("training" in vars(c) for c in type(m).__mro__ if c is not nn.Module)
    ]

    def read(m: nn.Module) -> bool:
        reader = sys._getframe(1)
        if (
            depth[0] == 0
            and id(reader.f_locals.get("self")) not in inside
            and not reader.f_code.co_filename.startswith(_EXPORT_MACHINERY)
        ):
            reads.append(type(m).__name__)
        try:
            return vars(m)["training"]
        except KeyError:
            raise AttributeError(f"{type(m).__name__!r} object has no attribute 'training'") from None

    def write(m: nn.Module, value: bool) -> None:
        vars(m)["training"] = value

    def enter(*_: Any) -> None:
        depth[0] += 1

    def leave(*_: Any) -> None:
        depth[0] -= 1

    handles = []
    for name in called:
        m = module.get_submodule(name)
        handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True)]
    nn.Module.training = property(read, write)  # type: ignore[assignment] - over the flag each instance holds
    try:
        yield reads
    finally:
        del nn.Module.training
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Export without recording the Python stack of every node (nothing here reads it): a third of the time
    exporting takes."""
    config = getattr(torch.fx, "config", None)
    saved = getattr(config, "do_not_emit_stack_traces", None)
    if saved is None:
        yield
        return
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = saved


@contextlib.contextmanager
def _swap_fixed() -> Iterator[None]:
    """``torch.export``'s module swap, with three changes: a called module receives the constant arguments the export
    recorded (the swap passes ``None`` for every one: ``past_key_values_length=0``, ``output_attentions=False``);
    each value the module computed is replaced by the item of its result that the module returned it as (the swap
    takes them in the order the graph computes them, which hands a T5 block's position bias on as its hidden
    states); and the result of one module call is not handed to the next as it is when their flattened values match
    (a ``ModelOutput`` would reach a module that takes its first item): :func:`_folded` takes the containers
    apart instead."""
    construct, shortcut, deconstruct = (
        _swap._construct_inputs,
        _swap._remove_extraneous_pytrees,
        _swap._deconstruct_outputs,
    )

    def with_constants(gm: fx.GraphModule, signature: Any, node_name_map: dict[str, fx.Node]) -> Any:
        result = construct(gm, signature, node_name_map)
        unflatten = next(n for n in reversed(gm.graph.nodes) if n.target is pytree.tree_unflatten)
        leaves = list(unflatten.args[0])
        for i, argument in enumerate(signature.inputs):
            if isinstance(argument, ConstantArgument) and argument.value is not None:
                leaves[i] = argument.value
        unflatten.args = (leaves, *unflatten.args[1:])
        return result

    def as_returned(
        gm: fx.GraphModule, signature: Any, module_node: fx.Node, names: dict[str, fx.Node], computed: tuple
    ) -> None:
        returned = [getattr(argument, "name", None) for argument in signature.outputs]
        if any(node.name not in returned for node in computed):
            raise RuntimeError(f"a value computed inside {module_node.target} and used after it is not returned by it")
        from torch.export.unflatten import _generate_flatten_spec  # where the swap is (torch >= 2.5)

        flat = _generate_flatten_spec(gm, module_node, signature.out_spec)
        for node in computed:
            item = fx.Proxy(flat)[returned.index(node.name)].node
            node.replace_all_uses_with(item, propagate_meta=True)
            names[node.name] = item

    _swap._construct_inputs, _swap._remove_extraneous_pytrees = with_constants, lambda gm: None
    _swap._deconstruct_outputs = as_returned
    try:
        yield
    finally:
        _swap._construct_inputs, _swap._remove_extraneous_pytrees = construct, shortcut
        _swap._deconstruct_outputs = deconstruct


def _concrete(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor of ``t``'s shape and dtype on ``device``, its own storage: the export would take two arguments that
    are the same tensor (``labels`` being ``input_ids``) for one input."""
    return torch.zeros(t.shape, dtype=t.dtype, device=device)


def _called_whole(module: nn.Module, opened: set[str]) -> dict[str, nn.Module]:
    """The modules called from an opened module's forward without being opened themselves: the outermost modules
    outside ``opened``."""
    called = {}
    for name, m in module.named_modules():
        if not name or name in opened:
            continue
        parent = name.rpartition(".")[0]
        if parent in opened:
            called[name] = m
    return called


@contextlib.contextmanager
def _stacks_as_loops(module: nn.Module) -> Iterator[None]:
    """PyTorch's transformer stacks exported as the loops over their layers that :mod:`lightning_ddg.layer_stacks`
    gives ``torch.fx``: their own forward tests the mask's values (is it causal?), which the export cannot."""
    stacks = [m for m in module.modules() if isinstance(m, STACKS)]
    for m in stacks:
        m.forward = stack_forward(m)
    try:
        yield
    finally:
        for m in stacks:
            del m.forward


@contextlib.contextmanager
def no_cache(module: nn.Module) -> Iterator[None]:
    """Hugging Face models with their key/value cache off, as in training."""
    configs = {id(c): c for m in module.modules() if (c := getattr(m, "config", None)) is not None}
    saved = {k: c.use_cache for k, c in configs.items() if getattr(c, "use_cache", None)}
    for k in saved:
        configs[k].use_cache = False
    try:
        yield
    finally:
        for k, value in saved.items():
            configs[k].use_cache = value


def _leaf_paths(spec: pytree.TreeSpec) -> list[tuple[Any, ...]]:
    return [path for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(range(spec.num_leaves), spec))[0]]


def _at(graph: fx.Graph, node: fx.Node, path: tuple[Any, ...]) -> fx.Node:
    """Nodes that read the item at ``path`` of ``node``'s value."""
    for key in path:
        if isinstance(key, pytree.SequenceKey):
            node = graph.call_function(operator.getitem, (node, key.idx))
        elif isinstance(key, pytree.MappingKey):
            node = graph.call_function(operator.getitem, (node, key.key))
        elif isinstance(key, pytree.GetAttrKey):
            node = graph.call_function(getattr, (node, key.name))
        else:
            raise NotImplementedError(f"cannot read {key!r} of an exported value")
    return node


def _folded(gm: fx.GraphModule, in_spec: pytree.TreeSpec, parameters: list[inspect.Parameter]) -> fx.Graph:
    """``gm``'s graph with the pytree calls the export put around the forward and each called module resolved
    into plain item access, so that the items, not their containers, cross the cuts; the forward's own parameters
    as placeholders; module stacks as a ``torch.fx`` trace records them."""
    new = fx.Graph()
    env: dict[fx.Node, Any] = {}
    specs = {
        n: getattr(gm, str(n.target))
        for n in gm.graph.nodes
        if n.op == "get_attr" and str(n.target).startswith("_spec_")
    }
    old_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # the forward's arguments, and the leaves the export flattened them into
    leaves: list[fx.Node] = []
    args_spec = in_spec.children()[0]
    for p, placeholder, spec in zip(parameters, old_placeholders, args_spec.children(), strict=False):
        default = () if p.default is inspect.Parameter.empty else (p.default,)
        env[placeholder] = node = new.placeholder(
            p.name, default_value=default[0] if default else inspect.Signature.empty
        )
        leaves += [node] if spec.is_leaf() else [_at(new, node, path) for path in _leaf_paths(spec)]
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node in specs:
            continue
        function = node.target if node.op == "call_function" else None
        if function is pytree.tree_flatten and node.args[0] == tuple(old_placeholders):
            env[node] = (leaves, None)  # the flattening of the forward's arguments
            continue
        if function is operator.getitem and not isinstance(env[node.args[0]], fx.Node):
            env[node] = env[node.args[0]][node.args[1]]
            continue
        if function is pytree.tree_unflatten and node.args[1] in specs:
            items = [env[a] if isinstance(a, fx.Node) else a for a in node.args[0]]
            if all(u.op != "output" for u in node.users):
                env[node] = pytree.tree_unflatten(items, specs[node.args[1]])
                continue
        if function is fx_pytree.tree_flatten_spec and node.args[1] in specs:
            value = env[node.args[0]]
            env[node] = [_at(new, value, path) for path in _leaf_paths(specs[node.args[1]])]
            for item in env[node]:
                item.meta["nn_module_stack"] = {str(node.args[0].target): (str(node.args[0].target), None)}
            continue
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            continue
        copied = new.node_copy(node, lambda a: new.get_attr(str(a.target)) if a in specs else env[a])
        stack = node.meta.get("nn_module_stack") or {}
        copied.meta["nn_module_stack"] = {
            path: (path, kind) for path, kind in stack.values() if path and not path.startswith("_empty")
        }
        env[node] = copied
    return new


def _localize(graph: fx.Graph, local: Callable[[fx.Node], bool]) -> None:
    """Give every user of a ``local`` node (a parameter read, a size: a symbolic ``int``) its own copy, made right
    before it, so that a cut between the two is crossed by neither: a stage reads the parameters it uses, and a
    size is read off the tensor it belongs to where it is used."""
    for node in list(graph.nodes):
        if not local(node):
            continue
        for user in list(node.users):
            if local(user):
                continue
            copies: dict[fx.Node, fx.Node] = {}
            with graph.inserting_before(user):
                user.replace_input_with(node, _copy_local(graph, node, copies, local, user))
        if not node.users:
            graph.erase_node(node)


def place_devices(module: nn.Module, device: torch.device) -> None:
    """Make a stage's graph create its tensors on ``device``, where the stage runs. An export writes the device a
    tensor was on when it traced into its graph (``torch.arange(n, device=x.device)`` becomes ``device=cpu``, or
    ``meta`` for a model built on the meta device), and a stage may run elsewhere: a GPU, or the host once its
    tensors are real."""
    if not isinstance(module, fx.GraphModule):
        return

    def moves(value: Any) -> bool:
        return isinstance(value, torch.device) and value.type in ("meta", "cpu") and value != device

    placed = False
    for node in module.graph.nodes:  # aten.to.device takes it positionally, aten.arange as a keyword
        for i, value in enumerate(node.args):
            if moves(value):
                node.update_arg(i, device)
                placed = True
        if moves(node.kwargs.get("device")):
            node.update_kwarg("device", device)
            placed = True
    if placed:
        module.recompile()


def _sink(graph: fx.Graph) -> None:
    """Move every computation that draws no random numbers, calls no module and reads no item right before its
    first use.

    The export's graph comes out of a breadth-first reordering, which puts the start of one layer's computation
    (a reshape of the rotary embedding, say) among an earlier layer's nodes; placed where it is used, each
    module's computation is one run of nodes again, and a cut before a module falls before all of it.
    """
    for node in list(graph.nodes):
        # the export's checks of a tensor's dtype and device (from a `.float()`, say) are used by nothing, so they
        # would stay at the top with the parameters they read, where a cut before the layer would not take them
        if not node.users and is_export_metadata_check(node):
            graph.erase_node(node)
    for node in reversed(list(graph.nodes)):
        if node.op not in ("call_function", "call_method", "get_attr") or not node.users or _draws(node):
            continue
        if node.target in (operator.getitem, getattr):
            continue  # the items of an argument or of a module's result stay with it (partition.py hoists them)
        first = node.next
        while first not in node.users and first.op != "output":
            first = first.next
        if first is not node.next:
            first.prepend(node)


def _draws(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _is_size(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.meta.get("val"), _SCALARS)


def _copy_local(
    graph: fx.Graph, node: fx.Node, copies: dict[fx.Node, fx.Node], local: Callable[[fx.Node], bool], user: fx.Node
) -> fx.Node:
    if node not in copies:
        copies[node] = graph.node_copy(node, lambda a: _copy_local(graph, a, copies, local, user) if local(a) else a)
        copies[node].meta["nn_module_stack"] = dict(user.meta.get("nn_module_stack") or {})
    return copies[node]
