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
hizoo.py). What each step supports (parallel queries for which trainable sets, torchrun, ...) is
declared beside it and checked when the method is built (adazeta/step.py `check_supports`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from adazeta.config import ZOConfig
from adazeta.zo.parallel import ParallelQueries
from adazeta.zo.sharded import Dist, Sharded
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
    model: torch.nn.Module, spsa: SPSA, zo: ZOConfig, in_forward: bool, dist: Dist | None = None,
    factory: EstimatorFactory | None = None,
) -> Estimator:
    """The estimator of a method, chosen once: `factory`'s if given, else parallel replicas
    (zo.parallel_queries), the in-forward perturbation (`in_forward`, see
    `spsa_step.functional_perturbation`) or the sequential in-place one; shared across ranks when
    `dist` spans more than one process. The trainable set's fit for parallel replicas is the
    step's declaration (adazeta/zo/spsa_step.py SUPPORTS), checked before it is built."""
    if factory is not None:
        estimator = factory(model, spsa)
    elif zo.parallel_queries:
        estimator = ParallelQueries(model, spsa, zo.max_replicas)
    elif in_forward:
        estimator = InForwardPerturbation(model, spsa)
    else:
        estimator = Sequential(spsa)
    if dist is not None and dist.enabled:
        estimator = Sharded(estimator, dist, spsa)
    return estimator
