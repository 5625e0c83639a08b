"""Channels between two real processes: shapes, dtypes and tensor counts that change, None and Python numbers
among the tensors, notes, clean closing."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_ddg.comm import UNREAPED_MESSAGES, Channel, _encode
from tests.multiprocess import run_processes


def _messages(session: int) -> list[list[Any]]:
    g = torch.Generator().manual_seed(session)
    shapes = [[(4, 3)], [(4, 3)], [(2, 3)], [(2, 3), (5,)], [(2, 3), (5,)], [(1, 1, 2)], [(4, 3)], [(4, 3), (4, 4)]]
    out: list[list[Any]] = [[torch.randn(s, generator=g) for s in shape] for shape in shapes]
    out[1].append(None)  # an optional mask left out
    out[2].insert(0, None)
    out[4].append(torch.arange(3))  # an integer tensor joins
    out[5] = [out[5][0].double()]  # the dtype changes
    out.append([out[-1][0], None])  # the mask the last message had is left out, then given again
    out.append([out[-2][0], torch.ones(4, 4)])
    out.append([False, out[-1][0], 7, -(2**40), 0.1 + session, None, True])  # flags and numbers in the header
    out.append([out[-1][1], 8, -1.5e-300, float("inf")])
    return out


def _exchange(rank: int, world_size: int) -> list[list[torch.Tensor]]:
    group = dist.new_group([0, 1])
    channel = Channel(peer=1 - rank, group=group)
    received = []
    for session in range(2):  # a second session after closing, as a second trainer.fit would
        for message in _messages(session):
            if rank == 0:
                channel.send(message, note=[len(received), session, -7])
                received.append(None)
            else:
                received.append(channel.recv())
                assert channel.note == [len(received) - 1, session, -7]
        channel.send_end() if rank == 0 else channel.close_recv()
        channel.flush()
    return received


def assert_received_as_sent(received: list[list[Any]], expected: list[list[Any]]) -> None:
    """Every message arrived, in order, with the same values and bit-identical tensors of the same dtypes."""
    assert len(received) == len(expected)
    for got, want in zip(received, expected, strict=True):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            if not isinstance(b, torch.Tensor):
                assert type(a) is type(b) and a == b
                continue
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_messages_arrive_intact_in_order_across_sessions() -> None:
    _, received = run_processes(_exchange, 2, timeout=60)  # rank 1 also checks each message's note
    assert_received_as_sent(received, _messages(0) + _messages(1))


def _stream(rank: int, world_size: int, count: int) -> int:
    group = dist.new_group([0, 1])
    channel = Channel(peer=1 - rank, group=group)
    most_pending = 0
    for i in range(count):
        if rank == 0:
            channel.send([torch.full((64,), float(i))])
            most_pending = max(most_pending, channel.pending_sends)
        else:
            assert channel.recv()[0][0].item() == i
    channel.send_end() if rank == 0 else channel.close_recv()
    channel.flush()
    return most_pending


def test_a_long_stream_holds_only_the_last_messages_sends() -> None:
    # gloo reports a send complete only once waited for: without reaping by age, every tensor sent would be held
    most_pending, _ = run_processes(_stream, 2, 200, timeout=60)
    assert most_pending <= 2 * (UNREAPED_MESSAGES + 1)  # a header and one tensor per message


def test_a_dtype_that_cannot_cross_says_what_to_do() -> None:
    with pytest.raises(TypeError, match=r"complex128 cannot cross .* Cast the value to one of them before the cut"):
        _encode([torch.zeros(4, 3), torch.zeros(4, dtype=torch.complex128)])


def _lagging_receiver(rank: int, world_size: int, lag_s: float) -> float:
    group = dist.new_group([0, 1])
    channel = Channel(peer=1 - rank, group=group)
    dist.barrier()
    if rank == 1:
        time.sleep(lag_s)  # the receiver is busy elsewhere, as a slower stage is
    for i in range(4):
        if rank == 0:
            channel.send([torch.full((2**20,), float(i))])  # 4 MiB: more than the transport buffers
        else:
            assert channel.recv()[0][0].item() == i
    channel.send_end() if rank == 0 else channel.close_recv()
    channel.flush()
    return channel.blocked_s


def test_a_sender_counts_its_wait_for_a_lagging_receiver_apart_from_sending() -> None:
    # a stage whose next stage lags behind waits in send for it to take older messages: that is waiting on a
    # neighbour (wait_ms in the stage figures), not the cost of sending
    lag_s = 1.0
    blocked, _ = run_processes(_lagging_receiver, 2, lag_s, timeout=60)
    assert blocked >= lag_s / 2
