"""The whole model's state, gathered from the stage processes that each hold a part of it.

Every process of a pipeline holds its own stage's parameters, buffers and optimizer state
(:mod:`lightning_ddg.shard`). :class:`StageStates` collects the whole of them: on every rank, to put the module
back together after fit (:meth:`~StageStates.gather_tensors`); on one rank, as a state dict
(:meth:`~StageStates.full_state_dict`); or, for a checkpoint, as a state whose other stages' tensors are
*placeholders* of their shape and dtype (:meth:`~StageStates.module_state_dict`,
:meth:`~StageStates.optimizer_state`) that their owners fill one at a time while rank 0 writes the file
(:meth:`~StageStates.send_streamed`, :meth:`~StageStates.receive_streamed`), so that no process ever holds the
whole model. Every method that gathers is a collective: all ranks call it. This module is plain PyTorch.

Example, in each process after fit::

    states = StageStates(topology, dist.get_rank(), dist.get_world_size(), state_dict_keys, parameter_order)
    put_back(removed, states.gather_tensors(module))      # the whole model on every rank
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO
from torch import Tensor, nn

from lightning_ddg.checkpoint import group_names, merge_optimizer_states, named_optimizer_state, stage_optimizer_state
from lightning_ddg.checkpoint_io import chunks, save_streamed, writes_local_torch_files
from lightning_ddg.gather import broadcast_parts, gather_parts, save_parts, transfer_device
from lightning_ddg.shard import aliases
from lightning_ddg.topology import Topology

__all__ = ["StageStates", "TensorSpec", "load_stage_state", "parameter_names", "at", "as_bytes"]

KeyPath = tuple[Any, ...]


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of a tensor another process holds."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(tensor: Tensor) -> TensorSpec:
        return TensorSpec(tuple(tensor.shape), tensor.dtype)


class StageStates:
    """Gathers the state of the stages of replica 0 (the replicas of a stage hold the same values).

    Args:
        topology: the stages and replicas of the job.
        rank, world_size: this process's global rank and the job's size.
        state_dict_keys: the names of the whole module's ``state_dict``, in its order (taken before the module
            was cut); the gathered states follow it.
        parameter_order: the whole module's parameter names in ``named_parameters`` order: optimizer states are
            indexed by it, as one process holding the whole model would index them.
    """

    def __init__(
        self,
        topology: Topology,
        rank: int,
        world_size: int,
        state_dict_keys: Sequence[str] = (),
        parameter_order: Sequence[str] = (),
    ) -> None:
        self.topology = topology
        self.rank = rank
        self.world_size = world_size
        self.state_dict_keys = list(state_dict_keys)
        self.parameter_order = list(parameter_order)
        # the placeholders of the checkpoint being saved, where they sit in it, and the rank that owns each
        self.streamed: list[tuple[KeyPath, int]] = []
        self._optimizers_saved = 0

    @classmethod
    def of(cls, module: nn.Module, topology: Topology, rank: int, world_size: int) -> StageStates:
        """For ``module`` whole, before it is cut: its state dict's names and its parameters' order."""
        names = [name for name, _ in module.named_parameters()]
        return cls(topology, rank, world_size, state_dict_keys=list(module.state_dict()), parameter_order=names)

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    # --- collectives of Python objects ----------------------------------------------------------------------
    def all_gather_objects(self, obj: Any) -> list[Any]:
        if not self._distributed:
            return [obj]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def first_replica_objects(self, obj: Any) -> list[Any]:
        """``obj`` of each stage of replica 0, on every rank. With replicas, one broadcast per stage: each rank
        receives the model once, not once per replica."""
        if self.topology.num_replicas == 1:
            return self.all_gather_objects(obj)
        parts = []
        for stage in range(self.topology.num_stages):
            box = [obj]
            dist.broadcast_object_list(box, src=self.topology.rank_of(stage, replica=0))
            parts.append(box[0])
        return parts

    def stage_owners(self) -> list[int]:
        """The global rank each part of :meth:`first_replica_objects` comes from."""
        if self.topology.num_replicas == 1:
            return list(range(self.world_size))
        return [self.topology.rank_of(stage, replica=0) for stage in range(self.topology.num_stages)]

    # --- the whole module ------------------------------------------------------------------------------------
    def gather_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        """The parameters and buffers of the whole module that this rank does not hold (with one stage: its own),
        on every rank: each is broadcast by the stage of replica 0 that owns it, one tensor at a time
        (:mod:`lightning_ddg.gather`), so a rank holds what it receives and no more."""
        local = {n: t.detach() for n, t in [*module.named_parameters(), *module.named_buffers()]}
        if self.topology.num_stages == 1:
            return local
        specs = self.first_replica_objects({n: TensorSpec.of(t) for n, t in local.items()})
        return broadcast_parts(local, specs, self.stage_owners(), transfer_device())

    def full_state_dict(self, module: nn.Module, dst: int = 0, whole: bool = False) -> dict[str, Tensor] | None:
        """The whole module's state dict, with its original names, on global rank ``dst`` (``None`` on the
        others): each stage of replica 0 sends its own tensors there, one at a time. A weight several stages hold
        (tied embeddings) comes from one of them, one tensor under all of its names. With ``whole``, every rank
        holds the whole module already: ``dst`` returns its own."""
        if whole or not self._distributed:
            return _local_state(module) if self.rank == dst or not self._distributed else None
        local, specs = self._described_state(module)
        full = gather_parts(local, specs, self.stage_owners(), dst, transfer_device())
        return None if full is None else {name: full[name] for name in self.state_dict_keys or full if name in full}

    def save_full_state_dict(self, module: nn.Module, path: Any, dst: int = 0, whole: bool = False) -> None:
        """Write the whole module's state dict, as :meth:`full_state_dict` returns it, with ``torch.save`` to
        ``path`` on global rank ``dst``, which receives the other stages' tensors one piece at a time straight into
        the file (:func:`~lightning_ddg.gather.save_parts`): no process holds more than its own stage."""
        local, specs = self._described_state(module)
        owners = self.stage_owners()
        if whole or not self._distributed:
            specs, owners = specs[:1], [dst]  # every rank's own: dst's alone is written
        save_parts(local, specs, owners, dst, path, transfer_device(), self.state_dict_keys or None)

    def _described_state(self, module: nn.Module) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
        """This rank's state dict, and each stage's names, shapes and dtypes (a name that refers to an earlier
        name's tensor, as the name; a collective where the job is distributed)."""
        state = module.state_dict(keep_vars=True)
        same = aliases(state)
        local = {n: t.detach() for n, t in state.items()}
        described = {n: same.get(n) or TensorSpec.of(t) for n, t in local.items()}
        return local, self.first_replica_objects(described) if self._distributed else [described]

    # --- a checkpoint with placeholders ------------------------------------------------------------------------
    def placeholder(self, spec: TensorSpec) -> Tensor:
        # on rank 0, which writes the file, memory that is never written: the system backs it with none of its own
        return torch.empty(spec.shape, dtype=spec.dtype, device="cpu" if self.rank == 0 else "meta")

    def module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """The whole module's state dict with the original names, on every rank. Only this stage's tensors are
        real; those of other stages are placeholders, recorded in :attr:`streamed`. Begins a new checkpoint.

        A weight several stages hold (tied embeddings) is saved once, by the lowest rank among them (rank 0 itself
        where it can), and all of its names refer to that one tensor, so the file holds it once."""
        local = _local_state(module)
        same = aliases(module.state_dict(keep_vars=True))
        # another name of a tensor already listed is sent as that first name
        specs = self.first_replica_objects({n: same.get(n) or TensorSpec.of(t) for n, t in local.items()})
        owners = self.stage_owners()
        self.streamed, self._optimizers_saved = [], 0
        state = {}
        for j in sorted(range(len(specs)), key=owners.__getitem__):
            for name, spec in specs[j].items():
                if name in state or isinstance(spec, str):
                    continue
                state[name] = local[name] if owners[j] == self.rank else self.placeholder(spec)
                if owners[j] != 0:
                    self.streamed.append((("state_dict", name), owners[j]))
        for part in specs:
            state |= {name: state[first] for name, first in part.items() if isinstance(first, str)}
        return {name: state[name] for name in self.state_dict_keys if name in state}

    def optimizer_state(
        self, optimizer: torch.optim.Optimizer, names: dict[int, str], placeholders: bool = True
    ) -> dict[str, Any]:
        """The optimizer state of the whole model, as one device would hold it, so that checkpoints resume on any
        number of stages (see :mod:`lightning_ddg.checkpoint`). ``names`` maps ``id(parameter)`` to its name.
        With ``placeholders``, other stages' tensors are placeholders recorded in :attr:`streamed`, the
        optimizer's states numbered in the order they are taken after :meth:`module_state_dict`."""
        part = named_optimizer_state(optimizer, names)
        if not placeholders:
            return merge_optimizer_states(self.first_replica_objects(part), self.parameter_order)
        described = {**part, "state": {n: _described(s) for n, s in part["state"].items()}}
        parts = self.first_replica_objects(described)
        owners = self.stage_owners()
        owner_of: dict[int, int] = {}
        for j, other in enumerate(parts):
            if owners[j] == self.rank:
                parts[j] = part
            else:
                other["state"] = {n: self._placeholders(s) for n, s in other["state"].items()}
            owner_of |= {id(s): owners[j] for s in parts[j]["state"].values()}
        merged = merge_optimizer_states(parts, self.parameter_order)
        saved = self._optimizers_saved
        self._optimizers_saved += 1
        for index, entry in merged["state"].items():
            if owner_of[id(entry)] != 0:
                for key, value in entry.items():
                    if isinstance(value, Tensor):
                        self.streamed.append((("optimizer_states", saved, "state", index, key), owner_of[id(entry)]))
        return merged

    def _placeholders(self, state: dict[str, Any]) -> dict[str, Any]:
        return {k: self.placeholder(v) if isinstance(v, TensorSpec) else v for k, v in state.items()}

    def take_streamed(self) -> list[tuple[KeyPath, int]]:
        """The placeholders of the checkpoint being saved (and forget them: each is sent once)."""
        streamed, self.streamed = self.streamed, []
        return streamed

    def send_streamed(self, checkpoint: dict[str, Any], streamed: list[tuple[KeyPath, int]]) -> None:
        """On a rank other than 0: send rank 0 the real values of the placeholders this rank owns, in order."""
        for key_path, owner in streamed:
            if owner == self.rank:
                for piece in chunks(as_bytes(at(checkpoint, key_path).detach().cpu())):
                    dist.send(piece, dst=0)  # in the pieces rank 0 writes one at a time

    @staticmethod
    def receive_streamed(streamed: list[tuple[KeyPath, int]]) -> Callable[[int, Tensor], None]:
        """On rank 0: ``receive(i, buffer)`` fills ``buffer`` with the next piece (:func:`chunks`) of the bytes of
        the ``i``-th placeholder."""

        def receive(i: int, buffer: Tensor) -> None:
            dist.recv(buffer, src=streamed[i][1])

        return receive

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, checkpoint_io: CheckpointIO, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint``, whose other stages' tensors are placeholders (:meth:`module_state_dict`,
        :meth:`optimizer_state`), to ``path`` on rank 0 with ``checkpoint_io``. A collective: the owners send their
        tensors to rank 0 one at a time, and rank 0 streams them into the one ordinary checkpoint file
        (:func:`save_streamed`), so that no process ever holds the whole model; another checkpoint IO gets the
        whole checkpoint filled in."""
        streamed = self.take_streamed()
        if self.rank != 0:
            self.send_streamed(checkpoint, streamed)
            return
        receive = self.receive_streamed(streamed)
        if streamed and writes_local_torch_files(checkpoint_io, path):
            save_streamed(checkpoint, path, [key_path for key_path, _ in streamed], receive)
            return
        fill_placeholders(checkpoint, streamed, receive)
        checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def stage_optimizer_state(
        self, optimizer: torch.optim.Optimizer, full: dict[str, Any], names: dict[int, str], shapes: dict[str, Any]
    ) -> dict[str, Any]:
        """This stage's part of the whole model's optimizer state ``full`` (a collective)."""
        groups = group_names(optimizer, names)
        return stage_optimizer_state(full, groups, self.all_gather_objects(groups), self.parameter_order, shapes)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, full: dict[str, Any], module: nn.Module) -> None:
        """Load into ``optimizer``, which steps ``module``'s stage, its part of the whole model's optimizer state
        ``full`` (a collective). Raises ``ValueError`` when ``full`` does not fit the model."""
        shapes = {name: p.shape for name, p in module.named_parameters()}
        optimizer.load_state_dict(self.stage_optimizer_state(optimizer, full, parameter_names(module), shapes))


def parameter_names(module: nn.Module) -> dict[int, str]:
    """``id(parameter)`` to its name in ``module``: how optimizer states are named (:mod:`lightning_ddg.checkpoint`)."""
    return {id(p): name for name, p in module.named_parameters()}


def fill_placeholders(checkpoint: dict[str, Any], streamed: list[tuple[KeyPath, int]], receive: Callable) -> None:
    """On rank 0: receive every placeholder's value into the checkpoint itself (for a checkpoint writer that
    needs the whole checkpoint in memory)."""
    for i, (key_path, _) in enumerate(streamed):
        target = at(checkpoint, key_path)
        buffer = torch.empty(target.numel() * target.element_size(), dtype=torch.uint8)
        for piece in chunks(buffer):
            receive(i, piece)
        as_bytes(target).copy_(buffer)


def load_stage_state(module: nn.Module, state: dict[str, Tensor], strict: bool = True) -> None:
    """Copy this stage's parameters and buffers from the whole model's state dict ``state``.

    Tensor by tensor: the module's own ``load_state_dict`` would visit the emptied modules of other stages.
    """
    own = module.state_dict(keep_vars=True)
    missing = [name for name in own if name not in state]
    if strict and missing:
        raise RuntimeError(f"the checkpoint's state_dict lacks {missing}: it was saved from another model")
    with torch.no_grad():
        for name, tensor in own.items():
            if name not in state:
                continue
            if state[name].shape != tensor.shape:
                raise RuntimeError(
                    f"{name} has shape {tuple(state[name].shape)} in the checkpoint, {tuple(tensor.shape)} in the "
                    "model: it was saved from another model"
                )
            tensor.copy_(state[name])


def _local_state(module: nn.Module) -> dict[str, Tensor]:
    """This process's state dict on the CPU; the names of one tensor (a tied weight) share one copy."""
    state = module.state_dict(keep_vars=True)
    local = {n: t.detach().cpu() for n, t in state.items()}
    return local | {name: local[first] for name, first in aliases(state).items()}


def _described(state: dict[str, Any]) -> dict[str, Any]:
    return {k: TensorSpec.of(v) if isinstance(v, Tensor) else v for k, v in state.items()}


def at(obj: Any, key_path: KeyPath) -> Any:
    """``obj[key_path[0]][key_path[1]]...``"""
    for key in key_path:
        obj = obj[key]
    return obj


def as_bytes(tensor: Tensor) -> Tensor:
    """The tensor's data as a flat ``uint8`` tensor (a view where it is contiguous)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)
