"""Small deterministic models and data streams shared by the tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Recomputed(nn.Module):
    """A layer that runs its forward again in backward (``torch.utils.checkpoint``), as gradient checkpointing does."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.layer, x, use_reentrant=False)


def mlp(
    width: int = 16,
    depth: int = 4,
    dropout: float = 0.0,
    batchnorm: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    recomputed: bool = False,
    parametrized: bool = False,
) -> nn.Module:
    """``recomputed``: a checkpointed linear layer after each tanh. ``parametrized``: the hidden linear layers under
    torch's parametrizations, in turn weight norm (two parameters make the weight) and spectral norm (a power
    iteration that updates buffers at every training forward)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, width)]
    for _ in range(depth - 1):
        layers.append(nn.Tanh())
        if recomputed:
            layers.append(Recomputed(nn.Sequential(nn.Linear(width, width), nn.Tanh())))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, width))
    layers += [nn.Tanh(), nn.Linear(width, 3)]
    model = nn.Sequential(*layers).to(dtype)
    hidden = [m for m in model[1:-1] if isinstance(m, nn.Linear)] if parametrized else []
    for i, linear in enumerate(hidden):
        norm = nn.utils.parametrizations.spectral_norm if i % 2 else nn.utils.parametrizations.weight_norm
        norm(linear)
    return model


def attend(z: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Each row attends to itself, with an optional mask and flag, as timm's attention does; torch.fx records the
    call whole (torch 2.4 cannot trace a flag into scaled_dot_product_attention)."""
    return nn.functional.scaled_dot_product_attention(z[:, None], z[:, None], z[:, None], mask, is_causal=causal)[:, 0]


torch.fx.wrap("attend")


class PassingThrough(nn.Module):
    """Received tensors leave stages again: ``h`` skips over every later cut, and the stage of ``b`` also sends
    on ``v``, a view of the ``h`` it received. Values that are not tensors cross too: the optional ``mask`` and
    ``causal`` flag (``None`` and ``False`` when left out, as timm's ``attn_mask`` and ``is_causal``) and a row
    count read from a shape. Cut at ``SPLIT_POINTS[:K-1]``."""

    SPLIT_POINTS = ["b", "c", "head"]

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(24, 3)
        self.to(dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        rows = h.shape[0]
        z = torch.tanh(self.b(h))
        v = h[:, :8]
        z = torch.tanh(self.c(attend(z, mask, causal)))
        return self.head(torch.cat([z * h, v], dim=1)).reshape(rows, -1)


class TiedLM(nn.Module):
    """A tiny language model whose output head shares the input embedding's weight, as GPT-2's does (unless not
    ``tie_head``); with ``tie_blocks``, the third block also shares the first block's weight. Cut at
    ``SPLIT_POINTS[K]``: the embedding and the head then lie in the first and the last stage, and with three stages
    the tied blocks in the first and the second."""

    SPLIT_POINTS = {2: ["blocks.2"], 3: ["blocks.2", "blocks.4"]}
    VOCAB = 11

    def __init__(
        self, dtype: torch.dtype = torch.float64, tie_blocks: bool = False, dropout: float = 0.0, tie_head: bool = True
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(self.VOCAB, 16)
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [nn.Linear(16, 16), nn.Dropout(dropout) if dropout else nn.Tanh()]
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(16, self.VOCAB, bias=False)
        if tie_head:
            self.head.weight = self.embed.weight
        if tie_blocks:
            self.blocks[2].weight = self.blocks[0].weight
        self.to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.blocks(self.embed(tokens))))


def token_batches(
    n: int, batch_size: int = 4, last: int = 3, length: int = 5, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of token sequences and their next tokens; the last one has ``last`` sequences."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = last if i == n - 1 else batch_size
        tokens = torch.randint(0, TiedLM.VOCAB, (size, length + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def split_points_for(model: nn.Module, num_stages: int) -> list[str]:
    """Cut before evenly spaced Linear layers."""
    if isinstance(model, PassingThrough):
        return model.SPLIT_POINTS[: num_stages - 1]
    if isinstance(model, TiedLM):
        return model.SPLIT_POINTS[num_stages]
    linears = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)][1:]
    step = len(linears) / num_stages
    return [linears[int(round(step * (k + 1))) - 1] for k in range(num_stages - 1)]


def batches(
    n: int, batch_size: int = 6, last: int = 4, seed: int = 1, dtype: torch.dtype = torch.float64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches; the last one is smaller, as a data loader's partial batch is."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = last if i == n - 1 else batch_size
        out.append((torch.randn(size, 8, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g)))
    return out


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.01)
    raise ValueError(kind)
