"""The example input the stages are measured with when the strategy chooses the cuts, and what loading a batch costs.

:func:`forward_arguments` (plain PyTorch) picks, from one batch, the part that fits a ``forward`` signature;
:func:`example_forward_input` finds that batch in a Trainer run without running any user step code;
:func:`loading_ms` times a loader, which the first stage iterates for every stage (:mod:`lightning_ddg.batches`).

Example::

    forward_arguments((x, y), inspect.signature(model.forward))          # (x,)
    forward_arguments({"input_ids": ids, "labels": l}, signature)        # (ids,) for forward(input_ids, ...)
"""

from __future__ import annotations

import inspect
import itertools
import random
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from lightning_ddg._compat import data_source

__all__ = ["example_forward_input", "forward_arguments", "loading_ms", "run_loader"]

_TIMED_BATCHES = 3  # after the first, which pays for starting the iteration

_LOOP_OF = {
    TrainerFn.FITTING: "fit_loop",
    TrainerFn.VALIDATING: "validate_loop",
    TrainerFn.TESTING: "test_loop",
    TrainerFn.PREDICTING: "predict_loop",
}


def example_forward_input(trainer: pl.Trainer, module: pl.LightningModule, loader: Any = None) -> tuple | None:
    """What ``forward`` takes, for measuring the stages: ``example_input_array``, or else the part of this run's
    first batch that fits ``forward``'s parameters (``x`` of ``(x, y)``, the named items of a dict). ``None``
    when neither can be had (a warning says why when the loader fails); no user step code runs for it.
    ``loader``: the run's loader (:func:`run_loader`) if the caller has it already."""
    signature = inspect.signature(module.forward)
    example = module.example_input_array
    if example is not None:
        if isinstance(example, dict):
            return tuple(signature.bind(**example).args)
        return example if isinstance(example, tuple) else (example,)
    try:
        with _random_states_kept():
            loader = loader if loader is not None else run_loader(trainer)
            if loader is None:
                return None
            batch = next(iter(loader))
    except Exception as err:  # noqa: BLE001 - the user's loader: any error means no example
        warnings.warn(
            f"lightning-ddg could not draw an example batch from the data loader to time the stages "
            f"({type(err).__name__}: {err}); the cuts balance parameter counts instead. Set the module's "
            "example_input_array, or give split_points.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return forward_arguments(batch, signature)


def loading_ms(loader: Any) -> float:
    """Milliseconds per batch that iterating ``loader`` takes in this process: what the first stage pays for each
    batch besides its layers. 0.0 for a loader whose workers do the work in processes of their own, for ``None``,
    or for one that cannot be iterated again (a stream, say). The random streams are left as they were."""
    if loader is None or getattr(loader, "num_workers", 0) != 0:
        return 0.0
    try:
        with _random_states_kept():
            batches = iter(loader)
            next(batches)  # pays for starting the iteration
            start = time.perf_counter()
            timed = sum(1 for _ in itertools.islice(batches, _TIMED_BATCHES))
            return 1000 * (time.perf_counter() - start) / timed if timed else 0.0
    except Exception:  # noqa: BLE001 - the user's loader: no figure rather than a failed fit
        return 0.0


def run_loader(trainer: pl.Trainer) -> Any:
    """The loader this run's loop iterates first (the first of several), or ``None``; it may raise (the user's
    ``*_dataloader`` hook runs, leaving the random streams as they were)."""
    source = data_source(getattr(trainer, _LOOP_OF.get(trainer.state.fn, "fit_loop")))
    if source is None or not source.is_defined():
        return None
    with _random_states_kept():
        loaders = source.dataloader()
    loader = next(iter(loaders.values())) if isinstance(loaders, dict) else loaders
    return loader[0] if isinstance(loader, (list, tuple)) else loader


@contextmanager
def _random_states_kept() -> Iterator[None]:
    """Draw batches without changing the run: a shuffling sampler draws its order from torch's global stream, and
    augmentations from it, Python's or NumPy's."""
    python = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_state = numpy.random.get_state() if numpy is not None else None
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(python)
        if numpy is not None:
            numpy.random.set_state(numpy_state)


def forward_arguments(batch: Any, signature: inspect.Signature) -> tuple | None:
    """The part of ``batch`` that ``forward`` (of ``signature``) takes, or ``None``: a tensor is the input; a
    dict gives the items named like ``forward``'s leading parameters, or is the argument of a ``forward`` that
    takes one parameter named otherwise (``forward(self, batch)``); a tuple or list gives its leading items
    for the required parameters (``(x, y)``: the inputs come first, the targets last)."""
    positional = [p for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is p.empty)
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, dict):
        if len(positional) == 1 and positional[0].name not in batch:
            return (batch,)  # forward(self, batch): the dict batch is the argument, self.model(**batch) say
        args = []
        for p in positional:
            if p.name not in batch:
                break
            args.append(batch[p.name])
        return tuple(args) if len(args) >= required and args else None
    if isinstance(batch, (tuple, list)) and batch and len(batch) >= required:
        return tuple(batch[: max(required, 1)])
    return None
