"""Point-to-point transport of tensor lists between neighbouring stages.

Each direction of each link between two stages is a :class:`Channel` with its own process group, so that
activations flowing forward and gradients flowing backward never queue behind each other (on NCCL, two
opposite transfers on one communicator can deadlock). Every message is a fixed-size header — the dtype and
shape of each tensor — followed by one transfer per tensor, so batches of any size travel without padding.
Receives of the next header are posted as soon as the previous message arrived, and sends never block:
they complete in the background and are reaped later.

Example (two processes, gloo)::

    link = Channel(peer=1, group=group)   # on rank 0
    link.send([x, skip])
    # on rank 1: x, skip = Channel(peer=0, group=group).recv()
"""

from __future__ import annotations

from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Channel", "HEADER_SIZE"]

HEADER_SIZE = 256
_END = -1
_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


def _encode(tensors: list[torch.Tensor]) -> torch.Tensor:
    values = [len(tensors)]
    for t in tensors:
        if t.dtype not in _CODE:
            raise TypeError(f"tensors of dtype {t.dtype} cannot cross a stage boundary")
        values += [_CODE[t.dtype], t.dim(), *t.shape]
    if len(values) > HEADER_SIZE:
        raise ValueError(
            f"{len(tensors)} tensors crossing one stage boundary need a header of {len(values)} entries, more than "
            f"{HEADER_SIZE}: choose split points where fewer values cross."
        )
    return torch.tensor(values + [0] * (HEADER_SIZE - len(values)), dtype=torch.int64)


def _decode(header: torch.Tensor) -> list[tuple[torch.dtype, list[int]]] | None:
    values = header.tolist()
    count, pos, specs = values[0], 1, []
    if count == _END:
        return None
    for _ in range(count):
        dtype, ndim = _DTYPES[values[pos]], values[pos + 1]
        specs.append((dtype, values[pos + 2 : pos + 2 + ndim]))
        pos += 2 + ndim
    return specs


class Channel:
    """One direction of a link: sends to, or receives from, ``peer`` on a two-rank ``group``.

    Args:
        peer: global rank of the other end.
        group: a process group holding exactly this rank and ``peer``, used by nothing else.
        device: where received tensors are placed (the stage's device).
        timeout: how long a receive waits before raising, so that a dead peer cannot hang this rank.
    """

    def __init__(
        self,
        peer: int,
        group: dist.ProcessGroup,
        device: torch.device | str = "cpu",
        timeout: timedelta = timedelta(minutes=30),
    ) -> None:
        self.peer = peer
        self.group = group
        self.device = torch.device(device)
        self.timeout = timeout
        # headers travel on the host for gloo and on the device for NCCL
        self._header_device = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self._sends: deque[tuple[dist.Work, list[torch.Tensor]]] = deque()
        self._header: torch.Tensor | None = None
        self._header_work: dist.Work | None = None
        self.closed = False

    # sending -------------------------------------------------------------------------------------------
    def send(self, tensors: list[torch.Tensor]) -> None:
        """Start sending ``tensors``; returns at once. The tensors must not be modified afterwards."""
        self._reap()
        header = _encode(tensors).to(self._header_device)
        payload = [t.detach().contiguous() for t in tensors]
        works = [dist.isend(header, self.peer, group=self.group)]
        works += [dist.isend(t, self.peer, group=self.group) for t in payload]
        for work, keep in zip(works, [[header], *[[t] for t in payload]], strict=False):
            self._sends.append((work, keep))

    def _reap(self) -> None:
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()

    def flush(self) -> None:
        """Wait until every message sent so far has been received."""
        while self._sends:
            work, _ = self._sends.popleft()
            work.wait(self.timeout)

    # receiving -----------------------------------------------------------------------------------------
    def _post_header(self) -> None:
        self._header = torch.empty(HEADER_SIZE, dtype=torch.int64, device=self._header_device)
        self._header_work = dist.irecv(self._header, self.peer, group=self.group)

    def prefetch(self) -> None:
        """Post the receive of the next message's header ahead of need."""
        if self._header_work is None:
            self._post_header()

    def recv(self) -> list[torch.Tensor]:
        """Receive the next message; the receive of the one after it is posted before returning."""
        self.prefetch()
        assert self._header_work is not None and self._header is not None
        self._header_work.wait(self.timeout)
        self._header_work = None
        specs = _decode(self._header.cpu())
        if specs is None:
            raise RuntimeError(f"rank {self.peer} closed the channel while this rank still expected data")
        tensors = [torch.empty(shape, dtype=dtype, device=self.device) for dtype, shape in specs]
        works = [dist.irecv(t, self.peer, group=self.group) for t in tensors]
        self._post_header()
        for work in works:
            work.wait(self.timeout)
        return tensors

    # shutting down -------------------------------------------------------------------------------------
    def send_end(self) -> None:
        """Tell the peer that no more data follows: this answers its posted header receive."""
        end = torch.zeros(HEADER_SIZE, dtype=torch.int64, device=self._header_device)
        end[0] = _END
        self._sends.append((dist.isend(end, self.peer, group=self.group), [end]))

    def close_recv(self) -> None:
        """Consume the peer's end-of-data marker, so that no receive stays posted."""
        self.prefetch()
        assert self._header_work is not None and self._header is not None
        self._header_work.wait(self.timeout)
        self._header_work = None
        if _decode(self._header.cpu()) is not None:
            raise RuntimeError(f"rank {self.peer} sent data that this rank never received")
