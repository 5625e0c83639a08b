"""PyTorch's transformer stacks as ``torch.fx`` can trace them: a loop over their layers.

``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and ``nn.Transformer`` look at their inputs in Python before
running their layers (is the mask causal? are the batch sizes equal? can the nested-tensor fast path run?), which
``torch.fx`` cannot trace. :func:`stack_forward` gives, for such a module, a forward that computes what the module
computes in training, written as a plain loop over its layers, so that the tracer can open the stack and cuts can
fall between its layers: the masks are passed to every layer and cross the cuts with the activations. Each layer
prepares the masks as the stack would (a boolean mask becomes an additive float one inside the layer); a mask is
taken as causal only where ``is_causal=True`` says so (the stack's test of the mask's values needs the values).
The nested-tensor fast path that ``nn.TransformerEncoder`` takes in inference with a padding mask is not taken:
the outputs at padded positions are then computed instead of zero.

Example::

    >>> import torch.nn as nn
    >>> layer = nn.TransformerEncoderLayer(8, nhead=2, batch_first=True)
    >>> encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    >>> stack_forward(encoder) is not None
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["STACKS", "stack_forward"]

STACKS = (nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


def stack_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The layer loop that stands for ``module``'s forward in a trace, or None when it is not one of
    :data:`STACKS`."""
    if isinstance(module, nn.TransformerEncoder):
        return functools.partial(_encoder, module)
    if isinstance(module, nn.TransformerDecoder):
        return functools.partial(_decoder, module)
    if isinstance(module, nn.Transformer):
        return functools.partial(_transformer, module)
    return None


def _encoder(
    encoder: nn.TransformerEncoder,
    src: Tensor,
    mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool | None = None,
) -> Tensor:
    output = src
    for layer in encoder.layers:
        output = layer(output, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    return encoder.norm(output) if encoder.norm is not None else output


def _decoder(
    decoder: nn.TransformerDecoder,
    tgt: Tensor,
    memory: Tensor,
    tgt_mask: Tensor | None = None,
    memory_mask: Tensor | None = None,
    tgt_key_padding_mask: Tensor | None = None,
    memory_key_padding_mask: Tensor | None = None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
) -> Tensor:
    output = tgt
    for layer in decoder.layers:
        output = layer(
            output,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=bool(tgt_is_causal),
            memory_is_causal=memory_is_causal,
        )
    return decoder.norm(output) if decoder.norm is not None else output


def _transformer(
    transformer: nn.Transformer,
    src: Tensor,
    tgt: Tensor,
    src_mask: Tensor | None = None,
    tgt_mask: Tensor | None = None,
    memory_mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    tgt_key_padding_mask: Tensor | None = None,
    memory_key_padding_mask: Tensor | None = None,
    src_is_causal: bool | None = None,
    tgt_is_causal: bool | None = None,
    memory_is_causal: bool = False,
) -> Tensor:
    memory = transformer.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return transformer.decoder(
        tgt,
        memory,
        tgt_mask=tgt_mask,
        memory_mask=memory_mask,
        tgt_key_padding_mask=tgt_key_padding_mask,
        memory_key_padding_mask=memory_key_padding_mask,
        tgt_is_causal=tgt_is_causal,
        memory_is_causal=memory_is_causal,
    )
