"""Range checks on a composed config, run before anything heavy is imported or loaded.

Hydra and the structured schemas already reject unknown keys, wrong types and bad enum values at
compose time; this adds the ranges a type cannot say (eps > 0, rank >= 1, sparsity in [0, 1), ...),
so that a mistyped value fails in a second with its key, its value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from adazeta.errors import ConfigError

Check = tuple[str, Callable[[float], bool], str]

POSITIVE: Callable[[float], bool] = lambda v: v > 0  # noqa: E731
AT_LEAST_1: Callable[[float], bool] = lambda v: v >= 1  # noqa: E731
NON_NEGATIVE: Callable[[float], bool] = lambda v: v >= 0  # noqa: E731

CHECKS: list[Check] = [
    ("train.max_steps", NON_NEGATIVE, ">= 0"),
    ("train.batch_size", AT_LEAST_1, ">= 1"),
    ("train.eval_steps", AT_LEAST_1, ">= 1"),
    ("train.eval_batch_size", AT_LEAST_1, ">= 1"),
    ("train.log_steps", AT_LEAST_1, ">= 1"),
    ("model.max_length", AT_LEAST_1, ">= 1"),
    ("method.lr", POSITIVE, "> 0"),
    ("method.eps", POSITIVE, "> 0"),
    ("method.weight_decay", NON_NEGATIVE, ">= 0"),
    ("method.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("method.adam_eps", POSITIVE, "> 0"),
    ("method.lora_r", AT_LEAST_1, ">= 1"),
    ("method.lora_alpha", POSITIVE, "> 0"),
    ("method.lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("method.sparsity", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("method.keep_ratio", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("adapter.rank", AT_LEAST_1, ">= 1"),
    ("adapter.bottleneck", AT_LEAST_1, ">= 1"),
    ("schedule.q", AT_LEAST_1, ">= 1"),
    ("schedule.q_max", AT_LEAST_1, ">= 1"),
    ("schedule.alpha", POSITIVE, "> 0"),
    ("schedule.beta", NON_NEGATIVE, ">= 0"),
    ("schedule.q_start", AT_LEAST_1, ">= 1"),
    ("schedule.q_end", AT_LEAST_1, ">= 1"),
    ("task.num_train", AT_LEAST_1, ">= 1 (or null: all)"),
    ("task.num_dev", AT_LEAST_1, ">= 1 (or null)"),
    ("task.num_test", AT_LEAST_1, ">= 1 (or null: all)"),
    ("task.k_shot", AT_LEAST_1, ">= 1 (or null)"),
    ("zo.max_replicas", lambda v: v >= 2, ">= 2, one +/- pair (or null: all 2Q)"),
    ("dist.check_steps", NON_NEGATIVE, ">= 0 (0: never)"),
    ("train.threads", AT_LEAST_1, ">= 1 (or null: torch's default)"),
    ("train.save_steps", NON_NEGATIVE, ">= 0 (0: a checkpoint only at the end)"),
    ("train.save_total_limit", AT_LEAST_1, ">= 1 (how many of the newest checkpoints to keep)"),
    ("guard.explode_factor", lambda v: v > 1, "> 1 (or null: only non-finite values stop a step)"),
    ("guard.window", AT_LEAST_1, ">= 1"),
    ("guard.lr_factor", lambda v: 0 < v < 1, "in (0, 1)"),
    ("guard.max_rollbacks", AT_LEAST_1, ">= 1"),
]


def lookup(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None  # the key belongs to another option of its group (e.g. schedule.q)
        node = node[part]
    return node


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value out of its range, naming the key and the range."""
    for key, ok, allowed in CHECKS:
        value = lookup(cfg, key)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")
    resume = lookup(cfg, "train.resume")
    if resume is not None and resume != "auto" and not Path(resume).expanduser().is_dir():
        what = "is a file" if Path(resume).expanduser().is_file() else "does not exist"
        raise ConfigError(
            f"train.resume={resume!r} {what}: give the folder of an earlier run "
            "(outputs/runs/<date>/<time>_...), one of its checkpoints/step-<N> folders, or auto"
        )
    betas = lookup(cfg, "method.betas")
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        raise ConfigError(f"method.betas={list(betas)} must be two values in [0, 1)")
