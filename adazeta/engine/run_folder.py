"""The run folder: one run per folder, and one process in it at a time.

A run writes everything into its Hydra output folder (metrics.jsonl, replay.jsonl, checkpoints/,
summary.json, ...). A second run started into a folder that holds one would mix the two: the old
run's later checkpoints would count as the newest and the new run's would be pruned as soon as
they are written, and metrics.jsonl and replay.jsonl would be appended to. So a run starts only in
a folder that holds no run, or in the folder of the run it resumes
(`train.resume=<folder> hydra.run.dir=<folder>`, which rewinds that folder to the checkpoint).

What Hydra writes before our code runs (.hydra/, the job log), error.txt of an attempt that failed
before training, and the lock file do not make a folder hold a run.

The lock: `fcntl.flock` on <run>/.run.lock, which also holds the pid of the process that took it.
The kernel drops a flock when its process ends, however it ends (SIGKILL included), so a lock is
never stale; the file itself stays.

Single runs are checked by a Hydra callback (`RunFolderCheck`, added by adazeta/cli/train.py) before
Hydra writes its config copy and log into the folder, so a refused run changes nothing in it; the
loop claims the folder again (sweep jobs, `train.resume=auto`, in-process callers). This module
imports no torch: the callback runs before every run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from adazeta.errors import AdazetaError, RunFolderError

LOCK = ".run.lock"
# What a run writes into its folder (adazeta/engine/loop.py, checkpoint.py, resume.py, loggers.py, replay_log.py).
RUN_FILES = (
    "metrics.jsonl", "replay.jsonl", "summary.json", "checkpoints", "best_trainable.safetensors",
    "config.yaml", "metrics_rolled_back.jsonl", "resumed_from.txt", "wandb",
)
HELD: dict[Path, int] = {}  # run folders this process holds locked -> the lock file's descriptor


def run_files(run_dir: Path) -> list[str]:
    """The run files in a folder (folders with a trailing /); empty if it holds no run."""
    return [name + ("/" if (run_dir / name).is_dir() else "") for name in RUN_FILES if (run_dir / name).exists()]


def resumed_run(resume: str | None) -> Path | None:
    """The run folder `train.resume` names (a run folder, or one of its checkpoints/step-<N>);
    None for a fresh start or `auto` (resolved later by the loop)."""
    if not resume or resume == "auto":
        return None
    path = Path(resume).expanduser()
    return path.parent.parent if path.parent.name == "checkpoints" else path


def same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def refuse_reuse(run_dir: Path, resumed: Path | None) -> None:
    """RunFolderError if the folder holds a run other than the one resumed in place."""
    found = run_files(run_dir)
    if not found or (resumed is not None and same(resumed, run_dir)):
        return
    raise RunFolderError(
        f"run folder {run_dir} already holds a run ({', '.join(found)}): a second run in it would mix "
        f"the two. Resume that run in place with train.resume={run_dir} hydra.run.dir={run_dir}, or "
        "start afresh in another folder (another hydra.run.dir, or none for a new dated folder)"
    )


def holder(fd: int) -> str:
    """Who holds a lock, from the lock file: 'process <pid> on <host> since <time>'."""
    for _ in range(20):  # the holder writes its pid just after taking the lock
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace")
        try:
            info = json.loads(text)
            return f"process {info['pid']} on {info['host']} since {info['since']}"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "another process (its pid is not in the lock file yet)"


def in_use(run_dir: Path) -> None:
    """RunFolderError if another process holds the folder's lock. Writes nothing."""
    path = run_dir / LOCK
    if run_dir.resolve() in HELD or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # unreadable: lock() reports it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe: fails while a run holds it exclusively
    except BlockingIOError:
        raise RunFolderError(busy(run_dir, holder(fd))) from None
    finally:
        os.close(fd)  # also drops the probe's shared lock


def busy(run_dir: Path, who: str) -> str:
    return (f"run folder {run_dir} is in use by another run ({who}): wait for it to end, or start "
            "this run in another folder (another hydra.run.dir)")


def lock(run_dir: Path) -> None:
    """Hold the folder's lock until release() or the end of this process; RunFolderError if
    another process holds it."""
    key = run_dir.resolve()
    if key in HELD:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunFolderError(f"cannot write into the run folder {run_dir} ({e.strerror}): choose a folder "
                             "you can write with hydra.run.dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = holder(fd)
        os.close(fd)
        raise RunFolderError(busy(run_dir, who)) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    HELD[key] = fd


def release(run_dir: Path) -> None:
    fd = HELD.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def claim(run_dir: Path, resumed: Path | None) -> None:
    """Refuse a folder that is in use or holds a run other than the one resumed in place, then
    hold its lock. The checks before the lock write nothing into a refused folder; the one after
    catches a run that ended in between."""
    in_use(run_dir)
    refuse_reuse(run_dir, resumed)
    lock(run_dir)
    try:
        refuse_reuse(run_dir, resumed)
    except RunFolderError:
        release(run_dir)
        raise


class RunFolderCheck(Callback):
    """Claims a single run's folder before Hydra writes into it, and checks the checkpoint of a
    run resumed in place, so that a refused run leaves the folder as it was. `train.resume=auto`
    is resolved later, by the loop: here the folder is only locked."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir, resume = Path(config.hydra.run.dir), config.train.resume
        try:
            if resume == "auto":
                in_use(run_dir)
                lock(run_dir)
                return
            resumed = resumed_run(resume)
            if resumed is not None and same(resumed, run_dir) and run_files(run_dir):
                from adazeta.engine.resume import find  # imports torch: only to resume in place

                in_use(run_dir)
                find(resume, config, run_dir)  # reads every file of the checkpoint, writes nothing
            claim(run_dir, resumed)
        except AdazetaError as e:
            raise SystemExit(f"error: {e}") from None
