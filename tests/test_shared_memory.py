"""Channels between two processes of one host carry their tensors through shared memory: the same messages arrive
as over gloo alone, a sender whose receiver lags sends over gloo instead of waiting, and a receiver elsewhere
declines."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from lightning_ddg import shared_memory
from lightning_ddg.comm import Channel, share_memory
from lightning_ddg.shared_memory import SlotReader, SlotWriter, WriterGone
from lightning_ddg.watchdog import _is_communication_error
from tests.multiprocess import run_processes
from tests.test_comm import _messages, assert_received_as_sent

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="no anonymous memory files on an x86-64 Linux")


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 5, generator=g),
        torch.randn(4, 6, generator=g).t(),  # not contiguous
        torch.arange(7, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.zeros(0, 4, dtype=torch.bfloat16),
        torch.randn(2, 2, generator=g).to(torch.complex64),
    ]


def _pair(slots: int = 2) -> tuple[SlotWriter, SlotReader]:
    writer = SlotWriter(slots)
    reader = SlotReader(writer.pid, slots)
    assert reader.open(writer.first_fd, writer.header_fd, writer.nonce)
    writer.accepted()
    return writer, reader


def _read(reader: SlotReader, place: tuple, like: list[torch.Tensor]) -> list[torch.Tensor]:
    buffers = [torch.empty(t.shape, dtype=t.dtype) for t in like]
    reader.read(place, buffers)
    return buffers


def test_slots_carry_tensors_bit_for_bit_and_grow() -> None:
    writer, reader = _pair()
    sent = _tensors()
    place = writer.write(sent)
    assert place is not None and place[:2] == (0, 0) and place[3] == 0
    for got, want in zip(_read(reader, place, sent), sent, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    large = [torch.randn(300_000)]  # more than the first slot holds: slot 1 first, then slot 0 grows
    first, second = writer.write(large), writer.write(large)
    assert first is not None and first[:2] == (1, 0) and second is not None and second[:2] == (0, 1)
    assert torch.equal(_read(reader, first, large)[0], large[0])
    assert torch.equal(_read(reader, second, large)[0], large[0])
    writer.close()
    reader.close()


def test_a_slot_not_read_yet_is_never_overwritten() -> None:
    writer, reader = _pair()
    places = [writer.write([torch.full((4,), float(i))]) for i in range(3)]
    assert places[0] is not None and places[1] is not None
    assert places[2] is None  # slot 0 still holds message 0: message 2 goes over gloo instead
    assert _read(reader, places[0], [torch.zeros(4)])[0][0] == 0
    assert writer.write([torch.full((4,), 3.0)]) is None  # slot 1 still holds message 1
    assert _read(reader, places[1], [torch.zeros(4)])[0][0] == 1
    place = writer.write([torch.full((4,), 4.0)])  # slot 0 is free again
    assert place is not None and _read(reader, place, [torch.zeros(4)])[0][0] == 4
    writer.close()


def test_memory_too_short_for_a_slot_sends_over_gloo(monkeypatch) -> None:
    writer, reader = _pair()
    place = writer.write([torch.ones(4)])
    assert place is not None and _read(reader, place, [torch.zeros(4)])[0][0] == 1

    def short(fd: int, offset: int, size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", short)
    assert writer.write([torch.zeros(1 << 20)]) is None  # slot 1 cannot be made: no SIGBUS, gloo instead
    assert writer.write([torch.zeros(1 << 20)]) is None  # slot 0 cannot grow
    assert writer.write([torch.ones(4)]) is None  # slot 1 still cannot be made
    place = writer.write([torch.full((4,), 2.0)])  # slot 0 holds it as it is
    assert place is not None and _read(reader, place, [torch.zeros(4)])[0][0] == 2
    writer.close()


def test_a_reader_that_does_not_see_the_same_memory_declines() -> None:
    writer = SlotWriter(slots=2)
    fds = writer.first_fd, writer.header_fd
    assert not SlotReader(writer.pid, slots=2).open(fds[0] + 100, fds[1], writer.nonce)  # no such file there
    assert not SlotReader(writer.pid, slots=2).open(*fds, writer.nonce + 1)  # another memory
    writer.close()


_WRITE_TWO_AND_EXIT = """
import os, sys, torch
from lightning_ddg.shared_memory import SlotWriter
writer = SlotWriter(slots=2)
places = [writer.write([torch.full((4,), float(i))]) for i in range(2)]
print(writer.pid, writer.first_fd, writer.header_fd, writer.nonce, *places[1], flush=True)
sys.stdin.readline()  # the reader has opened the first slot and the pipe
writer.accepted()
writer.post(b"header-1")
if os.fork() == 0:  # a child that outlives it, as a data loader's worker may: it holds no end of the pipe
    sys.stdin.readline()
    os._exit(0)
"""


def test_a_writer_that_exited_is_a_peer_gone_though_a_child_it_forked_lives_on_and_a_silent_one_times_out() -> None:
    # the header of a message can be taken after its sender died; the slot it names may no longer be open
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITE_TWO_AND_EXIT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdin is not None
    pid, first_fd, header_fd, nonce, *place = map(int, writer.stdout.readline().split())
    reader = SlotReader(pid, slots=2)
    assert reader.open(first_fd, header_fd, nonce)
    with pytest.raises(TimeoutError, match=f"process {pid} sent no message") as silent:
        reader.take(8, timeout_s=0.2)
    assert _is_communication_error(silent.value)
    writer.stdin.write("\n")
    writer.stdin.flush()
    assert writer.wait(timeout=30) == 0
    assert reader.take(8, timeout_s=5) == b"header-1"  # posted before it exited
    for lost in (lambda: reader.take(8, timeout_s=30), lambda: reader.read(tuple(place), [torch.zeros(4)])):
        with pytest.raises(WriterGone, match=f"process {pid}.* has exited") as raised:
            lost()
        assert _is_communication_error(raised.value)  # the watchdog waits for the cause: a peer killed
    writer.stdin.close()  # its child exits
    reader.close()


def _exchange(rank: int, world_size: int, lag_s: float) -> tuple[list, bool, int]:
    # a sender waits on its header two messages back, which the receiver takes only once it has read the message
    # before: with the channel's slots the next slot is always free. With one slot, a lagging receiver leaves
    # it taken, and the messages go over gloo until it catches up.
    Channel.slots = property(lambda self: 1)  # type: ignore[assignment,method-assign]
    channel = Channel(peer=1 - rank, group=dist.new_group([0, 1]))
    share_memory([channel], []) if rank == 0 else share_memory([], [channel])
    shares = channel.shares_memory
    received = []
    for session in range(2):  # a second session after closing, as a second trainer.fit would
        if rank == 1 and session == 1:
            time.sleep(lag_s)  # the sender comes round to a slot not read yet: those messages go over gloo
        for message in _messages(session):
            if rank == 0:
                channel.send(message, note=[session])
            else:
                received.append(channel.recv())
                assert channel.note == [session]
        channel.send_end() if rank == 0 else channel.close_recv()
        channel.flush()
    written = channel._writer.written if rank == 0 else 0  # noqa: SLF001
    channel.release_memory()
    return received, shares, written


def test_messages_through_shared_memory_arrive_as_over_gloo_also_when_the_receiver_lags() -> None:
    (_, sender_shares, written), (received, receiver_shares, _) = run_processes(_exchange, 2, 0.5, timeout=60)
    assert sender_shares and receiver_shares
    expected = _messages(0) + _messages(1)
    assert 0 < written < len(expected)
    assert_received_as_sent(received, expected)


def _declined(rank: int, world_size: int) -> tuple[bool, float]:
    if rank == 1:
        shared_memory.available = lambda: False  # this end cannot map the sender's memory
    channel = Channel(peer=1 - rank, group=dist.new_group([0, 1]))
    share_memory([channel], []) if rank == 0 else share_memory([], [channel])
    value = 0.0
    if rank == 0:
        channel.send([torch.full((8,), 3.0)])
        channel.send_end()
    else:
        value = channel.recv()[0][0].item()
        channel.close_recv()
    channel.flush()
    return channel.shares_memory, value


def test_channels_stay_on_gloo_where_the_receiver_declines() -> None:
    (sender, _), (receiver, value) = run_processes(_declined, 2, timeout=60)
    assert not sender and not receiver and value == 3.0
