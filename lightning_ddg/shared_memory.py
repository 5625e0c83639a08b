"""Messages between two stages on one host through shared memory and a pipe instead of through loopback TCP.

On gloo, every transfer a channel makes costs both processes CPU time in gloo's threads besides the calling one:
about 100–170 µs on each side for a message's 2 KiB header alone, against 10–30 through a pipe, and a few
hundred microseconds more per MiB of tensors (``benchmarks/transfer_cost.py``), taken from compute on a host whose
cores all compute. Between two processes of one host, a channel's sender instead copies a message's tensors into a
*slot*, memory that both processes map, and writes the message's header into a pipe; the receiver reads the header
from the pipe and copies the tensors out: one memory copy on each side, and a few system calls.

A channel has a few slots, used in turn. The receiver marks a slot free once it has copied a message out (a
counter at the start of the slot); a sender that finds the next slot still taken, or cannot make it large enough
(the host's memory is short), sends that message's tensors over gloo after its header, so a sender never waits on
shared memory.

A slot is an anonymous memory file of the sending process (``memfd_create``), which the receiver opens through
``/proc/<pid>/fd``, as it opens the pipe's reading end: neither has a name anywhere, and their memory goes when both
processes have let go of them, however they end. A slot that grows gets a new file. Once the receiver holds the
pipe's reading end, the sender keeps only its writing end: a receive sees the end of the pipe as soon as the
sender has exited, and waits at most the channel's timeout for a sender that lives.

Example (both ends of one gloo channel agree on it with :func:`lightning_ddg.comm.share_memory`)::

    writer = SlotWriter(slots=3)        # sending process; tells the receiver its pid, first_fd, header_fd, nonce
    reader = SlotReader(pid, slots=3)   # receiving process
    assert reader.open(first_fd, header_fd, nonce)   # the same memory: the same host
    writer.accepted()                   # the receiver holds the pipe
    place = writer.write(tensors)       # where they are, or None: send them over gloo instead
    writer.post(header)                 # the header's bytes, naming the place
    header = reader.take(len(header), timeout_s)
    reader.read(place, buffers)         # copies the tensors into buffers, then frees the slot
"""

from __future__ import annotations

import os
import platform
import secrets
import select
import weakref
from collections.abc import Iterator, Sequence

import torch

__all__ = ["Place", "SlotReader", "SlotWriter", "WriterGone", "available"]

Place = tuple[int, int, int, int]  # a message's slot, the slot's generation and file descriptor, the message's number
_CONTROL = 64  # bytes before a slot's data: the number of the last message copied out of it plus one (0: none),
# and in the first slot until its first message, the number the receiver checks
_ALIGN = 64  # every tensor starts on a cache line
_MIN_SLOT = 1 << 16
_PIPE_SIZE = 1 << 20  # headers a receiver may lag behind before the sender's write waits: 512 of 2 KiB


def available() -> bool:
    """Whether slots can be used here: Linux's anonymous memory files, on a processor that keeps a core's stores in
    order after its loads (x86-64), so that a slot marked free has been read to the end."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


_ENDS: weakref.WeakSet = weakref.WeakSet()  # the writers and readers of this process


def _close_in_forked_child() -> None:
    """A process forked from a stage (a data loader's worker) lets go of the stage's pipes and slots: a pipe then
    ends as soon as the stage that writes it exits, whatever its workers still do."""
    for end in list(_ENDS):
        end.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_forked_child)


class WriterGone(ConnectionError):
    """The process that sends on a channel has exited: its pipe has ended, or a slot it named cannot be opened any
    more. A peer went away, like a closed connection over gloo."""


def _layout(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Each tensor's byte offset in a slot, and the slot's size."""
    offsets, end = [], _CONTROL
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return offsets, end


def _views(memory: torch.Tensor, tensors: Sequence[torch.Tensor], offsets: list[int]) -> Iterator[torch.Tensor]:
    """Where each of ``tensors`` (or tensors shaped like them) lies in the slot ``memory``, at ``offsets``."""
    for t, start in zip(tensors, offsets, strict=True):
        yield memory[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)


def _counter(memory: torch.Tensor, which: int = 0) -> torch.Tensor:
    return memory[8 * which : 8 * which + 8].view(torch.int64)


class SlotWriter:
    """The sending end: ``slots`` memory files used in turn, created and grown as messages need."""

    def __init__(self, slots: int) -> None:
        import fcntl  # here, as everything of this module's, only where available(): not on Windows

        self.pid = os.getpid()
        self.nonce = 1 + secrets.randbits(62)
        self.written = 0  # messages that went through the slots
        self._memory: list[torch.Tensor | None] = [None] * slots
        self._fds = [-1] * slots
        self._generation = [-1] * slots
        self._last = [-1] * slots  # the number of the last message written to each slot
        self._sent = 0  # messages written or sent over gloo: their numbers
        if not self._create(0, _MIN_SLOT):
            raise OSError("no memory for a shared slot")
        _counter(self._memory[0], 1)[0] = self.nonce  # type: ignore[index]  # the receiver checks it
        self.header_fd, self._header_out = os.pipe2(os.O_CLOEXEC)  # the receiver opens the reading end
        _ENDS.add(self)
        try:
            fcntl.fcntl(self._header_out, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass  # above the host's limit for pipes: the default (64 KiB) does, with writes that wait sooner

    @property
    def first_fd(self) -> int:
        return self._fds[0]

    def accepted(self) -> None:
        """The receiver holds the pipe's reading end: let go of this one, so that the pipe ends with the receiver."""
        os.close(self.header_fd)
        self.header_fd = -1

    def post(self, header: bytes) -> None:
        """Write a message's header into the pipe (at most 4 KiB: one write, never interleaved or split)."""
        os.write(self._header_out, header)

    def unread(self) -> int:
        """Bytes of headers posted that the receiver has not taken yet."""
        import fcntl
        import termios

        return int.from_bytes(fcntl.ioctl(self._header_out, termios.FIONREAD, bytes(4)), "little")

    def _create(self, slot: int, size: int) -> bool:
        try:
            fd = os.memfd_create(f"lightning-ddg-slot-{slot}", os.MFD_CLOEXEC)
        except OSError:
            return False
        try:
            os.posix_fallocate(fd, 0, size)  # fails where memory is short, instead of a SIGBUS on writing
            memory = torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=size, dtype=torch.uint8)
        except (OSError, RuntimeError):
            os.close(fd)
            return False
        if self._fds[slot] >= 0:
            os.close(self._fds[slot])  # its last message was read: the receiver has mapped it
        self._fds[slot], self._memory[slot] = fd, memory
        self._generation[slot] += 1
        return True

    def write(self, tensors: Sequence[torch.Tensor]) -> Place | None:
        """Copy ``tensors`` into the next slot and return where they are; ``None`` where the slot is still taken or
        cannot grow: the message's tensors go over gloo instead."""
        if not tensors:
            return None  # the header says it all
        number, self._sent = self._sent, self._sent + 1
        slot = number % len(self._memory)
        memory = self._memory[slot]
        if memory is not None and self._last[slot] >= 0 and int(_counter(memory)[0]) - 1 < self._last[slot]:
            return None  # the receiver has not taken the message written there last
        offsets, size = _layout(tensors)
        if memory is None or memory.numel() < size:
            if not self._create(slot, max(size, 2 * (memory.numel() if memory is not None else 0), _MIN_SLOT)):
                return None
            memory = self._memory[slot]
            assert memory is not None
        for view, t in zip(_views(memory, tensors, offsets), tensors, strict=True):
            view.copy_(t.detach())
        self._last[slot] = number
        self.written += 1
        return slot, self._generation[slot], self._fds[slot], number

    def close(self) -> None:
        for fd in [*self._fds, self.header_fd, self._header_out]:
            if fd >= 0:
                os.close(fd)
        self._fds = [-1] * len(self._fds)
        self.header_fd = self._header_out = -1
        self._memory = [None] * len(self._memory)


class SlotReader:
    """The receiving end of the :class:`SlotWriter` of process ``pid``."""

    def __init__(self, pid: int, slots: int) -> None:
        self.pid = pid
        self._memory: list[torch.Tensor | None] = [None] * slots
        self._generation = [-1] * slots
        self._header_in = -1
        self._poll = select.poll()
        _ENDS.add(self)

    def open(self, first_fd: int, header_fd: int, nonce: int) -> bool:
        """Map the writer's first slot and open its pipe; ``True`` when the slot holds ``nonce``: both ends see the
        same memory."""
        try:
            self._map(0, 0, first_fd)
            if int(_counter(self._memory[0], 1)[0]) != nonce:  # type: ignore[arg-type]
                return False
            self._header_in = os.open(f"/proc/{self.pid}/fd/{header_fd}", os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, RuntimeError):
            return False
        self._poll.register(self._header_in, select.POLLIN)
        return True

    def take(self, size: int, timeout_s: float) -> bytes:
        """The next header posted, of ``size`` bytes; waits at most ``timeout_s`` for it to begin."""
        if not self._poll.poll(timeout_s * 1000):
            raise TimeoutError(f"process {self.pid} sent no message through shared memory in {timeout_s:.0f} s")
        header = b""
        while len(header) < size:
            data = os.read(self._header_in, size - len(header))
            if not data:
                raise WriterGone(f"process {self.pid}, which sends on this channel through shared memory, has exited")
            header += data
        return header

    def _map(self, slot: int, generation: int, fd: int) -> None:
        path = f"/proc/{self.pid}/fd/{fd}"
        try:
            self._memory[slot] = torch.from_file(path, shared=True, size=os.stat(path).st_size, dtype=torch.uint8)
        except (OSError, RuntimeError) as err:  # its files close as the process exits
            raise WriterGone(f"process {self.pid} sent a message through shared memory and has exited") from err
        self._generation[slot] = generation

    def read(self, place: Place, buffers: Sequence[torch.Tensor]) -> None:
        """Copy the message at ``place`` into ``buffers`` (shaped like its tensors), then free its slot."""
        slot, generation, fd, number = place
        if generation != self._generation[slot]:
            self._map(slot, generation, fd)
        memory = self._memory[slot]
        assert memory is not None
        for view, b in zip(_views(memory, buffers, _layout(buffers)[0]), buffers, strict=True):
            b.copy_(view)
        _counter(memory)[0] = number + 1

    def close(self) -> None:
        if self._header_in >= 0:
            self._poll.unregister(self._header_in)
            os.close(self._header_in)
            self._header_in = -1
        self._memory = [None] * len(self._memory)
