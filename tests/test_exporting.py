"""Opening what torch.fx cannot trace with torch.export, and PyTorch's transformer stacks with masks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_ddg import DDGReference
from lightning_ddg.checks import crossing_values
from lightning_ddg.local import LockStep
from lightning_ddg.partition import split_module

transformers = pytest.importorskip("transformers")


def _run(stages: list[nn.Module], *args):
    values = list(args)
    for k, stage in enumerate(stages):
        output = stage(*values)
        if k < len(stages) - 1:
            values = crossing_values(output, stage, k)
    return output


class CausalLM(nn.Module):
    """A Hugging Face model wrapped as its users wrap it: the dict batch is given to the model whole."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32,
        )  # fmt: skip
        self.model = transformers.LlamaForCausalLM(config)

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(**batch)


def _batch(size: int, length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (size, length))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def test_a_model_torch_fx_cannot_trace_is_cut_between_its_layers_and_calls_them_as_written() -> None:
    torch.manual_seed(0)
    model = CausalLM()
    model.model.gradient_checkpointing_enable()
    batch = _batch(2, 8)
    partition = split_module(model, ["model.model.layers.2"], example_input=(batch,))
    assert partition.exported_with[0]["labels"].device.type == "meta"  # what every call of the first stage must give
    first, last = partition.train
    # parameter names are the model's own; the layers holding no cut are called, not traced
    assert set(partition.parameter_names(0)) | set(partition.parameter_names(1)) == {
        n for n, _ in model.named_parameters()
    }
    called = {str(n.target) for n in last.graph.nodes if n.op == "call_module"}
    assert {"model.model.layers.2", "model.model.norm", "model.lm_head"} <= called
    assert last.get_submodule("model.model.layers.2") is model.model.model.layers[2]
    for size, length in [(2, 8), (3, 5)]:  # sizes are symbolic: another batch and sequence length run
        batch = _batch(size, length)
        expected = model(batch)
        outputs = _run(partition.train, batch)
        # the labels reached the last stage, which returns the model's ModelOutput with its loss
        assert type(outputs) is type(expected)
        torch.testing.assert_close(outputs.loss, expected.loss)
        torch.testing.assert_close(outputs.logits, expected.logits)
    outputs.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


class CausalLMByName(CausalLM):
    """The batch's items as arguments (``self(**batch)``), as ``DDGReference`` takes a stage's inputs."""

    def forward(self, input_ids, attention_mask, labels):  # type: ignore[override]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_gradient_checkpointing_in_a_hugging_face_model_matches_the_reference() -> None:
    # the layers recompute their forward in backward: on the first stage (delay 1), on the weights its batch used
    torch.manual_seed(0)
    model = CausalLMByName()
    model.model.gradient_checkpointing_enable()
    reference_model = copy.deepcopy(model)
    batches = [tuple(_batch(2, 8).values()) for _ in range(5)]
    split = ["model.model.layers.2"]
    pipeline = LockStep(model, split, example_input=batches[0])
    optimizers = [torch.optim.SGD(stage.parameters, lr=0.5) for stage in pipeline.stages]
    stages = split_module(reference_model, split, example_input=batches[0], evaluation=False).train
    reference = DDGReference(stages, [torch.optim.SGD(s.parameters(), lr=0.5) for s in stages], lambda out, _: out.loss)
    for batch in batches:
        pipeline.step(batch, lambda out: out.loss, optimizers)
        reference.step(batch, None)
    pipeline.drain(optimizers)
    reference.finish()
    for (name, trained), expected in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(trained, expected, msg=lambda m, name=name: f"{name}: {m}")


def test_where_the_layers_cannot_be_kept_whole_every_module_is_traced_into(monkeypatch: pytest.MonkeyPatch) -> None:
    # the fallback of an export that cannot call the layers as written: one that traces into every module
    from lightning_ddg import exporting

    def refuse(module: nn.Module, args: tuple, dynamic, train: bool, called, *rest):
        if called:
            raise RuntimeError("these modules cannot be kept whole")
        return exported(module, args, dynamic, train, called, *rest)

    exported = exporting._exported
    monkeypatch.setattr(exporting, "_exported", refuse)
    torch.manual_seed(0)
    model = CausalLM()
    partition = split_module(model, ["model.model.layers.1", "model.model.layers.2"], example_input=(_batch(2, 8),))
    assert not any(n.op == "call_module" for stage in partition.train for n in stage.graph.nodes)
    for size, length in [(2, 8), (3, 5)]:
        batch = _batch(size, length)
        expected, outputs = model(batch), _run(partition.train, batch)
        torch.testing.assert_close(outputs.loss, expected.loss)
        torch.testing.assert_close(outputs.logits, expected.logits)


def test_nn_transformer_with_masks_is_cut_between_its_layers() -> None:
    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.transformer = nn.Transformer(16, 2, 2, 2, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x, tgt_mask, padding):
            h = self.embed(x)
            return self.head(self.transformer(h, h, src_key_padding_mask=padding, tgt_mask=tgt_mask))

    torch.manual_seed(0)
    model = Seq2Seq()
    x = torch.randn(2, 6, 8)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, -2:] = True
    args = (x, nn.Transformer.generate_square_subsequent_mask(6), padding)
    split_points = ["transformer.encoder.layers.1", "transformer.decoder.layers.1"]
    partition = split_module(model, split_points)
    assert partition.exported_with is None  # traced with torch.fx
    assert partition.parameter_names(1)[0].startswith("transformer.encoder.layers.1.")
    assert partition.parameter_names(2)[0].startswith("transformer.decoder.layers.1.")
    torch.testing.assert_close(_run(partition.train, *args), model(*args))


class Dropping(nn.Module):
    """GPT-2 (dropout in its layers, which run as written), with or without dropout in the forward that is traced."""

    def __init__(self, reads_training: bool) -> None:
        super().__init__()
        config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
        self.model = transformers.GPT2LMHeadModel(config)
        self.reads_training = reads_training

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids).logits
        return nn.functional.dropout(logits, 0.5, self.training) if self.reads_training else logits


@pytest.mark.parametrize("reads_training", [False, True])
def test_one_export_serves_both_modes_unless_the_traced_code_reads_a_training_flag(reads_training: bool) -> None:
    torch.manual_seed(0)
    model = Dropping(reads_training)
    ids = torch.randint(0, 64, (2, 8))
    # given the modules a plan opens, only the stages' graph is exported
    opened = ["model", "model.transformer", "model.transformer.h"]
    partition = split_module(model, ["model.transformer.h.1"], example_input=(ids,), opened=opened)
    assert partition.opened == opened
    assert (partition.eval[1] is partition.train[1]) is not reads_training
    model.eval()
    torch.testing.assert_close(_run(partition.eval, ids), model(ids))
    model.train()
    torch.manual_seed(1)
    outputs = _run(partition.train, ids)
    torch.manual_seed(1)
    torch.testing.assert_close(outputs, model(ids))


class Twice(nn.Module):
    """A forward torch.fx cannot trace (it branches on a size) that calls one module on two inputs, and reuses
    after its layers a size they compute too."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(Flat() for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 1:
            x = x.flip(1)
        h = self.embed(x) + self.embed(y)
        for layer in self.layers:
            h = layer(h)
        return self.head(h).reshape(x.shape[0] * x.shape[1], 2)


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h.reshape(h.shape[0] * h.shape[1], 8)).relu().reshape(h.shape)


def test_a_module_called_twice_is_traced_into_and_the_others_still_run_as_written() -> None:
    torch.manual_seed(0)
    model = Twice()
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    partition = split_module(model, ["layers.1"], example_input=(x, y), evaluation=False)
    # the export keeps a module whole where it is called once only: embed is traced into, the layers are called
    assert partition.opened == ["embed", "layers"]
    called = [[str(n.target) for n in s.graph.nodes if n.op == "call_module"] for s in partition.train]
    assert called == [["layers.0"], ["layers.1", "layers.2", "head"]]
    for shape in [(2, 3, 4), (3, 5, 4)]:
        x, y = torch.randn(shape), torch.randn(shape)
        torch.testing.assert_close(_run(partition.train, x, y), model(x, y))


def test_a_layer_that_converts_its_parameters_begins_where_its_computation_does() -> None:
    # Mamba's layers call .float() on parameters: the export checks each result's dtype in a node used by nothing,
    # which stayed at the top of the graph with the parameter, so a cut before layer 2 measured an empty stage 0
    from lightning_ddg.planning import plan

    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, state_size=4)
    model = transformers.MambaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 8))
    planned = plan(model, (ids,), split_points=["backbone.layers.2"], balance_by="flops")
    assert 0.35 < planned.stages[0].cost_share < 0.6, str(planned)
    partition = split_module(model, ["backbone.layers.2"], example_input=(ids,))
    torch.testing.assert_close(_run(partition.train, ids).logits, model(ids).logits)
