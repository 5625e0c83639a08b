"""A tiny pipeline job that fails on demand, run as a script by tests/test_reliability.py.

    python tests/reliability_job.py --devices 3 --fail raise --rank 1 --pid-file pids.txt

Every process appends its pid to ``--pid-file`` (the launching process first), so that the test can check that
none survives; the failing process writes the time of its failure to ``<pid-file>.failed``. The last line printed
by rank 0 after a run that went well is ``job done``.

With ``--hold PHASE --rank R``, global rank R stops when it reaches PHASE (one of ``HOLDS``), writes its pid and
the phase to ``<pid-file>.at`` and waits there until the test writes ``<pid-file>.go`` (once it has signalled the
job); then the phase goes on, and training with it, slowly (0.05 s a step), so that a stop has the time to arrive.
In ``imports``, the first launched process to import this script holds as it starts to import Lightning, inside
``import lightning_ddg``, as slow imports would: a rank re-launched by ``ddg``, a process started by
``ddg_spawn``; a process forked from the forkserver (which imported them already) as it imports this script.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

HOLDS = ("imports", "rendezvous", "planning", "first-steps", "validation", "save", "drain", "teardown")


HOLD_IMPORTS = "RELIABILITY_JOB_HOLD_IMPORTS"  # set by the launching process to its pid file


released = False  # a held process was let go: it trains on slowly, so that a stop has the time to arrive


def hold(pid_file: str, phase: str, seconds: float = 60.0) -> None:
    """Say that this process has reached ``phase``, then wait there until the test lets it go."""
    global released
    marker = Path(f"{pid_file}.at")
    marker.with_suffix(".tmp").write_text(f"{os.getpid()} {phase}\n")
    marker.with_suffix(".tmp").rename(marker)
    go, deadline = Path(f"{pid_file}.go"), time.monotonic() + seconds
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    released = True


class _HoldInImports:
    """A finder that holds when Lightning is first imported, inside ``import lightning_ddg``: as slow imports
    would, once the package has started to watch its launcher (its first line)."""

    def __init__(self, pid_file: str) -> None:
        self.pid_file = pid_file

    def find_spec(self, name: str, *args: object) -> None:
        if name == "lightning":
            sys.meta_path.remove(self)
            hold(self.pid_file, "imports")
        return None  # the usual finders find it


def _hold_in_imports() -> None:
    """The first launched process to import this script holds in ``imports`` when asked (see the module)."""
    pid_file = os.environ.get(HOLD_IMPORTS)
    if not pid_file or ("LOCAL_RANK" not in os.environ and __name__ != "__mp_main__"):
        return  # not asked, or the launching process itself
    try:
        os.close(os.open(f"{pid_file}.claimed", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return  # another launched process holds
    if "lightning" in sys.modules:  # forked from a forkserver that imported it: only this script is left to import
        hold(pid_file, "imports")
    else:
        sys.meta_path.insert(0, _HoldInImports(pid_file))


signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started in the background
_hold_in_imports()

importlib.import_module("lightning_ddg")  # first: a launched process is watched from here on

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.fabric.plugins import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ddg import DDGStrategy  # noqa: E402


class _PoisonGradient(torch.autograd.Function):
    """The identity, whose backward turns the gradient into NaN while ``active``."""

    active = False

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan") if _PoisonGradient.active else grad


def poison_gradient(x: torch.Tensor) -> torch.Tensor:
    return _PoisonGradient.apply(x)


torch.fx.wrap("poison_gradient")  # traced as one call, so that its backward survives the cut


class PoisonGradient(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return poison_gradient(x)


FAILURES = (
    "none",
    "raise",
    "shape",
    "oom",
    "kill",
    "nan-loss",
    "nan-grad",
    "empty",
    "not-a-tensor",
    "uneven",
    "kill-between-fits",
)


class HoldingStrategy(DDGStrategy):
    """Holds the chosen rank before the rendezvous."""

    def __init__(self, args: argparse.Namespace, **options) -> None:
        super().__init__(**options)
        self.args = args

    def setup_environment(self) -> None:
        # global ranks are set from here on: before, the local rank is the global one (one node)
        if self.args.hold == "rendezvous" and int(os.environ.get("LOCAL_RANK", "0")) == self.args.rank:
            hold(self.args.pid_file, "rendezvous")
        super().setup_environment()


class Hold(Callback):
    """Holds the chosen rank in the chosen phase of a fit."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def _at(self, trainer: L.Trainer, phase: str) -> None:
        if self.args.hold == phase and trainer.global_rank == self.args.rank:
            hold(self.args.pid_file, phase)

    def setup(self, trainer, pl_module, stage) -> None:
        self._at(trainer, "planning")  # the split is planned next

    def on_train_start(self, trainer, pl_module) -> None:
        if self.args.ckpt_path and trainer.is_global_zero:
            print(f"fit starts at step {trainer.global_step}", flush=True)

    def on_train_batch_start(self, trainer, *args) -> None:
        self._at(trainer, "first-steps")

    def on_validation_batch_start(self, trainer, *args) -> None:
        self._at(trainer, "validation")

    def on_train_end(self, trainer, pl_module) -> None:
        self._at(trainer, "drain")  # the strategy drains the pipeline next

    def teardown(self, trainer, pl_module, stage) -> None:
        self._at(trainer, "teardown")  # after the strategy's teardown


class HoldingCheckpointIO(TorchCheckpointIO):
    """Writes the second ``last`` checkpoint half-way, holds, then writes the rest: a save stopped in its middle."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.lasts = 0

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.lasts += "last" in Path(path).name
        if self.args.hold != "save" or self.lasts < 2 or "last" not in Path(path).name:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        half = len(buffer.getvalue()) // 2
        with open(path, "wb") as f:
            f.write(buffer.getvalue()[:half])
            f.flush()
            hold(self.args.pid_file, "save")
            f.write(buffer.getvalue()[half:])


class Job(L.LightningModule):
    def __init__(self, args: argparse.Namespace, fails: bool) -> None:
        super().__init__()
        self.args = args
        self.fails = fails  # in this fit
        self.front = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.back = nn.Sequential(PoisonGradient(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, offset: torch.Tensor | list | None = None) -> torch.Tensor:
        out = self.back(self.front(x))
        # the batch's offset is used after the cut before `back`, so it crosses it
        return out + offset if self.args.fail == "not-a-tensor" else out

    def on_fit_start(self) -> None:
        with open(self.args.pid_file, "a") as f:
            f.write(f"{os.getpid()}\n")

    def training_step(self, batch, batch_idx):
        x, y = batch
        args = self.args
        failing = self.fails and self.global_rank == args.rank and self.global_step == args.step
        if failing and args.fail != "none":
            Path(f"{args.pid_file}.failed").write_text(f"{time.time()}\n")  # when the failure happens
        if failing and args.fail == "raise":
            raise ValueError("the user's training_step broke")
        if failing and args.fail == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if failing and args.fail == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if failing and args.fail == "nan-loss":
            x = x * float("nan")  # on the first stage (the highest rank): the NaN reaches the loss
        if args.started_file and self.global_step == 2:
            Path(f"{args.started_file}.{self.global_rank}").touch()
        if args.step_sleep or released:
            time.sleep(args.step_sleep or 0.05)
        if args.fail == "not-a-tensor":  # the offset is a tensor at every step but the failing one, a list there
            logits = self(x, [0.0] if failing else torch.zeros(()))
        else:
            logits = self(x)
        if failing and args.fail == "shape":
            logits = logits.view(5, -1)  # a shape error on the last stage
        # on the last stage, with devices=2: a finite loss and weights, but a NaN gradient for the stage before
        _PoisonGradient.active = failing and args.fail == "nan-grad"
        return nn.functional.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def kill_between_fits(args: argparse.Namespace, rank: int) -> None:
    """Rank ``args.rank`` kills itself once its fit has ended; rank 0 goes on to the next fit once that process
    has gone, as a script that does more between its fits would (``strategy="ddg"``: rank 0 launched the others)."""
    killed = Path(f"{args.pid_file}.killed")
    if rank == args.rank:
        Path(f"{args.pid_file}.failed").write_text(f"{time.time()}\n")
        killed.with_suffix(".tmp").write_text(f"{os.getpid()}\n")
        killed.with_suffix(".tmp").rename(killed)
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        deadline = time.monotonic() + 120
        while not killed.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pid, deadline = int(killed.read_text()), time.monotonic() + 30
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _gone(pid):
            print(f"rank 0 went on to the next fit while process {pid} still ran", flush=True)


def _gone(pid: int) -> bool:
    """Whether process ``pid``, a child of this one (rank 0 launched it), has exited as this process can tell: it
    can be reaped (``WNOWAIT`` leaves that to the launcher). Its state in ``/proc`` would say so too early: the main
    thread of a killed process shows as a zombie while its other threads still end."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True  # reaped already


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="ddg", choices=["ddg", "ddg_spawn", "forkserver"])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--fail", default="none", choices=FAILURES)
    parser.add_argument("--rank", type=int, default=1, help="global rank that fails")
    parser.add_argument("--step", type=int, default=3, help="step at which it fails")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--fits", type=int, default=1, help="fits in a row; the failure happens in the last")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--check-finite", action="store_true")
    parser.add_argument("--detect-anomaly", action="store_true")
    parser.add_argument("--pid-file", required=True)
    parser.add_argument("--started-file", default="")
    parser.add_argument("--hold", default="", choices=("", *HOLDS))
    parser.add_argument("--checkpoint-dir", default="")
    parser.add_argument("--ckpt-path", default=None, help="resume from this checkpoint (or 'last')")
    parser.add_argument("--rendezvous-timeout", type=float, default=180.0)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:  # the launching process, before it starts the others
        with open(args.pid_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        if args.hold == "imports":
            os.environ[HOLD_IMPORTS] = args.pid_file

    torch.manual_seed(0)
    samples = 0 if args.fail == "empty" else 64
    if args.fail == "uneven" and os.environ.get("LOCAL_RANK", "0") == str(args.rank):
        samples = 60  # as if this process read a file that had changed
    data = TensorDataset(torch.randn(samples, 8), torch.randint(0, 3, (samples,)))
    for fit in range(args.fits):
        strategy = HoldingStrategy(
            args,
            split_points=["back"] if args.devices == 2 else None,
            start_method={"ddg": "popen", "ddg_spawn": "spawn"}.get(args.strategy, args.strategy),
            check_finite=True if args.check_finite else None,
            checkpoint_io=HoldingCheckpointIO(args),
            rendezvous_timeout=timedelta(seconds=args.rendezvous_timeout),
        )
        callbacks = [Hold(args)]
        if args.checkpoint_dir:
            callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, save_last=True, every_n_train_steps=2))
        trainer = L.Trainer(
            strategy=strategy,
            devices=args.devices,
            accelerator="cpu",
            max_steps=args.max_steps,
            detect_anomaly=args.detect_anomaly,
            logger=False,
            enable_checkpointing=bool(args.checkpoint_dir),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            val_check_interval=4 if args.hold == "validation" else None,
        )
        validation = DataLoader(data, batch_size=4) if args.hold == "validation" else None
        trainer.fit(
            Job(args, fails=fit == args.fits - 1), DataLoader(data, batch_size=4), validation, ckpt_path=args.ckpt_path
        )
        if args.fail == "kill-between-fits" and fit < args.fits - 1:
            kill_between_fits(args, trainer.global_rank)
    if trainer.is_global_zero:
        print("job done", flush=True)


if __name__ == "__main__":
    main()
