"""The estimators of a ZO step: seeds -> the Q projected gradients, chosen once when the method is
built and never swapped afterwards.

An estimator is called as `estimate(loss_fn, seeds, defer_restore=False)` and returns a float64
tensor [Q, 2] of (g_q, (L+ + L-) / 2) per query, with g_q = (L(theta + eps z_q) - L(theta - eps z_q))
/ (2 eps) (two-sided SPSA; MeZO, arXiv 2305.17333, eq. 2), z_q read from the noise stream
(adazeta/zo/noise.py). It returns only scalars, so the update that follows does not depend on how the
losses were evaluated:

- `Sequential` (here): one query after another, perturbing the weights in place (+eps z, -2 eps z,
  +eps z); the default.
- `InForwardPerturbation` (adazeta/zo/sparse.py): each module's trainables perturbed inside its own
  forward, the weights never written (Sparse-MeZO's memory-efficient form; any full-parameter set
  of bf16/fp16 weights).
- `ParallelQueries` (adazeta/zo/parallel.py): the 2Q perturbed forwards as batched forwards over
  replicas of the batch (`zo.parallel_queries=true`).
- `Sharded` (adazeta/zo/sharded.py): wraps one of the above and shares its queries (or the batch)
  across torchrun ranks.

Two attributes tell the step what an estimator does to the weights: `writes_weights` (it perturbs
them in place, so the weights after a step carry the rounding of its round trips, which the replay
log records) and `can_defer_restore` (with defer_restore=True it may leave the last query's weights
at theta - eps z for a fused SGD update to restore: `zo.fused_update`).

A new estimator is a class with these two attributes and that call; pass a factory
`(model, spsa) -> estimator` to `build_method(..., estimator=...)` (or `ZOStep(..., estimator=...)`, adazeta/zo/spsa_step.py)
and it takes the place of the default one, wrapped by `Sharded` under torchrun.

The estimators beyond SPSA are steps of their own (FZOO, LOZO, HiZOO: adazeta/zo/fzoo.py, lozo.py,
hizoo.py); `check_estimator_support` refuses what they do not support, naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from adazeta.config import MethodConfig, ZOConfig
from adazeta.errors import ConfigError
from adazeta.params import LOW_PRECISION, Trainable
from adazeta.zo.parallel import ParallelQueries, check_parallel
from adazeta.zo.sharded import Dist, Sharded, launched
from adazeta.zo.sparse import InForwardPerturbation
from adazeta.zo.spsa import SPSA

LossFn = Callable[[], torch.Tensor]


class Estimator(Protocol):
    writes_weights: bool
    can_defer_restore: bool

    def __call__(self, loss_fn: LossFn, seeds: list[int], defer_restore: bool = False) -> torch.Tensor: ...


# (model, spsa) -> an estimator: how a caller plugs in an estimator of its own.
EstimatorFactory = Callable[[torch.nn.Module, SPSA], Estimator]


class Sequential:
    """One query after another, in place, each restoring the weights it perturbed; with
    defer_restore=True the last one leaves them at theta - eps z for the update to restore. The
    result stays on the loss's device: the step reads it back once (a host read per query would
    stall a GPU between queries)."""

    writes_weights = True
    can_defer_restore = True

    def __init__(self, spsa: SPSA):
        self.spsa = spsa

    def __call__(self, loss_fn: LossFn, seeds: list[int], defer_restore: bool = False) -> torch.Tensor:
        keep = len(seeds) - 1 if defer_restore else -1  # the query left displaced, if any
        return torch.stack([self.spsa.query(loss_fn, s, restore=k != keep) for k, s in enumerate(seeds)])


def build_estimator(
    model: torch.nn.Module, spsa: SPSA, cfg: MethodConfig, zo: ZOConfig, in_forward: bool, dist: Dist | None = None,
    factory: EstimatorFactory | None = None,
) -> Estimator:
    """The estimator of a method, chosen once: `factory`'s if given, else parallel replicas
    (zo.parallel_queries), the in-forward perturbation (`in_forward`, see
    `spsa_step.functional_perturbation`) or the sequential in-place one; shared across ranks when
    `dist` spans more than one process."""
    if factory is not None:
        estimator = factory(model, spsa)
    elif zo.parallel_queries:
        check_parallel(cfg.trainable.value)
        estimator = ParallelQueries(model, spsa, zo.max_replicas)
    elif in_forward:
        estimator = InForwardPerturbation(model, spsa)
    else:
        estimator = Sequential(spsa)
    if dist is not None and dist.enabled:
        estimator = Sharded(estimator, dist, spsa)
    return estimator


def check_estimator_support(
    estimator: str, cfg: MethodConfig, zo: ZOConfig, trainables: list[Trainable], sets: tuple, rules: tuple[str, ...],
) -> None:
    """Refuse, naming the key and the valid choices, what an estimator beyond SPSA does not do."""
    if cfg.trainable not in sets:
        raise ConfigError(
            f"method.trainable={cfg.trainable.value} is not supported by method.estimator={estimator}; valid: "
            + ", ".join(s.value for s in sets)
        )
    if cfg.update_rule.value not in rules:
        raise ConfigError(
            f"method.update_rule={cfg.update_rule.value} is not supported by method.estimator={estimator}; valid: "
            + ", ".join(rules)
        )
    if zo.parallel_queries:
        raise ConfigError(
            f"zo.parallel_queries=true is not supported by method.estimator={estimator} (its queries run one after "
            "another); set zo.parallel_queries=false"
        )
    if launched():
        raise ConfigError(
            f"method.estimator={estimator} runs in one process: torchrun (WORLD_SIZE > 1) is not supported; "
            "run it without torchrun, or use method.estimator=spsa"
        )
    low = [t for t in trainables if t.param.dtype in LOW_PRECISION]
    if low:
        raise ConfigError(
            f"method.estimator={estimator} perturbs its trainable weights in place, and {len(low)} of them are "
            f"{low[0].param.dtype} (e.g. {low[0].name}): a rounded round trip does not restore them. "
            "Use model.dtype=float32, or method.estimator=spsa"
        )
