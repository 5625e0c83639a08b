"""A stage process keeps alive the tensors of its own stage and nothing more."""

from __future__ import annotations

import gc
import json
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader

from lightning_ddg import DDGStrategy, checkpoint_io, plan, split_module
from lightning_ddg.checkpoint_io import save_streamed
from lightning_ddg.shard import keep_only_stage, kept_tensors, materialize, put_back, record_draws
from tests.jobs import run_job
from tests.lightning_models import MLPClassifier, cpu_trainer, loader
from tests.models import TiedLM

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


def _layers() -> nn.Sequential:
    """Built in float64 (cast after the build, the values drawn would differ from those drawn in float64)."""
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    return nn.Sequential(
        nn.Linear(8, 16, **f64),
        nn.Tanh(),
        nn.BatchNorm1d(16, **f64),
        nn.Linear(16, 16, **f64),
        nn.Tanh(),
        nn.Linear(16, 16, **f64),
        nn.Tanh(),
        nn.Linear(16, 3, **f64),
    )


class _Layers(MLPClassifier):
    """The model built in ``__init__``, or in ``configure_model`` (then on the meta device under DDG); it writes
    what each process holds when training begins, and the weights after fit."""

    def __init__(self, in_configure_model: bool, out_dir: str) -> None:
        super().__init__(optimizer="sgd")
        self.model = None if in_configure_model else _layers()
        self.out_dir = out_dir

    def configure_model(self) -> None:
        if self.model is None:
            self.model = _layers()

    def on_train_start(self) -> None:
        tensors = [*self.parameters(), *self.buffers()]
        held = {"meta": sum(t.is_meta for t in tensors), "elements": sum(t.numel() for t in tensors)}
        held["balance_by"] = self.trainer.strategy.plan.balance_by  # on the meta device: FLOPs, never time
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as f:
            json.dump(held, f)

    def on_fit_end(self) -> None:
        with open(f"{self.out_dir}/rank{self.global_rank}_after_fit.json", "w") as f:
            json.dump(sorted(self.state_dict()), f)
        state = self.trainer.strategy.full_state_dict()
        if self.global_rank == 0:
            torch.save(state, f"{self.out_dir}/weights.pt")
        self.trainer.strategy.save_full_state_dict(f"{self.out_dir}/written.pt")  # without holding the model


def test_materializing_one_stage_gives_the_values_of_a_whole_build() -> None:
    whole = _layers()
    after_whole = torch.rand(3)
    with torch.device("meta"):
        model = _layers()
    partition = split_module(model, ["3"])
    states = {"cpu": torch.get_rng_state()}
    materialize(model, kept_tensors(model, partition, 1), torch.device("cpu"), states, partition.train[1:])
    keep_only_stage(model, partition, 1)
    assert torch.equal(torch.rand(3), after_whole)  # the random stream goes on as after the whole build
    state = model.state_dict()
    assert sorted(state) == sorted(k for k in whole.state_dict() if not k.startswith(("0.", "2.")))
    for name, value in state.items():
        assert torch.equal(value, whole.state_dict()[name]), name
    assert partition.train[1](torch.randn(4, 16, dtype=torch.float64)).shape == (4, 3)


def _hugging_face(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    small = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    grouped = {**small, "intermediate_size": 32, "num_key_value_heads": 1}
    builds = {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, intermediate_size=32)),
        "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**grouped)),
        "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**grouped)),
        # tied input and output embeddings
        "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**grouped, head_dim=8)),
        "phi": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**small, intermediate_size=32)),
        "opt": lambda: transformers.OPTForCausalLM(
            transformers.OPTConfig(**small, ffn_dim=32, max_position_embeddings=32, word_embed_proj_dim=16)
        ),
        # position ids among the buffers
        "bert": lambda: transformers.BertForMaskedLM(
            transformers.BertConfig(**small, intermediate_size=32, max_position_embeddings=32)
        ),
    }
    return builds[kind]()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma", "phi", "opt", "bert"])
def test_materializing_a_stage_of_a_hugging_face_model_gives_the_values_of_a_whole_build(kind: str) -> None:
    # the model's own _init_weights, which post_init runs over the whole model, replayed module by module
    torch.manual_seed(0)
    whole = _hugging_face(kind)
    after_whole = torch.rand(3)
    expected = {**dict(whole.named_parameters()), **dict(whole.named_buffers())}
    names = list(expected)
    for kept_names in (names[: len(names) // 2], names[len(names) // 2 :]):
        torch.manual_seed(0)
        with torch.device("meta"), record_draws() as draws:
            model = _hugging_face(kind)
        states = {"cpu": torch.get_rng_state()}
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        materialize(model, {id(tensors[n]) for n in kept_names}, torch.device("cpu"), states, draws=draws)
        assert torch.equal(torch.rand(3), after_whole)  # the random stream goes on as after the whole build
        made = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name in names:
            if name in kept_names:
                assert torch.equal(made[name], expected[name]), name
            else:
                assert made[name].is_meta or any(made[name] is made[k] for k in kept_names), name


def test_materializing_leaves_the_values_of_a_part_built_in_init() -> None:
    # a pretrained part built in __init__, a new head built in configure_model (on the meta device)
    backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.MultiheadAttention(16, 2, batch_first=True))
    values = {n: t.clone() for n, t in backbone.state_dict().items()}
    torch.manual_seed(0)
    whole_head = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3))
    torch.manual_seed(0)
    with torch.device("meta"), record_draws() as draws:
        head = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3))
    model = nn.ModuleDict({"backbone": backbone, "head": head})
    states = {"cpu": torch.get_rng_state()}
    materialize(model, {id(p) for p in head.parameters()}, torch.device("cpu"), states, draws=draws)
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, values[name]), name
    for name, value in head.state_dict().items():
        assert torch.equal(value, whole_head.state_dict()[name]), name


def test_a_module_another_stage_holds_says_so_when_called_until_it_is_put_back() -> None:
    model, x = _layers().eval(), torch.randn(4, 8, dtype=torch.float64)
    expected, full = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    partition = split_module(model, ["3"])
    removed = keep_only_stage(model, partition, 1)
    # a call of the whole module, as a step calling a part of the model directly would: the first emptied module says
    # why it cannot run here, instead of an AttributeError inside it
    with pytest.raises(RuntimeError, match=r"'0' was called, but its parameters and buffers belong to another"):
        model(x)
    assert partition.eval[1](torch.randn(4, 16, dtype=torch.float64)).shape == (4, 3)  # the stage runs as before
    put_back(removed, full)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_materializing_keeps_a_tied_weight_one_tensor() -> None:
    with torch.device("meta"):
        model = TiedLM()
    partition = split_module(model, TiedLM.SPLIT_POINTS[2])
    materialize(model, kept_tensors(model, partition, 1), torch.device("cpu"), None, partition.train[1:])
    assert model.head.weight is model.embed.weight and not model.head.weight.is_meta
    assert dict(partition.train[1].named_parameters())["head.weight"] is model.embed.weight


def test_a_model_on_the_meta_device_is_planned_by_flops() -> None:
    with torch.device("meta"):
        model = _layers()
    found = plan(model, torch.randn(4, 8, dtype=torch.float64), 2, device=torch.device("meta"))
    assert found.balance_by == "flops" and "meta device" in (found.note or "")
    assert all(p.is_meta for p in model.parameters())


def test_a_model_built_in_configure_model_trains_as_one_built_in_init(tmp_path) -> None:
    weights, held = [], []
    for in_configure_model in (False, True):
        out = tmp_path / str(in_configure_model)
        out.mkdir()
        strategy = DDGStrategy(start_method="forkserver", split_points=["model.3", "model.5"])
        cpu_trainer(strategy, 3, max_epochs=1).fit(_Layers(in_configure_model, str(out)), loader())
        weights.append(torch.load(out / "weights.pt"))
        held.append([json.loads((out / f"rank{r}.json").read_text()) for r in range(3)])
    written = [torch.load(tmp_path / run / "written.pt", weights_only=True) for run in ("False", "True")]
    assert list(weights[0]) == list(weights[1]) == list(written[0]) == list(written[1])
    for name in weights[0]:
        for other in (weights[1], *written):
            assert torch.equal(weights[0][name], other[name]), name
    # each process holds its own stage only, and nothing on the meta device
    assert [h["elements"] for h in held[0]] == [h["elements"] for h in held[1]]
    assert [h["meta"] for h in held[1]] == [0, 0, 0]
    assert [h["balance_by"] for h in held[1]] == ["flops"] * 3  # planned without materialising the model
    # after fit, the module built in __init__ is whole on every rank; the one built in configure_model stays cut
    after_fit = [
        [json.loads((tmp_path / run / f"rank{r}_after_fit.json").read_text()) for r in range(3)]
        for run in ("False", "True")
    ]
    assert after_fit[0] == [sorted(weights[0])] * 3
    assert sorted(sum(after_fit[1], [])) == sorted(weights[0]) and all(after_fit[1])


def _tokens() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


class _HuggingFaceLM(L.LightningModule):
    """A Hugging Face causal LM built in ``__init__`` or in ``configure_model``; it writes the whole trained state."""

    def __init__(self, in_configure_model: bool, out_dir: str) -> None:
        super().__init__()
        self.model = None if in_configure_model else self.build()
        self.out_dir = out_dir

    @staticmethod
    def build() -> nn.Module:
        torch.manual_seed(0)
        transformers = pytest.importorskip("transformers")
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
        )
        return transformers.LlamaForCausalLM(config)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build()

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self(batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def on_fit_end(self) -> None:
        state = self.trainer.strategy.full_state_dict()
        if self.global_rank == 0:
            torch.save(state, f"{self.out_dir}/weights.pt")


def test_a_hugging_face_model_built_in_configure_model_trains_as_one_built_in_init(tmp_path) -> None:
    # its modules initialised one at a time by the model's own _init_weights, as its post_init does; the export's
    # graph, traced on the meta device, makes its position ids on the stage's device
    pytest.importorskip("transformers")
    weights = []
    for in_configure_model in (False, True):
        out = tmp_path / str(in_configure_model)
        out.mkdir()
        strategy = DDGStrategy(start_method="forkserver", split_points=["model.model.layers.1"])
        model = _HuggingFaceLM(in_configure_model, str(out))
        cpu_trainer(strategy, 2, max_steps=4).fit(model, DataLoader(_tokens(), batch_size=4))
        weights.append(torch.load(out / "weights.pt"))
    assert list(weights[0]) == list(weights[1])
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_a_model_built_in_configure_model_resumes_from_a_checkpoint(tmp_path) -> None:
    def fit(in_configure_model: bool, name: str, max_steps: int, ckpt_path=None) -> dict:
        out = tmp_path / name
        out.mkdir()
        strategy = DDGStrategy(start_method="forkserver", split_points=["model.5"])
        trainer = cpu_trainer(
            strategy, 2, max_steps=max_steps, max_epochs=-1, enable_checkpointing=True, default_root_dir=out
        )
        trainer.fit(_Layers(in_configure_model, str(out)), loader(), ckpt_path=ckpt_path)
        return torch.load(out / "weights.pt")

    fit(True, "first", max_steps=4)
    (checkpoint,) = (tmp_path / "first").rglob("*.ckpt")
    resumed = [fit(built, f"resumed_{built}", max_steps=8, ckpt_path=checkpoint) for built in (False, True)]
    for name in resumed[0]:
        assert torch.equal(resumed[0][name], resumed[1][name]), name


def test_a_streamed_checkpoint_is_an_ordinary_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint_io, "CHUNK_BYTES", 4096)  # the larger tensor travels in 10 pieces
    mine, theirs = torch.randn(3, 4), torch.arange(5000, dtype=torch.float64)
    checkpoint = {"state_dict": {"a": mine, "b": torch.empty(5000, dtype=torch.float64)}, "step": 7}
    checkpoint["optimizer_states"] = [{"state": {0: {"step": torch.empty(())}}}]
    sent = [iter(checkpoint_io.chunks(t.reshape(-1).view(torch.uint8))) for t in (theirs, torch.tensor(3.0))]

    def receive(i: int, buffer: torch.Tensor) -> None:
        buffer.copy_(next(sent[i]))  # the pieces as the sender sends them, in order

    path = tmp_path / "last.ckpt"
    save_streamed(checkpoint, path, [("state_dict", "b"), ("optimizer_states", 0, "state", 0, "step")], receive)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every record's checksum is that of the bytes streamed into it
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["a"], mine) and torch.equal(loaded["state_dict"]["b"], theirs)
    assert loaded["optimizer_states"][0]["state"][0]["step"] == 3.0 and loaded["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert all(next(pieces, None) is None for pieces in sent)  # every piece was received


@pytest.mark.timeout(300)
def test_the_memory_benchmark_reports_every_stage_within_its_formula(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    command = ["benchmarks/memory.py", "--width", "1024", "--steps", "4", "--stages", "2", "--memory", "stash"]
    command += ["--plan", "memory"]  # DDGStrategy(balance_by="memory"): fewer layers on the stage with weight copies
    result = run_job(*command, "--out", str(out), timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["build"], r["stage"]) for r in rows) == [("configure_model", 0), ("configure_model", 1)] + [
        ("init", 0),
        ("init", 1),
    ]
    phases = ["setup", "train", "save", "resume", "end"]
    assert [r["layers"] for r in sorted(rows, key=lambda r: (r["build"], r["stage"]))] == [7, 9, 7, 9]
    for row in rows:
        # private memory (resident less the shared library pages) is part of the resident memory
        assert all(0 < row[f"{p}_private_peak_mib"] < row[f"{p}_peak_mib"] for p in phases), row
        if row["build"] == "configure_model":
            largest = max(row[f"{phase}_peak_mib"] for phase in phases) - row["imports_mib"]
            assert largest <= row["formula_mib"]["total"] + 512, row
    assert [b["after"] for b in rows[0]["baseline"]][1:] == ["import torch", "import lightning", "import lightning_ddg"]
    assert out.with_suffix(".png").exists()
