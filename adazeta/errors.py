"""Errors a user can fix: they are printed as one clear message, without a traceback."""

import errno


class AdazetaError(Exception):
    """Base class: a problem with the user's input, with what to do about it."""


class ConfigError(AdazetaError):
    """A config value is invalid or names something that does not exist."""


class DataError(AdazetaError):
    """A data file is missing, or a row or field in it is malformed."""


class CheckpointError(AdazetaError):
    """A checkpoint (or the run folder given to resume or replay) is missing, damaged, not a
    safetensors file, or was written by a different method, model, task or trainable set."""


class RunFolderError(AdazetaError):
    """The run folder holds another run, or another process is running in it
    (adazeta/engine/run_folder.py). The folder is another run's: nothing is written into it."""


class DivergenceError(AdazetaError):
    """A step's loss or projected gradient was not finite, or the loss exploded; the step was not
    applied (adazeta/engine/guard.py)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Interrupted(Exception):  # noqa: N818  (not an error: the run stopped because it was asked to)
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run stopped at the end of a step."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


# What the machine refuses, as the user can fix it: the OSError numbers and what to do about them.
ENVIRONMENT = {
    errno.ENOSPC: "free space on that disk, or write the run elsewhere with hydra.run.dir",
    errno.EDQUOT: "free space within your quota, or write the run elsewhere with hydra.run.dir",
    errno.EACCES: "check its permissions, or write the run elsewhere with hydra.run.dir",
    errno.EPERM: "check its permissions, or write the run elsewhere with hydra.run.dir",
    errno.EROFS: "the file system is read-only: write the run elsewhere with hydra.run.dir",
}


def environment_error(e: BaseException) -> str | None:
    """One line for a failure the machine caused and the user can fix (a full disk, a folder that
    cannot be written, memory exhausted); None for anything else, which is a bug and keeps its
    traceback. The checkpoints already written stay intact: every save is atomic."""
    if isinstance(e, OSError) and e.errno in ENVIRONMENT:
        where = f" ({e.filename})" if e.filename else ""
        return (f"{e.strerror}{where}: {ENVIRONMENT[e.errno]}; an interrupted run resumes from its newest "
                "checkpoint with train.resume=<run folder>")
    text = str(e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in text:
        first = text.splitlines()[0][:300] if text else type(e).__name__
        return (f"out of memory ({first}): lower train.batch_size, train.eval_batch_size, model.max_length or "
                "the trainable set's size (adapter.rank, adapter.bottleneck, method.lora.r), or use a larger device")
    return None
