"""Bad options and inputs stop with an error that says what to do instead.

Options are checked when the strategy or the Trainer is built, before any process starts, so these tests need
none. The errors found while a job runs (an empty training dataloader, a NaN, a stage that fails) are tested
end to end in test_reliability.py; cutting errors (unknown split points, more stages than cuts) in
test_partition.py.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_ddg import DDGStrategy, split_module
from lightning_ddg.checks import (
    check_finite,
    check_rebalancing_setup,
    check_stages_have_parameters,
    check_tied_clipping,
    check_train_loader,
    crossing_values,
)
from tests.lightning_models import MLPClassifier, loader
from tests.models import TiedLM


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(split_points=["model.2"], balance=[1, 8]), ValueError, "either split_points or balance, not both"),
        (dict(split_points="model.4"), TypeError, r"is a string; give a list .* split_points=\['model.4'\]"),
        (dict(split_points=["model.2", "model.2"]), ValueError, r"name \['model.2'\] more than once"),
        (dict(split_points=[2]), TypeError, "give module names"),
        (dict(balance=[3, 0, 2]), ValueError, "give a list of positive layer counts"),
        (dict(num_stages=0), ValueError, "num_stages=0: give a positive number"),
        (dict(num_stages=3, split_points=["model.4"]), ValueError, "num_stages=3 contradicts split_points, which make"),
        (dict(num_stages=2, balance=[1, 1, 7]), ValueError, "num_stages=2 contradicts balance, which makes 3"),
        (dict(memory="stashh"), ValueError, "memory='stashh' is not one of"),
        (dict(start_method="fork"), ValueError, "use 'popen'"),
        (dict(rebalance_after_steps=5), ValueError, "measured over 20 training batches at least; give .* 20 or more"),
        (dict(rebalance_after_steps=True), ValueError, "give a number of batches of 20 or more"),
        (dict(rebalance_after_steps=50, split_points=["model.4"]), ValueError, "split_points or balance leaves none"),
        (dict(rebalance_after_steps=50, balance_by="memory"), ValueError, "balance_by='memory' leaves none"),
    ],
)
def test_contradictory_or_malformed_options(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        DDGStrategy(**options)


@pytest.mark.parametrize(
    ("options", "devices", "message"),
    [
        (dict(split_points=["model.4"]), 3, "1 split points make 2 stages, but 3 devices were requested: give devi"),
        (dict(balance=[3, 2, 2, 2]), 2, r"balance \[3, 2, 2, 2\] has 4 stages but the trainer runs 2 .* devices=4"),
        (dict(num_stages=2), 3, "3 processes .* cannot run whole replicas of a pipeline of num_stages=2"),
    ],
)
def test_stage_count_that_contradicts_devices_fails_when_the_trainer_is_built(options, devices, message) -> None:
    with pytest.raises(ValueError, match=message):
        L.Trainer(strategy=DDGStrategy(**options), devices=devices, accelerator="cpu")


def test_num_stages_equal_to_devices_is_accepted() -> None:
    strategy = DDGStrategy(num_stages=2, start_method="spawn")
    trainer = L.Trainer(strategy=strategy, devices=2, accelerator="cpu", logger=False)
    assert trainer.strategy.num_stages == 2


class _ShapeAcrossTheCut(nn.Module):
    """Uses after the cut a shape read before it: a ``torch.Size`` would have to cross between stages."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Linear(4, 4)
        self.back = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.front(x)
        shape = h.size()
        return self.back(h).reshape(shape[:1] + (-1,))


def test_a_value_crossing_a_cut_that_cannot_be_sent_is_named_with_the_cut() -> None:
    first, second = split_module(_ShapeAcrossTheCut(), split_points=["back"]).train
    output = first(torch.randn(3, 4))
    message = r"'getitem' is computed before the cut at 'back' .* from stage 0 to stage 1; .* of type Size, but only"
    with pytest.raises(TypeError, match=message):
        crossing_values(output, first, stage_index=0)


def test_a_crossing_value_that_stops_being_a_tensor_at_a_later_step() -> None:
    first, _ = split_module(MLPClassifier(), split_points=["model.4"]).train
    x = torch.randn(3, 8, dtype=torch.float64)
    assert [t.shape for t in crossing_values(first(x), first, 0)] == [(3, 16)]
    assert crossing_values((None, 3, True, 0.5), first, 0) == [None, 3, True, 0.5]  # sent in the header
    with pytest.raises(TypeError, match=r"'model_3' .* at this step it is of type str"):
        crossing_values(("x",), first, 0)


def test_a_stage_without_parameters_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.ReLU(), nn.Linear(4, 2))
    partition = split_module(model, split_points=["1", "3"])
    with pytest.raises(ValueError, match=r"stage 1 of 3 \(begins at '1'\) holds no parameters.* split points"):
        check_stages_have_parameters(partition.train, partition.split_points)


def test_non_finite_values_are_reported_with_their_origin() -> None:
    check_finite([torch.ones(2), torch.arange(3)], "the gradient", "do this")  # finite, and an integer tensor
    with pytest.raises(FloatingPointError, match="the gradient holds NaN or infinite values. do this"):
        check_finite([torch.ones(2), torch.tensor([1.0, float("inf")])], "the gradient", "do this")


def test_an_empty_training_dataloader_is_rejected() -> None:
    check_train_loader(loader())
    check_train_loader(iter([]))  # no length: nothing can be said ahead of time
    with pytest.raises(ValueError, match=r"no batches .*drop_last=True with fewer samples than batch_size"):
        check_train_loader(torch.utils.data.DataLoader(loader().dataset, batch_size=64, drop_last=True))


def test_clipping_by_norm_is_refused_with_tied_weights() -> None:
    tied = split_module(TiedLM(), TiedLM.SPLIT_POINTS[2]).tied
    with pytest.raises(
        ValueError, match=r"\['embed.weight'\] are used by several stages.*gradient_clip_algorithm='value'"
    ):
        check_tied_clipping(tied, 1.0, None)  # Lightning's default algorithm: the norm
    check_tied_clipping(tied, 1.0, "value")
    check_tied_clipping(tied, None, None)
    check_tied_clipping([], 1.0, "norm")


def test_cutting_anew_in_a_fit_that_rules_it_out_is_refused_at_setup() -> None:
    check_rebalancing_setup(deterministic=False, on_meta=False)
    with pytest.raises(ValueError, match=r"two runs may cut differently, which Trainer\(deterministic=True\) rules"):
        check_rebalancing_setup(deterministic=True, on_meta=False)
    with pytest.raises(ValueError, match="built in configure_model, so that no process need hold it whole"):
        check_rebalancing_setup(deterministic=False, on_meta=True)
