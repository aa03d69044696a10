"""SIGINT and SIGTERM (Ctrl-C, a scheduler's pre-emption) stop a run at the end of the current
step instead of killing it mid-update: the loop saves a checkpoint and exits with a message saying
how to resume. A second signal stops at once."""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path

from adazeta.errors import Interrupted

log = logging.getLogger("adazeta")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop:
    """Set by the handlers; the loop reads `signum` after each step."""

    signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextlib.contextmanager
def interruption(run_dir: Path | None = None):
    """Install the handlers for the duration of the training loop, then restore the previous ones
    (signal handlers can only be set from the main thread; elsewhere the loop runs without them).
    A second signal raises Interrupted at once: one line, exit 128 + signal, no traceback; a
    checkpoint being written then is abandoned whole (saves are atomic), the earlier ones stay."""
    stop = Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.signum is not None:
            again = f"resume with: {resume_command(run_dir)}" if run_dir is not None else "resume with train.resume=<run folder>"
            raise Interrupted(f"second {signal.Signals(signum).name} while stopping: stopped at once, without a new "
                              f"checkpoint (the earlier ones are intact); {again}", signum)
        stop.signum = signum
        log.warning("%s received: saving a checkpoint after this step (send it again to stop at once)", stop.name)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run: the same arguments plus train.resume (the run
    folder; `auto` in a sweep, where each job finds its own checkpoint)."""
    args = [a for a in sys.argv[1:] if not a.startswith(("train.resume=", "+hydra.callbacks.run_folder."))]
    target = "auto" if {"-m", "--multirun"} & set(args) else str(run_dir)
    return " ".join(["adazeta-train", *map(shlex.quote, args), f"train.resume={shlex.quote(target)}"])
