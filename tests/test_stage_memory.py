"""What a stage holds (the formula, and what each piece of a model brings to it), and the plans that balance it."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_ddg import plan, planning
from lightning_ddg.stage_memory import segment_memory, stage_memory

WIDTH, BATCH, LAYERS = 32, 8, 16
LAYER_BYTES = (WIDTH * WIDTH + WIDTH) * 4  # one nn.Linear(WIDTH, WIDTH)'s weight and bias, fp32
INPUT_BYTES = BATCH * WIDTH * 4  # what each layer saves for the backward: its input


def _mlp(device: str = "cpu") -> nn.Sequential:
    with torch.device(device):
        return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))


def _expected(layers: int, delay: int, memory: str = "stash", optimizer_states: int = 1) -> float:
    """What a stage of ``layers`` layers holds, written out: weights, gradients, momentum, the weight copies of its
    ``delay + 1`` in-flight batches but the one forwarded last (none on the last stage), and what those batches save
    for the backward."""
    weights = layers * LAYER_BYTES
    copies = delay if memory != "replay" else 0
    if memory == "stash" or delay == 0:
        activations = (delay + 1) * layers * INPUT_BYTES
    else:  # the in-flight batches' inputs, and one batch's activations while it is recomputed
        activations = (delay + 1) * INPUT_BYTES + layers * INPUT_BYTES
    return weights * (2 + optimizer_states + copies) + activations


@pytest.mark.parametrize("memory", ["stash", "recompute", "replay"])
@pytest.mark.parametrize("delay", [0, 1, 3])
def test_the_formula_counts_what_a_stage_holds(memory: str, delay: int) -> None:
    parts = stage_memory(5 * LAYER_BYTES, 5 * INPUT_BYTES, INPUT_BYTES, delay, memory, 5 * LAYER_BYTES)
    assert parts["total"] == _expected(5, delay, memory) == sum(v for k, v in parts.items() if k != "total")
    assert parts["weight_copies"] == (0 if memory == "replay" else delay * 5 * LAYER_BYTES)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_piece_brings_its_parameters_and_what_autograd_saves(device: str) -> None:
    model = _mlp(device)
    model[1].weight.requires_grad_(False)
    (held,) = segment_memory([model[:3]], [[torch.randn(BATCH, WIDTH, device=device)]])
    assert held.parameter_bytes == 3 * LAYER_BYTES
    assert held.trainable_bytes == 3 * LAYER_BYTES - WIDTH * WIDTH * 4
    # each layer's input (the weights autograd saves are not counted), except the frozen layer's: no weight gradient
    assert held.activation_bytes == 2 * INPUT_BYTES
    assert held.input_bytes == INPUT_BYTES


def test_a_memory_plan_puts_fewer_layers_on_the_stages_that_stash_more() -> None:
    """Stage k of 4 holds 3 + d_k weight-sized tensors per layer: the cut that makes the largest stage smallest,
    found by trying every cut, is the plan's, and each stage holds what the formula says."""
    num_stages, x = 4, torch.randn(BATCH, WIDTH)
    p = plan(_mlp(), x, num_stages, balance_by="memory", optimizer_states=1)

    def largest(counts: tuple[int, ...]) -> float:
        return max(_expected(n, num_stages - 1 - k) for k, n in enumerate(counts))

    cuts = itertools.combinations(range(1, LAYERS), num_stages - 1)
    counts = [tuple(b - a for a, b in zip((0, *c), (*c, LAYERS), strict=True)) for c in cuts]
    best = min(largest(c) for c in counts)
    layers = tuple(len(s.modules) for s in p.stages)
    assert layers == (3, 3, 4, 6) and largest(layers) == best  # the time or parameter balance is (4, 4, 4, 4)
    assert [s.holds for s in p.stages] == [_expected(n, num_stages - 1 - k) for k, n in enumerate(layers)]
    assert p.balance_by == "memory" and p.note is None
    assert [s.cost for s in p.stages] == [s.holds / 2**20 for s in p.stages]
    assert "holds" in str(p) and p.to_dict()["ddg/stage3/holds_bytes"] == p.stages[3].holds

    # built on the meta device (configure_model), without data: the same cut and the same figures
    on_meta = plan(_mlp("meta"), x.to("meta"), num_stages, balance_by="memory", optimizer_states=1)
    assert on_meta.split_points == p.split_points
    assert [s.holds for s in on_meta.stages] == [s.holds for s in p.stages]

    # another plan reports what its stages hold by the same formula: the first stage holds most
    by_params = plan(_mlp(), x, num_stages, balance_by="params", optimizer_states=1)
    assert [len(s.modules) for s in by_params.stages] == [4, 4, 4, 4]
    assert [s.holds for s in by_params.stages] == [_expected(4, num_stages - 1 - k) for k in range(num_stages)]
    assert max(s.holds for s in by_params.stages) > max(s.holds for s in p.stages)


def test_without_an_input_a_memory_plan_counts_the_parameters_and_says_so() -> None:
    p = plan(_mlp(), None, 2, balance_by="memory", optimizer_states=1)
    assert "balanced by memory without the activations: no example input" in p.note
    # weights, gradients, momentum and one copy on stage 0; weights, gradients and momentum on stage 1
    assert [len(s.modules) for s in p.stages] == [7, 9]
    assert [s.holds for s in p.stages] == [7 * 4 * LAYER_BYTES, 9 * 3 * LAYER_BYTES]


class _SkipOverTheThird(nn.Module):
    """Five equal layers, and a skip connection from the first layer's output over the third: a cut before the third
    layer sends two tensors, one after it sends one."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.l4, self.l5 = (nn.Linear(WIDTH, WIDTH) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the first piece computes no gradient for the model's input: one without weights leaves the layers equal
        h1 = self.l1(torch.relu(x))
        return self.l5(self.l4(self.l3(self.l2(h1)) + h1))


def test_among_equally_fast_cuts_the_default_plan_takes_one_whose_first_stage_holds_less(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three layers and two, or two and three, are equally fast; the first stage keeps a weight copy, so the cut that
    leaves it two layers holds a quarter less in its largest stage, and wins over the one that sends fewer bytes."""
    x = torch.randn(BATCH, WIDTH)
    chosen = plan(_SkipOverTheThird(), x, 2, balance_by="flops")
    monkeypatch.setattr(planning, "MEMORY_TIE_TOLERANCE", float("inf"))  # memory left out: the fewest bytes win
    by_bytes = plan(_SkipOverTheThird(), x, 2, balance_by="flops")
    assert chosen.split_points == ["l3"] and by_bytes.split_points == ["l4"]
    assert max(s.cost for s in chosen.stages) == pytest.approx(max(s.cost for s in by_bytes.stages))  # equally fast
    assert chosen.stages[0].bytes_out > by_bytes.stages[0].bytes_out
    assert max(s.holds for s in chosen.stages) < 0.8 * max(s.holds for s in by_bytes.stages)
