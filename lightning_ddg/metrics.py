"""Logged metrics in a pipeline: they exist on the last stage only.

Example::

    scope_metrics(module, links.replica_group)   # torchmetrics sync over this stage's replicas only
"""

from __future__ import annotations

import warnings

import torch.distributed as dist
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn

from lightning_ddg._compat import disable_metric_sync

__all__ = ["quiet_epoch_sync_advice", "scope_metrics"]


def scope_metrics(module: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Make torchmetrics metrics synchronise over the stage's replicas only (not at all with ``group=None``):
    the other stages never update them, so a sync over all ranks would wait for them forever."""
    from torchmetrics import Metric

    for metric in module.modules():
        if isinstance(metric, Metric):
            if group is None:
                disable_metric_sync(metric)
            else:
                metric.process_group = group


def quiet_epoch_sync_advice(everything: bool) -> None:
    """Lightning advises ``sync_dist=True`` for every epoch-level metric once a process group exists. The
    strategy's own figures never need it, and with one pipeline (no replicas) nothing does: metrics are logged
    on the last stage only."""
    names = ".*" if everything else "ddg/"
    warnings.filterwarnings(
        "ignore", message=rf"It is recommended to use `self.log\('{names}", category=PossibleUserWarning
    )
