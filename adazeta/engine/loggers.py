"""Metric loggers: a small protocol (log_dict, log_config, close) with a JSONL backend that every
run has and a Weights & Biases backend that `logger=wandb` adds. wandb is imported only when used."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf


class MetricLogger(Protocol):
    def log_dict(self, metrics: dict[str, float], step: int) -> None: ...
    def log_config(self, config: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlLogger:
    """One JSON object per logged step in <run>/metrics.jsonl; the config in <run>/config.yaml."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.file = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def log_config(self, config: dict[str, Any]) -> None:
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))

    def close(self) -> None:
        self.file.close()


def clean(value: float) -> float | None:
    """JSON has no NaN/inf: write null so that every line stays valid JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class WandbLogger:
    """Weights & Biases: files under <run>/wandb, metrics on the `step` axis."""

    def __init__(self, cfg: DictConfig, run_dir: Path, name: str, group: str | None, tags: list[str]):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logger=wandb needs wandb: pip install 'adazeta[wandb]'") from e
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group or group,
            job_type=cfg.job_type, tags=tags, name=name, mode=cfg.mode.value,
            dir=str(run_dir), reinit="finish_previous",
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({"step": step, **metrics})

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Fan-out to several loggers."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def log_dict(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log_dict(metrics, step)

    def log_config(self, config: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_config(config)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
