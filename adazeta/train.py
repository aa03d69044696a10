"""`adazeta-train`: one run of one method on one model and task, composed by Hydra.

    adazeta-train                                         # AdaZeta on MiniLM, built-in SST-2 sample
    adazeta-train method=mezo task.data_dir=../shared/data/sst2
    adazeta-train -m seed=0,1                             # a sweep, under outputs/multirun/
    adazeta-train --cfg job                               # print the composed config

This module stays light (no torch, no transformers) so that config errors and `--cfg` answer at
once; the loop lives in adazeta/loop.py and is imported when a run starts.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from adazeta.config import register_configs
from adazeta.errors import AdazetaError
from adazeta.validate import validate

log = logging.getLogger("adazeta")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)  # ranges, before torch and the model are loaded
        from adazeta.loop import run

        summary = run(cfg, run_dir)
    except AdazetaError as e:
        log.error("%s", e)
        (run_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(f"error: {e}")
    return summary.get(f"best/eval_{summary['metric']}")


if __name__ == "__main__":
    main()
