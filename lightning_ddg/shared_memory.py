"""Tensors between two stages on one host through shared memory instead of through loopback TCP.

On gloo, every tensor a channel sends is written into a socket by the sending thread and read out of it by a gloo
thread of the receiver: on a host whose cores all compute, that costs each side a few hundred microseconds of CPU
per MiB (``benchmarks/transfer_cost.py``). Between two processes of one host, a channel's sender instead copies a
message's tensors into a *slot*, a file in ``/dev/shm`` that both processes map, and the receiver copies them out
as the message's header arrives: one memory copy on each side. The header still travels over gloo and names the
slot, so receiving still waits on gloo alone, with its timeout, and a stopped peer still ends the wait.

A channel has a few slots, used in turn. The receiver marks a slot free once it has copied a message out (a
counter at the start of the slot); a sender that finds the next slot still taken, or cannot make it large enough
(``/dev/shm`` full), sends that message over gloo as before, so a sender never waits on shared memory.

A slot's file is named only until the receiver has mapped it: the receiver removes the name, and the memory goes
when both processes have let go of it. A slot that grows gets a new file. Only a process killed between creating
a file and its peer mapping it leaves a ``lightning-ddg-*`` file behind in ``/dev/shm``.

Example (both ends of one gloo channel agree on it with :func:`share_memory`)::

    writer = SlotWriter(slots=3)
    place = writer.write(tensors)      # (slot, generation, number), or None: send them over gloo instead
    # on the receiving side, with the place from the header:
    reader.read(place, buffers)         # copies the tensors into buffers, then frees the slot
"""

from __future__ import annotations

import atexit
import os
import platform
import secrets
from collections.abc import Sequence

import torch

__all__ = ["SHM_DIR", "SlotReader", "SlotWriter", "available"]

SHM_DIR = "/dev/shm"
_CONTROL = 64  # bytes before a slot's data: the number of the last message copied out of it plus one (0: none),
# and in the first slot until its first message, the number the receiver checks
_ALIGN = 64  # every tensor starts on a cache line
_MIN_SLOT = 1 << 16


def available() -> bool:
    """Whether slots can be used here: a shared-memory file system (Linux) on a processor that keeps a core's
    stores in order after its loads (x86-64), so that a slot marked free has been read to the end."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def _layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Each tensor's byte offset in a slot, and the slot's size."""
    offsets, end = [], _CONTROL
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return offsets, end


def _views(memory: torch.Tensor, specs: Sequence[tuple[torch.dtype, tuple[int, ...]]], offsets: list[int]):
    for (dtype, shape), start in zip(specs, offsets, strict=True):
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        yield memory[start : start + nbytes].view(dtype).view(shape)


def _map(path: str, size: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=size, dtype=torch.uint8)


class SlotWriter:
    """The sending end: ``slots`` files used in turn, created and grown as messages need."""

    def __init__(self, slots: int) -> None:
        self.token = 1 + secrets.randbits(62)  # never 0, which declines
        self.nonce = secrets.randbits(62)
        self._memory: list[torch.Tensor | None] = [None] * slots
        self._generation = [-1] * slots
        self._last = [-1] * slots  # the number of the last message written to each slot
        self._sent = 0  # messages written or sent over gloo: their numbers
        self.written = 0  # messages that went through the slots
        self._named: set[str] = set()  # files the receiver may not have mapped yet
        self._pid = os.getpid()  # a forked child that exits must not remove them
        atexit.register(self.close)
        self._create(0, _MIN_SLOT)
        assert self._memory[0] is not None
        self._memory[0][8:16].view(torch.int64)[0] = self.nonce  # the receiver checks it: the same memory

    def path(self, slot: int, generation: int) -> str:
        return os.path.join(SHM_DIR, f"lightning-ddg-{self.token:x}-{slot}-{generation}")

    def _create(self, slot: int, size: int) -> bool:
        path = self.path(slot, self._generation[slot] + 1)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, size)  # fails where /dev/shm is full, instead of a SIGBUS on writing
        except OSError:
            os.close(fd)
            os.unlink(path)
            return False
        os.close(fd)
        self._named.discard(self.path(slot, self._generation[slot]))  # mapped by the receiver: it removed the name
        self._named.add(path)
        self._memory[slot] = _map(path, size)
        self._generation[slot] += 1
        return True

    def write(self, tensors: Sequence[torch.Tensor]) -> tuple[int, int, int] | None:
        """Copy ``tensors`` into the next slot and return where they are (slot, its generation, the message's
        number); ``None`` where the slot is still taken or cannot grow: the message goes over gloo instead."""
        if not tensors:
            return None  # the header says it all
        number, self._sent = self._sent, self._sent + 1
        slot = number % len(self._memory)
        memory = self._memory[slot]
        if memory is not None and self._last[slot] >= 0:
            copied = int(memory[:8].view(torch.int64)[0]) - 1
            if copied < self._last[slot]:
                return None  # the receiver has not taken the message written there last
        offsets, size = _layout(tensors)
        if memory is None or memory.numel() < size:
            if not self._create(slot, max(size, 2 * (memory.numel() if memory is not None else 0), _MIN_SLOT)):
                return None
            memory = self._memory[slot]
            assert memory is not None
        specs = [(t.dtype, tuple(t.shape)) for t in tensors]
        for view, t in zip(_views(memory, specs, offsets), tensors, strict=True):
            view.copy_(t.detach())
        self._last[slot] = number
        self.written += 1
        return slot, self._generation[slot], number

    def close(self) -> None:
        """Remove the names the receiver has not removed (it never mapped those files)."""
        for path in self._named if os.getpid() == self._pid else ():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._named.clear()
        self._memory = [None] * len(self._memory)
        atexit.unregister(self.close)


class SlotReader:
    """The receiving end of a :class:`SlotWriter` whose ``token`` it was told."""

    def __init__(self, token: int, slots: int) -> None:
        self.token = token
        self._memory: list[torch.Tensor | None] = [None] * slots
        self._generation = [-1] * slots

    def open(self, nonce: int) -> bool:
        """Map the writer's first slot; ``True`` when it holds ``nonce``: both ends see the same memory."""
        try:
            self._map(0, 0)
        except (OSError, RuntimeError):
            return False
        memory = self._memory[0]
        assert memory is not None
        return int(memory[8:16].view(torch.int64)[0]) == nonce

    def _map(self, slot: int, generation: int) -> None:
        path = os.path.join(SHM_DIR, f"lightning-ddg-{self.token:x}-{slot}-{generation}")
        self._memory[slot] = _map(path, os.stat(path).st_size)
        os.unlink(path)  # mapped by both ends now: the memory goes with the last mapping
        self._generation[slot] = generation

    def read(self, place: tuple[int, int, int], buffers: Sequence[torch.Tensor]) -> None:
        """Copy the message at ``place`` into ``buffers`` (shaped like its tensors), then free its slot."""
        slot, generation, number = place
        if generation != self._generation[slot]:
            self._map(slot, generation)
        memory = self._memory[slot]
        assert memory is not None
        offsets, _ = _layout(buffers)
        specs = [(b.dtype, tuple(b.shape)) for b in buffers]
        for view, b in zip(_views(memory, specs, offsets), buffers, strict=True):
            b.copy_(view)
        memory[:8].view(torch.int64)[0] = number + 1

    def close(self) -> None:
        self._memory = [None] * len(self._memory)
