"""The CUDA paths one GPU can check: stages in one process on the GPU against the reference, the random number
streams and autocast a recomputed forward must replay, plans timed on the GPU, and the strategy with one stage
on the GPU (NCCL, in fp32 and bf16-mixed) against plain Lightning. Skipped where no GPU is seen."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ddg import DDGReference, DDGStrategy, plan, split_module
from lightning_ddg.local import LockStep
from tests.lightning_models import MLPClassifier, cpu_trainer, loader
from tests.models import batches, make_optimizer, mlp, split_points_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = torch.device("cuda", 0)
LOSS = nn.functional.cross_entropy


def _lock_step(model: nn.Module, num_stages: int, memory: str, data: list, optimizer: str = "adam", seed: int = 0):
    """``model`` trained on the GPU by ``num_stages`` stages in this process; its weights, back on the host."""
    pipeline = LockStep(model, split_points_for(model, num_stages), device=GPU, memory=memory, seed=seed)
    optimizers = [make_optimizer(optimizer, stage.parameters) for stage in pipeline.stages]
    for x, y in data:
        y = y.to(GPU)
        pipeline.step(x.to(GPU), lambda out, y=y: LOSS(out, y), optimizers)
    pipeline.drain(optimizers)
    return {name: t.detach().cpu() for name, t in model.state_dict().items()}


def _assert_close(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("memory", ["stash", "recompute"])
def test_stages_on_the_gpu_match_the_reference_on_the_host(memory: str) -> None:
    data = batches(7, seed=3)
    model = mlp(batchnorm=True)
    stages = split_module(model, split_points_for(model, 3)).train
    reference = DDGReference(stages, [make_optimizer("adam", s.parameters()) for s in stages], LOSS, seed=3)
    trained = _lock_step(copy.deepcopy(model).to(GPU), 3, memory, data, seed=3)
    for x, y in data:
        reference.step(x, y)
    reference.finish()
    _assert_close(trained, dict(model.state_dict()))


def test_a_stage_with_delay_d_holds_d_weight_copies_on_the_gpu() -> None:
    # the live weights move to a fresh buffer on the GPU when a step ends; the d batches in flight keep the data their
    # forward read, and the buffers are reused once the pipeline is full: the GPU's allocated bytes stop growing
    model = mlp(depth=8).to(GPU)
    pipeline = LockStep(model, split_points_for(model, 4), device=GPU, memory="stash")
    optimizers = [make_optimizer("sgd", stage.parameters) for stage in pipeline.stages]
    allocated = []
    for t, (x, y) in enumerate(batches(9)):
        y = y.to(GPU)
        pipeline.step(x.to(GPU), lambda out, y=y: LOSS(out, y), optimizers)
        for stage in pipeline.stages:
            copies = [item.copy for item in stage._inflight if item.copy is not None]
            assert len(copies) == min(t + 1, stage.delay)
            assert all(c.device == GPU for copy in copies for c in copy)
            held = stage.snapshots()[-1].stashed_weight_bytes
            assert held == len(copies) * sum(p.numel() * p.element_size() for p in stage._stashed_parameters)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated(GPU))
    assert len(set(allocated[3:-1])) == 1, allocated  # steady once the pipeline is full (the last batch is smaller)
    pipeline.drain(optimizers)
    assert all(not stage._inflight for stage in pipeline.stages)


def test_a_recomputed_forward_draws_the_dropout_masks_of_its_batch_on_the_gpu() -> None:
    # recompute runs each forward again in backward: with the CUDA generator's state of the first run, or the masks
    # differ from the ones the loss saw
    data = batches(6, seed=5, dtype=torch.float32)
    trained = {
        memory: _lock_step(mlp(dropout=0.3, dtype=torch.float32).to(GPU), 3, memory, data, seed=5)
        for memory in ("stash", "recompute")
    }
    _assert_close(trained["recompute"], trained["stash"], rtol=1e-6, atol=1e-7)
    other_masks = _lock_step(mlp(dropout=0.3, dtype=torch.float32).to(GPU), 3, "stash", data, seed=6)
    assert not torch.allclose(other_masks["11.weight"], trained["stash"]["11.weight"])  # the masks do matter


def test_a_recomputed_forward_runs_under_the_autocast_of_its_batch() -> None:
    # the stages forward under the caller's bf16 autocast; recompute's second forward, run in backward outside it,
    # must compute in bf16 again
    data = batches(6, seed=2, dtype=torch.float32)
    trained = {}
    for memory, dtype in [("stash", torch.bfloat16), ("recompute", torch.bfloat16), ("stash", torch.float32)]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            trained[memory, dtype] = _lock_step(mlp(dtype=torch.float32).to(GPU), 3, memory, data, seed=2)
    bf16 = trained["stash", torch.bfloat16]
    _assert_close(trained["recompute", torch.bfloat16], bf16, rtol=1e-6, atol=1e-7)
    full_precision = trained["stash", torch.float32]
    assert max((full_precision[n] - bf16[n]).abs().max().item() for n in bf16) > 1e-4  # autocast did change things


def test_plans_timed_on_the_gpu() -> None:
    model = nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.GELU()) for _ in range(8)], nn.Linear(512, 10))
    x = torch.randn(256, 512)
    on_gpu = plan(copy.deepcopy(model).to(GPU), x.to(GPU), 4)  # where its parameters are
    from_host = plan(model, x, 4, device=GPU)  # a model on the host, timed on the GPU
    for planned in (on_gpu, from_host):
        assert planned.balance_by == "time" and planned.note is None, planned
        assert planned.num_stages == 4 and planned.imbalance < 1.5, planned
    assert next(model.parameters()).device.type == "cpu"  # timing it on the GPU left it where it was


def test_a_third_party_model_is_planned_on_the_gpu() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).to(GPU)
    planned = plan(model, torch.randn(8, 3, 64, 64, device=GPU), 3)
    assert planned.balance_by == "time" and planned.note is None, planned
    assert planned.num_stages == 3 and planned.imbalance < 2, planned


class _CausalLM(nn.Module):
    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


def test_a_hugging_face_model_opened_on_the_host_runs_its_stages_on_the_gpu() -> None:
    # torch.export writes the device it traced on into the graph (position ids made on the host): each stage's graph
    # makes them on the GPU it runs on
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    model = _CausalLM(transformers.LlamaForCausalLM(config))
    ids = torch.randint(0, 64, (4, 12))
    expected = copy.deepcopy(model).to(GPU)(ids.to(GPU))
    pipeline = LockStep(model, ["lm.model.layers.1"], device=GPU, example_input=(ids,))  # cut on the host
    output = pipeline.step(ids.to(GPU), lambda out: out.float().mean())
    torch.testing.assert_close(output, expected)


def _gpu_trainer(strategy, precision: str, root) -> L.Trainer:
    options = {"precision": precision, "default_root_dir": root, "enable_checkpointing": True}
    return cpu_trainer(strategy, 1, accelerator="gpu", **options)


def _on_host(state: dict) -> dict:
    return {name: t.detach().to("cpu", copy=True) for name, t in state.items()}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_one_stage_on_the_gpu_equals_plain_lightning(precision: str, tmp_path) -> None:
    x, y = loader().dataset.tensors
    data = DataLoader(TensorDataset(x.float(), y), batch_size=8)
    model = MLPClassifier(optimizer="sgd", batchnorm=True, step_lr=True).float()
    initial = _on_host(model.state_dict())
    plain = copy.deepcopy(model)
    _gpu_trainer("auto", precision, tmp_path / "plain").fit(plain, data, data)
    trainer = _gpu_trainer(DDGStrategy(start_method="forkserver"), precision, tmp_path / "ddg")
    trainer.fit(model, data, data)
    assert trainer.strategy.root_device.type == "cuda"
    trained = _on_host(model.state_dict())
    _assert_close(trained, _on_host(plain.state_dict()), rtol=1e-5, atol=1e-6)
    assert not torch.equal(trained["model.0.weight"], initial["model.0.weight"])  # it trained
    # the checkpoint it saved holds the weights it ended with
    (saved,) = (tmp_path / "ddg").rglob("*.ckpt")
    _assert_close(
        _on_host(torch.load(saved, map_location="cpu", weights_only=False)["state_dict"]), trained, rtol=0, atol=0
    )
