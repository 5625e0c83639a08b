"""Modules whose forward holds Python that must run at every call, and a ViT shaped like timm's.

Plain user code: nothing in them knows about pipelines.
"""

from __future__ import annotations

import random

import lightning as L
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


class SeededLayerDrop(nn.Module):
    """LayerDrop drawing from a generator of its own, so that every process draws the same sequence."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.rng = random.Random(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.rng.random() < 0.5:
            return x
        return x + torch.tanh(self.fc(x))


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


class StatefulNet(L.LightningModule):
    """Blocks that keep Python state: call counters and layer drops with generators of their own."""

    SPLIT_POINTS = {2: ["net.4"], 3: ["net.3", "net.6"]}

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 16), Counting(16), nn.Tanh(), SeededLayerDrop(16, seed=1), nn.Linear(16, 16), nn.Tanh(),
            SeededLayerDrop(16, seed=2), Counting(16), nn.Linear(16, 3),
        ).double()  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Attention(nn.Module):
    """timm's ``Attention``: the shapes are read from the input as Python ints."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A vision transformer laid out as timm's ``VisionTransformer``: patch embedding, class token, position
    embedding, ``blocks``, norm, head on the class token."""

    def __init__(self, image: int = 16, patch: int = 4, dim: int = 32, depth: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads=4) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
