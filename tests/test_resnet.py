"""A torchvision ResNet-18 trained by a real Lightning Trainer with DDGStrategy, cut inside the residual network."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ddg import DDGReference, DDGStrategy, split_module
from tests.lightning_models import cpu_trainer

NUM_IMAGES = 64
BATCH_SIZE = 8
EPOCHS = 1
NUM_BATCHES = EPOCHS * NUM_IMAGES // BATCH_SIZE


class ResNetClassifier(L.LightningModule):
    """Unmodified user code: a torchvision ResNet-18 with a cross-entropy training step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torchvision.models.resnet18(num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return _optimizer(self.parameters())


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _images(n: int = NUM_IMAGES, size: int = 16, seed: int = 1) -> TensorDataset:
    """Random 16x16 images whose label is readable from the mean of the first channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g)
    x[:, 0] += (y.float() - 4.5)[:, None, None] * 0.5
    return TensorDataset(x, y)


def _loader() -> DataLoader:
    return DataLoader(_images(), batch_size=BATCH_SIZE)


def _reference(model: ResNetClassifier, split_point: str) -> dict[str, torch.Tensor]:
    """The same training in the single-process simulation."""
    model = copy.deepcopy(model)
    stages = split_module(model, split_points=[split_point]).train
    ref = DDGReference(stages, [_optimizer(s.parameters()) for s in stages], nn.functional.cross_entropy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(EPOCHS):
            for x, y in _loader():
                ref.step(x, y)
        ref.finish()
    finally:
        torch.set_num_threads(threads)
    return dict(model.state_dict())


@pytest.mark.parametrize(
    "split_point",
    [
        "model.layer2.1",  # between two residual blocks: one tensor crosses the cut
        "model.layer3.0.bn2",  # inside a residual block: the block input (shortcut) crosses it as well
    ],
)
def test_resnet18_trains_with_a_cut_inside_the_residual_network(split_point: str) -> None:
    model = ResNetClassifier()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    bn_counters = [name for name, _ in model.named_buffers() if name.endswith("num_batches_tracked")]
    expected = _reference(model, split_point)
    trainer = cpu_trainer(DDGStrategy(split_points=[split_point], start_method="forkserver"), 2, max_epochs=EPOCHS)
    trainer.fit(model, _loader())

    assert trainer.state.finished
    # the loss is logged by the last stage (rank 0) and reaches the main process
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))

    # the main process holds the whole trained model under the original names
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    unchanged = [name for name in before if torch.equal(after[name], before[name])]
    assert not unchanged, f"parameters not trained: {unchanged}"
    not_finite = [name for name, p in after.items() if not torch.isfinite(p).all()]
    assert not not_finite, f"parameters not finite: {not_finite}"
    # every BatchNorm, in either stage, saw each training batch exactly once
    buffers = dict(model.named_buffers())
    assert {name: int(buffers[name]) for name in bn_counters} == {name: NUM_BATCHES for name in bn_counters}

    # and it is the model the single-process simulation of DDG trains
    actual = dict(model.state_dict())
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-7, msg=f"{name} differs")

    # the model is usable as an ordinary module again
    model.eval()
    with torch.no_grad():
        logits = copy.deepcopy(model)(torch.randn(4, 3, 16, 16))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
