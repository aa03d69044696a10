"""Errors a user can fix: they are printed as one clear message, without a traceback."""


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
    (adazeta/run_folder.py). The folder is another run's: nothing is written into it."""


class DivergenceError(AdazetaError):
    """A step's loss or projected gradient was not finite, or the loss exploded; the step was not
    applied (adazeta/guard.py)."""

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
