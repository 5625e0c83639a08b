"""Optimizer state in checkpoints: one ordinary optimizer state of the whole model, whatever the stage count.

Each stage's optimizer holds only that stage's parameters, numbered from 0. A checkpoint stores instead the
state that a single-device run of the same ``configure_optimizers`` has: the param groups in the user's order,
and within each group the parameters in the model's ``named_parameters()`` order. So a checkpoint resumes on
any number of stages, checkpoints of single-device runs resume on stages, and the other way round.

Example (``parts`` from every stage, e.g. gathered with ``all_gather_object``)::

    parts = [named_optimizer_state(optimizer, names)]             # on each stage
    full = merge_optimizer_states(parts, order)                    # what the checkpoint holds
    optimizer.load_state_dict(stage_optimizer_state(full, stage_groups, all_groups, shapes))
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["NothingToTrain", "named_optimizer_state", "merge_optimizer_states", "stage_optimizer_state", "group_names"]


class NothingToTrain(torch.optim.Optimizer):
    """The optimizer of a stage that ``configure_optimizers`` gave none of its parameters (only the trainable ones,
    where the stage holds a frozen backbone): it holds no param group, steps nothing, and adds nothing to the whole
    model's optimizer state, which the stages that train hold."""

    def __init__(self) -> None:
        super().__init__([torch.zeros(1)], {})  # the one tensor torch insists on is dropped by add_param_group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"state": {}, "param_groups": []}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def step(self, closure: Any = None) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def group_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    """The parameter names of each param group, in the optimizer's order (``names`` maps ``id(p)`` to names)."""
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError(
            "the optimizer holds a tensor that is not a parameter of the LightningModule; DDGStrategy can only "
            "place and checkpoint optimizers over the module's own parameters"
        ) from None


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """A stage's optimizer state keyed by parameter name instead of index, on the CPU."""
    state = optimizer.state_dict()
    groups = group_names(optimizer, names)
    by_index = [name for group in groups for name in group]
    return {
        "groups": groups,
        "hyper": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
        "state": {by_index[i]: _to_cpu(s) for i, s in state["state"].items()},
    }


def _full_groups(parts_groups: list[list[list[str]]], order: list[str]) -> list[list[str]]:
    parts_groups = [groups for groups in parts_groups if groups] or parts_groups  # a stage training nothing has none
    counts = {len(groups) for groups in parts_groups}
    if len(counts) != 1:
        raise ValueError(f"the stages' optimizers have different numbers of param groups: {sorted(counts)}")
    position = {name: i for i, name in enumerate(order)}
    merged = []
    for g in range(counts.pop()):
        names = {name for groups in parts_groups for name in groups[g]}
        merged.append(sorted(names, key=position.__getitem__))
    return merged


def merge_optimizer_states(parts: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """One optimizer state dict of the whole model from the stages' named states; ``order`` lists the model's
    parameter names as ``named_parameters()`` yields them."""
    groups = _full_groups([p["groups"] for p in parts], order)
    index = {name: i for i, name in enumerate(name for group in groups for name in group)}
    state = {index[name]: s for part in parts for name, s in part["state"].items()}
    hyper = next((p["hyper"] for p in parts if p["groups"]), parts[0]["hyper"])
    param_groups = [{**hyper[g], "params": [index[n] for n in names]} for g, names in enumerate(groups)]
    return {"state": dict(sorted(state.items())), "param_groups": param_groups}


def stage_optimizer_state(
    full: dict[str, Any],
    stage_groups: list[list[str]],
    all_groups: list[list[list[str]]],
    order: list[str],
    shapes: dict[str, torch.Size],
) -> dict[str, Any]:
    """The part of a whole-model optimizer state dict that belongs to one stage.

    Args:
        full: the state dict a checkpoint holds (written by DDG with any number of stages, or by one device).
        stage_groups: this stage's parameter names per param group, in its optimizer's order.
        all_groups: every stage's ``stage_groups``.
        order: the model's parameter names in ``named_parameters()`` order.
        shapes: this stage's parameter shapes, to catch a checkpoint whose parameters are ordered differently.
    """
    groups = _full_groups(all_groups, order)
    saved = full["param_groups"]
    if len(saved) != len(groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved)} param group(s) but configure_optimizers now returns "
            f"{len(groups)}: resume with the same optimizer configuration as the run that saved it"
        )
    index: dict[str, int] = {}
    for g, (names, group) in enumerate(zip(groups, saved, strict=True)):
        if len(names) != len(group["params"]):
            raise ValueError(
                f"param group {g} of the checkpoint's optimizer holds {len(group['params'])} parameters but the "
                f"model's has {len(names)}: resume with the same model and optimizer configuration"
            )
        index |= dict(zip(names, group["params"], strict=True))
    state, param_groups, local = {}, [], 0
    for g, names in enumerate(stage_groups):
        params = []
        for name in names:
            if index[name] in full["state"]:
                state[local] = _checked(full["state"][index[name]], name, shapes[name])
            params.append(local)
            local += 1
        param_groups.append({**{k: v for k, v in saved[g].items() if k != "params"}, "params": params})
    return {"state": state, "param_groups": param_groups}


def _checked(state: dict[str, Any], name: str, shape: torch.Size) -> dict[str, Any]:
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shape:
            raise ValueError(
                f"the checkpoint's optimizer state {key!r} for {name} has shape {tuple(value.shape)}, the parameter "
                f"{tuple(shape)}. List each param group's parameters in the model's order (as "
                "`module.parameters()` does) so that checkpoints map onto stages."
            )
    return state


def _to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
