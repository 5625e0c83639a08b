"""Checks that turn a misuse of the pipeline into an error saying what to do instead.

Plain PyTorch, like the stage runtime. They are cheap: option checks run once when the strategy is built or the
trainer starts, and the per-step ones look at Python types only, except :func:`check_finite`, which runs only when
asked for.

Example::

    >>> check_options(split_points="model.layer3", balance=None, num_stages=None)
    Traceback (most recent call last):
    ...
    TypeError: split_points='model.layer3' is a string; give a list of module names, e.g. split_points=['model.layer3']
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ddg.balance import BALANCE_BY
from lightning_ddg.comm import crosses
from lightning_ddg.partition import CUT_KEY
from lightning_ddg.stats import MEASURED_STEPS

__all__ = [
    "check_options",
    "check_not_compiled",
    "check_trainable_unchanged",
    "check_stage_count",
    "check_no_synced_batchnorm",
    "check_stages_have_parameters",
    "check_exported_arguments",
    "crossing_values",
    "check_finite",
    "check_train_loader",
    "check_same_lengths",
    "check_tied_clipping",
]


def check_options(
    split_points: Any,
    balance: Any,
    num_stages: Any,
    memory: str = "stash",
    balance_by: str | None = None,
    start_method: str = "popen",
    rebalance_after_steps: int | None = None,
) -> None:
    """Reject option values that cannot name a partition or a run, before any process starts."""
    from lightning_ddg.stage import MEMORY_MODES  # stage.py imports this module

    if memory not in MEMORY_MODES:
        raise ValueError(f"memory={memory!r} is not one of {MEMORY_MODES}")
    if balance_by is not None and balance_by not in BALANCE_BY:
        raise ValueError(f"balance_by={balance_by!r} is not one of {BALANCE_BY}")
    if start_method not in ("popen", "spawn", "forkserver"):
        raise ValueError(
            f"start_method={start_method!r}: use 'popen' (strategy='ddg'), 'spawn' ('ddg_spawn') or 'forkserver'"
        )
    if split_points is not None and balance is not None:
        raise ValueError("give either split_points or balance, not both: they are two ways to name the same cuts")
    if rebalance_after_steps is not None:
        _check_rebalancing(rebalance_after_steps, split_points, balance, balance_by)
    if isinstance(split_points, str):
        raise TypeError(
            f"split_points={split_points!r} is a string; give a list of module names, e.g. "
            f"split_points=[{split_points!r}]"
        )
    if split_points is not None:
        if not all(isinstance(p, str) for p in split_points):
            raise TypeError(f"split_points={list(split_points)!r}: give module names (strings), e.g. ['model.layer3']")
        repeated = sorted({p for p in split_points if list(split_points).count(p) > 1})
        if repeated:
            raise ValueError(f"split_points name {repeated} more than once: each module can begin only one stage")
    if balance is not None and (
        isinstance(balance, (str, int)) or not all(isinstance(b, int) and b >= 1 for b in balance)
    ):
        raise ValueError(f"balance={balance!r}: give a list of positive layer counts, one per stage, e.g. [3, 2, 2, 1]")
    if num_stages is not None:
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages={num_stages!r}: give a positive number of pipeline stages")
        named = _named_stages(split_points, balance)
        if named is not None and named != num_stages:
            option = "split_points" if split_points is not None else "balance"
            raise ValueError(
                f"num_stages={num_stages} contradicts {option}, which makes {named} stages: give one of them, "
                "or make them agree"
            )


def _check_rebalancing(after: Any, split_points: Any, balance: Any, balance_by: str | None) -> None:
    if not isinstance(after, int) or isinstance(after, bool) or after < MEASURED_STEPS:
        raise ValueError(
            f"rebalance_after_steps={after!r}: the stages' times are measured over {MEASURED_STEPS} training batches "
            f"at least; give a number of batches of {MEASURED_STEPS} or more"
        )
    if split_points is not None or balance is not None or balance_by == "memory":
        given = "balance_by='memory'" if split_points is None and balance is None else "split_points or balance"
        raise ValueError(
            f"rebalance_after_steps cuts anew among the cuts a plan by time, FLOPs or parameters was chosen among, "
            f"and {given} leaves none: leave the cut to the plan (no split_points, no balance), or leave "
            "rebalance_after_steps unset"
        )


def check_rebalancing_setup(deterministic: bool, on_meta: bool) -> None:
    """``rebalance_after_steps`` where the fit's setup rules it out: cuts chosen on measured times differ from run
    to run; a model built in ``configure_model`` is never held whole by one process."""
    if deterministic:
        raise ValueError(
            "rebalance_after_steps cuts where the times measured in this run balance, so that two runs may cut "
            "differently, which Trainer(deterministic=True) rules out: leave one of them unset"
        )
    if on_meta:
        raise ValueError(
            "rebalance_after_steps moves modules between stages through a whole copy of the model on every "
            "process, and this model is built in configure_model, so that no process need hold it whole: leave "
            "rebalance_after_steps unset; a fit resumed from a checkpoint is cut where the measured times balance "
            "(docs/usage.md)"
        )


def check_stage_count(processes: int, split_points: Any, balance: Any, num_stages: int | None) -> None:
    """The stage count the options imply must fit the processes: one process per stage, or whole replicas of
    a pipeline of ``num_stages``."""
    if num_stages is not None:
        if processes % num_stages:
            raise ValueError(
                f"{processes} processes (devices x num_nodes) cannot run whole replicas of a pipeline of "
                f"num_stages={num_stages}: set devices x num_nodes to a multiple of {num_stages}, or num_stages to a "
                f"divisor of {processes}."
            )
        return  # check_options has compared num_stages with split_points and balance
    if split_points is not None and len(split_points) + 1 != processes:
        raise ValueError(
            f"{len(split_points)} split points make {len(split_points) + 1} stages, but {processes} devices were "
            f"requested: give devices={len(split_points) + 1}, {processes - 1} split points, or "
            f"num_stages={len(split_points) + 1} to run replicas of the pipeline."
        )
    if balance is not None and len(balance) != processes:
        raise ValueError(
            f"balance {list(balance)} has {len(balance)} stages but the trainer runs {processes} processes: give "
            f"devices={len(balance)}, a balance of {processes} entries, or num_stages={len(balance)} to run "
            "replicas of the pipeline."
        )


def _named_stages(split_points: Sequence[str] | None, balance: Sequence[int] | None) -> int | None:
    if split_points is not None:
        return len(split_points) + 1
    return len(balance) if balance is not None else None


def check_no_synced_batchnorm(sync_batchnorm: bool, num_replicas: int) -> None:
    """``sync_batchnorm=True`` has nothing to synchronise over one pipeline; over replicas it is not supported."""
    if sync_batchnorm and num_replicas > 1:
        raise ValueError(
            f"Trainer(sync_batchnorm=True) is not supported with DDGStrategy's {num_replicas} replicas of the "
            "pipeline: each replica's stages normalise over their own shard of the batch, as strategy='ddp' does "
            "without it. Remove sync_batchnorm=True."
        )


def check_no_sync_batchnorm_layers(module: nn.Module, num_stages: int) -> None:
    """A ``SyncBatchNorm`` all-gathers its batch statistics over every process in training, but only the stage that
    holds it would take part: the others would never join, and it would wait until the timeout."""
    synced = [name for name, m in module.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    if num_stages == 1 or not synced:
        return
    raise ValueError(
        f"{synced[0]!r} is a SyncBatchNorm ({len(synced)} in the model): in training it gathers its batch statistics "
        "from every process of the job, but only the stage that holds it would take part, and it would wait for the "
        "others until the timeout. Use BatchNorm layers (a stage sees the whole batch, so there is nothing to "
        "synchronise), e.g. build the model without nn.SyncBatchNorm.convert_sync_batchnorm."
    )


def check_stages_have_parameters(stages: Sequence[nn.Module], split_points: Sequence[str]) -> None:
    """Every stage steps an optimizer over its own parameters: a stage without any would have none to step."""
    for k, stage in enumerate(stages):
        if next(iter(stage.parameters()), None) is None and len(stages) > 1:
            begins = f"begins at {split_points[k - 1]!r}" if k > 0 else "is the first"
            raise ValueError(
                f"stage {k} of {len(stages)} ({begins}) holds no parameters, so its optimizer would have nothing to "
                "update (configure_optimizers would get an empty parameter list). Choose split points that give "
                "every stage some parameters, or run fewer stages."
            )


def crossing_values(output: Any, module: nn.Module, stage_index: int) -> list[Any]:
    """The values stage ``stage_index`` sends to the next stage: ``output`` as a list of tensors, ``None`` and
    Python numbers (:func:`~lightning_ddg.comm.crosses`), or an error that names the cut, the value and its type
    when a value is none of those (at this step)."""
    values = list(output) if isinstance(output, (tuple, list)) else [output]
    for position, value in enumerate(values):
        if crosses(value):
            continue
        names = _output_names(module)
        name = names[position] if position < len(names) else f"value {position}"
        cut = getattr(module, "meta", {}).get(CUT_KEY)
        where = f"the cut at {cut!r}" if cut else f"the cut after stage {stage_index}"
        raise TypeError(
            f"{name!r} is computed before {where} and used after it, so it crosses from stage {stage_index} to "
            f"stage {stage_index + 1}; at this step it is of type {type(value).__name__}, but only tensors, None "
            "and Python numbers can cross between stages. Choose a split point that this value does not cross, or "
            "compute it after the cut."
        )
    return values


def check_exported_arguments(arguments: dict[str, Any], exported_with: dict[str, Any]) -> None:
    """Raise unless each of ``forward``'s ``arguments`` is ``None`` where it was ``None`` in the example the model
    was exported with (``exported_with``, by name), and set where it was set: an exported graph takes the
    arguments it was exported with."""
    for name, value in arguments.items():
        expected = exported_with.get(name)
        if (value is None) == (expected is None):
            continue
        then, now = ("None", "given") if expected is None else ("given", "None")
        raise ValueError(
            f"forward's argument {name!r} is {now} in this call, but the model was opened with torch.export on an "
            f"example in which it is {then} (the first batch, or example_input_array), and an exported graph takes "
            "the arguments it was exported with. Pass the same arguments to self(...) in every step (for "
            "prediction too), or set the LightningModule's example_input_array to the arguments every step passes."
        )


def _output_names(module: nn.Module) -> list[str]:
    graph = getattr(module, "graph", None)
    if graph is None:
        return []
    output = next((n for n in graph.nodes if n.op == "output"), None)
    values = output.args[0] if output is not None else ()
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [getattr(v, "name", repr(v)) for v in values]


def check_finite(tensors: Sequence[Any], what: str, advice: str) -> None:
    """Raise ``FloatingPointError`` if a floating-point tensor among ``tensors`` holds a NaN or an infinity."""
    for tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FloatingPointError(f"{what} holds NaN or infinite values. {advice}")


def check_train_loader(dataloader: object) -> None:
    """A pipeline with no training batch has nothing to train: say so instead of ending with no update."""
    try:
        length = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return  # an iterable without a length: nothing to check ahead of time
    if length == 0:
        raise ValueError(
            "the training dataloader has no batches (len(train_dataloader) == 0), so there is nothing to train. "
            "Check the dataset's size, the batch size and drop_last (drop_last=True with fewer samples than "
            "batch_size gives no batch); limit_train_batches=0 skips training on purpose."
        )


def check_same_lengths(lengths: Sequence[int | None], what: str, describe: Any) -> None:
    """Every process of a pipeline must read as many batches: a stage with fewer would leave the others waiting for
    a batch that never comes. ``lengths`` are the data loader's lengths on each global rank (``None``: no length)."""
    known = {rank: n for rank, n in enumerate(lengths) if n is not None}
    if len(set(known.values())) <= 1:
        return
    counts = ", ".join(f"{n} on {describe(rank)}" for rank, n in known.items())
    raise ValueError(
        f"the {what} has a different number of batches in the job's processes ({counts}), but every stage of a "
        "pipeline must read the same batches in the same order. A dataset that each process reads from a file that "
        "changed in between, or a sampler that depends on the rank, gives this: read the data once (e.g. in "
        "prepare_data, to a file that no longer changes) and leave the sampler to the strategy."
    )


def check_tied_clipping(tied: Sequence[Any], clip_value: float | None, algorithm: Any) -> None:
    """Clipping by norm scales each stage's gradients by that stage's own norm: the copies of a weight shared
    across stages would take different updates and drift apart."""
    if not tied or not clip_value or str(getattr(algorithm, "value", algorithm) or "norm") != "norm":
        return
    names = [w.name for w in tied]
    raise ValueError(
        f"gradient_clip_val clips each stage's gradients by the norm of that stage's gradients, but {names} are used "
        "by several stages, whose copies must take the same update: they would drift apart. Clip by value "
        "(Trainer(gradient_clip_algorithm='value')), or train without clipping."
    )


def check_balance_length(balance: Sequence[int], num_stages: int) -> None:
    if len(balance) != num_stages:
        raise ValueError(
            f"balance {list(balance)} has {len(balance)} stages but the pipeline has {num_stages}: give "
            f"devices={len(balance)} (or num_stages={len(balance)}) or a balance of {num_stages} entries."
        )


def check_not_compiled(module: nn.Module) -> None:
    """Refuse a module that holds a ``torch.compile``'d submodule: its forward is compiled code, which can be neither
    traced nor cut into stages."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # never imported: nothing was compiled
    if eval_frame is None:
        return
    compiled = [name or "the module" for name, m in module.named_modules() if isinstance(m, eval_frame.OptimizedModule)]
    if compiled:
        raise ValueError(
            f"{compiled[0]!r} is compiled with torch.compile, and a compiled module cannot be cut into pipeline "
            "stages. Assign the module itself (self.model = net, not torch.compile(net)); DDG runs the stages "
            "eagerly."
        )


def check_trainable_unchanged(parameters: list[tuple[str, nn.Parameter]], trainable: list[bool]) -> None:
    """Raise unless each of a stage's ``parameters`` still requires grad exactly where ``trainable`` says it did
    when the stage was built: a stage stashes, differentiates and updates the parameters it was built with."""
    changed = [
        (name, p.requires_grad) for (name, p), was in zip(parameters, trainable, strict=True) if p.requires_grad != was
    ]
    if changed:
        name, now = changed[0]
        raise RuntimeError(
            f"{name!r} was made {'trainable' if now else 'frozen'} (requires_grad={now}) during the fit, with "
            f"{len(changed)} parameter(s) in all, but each pipeline stage fixes the parameters it trains when the fit "
            "starts. Freeze or unfreeze before trainer.fit; to fine-tune in phases, call trainer.fit once per phase "
            "(e.g. with the backbone frozen, then again unfrozen) instead of changing requires_grad in a callback."
        )


def check_automatic_optimization(automatic: bool) -> None:
    if not automatic:
        raise ValueError(
            "DDGStrategy drives the optimizer of each stage itself and does not support manual optimization. "
            "Set `self.automatic_optimization = True` (the default) or use strategy='ddp'."
        )


def check_defines_forward(defines: bool, name: str) -> None:
    if not defines:
        raise ValueError(
            f"{name} defines no forward: DDGStrategy cuts the module's forward into stages and runs it as a pipeline "
            "where training_step calls self(...). Define forward to run the model (for example "
            "`def forward(self, x): return self.model(x)`) and compute the output in training_step with self(x)."
        )


def check_no_loss_scaling(scaled: bool) -> None:
    if scaled:
        raise ValueError(
            "DDGStrategy does not support precision='16-mixed': its loss scale is a single number that every "
            "stage's gradients would have to be unscaled with and that must shrink whenever any stage "
            "overflows, but the stages step at different times on gradients of different batches. Use "
            "precision='bf16-mixed' (no loss scaling needed) or '32-true'."
        )


def check_plateau_per_epoch(configs: Sequence[Any], num_stages: int) -> None:
    """A ``ReduceLROnPlateau`` stepped every batch reads a metric on every stage, but a pipeline's training metrics
    exist on its last stage only; they reach the others at each epoch's end and after each validation."""
    per_step = [c for c in configs if c.reduce_on_plateau and c.interval == "step"]
    if num_stages == 1 or not per_step:
        return
    raise ValueError(
        f"configure_optimizers returned a ReduceLROnPlateau that steps every training batch (interval='step') on "
        f"{per_step[0].monitor!r}, but each stage of a pipeline steps its own optimizer, and what training_step logs "
        "exists on the last stage only: the other stages would lack the metric, or reduce their learning rates at "
        "other steps than the last. Step it once per epoch (interval='epoch', the default): the last stage's metrics "
        "reach every stage at each epoch's end and after each validation, and every stage reduces alike."
    )


NONE_LOSS = (
    "training_step returned None, to skip its batch: DDGStrategy trains on a zero loss for it instead, so every stage "
    "still takes its optimizer step for that batch, with zero gradients. That leaves the weights as they were under "
    "plain SGD, but momentum, weight decay and Adam's moments still move them (Lightning on one device would skip the "
    "step). To leave batches out exactly, filter them from the data. Said once per run."
)

ONE_OPTIMIZER = (
    "DDGStrategy steps one optimizer per stage, but configure_optimizers returned several. Return one "
    "optimizer; to give parts of the model their own settings, give it param groups, e.g. "
    "torch.optim.AdamW([{'params': a, 'lr': 1e-3}, {'params': b, 'lr': 1e-4}]). Or train with "
    "strategy='ddp' and manual optimization."
)

ONE_STAGE = (
    "DDGStrategy was given one process, so the model trains as one stage: plain backpropagation, no pipeline. "
    "Give it one device per stage, e.g. Trainer(strategy='ddg', devices=4) (on a CPU, devices='auto' is one "
    "process), or num_stages=1 to mean it."
)

NO_BATCH_SIZE_FINDER = (
    "Lightning's batch size finder (Tuner.scale_batch_size, the BatchSizeFinder callback) does not support "
    "DDGStrategy: each rank would save and restore a trial checkpoint of its own, and an out-of-memory error on one "
    "stage would have to end the trial on every stage. Set the batch size yourself: lightning_ddg.plan(model, "
    "example_input, num_stages) shows the memory each stage holds at the example's batch size ('holds')."
)

NO_WEIGHT_AVERAGING = (
    "{name} does not support DDGStrategy: it averages a whole copy of the model parameter by parameter with the "
    "module, which holds one stage's parameters on each process. Train without it, or with strategy='ddp'."
)

NO_FINETUNING = (
    "{name} does not support DDGStrategy: it freezes and unfreezes parameters during the fit, and each pipeline "
    "stage fixes the parameters it trains when the fit starts. Fine-tune in phases instead: freeze the backbone "
    "(requires_grad=False) and call trainer.fit, then unfreeze it and call trainer.fit again."
)

NO_ACCUMULATION_SCHEDULE = (
    "GradientAccumulationScheduler does not support DDGStrategy: each pipeline stage fixes its accumulation windows "
    "when the fit starts, and Lightning would divide the loss by a count the stages do not step by. Set "
    "Trainer(accumulate_grad_batches=N) for the whole fit, or call trainer.fit once per phase."
)

NO_PRUNING = (
    "ModelPruning does not support DDGStrategy: it replaces the module's weights with masked copies during the fit, "
    "while each pipeline stage trains the weights it was built with and holds only its own modules. Prune before "
    "the fit or after it (torch.nn.utils.prune), on the whole model."
)

NO_SPAWNED_LR_FINDER = (
    "Lightning's learning-rate finder (Tuner.lr_find, the LearningRateFinder callback) ends its fit with an exception "
    "that a spawned process cannot hand back, so its result would not reach this process. Run it with "
    "strategy='ddg', whose processes run the script (the finder's result is then on every rank)."
)

SHOULD_STOP_AFTER_FORWARD = (
    "training_step set trainer.should_stop after self(...), where only the last stage runs it, and with "
    "DDGStrategy(load_once=False) the stages before it cannot learn to stop after the same batch. Keep the default "
    "load_once=True, or stop from a hook every stage runs (EarlyStopping, max_steps or max_time)."
)
