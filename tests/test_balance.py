"""The grouping of segments into stages, and the measurements of what segments cost."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from torch import nn

from lightning_ddg.balance import run_segments, segment_flops, segment_times, solve


def _brute_force(costs: list[float], cut_bytes: list[float], num_stages: int, tolerance: float) -> tuple:
    """The slowest stage and the bytes of the best grouping, by trying every one."""
    best = None
    groupings = list(itertools.combinations(range(1, len(costs)), num_stages - 1))
    slowest = min(_slowest(costs, starts) for starts in groupings)
    for starts in groupings:
        if _slowest(costs, starts) <= slowest * (1 + tolerance) + 1e-9:
            sent = sum(cut_bytes[s - 1] for s in starts)
            best = sent if best is None else min(best, sent)
    return slowest, best


def _slowest(costs: list[float], starts) -> float:
    bounds = [0, *starts, len(costs)]
    return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))


@pytest.mark.parametrize("tolerance", [0.0, 0.1])
@pytest.mark.parametrize("seed", range(20))
def test_solve_finds_the_fastest_slowest_stage_then_the_fewest_bytes(seed: int, tolerance: float) -> None:
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(2, 9, (1,), generator=g))
    num_stages = int(torch.randint(1, m + 1, (1,), generator=g))
    costs = torch.randint(0, 10, (m,), generator=g).float().tolist()
    cut_bytes = torch.randint(0, 5, (m - 1,), generator=g).float().tolist()
    starts = solve(costs, cut_bytes, num_stages, tolerance)
    assert len(starts) == num_stages - 1 and starts == sorted(set(starts)) and all(0 < s < m for s in starts)
    slowest, sent = _brute_force(costs, cut_bytes, num_stages, tolerance)
    assert _slowest(costs, starts) <= slowest * (1 + tolerance) + 1e-9
    assert sum(cut_bytes[s - 1] for s in starts) == sent


def test_equal_costs_are_broken_by_the_bytes_that_cross() -> None:
    # a cut after segment 1 or 2 gives the same slowest stage (2.0); after 2 sends less
    assert solve([1.0, 1.0, 1.0], [3.0, 8.0], 2) == [1]
    assert solve([1.0, 1.0, 1.0, 1.0], [1.0, 9.0, 1.0], 2, tolerance=0.5) == [1]


def test_more_stages_than_segments_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot group 2 segments into 3 stages"):
        solve([1.0, 1.0], [0.0], 3)


def test_measurements_of_segments() -> None:
    torch.manual_seed(0)
    small, large = nn.Linear(16, 16), nn.Sequential(nn.Linear(16, 512), nn.Tanh(), nn.Linear(512, 16))
    segments = [small, large]
    inputs = run_segments(segments, [torch.randn(64, 16)], torch.device("cpu"))
    assert [x[0].shape for x in inputs] == [(64, 16), (64, 16)]
    assert torch.allclose(inputs[1][0], small(inputs[0][0]))
    flops = segment_flops(segments, inputs, torch.device("cpu"))
    # forward + backward of a linear layer: 2 * batch * in * out multiply-adds forward, as many for the weight's
    # gradient, and as many again for the input's, which the first segment (the first stage) never computes
    assert flops[0] == 2 * 2 * 64 * 16 * 16
    assert segment_flops(segments[::-1], [inputs[1], inputs[0]], torch.device("cpu"))[1] == 3 * 2 * 64 * 16 * 16
    assert flops[1] > 30 * flops[0]
    times = segment_times(segments, inputs, torch.device("cpu"))
    assert all(t > 0 for t in times) and times[1] > times[0]
    assert all(p.grad is None for s in segments for p in s.parameters())


def test_no_piece_is_timed_as_free() -> None:
    # a piece runs in a fraction of a millisecond: Linux's user time of the process may not move over such a run
    # (it is held still while the kernel corrects how it splits the CPU time between user and system)
    segments = [nn.Linear(16, 16) for _ in range(8)]
    inputs = run_segments(segments, [torch.randn(4, 16)], torch.device("cpu"))
    for _ in range(25):
        assert min(segment_times(segments, inputs, torch.device("cpu"))) > 0


class _Slowing(nn.Module):
    """Takes 2 ms, 10% more each time one of its kind has run before: a machine that slows down while its pieces
    are timed. It waits on the wall clock, which is read without a system call: the process's own code all along."""

    runs = 0

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _Slowing.runs += 1
        end = time.perf_counter() + 0.002 * (1 + 0.1 * _Slowing.runs)
        while time.perf_counter() < end:
            pass
        return x * self.scale


class _ReadsLowOnce(nn.Module):
    """Takes 2 ms, but 1.2 ms on the runs in ``fast``: a clock that reads low now and then, or a moment of a shared
    machine running faster. Counts its kind's runs in ``runs``."""

    runs = 0
    fast: set[int] = set()

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        end = time.perf_counter() + (0.0012 if _ReadsLowOnce.runs in _ReadsLowOnce.fast else 0.002)
        _ReadsLowOnce.runs += 1
        while time.perf_counter() < end:
            pass
        return x * self.scale


def test_a_piece_timed_low_once_is_timed_as_the_others() -> None:
    # four equal pieces in rounds (the first round warms up): the first piece reads low in the first timed round,
    # the second in the second; the fastest run of each would make them 1.2 ms against 2 ms
    segments = [_ReadsLowOnce() for _ in range(4)]
    inputs = run_segments(segments, [torch.randn(4)], torch.device("cpu"))
    _ReadsLowOnce.runs, _ReadsLowOnce.fast = 0, {4 * 1 + 0, 4 * 2 + 1}
    times = segment_times(segments, inputs, torch.device("cpu"))
    assert max(times) / min(times) < 1.2, times


def test_a_machine_that_slows_down_while_timing_slows_every_piece_alike() -> None:
    # timed one after the other, the last of four equal pieces would take more than twice the first's time (the
    # slowdown of 18 runs); timed in rounds, as a training step runs them, about 1.2 times
    segments = [_Slowing() for _ in range(4)]
    inputs = run_segments(segments, [torch.randn(4)], torch.device("cpu"))
    _Slowing.runs = 0
    times = segment_times(segments, inputs, torch.device("cpu"))
    assert max(times) / min(times) < 1.4, times
