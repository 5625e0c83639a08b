"""Planning a split: where to cut a model into stages, and what each stage then costs.

:func:`plan` traces the forward (:mod:`lightning_ddg.partition`), measures what each run between two candidate
cuts costs (:mod:`lightning_ddg.balance`), and picks the cuts that make the slowest stage as fast as possible,
with fewer bytes crossing the cuts breaking ties. It never picks a cut that a value other than a tensor would
cross, and prefers cuts that open no module whose Python a trace would freeze (:mod:`lightning_ddg.opening`),
warning where it cannot. Before it returns, it runs the split model once on the example input and compares it
with the unsplit forward. It trains nothing and leaves the module as it was: the same weights, BatchNorm
statistics, Python attributes and random number generator states. :class:`DDGStrategy` plans every fit this way
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
import dataclasses
import pickle
import random
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_ddg._compat import buffer_table, tree_flatten
from lightning_ddg.balance import (
    BALANCE_BY,
    BalanceBy,
    _on,
    _to,
    run_segments,
    segment_flops,
    segment_times,
    solve_stages,
)
from lightning_ddg.checks import check_not_compiled, crossing_values
from lightning_ddg.comm import crosses
from lightning_ddg.exporting import REPEATED_KEY, example_spec, no_cache, with_repeated
from lightning_ddg.opening import Frozen, frozen_python, opened_by
from lightning_ddg.partition import (
    EXPORTED_KEY,
    WHOLE_KEY,
    _body,
    _candidate_cuts,
    _cut_index,
    _module_paths,
    _outermost_at,
    _shadow,
    _stage_graphs,
    split_module,
    trace,
    trace_for_cuts,
)
from lightning_ddg.schedule import delay
from lightning_ddg.stage_memory import SegmentMemory, segment_memory, stage_memory
from lightning_ddg.stats import slowest_over_mean

__all__ = [
    "Pieces",
    "Plan",
    "StagePlan",
    "plan",
    "check_split",
    "balanced_split_points",
    "IMBALANCE_WARNING",
    "rebalanced",
    "replanned",
    "better_cut",
    "AS_WRITTEN_TOLERANCE",
]

IMBALANCE_WARNING = 1.25  # the slowest stage's cost over the mean above which a plan is called unbalanced
AS_WRITTEN_TOLERANCE = IMBALANCE_WARNING - 1  # how much slower a slowest stage may be to leave modules as written
_TIE_TOLERANCE = {"time": 0.02, "flops": 0.0, "params": 0.0, "memory": 0.0}  # timings within 2% count as equal
_UNITS = {"time": "ms", "flops": "GFLOP", "params": "params", "memory": "MiB"}
_MIB = 2**20
_INF = float("inf")
MEMORY_TIE_TOLERANCE = 0.1  # among equally fast cuts, those whose largest stage holds within 10% of the least
_REFINEMENTS = 2  # re-solves of a time split with its stages timed whole
_WHOLE_STAGE_REPEATS = 5  # a stage timed whole counts its second fastest run: cuts compared on these differ by a few %


@dataclass
class StagePlan:
    """One stage of a :class:`Plan`.

    ``modules`` are the outermost modules the stage runs (a module cut in two is named in both stages);
    ``cost`` is in the plan's unit (milliseconds of forward + backward, GFLOP, parameters, or MiB held);
    ``bytes_out`` is what the stage sends to the next one per batch of the example input (the same volume of
    gradients comes back); ``holds`` is what the stage will hold in memory, in bytes, by the formula of
    :func:`lightning_ddg.stage_memory.stage_memory` (its parameters, gradients, optimizer state, weight copies and
    the activations of its in-flight batches; without an example input, no activations).
    """

    index: int
    begins_at: str | None
    modules: list[str]
    parameters: int
    cost: float
    cost_share: float
    bytes_out: int | None
    holds: int | None = None


@dataclass
class Pieces:
    """The pieces of a model that a plan's cuts were chosen among, for cutting it anew on the times a pipeline
    measured (:func:`rebalanced`): where each piece after the first begins (a candidate split point), what each
    costs in the plan's unit, the first piece of every stage after the first, and the first stage's loading time
    (``Plan.loading_ms``). Plain values: a checkpoint keeps them."""

    cuts: list[str]
    costs: list[float]
    stage_starts: list[int]
    loading_ms: float = 0.0

    def stage_costs(self, starts: Sequence[int]) -> list[float]:
        """What each stage costs when the stages begin at pieces ``starts`` (the first one at piece 0)."""
        bounds = [0, *starts, len(self.costs)]
        return [
            sum(self.costs[i:j]) + (self.loading_ms if k == 0 else 0.0)
            for k, (i, j) in enumerate(zip(bounds, bounds[1:], strict=False))
        ]


@dataclass
class Plan:
    """The stages of a split, with what each costs. ``str(plan)`` is a table."""

    split_points: list[str]
    stages: list[StagePlan]
    balance_by: BalanceBy
    note: str | None = None  # why the cost measure asked for was not used
    whole_modules: list[str] = field(default_factory=list)  # kept whole: their forward could not be traced
    opened_modules: list[str] = field(default_factory=list)  # traced into for the cuts; every other one is called
    # the example input's shapes and dtypes (meta tensors), with which every rank opens what torch.fx cannot
    example_input: tuple | None = field(default=None, repr=False, compare=False)
    exported: bool = False  # opened with torch.export: split_module(..., opened=opened_modules) exports only the stages
    # the example input ran through the pieces between the cuts, off the meta device: check_split can run the split
    example_runs: bool = field(default=False, repr=False, compare=False)
    loading_ms: float = 0.0  # per batch, in the first stage's cost: loading it outside the model
    pieces: Pieces | None = field(default=None, repr=False, compare=False)  # what the cuts were chosen among

    def __getstate__(self) -> dict[str, Any]:
        # the example's meta tensors as bytes: the pickler of torch.multiprocessing, which sends a strategy that holds
        # its plan to spawned stages, would try to share them through file descriptors (torch 2.4 raises)
        return self.__dict__ | {"example_input": pickle.dumps(self.example_input)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state | {"example_input": pickle.loads(state["example_input"])})

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def imbalance(self) -> float:
        """The slowest stage's cost over the mean stage cost: 1.0 is perfectly balanced."""
        return slowest_over_mean([s.cost for s in self.stages])

    def to_dict(self) -> dict[str, Any]:
        """Flat values for a logger's hyperparameters."""
        out: dict[str, Any] = {
            "ddg/split_points": ", ".join(self.split_points),
            "ddg/balance_by": self.balance_by,
            "ddg/imbalance": round(self.imbalance, 3),
            "ddg/opened": ", ".join(self.opened_modules),
        }
        if self.loading_ms:
            out["ddg/stage0/loading_ms"] = round(self.loading_ms, 3)
        for s in self.stages:
            out[f"ddg/stage{s.index}/modules"] = _span(s.modules)
            out[f"ddg/stage{s.index}/parameters"] = s.parameters
            out[f"ddg/stage{s.index}/cost_share"] = round(s.cost_share, 4)
            if s.bytes_out is not None:
                out[f"ddg/stage{s.index}/bytes_out"] = s.bytes_out
            if s.holds is not None:
                out[f"ddg/stage{s.index}/holds_bytes"] = s.holds
        return out

    def _cost(self, s: StagePlan) -> str:
        if self.balance_by == "params":
            return _count(int(s.cost))
        if self.balance_by == "memory":
            return _size(s.holds)
        return f"{s.cost:.3g} {_UNITS[self.balance_by]}"

    def __str__(self) -> str:
        header = ["stage", "begins at", "modules", "params", f"cost ({self.balance_by})", "share", "sends/batch"]
        header.append("holds")
        rows = [
            [
                str(s.index),
                s.begins_at or "(input)",
                _span(s.modules),
                _count(s.parameters),
                self._cost(s),
                f"{100 * s.cost_share:.1f}%",
                _megabytes(s.bytes_out) if s.index < self.num_stages - 1 else "-",
                _size(s.holds),
            ]
            for s in self.stages
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{'largest' if self.balance_by == 'memory' else 'slowest'} stage: {self.imbalance:.2f}x the mean")
        if self.note:
            lines.append(self.note)
        if self.loading_ms:
            lines.append(f"stage 0's cost includes {self.loading_ms:.3g} ms per batch of loading it")
        if self.opened_modules:
            lines.append(f"opened for the cuts (traced, not called): {', '.join(self.opened_modules)}")
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
    memory: str = "stash",
    optimizer_states: float = 2.0,
    loading_ms: float = 0.0,
    check: bool = True,
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
            ``"memory"``: the cut makes the largest stage as small as possible in memory instead (each stage's
            ``holds``), for a model that fits its devices only so; the stages' compute is then not balanced.
        device: where to time the stages; by default where the module's parameters are. On the meta device (a
            model built without its weights) time cannot be measured: ``"time"`` balances by FLOPs instead.
        memory: the memory mode the stages will run in (``DDGStrategy(memory=...)``), for what they hold.
        optimizer_states: the optimizer's state per parameter, in parameter sizes, for what the stages hold:
            2 for Adam and AdamW, 1 for SGD with momentum, 0 for plain SGD.
        loading_ms: milliseconds per batch that the first stage spends loading it, outside the model (the data
            loader's work when it runs in the training process): by time, the first stage's cost includes it, so
            that a loader that decodes and augments moves layers off the first stage.
        check: run the split once on the example input before returning (:func:`check_split`); ``False`` leaves
            that to the caller, who may hand the plan on first.
    """
    if balance_by not in BALANCE_BY:
        raise ValueError(f"balance_by={balance_by!r} is not one of {BALANCE_BY}")
    if (num_stages is None) == (split_points is None):
        raise ValueError("give either num_stages (to choose a split) or split_points (to describe one)")
    check_not_compiled(module)
    args = () if example_input is None else example_input if isinstance(example_input, tuple) else (example_input,)
    example = args or None  # opens, by torch.export, the modules torch.fx cannot trace
    if split_points is None:
        gm = trace(module, train=True, example_input=example)
    else:
        gm = trace_for_cuts(module, split_points, train=True, example_input=example)
    body = _body(gm.graph)
    candidates = _candidate_cuts(body)
    wanted = num_stages if num_stages is not None else len(split_points) + 1  # type: ignore[arg-type]
    if len(candidates) < wanted - 1:
        raise ValueError(
            f"the forward offers {len(candidates) + 1} possible stages, fewer than the {wanted} requested: "
            "use fewer devices."
        )
    names = dict(candidates)
    given: dict[int, str] = {}
    if split_points is not None:  # a given cut may fall where no candidate is (a module's second call, say)
        split_module(module, split_points, example_input=example)  # the errors for names that cannot cut
        known = [n for n, _ in module.named_modules() if n]
        given = {_cut_index(body, name, known): name for name in split_points}
        names |= given
    positions = sorted(names)
    where = torch.device(device) if device is not None else _device_of(module)
    on_meta = where.type == "meta"  # a model built without data: its pieces run on shapes alone
    timed_on_meta = on_meta and balance_by == "time"
    if timed_on_meta:
        balance_by = "flops"

    # a cut that a value which cannot be sent would cross cannot run: never chosen, refused when given
    crossing, example_runs = _uncrossable(gm, positions, module, args, where)
    for index, name in given.items():
        if index in crossing:
            value, kind = crossing[index]
            k = list(split_points).index(name)  # type: ignore[arg-type]
            raise TypeError(
                f"{value!r} is computed before the cut at {name!r} and used after it, so it would cross from stage "
                f"{k} to stage {k + 1}; it is {kind}, but only tensors, None and Python numbers can cross between "
                "stages. Choose a split point that this value does not cross, or compute it after the cut."
            )
    if not given:
        positions = [index for index in positions if index not in crossing]
        if len(positions) < wanted - 1:
            raise ValueError(
                f"the forward offers {len(positions) + 1} possible stages with only values that can be sent crossing "
                f"between them, fewer than the {wanted} requested: use fewer devices."
            )
    begins = {index: _outermost_at(body, index) or names[index] for index in positions}
    frozen = _FrozenOpened(module)

    segments = _stage_graphs(gm, positions)
    holding = sum(1 for count in _segment_parameters(segments) if count > 0)
    if split_points is None and holding < wanted:  # a stage without parameters would have nothing to train
        raise ValueError(
            f"the forward offers {holding} piece(s) that hold parameters, fewer than the {wanted} stages requested, "
            f"so some stage would have nothing to train: use at most {max(holding, 1)} devices."
        )
    by_memory = balance_by == "memory"
    values, used, note, cut_bytes = _costs(module, segments, args, "params" if by_memory else balance_by, where)
    if timed_on_meta and note is None and used == "flops":
        note = "balanced by flops: the model is on the meta device, where time cannot be measured"
    held, unmeasured = _held(module, segments, args, where)
    if by_memory:
        used = "memory"
        note = f"balanced by memory without the activations: {unmeasured}" if unmeasured else None
    loading = loading_ms if used == "time" else 0.0  # milliseconds add to nothing but time
    costs = _Costs(values, held, by_memory, wanted, memory, optimizer_states, loading)
    if cut_bytes is None:  # without an input, the number of values crossing stands in for their size
        cut_bytes = [float(_placeholders(s)) for s in segments[1:]]
    if split_points is None:
        # preferred cuts, most preferred first: opening no module whose Python a trace would freeze; and, in an
        # exported model, opening no layer (a layer that holds a cut runs as recorded operations)
        preferred = [[not frozen.opened_by(begins[index]) for index in positions]]
        if gm.meta.get(EXPORTED_KEY):
            layers = _layers(module)
            between = [not layers.intersection(opened_by(begins[index])) for index in positions]
            # a cut inside a layer is taken where the cuts between layers cannot balance the stages
            preferred = [[a and b for a, b in zip(preferred[0], between, strict=True)], preferred[0], between]
        for as_written in preferred:
            balanced = len(preferred) > 1
            chosen = _as_written(positions, costs, cut_bytes, wanted, used, as_written, balanced)
            if len(chosen[0]) < len(positions) or all(as_written):
                break
        positions, costs, cut_bytes, starts = chosen
        if used == "time" and wanted > 1:
            with _untouched(module):
                starts, scaled = _refined(gm, module, positions, starts, costs, cut_bytes, args, where)
            costs = costs.with_values(scaled)
        split_points = [names[positions[s - 1]] for s in starts]
    else:
        split_points = list(split_points)
        starts = [positions.index(index) + 1 for index, name in names.items() if name in split_points]
        starts.sort()
    opened_set = {m for s in starts for m in opened_by(begins[positions[s - 1]])}
    exported = bool(gm.meta.get(EXPORTED_KEY))
    if exported:  # a module the forward calls twice cannot be kept whole by torch.export: it is traced into too
        opened_set = with_repeated(module, opened_set | {""}, gm.meta.get(REPEATED_KEY, ()))
    opened = sorted(opened_set - {""})
    found = frozen.opened_by("") + [f for m in opened for f in frozen.of(m)]
    if found:
        warnings.warn(_frozen_warning(found, split_points, begins, positions, starts), stacklevel=2)
    described = _describe(gm, body, positions, starts, split_points, costs, cut_bytes, used, note, args, opened)
    described.loading_ms = loading
    described.example_input = example_spec(args) if args else None
    described.exported = exported
    described.example_runs = example_runs and not on_meta  # meta tensors hold no values to compare
    if used != "memory":  # stages balanced by memory are unequal in time on purpose
        cuts, values = [names[i] for i in positions], [float(v) for v in costs.values]
        described.pieces = Pieces(cuts, values, list(starts), loading)
    if check and described.example_runs:
        _check_split(module, split_points, args, where, found, opened if exported else None)
    return described


def rebalanced(pieces: Pieces, measured_ms: Sequence[float]) -> tuple[list[str], float] | None:
    """The split points that balance the stage times a pipeline measured with a plan's cut (``measured_ms``: each
    stage's time per step, waits left out, as :func:`lightning_ddg.stats.measured_imbalance` gives them), and the
    slowest stage's time over the mean they should give; ``pieces`` are the plan's (``Plan.pieces``). Each stage's
    pieces are scaled by what the stage measured over what the plan expected of it, so that what the plan's
    timings missed (the optimizer step, Lightning's loop, processes contending for the machine) stays with the
    pieces that cost it; the stages are then cut anew among the plan's candidate cuts. ``None`` without a time for
    every stage."""
    measured = _measured_pieces(pieces, measured_ms)
    if measured is None:
        return None
    sums = _prefix(measured.costs)

    def stage_ms(k: int, i: int, j: int) -> float:
        return sums[j] - sums[i] + (measured.loading_ms if k == 0 else 0.0)

    pieces_count = len(measured.costs)
    new_starts = solve_stages(stage_ms, pieces_count, [0.0] * (pieces_count - 1), len(measured_ms))
    return [pieces.cuts[s - 1] for s in new_starts], slowest_over_mean(measured.stage_costs(new_starts))


def _measured_pieces(pieces: Pieces, measured_ms: Sequence[float]) -> Pieces | None:
    """``pieces`` in milliseconds: each stage's pieces (and the first stage's loading) scaled by what the stage
    measured (``measured_ms``) over what the plan expected of it. ``None`` without a time for every stage."""
    costs, starts = pieces.costs, pieces.stage_starts
    if len(measured_ms) != len(starts) + 1:
        return None
    bounds = [0, *starts, len(costs)]
    scaled: list[float] = []
    loading = 0.0  # the first stage's loading of the batch stays with the first stage
    for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        fixed = pieces.loading_ms if k == 0 else 0.0
        expected = sum(costs[a:b]) + fixed
        factor = measured_ms[k] / expected if expected > 0 else 0.0
        scaled += [c * factor if expected > 0 else measured_ms[k] / (b - a) for c in costs[a:b]]
        loading = fixed * factor if k == 0 else loading
    return Pieces(pieces.cuts, scaled, list(starts), loading)


def replanned(plan: Plan, split_points: Sequence[str], measured_ms: Sequence[float], parameters: list[int]) -> Plan:
    """The plan of ``plan``'s model cut anew at ``split_points`` (:func:`better_cut`) on the stage times the
    pipeline measured with ``plan``'s cut: each stage costs the milliseconds those times let expect of it, and its
    pieces are kept in milliseconds, so that times measured on the new cut compare with them. ``parameters``: each
    new stage's parameter count. What a stage sends and holds is not known without the model's graph: ``None``."""
    assert plan.pieces is not None
    measured = _measured_pieces(plan.pieces, measured_ms)
    assert measured is not None
    starts = [plan.pieces.cuts.index(point) + 1 for point in split_points]
    measured.stage_starts = starts
    costs = measured.stage_costs(starts)
    total = sum(costs) or 1.0
    bounds = [0, *starts, len(measured.costs)]
    names = (plan.stages[0].modules[:1] or ["(input)"]) + plan.pieces.cuts  # the module each piece begins with
    stages = [
        StagePlan(
            index=k,
            begins_at=split_points[k - 1] if k else None,
            modules=names[a:b],
            parameters=parameters[k],
            cost=cost,
            cost_share=cost / total,
            bytes_out=None,
        )
        for k, (cost, a, b) in enumerate(zip(costs, bounds, bounds[1:], strict=False))
    ]
    note = "cut anew on the stage times the pipeline measured"
    return dataclasses.replace(
        plan, split_points=list(split_points), stages=stages, balance_by="time", note=note, pieces=measured,
        loading_ms=measured.loading_ms,
    )  # fmt: skip


def better_cut(
    pieces: Pieces, split_points: Sequence[str], measured_ms: Sequence[float], least_gain: float = 0.05
) -> tuple[list[str], float] | None:
    """:func:`rebalanced`, where it moves the cut ``split_points`` that the stages were measured with and makes the
    slowest stage at least ``least_gain`` (a fraction of the mean) faster; else ``None``."""
    found = rebalanced(pieces, measured_ms)
    if found is None or found[0] == list(split_points):
        return None
    return found if found[1] <= slowest_over_mean(list(measured_ms)) - least_gain else None


def check_split(module: nn.Module, planned: Plan, example_input: Any, device: torch.device | str | None = None) -> None:
    """Run the split of ``planned`` once on ``example_input`` (the one it was planned with), in train mode, and
    compare it with the unsplit forward, as :func:`plan` does last unless told not to: a value other than a tensor
    that would cross a cut raises the error the stage would raise at its first step; an output that differs is
    warned about. The strategy runs it on the rank that planned once it has sent the plan to the others, so that
    they build their stages meanwhile (an export each, for a model ``torch.fx`` cannot trace)."""
    if not planned.example_runs:
        return
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    where = torch.device(device) if device is not None else _device_of(module)
    frozen = _FrozenOpened(module)
    found = frozen.opened_by("") + [f for m in planned.opened_modules for f in frozen.of(m)]
    opened = planned.opened_modules if planned.exported else None
    _check_split(module, planned.split_points, args, where, found, opened)


class _FrozenOpened:
    """The Python that opening each module would freeze (:func:`lightning_ddg.opening.frozen_python`), looked
    up once per module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.found: dict[str, list[Frozen]] = {}

    def of(self, name: str) -> list[Frozen]:
        if name not in self.found:
            self.found[name] = frozen_python(self.module.get_submodule(name), name)
        return self.found[name]

    def opened_by(self, split_point: str) -> list[Frozen]:
        """What a cut at ``split_point`` freezes; for '' what the module being split freezes in any case."""
        if not split_point:
            return self.of("")
        return [f for m in opened_by(split_point) if m for f in self.of(m)]


def _frozen_warning(
    found: list[Frozen], split_points: list[str], begins: dict[int, str], positions: list[int], starts: list[int]
) -> str:
    lines = []
    for module in dict.fromkeys(f.module for f in found):
        code = "; ".join(str(f) for f in found if f.module == module)
        if not module:
            lines.append(
                f"The forward of the module being split is traced into the stages, so this Python in it runs once, "
                f"at trace time, not at every step: {code}. Move it into a submodule (which runs as written) or into "
                "training_step."
            )
            continue
        cuts = [p for p, s in zip(split_points, starts, strict=True) if module in opened_by(begins[positions[s - 1]])]
        if not cuts:  # opened because the forward calls it more than once
            lines.append(
                f"{module!r} is called more than once, so torch.export traces into it: this Python in it runs once, "
                f"at trace time, not at every step: {code}. Call it once, or cut the model elsewhere."
            )
            continue
        lines.append(
            f"The cut at {cuts[0]!r} opens {module!r}: its forward is traced into the stage, so this Python in it runs "
            f"once, at trace time, not at every step: {code}. To run {module!r} as written, cut before it or after "
            f"it: name {module!r} or a module after it in split_points (DDGStrategy(split_points=[...]))."
        )
    return "\n".join(lines)


def _as_written(
    positions: list[int],
    costs: _Costs,
    cut_bytes: list[float],
    wanted: int,
    used: BalanceBy,
    as_written: list[bool],
    balanced: bool = False,
) -> tuple[list[int], _Costs, list[float], list[int]]:
    """The best cut (:func:`solve`), or the best among the cuts that open no module whose Python a trace would
    freeze (``as_written``) if its slowest stage is within ``AS_WRITTEN_TOLERANCE`` of the best and, with
    ``balanced``, within ``IMBALANCE_WARNING`` of the mean where the best is: the positions left to choose from,
    their segment costs and cut bytes, and the chosen starts."""
    starts = costs.solve(cut_bytes, _TIE_TOLERANCE[used])
    keep = [j for j, fine in enumerate(as_written) if fine]
    if all(as_written) or len(keep) < wanted - 1:
        return positions, costs, cut_bytes, starts
    kept_costs, kept_bytes = costs.merged(keep), [cut_bytes[j] for j in keep]
    kept_starts = kept_costs.solve(kept_bytes, _TIE_TOLERANCE[used])
    slowest, best = kept_costs.slowest(kept_starts), costs.slowest(starts)
    if slowest > best * (1 + AS_WRITTEN_TOLERANCE):
        return positions, costs, cut_bytes, starts
    mean = (sum(costs.values) + costs.loading) / wanted
    if balanced and not costs.by_memory and slowest > IMBALANCE_WARNING * mean >= best:
        return positions, costs, cut_bytes, starts
    return [positions[j] for j in keep], kept_costs, kept_bytes, kept_starts


def _layers(module: nn.Module) -> set[str]:
    """The names of the layers of ``module``'s stacks: the items of its ``nn.ModuleList`` s and ``nn.Sequential`` s."""
    return {
        f"{name}.{child}" if name else child
        for name, m in module.named_modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential))
        for child, _ in m.named_children()
    }


class _Costs:
    """What the segments between candidate cuts cost, and what a stage made of consecutive segments costs.

    ``values`` are the segments' costs (time, FLOPs or parameters), which a stage sums; ``held`` what each segment
    brings to a stage's memory. By memory, a stage costs what it holds (:func:`stage_memory`), which depends on its
    delay and so on its index. ``loading``: what the first stage costs besides its segments (loading the batch).
    """

    def __init__(
        self,
        values: list[float],
        held: list[SegmentMemory],
        by_memory: bool,
        num_stages: int,
        memory: str,
        optimizer_states: float,
        loading: float = 0.0,
    ) -> None:
        self.values, self.held, self.by_memory, self.loading = values, held, by_memory, loading
        self.num_stages, self.memory, self.optimizer_states = num_stages, memory, optimizer_states
        self._sums = [_prefix(values)] + [
            _prefix([getattr(h, f) for h in held]) for f in ("parameter_bytes", "trainable_bytes", "activation_bytes")
        ]

    def __len__(self) -> int:
        return len(self.values)

    def holds(self, k: int, i: int, j: int) -> float:
        """Bytes that segments ``i..j-1`` hold as stage ``k``."""
        params, trainable, activations = (s[j] - s[i] for s in self._sums[1:])
        d = delay(k, self.num_stages)
        optimizer = self.optimizer_states * trainable
        held = stage_memory(params, activations, self.held[i].input_bytes, d, self.memory, optimizer, trainable)
        return held["total"]

    def stage(self, k: int, i: int, j: int) -> float:
        """What segments ``i..j-1`` cost as stage ``k``, in the plan's unit."""
        if self.by_memory:
            return self.holds(k, i, j) / _MIB
        return self._sums[0][j] - self._sums[0][i] + (self.loading if k == 0 else 0.0)

    def solve(self, cut_bytes: list[float], tolerance: float) -> list[int]:
        """The cut whose largest stage cost is least; among those within ``tolerance`` of it by time, FLOPs or
        parameters, those whose largest stage holds at most ``MEMORY_TIE_TOLERANCE`` more memory than the least any
        of them holds (equally fast cuts can differ much in what their first stage holds); among those, the one
        that sends the fewest bytes."""
        m, k = len(self), self.num_stages
        if self.by_memory:
            return solve_stages(self.stage, m, cut_bytes, k, tolerance)
        none = [0.0] * (m - 1)
        fastest = self.slowest(solve_stages(self.stage, m, none, k))
        time_bound = fastest * (1 + tolerance) + 1e-12 * max(abs(fastest), 1.0)

        def held_if_fast(s: int, i: int, j: int) -> float:
            return self.holds(s, i, j) if self.stage(s, i, j) <= time_bound else _INF

        least = self.largest_held(solve_stages(held_if_fast, m, none, k))
        held_bound = least * (1 + MEMORY_TIE_TOLERANCE) + 1.0

        def allowed(s: int, i: int, j: int) -> float:
            return 0.0 if self.stage(s, i, j) <= time_bound and self.holds(s, i, j) <= held_bound else _INF

        return solve_stages(allowed, m, cut_bytes, k)

    def largest_held(self, starts: list[int]) -> float:
        bounds = [0, *starts, len(self)]
        return max(self.holds(k, a, b) for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)))

    def slowest(self, starts: list[int]) -> float:
        bounds = [0, *starts, len(self)]
        return max(self.stage(k, a, b) for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)))

    def merged(self, keep: list[int]) -> _Costs:
        """The costs of the segments left when only the cuts ``keep`` (indices into the cuts) stay."""
        bounds = [0, *[j + 1 for j in keep], len(self)]
        spans = list(zip(bounds, bounds[1:], strict=False))
        return self._like(
            [sum(self.values[a:b]) for a, b in spans], [SegmentMemory.join(self.held[a:b]) for a, b in spans]
        )

    def with_values(self, values: list[float]) -> _Costs:
        return self._like(values, self.held)

    def _like(self, values: list[float], held: list[SegmentMemory]) -> _Costs:
        return _Costs(values, held, self.by_memory, self.num_stages, self.memory, self.optimizer_states, self.loading)


def _prefix(values: Sequence[float]) -> list[float]:
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + float(v))
    return sums


def _held(
    module: nn.Module, segments: list[nn.Module], args: tuple, where: torch.device
) -> tuple[list[SegmentMemory], str | None]:
    """What each segment brings to a stage's memory (:func:`segment_memory`), measured with the example input;
    without one, or where it fails, its parameters alone, and why."""
    if args:
        with _untouched(module):
            try:
                inputs = run_segments(segments, args, where)
                measured = []
                for segment, x in zip(segments, inputs, strict=True):
                    with _on(segment, where):
                        measured += segment_memory([segment], [x])
                return measured, None
            except Exception as err:  # noqa: BLE001 - the parameters still say most of what a stage holds
                reason = f"the example input failed ({err})"
    else:
        reason = "no example input"
    return [_parameters_only(s) for s in segments], reason


def _parameters_only(segment: nn.Module) -> SegmentMemory:
    params = list(segment.parameters())
    size = [p.numel() * p.element_size() for p in params]
    trainable = sum(n for n, p in zip(size, params, strict=True) if p.requires_grad)
    return SegmentMemory(sum(size), trainable, 0, 0)


def _uncrossable(
    gm: Any, positions: list[int], module: nn.Module, args: tuple, where: torch.device
) -> tuple[dict[int, tuple[str, str]], bool]:
    """For each cut in ``positions`` that a value which cannot be sent (:func:`~lightning_ddg.comm.crosses`) would
    cross: its name and what it is; and whether the example input ran. Found by running the example input through
    the pieces between the cuts; without one, or where it fails, by what computed each value (``x.shape``,
    ``x.size(0)``, arithmetic on those: taken as values that cannot cross)."""
    segments = _stage_graphs(gm, positions)
    crossing: dict[int, tuple[str, str]] = {}
    inputs = None
    if args:
        with _untouched(module):
            try:
                inputs = run_segments(segments, args, where)
            except Exception:  # noqa: BLE001 - the costs fall back to parameter counts and say why
                inputs = None
    nodes = {n.name: n for n in gm.graph.nodes}
    for j, segment in enumerate(segments[1:]):
        names = [n.name for n in segment.graph.nodes if n.op == "placeholder"]
        if inputs is not None:
            values = zip(names, inputs[j + 1], strict=False)
            found = [(n, f"of type {type(v).__name__}") for n, v in values if not crosses(v)]
        else:
            kind = "not a tensor (a shape, a size or a number computed from one)"
            found = [(n, kind) for n in names if _not_tensor(nodes[n])]
        if found:
            crossing[positions[j]] = found[0]
    return crossing, inputs is not None


_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist", "stride", "element_size", "get_device"}


def _not_tensor(node: Any, seen: dict | None = None) -> bool:
    """Whether ``node`` surely computes a value other than a tensor: a shape, size or number read from a
    tensor, an item of one, or arithmetic on such values only."""
    seen = {} if seen is None else seen
    if node in seen:
        return seen[node]
    seen[node] = False
    if node.op == "call_method":
        result = node.target in _SHAPE_METHODS
    elif node.op == "call_function" and node.target is getattr:
        result = len(node.args) > 1 and node.args[1] in _SHAPE_ATTRIBUTES
    elif node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator", "math"):
        inputs = [a for a in node.all_input_nodes]
        result = bool(inputs) and all(_not_tensor(a, seen) for a in inputs)
    else:
        result = False
    seen[node] = result
    return result


def _check_split(
    module: nn.Module,
    split_points: list[str],
    args: tuple,
    where: torch.device,
    found: list[Frozen],
    opened: list[str] | None = None,
) -> None:
    """Run the split model once on the example input, in train mode, and compare it with the unsplit forward.

    Both run on copies of the module that share its tensors, from the same buffers and random number generator
    states, and leave the module as it was. A value other than a tensor that would cross a cut stops with the error
    the stage would raise at its first step; an output that differs is warned about.
    """
    with _untouched(module), _same_generators() as restart:
        expected = None
        # its buffers put back after it: a forward that updates state it reads (spectral_norm's power iteration)
        with _untouched(module), _shadow(module, user_hooks=False) as unsplit:
            unsplit.train()
            restart()
            try:
                with torch.no_grad(), _on(unsplit, where), no_cache(unsplit):  # as an export opens it
                    expected = _to(unsplit(*_to(args, where)), torch.device("cpu"))
            except torch.OutOfMemoryError:
                expected = None  # the whole model does not fit where the stages are measured
        with _shadow(module, user_hooks=False) as copied:
            copied.train()
            stages = split_module(copied, split_points, None, args or None, opened, evaluation=False).train
            restart()
            values: list[Any] = list(_to(args, where))
            with torch.no_grad():
                for k, stage in enumerate(stages):
                    with _on(stage, where):
                        output = stage(*values)
                    if k < len(stages) - 1:
                        values = crossing_values(output, stage, k)
            actual = _to(output, torch.device("cpu"))
    if expected is None:
        return
    difference = _difference(actual, expected)
    if difference is not None:
        hint = (
            f" These modules are traced for the cuts and hold Python that runs once: {'; '.join(map(str, found))}."
            if found
            else ""
        )
        warnings.warn(
            f"split at {split_points}, the model does not reproduce its own forward on the example input: "
            f"{difference}.{hint} Choose other split_points, or leave the cut to the planner.",
            stacklevel=3,
        )


def _difference(actual: Any, expected: Any) -> str | None:
    """How two forward outputs differ beyond rounding, or None."""
    actual_leaves, actual_spec = tree_flatten(actual)
    expected_leaves, expected_spec = tree_flatten(expected)
    if actual_spec != expected_spec:
        return f"it returns {actual_spec} instead of {expected_spec}"
    for i, (a, e) in enumerate(zip(actual_leaves, expected_leaves, strict=True)):
        if isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor):
            if a.shape != e.shape:
                return f"output {i} has shape {tuple(a.shape)} instead of {tuple(e.shape)}"
            if not e.is_floating_point() and not e.is_complex():
                if not torch.equal(a, e):
                    return f"output {i} differs"
                continue
            a64, e64 = a.detach().double(), e.detach().double()
            scale = float(e64.abs().nan_to_num(0, 0, 0).max()) if e64.numel() else 0.0
            if not torch.allclose(a64, e64, rtol=1e-3, atol=1e-5 * max(scale, 1.0), equal_nan=True):
                gap = float((a64 - e64).abs().nan_to_num(float("inf")).max())
                return f"output {i} differs by up to {gap:.3g} (its largest value is {scale:.3g})"
        elif type(a) is not type(e) or a != e:
            return f"output {i} is {a!r} instead of {e!r}"
    return None


@contextlib.contextmanager
def _same_generators() -> Iterator[Any]:
    """Yields a function that puts PyTorch's, Python's and NumPy's random number generators back to the states
    they had on entry; on exit they are back there too."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None

    def restart() -> None:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        if numpy is not None:
            numpy.random.set_state(numpy_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)

    try:
        yield restart
    finally:
        restart()


def _refined(
    gm: Any,
    module: nn.Module,
    positions: list[int],
    starts: list[int],
    chosen_by: _Costs,
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
    costs = chosen_by.values
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
        measured[key] = (max(times[0] + chosen_by.loading, *times[1:]), scaled)
        starts = chosen_by.with_values(scaled).solve(cut_bytes, _TIE_TOLERANCE["time"])
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
        measured = ("time", "flops", "params")  # each falls back to the next
        order = list(measured[measured.index(balance_by) :])
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
    costs: _Costs,
    cut_bytes: list[float],
    balance_by: BalanceBy,
    note: str | None,
    args: tuple,
    opened: list[str],
) -> Plan:
    bounds = [0, *starts, len(costs)]
    node_bounds = [0, *positions, len(body)]
    stage_of_node = {}
    for k in range(len(bounds) - 1):
        for node in body[node_bounds[bounds[k]] : node_bounds[bounds[k + 1]]]:
            stage_of_node[node] = k
    stage_costs = [costs.stage(k, a, b) for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))]
    total = sum(stage_costs) or 1.0
    stage_params = _stage_parameters(gm, body, stage_of_node, len(bounds) - 1)
    stages = []
    for k in range(len(bounds) - 1):
        cost = stage_costs[k]
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
                holds=int(costs.holds(k, bounds[k], bounds[k + 1])),
            )
        )
    return Plan(split_points, stages, balance_by, note, list(gm.meta.get(WHOLE_KEY, [])), opened)


def _segment_parameters(segments: list[nn.Module]) -> list[int]:
    # a weight two segments use (tied embeddings) counts in both: a stage holding either holds a copy of it
    return [sum(p.numel() for p in segment.parameters()) for segment in segments]


def _stage_parameters(gm: Any, body: list, stage_of_node: dict, num_stages: int) -> list[int]:
    """The parameters each stage holds; a weight several stages use (tied embeddings) counts in each of them."""
    counts, seen = [0] * num_stages, set()
    for node in body:
        if node.op == "call_module":
            params = list(gm.get_submodule(str(node.target)).parameters())
        elif node.op == "get_attr":
            params = [p for name, p in gm.named_parameters() if name == str(node.target)]
        else:
            continue
        k = stage_of_node[node]
        for p in params:
            if (k, id(p)) not in seen:
                seen.add((k, id(p)))
                counts[k] += p.numel()
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
    """Leave the buffers (BatchNorm statistics, the very tensor objects) and the states of PyTorch's, Python's
    and NumPy's random number generators as they were."""
    buffers = [
        (m, name, b, b.detach().clone())
        for m in module.modules()
        for name, b in buffer_table(m).items()
        if b is not None
    ]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), _same_generators():
        try:
            yield
        finally:
            with torch.no_grad():
                for m, name, b, saved in buffers:
                    b.copy_(saved)
                    buffer_table(m)[name] = b  # moving a piece to the device and back replaces its buffers


def _span(modules: list[str]) -> str:
    if len(modules) <= 2:
        return ", ".join(modules)
    return f"{modules[0]} … {modules[-1]} ({len(modules)})"


def _count(n: int) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _megabytes(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.2f} MB"
