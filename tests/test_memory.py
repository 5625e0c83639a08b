"""A stage process keeps alive the tensors of its own stage and nothing more."""

from __future__ import annotations

import gc
import json

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from lightning_ddg import DDGStrategy
from tests.lightning_models import MLPClassifier, cpu_trainer, loader

_REFS: dict[str, StorageWeakRef] = {}


class _StorageProbe(MLPClassifier):
    """Records a weak reference to the storage of every parameter and buffer before the strategy cuts the model,
    and, in the steady state of training, which of them are still alive in this process.

    ``shift`` is read by the LightningModule's own forward (a ``get_attr`` in the first stage's graph), ``scale``
    by the last stage's; BatchNorm adds buffers to every stage."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(optimizer="sgd", batchnorm=True)
        self.out_dir = out_dir
        self.shift = nn.Parameter(torch.zeros(8, dtype=torch.float64))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.shift) * self.scale

    def setup(self, stage: str) -> None:
        _REFS.clear()  # kept out of the module, which the strategy copies to trace it
        _REFS.update(
            {n: StorageWeakRef(t.untyped_storage()) for n, t in [*self.named_parameters(), *self.named_buffers()]}
        )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if batch_idx != 3:
            return
        gc.collect()
        own = {n for n, _ in [*self.named_parameters(), *self.named_buffers()]}
        alive = sorted(n for n, ref in _REFS.items() if n not in own and not ref.expired())
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump({"own": sorted(own), "others_alive": alive}, f)


def test_a_stage_process_keeps_no_tensor_of_another_stage(tmp_path) -> None:
    model = _StorageProbe(str(tmp_path))
    trainer = cpu_trainer(DDGStrategy(start_method="forkserver", split_points=["model.4", "model.8"]), 3, max_steps=6)
    trainer.fit(model, loader())
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    assert all(s["own"] for s in seen)
    assert [s["others_alive"] for s in seen] == [[], [], []], "stage processes keep tensors of other stages alive"
