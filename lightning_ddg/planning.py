"""Planning a split: where to cut a model into stages, and what each stage then costs.

:func:`plan` traces the forward (:mod:`lightning_ddg.partition`), measures what each run between two candidate
cuts costs (:mod:`lightning_ddg.balance`), and picks the cuts that make the slowest stage as fast as possible,
with fewer bytes crossing the cuts breaking ties. It trains nothing and leaves the module as it was: the same
weights, BatchNorm statistics and random number generator state. :class:`DDGStrategy` plans every fit this way
and prints the plan; call it yourself to inspect a split before training.

Example::

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10))
    >>> p = plan(model, torch.randn(32, 64), num_stages=2, balance_by="params")
    >>> p.split_points
    ['1']
    >>> [stage.parameters for stage in p.stages]
    [16640, 68362]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from lightning_ddg.balance import BALANCE_BY, BalanceBy, run_segments, segment_flops, segment_times, solve
from lightning_ddg.partition import (
    WHOLE_KEY,
    _body,
    _candidate_cuts,
    _cut_index,
    _module_paths,
    _stage_graphs,
    split_module,
    trace,
)

__all__ = ["Plan", "StagePlan", "plan", "balanced_split_points", "IMBALANCE_WARNING"]

IMBALANCE_WARNING = 1.25  # the slowest stage's cost over the mean above which a plan is called unbalanced
_TIE_TOLERANCE = {"time": 0.02, "flops": 0.0, "params": 0.0}  # timings within 2% count as equal
_UNITS = {"time": "ms", "flops": "GFLOP", "params": "params"}
_REFINEMENTS = 2  # re-solves of a time split with its stages timed whole
_WHOLE_STAGE_REPEATS = 5  # a stage timed whole counts its fastest run: cuts compared on these differ by a few %


@dataclass
class StagePlan:
    """One stage of a :class:`Plan`.

    ``modules`` are the outermost modules the stage runs (a module cut in two is named in both stages);
    ``cost`` is in the plan's unit (milliseconds of forward + backward, GFLOP, or parameters);
    ``bytes_out`` is what the stage sends to the next one per batch of the example input (the same volume of
    gradients comes back).
    """

    index: int
    begins_at: str | None
    modules: list[str]
    parameters: int
    cost: float
    cost_share: float
    bytes_out: int | None


@dataclass
class Plan:
    """The stages of a split, with what each costs. ``str(plan)`` is a table."""

    split_points: list[str]
    stages: list[StagePlan]
    balance_by: BalanceBy
    note: str | None = None  # why the cost measure asked for was not used
    whole_modules: list[str] = field(default_factory=list)  # kept whole: their forward could not be traced

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def imbalance(self) -> float:
        """The slowest stage's cost over the mean stage cost: 1.0 is perfectly balanced."""
        costs = [s.cost for s in self.stages]
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """Flat values for a logger's hyperparameters."""
        out: dict[str, Any] = {
            "ddg/split_points": ", ".join(self.split_points),
            "ddg/balance_by": self.balance_by,
            "ddg/imbalance": round(self.imbalance, 3),
        }
        for s in self.stages:
            out[f"ddg/stage{s.index}/modules"] = _span(s.modules)
            out[f"ddg/stage{s.index}/parameters"] = s.parameters
            out[f"ddg/stage{s.index}/cost_share"] = round(s.cost_share, 4)
            if s.bytes_out is not None:
                out[f"ddg/stage{s.index}/bytes_out"] = s.bytes_out
        return out

    def __str__(self) -> str:
        unit = _UNITS[self.balance_by]
        header = ["stage", "begins at", "modules", "params", f"cost ({self.balance_by})", "share", "sends/batch"]
        rows = [
            [
                str(s.index),
                s.begins_at or "(input)",
                _span(s.modules),
                _count(s.parameters),
                f"{s.cost:.3g} {unit}" if self.balance_by != "params" else _count(int(s.cost)),
                f"{100 * s.cost_share:.1f}%",
                _megabytes(s.bytes_out) if s.index < self.num_stages - 1 else "-",
            ]
            for s in self.stages
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"slowest stage: {self.imbalance:.2f}x the mean")
        if self.note:
            lines.append(self.note)
        if self.whole_modules:
            lines.append(f"kept whole (forward not traceable): {', '.join(self.whole_modules)}")
        return "\n".join(lines)


def plan(
    module: nn.Module,
    example_input: Any = None,
    num_stages: int | None = None,
    *,
    split_points: Sequence[str] | None = None,
    balance_by: BalanceBy = "time",
    device: torch.device | str | None = None,
) -> Plan:
    """Choose where to cut ``module.forward`` into ``num_stages`` stages, or describe the cut ``split_points``.

    Args:
        module: the module to cut (a LightningModule works: names are relative to it), in train mode or not.
        example_input: one batch of what ``forward`` takes: a tensor, or a tuple of positional arguments.
            Needed to measure time and FLOPs and the bytes crossing each cut; without it, costs are parameter
            counts.
        num_stages: how many stages to cut into; omit it when giving ``split_points``.
        split_points: describe this split instead of choosing one.
        balance_by: ``"time"`` (forward + backward timed on ``device``), ``"flops"`` or ``"params"``. Where time
            cannot be measured the plan falls back to FLOPs, then to parameter counts, and says so in ``note``.
        device: where to time the stages; by default where the module's parameters are.
    """
    if balance_by not in BALANCE_BY:
        raise ValueError(f"balance_by={balance_by!r} is not one of {BALANCE_BY}")
    if (num_stages is None) == (split_points is None):
        raise ValueError("give either num_stages (to choose a split) or split_points (to describe one)")
    args = () if example_input is None else example_input if isinstance(example_input, tuple) else (example_input,)
    gm = trace(module, train=True)
    body = _body(gm.graph)
    candidates = _candidate_cuts(body)
    wanted = num_stages if num_stages is not None else len(split_points) + 1  # type: ignore[arg-type]
    if len(candidates) < wanted - 1:
        raise ValueError(
            f"the forward offers {len(candidates) + 1} possible stages, fewer than the {wanted} requested: "
            "use fewer devices."
        )
    names = dict(candidates)
    if split_points is not None:  # a given cut may fall where no candidate is (a module's second call, say)
        split_module(module, split_points)  # the errors for names that cannot cut, in forward order
        known = [n for n, _ in module.named_modules() if n]
        names |= {_cut_index(body, name, known): name for name in split_points}
    positions = sorted(names)
    segments = _stage_graphs(gm, positions)

    where = torch.device(device) if device is not None else _device_of(module)
    costs, used, note, cut_bytes = _costs(module, segments, args, balance_by, where)
    if cut_bytes is None:  # without an input, the number of values crossing stands in for their size
        cut_bytes = [float(_placeholders(s)) for s in segments[1:]]
    if split_points is None:
        starts = solve(costs, cut_bytes, wanted, _TIE_TOLERANCE[used])
        if used == "time" and wanted > 1:
            with _untouched(module):
                starts, costs = _refined(gm, module, positions, starts, costs, cut_bytes, args, where)
        split_points = [names[positions[s - 1]] for s in starts]
    else:
        split_points = list(split_points)
        starts = [positions.index(index) + 1 for index, name in names.items() if name in split_points]
        starts.sort()
    return _describe(gm, body, positions, starts, split_points, costs, cut_bytes, used, note, args)


def _refined(
    gm: Any,
    module: nn.Module,
    positions: list[int],
    starts: list[int],
    costs: list[float],
    cut_bytes: list[float],
    args: tuple,
    where: torch.device,
) -> tuple[list[int], list[float]]:
    """Check a cut chosen from segment timings against its stages timed whole, and move it where those say.

    Segments timed one by one do not add up to the stage they form (each pays for a backward of its own, with
    cache and allocator effects of its own): scaling each stage's segments to the stage's measured time and
    solving again moves the cut, until a cut repeats. The cut whose slowest stage measured fastest is kept,
    with the segment costs scaled so that each of its stages costs what it measured.
    """
    measured: dict[tuple[int, ...], tuple[float, list[float]]] = {}
    for _ in range(1 + _REFINEMENTS):
        key = tuple(starts)
        if key in measured:
            break
        stages = _stage_graphs(gm, [positions[s - 1] for s in starts])
        inputs = run_segments(stages, args, where)
        times = [1000 * t for t in segment_times(stages, inputs, where, repeats=_WHOLE_STAGE_REPEATS)]
        bounds = [0, *starts, len(costs)]
        scaled = list(costs)
        for k, stage_time in enumerate(times):
            total = sum(costs[bounds[k] : bounds[k + 1]])
            for i in range(bounds[k], bounds[k + 1]):
                scaled[i] = costs[i] * stage_time / total if total > 0 else stage_time / (bounds[k + 1] - bounds[k])
        measured[key] = (max(times), scaled)
        starts = solve(scaled, cut_bytes, len(starts) + 1, _TIE_TOLERANCE["time"])
    best = min(measured, key=lambda key: measured[key][0])
    return list(best), measured[best][1]


def balanced_split_points(module: nn.Module, num_stages: int, example_input: Any = None) -> list[str]:
    """Split points for ``num_stages`` stages of about equal parameter count: deterministic, no timing."""
    return plan(module, example_input, num_stages, balance_by="params").split_points


def _placeholders(segment: nn.Module) -> int:
    return sum(1 for n in segment.graph.nodes if n.op == "placeholder")


def _costs(
    module: nn.Module,
    segments: list[nn.Module],
    args: tuple,
    balance_by: BalanceBy,
    where: torch.device,
) -> tuple[list[float], BalanceBy, str | None, list[float] | None]:
    """Segment costs by ``balance_by``, falling back to FLOPs and then parameters where that fails; with an
    input, also the bytes crossing each candidate cut."""
    params = _segment_parameters(segments)
    if not args:
        note = None if balance_by == "params" else f"balanced by params: no example input to measure {balance_by}"
        return [float(p) for p in params], "params", note, None
    note = None
    with _untouched(module):
        try:
            inputs = run_segments(segments, args, where)
        except Exception as err:  # noqa: BLE001 - any failure to run the example leaves parameter counts
            return [float(p) for p in params], "params", f"balanced by params: the example input failed ({err})", None
        cut_bytes = [float(_bytes(x)) for x in inputs[1:]]
        order = list(BALANCE_BY[BALANCE_BY.index(balance_by) :])
        for measure in order[:-1]:
            try:
                if measure == "time":
                    costs = [1000 * t for t in segment_times(segments, inputs, where)]
                else:
                    costs = [f / 1e9 for f in segment_flops(segments, inputs, where)]
                return costs, measure, note, cut_bytes  # type: ignore[return-value]
            except Exception as err:  # noqa: BLE001 - fall back to the next measure
                note = f"balanced by {order[order.index(measure) + 1]}: measuring {measure} failed ({err})"
    return [float(p) for p in params], "params", note, cut_bytes


def _describe(
    gm: Any,
    body: list,
    positions: list[int],
    starts: list[int],
    split_points: list[str],
    costs: list[float],
    cut_bytes: list[float],
    balance_by: BalanceBy,
    note: str | None,
    args: tuple,
) -> Plan:
    bounds = [0, *starts, len(costs)]
    node_bounds = [0, *positions, len(body)]
    stage_of_node = {}
    for k in range(len(bounds) - 1):
        for node in body[node_bounds[bounds[k]] : node_bounds[bounds[k + 1]]]:
            stage_of_node[node] = k
    total = sum(costs) or 1.0
    stage_params = _stage_parameters(gm, body, stage_of_node, len(bounds) - 1)
    stages = []
    for k in range(len(bounds) - 1):
        cost = sum(costs[bounds[k] : bounds[k + 1]])
        sent = int(cut_bytes[bounds[k + 1] - 1]) if k < len(bounds) - 2 and args else None
        stages.append(
            StagePlan(
                index=k,
                begins_at=split_points[k - 1] if k else None,
                modules=_outermost_modules(body, stage_of_node, k),
                parameters=stage_params[k],
                cost=cost,
                cost_share=cost / total,
                bytes_out=sent,
            )
        )
    return Plan(split_points, stages, balance_by, note, list(gm.meta.get(WHOLE_KEY, [])))


def _segment_parameters(segments: list[nn.Module]) -> list[int]:
    seen: set[int] = set()
    counts = []
    for segment in segments:
        fresh = [p for p in segment.parameters() if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        counts.append(sum(p.numel() for p in fresh))
    return counts


def _stage_parameters(gm: Any, body: list, stage_of_node: dict, num_stages: int) -> list[int]:
    counts, seen = [0] * num_stages, set()
    for node in body:
        if node.op == "call_module":
            params = list(gm.get_submodule(str(node.target)).parameters())
        elif node.op == "get_attr":
            params = [p for name, p in gm.named_parameters() if name == str(node.target)]
        else:
            continue
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                counts[stage_of_node[node]] += p.numel()
    return counts


def _outermost_modules(body: list, stage_of_node: dict, k: int) -> list[str]:
    """The outermost modules that stage ``k`` runs whole, in forward order (a module cut in two is named by
    its parts on each side)."""
    stages_of: dict[str, set[int]] = {}
    for node in body:
        for path in _module_paths(node):
            stages_of.setdefault(path, set()).add(stage_of_node[node])
    names: list[str] = []
    for node in body:
        if stage_of_node[node] != k:
            continue
        whole = [p for p in _module_paths(node) if p and stages_of[p] == {k}]
        if whole and whole[0] not in names:  # glue code of a module that spans stages names nothing
            names.append(whole[0])
    return names


def _bytes(values: Any) -> int:
    leaves, _ = tree_flatten(values)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextlib.contextmanager
def _untouched(module: nn.Module) -> Iterator[None]:
    """Leave the buffers (BatchNorm statistics) and the RNG state as they were."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def _span(modules: list[str]) -> str:
    if len(modules) <= 2:
        return ", ".join(modules)
    return f"{modules[0]} … {modules[-1]} ({len(modules)})"


def _count(n: int) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def _megabytes(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.2f} MB"
