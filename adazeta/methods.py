"""A method is a composition, not a subclass tree: a trainable-set transform (full, TT adapters,
LoRA, sparse mask, prefixes) + a step (a ZO estimator with an update rule, or backprop with AdamW).
`build_method` returns the (possibly wrapped) model and its step, built once from the config:

    method = build_method(model, cfg.method, cfg.adapter, head, seed, zo=cfg.zo, dist=dist)
    result = method.step(loss_fn, step, q, guard=guard)        # a `Step` (adazeta/step.py)

Who builds what: `make_trainable` the trainable set; the step registered under the config's
`step_name` (adazeta/step.py: method.estimator's value, or `fo`) everything else: MeZO's `ZOStep`
(adazeta/zo/spsa_step.py) its SPSA, estimator and update rule; FZOO, LOZO and HiZOO their own
(adazeta/zo/); `FOStep` (adazeta/first_order.py) AdamW. The guard and the query schedule belong to
the caller and are passed in, never assigned."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Each module registers its step when imported (adazeta/step.py `register_step`).
import adazeta.first_order  # noqa: F401
import adazeta.zo.fzoo  # noqa: F401
import adazeta.zo.hizoo  # noqa: F401
import adazeta.zo.lozo  # noqa: F401
import adazeta.zo.spsa_step  # noqa: F401
from adazeta.config import AdapterConfig, Head, MethodConfig, ZOConfig
from adazeta.params import Trainable
from adazeta.step import Step, check_supports
from adazeta.trainable.sets import make_trainable
from adazeta.zo.estimators import EstimatorFactory
from adazeta.zo.sharded import launched


@dataclass
class Method:
    model: torch.nn.Module
    trainables: list[Trainable]
    step: Step


def build_method(
    model, cfg: MethodConfig, adapter: AdapterConfig, head: Head, seed: int, zo: ZOConfig | None = None,
    dist=None, estimator: EstimatorFactory | None = None,
) -> Method:
    """The method of `cfg` on `model`. `zo` (default: ZOConfig()) configures the ZO estimator;
    `dist` (an adazeta.zo.sharded.Dist; None or a world of 1: one process) shares its queries
    across torchrun ranks; `estimator` (a factory (model, spsa) -> estimator, adazeta/zo/estimators.py)
    replaces the configured one of a step that takes one (MeZO's). What the step does not support
    (its registered `Supports`: trainable set, update rule, zo.parallel_queries, torchrun, bf16/fp16
    trainables, a factory) is refused by key before it is built. First-order methods have no
    queries: they ignore zo.fused_update and zo.max_replicas, and refuse zo.parallel_queries=true
    rather than silently run sequentially."""
    zo = zo if zo is not None else ZOConfig()
    model, trainables = make_trainable(model, cfg, adapter, head)
    entry = check_supports(cfg, zo, trainables, torchrun=launched(), estimator_factory=estimator is not None)
    extra = {} if estimator is None else {"estimator": estimator}
    step: Step = entry.cls(model, trainables, cfg, seed, zo, dist=dist, **extra)
    return Method(model=model, trainables=trainables, step=step)
