"""Cutting a module's ``forward`` into pipeline stages.

The forward is traced symbolically with :mod:`torch.fx`; a *cut* is the name of a module that begins a new
stage (the ``SplitPoint.BEGINNING`` convention of ``torch.distributed.pipelining``). Every value defined
before a cut and used after it crosses the cut, so skip connections are carried through intermediate
stages. Stage modules are ``GraphModule`` s built on the original module: they call the original leaf
modules and hold the original ``Parameter`` objects under their original names.

Tracing happens once per mode (train and eval), because a traced graph bakes in Python branches on
``self.training`` (``F.dropout(x, training=self.training)`` in a custom block, say). Both graphs share
every parameter and buffer; leaf modules such as ``BatchNorm`` keep following ``train()``/``eval()``.

Example::

    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> stages = split_module(model, split_points=["2"]).train
    >>> [list(dict(s.named_parameters())) for s in stages]
    [['0.weight', '0.bias'], ['2.weight', '2.bias']]
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

__all__ = ["Partition", "split_module", "balance_to_split_points", "balanced_split_points"]

CUT_KEY = "lightning_ddg_cut"  # in a stage's ``meta``: the name of the module that begins the next stage


@dataclass
class Partition:
    """The stages of one module, traced in train and in eval mode.

    ``train[k]`` and ``eval[k]`` are stage ``k``'s module for each mode; ``split_points[k-1]`` names the
    module that begins stage ``k``.
    """

    split_points: list[str]
    train: list[nn.Module]
    eval: list[nn.Module]

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


def trace(module: nn.Module, train: bool = True) -> fx.GraphModule:
    """Symbolically trace ``module.forward`` in train or eval mode, leaving the module's modes as they were."""
    modes = {m: m.training for m in module.modules()}
    module.train(train)
    try:
        graph = fx.Tracer().trace(module)
    except Exception as err:  # noqa: BLE001 - any tracing failure gets the same advice
        raise RuntimeError(
            f"lightning-ddg could not trace the forward of {type(module).__name__} with torch.fx: {err}\n"
            "Cutting a model into stages needs a forward without Python control flow on tensor values. Move such "
            "code out of `forward` (into `training_step`), or run with a single stage (devices=1)."
        ) from err
    finally:
        for m, mode in modes.items():
            m.training = mode
    return fx.GraphModule(module, graph)


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()]
    if node.op == "call_module":
        paths.append(str(node.target))
    return paths


def _body(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op not in ("placeholder", "output")]


def _cut_index(body: list[fx.Node], name: str, known: Sequence[str]) -> int:
    for i, node in enumerate(body):
        paths = _module_paths(node)
        if name in paths or (node.op == "get_attr" and str(node.target).startswith(name + ".")):
            return i
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean one of {close}?" if close else ""
    raise ValueError(
        f"split point {name!r} is not a module called in forward.{hint} Split points are fully qualified module "
        "names as in `model.named_modules()`, for example 'model.layer3'."
    )


def _stage_graphs(gm: fx.GraphModule, cuts: list[int], root: nn.Module) -> list[fx.GraphModule]:
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
        for v in inputs:
            env[v] = new.placeholder(v.name)
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


def _check_disjoint(stages: list[nn.Module]) -> None:
    owner: dict[int, tuple[int, str]] = {}
    for k, stage in enumerate(stages):
        for name, p in stage.named_parameters():
            if id(p) in owner and owner[id(p)][0] != k:
                j, other = owner[id(p)]
                raise ValueError(
                    f"parameter {name!r} is used by stage {j} ({other}) and stage {k}: a module whose weights are "
                    "shared across stages cannot be split there. Choose split points that keep it in one stage."
                )
            owner[id(p)] = (k, name)


def split_module(
    module: nn.Module,
    split_points: Sequence[str] | None = None,
    num_stages: int | None = None,
) -> Partition:
    """Cut ``module.forward`` into stages.

    Args:
        module: the module to cut (a ``LightningModule`` works: names are relative to it).
        split_points: names of the modules that begin a new stage, in forward order.
        num_stages: with no ``split_points``, cut into this many stages of about equal parameter count.
    """
    if split_points is None:
        if num_stages is None:
            raise ValueError("give split_points or num_stages")
        if num_stages == 1:
            whole = _WholeForward(module, module.forward)
            return Partition([], [whole], [whole])
        split_points = balanced_split_points(module, num_stages)
    split_points = list(split_points)
    if num_stages is not None and len(split_points) != num_stages - 1:
        raise ValueError(
            f"{len(split_points)} split points make {len(split_points) + 1} stages, but {num_stages} devices were "
            f"requested: give devices={len(split_points) + 1} or {num_stages - 1} split points."
        )
    if not split_points:
        whole = _WholeForward(module, module.forward)
        return Partition([], [whole], [whole])

    known = [name for name, _ in module.named_modules() if name]
    result = {}
    for mode in (True, False):
        gm = trace(module, train=mode)
        body = _body(gm.graph)
        cuts = [_cut_index(body, name, known) for name in split_points]
        if any(b <= a for a, b in zip([-1, *cuts], cuts, strict=False)) or cuts[0] == 0:
            raise ValueError(
                f"split points {split_points} must name modules in the order forward calls them, each after "
                "some computation of the stage before it."
            )
        result[mode] = _stage_graphs(gm, cuts, module)
        for stage, name in zip(result[mode], split_points, strict=False):
            stage.meta[CUT_KEY] = name  # for errors about the values crossing this cut
    _check_disjoint(result[True])
    return Partition(split_points, result[True], result[False])


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


def balanced_split_points(module: nn.Module, num_stages: int) -> list[str]:
    """Split points that give ``num_stages`` stages of about equal parameter count.

    Cuts are placed at module boundaries at any depth; the split minimises the largest stage.
    """
    gm = trace(module, train=True)
    body = _body(gm.graph)
    seen: set[int] = set()
    cost = []
    for node in body:
        params: list[torch.Tensor] = []
        if node.op == "call_module":
            params = list(gm.get_submodule(str(node.target)).parameters())
        elif node.op == "get_attr":
            target = gm.get_parameter(str(node.target)) if _is_parameter(gm, str(node.target)) else None
            params = [target] if target is not None else []
        fresh = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        cost.append(sum(p.numel() for p in fresh))
    candidates = _candidate_cuts(body)
    if len(candidates) < num_stages - 1:
        raise ValueError(
            f"the forward offers {len(candidates) + 1} possible stages, fewer than the {num_stages} requested: "
            "use fewer devices."
        )
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    positions = [0] + [i for i, _ in candidates] + [len(body)]
    n = len(positions)
    inf = float("inf")
    # best[s][j]: smallest largest-stage cost covering body[:positions[j]] with s stages
    best = [[inf] * n for _ in range(num_stages + 1)]
    choice = [[-1] * n for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for j in range(1, n):
            for i in range(j):
                if best[s - 1][i] == inf:
                    continue
                value = max(best[s - 1][i], prefix[positions[j]] - prefix[positions[i]])
                if value < best[s][j]:
                    best[s][j], choice[s][j] = value, i
    cuts, j = [], n - 1
    for s in range(num_stages, 0, -1):
        i = choice[s][j]
        if s > 1:
            cuts.append(i)
        j = i
    names = {i: name for i, name in candidates}
    return [names[positions[i]] for i in sorted(cuts)]


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


def _is_parameter(module: nn.Module, target: str) -> bool:
    try:
        module.get_parameter(target)
    except AttributeError:
        return False
    return True
