"""What a DDG stage holds in memory: the formula, and what each piece of a model contributes to it.

Stage ``k`` of ``K`` has delay ``d_k = K-1-k`` and holds, besides what every process imports:

- its parameters, their gradients and the optimizer's state;
- in ``"stash"`` and ``"recompute"``, the weight copies of its in-flight batches: ``d_k`` on a stage with
  ``d_k > 0`` (one for each batch whose backward is still to come; the batch being forwarded reads the live weights
  until its step ends), none on the last stage and in ``"replay"`` (an upper bound in ``"stash"``: a stage copies
  no weight its backward never reads: an embedding's, a bias's, the first stage's first linear layer's);
- the activations of its ``d_k + 1`` in-flight batches: what autograd saves for the backward in ``"stash"`` (and on
  the last stage); in ``"recompute"`` and ``"replay"`` only their inputs, and one batch's saved activations while
  it is recomputed.

So a stage with a delay holds ``3 + d_k`` bytes per byte of trainable parameters under SGD with momentum
(``"stash"``), the last stage 3: the first stages fill up first. :func:`stage_memory` is the formula;
:func:`segment_memory` measures, per piece of a model, what the formula needs (parameter bytes, the bytes autograd
saves for one batch, the bytes of the piece's input), on any device, the meta device included.

Example::

    >>> from torch import nn
    >>> parts = stage_memory(parameter_bytes=4 * 2**20, activation_bytes=2**20, input_bytes=2**18, delay=3,
    ...                      memory="stash", optimizer_state_bytes=4 * 2**20)
    >>> {name: value / 2**20 for name, value in parts.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'parameters': 4.0, 'gradients': 4.0, 'optimizer_state': 4.0, 'weight_copies': 12.0, 'activations': 4.0,
     'total': 28.0}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_ddg._compat import tree_flatten
from lightning_ddg.schedule import copies_weights, keeps_graph

__all__ = ["SegmentMemory", "stage_memory", "segment_memory"]


@dataclass(frozen=True)
class SegmentMemory:
    """What one piece of a model brings to the memory of the stage that holds it, in bytes.

    ``activation_bytes``: what autograd saves for the backward of one batch through the piece (parameters
    excluded); ``input_bytes``: the piece's input for one batch.
    """

    parameter_bytes: int
    trainable_bytes: int
    activation_bytes: int
    input_bytes: int

    @staticmethod
    def join(pieces: Sequence[SegmentMemory]) -> SegmentMemory:
        """Consecutive pieces as one: their sums, and the first one's input."""
        return SegmentMemory(
            sum(p.parameter_bytes for p in pieces),
            sum(p.trainable_bytes for p in pieces),
            sum(p.activation_bytes for p in pieces),
            pieces[0].input_bytes,
        )


def stage_memory(
    parameter_bytes: float,
    activation_bytes: float,
    input_bytes: float,
    delay: int,
    memory: str,
    optimizer_state_bytes: float,
    trainable_bytes: float | None = None,
) -> dict[str, float]:
    """What a stage of delay ``delay`` holds, in bytes, by part, and their ``total``.

    Args:
        parameter_bytes: the stage's parameters.
        activation_bytes: what autograd saves for one batch's backward through the stage.
        input_bytes: the stage's input for one batch.
        delay: ``d_k``.
        memory: ``"stash"``, ``"recompute"`` or ``"replay"``.
        optimizer_state_bytes: the optimizer's state for the stage's parameters (SGD with momentum: their size;
            Adam: twice their size).
        trainable_bytes: the parameters that get gradients and are copied; by default all of them.
    """
    trainable = parameter_bytes if trainable_bytes is None else trainable_bytes
    in_flight = delay + 1
    copies = delay if copies_weights(memory, delay) else 0  # the batch being forwarded reads the live weights
    if keeps_graph(memory, delay):
        activations = in_flight * activation_bytes
    else:  # the inputs of the in-flight batches, and one batch's activations while it is recomputed
        activations = in_flight * input_bytes + activation_bytes
    parts = {
        "parameters": float(parameter_bytes),
        "gradients": float(trainable),
        "optimizer_state": float(optimizer_state_bytes),
        "weight_copies": float(copies * trainable),
        "activations": float(activations),
    }
    parts["total"] = sum(parts.values())
    return parts


def segment_memory(segments: Sequence[nn.Module], inputs: Sequence[Sequence[Any]]) -> list[SegmentMemory]:
    """What each piece holds, measured by one forward of its recorded input with autograd on (on the meta device
    this costs nothing and needs no data): the bytes of the tensors autograd saves, each storage once, parameters
    left out."""
    measured = []
    for segment, args in zip(segments, inputs, strict=True):
        params = list(segment.parameters())
        own = {p.untyped_storage()._cdata for p in params}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved: dict[int, int] = saved, own: set[int] = own) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage._cdata not in own:
                saved.setdefault(storage._cdata, storage.nbytes())
            return t

        leaves = [x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x for x in args]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            segment(*leaves)
        measured.append(
            SegmentMemory(
                parameter_bytes=sum(_bytes(p) for p in params),
                trainable_bytes=sum(_bytes(p) for p in params if p.requires_grad),
                activation_bytes=sum(saved.values()),
                input_bytes=sum(_bytes(x) for x in tree_flatten(list(args))[0] if isinstance(x, torch.Tensor)),
            )
        )
    return measured


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
