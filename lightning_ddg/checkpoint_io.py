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

import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic"]


class AtomicCheckpointIO(CheckpointIO):
    """Saves through ``checkpoint_io`` under a temporary name, then renames the file (see the module)."""

    def __init__(self, checkpoint_io: CheckpointIO) -> None:
        self.checkpoint_io = checkpoint_io

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if "://" in str(path):
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.checkpoint_io.save_checkpoint(checkpoint, temporary, storage_options=storage_options)
            _sync(temporary)
            os.replace(temporary, path)
            _sync(path.parent)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

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
    if isinstance(checkpoint_io, _WrappingCheckpointIO):
        base = checkpoint_io.checkpoint_io
        if base is not None and not isinstance(base, AtomicCheckpointIO):
            checkpoint_io._checkpoint_io = AtomicCheckpointIO(base)
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
