"""Weights shared across stages (tied embeddings) in Lightning fits: the reference's weights, copies that stay
bitwise equal, checkpoints that hold the weight once under its original names, and resuming from them; and
Hugging Face's GPT-2, whose head is tied to its token embedding, on the stage runtime against the reference."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ddg import DDGReference, DDGStrategy, Topology, build_stage, split_module
from tests.lightning_models import TiedLanguageModel, cpu_trainer, make_optimizer, token_loader
from tests.models import TiedLM, lm_loss, token_batches
from tests.multiprocess import run_processes

SPLITS = {2: ["model.blocks.2"], 3: ["model.blocks.2", "model.blocks.4"]}
# the embedding and the head; with tie_blocks, the first and the third block
TIED = {"model.embed.weight": "model.head.weight", "model.blocks.0.weight": "model.blocks.2.weight"}


class _SaveCopies(L.Callback):
    """Each rank saves its copies of the tied weights once fit has ended; rank 0 the strategy's full state dict."""

    def __init__(self, out_dir) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = [*TIED, *TIED.values()]
        state = {n: t.detach().clone() for n, t in pl_module.state_dict().items() if n in names}
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")
        full = trainer.strategy.full_state_dict()  # a collective: the whole state on rank 0
        if trainer.global_rank == 0:
            torch.save(full, self.out_dir / "full.pt")


def _trainer(tmp_path, devices: int, epochs: int) -> L.Trainer:
    strategy = DDGStrategy(start_method="forkserver", split_points=SPLITS[devices])
    callbacks = [ModelCheckpoint(dirpath=tmp_path, save_last=True), _SaveCopies(tmp_path)]
    return cpu_trainer(strategy, devices, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=True)


def _reference(model: TiedLanguageModel, devices: int, momentum: dict[str, torch.Tensor] | None = None) -> dict:
    """One epoch of the reference from ``model``'s weights (and momentum buffers), then the drain."""
    model = copy.deepcopy(model)
    stages = split_module(model, split_points=SPLITS[devices]).train
    optimizers = [make_optimizer("sgd", s.parameters()) for s in stages]
    for stage, optimizer in zip(stages, optimizers, strict=True):
        for name, p in stage.named_parameters():
            if momentum is not None:
                optimizer.state[p]["momentum_buffer"] = momentum[name].clone()
    ref = DDGReference(stages, optimizers, lm_loss)
    for tokens, targets in token_loader():
        ref.step(tokens, targets)
    ref.finish()
    return dict(model.state_dict())


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=f"{name} differs")


def test_tied_weights_fit_checkpoint_once_and_resume(tmp_path) -> None:
    model = TiedLanguageModel(tie_blocks=True)
    initial = copy.deepcopy(model)
    _trainer(tmp_path, 3, 1).fit(model, token_loader())
    _assert_same(dict(model.state_dict()), _reference(initial, 3))
    # every rank's copy is the same, bit for bit
    copies = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    for name in copies[0]:
        assert all(torch.equal(c[name], copies[0][name]) for c in copies), name
    full = torch.load(tmp_path / "full.pt")
    _assert_same(full, dict(model.state_dict()))
    for first, other in TIED.items():  # one tensor under both names
        assert full[first].untyped_storage().data_ptr() == full[other].untyped_storage().data_ptr()

    # the checkpoint holds each tied weight once, under all of its original names, as torch.save of the model does;
    # the blocks' weight was streamed from rank 1 into the file
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = checkpoint["state_dict"]
    assert list(state) == list(model.state_dict())
    for first, other in TIED.items():
        assert state[first].untyped_storage().data_ptr() == state[other].untyped_storage().data_ptr()
    optimizer = checkpoint["optimizer_states"][0]
    names = [name for name, _ in model.named_parameters()]
    assert optimizer["param_groups"][0]["params"] == list(range(len(names)))
    momentum = {name: optimizer["state"][i]["momentum_buffer"] for i, name in enumerate(names)} | {
        other: optimizer["state"][names.index(first)]["momentum_buffer"] for first, other in TIED.items()
    }

    # resumed on two stages, from the weights and momentum the checkpoint holds
    saved = TiedLanguageModel(tie_blocks=True)
    saved.load_state_dict(state)
    resumed = TiedLanguageModel(tie_blocks=True)
    _trainer(tmp_path, 2, 2).fit(resumed, token_loader(), ckpt_path=tmp_path / "last.ckpt")
    _assert_same(dict(resumed.state_dict()), _reference(saved, 2, momentum))
    assert resumed.model.embed.weight is resumed.model.head.weight


class _GPT2(torch.nn.Module):
    """A tiny ``GPT2LMHeadModel`` (random weights), whose ``lm_head`` shares the token embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=TiedLM.VOCAB,
            n_positions=8,
            n_embd=16,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = GPT2LMHeadModel(config).double()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens).logits


GPT2_SPLIT = ["model.lm_head"]  # the transformer cannot be traced by torch.fx: it runs whole in stage 0


def _train_gpt2(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    built = build_stage(_GPT2(), Topology(num_stages=world_size), rank, split_points=GPT2_SPLIT)
    stage, links = built.stage, built.links
    optimizer = make_optimizer("adam", stage.parameters)
    for tokens, targets in token_batches(5):
        out = stage.forward(tokens)
        if stage.backward(lm_loss(out, targets) if stage.is_last else None):
            stage.install_gradients()
            optimizer.step()
    for ready in stage.drain():
        if ready:
            stage.install_gradients()
            optimizer.step()
    links.close()
    links.destroy()
    return {name: p.detach().clone() for name, p in stage.module.named_parameters()}


def test_gpt2_with_its_tied_head_matches_reference() -> None:
    pytest.importorskip("transformers")
    model = _GPT2()
    partition = split_module(model, GPT2_SPLIT)
    assert [(w.name, w.stages) for w in partition.tied] == [("model.transformer.wte.weight", (0, 1))]
    optimizers = [make_optimizer("adam", s.parameters()) for s in partition.train]
    ref = DDGReference(partition.train, optimizers, lm_loss)
    for tokens, targets in token_batches(5):
        ref.step(tokens, targets)
    ref.finish()
    expected = dict(model.state_dict())
    results = run_processes(_train_gpt2, 2, timeout=120)
    merged = {name: value for part in results for name, value in part.items()}
    for name, value in merged.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7, msg=f"{name} differs")
    assert torch.equal(merged["model.transformer.wte.weight"], merged["model.lm_head.weight"])
