"""`adazeta-train`: one run of one method on one model and task, composed by Hydra.

    adazeta-train                                         # AdaZeta on MiniLM, built-in SST-2 sample
    adazeta-train method=mezo task.data_dir=../shared/data/sst2
    adazeta-train -m seed=0,1                             # a sweep, under outputs/multirun/
    adazeta-train --cfg job                               # print the composed config

This module stays light (no torch, no transformers) so that config errors and `--cfg` answer at
once; the loop lives in adazeta/engine/loop.py and is imported when a run starts.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from adazeta.config import CONF_DIR, register_configs
from adazeta.errors import AdazetaError, Interrupted, RunFolderError, environment_error
from adazeta.legacy_keys import flat_key_hint, upgrade_argv
from adazeta.validate import validate

log = logging.getLogger("adazeta")
__all__ = ["main"]

register_configs()


# Run folders of this sweep's failed jobs (Hydra's basic launcher runs the jobs in this process):
# a failed job does not stop the sweep, and the command exits non-zero at the end.
FAILED: list[str] = []


class ComposeErrors:
    """sys.stderr while Hydra composes the config: passes everything on and keeps the last
    characters, so that a compose error caused by a flat method key in a yaml file can be followed
    by the key's new name (adazeta/legacy_keys.py)."""

    def __init__(self, stream):
        self.stream, self.text = stream, ""

    def write(self, text: str) -> int:
        self.text = (self.text + text)[-4000:]
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    if isinstance(sys.stderr, ComposeErrors):  # composed: the run writes to the real stderr
        sys.stderr = sys.stderr.stream
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        validate(cfg, list(HydraConfig.get().overrides.task))  # ranges, before torch and the model are loaded
        from adazeta.engine.loop import run

        summary = run(cfg, run_dir)
    except Interrupted as e:  # SIGINT/SIGTERM: a checkpoint is saved; the whole sweep stops too
        log.warning("%s", e)
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, the final evaluation)
        print(f"interrupted by SIGINT outside the training steps: run folder {run_dir} keeps what it had "
              "(checkpoints included); start again, or resume with train.resume=<run folder>", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        machine = environment_error(e)  # a full disk, a folder that cannot be written, no memory left
        if machine is not None:
            e = AdazetaError(machine)
        expected = isinstance(e, AdazetaError)  # the user's to fix: one message, no traceback
        # Other torchrun ranks have no run folder; a refused folder is another run's: left as it is.
        if int(os.environ.get("RANK", "0")) == 0 and not isinstance(e, RunFolderError):
            try:
                (run_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n" if expected else traceback.format_exc())
            except OSError:  # the folder cannot take it (a full disk): the message still goes to stderr
                pass
        if multirun:
            log.error("this job failed, the sweep goes on: %s: %s%s", type(e).__name__, e,
                      "" if isinstance(e, RunFolderError) else f" (details in {run_dir / 'error.txt'})")
            FAILED.append(str(run_dir))
            return None
        if not expected:
            raise  # a bug: Hydra prints the traceback (it is also in error.txt)
        log.error("%s", e)
        sys.exit(f"error: {e}")
    return summary.get(f"best/eval_{summary['metric']}")


# Under torchrun only rank 0 writes: the other ranks get no output folder, config copy or log file.
NON_MAIN_RANK_OVERRIDES = [
    "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
]
# A single run's folder is claimed before Hydra writes its config copy and log into it: a folder
# that holds another run, or that another process runs in, is refused untouched (adazeta/engine/run_folder.py).
RUN_FOLDER_CHECK = "+hydra.callbacks.run_folder._target_=adazeta.engine.run_folder.RunFolderCheck"


def main() -> None:
    """The console script: `adazeta-train`, `python -m adazeta.cli.train`, or under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if "-m" in sys.argv[1:] or "--multirun" in sys.argv[1:]:
            sys.exit("error: torchrun runs one job across processes; sweep with -m outside torchrun "
                     "(e.g. with hydra/launcher=slurm), not inside it")
        if int(os.environ.get("RANK", "0")) > 0:
            sys.argv += NON_MAIN_RANK_OVERRIDES
    # Flat method keys of earlier releases (method.lora_r=4) -> their nodes (method.lora.r=4), with a warning.
    sys.argv[1:] = upgrade_argv(sys.argv[1:])
    if int(os.environ.get("RANK", "0")) == 0:
        # Before the first override, not at the end: argparse takes the overrides as one run of
        # positionals, so `adazeta-train model=x --cfg job` would refuse an override after --cfg.
        first = next((i for i, a in enumerate(sys.argv[1:], 1) if "=" in a and not a.startswith("-")), len(sys.argv))
        sys.argv.insert(first, RUN_FOLDER_CHECK)
    sys.stderr = recorder = ComposeErrors(sys.stderr)
    try:
        hydra_main()
    except KeyboardInterrupt:  # Ctrl-C while Hydra composes or sets up, before the run's own handling
        print("interrupted by SIGINT before the run started: nothing was trained; start it again", file=sys.stderr)
        sys.exit(130)  # the shell's convention for SIGINT, as Interrupted.exit_code
    except SystemExit as e:  # Hydra reports a compose error and exits 1
        hint = flat_key_hint(recorder.text) if sys.stderr is recorder and e.code == 1 else None
        if hint is not None:
            sys.exit(f"error: {hint}")
        raise
    finally:
        if sys.stderr is recorder:
            sys.stderr = recorder.stream
    if FAILED:
        sys.exit(f"error: {len(FAILED)} job(s) of the sweep failed, each with its error in error.txt: "
                 + ", ".join(FAILED))


if __name__ == "__main__":
    main()
