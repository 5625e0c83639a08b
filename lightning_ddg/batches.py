"""Each batch is loaded once per pipeline, by its first stage, and carried to the stages that run code on it.

Every stage's process runs the user's ``training_step``, but only the first stage feeds the batch into the model and
only the last computes the loss from it. So the first stage iterates the real data loader (its workers, decoding,
augmentation) and sends each batch, as it is fetched, to the last stage; the stages in between receive only its
layout and are handed zero tensors of the same shapes and dtypes (their ``self(x)`` ignores its arguments: their
input comes from the previous stage). The other stages never iterate the loader: K-1 processes no longer load and
augment every batch, and the last stage computes the loss on the very batch the first stage fed in, also when the
loader's workers draw random numbers.

The wrappers keep the loader's length and delegate every other attribute to it, so Lightning counts, limits and
shards batches as before. The stream of batches follows the loop's own fetches, which are the same on every
stage; the end of an iteration travels as a message of its own, so loaders without a length work too. The first
stage can mark a batch as the fit's last (:attr:`SentBatches.ends_fit`, :mod:`lightning_ddg.ending`); every stage
then calls its ``on_fit_end`` as it fetches that batch, so that all stop after the same one. At each validation and
epoch's end of a fit it also sends a mark of its own (:meth:`SentBatches.mark_together`), which the other stages
check, so that a stage that left training alone raises instead of waiting for the others.

Example (``channels`` from :class:`~lightning_ddg.topology.StageLinks`)::

    loader = SentBatches(loader, links.batch_out)                     # on the first stage
    loader = ReceivedBatches(loader, links.batch_in, full=is_last)    # on every other stage
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from lightning_ddg._compat import tree_flatten, tree_unflatten
from lightning_ddg.comm import Channel, PipelineStopped

if TYPE_CHECKING:
    from lightning_ddg.topology import StageLinks

__all__ = ["ReceivedBatches", "SentBatches", "carried_batches"]

_END = "end"  # of an iteration
_EXHAUSTED = object()  # what the loader's iterator gives once it is done
_TOGETHER = "together"  # the first stage reached a point every stage reaches after the same batch
_NOT_TOGETHER = (
    "the stages did not stop after the same batch: {who}. A hook decided to stop (trainer.should_stop) from what "
    "one stage alone has, such as the loss on the last stage in on_train_batch_end. Set trainer.should_stop in "
    "training_step after self(...) (the request then travels up the pipeline, and every stage stops after the same "
    "later batch), or where every stage decides alike: EarlyStopping after validation, max_steps, max_time."
)


class _Wrapped:
    """A data loader's stand-in: its length and attributes, another way to iterate. ``timed``, where set, is told
    what fetching each batch took: the seconds spent loading it, and those spent blocked on a neighbouring stage."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.timed: Callable[[float, float], None] | None = None

    def __len__(self) -> int:
        return len(self.loader)  # a TypeError without a length, as the loader itself

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def release(self) -> None:
        """Drop the channels at the end of a run: Lightning's loops keep the loader, and a channel kept would keep
        its process group's connections open after the group is destroyed."""


class SentBatches(_Wrapped):
    """The first stage's loader: every batch it yields is also sent on ``channels`` as ``(channel, full)`` pairs:
    the whole batch where ``full``, its layout alone elsewhere. ``on_fit_end`` is called as a batch marked
    :attr:`ends_fit` is fetched."""

    def __init__(
        self, loader: Any, channels: list[tuple[Channel, bool]], on_fit_end: Callable[[], None] | None = None
    ) -> None:
        super().__init__(loader)
        self.channels = channels
        self.on_fit_end = on_fit_end
        self.ends_fit = False  # the next batch fetched (or the end of the iteration) is the fit's last
        self._last_layout: tuple[Any, torch.Tensor] | None = None

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, _EXHAUSTED)
            if batch is _EXHAUSTED:
                break
            leaves, spec = tree_flatten(batch)
            where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
            tensors = [leaves[i] for i in where]
            others = [None if i in where else leaf for i, leaf in enumerate(leaves)]
            layout = self._layout(spec, others, where, _specs(tensors))
            blocked = sum(channel.blocked_s for channel, _ in self.channels)
            for channel, full in self.channels:
                # the training step may change the batch in place while it is being sent
                channel.send([layout, *tensors] if full else [layout], may_change=True)
            if self.timed is not None:
                waited = sum(channel.blocked_s for channel, _ in self.channels) - blocked  # a later stage lagged
                self.timed(time.perf_counter() - start - waited, waited)
            yield batch
        end = self._message(_END)
        for channel, _ in self.channels:
            channel.send([end])

    def mark_together(self) -> None:
        """The first stage has reached a point (a validation, an epoch's end) that every stage must reach after the
        same batch: the later stages check that they did (:meth:`ReceivedBatches.check_together`)."""
        marker = _encode((False, _TOGETHER))
        for channel, _ in self.channels:
            channel.send([marker])

    def _layout(self, spec: Any, others: list[Any], where: list[int], specs: list) -> torch.Tensor:
        """The message that tells the later stages how to rebuild a batch from its tensors. Batch after batch of
        tensors alone it is the same: it is encoded once, not pickled again on every step of the first stage."""
        key = (spec, where, specs) if all(other is None for other in others) else None
        if key is not None and not self.ends_fit and self._last_layout is not None and self._last_layout[0] == key:
            return self._last_layout[1]
        ends_fit = self.ends_fit
        layout = self._message((spec, others, where, specs))
        if key is not None and not ends_fit:
            self._last_layout = (key, layout)
        return layout

    def _message(self, content: Any) -> torch.Tensor:
        ends_fit, self.ends_fit = self.ends_fit, False
        if ends_fit and self.on_fit_end is not None:
            self.on_fit_end()
        return _encode((ends_fit, content))

    def release(self) -> None:
        self.channels = []


class ReceivedBatches(_Wrapped):
    """Another stage's loader: yields the batches the first stage sends, whole (``full``) or as zero tensors of
    their shapes. The wrapped loader is never iterated. When the first stage stops the pipeline
    (:meth:`DDGStage.stop <lightning_ddg.stage.DDGStage.stop>`), the next batch raises what ``on_stop(signum)``
    returns, or :class:`~lightning_ddg.comm.PipelineStopped`. ``on_fit_end`` is called as a batch the first stage
    marked as the fit's last is fetched."""

    def __init__(
        self,
        loader: Any,
        channel: Channel,
        full: bool,
        on_stop: Callable[[int], BaseException] | None = None,
        on_fit_end: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(loader)
        self.channel = channel
        self.full = full
        self.on_stop = on_stop
        self.on_fit_end = on_fit_end
        self._zeros: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = {}

    def __iter__(self) -> Iterator[Any]:
        while True:
            start, copied = time.perf_counter(), self.channel.copied_s
            try:
                layout, *tensors = self.channel.recv()
            except PipelineStopped as stopped:
                if self.on_stop is None:
                    raise
                raise self.on_stop(stopped.signum) from None
            received = time.perf_counter()
            ends_fit, decoded = _decode(layout)
            if ends_fit and self.on_fit_end is not None:
                self.on_fit_end()
            if decoded == _END:
                return
            if decoded == _TOGETHER:
                raise RuntimeError(_NOT_TOGETHER.format(who="the first stage left training, this stage went on"))
            spec, leaves, where, specs = decoded
            if not self.full:
                tensors = [self._zero(dtype, shape) for dtype, shape in specs]
            for i, tensor in zip(where, tensors, strict=True):
                leaves[i] = tensor
            batch = tree_unflatten(leaves, spec)
            if self.timed is not None:
                copying = self.channel.copied_s - copied  # taking it out of shared memory is loading, not waiting
                self.timed(time.perf_counter() - received + copying, received - start - copying)
            yield batch

    def check_together(self) -> None:
        """This stage has reached a point (a validation, an epoch's end) that every stage must reach after the same
        batch: raise unless the first stage reached it there too (:meth:`SentBatches.mark_together`), rather than
        leave the stages that went on waiting for this one."""
        _, decoded = _decode(self.channel.recv()[0])
        if decoded != _TOGETHER:
            raise RuntimeError(_NOT_TOGETHER.format(who="this stage left training, the first stage went on"))

    def release(self) -> None:
        self.channel = None  # type: ignore[assignment]

    def _zero(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if (dtype, shape) not in self._zeros:
            self._zeros[(dtype, shape)] = torch.zeros(shape, dtype=dtype)
        return self._zeros[(dtype, shape)]


def _specs(tensors: list[torch.Tensor]) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    return [(t.dtype, tuple(t.shape)) for t in tensors]


def _encode(value: Any) -> torch.Tensor:
    """``value`` pickled into a byte tensor, padded to a power of two so that the message shape rarely changes."""
    data = pickle.dumps(value)
    size = max(256, 1 << (len(data) + 8).bit_length())
    padded = len(data).to_bytes(8, "little") + data + bytes(size - len(data) - 8)
    return torch.frombuffer(bytearray(padded), dtype=torch.uint8)


def _decode(tensor: torch.Tensor) -> Any:
    raw = tensor.numpy().tobytes()
    return pickle.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def carried_batches(
    loader: Any,
    links: StageLinks,
    last: bool,
    on_stop: Callable[[int], BaseException] | None = None,
    on_fit_end: Callable[[], None] | None = None,
) -> SentBatches | ReceivedBatches:
    """``loader`` as this stage iterates it: the first stage (which has ``links.batch_out``) sends each batch on, the
    others receive it (whole on the ``last`` stage)."""
    if links.batch_out:
        return SentBatches(loader, links.batch_out, on_fit_end)
    assert links.batch_in is not None
    return ReceivedBatches(loader, links.batch_in, full=last, on_stop=on_stop, on_fit_end=on_fit_end)
