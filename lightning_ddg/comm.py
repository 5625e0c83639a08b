"""Point-to-point transport of tensor lists between neighbouring stages.

Each direction of each link between two stages is a :class:`Channel` with its own process group, so that
activations flowing forward and gradients flowing backward never queue behind each other (on NCCL, two
opposite transfers on one communicator can deadlock). Every message is a fixed-size header — the dtype and
shape of each tensor, and an optional *note* of a few integers that rides along for free — followed by one
transfer per tensor, so batches of any size travel without padding. Besides tensors, a message may hold
``None`` and Python booleans, integers and floats (an optional mask left out, timm's ``is_causal=False``, a
size read from a shape): they travel in the header.
As soon as a message has arrived, the receives of the next one are posted, shaped like it; a sender whose
shapes changed first answers those receives with placeholders. Sends never block: they complete in the
background and are reaped later. A receiver hands the tensors it is done with back (:meth:`Channel.release`)
and later messages arrive in them, so that in steady state receiving allocates nothing. Between two processes of
one host, a gloo channel carries its messages through shared memory after a handshake at setup
(:func:`share_memory`, :mod:`~lightning_ddg.shared_memory`): the header goes through a pipe and names the slot that
holds the tensors, and where the slot is still taken the tensors follow over gloo.

Example (two processes, gloo)::

    link = Channel(peer=1, group=group)   # on rank 0
    link.send([x, skip])
    # on rank 1: x, skip = Channel(peer=0, group=group).recv()

A weight that several stages use (tied embeddings) has a copy on each; :class:`TiedGroup` is the collective that
keeps the copies equal: the ranks holding a copy start from one rank's values and sum their gradients before
every update of the weight.
"""

from __future__ import annotations

import struct
import time
from array import array
from collections import deque
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lightning_ddg import shared_memory
from lightning_ddg._compat import storage_use_count
from lightning_ddg.shared_memory import Place, SlotReader, SlotWriter

__all__ = ["Channel", "HEADER_SIZE", "PipelineStopped", "TiedGroup", "UNREAPED_MESSAGES", "share_memory"]

HEADER_SIZE = 256
# the header's last four entries say where in shared memory the tensors are: the slot + 1 (0: they follow over
# gloo), the slot's generation and file descriptor, the message's number (shared_memory.Place)
_ROOM = HEADER_SIZE - 4
UNREAPED_MESSAGES = 1  # messages besides the newest whose sends are not waited on yet
_MAX_FREE = 8  # released buffers kept per shape
_END = -1
# in a dtype's place: a value that travels in the header, followed by its payload (none for None)
_VALUE_CODE = {type(None): -1, bool: -2, int: -3, float: -4}
_VALUE_TYPE = {code: kind for kind, code in _VALUE_CODE.items()}
_TENSOR = object()  # in a decoded message's layout: the next tensor received
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


Specs = tuple[tuple[torch.dtype, tuple[int, ...]], ...]  # a message's tensors: dtype and shape of each


class PipelineStopped(Exception):
    """The peer ended the channel because the job was asked to stop (a scheduler's SIGTERM, say): ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"the pipeline was stopped by signal {signum}")
        self.signum = signum


def crosses(value: Any) -> bool:
    """Whether ``value`` can be sent between stages: a tensor, ``None``, or a Python bool, int or float."""
    return isinstance(value, torch.Tensor) or type(value) in _VALUE_CODE


def _specs(tensors: list[torch.Tensor]) -> Specs:
    return tuple((t.dtype, tuple(t.shape)) for t in tensors)


def _tensors(message: list[Any]) -> list[torch.Tensor]:
    return [v for v in message if isinstance(v, torch.Tensor)]


def _encode(message: list[Any], note: list[int] | None = None, place: Place | None = None) -> list[int]:
    """The header of ``message``; ``place`` says where in shared memory its tensors are (else they follow)."""
    values = [len(message)]
    for item in message:
        if not isinstance(item, torch.Tensor):
            values.append(_VALUE_CODE[type(item)])
            if type(item) is float:
                values.append(struct.unpack("<q", struct.pack("<d", item))[0])
            elif item is not None:
                values.append(int(item))
            continue
        dtype, shape = item.dtype, tuple(item.shape)
        if dtype not in _CODE:
            raise TypeError(
                f"tensors of dtype {dtype} cannot cross a stage boundary; those of {', '.join(map(str, _DTYPES))} "
                "can. Cast the value to one of them before the cut (e.g. x.to(torch.float32)), or choose a split "
                "point it does not cross."
            )
        values += [_CODE[dtype], len(shape), *shape]
    if len(values) + 1 > _ROOM:
        raise ValueError(
            f"{len(message)} values crossing one stage boundary need a header of {len(values)} entries, more than "
            f"{_ROOM}: choose split points where fewer values cross."
        )
    note = note or []
    if len(values) + 1 + len(note) > _ROOM:
        note = []  # a note is best effort: it never costs a message of its own
    values += [len(note), *note]
    slot, *where = place if place is not None else (-1, 0, 0, 0)
    return values + [0] * (_ROOM - len(values)) + [slot + 1, *where]


def _end(signum: int) -> list[int]:
    """The header that ends a channel's data: ``signum`` is the signal that stopped the job, 0 for a plain end."""
    return [_END, signum] + [0] * (HEADER_SIZE - 2)


def _held_only_by(t: torch.Tensor) -> bool:
    """Whether no tensor but ``t`` holds its data (the count includes the storage object asked here)."""
    count = storage_use_count(t)
    return count is not None and count <= 2


def _decode(values: list[int]) -> tuple[Specs, list[Any] | None, list[int], Place | None]:
    """The message's tensors' specs; its layout (the values that travelled in the header, ``_TENSOR`` where a
    tensor goes), None for the end of the data; the note; and where in shared memory the tensors are, if there."""
    count, pos, specs, layout = values[0], 1, [], []
    if count == _END:
        return (), None, values[1:2], None  # the signal that stopped the job, 0 for a plain end
    slot, *where = values[_ROOM:]
    place = (slot - 1, *where) if slot else None
    for _ in range(count):
        code = values[pos]
        kind = _VALUE_TYPE.get(code)
        if kind is type(None):
            layout.append(None)
            pos += 1
            continue
        if kind is not None:
            payload = values[pos + 1]
            layout.append(struct.unpack("<d", struct.pack("<q", payload))[0] if kind is float else kind(payload))
            pos += 2
            continue
        dtype, ndim = _DTYPES[code], values[pos + 1]
        specs.append((dtype, tuple(values[pos + 2 : pos + 2 + ndim])))
        layout.append(_TENSOR)
        pos += 2 + ndim
    return tuple(specs), layout, values[pos + 1 : pos + 1 + values[pos]], place


def _assemble(layout: list[Any], tensors: list[torch.Tensor]) -> list[Any]:
    received = iter(tensors)
    return [next(received) if item is _TENSOR else item for item in layout]


class Channel:
    """One direction of a link: sends to, or receives from, ``peer`` on a two-rank ``group``.

    Args:
        peer: global rank of the other end.
        group: a process group holding exactly this rank and ``peer``, used by nothing else.
        device: where received tensors are placed (the stage's device).
        timeout: how long a receive waits before raising, so that a dead peer cannot hang this rank.
        unreaped: messages besides the newest whose sends are not waited on yet: how far the sender may run
            ahead of the receiver before a send waits.
    """

    def __init__(
        self,
        peer: int,
        group: dist.ProcessGroup,
        device: torch.device | str = "cpu",
        timeout: timedelta = timedelta(minutes=30),
        unreaped: int = UNREAPED_MESSAGES,
    ) -> None:
        self.peer = peer
        self.unreaped = unreaped
        self.group = group
        self.device = torch.device(device)
        self.timeout = timeout
        # headers travel on the host for gloo and on the device for NCCL
        self._header_device = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        # per message sent: its transfers, with their tensors, which must live until the transfer is done
        self._sends: deque[list[tuple[dist.Work, torch.Tensor]]] = deque()
        self._sent_specs: Specs | None = None  # shapes of the last message sent
        self._expected: Specs | None = None  # shapes of the last message received
        self._posted: tuple[torch.Tensor, list[torch.Tensor], list[dist.Work]] | None = None
        self._free: dict[tuple[torch.dtype, tuple[int, ...]], list[torch.Tensor]] = {}  # released, by shape
        self._free_header: torch.Tensor | None = None
        self.note: list[int] = []  # the note of the last message received
        self.blocked_s = 0.0  # seconds sends waited for the peer to take older messages (it lagged behind)
        self.copied_s = 0.0  # seconds receives spent copying tensors out of shared memory: work, not waiting
        # with a peer on this host: the tensors travel through shared memory (share_memory), the header over gloo
        self._writer: SlotWriter | None = None
        self._reader: SlotReader | None = None

    @property
    def slots(self) -> int:
        """Shared-memory slots the messages take in turn: enough that a receiver that keeps up always frees one
        before the sender comes back to it (the sender runs at most ``unreaped + 1`` messages ahead)."""
        return self.unreaped + 2

    @property
    def shares_memory(self) -> bool:
        """Whether tensors reach the peer through shared memory (see :func:`share_memory`)."""
        return self._writer is not None or self._reader is not None

    # sending -------------------------------------------------------------------------------------------
    def send(self, message: list[Any], note: list[int] | None = None, may_change: bool = False) -> None:
        """Start sending ``message`` (tensors and values that :func:`crosses` allows), and ``note`` in the header
        if it fits; returns at once. The tensors must not be modified afterwards, unless ``may_change``: the
        channel then sends copies where it does not copy them at once (into shared memory) anyway."""
        self._retire_old_sends()
        self._sends.append([])
        tensors = _tensors(message)
        if self._writer is not None:
            place = self._writer.write(tensors)
            self._writer.post(array("q", _encode(message, note, place)).tobytes())
            if place is None:  # the slot is still taken: the tensors follow over gloo
                for t in tensors:
                    self._isend(t.detach().clone() if may_change else t.detach().contiguous())
            return
        self._isend(self._header(_encode(message, note)))
        specs = _specs(tensors)
        if self._sent_specs is not None and specs != self._sent_specs:
            self._fill_posted(self._sent_specs)
        for t in tensors:
            self._isend(t.detach().clone() if may_change else t.detach().contiguous())
        self._sent_specs = specs

    def _header(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64).to(self._header_device)

    def _isend(self, tensor: torch.Tensor) -> None:
        self._sends[-1].append((dist.isend(tensor, self.peer, group=self.group), tensor))

    def _fill_posted(self, specs: Specs) -> None:
        # the peer has posted receives shaped like the previous message; answer them with placeholders
        for dtype, shape in specs:
            self._isend(torch.empty(shape, dtype=dtype, device=self.device))

    def _retire_old_sends(self) -> None:
        # A transfer is known to be done only once waited on (gloo never reports completion otherwise), so keep
        # the last two messages in flight and wait on older ones: the peer has posted their receives long ago
        # and they are done, so the wait returns at once and the number of buffers held stays bounded. Where the
        # peer lags behind, it does not: that wait is on the peer (blocked_s), not the cost of sending.
        start = time.perf_counter()
        while len(self._sends) > self.unreaped:
            for work, _ in self._sends.popleft():
                work.wait(self.timeout)
        self.blocked_s += time.perf_counter() - start

    @property
    def pending_sends(self) -> int:
        """Transfers started and not waited on yet (each holds its tensor)."""
        return sum(len(message) for message in self._sends)

    def flush(self) -> None:
        """Wait until every message sent so far has been received."""
        while self._sends:
            for work, _ in self._sends.popleft():
                work.wait(self.timeout)
        deadline = time.monotonic() + self.timeout.total_seconds()
        while self._writer is not None and self._writer.unread():  # the receiver takes the headers left in the pipe
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.peer} took no message through shared memory in {self.timeout}")
            time.sleep(0.001)

    # receiving -----------------------------------------------------------------------------------------
    def prefetch(self) -> None:
        """Post the receives of the next message ahead of need: its header, and its data shaped like the
        previous message's (in steady state shapes do not change, so the data moves without a round trip)."""
        if self._posted is not None or self._reader is not None:  # through shared memory, nothing is posted
            return
        header, self._free_header = self._free_header, None
        if header is None:
            header = torch.empty(HEADER_SIZE, dtype=torch.int64, device=self._header_device)
        works = [dist.irecv(header, self.peer, group=self.group)]
        tensors = [self._buffer(dtype, shape) for dtype, shape in self._expected or ()]
        works += [dist.irecv(t, self.peer, group=self.group) for t in tensors]
        self._posted = (header, tensors, works)

    def _buffer(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        free = self._free.get((dtype, shape))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=self.device)

    def release(self, received: list[Any]) -> None:
        """Hand back received tensors the caller is done with: later messages arrive in them. A tensor whose
        data another tensor still shares (a view of it kept, or being sent on; a gradient made of it) is left
        alone; the caller must neither use a released tensor again nor have handed the object itself on."""
        for t in _tensors(received):
            free = self._free.setdefault((t.dtype, tuple(t.shape)), [])
            if len(free) < _MAX_FREE and _held_only_by(t):
                free.append(t.requires_grad_(False))  # a received tensor is a leaf of any graph it was in

    def _take_posted(
        self,
    ) -> tuple[Specs, list[Any] | None, list[torch.Tensor], list[dist.Work], Place | None]:
        if self._reader is not None:
            raw = self._reader.take(8 * HEADER_SIZE, self.timeout.total_seconds())
            specs, layout, self.note, place = _decode(array("q", raw).tolist())
            return specs, layout, [], [], place
        self.prefetch()
        assert self._posted is not None
        header, tensors, works = self._posted
        self._posted = None
        works[0].wait(self.timeout)
        specs, layout, self.note, place = _decode(header.cpu().tolist())
        self._free_header = header
        return specs, layout, tensors, works[1:], place

    def recv(self) -> list[Any]:
        """Receive the next message; the receives of the one after it are posted before returning."""
        expected = self._expected
        specs, layout, tensors, works, place = self._take_posted()
        if layout is None:
            if self.note and self.note[0]:
                raise PipelineStopped(self.note[0])
            raise RuntimeError(f"rank {self.peer} closed the channel while this rank still expected data")
        if place is not None:
            assert self._reader is not None and not works
            start = time.perf_counter()
            tensors = [self._buffer(dtype, shape) for dtype, shape in specs]
            self._reader.read(place, tensors)
            self.copied_s += time.perf_counter() - start
            return _assemble(layout, tensors)
        if specs != expected:
            for work in works:  # placeholders for the buffers posted with the previous shapes
                work.wait(self.timeout)
            self.release(tensors)
            tensors = [self._buffer(dtype, shape) for dtype, shape in specs]
            works = [dist.irecv(t, self.peer, group=self.group) for t in tensors]
        if self._reader is None:  # with shared memory, no data is posted ahead
            self._expected = specs
        self.prefetch()
        for work in works:
            work.wait(self.timeout)
        return _assemble(layout, tensors)

    # shutting down -------------------------------------------------------------------------------------
    def send_end(self, signum: int = 0) -> None:
        """Tell the peer that no more data follows: this answers the receives it has posted. With ``signum``, the
        job is stopping because of that signal, and the peer's :meth:`recv` raises :class:`PipelineStopped`."""
        if self._writer is not None:
            self._writer.post(array("q", _end(signum)).tobytes())
            return
        self._sends.append([])
        self._isend(self._header(_end(signum)))
        if self._sent_specs is not None:
            self._fill_posted(self._sent_specs)
        self._sent_specs = None

    def close_recv(self) -> None:
        """Consume the peer's end-of-data marker, so that no receive stays posted."""
        _, layout, _, works, _ = self._take_posted()
        for work in works:
            work.wait(self.timeout)
        self._expected = None
        self._free.clear()
        if layout is not None:
            raise RuntimeError(f"rank {self.peer} sent data that this rank never received")

    def release_memory(self) -> None:
        """Let go of the shared memory, at the end of a run (after :meth:`send_end` and :meth:`close_recv`, or
        where the peer stopped): names the peer never mapped are removed."""
        for end in (self._writer, self._reader):
            if end is not None:
                end.close()
        self._writer = self._reader = None


def share_memory(sending: list[Channel], receiving: list[Channel]) -> None:
    """Let every channel here whose two ends share a host carry its messages through shared memory and a pipe
    (:mod:`~lightning_ddg.shared_memory`): gloo channels on the host, where :func:`shared_memory.available`.

    A collective between neighbours at setup: every rank passes every channel it sends and receives on. The sender
    offers a slot holding a random number, and its pipe; the receiver accepts where it finds that number in the
    slot, which it does only on the same host. Each rank posts all its offers before it waits on any, so no two ranks
    wait on each other.
    """

    def on_gloo(channels: list[Channel]) -> list[Channel]:
        return [c for c in channels if dist.get_backend(c.group) == "gloo"]  # both ends see the same backend

    def usable(channel: Channel) -> bool:
        return channel.device.type == "cpu" and shared_memory.available()

    offers, works = [], []
    for channel in on_gloo(sending):
        writer = None
        if usable(channel):
            try:
                writer = SlotWriter(channel.slots)
            except OSError:
                pass
        values = [writer.pid, writer.first_fd, writer.header_fd, writer.nonce] if writer is not None else [0] * 4
        offer = torch.tensor(values, dtype=torch.int64)
        works.append(dist.isend(offer, channel.peer, group=channel.group))
        offers.append((channel, writer, offer))
    offered = []
    for channel in on_gloo(receiving):
        offer = torch.zeros(4, dtype=torch.int64)
        offered.append((channel, offer, dist.irecv(offer, channel.peer, group=channel.group)))
    replies = []
    for channel, offer, work in offered:
        work.wait(channel.timeout)
        pid, first_fd, header_fd, nonce = offer.tolist()
        reader = SlotReader(pid, channel.slots) if pid and usable(channel) else None
        if reader is not None and reader.open(first_fd, header_fd, nonce):
            channel._reader = reader
        elif reader is not None:
            reader.close()
        reply = torch.tensor([int(channel._reader is not None)], dtype=torch.int64)
        works.append(dist.isend(reply, channel.peer, group=channel.group))
        replies.append(reply)
    for channel, writer, _ in offers:
        reply = torch.zeros(1, dtype=torch.int64)
        dist.irecv(reply, channel.peer, group=channel.group).wait(channel.timeout)
        if writer is not None and reply.item():
            writer.accepted()
            channel._writer = writer
        elif writer is not None:
            writer.close()
    for work in works:
        work.wait()


class TiedGroup:
    """The ranks holding a copy of one tied weight: the stages that use it, in every replica of the pipeline.

    Args:
        group: a process group of exactly those ranks, used by nothing else (every rank of the job creates it, in
            the same order as the other groups: :meth:`lightning_ddg.topology.StageLinks.create`).
        source: the global rank whose values every copy starts from.
        num_replicas: the replicas of the pipeline; the gradients are summed over the stages and averaged over
            the replicas.

    Example (on each rank holding a copy of ``weight``)::

        tied.broadcast(weight)    # at setup: every copy starts equal
        tied.combine(grad)        # before each update of the weight: in place, the same on every copy
        weight.grad = grad
    """

    def __init__(self, group: dist.ProcessGroup, source: int, num_replicas: int = 1) -> None:
        self.group = group
        self.source = source
        self.num_replicas = num_replicas

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Give ``tensor`` the values of the source rank's copy (a collective over the group)."""
        dist.broadcast(tensor, src=self.source, group=self.group)

    def combine(self, grad: torch.Tensor) -> None:
        """Sum ``grad`` over the stages holding the weight and average it over the replicas, in place (a collective
        over the group). Every rank ends with the same bits: gloo and NCCL hand every rank the same reduced data."""
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.group)
        if self.num_replicas > 1:
            grad.div_(self.num_replicas)
