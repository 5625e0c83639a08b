"""Reliability, with real jobs run as scripts: a failure anywhere ends every process quickly and shows its error
once; Ctrl-C stops every stage; seeded runs are bitwise identical; a script can fit and test again after a fit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.jobs import REPO, finish_job, result_of, run_job, start_job
from tests.preloaded import PreloadedJob, Preloader

FAILING_JOB = REPO / "tests" / "reliability_job.py"
REPEAT_JOB = REPO / "tests" / "repeat_job.py"
LIMIT_S = 30  # from a failure until every process of the job has gone
# from a stage's SIGKILL until every process has gone, when the launching process sees it (less than the 10 s a
# missing heartbeat takes to be noticed)
STAGE_KILLED_S = 10
JOB_TIMEOUT_S = 240  # a job shares the cores with another (tests/jobs.py)
AHEAD_TIMEOUT_S = 8 * JOB_TIMEOUT_S  # a test waits for its job, which may start after the module's others


@dataclass
class Job:
    returncode: int
    output: str  # stdout and stderr, interleaved as written
    pids: list[int]  # the launching process first
    failed_at: float | None  # when the failure happened (time.time())
    gone_at: float  # when the last process of the job had gone


_preloader: Preloader | None = None  # starts this module's failing jobs: their launching processes skip imports
_preloading = threading.Lock()


@pytest.fixture(autouse=True, scope="session")  # when every job run ahead is done
def _end_preloader():
    global _preloader
    yield
    if _preloader is not None:
        _preloader.close()
        _preloader = None


def _start(script: Path, *args: str, pid_file: Path) -> subprocess.Popen | PreloadedJob:
    global _preloader
    if script != FAILING_JOB:
        return start_job(str(script), *args, stderr=subprocess.STDOUT)
    with _preloading:
        _preloader = _preloader or Preloader()
    command = [str(script.relative_to(REPO)), *args, "--pid-file", str(pid_file)]
    return _preloader.start(command, pid_file.parent / "job")


def _wait(proc: subprocess.Popen | PreloadedJob, pid_file: Path) -> Job:
    output, _ = finish_job(proc, JOB_TIMEOUT_S)
    pids = [int(p) for p in pid_file.read_text().split()] if pid_file.exists() else []
    gone_at = _wait_until_gone(pids, within=LIMIT_S)
    output = proc.output() if isinstance(proc, PreloadedJob) else output  # with what the last ones said
    failed = pid_file.with_name(pid_file.name + ".failed")
    failed_at = float(failed.read_text()) if failed.exists() else None
    return Job(proc.returncode, output, pids, failed_at, gone_at)


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs; an exited process nobody has reaped (a zombie) does not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until_gone(pids: list[int], within: float) -> float:
    deadline = time.monotonic() + within
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        time.sleep(0.1)
    if alive:
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"processes {alive} of the job were still running {within} s after the launcher exited")
    return time.time()


def run_failing_job(tmp_path: Path, *args: str) -> Job:
    pid_file = tmp_path / "pids"
    return _wait(_start(FAILING_JOB, *args, pid_file=pid_file), pid_file)


def _assert_failed_once(job: Job, error: str, stage: str | None, devices: int, spawn: bool = False) -> None:
    report = f"exit code {job.returncode}\n{job.output[-6000:]}"
    assert job.returncode != 0, report
    assert error in job.output, report
    # the failing process printed its traceback, with a note naming its stage; the others one line each
    assert job.output.count("lightning-ddg: raised on") == 1, report
    if stage is not None:
        assert f"raised on {stage};" in job.output, report
    assert job.output.count("Traceback (most recent call last)") == (2 if spawn else 1), report
    stopping = job.output.count("; stopping stage")
    # a spawning launcher terminates the other processes as soon as the failing one has exited: some of them may
    # not have said why they stop
    assert stopping == devices - 1 or (spawn and stopping < devices), report
    if job.failed_at is not None:
        assert job.gone_at - job.failed_at < LIMIT_S, report


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
@pytest.mark.parametrize(
    ("args", "error", "stage"),
    [
        pytest.param(
            ("--devices", "3", "--fail", "raise", "--rank", "1", "--fits", "2"),
            "ValueError: the user's training_step broke",
            "stage 1 (rank 1)",
            id="user-error-in-the-middle-stage-in-a-second-fit",
        ),
        pytest.param(
            ("--devices", "2", "--fail", "shape", "--rank", "0"),
            "RuntimeError: shape '[5, -1]' is invalid",
            "stage 1 (rank 0)",
            id="shape-error-in-the-launching-process",
        ),
        pytest.param(
            ("--devices", "2", "--strategy", "ddg_spawn", "--fail", "oom", "--rank", "1"),
            "OutOfMemoryError: CUDA out of memory",
            "stage 0 (rank 1)",
            id="out-of-memory-ddg_spawn",
        ),
        pytest.param(
            ("--devices", "2", "--fail", "nan-grad", "--rank", "0", "--check-finite"),
            "FloatingPointError: the gradient stage 0 received from stage 1 for batch 3 holds NaN",
            "stage 0 (rank 1)",
            id="nan-gradient-check_finite",
        ),
        pytest.param(
            ("--devices", "2", "--fail", "nan-loss", "--rank", "1", "--detect-anomaly"),
            "FloatingPointError: the loss at step 3 holds NaN",
            "stage 1 (rank 0)",
            id="nan-loss-detect_anomaly",
            marks=pytest.mark.slow,  # the check_finite case below takes the same path to the end
        ),
        pytest.param(
            ("--devices", "2", "--fail", "not-a-tensor", "--rank", "1"),
            "TypeError: 'offset' is computed before the cut at 'back' and used after it, so it crosses from stage 0 "
            "to stage 1; at this step it is of type list, but only tensors, None and Python numbers can cross",
            "stage 0 (rank 1)",
            id="a-crossing-value-that-cannot-be-sent-at-a-later-step",
        ),
        pytest.param(
            ("--devices", "2", "--fail", "empty"),
            "ValueError: the training dataloader has no batches",
            None,  # every stage finds it; the first to report is shown
            id="empty-dataloader-on-every-stage",
        ),
        pytest.param(
            ("--devices", "2", "--fail", "uneven", "--rank", "1", "--max-steps", "40"),  # across an epoch's end
            "MisconfigurationException: the training dataloader has a different number of batches in the job's "
            "processes (16 on stage 1 (rank 0), 15 on stage 0 (rank 1))",
            None,  # every stage finds it; the first to report is shown
            id="dataloaders-of-different-lengths",
        ),
    ],
)
def test_a_failure_ends_every_process_and_shows_its_error_once(jobs, request, args: tuple, error, stage) -> None:
    job = result_of(jobs, request)
    devices = int(args[args.index("--devices") + 1])
    _assert_failed_once(job, error, stage, devices, spawn="ddg_spawn" in args)
    if "oom" in args:
        assert "this stage ran out of memory. DDGStrategy(memory='recompute')" in job.output


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
def test_a_fit_after_a_launched_rank_died_raises_at_once(jobs, request) -> None:
    """With ``strategy="ddg"`` a script's later fits run on the ranks launched for its first: once one of them has
    died after a fit, the next fit (a new Trainer's) fails at its start with an error that says what to do, rather
    than waiting for the dead rank."""
    job = result_of(jobs, request)
    report = f"exit code {job.returncode}\n{job.output[-6000:]}"
    assert job.returncode != 0 and "job done" not in job.output, report
    died = re.findall(r"stage 0 \(rank 1\), process \d+, was killed by SIGKILL after the run had ended", job.output)
    assert len(died) == 1, report
    assert "RuntimeError: a launched process died after the last run (said above)" in job.output, report
    assert "Start the script again" in job.output, report
    assert job.output.count("Traceback (most recent call last)") == 1, report  # the launching process's, alone
    assert job.gone_at - job.failed_at < STAGE_KILLED_S, report


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
def test_a_stage_killed_with_sigkill_ends_the_job(jobs, request) -> None:
    job = result_of(jobs, request)
    report = f"exit code {job.returncode}\n{job.output[-6000:]}"
    assert job.returncode == 1, report
    assert job.output.count("lightning-ddg: stage 1 (rank 1) was killed by SIGKILL; stopping stage") == 2, report
    assert job.gone_at - job.failed_at < LIMIT_S, report


def _repeat(devices: int, runs: int, lr_find: bool = False) -> tuple[list[str], list[tuple[int, int]], str, list[str]]:
    """Weight digests and (threads, fds) after each run, the final test/validate line, which every rank printed
    alike, and with ``lr_find`` the learning rate each rank's finder suggested and set."""
    extra = ["--lr-find"] if lr_find else []
    proc = _start(REPEAT_JOB, "--devices", str(devices), "--runs", str(runs), *extra, pid_file=Path(os.devnull))
    try:
        output, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the job ran longer than {JOB_TIMEOUT_S} s:\n{output[-5000:]}")
    assert proc.returncode == 0, output[-6000:]
    runs_found = re.findall(r"^run \d+ weights (\w+) threads (\d+) fds (-?\d+)$", output, re.MULTILINE)
    assert len(runs_found) == runs, output[-6000:]
    evaluated = re.findall(r"rank \d+ (test_loss -?\d+\.\d{6} val_loss -?\d+\.\d{6})", output)
    assert len(evaluated) == devices and len(set(evaluated)) == 1, output[-6000:]  # every rank, the same results
    found_rates = re.findall(r"rank \d+ suggested lr (\S+) set ([-+.e\d]+)", output)
    rates = [f"{suggested} {set_to}" for suggested, set_to in found_rates]
    return [d for d, _, _ in runs_found], [(int(t), int(f)) for _, t, f in runs_found], evaluated[0], rates


def _seeded_digests(devices: int) -> list[str]:
    if devices == 3:  # two runs in separate processes
        return [_repeat(devices, runs=1)[0][0] for _ in range(2)]
    return _repeat(devices, runs=2)[0]  # two runs in the same processes, one after the other


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
@pytest.mark.parametrize("devices", [1, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_seeded_runs_give_bitwise_identical_weights(jobs, request, devices: int) -> None:
    digests = result_of(jobs, request)
    assert digests[0] == digests[1]


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
def test_a_script_fits_tests_and_finds_a_learning_rate_after_a_fit(jobs, request) -> None:
    digests, resources, evaluated, rates = result_of(jobs, request)
    assert len(set(digests)) == 1  # each fit started from the same state, and the third is as good as the first
    (threads_2, fds_2), (threads_3, fds_3) = resources[1:]
    # nothing piles up from one fit to the next: no watchdog thread, no process group left behind
    assert threads_3 == threads_2
    assert fds_3 <= fds_2 + 2  # a socket may still be closing
    test_loss, val_loss = (float(v) for v in evaluated.split()[1::2])
    assert test_loss == pytest.approx(val_loss)  # the same data and weights through test and validate
    # Lightning's learning-rate finder, under strategy="ddg": every rank got the last stage's suggestion and set it
    assert len(rates) == 2 and len(set(rates)) == 1, rates
    suggested, set_to = rates[0].split()
    assert suggested != "None" and float(suggested) == float(set_to), rates


# --- stopped in any phase of its life --------------------------------------------------------------------------
def _job_processes(group: int) -> list[int]:
    """The processes of a job started in a session of its own: its process group, zombies aside."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            pids.append(int(stat.parent.name))
    return pids


@dataclass
class Stopped:
    returncode: int
    output: str
    seconds: float  # from the signal until every process of the job had gone
    reached: float = 0.0  # from the start until the held process reached its phase


def _stop_at(tmp_path: Path, phase: str, rank: int, signum: int | None, target: str, *args: str) -> Stopped:
    """Run a 2-stage job, hold global rank ``rank`` when it reaches ``phase``, send ``signum`` (if any) to the
    launching process (``target="launcher"``) or to the held process (``"stage"``), then let the held process go
    on, as a phase goes on when its job is signalled."""
    pid_file = tmp_path / "pids"
    proc = _start(FAILING_JOB, "--devices", "2", "--hold", phase, "--rank", str(rank), *args, pid_file=pid_file)
    marker = pid_file.with_name("pids.at")
    started = time.monotonic()
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not marker.exists():
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the job never reached {phase}:\n{proc.communicate()[0][-5000:]}")
    held, reached = marker.read_text().split()
    assert reached == phase
    if signum is not None:
        os.kill(proc.pid if target == "launcher" else int(held), signum)
    signalled = time.monotonic()
    pid_file.with_name("pids.go").touch()
    output, _ = finish_job(proc, LIMIT_S)
    _assert_all_gone(proc.pid, signalled + LIMIT_S, output)
    output = proc.output()  # with what the last processes said
    return Stopped(proc.returncode, output, time.monotonic() - signalled, signalled - started)


def _assert_all_gone(group: int, deadline: float, output: str) -> None:
    while _job_processes(group) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _job_processes(group)
    if left:
        os.killpg(group, signal.SIGKILL)
        pytest.fail(
            f"processes {left} of the job were still running {LIMIT_S} s after it was stopped:\n{output[-5000:]}"
        )


# --- the matrix: launch mode x what stops the job x phase ------------------------------------------------------
MODES = ("ddg", "ddg_spawn", "forkserver")
STOPS = ("SIGTERM", "SIGINT", "SIGKILL", "SIGKILL-stage")  # the first three to the launching process
PHASES = ("imports", "rendezvous", "planning", "first-steps", "validation", "save", "drain", "teardown")  # HOLDS
# the one line that says what stopped the job, for each way of stopping it
SAYS = {
    "SIGTERM": r"lightning-ddg: (SIGTERM received|stopped by SIGTERM after step \d+ on every stage)",
    "SIGINT": r"Detected KeyboardInterrupt, attempting graceful shutdown",
    "SIGKILL": r"lightning-ddg: (the launching process \(\d+\) has exited|lost the job's store)",
    # never "stopped responding" (a missing heartbeat): every launcher sees its stage's death, and says so at once
    "SIGKILL-stage": r"lightning-ddg: .*(was killed by SIGKILL|lost the job's store)",
}
MID_RUN = ("first-steps", "validation", "save", "drain")  # the phases in which the stages watch each other


@dataclass(frozen=True)
class Cell:
    mode: str
    stop: str
    phase: str

    def __str__(self) -> str:
        return f"{self.mode}-{self.stop}-{self.phase}"

    @property
    def held_rank(self) -> int:
        """The rank held in the phase: ddg's launching process (rank 0) when it is the one signalled, in a phase it
        goes through; otherwise rank 1, a launched process (in ``imports``: the first launched process). In
        ``save``, rank 0, which writes the checkpoint files."""
        launcher = self.mode == "ddg" and self.stop != "SIGKILL-stage" and self.phase != "imports"
        return 0 if launcher or self.phase == "save" else 1

    @property
    def ends_at_once(self) -> bool:
        """A stage killed while the stages watch each other: the job ends within ``STAGE_KILLED_S``, because the
        process that launched the killed one sees its death (with ``ddg``, rank 0 killed is the launching process:
        the others see it go)."""
        return self.stop == "SIGKILL-stage" and self.phase in MID_RUN

    @property
    def says(self) -> str:
        """The line that says what stopped the job: a stage killed in ``save`` with ``ddg`` is rank 0, the
        launching process, and the job says what it says when the launching process is killed."""
        launcher_killed = self.stop == "SIGKILL-stage" and self.mode == "ddg" and self.phase == "save"
        return SAYS["SIGKILL"] if launcher_killed else SAYS[self.stop]


def covering_cells() -> list[Cell]:
    """32 of the 96 cells, in which every pair (phase, stop), (phase, mode) and (mode, stop) appears: each phase
    with each stop, the mode turning with both."""
    return [
        Cell(MODES[(i + j) % len(MODES)], stop, phase) for i, phase in enumerate(PHASES) for j, stop in enumerate(STOPS)
    ]


def phase_cells() -> list[Cell]:
    """8 of the covering cells: each phase once, the stops and the launch modes turning, so that every stop and
    every mode appears."""
    return [
        c for i, phase in enumerate(PHASES) for c in covering_cells() if c.phase == phase and c.stop == STOPS[i % 4]
    ]


def default_cells() -> list[Cell]:
    """The cells of the default test run: :func:`phase_cells`, and six more so that every launch mode meets
    every stop (SIGKILL of ddg's launching process is the save test's), among them a stage killed in teardown with
    each kind of launcher, one killed mid-run with each (ddg's is a phase cell), and a spawning launcher stopped as
    it starts its stages, with each start method."""
    extra = [
        Cell("ddg_spawn", "SIGKILL", "imports"),
        Cell("forkserver", "SIGINT", "imports"),
        Cell("ddg", "SIGKILL-stage", "teardown"),
        Cell("ddg_spawn", "SIGINT", "first-steps"),
        Cell("forkserver", "SIGTERM", "planning"),
        Cell("forkserver", "SIGKILL-stage", "teardown"),
        Cell("ddg_spawn", "SIGKILL-stage", "first-steps"),
        Cell("forkserver", "SIGKILL-stage", "validation"),
    ]
    return phase_cells() + extra


def all_cells() -> list[Cell]:
    return [Cell(mode, stop, phase) for phase in PHASES for mode in MODES for stop in STOPS]


def _stop_cell(tmp_path: Path, cell: Cell) -> str | None:
    """Run one cell; what went wrong, or None."""
    tmp_path.mkdir()
    signum = signal.SIGKILL if cell.stop.startswith("SIGKILL") else getattr(signal, cell.stop)
    target = "stage" if cell.stop == "SIGKILL-stage" else "launcher"
    # once let go, 0.05 s a step: a stop comes first; the drain and teardown come after the last step
    steps = "8" if cell.phase in ("drain", "teardown") else "100"
    args = ["--strategy", cell.mode, "--max-steps", steps]
    if cell.phase == "save":
        args += ["--checkpoint-dir", str(tmp_path / "checkpoints")]
    try:
        stopped = _stop_at(tmp_path, cell.phase, cell.held_rank, signum, target, *args)
    except pytest.fail.Exception as failed:
        return f"{cell}: {failed}"
    says = len(re.findall(cell.says, stopped.output))
    # the launching process killed in teardown, once the run has ended: the processes left end as they would have
    # (ddg's launching process may be the last one), and one of them may say that the launching process has gone
    lines = (0, 1) if (cell.stop, cell.phase) == ("SIGKILL", "teardown") else (1,)
    # a stage killed once the run has ended on it: the line says so, and the job still fails
    after = (
        cell.stop == "SIGKILL-stage" and cell.phase == "teardown" and "after the run had ended" not in stopped.output
    )
    slow = cell.ends_at_once and stopped.seconds > STAGE_KILLED_S
    problems = [
        *(["exit code 0"] if stopped.returncode == 0 else []),
        *([f"processes left more than {STAGE_KILLED_S} s after the kill"] if slow else []),
        *(["no line says that the run had ended"] if after else []),
        *([f"the line that says what stopped it appears {says} times"] if says not in lines else []),
        *(["a traceback"] if "Traceback" in stopped.output else []),
        *(_torn_checkpoints(tmp_path / "checkpoints") if cell.phase == "save" else []),
    ]
    if not problems:
        return None
    summary = f"{cell}: {', '.join(problems)} (exit code {stopped.returncode}, {stopped.seconds:.1f} s)"
    return f"{summary}\n{stopped.output[-4000:]}"


def _torn_checkpoints(directory: Path) -> list[str]:
    """A checkpoint file that a resume could pick and that does not load: ``last.ckpt`` (the save held half-way
    was its second) must be there and whole, and so must every other ``*.ckpt``; a temporary file is ignored by
    ``ckpt_path="last"`` (its name starts with a dot and ends in ``.tmp``)."""
    import torch

    torn = [] if (directory / "last.ckpt").exists() else ["no last.ckpt"]
    for path in directory.glob("*.ckpt"):
        try:
            torch.load(path, weights_only=False)
        except Exception as error:  # noqa: BLE001 - any error means torn
            torn.append(f"{path.name} does not load ({type(error).__name__}: {error})")
    return torn


def _run_cells(tmp_path: Path, cells: list[Cell], at_once: int = 2) -> None:
    """Run ``cells``, ``at_once`` jobs at a time (each in a session of its own); report every cell that failed."""
    with ThreadPoolExecutor(at_once) as pool:
        found = list(pool.map(lambda c: _stop_cell(tmp_path / str(c), c), cells))
    failed = [f for f in found if f is not None]
    assert not failed, f"{len(failed)} of {len(cells)} cells failed:\n\n" + "\n\n".join(failed)


@pytest.mark.cores(2)  # two cells at a time, each timed from its signal: no job beside them
@pytest.mark.timeout(900)
def test_a_job_stopped_in_any_phase_leaves_nothing_and_says_why_once(tmp_path: Path) -> None:
    """The default cells (each phase, each launch mode with each stop): every process gone within 30 s of the
    signal (10 s of a stage's SIGKILL while the stages watch each other), a non-zero exit, and one line that says
    what stopped the job, with no traceback."""
    _run_cells(tmp_path, default_cells())


@pytest.mark.slow
@pytest.mark.cores(2)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("phase", PHASES)
def test_the_covering_cells_of_a_phase(tmp_path: Path, phase: str) -> None:
    """The pairwise covering cells of ``phase``, checked as above."""
    _run_cells(tmp_path, [c for c in covering_cells() if c.phase == phase])


@pytest.mark.slow
@pytest.mark.cores(2)
@pytest.mark.timeout(900)
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("mode", MODES)
def test_every_cell_of_the_matrix(tmp_path: Path, mode: str, phase: str) -> None:
    _run_cells(tmp_path, [c for c in all_cells() if c.mode == mode and c.phase == phase])


def test_the_covering_cells_cover_every_pair() -> None:
    cells = covering_cells()
    assert len(set(cells)) == len(cells) == len(PHASES) * len(STOPS)
    for first, second, values in (
        ("phase", "stop", (PHASES, STOPS)),
        ("phase", "mode", (PHASES, MODES)),
        ("mode", "stop", (MODES, STOPS)),
    ):
        pairs = {(getattr(c, first), getattr(c, second)) for c in cells}
        assert pairs == {(x, y) for x in values[0] for y in values[1]}, (first, second)
    once = phase_cells()
    assert {c.phase for c in once} == set(PHASES) and {c.stop for c in once} == set(STOPS)
    assert {c.mode for c in once} == set(MODES) and set(once) <= set(cells)
    default = default_cells()
    assert len(set(default)) == len(default) and set(default) <= set(all_cells())
    pairs = {(c.mode, c.stop) for c in default} | {("ddg", "SIGKILL")}  # the save test kills ddg's launcher
    assert pairs == {(m, s) for m in MODES for s in STOPS}
    assert {c.mode for c in default if c.ends_at_once} == set(MODES)


def _killed_while_saving(tmp_path: Path) -> tuple[Stopped, Path, tuple[int, list[str]], Job]:
    """The job killed half-way through a save; the checkpoint's step and the leftover temporary files then; and
    the job resumed from ``ckpt_path="last"``."""
    import torch

    checkpoints = tmp_path / "checkpoints"
    args = ("--checkpoint-dir", str(checkpoints), "--max-steps", "8")
    stopped = _stop_at(tmp_path, "save", 0, signal.SIGKILL, "launcher", *args)
    try:
        step = torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"]
    except Exception as error:  # noqa: BLE001 - a torn file, reported by the test
        step = f"{type(error).__name__}: {error}"
    left = sorted(p.name for p in checkpoints.glob(".*.tmp"))
    (tmp_path / "resumed").mkdir()
    resume = ("--checkpoint-dir", str(checkpoints), "--ckpt-path", "last", "--max-steps", "4", "--devices", "2")
    return stopped, checkpoints, (step, left), run_failing_job(tmp_path / "resumed", *resume)


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
def test_a_job_killed_while_it_saves_keeps_the_last_complete_checkpoint(jobs, request) -> None:
    import torch

    stopped, checkpoints, (step, left), resumed = result_of(jobs, request)
    report = f"exit code {stopped.returncode}\n{stopped.output[-6000:]}"
    assert stopped.returncode == -signal.SIGKILL, report
    # the second save of last.ckpt (step 4) was cut short: the first one (step 2) is still there, whole
    assert step == 2, report
    assert len(left) == 1 and left[0].startswith(".last.ckpt."), report  # what the stopped save left
    # ckpt_path="last" resumed from it, and the first save of the resumed run removed the stopped save's leftover
    report = f"exit code {resumed.returncode}\n{resumed.output[-6000:]}"
    assert resumed.returncode == 0 and "fit starts at step 2" in resumed.output, report
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 4, report
    assert not list(checkpoints.glob(".*.tmp")), report


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
def test_a_rank_that_does_not_arrive_is_named_when_the_rendezvous_times_out(jobs, request) -> None:
    # rank 1 holds before the rendezvous (or is still importing when rank 0 gives up): both end
    job = result_of(jobs, request)
    report = f"exit code {job.returncode}\n{job.output[-6000:]}"
    assert job.returncode != 0, report
    assert "RendezvousTimeout: stage 0 (rank 1) did not arrive at the rendezvous within 3 s" in job.output, report


_INTERRUPTED_AT_EXIT = """
import atexit, multiprocessing, os, signal, sys, time
sys.path.insert(0, {repo})  # the script runs from a temporary folder: tests.lightning_models lies in the repository
import lightning as L
import lightning_ddg
from tests.lightning_models import MLPClassifier, cpu_trainer, loader


class InterruptAtExit(L.Callback):
    # in a stage process, once its run has ended: a SIGINT as the interpreter exits, as Ctrl-C in the launching
    # process sends the stages one, which may arrive then
    def on_train_end(self, trainer, pl_module):
        if multiprocessing.current_process().name != "MainProcess":
            atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))


if __name__ == "__main__":
    trainer = cpu_trainer("ddg_spawn", devices=2, max_steps=4, callbacks=[InterruptAtExit()])
    trainer.fit(MLPClassifier(), loader())
"""


def _interrupted_at_exit(tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "interrupted_at_exit.py"
    script.write_text(_INTERRUPTED_AT_EXIT.format(repo=repr(str(REPO))))
    return run_job(str(script), timeout=240)


@pytest.mark.timeout(AHEAD_TIMEOUT_S)
def test_a_stage_interrupted_once_its_run_has_ended_exits_without_a_traceback(jobs, request) -> None:
    job = result_of(jobs, request)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-4000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-4000:]


JOBS = {  # each test's job, run ahead (tests/jobs.py); each test checks its own
    "test_a_failure_ends_every_process_and_shows_its_error_once": lambda tmp, args, **_: run_failing_job(tmp, *args),
    "test_a_stage_killed_with_sigkill_ends_the_job": lambda tmp: run_failing_job(
        tmp, "--devices", "3", "--fail", "kill", "--rank", "1"
    ),
    "test_seeded_runs_give_bitwise_identical_weights": lambda tmp, devices: _seeded_digests(devices),
    "test_a_script_fits_tests_and_finds_a_learning_rate_after_a_fit": lambda tmp: _repeat(2, runs=3, lr_find=True),
    "test_a_job_killed_while_it_saves_keeps_the_last_complete_checkpoint": _killed_while_saving,
    "test_a_rank_that_does_not_arrive_is_named_when_the_rendezvous_times_out": lambda tmp: run_failing_job(
        tmp, "--devices", "2", "--hold", "rendezvous", "--rank", "1", "--rendezvous-timeout", "3"
    ),
    "test_a_fit_after_a_launched_rank_died_raises_at_once": lambda tmp: run_failing_job(
        tmp, "--devices", "2", "--fail", "kill-between-fits", "--rank", "1", "--fits", "2", "--max-steps", "4"
    ),
    "test_a_stage_interrupted_once_its_run_has_ended_exits_without_a_traceback": _interrupted_at_exit,
}
