"""Putting a model's state together from the stage processes that own it, one tensor at a time.

Each process holds its own stage's tensors. To give every rank the whole model (after fit, for a model that fits
one process) or one rank the whole state (on request), the owners send their tensors one at a time with
``torch.distributed`` point-to-point and broadcast calls on the tensors' bytes: a process holds what it receives
and at most one tensor in flight, never a pickled copy of a stage (``all_gather_object`` would hold every stage's
pickled bytes at once, several times the model). Every rank walks the same list of transfers in the same order
(:func:`plan_transfers`, from ``specs``: the names, shapes and dtypes of each owner's tensors, gathered
beforehand), so no message carries more than the bytes. This module is plain PyTorch.

Example (``specs[j]`` describes the tensors of ``owners[j]``, the same list on every rank)::

    others = broadcast_parts(my_tensors, specs, owners, device)          # every rank: every other part's tensors
    full = gather_parts(my_tensors, specs, owners, dst=0, device=device)  # rank 0: the whole state; None elsewhere
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_ddg.checkpoint_io import chunks, save_streamed

__all__ = ["Spec", "TensorSpec", "broadcast_parts", "gather_parts", "plan_transfers", "save_parts", "transfer_device"]


class TensorSpec(Protocol):
    """The shape and dtype of a tensor another process holds."""

    shape: tuple[int, ...]
    dtype: torch.dtype


Spec = TensorSpec | str  # a name that refers to the tensor of an earlier name (one tensor under two names)


def transfer_device() -> torch.device:
    """Where tensors travel between processes: this process's GPU under NCCL, which moves GPU memory only; else
    the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def plan_transfers(
    specs: Sequence[dict[str, Spec]], owners: Sequence[int]
) -> tuple[list[tuple[str, TensorSpec, int]], dict[str, str]]:
    """What travels: each name once, from the lowest rank that holds it (a weight several stages hold, such as a
    tied embedding, comes from one of them), as ``(name, spec, owner)`` in the order every rank walks; and the
    names that refer to another name's tensor. The same on every rank, from the same ``specs`` and ``owners``:
    part ``j`` describes the tensors of global rank ``owners[j]``."""
    transfers: list[tuple[str, TensorSpec, int]] = []
    aliases: dict[str, str] = {}
    seen: set[str] = set()
    for j in sorted(range(len(specs)), key=owners.__getitem__):
        for name, spec in specs[j].items():
            if isinstance(spec, str):
                aliases.setdefault(name, spec)
            elif name not in seen:
                seen.add(name)
                transfers.append((name, spec, owners[j]))
    return transfers, {name: first for name, first in aliases.items() if name not in seen}


def broadcast_parts(
    local: dict[str, Tensor],
    specs: Sequence[dict[str, Spec]],
    owners: Sequence[int],
    device: torch.device,
    wanted: set[str] | None = None,
) -> dict[str, Tensor]:
    """The tensors named in ``specs`` that this rank does not hold (or all those in ``wanted``), on ``device``: each
    is broadcast by its owner (:func:`plan_transfers`), one at a time. A collective: every rank calls it with the
    same ``specs`` and ``owners``; the owner of a tensor passes it in ``local``."""
    rank = _rank()
    received: dict[str, Tensor] = {}
    transfers, aliases = plan_transfers(specs, owners)
    for name, spec, owner in transfers:
        if rank == owner:
            dist.broadcast(_as_bytes(local[name].detach().to(device)), src=owner)
            continue
        tensor = torch.empty(spec.shape, dtype=spec.dtype, device=device)
        dist.broadcast(_as_bytes(tensor), src=owner)
        if (wanted is None and name not in local) or (wanted is not None and name in wanted):
            received[name] = tensor
    return received | {name: received[first] for name, first in aliases.items() if first in received}


def gather_parts(
    local: dict[str, Tensor],
    specs: Sequence[dict[str, Spec]],
    owners: Sequence[int],
    dst: int,
    device: torch.device,
) -> dict[str, Tensor] | None:
    """Every tensor named in ``specs`` on global rank ``dst``, on the CPU (``None`` on the other ranks): each owner
    sends its tensors there one at a time (:func:`plan_transfers`); a name that refers to another's tensor is that
    tensor. A collective of the ranks in ``owners`` and ``dst``. Transfers go through ``device`` (the backend's:
    a GPU for NCCL)."""
    rank = _rank()
    full: dict[str, Tensor] = {}
    transfers, aliases = plan_transfers(specs, owners)
    for name, spec, owner in transfers:
        if owner == dst:
            if rank == dst:
                full[name] = local[name].detach().cpu()
        elif rank == owner:
            dist.send(_as_bytes(local[name].detach().to(device)), dst=dst)
        elif rank == dst:
            tensor = torch.empty(spec.shape, dtype=spec.dtype, device=device)
            dist.recv(_as_bytes(tensor), src=owner)
            full[name] = tensor.cpu()
    if rank != dst:
        return None
    return full | {name: full[first] for name, first in aliases.items()}


def save_parts(
    local: dict[str, Tensor],
    specs: Sequence[dict[str, Spec]],
    owners: Sequence[int],
    dst: int,
    path: Any,
    device: torch.device,
    order: Sequence[str] | None = None,
) -> None:
    """Write every tensor named in ``specs`` to ``path`` on global rank ``dst``, one ordinary ``torch.save`` file of a
    flat ``{name: tensor}`` dict (a tensor under two names stored once), without any process holding more than its
    own part and one piece of a tensor in flight (:func:`~lightning_ddg.checkpoint_io.save_streamed`); its keys in
    ``order`` (default: as :func:`plan_transfers` lists them). A collective of the ranks in ``owners`` and ``dst``.
    """
    rank = _rank()
    transfers, aliases = plan_transfers(specs, owners)
    streamed = [(name, owner) for name, _, owner in transfers if owner != dst]
    if rank != dst:
        for name, owner in streamed:
            if owner == rank:
                for piece in chunks(_as_bytes(local[name].detach().to(device))):
                    dist.send(piece, dst=dst)
        return
    state: dict[str, Tensor] = {}
    for name, spec, owner in transfers:
        # another rank's tensor: memory that is never written, filled in the file as it arrives
        state[name] = local[name].detach().cpu() if owner == dst else torch.empty(spec.shape, dtype=spec.dtype)
    state |= {name: state[first] for name, first in aliases.items()}
    if order is not None:
        state = {name: state[name] for name in order if name in state}

    def receive(i: int, buffer: Tensor) -> None:
        if device.type == "cpu":
            dist.recv(buffer, src=streamed[i][1])
        else:
            on_device = torch.empty_like(buffer, device=device)
            dist.recv(on_device, src=streamed[i][1])
            buffer.copy_(on_device)

    save_streamed(state, path, [(name,) for name, _ in streamed], receive)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _as_bytes(tensor: Tensor) -> Tensor:
    """The tensor's data as a flat ``uint8`` tensor; a view of it where it is contiguous."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)
