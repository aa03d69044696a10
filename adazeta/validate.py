"""Range checks on a composed config, run before anything heavy is imported or loaded.

Hydra and the structured schemas already reject unknown keys, wrong types and bad enum values at
compose time; this adds the ranges a type cannot say (eps > 0, rank >= 1, sparsity in [0, 1), ...),
so that a mistyped value fails in a second with its key, its value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

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
    ("model.max_length", lambda v: v >= 2, ">= 2 (room for a prompt token and a label token)"),
    ("method.lr", POSITIVE, "> 0"),
    ("method.eps", POSITIVE, "> 0"),
    ("method.weight_decay", NON_NEGATIVE, ">= 0"),
    ("method.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("method.adam_eps", POSITIVE, "> 0"),
    ("method.lora.r", AT_LEAST_1, ">= 1"),
    ("method.lora.alpha", POSITIVE, "> 0"),
    ("method.lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("method.sparse.sparsity", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("method.sparse.keep_ratio", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("adapter.rank", AT_LEAST_1, ">= 1"),
    ("adapter.bottleneck", AT_LEAST_1, ">= 1"),
    ("schedule.q", AT_LEAST_1, ">= 1"),
    ("schedule.q_max", AT_LEAST_1, ">= 1"),
    ("schedule.q_min", AT_LEAST_1, ">= 1"),
    ("schedule.q_target", AT_LEAST_1, ">= 1 (or null: beta as given)"),
    ("schedule.alpha", POSITIVE, "> 0"),
    ("schedule.beta", NON_NEGATIVE, ">= 0"),
    ("schedule.q_start", AT_LEAST_1, ">= 1"),
    ("schedule.q_end", AT_LEAST_1, ">= 1"),
    ("adapter.scale", lambda v: True, "a finite number"),
    ("task.num_train", AT_LEAST_1, ">= 1 (or null: all)"),
    ("task.num_dev", AT_LEAST_1, ">= 1 (or null)"),
    ("task.num_test", AT_LEAST_1, ">= 1 (or null: all)"),
    ("task.k_shot", AT_LEAST_1, ">= 1 (or null)"),
    ("zo.max_replicas", lambda v: v >= 2, ">= 2, one +/- pair (or null: all 2Q)"),
    ("dist.check_steps", NON_NEGATIVE, ">= 0 (0: never)"),
    ("train.threads", lambda v: 1 <= v < 2**31, ">= 1 (or null: torch's default) and below 2**31"),
    ("train.save_steps", NON_NEGATIVE, ">= 0 (0: a checkpoint only at the end)"),
    ("train.save_total_limit", AT_LEAST_1, ">= 1 (how many of the newest checkpoints to keep)"),
    ("guard.explode_factor", lambda v: v > 1, "> 1 (or null: only non-finite values stop a step)"),
    ("guard.max_update", lambda v: v > 0, "> 0 (or null: no check of the update's size)"),
    ("guard.window", AT_LEAST_1, ">= 1"),
    ("guard.lr_factor", lambda v: 0 < v < 1, "in (0, 1)"),
    ("guard.max_rollbacks", AT_LEAST_1, ">= 1"),
    ("method.fzoo.n", lambda v: v >= 2, ">= 2 (FZOO normalises the step by the std of the N perturbed losses)"),
    ("method.lozo.rank", AT_LEAST_1, ">= 1"),
    ("method.lozo.interval", AT_LEAST_1, ">= 1 (steps between two draws of V)"),
    ("method.hizoo.alpha", lambda v: 0 <= v < 1, "in [0, 1) (the rate of HiZOO's Hessian moving average)"),
]


# Values torch multiplies into float32 weights (alpha= of add_): above float32's range they fail there.
FLOAT32_MAX = 3.4028234663852886e38
TORCH_SCALARS = {"method.lr", "method.eps", "method.weight_decay", "method.adam_eps", "method.lora.alpha",
                 "adapter.scale"}


def lookup(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None  # the key belongs to another option of its group (e.g. schedule.q)
        node = node[part]
    return node


def _value(x) -> str:
    return x.value if isinstance(x, Enum) else str(x)


def _method(cfg: DictConfig, key: str) -> str:
    return _value(lookup(cfg, f"method.{key}"))


def _zo(cfg) -> bool:
    return _method(cfg, "optimizer") == "zo"


def _adam(cfg) -> bool:
    return not _zo(cfg) or _method(cfg, "update_rule") in ("adam", "sign_adamw", "conservative_adamw")


# Keys that only some methods read: (key or key prefix, whether the method in `cfg` reads it, who does).
# A key given on the command line that the chosen method would silently ignore is refused.
READ_BY: list[tuple[str, Callable[[DictConfig], bool], str]] = [
    ("adapter.", lambda c: _method(c, "trainable") == "tt_adapter", "method.trainable=tt_adapter"),
    ("method.lora.", lambda c: _method(c, "trainable") == "lora", "method.trainable=lora"),
    ("method.prefix.", lambda c: _method(c, "trainable") == "prefix", "method.trainable=prefix"),
    ("method.sparse.keep_ratio", lambda c: _method(c, "trainable") == "sparse" and _method(c, "sparse.mask") == "random",
     "method.trainable=sparse with method.sparse.mask=random"),
    ("method.sparse.", lambda c: _method(c, "trainable") == "sparse", "method.trainable=sparse"),
    ("method.eps", _zo, "method.optimizer=zo"),
    ("method.update_rule", _zo, "method.optimizer=zo"),
    ("method.objective", _zo, "method.optimizer=zo"),
    ("zo.", _zo, "method.optimizer=zo"),
    ("method.momentum", lambda c: _zo(c) and _method(c, "update_rule") == "momentum",
     "method.update_rule=momentum"),
    ("method.betas", _adam, "method.update_rule=adam, sign_adamw or conservative_adamw, or method.optimizer=fo"),
    ("method.adam_eps", _adam, "method.update_rule=adam, sign_adamw or conservative_adamw, or method.optimizer=fo"),
    ("method.estimator", _zo, "method.optimizer=zo"),
    ("method.fzoo.", lambda c: _zo(c) and _method(c, "estimator") == "fzoo", "method.estimator=fzoo"),
    ("method.lozo.", lambda c: _zo(c) and _method(c, "estimator") == "lozo", "method.estimator=lozo"),
    ("method.hizoo.", lambda c: _zo(c) and _method(c, "estimator") == "hizoo", "method.estimator=hizoo"),
]


def shipped_methods_reading(prefix: str, reads: Callable[[DictConfig], bool]) -> list[str]:
    """The methods of conf/method/ that read a key, judged on their own files (schema defaults
    filling in what a file leaves out)."""
    from adazeta.config import method_presets

    return [name for name, method in method_presets().items()
            if reads(OmegaConf.create({"method": OmegaConf.to_container(method, enum_to_str=True)}))]


def covers(prefix: str, key: str) -> bool:
    """Whether READ_BY's `prefix` covers `key`: a key under it, or a method node as a whole
    (`method.lora` for `method.lora.`)."""
    return key.startswith(prefix) or prefix.startswith("method.") and key + "." == prefix


def check_ignored(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse a command-line override of a key that the chosen method does not read (LoRA keys with
    method=adazeta, ...): it would be accepted and silently change nothing."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        for prefix, reads, who in READ_BY:
            if covers(prefix, key) and not reads(cfg):
                users = shipped_methods_reading(prefix, reads)
                raise ConfigError(
                    f"{key} is not read by method={_method(cfg, 'name')} (method.trainable={_method(cfg, 'trainable')}, "
                    f"method.optimizer={_method(cfg, 'optimizer')}, method.update_rule={_method(cfg, 'update_rule')}): "
                    f"only with {who}" + (f", as in method={','.join(users)}" if users else "")
                    + f"; drop {override!r} or choose such a method"
                )


def validate(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Raise ConfigError for the first value out of its range, naming the key and the range, or
    for an override (default: the composed config's own hydra.overrides.task) that the chosen
    method ignores."""
    check_64_bits(cfg)
    for key, ok, allowed in CHECKS:
        value = lookup(cfg, key)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")
        bound = FLOAT32_MAX / 2 if key == "method.eps" else FLOAT32_MAX  # SPSA moves by -2 eps z
        if key in TORCH_SCALARS and abs(value) > bound:
            raise ConfigError(f"{key}={value!r} is out of range: it overflows float32 (> {bound:.3g}), "
                              "in which torch applies it to the weights; use a value of a sensible size")
    resume = lookup(cfg, "train.resume")
    if resume is not None and resume != "auto" and not Path(resume).expanduser().is_dir():
        what = "is a file" if Path(resume).expanduser().is_file() else "does not exist"
        raise ConfigError(
            f"train.resume={resume!r} {what}: give the folder of an earlier run "
            "(outputs/runs/<date>/<time>_...), one of its checkpoints/step-<N> folders, or auto"
        )
    check_modes(lookup(cfg, "adapter.modes"))
    q_min, q_max = lookup(cfg, "schedule.q_min"), lookup(cfg, "schedule.q_max")
    if q_min is not None and q_max is not None and q_min > q_max:
        raise ConfigError(f"schedule.q_min={q_min} is above schedule.q_max={q_max}: the adaptive schedule keeps Q "
                          "within [q_min, q_max]; lower schedule.q_min or raise schedule.q_max")
    if lookup(cfg, "schedule.q_target") is not None and lookup(cfg, "schedule.reach_max_at_last_epoch"):
        raise ConfigError("schedule.q_target and schedule.reach_max_at_last_epoch=true each derive beta from the run's "
                          "length: keep one (q_target: the released AdaZeta code's rule, schedule=adaptive_released; "
                          "reach_max_at_last_epoch: Q = q_max at the last epoch)")
    q_start, q_end = lookup(cfg, "schedule.q_start"), lookup(cfg, "schedule.q_end")
    if q_start is not None and q_end is not None and q_end < q_start:
        raise ConfigError(f"schedule.q_end={q_end} is below schedule.q_start={q_start}: the linear schedule grows "
                          "from q_start to q_end; set schedule.q_end >= schedule.q_start")
    if not _zo(cfg) and _method(cfg, "objective") == "metric":
        raise ConfigError(f"method.objective=metric with method={_method(cfg, 'name')} (method.optimizer=fo): a "
                          "metric has no gradient to backpropagate; use a ZO method (e.g. method=mezo) or "
                          "method.objective=loss")
    if _zo(cfg) and _method(cfg, "objective") == "metric" and lookup(cfg, "zo.parallel_queries"):
        raise ConfigError("method.objective=metric with zo.parallel_queries=true: a metric is scored on each "
                          "query's own predictions (greedy generation for SQuAD/DROP), which replicas of one "
                          "forward cannot give; set zo.parallel_queries=false or method.objective=loss")
    betas = lookup(cfg, "method.betas")
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        raise ConfigError(f"method.betas={list(betas)} must be two values in [0, 1)")
    lr = lookup(cfg, "method.lr")
    if betas is not None and lr is not None and _method(cfg, "optimizer") == "fo" and lr / (1 - betas[0]) > FLOAT32_MAX:
        raise ConfigError(f"method.lr={lr!r} is out of range: AdamW's first step is lr / (1 - betas[0]) = "
                          f"{lr / (1 - betas[0]):.3g}, beyond float32; use a value of a sensible size")
    if overrides is None:
        overrides = list(lookup(cfg, "hydra.overrides.task") or [])
    check_ignored(cfg, [o for o in overrides if "=" in o and not o.startswith(("hydra.", "+hydra."))])


def check_modes(modes) -> None:
    """adapter.modes: null, or {size: [factors]} with every factor >= 1 and their product the size."""
    if modes is None:
        return
    example = "e.g. adapter.modes='{64: [8, 8]}' (64 = 8 * 8), or null for the family's defaults"
    plain = OmegaConf.to_container(modes) if OmegaConf.is_config(modes) else modes
    if not isinstance(plain, dict):
        raise ConfigError(f"adapter.modes={plain!r} must map a layer size to its TT factors, {example}")
    for size, factors in plain.items():
        ok = isinstance(factors, list) and factors and all(type(f) is int and f >= 1 for f in factors)
        if not (type(size) is int or str(size).isdigit()) or not ok:
            raise ConfigError(f"adapter.modes={plain!r}: {size!r}: {factors!r} is not a size and a list of "
                              f"integer factors >= 1, {example}")
        if math.prod(factors) != int(size):
            raise ConfigError(f"adapter.modes={plain!r}: the factors {factors} of {size} multiply to "
                              f"{math.prod(factors)}, not {size}; {example}")


def check_64_bits(cfg: DictConfig) -> None:
    """Every integer must fit in 64 bits: torch (manual_seed, tensor sizes) and the tokenizers take
    them as C integers and fail with an OverflowError or ValueError deep inside otherwise."""
    def walk(node, key: str):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif type(node) is int and not -(2**63) <= node < 2**63:
            raise ConfigError(f"{key}={node} is out of range: integers must fit in 64 bits (|value| < 2**63)")

    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    walk(plain, "")
