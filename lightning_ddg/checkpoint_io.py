"""Checkpoint files that are complete or absent, never torn.

A job stopped while it writes a checkpoint (SIGKILL, a node that goes away) must not leave a partial file under
the checkpoint's name: ``ckpt_path="last"`` would resume from it. :class:`AtomicCheckpointIO` wraps the
checkpoint IO that writes the file, has it write under a temporary name in the same directory
(``.last.ckpt.<pid>.tmp``), flushes it to disk, and renames it over the checkpoint's name with ``os.replace``,
which replaces the file in one step. A temporary file left by an earlier job stopped while it wrote a checkpoint
of the same name is removed on the next save. Remote paths (``s3://``, ...) are left to the wrapped IO.

Example::

    io = atomic(strategy.checkpoint_io)
    io.save_checkpoint(checkpoint, "checkpoints/last.ckpt")  # last.ckpt: the old one, then the new one
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO

from lightning_ddg._compat import WrappingCheckpointIO, set_wrapped_checkpoint_io

__all__ = ["AtomicCheckpointIO", "atomic", "chunks", "load_mapped", "save_streamed", "writes_local_torch_files"]


class AtomicCheckpointIO(CheckpointIO):
    """Saves through ``checkpoint_io`` under a temporary name, then renames the file (see the module)."""

    def __init__(self, checkpoint_io: CheckpointIO) -> None:
        self.checkpoint_io = checkpoint_io

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        with _replacing(path) as temporary:
            self.checkpoint_io.save_checkpoint(checkpoint, temporary, storage_options=storage_options)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.checkpoint_io.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.checkpoint_io.remove_checkpoint(path)

    def teardown(self) -> None:
        self.checkpoint_io.teardown()


def atomic(checkpoint_io: CheckpointIO) -> CheckpointIO:
    """``checkpoint_io``, with the IO that writes the files wrapped in :class:`AtomicCheckpointIO` (inside a
    wrapper such as ``AsyncCheckpointIO``, which writes later, from a thread, through its base IO)."""
    if isinstance(checkpoint_io, AtomicCheckpointIO):
        return checkpoint_io
    if isinstance(checkpoint_io, WrappingCheckpointIO):
        base = checkpoint_io.checkpoint_io
        if base is not None and not isinstance(base, AtomicCheckpointIO):
            set_wrapped_checkpoint_io(checkpoint_io, AtomicCheckpointIO(base))
        return checkpoint_io
    return AtomicCheckpointIO(checkpoint_io)


def _sync(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_streamed(
    checkpoint: dict[str, Any],
    path: Any,
    streamed: list[tuple[Any, ...]],
    receive: Callable[[int, torch.Tensor], None],
) -> None:
    """Write ``checkpoint`` as ``torch.save`` does, one ordinary file, without ever holding the tensors that other
    processes own: ``streamed`` lists where they sit in ``checkpoint`` (key paths, e.g. ``("state_dict", name)``),
    as placeholders of the right shape and dtype whose memory was never written (``torch.empty``: the system backs
    it with no memory of its own until written). The file is written with the placeholders' zeros, then each
    streamed tensor's bytes are written in place, one at a time, in the pieces :func:`chunks` cuts them into:
    ``receive(i, buffer)`` fills ``buffer`` (a flat ``uint8`` tensor: the next piece of item ``i``'s place in the
    file, mapped into memory) with those bytes, and the piece's pages are unmapped once written, so that the
    writer holds one piece's pages at most (the sender sends ``chunks(bytes)`` one message each). Written under a
    temporary name and renamed, as :class:`AtomicCheckpointIO` does. Last, the checksums the file keeps of its
    records are computed from the bytes written (:func:`_correct_checksums`): the file is an ordinary zip archive
    that any zip tool verifies.

    Example::

        checkpoint = {"state_dict": {"a": mine, "b": torch.empty(shape_of_b)}}   # b belongs to another process
        save_streamed(checkpoint, "last.ckpt", [("state_dict", "b")], lambda i, buf: dist.recv(buf, src=1))
    """
    mmap_flags = torch.serialization.get_default_mmap_options()
    with _replacing(path) as temporary:
        with _no_checksums():  # they are computed once the bytes are in place
            torch.save(checkpoint, temporary)
        torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)  # writes to the loaded tensors reach the file
        try:
            written = torch.load(temporary, map_location="cpu", mmap=True, weights_only=False)
        finally:
            torch.serialization.set_default_mmap_options(mmap_flags)
        for i, key_path in enumerate(streamed):
            target = _at(written, key_path)
            size = target.numel() * target.element_size()
            for piece in chunks(target.reshape(-1).view(torch.uint8)):
                receive(i, piece)  # straight into the file's pages: no buffer
                _drop_pages(piece, piece.numel())
            _drop_pages(target, size)  # the pages the pieces' edges shared
        del written
        _correct_checksums(temporary)


@contextlib.contextmanager
def _no_checksums() -> Iterator[None]:
    """``torch.save`` without computing checksums, where torch can (2.5 on): a placeholder's would be wasted."""
    if not hasattr(torch.serialization, "set_crc32_options"):
        yield
        return
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(crc)


_LOCAL_HEADER, _CENTRAL_HEADER, _DESCRIPTOR = b"PK\x03\x04", b"PK\x01\x02", b"PK\x07\x08"


def _correct_checksums(path: Path) -> None:
    """Write each record's CRC-32 into the zip archive ``torch.save`` wrote at ``path`` (its central directory, and
    its data descriptor or else its local header), computed from the record's bytes as they are now. Reads the file
    in pieces of :data:`CHUNK_BYTES`; the records are stored uncompressed, as ``torch.save`` writes them."""
    with zipfile.ZipFile(path) as archive:
        # start_dir: where the central directory begins, as ZipFile read it (an attribute since Python 2)
        records, central = archive.infolist(), archive.start_dir
    with open(path, "r+b") as f:
        for record in records:
            f.seek(record.header_offset)
            local = f.read(30)
            if local[:4] != _LOCAL_HEADER or record.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: {record.filename} is not a record torch.save writes")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            start = record.header_offset + 30 + name_length + extra_length
            crc = _crc32(f, start, record.compress_size)
            if record.flag_bits & 0x08:  # a data descriptor follows the data, with or without its signature
                f.seek(start + record.compress_size)
                at = start + record.compress_size + (4 if f.read(4) == _DESCRIPTOR else 0)
            else:
                at = record.header_offset + 14
            f.seek(at)
            f.write(struct.pack("<I", crc))
            f.seek(central)
            entry = f.read(46)
            if entry[:4] != _CENTRAL_HEADER:
                raise ValueError(f"{path}: the central directory does not list {record.filename} where expected")
            f.seek(central + 16)
            f.write(struct.pack("<I", crc))
            central += 46 + sum(struct.unpack("<HHH", entry[28:34]))


def _crc32(f: Any, start: int, size: int) -> int:
    crc, buffer = 0, bytearray(min(size, CHUNK_BYTES))
    f.seek(start)
    while size > 0:
        n = f.readinto(memoryview(buffer)[: min(size, len(buffer))])
        if not n:
            raise OSError(f"{f.name} ends inside a record")
        crc, size = zlib.crc32(memoryview(buffer)[:n], crc), size - n
    return crc


CHUNK_BYTES = 8 * 2**20


def chunks(data: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``data`` (a flat ``uint8`` tensor) in views of :data:`CHUNK_BYTES` at most (one empty view when it is empty):
    the pieces a streamed tensor travels in, so that the process that writes it holds one piece at a time."""
    return data.split(CHUNK_BYTES)


@contextlib.contextmanager
def _replacing(path: Any) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to: once written it is flushed to disk and renamed over ``path`` in
    one step; on failure it is removed. Temporary files an earlier, stopped save left for ``path`` go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        _sync(temporary)
        os.replace(temporary, path)
        _sync(path.parent)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _at(obj: Any, key_path: tuple[Any, ...]) -> torch.Tensor:
    for key in key_path:
        obj = obj[key]
    return obj


_PAGE = mmap.PAGESIZE


def _drop_pages(tensor: torch.Tensor, size: int) -> None:
    """Unmap the written pages of a file mapping from this process (they stay in the page cache and reach the
    file): a checkpoint larger than the memory would otherwise count whole in the writer's resident memory."""
    if size < _PAGE:
        return
    start = tensor.data_ptr()
    first = (start + _PAGE - 1) // _PAGE * _PAGE  # whole pages only: neighbours may still be written
    last = (start + size) // _PAGE * _PAGE
    if last > first:
        try:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED
        except (OSError, AttributeError):
            pass


def writes_local_torch_files(checkpoint_io: CheckpointIO, path: Any) -> bool:
    """Whether ``checkpoint_io`` (perhaps made atomic) is Lightning's plain ``torch.save`` writer and ``path`` a local
    file: then checkpoints are streamed and mapped here; any other writer gets the whole checkpoint."""
    base = checkpoint_io.checkpoint_io if isinstance(checkpoint_io, AtomicCheckpointIO) else checkpoint_io
    return type(base) is TorchCheckpointIO and "://" not in str(path)


def load_mapped(path: Any, weights_only: bool | None = None) -> dict[str, Any]:
    """The checkpoint, its tensors mapped from the file (``mmap=True``), so that a process reads from disk only the
    tensors it uses."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
