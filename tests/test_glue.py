"""The plain parts the strategy hands work to, without a Trainer: example batches, loaders, the forward, stopping,
a meta-device build, joining the job, the strategy's collectives."""

from __future__ import annotations

import ast
import inspect
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from lightning_ddg import Topology, build_stage
from lightning_ddg.example_input import forward_arguments, loading_ms
from lightning_ddg.forward import PipelinedForward
from lightning_ddg.launchers import check_relaunchable, launched_ranks
from lightning_ddg.loaders import check_sampler_shards_replicas, loader_length, seed_shuffling
from lightning_ddg.local import local_links
from lightning_ddg.rendezvous import needs_rendezvous
from lightning_ddg.shard import materialize, record_draws, rng_states
from lightning_ddg.state import StageStates
from lightning_ddg.stopping import JobStop
from tests.models import batches, mlp, split_points_for
from tests.multiprocess import run_processes


def _forward(x: torch.Tensor, mask: torch.Tensor | None = None) -> None: ...


def _forward_two(a: torch.Tensor, b: torch.Tensor) -> None: ...


def test_forward_arguments_take_the_inputs_of_a_batch() -> None:
    x, y = torch.zeros(2, 3), torch.zeros(2)
    one, two = inspect.signature(_forward), inspect.signature(_forward_two)
    assert forward_arguments(x, one)[0] is x
    assert forward_arguments((x, y), one)[0] is x and len(forward_arguments((x, y), one)) == 1
    assert len(forward_arguments([x, y, y], two)) == 2
    assert forward_arguments({"x": x, "mask": y, "labels": y}, one) == (x, y)
    assert forward_arguments({"labels": y}, one) is None
    assert forward_arguments((x,), two) is None


class _Augmented(Dataset):
    """Each sample takes a millisecond and draws from Python's and torch's random streams, as augmentations do."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.001)
        return torch.full((2,), float(i)) * random.random() * torch.rand(())


def test_loading_a_batch_is_timed_where_the_process_loads_it() -> None:
    random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), torch.rand(()))
    random.seed(1)
    torch.manual_seed(1)
    ms = loading_ms(DataLoader(_Augmented(), batch_size=8, shuffle=True))
    assert 8 <= ms < 500  # eight samples of a millisecond each
    assert (random.random(), torch.rand(())) == expected  # the run draws what it would have drawn
    assert loading_ms(DataLoader(_Augmented(), batch_size=8, num_workers=1)) == 0.0  # its worker pays, not the stage
    assert loading_ms(None) == 0.0
    assert loading_ms(DataLoader(_Augmented(), batch_size=64)) == 0.0  # one batch: nothing to time after the first


def test_loaders_are_seeded_alike_and_sharded_over_replicas_only() -> None:
    data = TensorDataset(torch.arange(20.0))
    orders = []
    for _ in range(2):
        loader = DataLoader(data, shuffle=True, batch_size=5)
        seed_shuffling(loader, 7)
        torch.rand(3)  # the global stream moves differently on each stage
        orders.append([b[0].tolist() for b in loader])
    assert orders[0] == orders[1]
    assert loader_length(loader) == 4 and loader_length(x for x in range(3)) is None
    sharded = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=1))
    check_sampler_shards_replicas(sharded, num_replicas=2, replica=1)
    with pytest.raises(ValueError, match="must read the same batches"):
        check_sampler_shards_replicas(sharded, num_replicas=1, replica=0)


def test_the_pipelined_forward_runs_once_per_training_step() -> None:
    model = mlp()
    built = build_stage(model, Topology(num_stages=1), 0)
    forward = PipelinedForward(built.stage, inspect.signature(model.forward))
    x, _ = batches(1)[0]
    with forward.training_step():
        out = forward(x)
    torch.testing.assert_close(out, model(x))
    with pytest.raises(RuntimeError, match="twice"), forward.training_step():
        forward(x)
        forward(x)
    with pytest.raises(RuntimeError, match="never called"), forward.training_step():
        pass


class _WithOptional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(x) if shift is None else self.fc(x) + shift


def test_a_call_whose_arguments_differ_from_the_export_example_in_which_are_none_is_refused_with_advice() -> None:
    model = _WithOptional()
    built = build_stage(model, Topology(num_stages=1), 0)
    x = torch.randn(2, 4)
    # as for a model opened with torch.export on an example that gave shift (Partition.exported_with)
    example = (torch.empty(2, 4, device="meta"), torch.empty(4, device="meta"))
    forward = PipelinedForward(built.stage, inspect.signature(model.forward), exported_with=example)
    torch.testing.assert_close(forward(x, torch.ones(4)), model(x, torch.ones(4)))
    with pytest.raises(ValueError, match=r"argument 'shift' is None in this call, .* example in which it is given"):
        forward(x)
    forward = PipelinedForward(built.stage, inspect.signature(model.forward), exported_with=example[:1])
    with pytest.raises(ValueError, match=r"argument 'shift' is given in this call, .* example in which it is None"):
        forward(x, torch.ones(4))


def test_the_requeue_signal_saves_the_requeue_checkpoint_once_the_pipeline_stopped() -> None:
    stop, requeued = JobStop(), []
    stop.on_signal(signal.SIGUSR1, None)
    assert stop.requested(None) == signal.SIGUSR1
    stop.requeue = lambda signum, frame: requeued.append(signum)
    stop.after_stop()
    assert requeued == []  # not stopped yet
    stop.stopped(signal.SIGUSR1, report=False, step=0)
    stop.after_stop()
    assert requeued == [signal.SIGUSR1]  # the requeue signal saves the requeue checkpoint
    stop.reset()
    stop.stopped(signal.SIGTERM, report=False, step=0)
    stop.after_stop()
    assert requeued == [signal.SIGUSR1]  # SIGTERM does not


def test_a_model_built_on_meta_is_materialised_for_its_stage_as_a_whole_build_would_be() -> None:
    whole = mlp(seed=3, dtype=torch.float32)
    with torch.device("meta"):
        model = mlp(seed=3, dtype=torch.float32)
    # taken after the build, as the strategy takes them: initialising meta tensors draws no random numbers
    states = rng_states(torch.device("cpu"))
    torch.rand(7)  # the global stream moves on before the stage is built: the states taken must be the ones used
    topology, links = Topology(num_stages=2), local_links(2)[1]  # rank 0 runs stage 1: the last layers
    points = split_points_for(model, 2)
    built = build_stage(model, topology, 0, split_points=points, links=links, keep_only=True, init_rng_states=states)
    own = dict(built.module.named_parameters())
    assert own and not any(p.is_meta for p in own.values())
    expected = dict(whole.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, expected[name])
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in whole.parameters())


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_a_meta_build_whose_values_a_stage_cannot_make_is_refused_with_advice() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), _Scale(), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"the modules \['1'\] .* no reset_parameters\(\) .* build them in __init__"):
        materialize(model, {id(p) for p in model.parameters()}, torch.device("cpu"))
    # nn.Transformer's reset draws the values of its layers' tensors: another stage's, which cannot be drawn alone
    with torch.device("meta"):
        model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=8)
    with pytest.raises(ValueError, match=r"Transformer .* draws random values into the tensors of other modules"):
        materialize(model, {id(p) for p in model.decoder.parameters()}, torch.device("cpu"))
    # a buffer that __init__ computes and reset_parameters does not set
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), _Masked())
    with pytest.raises(ValueError, match=r"\['1.mask'\] .* gave them no values: build the model in __init__"):
        materialize(model, {id(t) for t in [*model.parameters(), *model.buffers()]}, torch.device("cpu"))
    # GPT-2's Conv1D draws its values in __init__, and has no reset_parameters: the replay would draw other values
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    with torch.device("meta"), record_draws() as draws:
        gpt2 = transformers.GPT2LMHeadModel(config)
    message = r"drew random values that its modules' reset_parameters\(\) do not draw again \(the build drew 10 times"
    with pytest.raises(ValueError, match=message):
        materialize(gpt2, set(), torch.device("cpu"), draws=draws)


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(8))
        self.register_buffer("mask", torch.tril(torch.ones(8, 8)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.mask * self.weight


def test_the_plain_parts_of_joining_a_job() -> None:
    topology = Topology(num_stages=3, num_replicas=2)
    assert [topology.describe(r) for r in (0, 2, 4)] == ["stage 2 (rank 0)", "stage 0 (rank 2)", "stage 1 (rank 4)"]
    assert not needs_rendezvous(1) and needs_rendezvous(2)  # no process group in this process
    assert launched_ranks(first_rank=1) == {}  # this process launched none
    states = StageStates.of(mlp(), topology, rank=0, world_size=6)
    assert states.state_dict_keys[:2] == ["0.weight", "0.bias"] and states.parameter_order == states.state_dict_keys


def _collectives_of_two_stages_and_two_replicas(rank: int, world_size: int) -> dict[str, object]:
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.accelerators import CPUAccelerator

    from lightning_ddg import DDGStrategy

    topology = Topology(num_stages=2, num_replicas=2)
    groups = {s: torch.distributed.new_group(topology.replica_ranks(s)) for s in range(2)}
    environment = LightningEnvironment()
    environment.set_global_rank(rank)
    environment.set_world_size(world_size)
    strategy = DDGStrategy(
        num_stages=2, accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")] * world_size,
        cluster_environment=environment,
    )  # fmt: skip
    strategy._run = SimpleNamespace(replica_group=groups[topology.stage_of(rank)])
    value = torch.tensor(float(rank))
    return {
        "mean": strategy.reduce(value.clone()).item(),
        "sum": strategy.reduce(value.clone(), reduce_op="sum").item(),
        "gathered": strategy.all_gather(value.clone()).tolist(),
        "any": strategy.reduce_boolean_decision(rank == 3, all=False),
        "all": strategy.reduce_boolean_decision(rank != 3),
        "broadcast": strategy.broadcast({"from": rank}, src=2),
        "not_a_tensor": strategy.reduce("text"),
    }


def test_logged_values_are_reduced_over_a_stages_replicas_and_stopping_over_the_whole_job() -> None:
    topology = Topology(num_stages=2, num_replicas=2)
    results = run_processes(_collectives_of_two_stages_and_two_replicas, 4)
    for rank, got in enumerate(results):
        replicas = topology.replica_ranks(topology.stage_of(rank))  # never the other stage's ranks
        assert got["mean"] == pytest.approx(sum(replicas) / 2)
        assert got["sum"] == pytest.approx(sum(replicas))
        assert sorted(got["gathered"]) == sorted(map(float, replicas))
        assert got["any"] is True and got["all"] is False  # one rank's vote reaches every stage
        assert got["broadcast"] == {"from": 2} and got["not_a_tensor"] == "text"


def test_a_program_that_cannot_be_run_again_is_refused_before_any_process_starts(tmp_path) -> None:
    from types import SimpleNamespace

    script = tmp_path / "train.py"
    script.write_text("")
    check_relaunchable([str(script), "--epochs", "3"], SimpleNamespace(__spec__=None))  # python train.py
    check_relaunchable(["-m"], SimpleNamespace(__spec__=object()))  # python -m package.train
    for argv in (["-c"], [""], []):  # python -c "...", an interpreter
        with pytest.raises(Exception, match=r"not started from a script file .* strategy='ddg_spawn'"):
            check_relaunchable(argv, SimpleNamespace(__spec__=None))


def test_only_the_modules_the_architecture_names_import_lightning() -> None:
    package = Path(__file__).resolve().parents[1] / "lightning_ddg"
    importing = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] in ("lightning", "lightning_utilities") for name in names):
                importing.add(path.name)
    text = (package.parent / "docs" / "architecture.md").read_text()
    paragraph = text[text.index("Only these modules import") : text.index("## The modules")]
    assert importing == set(re.findall(r"`(\w+\.py)`", paragraph))
