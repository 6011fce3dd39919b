"""The life of a run folder: the lock held while a command writes it, the marker that proves restune-sd made it, and
what a fresh run or a resume finds there (the checkpoints themselves are checkpoints.py's).

Nothing here deletes a file it cannot prove this tool wrote: a folder is taken over only when it holds the marker
and nothing but what a run writes before its first checkpoint, and only while no live process holds its lock.
"""

import datetime
import fcntl
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from restune_sd.checkpoints import CHECKPOINTS, load_checkpoint
from restune_sd.errors import UserError
from restune_sd.files import warn, write_text_atomic, writing

MARKER = ".restune-sd-run.json"  # written first into every run folder: the proof that restune-sd made it
LOCK = ".restune-sd.lock"
# What a run writes before its first checkpoint: a folder holding only these (and the marker) may be taken over.
EARLY = ("config.json", "metrics.jsonl", CHECKPOINTS, "tensorboard", "wandb")


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class FolderLock:
    """An exclusive lock on a folder that one command writes, held until `release` or the process ends.

    It is an flock on `FOLDER/.restune-sd.lock`, so the kernel drops it when its process dies, however it dies; the
    file names its holder, so a second command says who holds the folder, and one that finds a dead holder's name
    (a killed command leaves its file) says it takes the folder over.
    """

    def __init__(self, folder: Path, flag: str, name: str = LOCK):
        self.folder, self.flag, self.name, self.fd, self.created = Path(folder), flag, name, None, []

    def acquire(self) -> "FolderLock":
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.flag} {self.folder} is a file, not a folder: choose another {self.flag} "
                            "(nothing is overwritten)")
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        with writing(self.folder, f"choose a {self.flag} where you can write"):
            self.folder.mkdir(parents=True, exist_ok=True)
        self.created = missing[::-1]  # outermost first
        path = self.folder / self.name
        while True:
            with writing(path, f"choose a {self.flag} where you can write"):
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.holder(fd)
                os.close(fd)
                raise UserError(f"{self.folder} is in use by {holder}: wait for it to finish, or choose another "
                                f"{self.flag}") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # else another process removed the file between our open and our lock: lock the new one
                break
            os.close(fd)
        self.fd = fd
        stale = self.holder_record(fd)
        if stale.get("pid") not in (None, os.getpid()):
            warn(f"{self.folder} was locked by process {stale['pid']} on {stale.get('host', '?')} "
                 f"(started {stale.get('started', '?')}), which is no longer running: taking it over")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        return self

    @classmethod
    def live_holder(cls, folder, name: str = LOCK) -> str | None:
        """Who holds `folder` now (a live process's lock), or None: for readers that must not read a half-written
        folder. The lock is only tested with a shared flock, never taken or changed."""
        try:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return cls(folder, "").holder(fd)
        finally:
            os.close(fd)

    @staticmethod
    def holder_record(fd: int) -> dict:
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            return {}
        return record if isinstance(record, dict) else {}

    def holder(self, fd: int) -> str:
        record = self.holder_record(fd)
        if "pid" not in record:
            return "another restune-sd process"
        return f"restune-sd process {record['pid']} on {record.get('host', '?')} (started {record.get('started', '?')})"

    def release(self, failed: bool = False) -> None:
        """Let go, removing the lock file while still holding it (a process that opened it meanwhile sees it gone and
        locks a new one); after a failure, also remove the folders `acquire` made, if nothing was written there."""
        if self.fd is None:
            return
        (self.folder / self.name).unlink(missing_ok=True)
        if failed:
            for folder in reversed(self.created):  # innermost first
                if not folder.is_dir() or any(folder.iterdir()):
                    break
                folder.rmdir()
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, kind, error, trace):
        self.release(failed=kind is not None)


def main_process() -> bool:
    """Whether this is the process that writes (rank 0 of an accelerate launch, or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class RunPlan:
    """Where a run writes and what it resumes: the checkpoint's path and contents, or stale files to clear first."""

    run: Path
    checkpoint: Path | None = None
    state: dict | None = None
    stale: list[Path] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    finished: bool = False  # the resumed checkpoint is the run's last step: only the end of the run is left to do


def read_marker(run: Path) -> dict | None:
    """The run's marker (None where there is none or it is not one restune-sd wrote)."""
    try:
        marker = json.loads((run / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("tool") == "restune-sd" else None


def write_marker(run: Path, run_id: str) -> None:
    write_text_atomic(run / MARKER, json.dumps({"tool": "restune-sd", "run_id": run_id, "created": now()}) + "\n",
                      "choose an --output where you can write")


def locate_run(output, resume: str | None, early_files: tuple[str, ...]) -> RunPlan:
    """The run directory and the checkpoint to resume from (none for a fresh run); reads only, never writes."""
    run = Path(output)
    if resume is None:
        if run.exists() and not run.is_dir():
            raise UserError(f"{run} is a file: choose a new --output folder")
        held = sorted(p for p in run.iterdir() if p.name != LOCK) if run.is_dir() else []
        if held and not abandoned_attempt(run, held, early_files):
            raise UserError(f"{run} already holds files: choose a new --output, or pass --resume latest to continue it")
        if held:
            warn(f"{run} holds an earlier attempt that stopped before its first checkpoint: starting it over")
        return RunPlan(run, stale=[p for p in held if p.name != MARKER])
    marker = read_marker(run)
    if resume == "latest":
        found = sorted((run / CHECKPOINTS).glob("step-*.pt")) if (run / CHECKPOINTS).is_dir() else []
        if not found:
            raise UserError(f"--resume latest: {run / CHECKPOINTS} holds no checkpoint to resume from; run again without "
                            "--resume to start over (an attempt that stopped before its first checkpoint is taken over)")
        damaged = []
        for checkpoint in reversed(found):
            try:
                state = load_checkpoint(checkpoint)
                belongs_to(run, checkpoint, state, marker)
            except UserError as error:
                damaged.append(str(error))
                continue
            for reason in damaged:
                warn(f"{reason}; resuming from {checkpoint.name}, the newest intact checkpoint")
            return resumed_plan(run, checkpoint, state, marker)
        raise UserError(f"--resume latest: no checkpoint in {run / CHECKPOINTS} can be used ({damaged[0]}); "
                        "start a new --output")
    checkpoint = Path(resume)
    if not checkpoint.is_file():
        raise UserError(f"--resume {checkpoint}: no such checkpoint file (use latest, or a step-*.pt file)")
    if checkpoint.resolve().parent != (run / CHECKPOINTS).resolve():
        raise UserError(f"--resume {checkpoint} is not a checkpoint of --output {run} (those are in {run / CHECKPOINTS}): "
                        "resume a run into its own folder, or start a new --output")
    state = load_checkpoint(checkpoint)
    belongs_to(run, checkpoint, state, marker)
    return resumed_plan(run, checkpoint, state, marker)


def belongs_to(run: Path, checkpoint: Path, state: dict, marker: dict | None) -> None:
    """Refuse a checkpoint another run wrote (copied into this run's folder): its run id is not this folder's."""
    if marker and state.get("run_id") and state["run_id"] != marker.get("run_id"):
        raise UserError(f"checkpoint {checkpoint} belongs to another run than {run} (its run id differs), so it is not "
                        "resumed here")


def resumed_plan(run: Path, checkpoint: Path, state: dict, marker: dict | None) -> RunPlan:
    run_id = (marker or {}).get("run_id") or state.get("run_id") or uuid.uuid4().hex
    return RunPlan(run, checkpoint, state, run_id=str(run_id))


def abandoned_attempt(run: Path, held: list[Path], early_files: tuple[str, ...]) -> bool:
    """A folder restune-sd made (its marker) holding only what a run writes before its first checkpoint."""
    names = {p.name for p in held if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    if read_marker(run) is None or not names <= {MARKER, *EARLY, *early_files}:
        return False
    return not any((run / CHECKPOINTS).glob("step-*")) if (run / CHECKPOINTS).is_dir() else True


def clear_stale(plan: RunPlan) -> None:
    """Remove an abandoned attempt's files (proven this tool's by `abandoned_attempt`), then mark the folder."""
    for stale in plan.stale:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    write_marker(plan.run, plan.run_id)  # the new run's id: its checkpoints carry it


def read_metrics(path: Path) -> list[dict]:
    """The logged steps of an earlier part of the run; a line torn by a kill mid-write is dropped with a warning."""
    if not path.exists():
        return []
    history = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
            history.append({**entry, "step": int(entry["step"])})
        except (ValueError, TypeError, KeyError):
            warn(f"{path} line {number} is damaged and is left out of the loss curve")
    return history


def finished_results(run: Path, total_steps: int) -> bool:
    """Whether the run's results.json records a finished run of `total_steps` steps."""
    try:
        results = json.loads((run / "results.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(results, dict) and results.get("steps") == total_steps and (run / "tuner").is_dir()
