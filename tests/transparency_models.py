"""Modules whose forward holds Python that must run at every call.

Plain user code: nothing in them knows about pipelines.
"""

from __future__ import annotations

import random

import torch
from torch import nn


class Counting(nn.Module):
    """Counts its calls; every other call doubles its output, so a frozen count changes what the model computes."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(x) * (1.0 + self.calls % 2)


class LayerDrop(nn.Module):
    """Skips its layer with probability 1/2 in training, drawn from Python's global generator."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and random.random() < 0.5:
            return x
        return x + self.fc(x)


class Raising(nn.Module):
    """Raises when its Python flag says so."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("Raising was asked to fail")
        return self.fc(x)


class Holder(nn.Module):
    """A block around one of the modules above: a cut at ``inner`` or ``out`` opens it."""

    def __init__(self, inner: nn.Module, width: int = 4) -> None:
        super().__init__()
        self.inner = inner
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inner(torch.tanh(x))))
