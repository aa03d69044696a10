"""A method is a composition, not a subclass tree: a trainable-set transform (full, TT adapters,
LoRA, sparse mask) + an optimiser (the ZO estimator with an update rule, or backprop with AdamW).
`build_method` returns the (possibly wrapped) model and a `step(loss_fn, step, q)` callable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from adazeta.config import AdapterConfig, Head, MethodConfig, Optimizer, TrainableSet
from adazeta.errors import ConfigError
from adazeta.sparse import InForwardPerturbation, SparseMask
from adazeta.trainable import make_trainable
from adazeta.updates import RULES
from adazeta.zo import SPSA, Trainable, query_seed

LossFn = Callable[[], torch.Tensor]


@dataclass
class StepResult:
    loss: float  # the loss at theta (ZO: the mean of L+ and L- over queries)
    projected_grad: float | None  # mean g_q over the step's queries (ZO only)
    forward_passes: int
    seeds: list[int] | None = None  # ZO: the query seeds of this step, in query order
    grads: list[float] | None = None  # ZO: g_q per query (what the replay log records)


@dataclass
class Method:
    model: torch.nn.Module
    trainables: list[Trainable]
    step: Callable[[LossFn, int, int], StepResult]


# estimate(loss_fn, seeds) -> float tensor [len(seeds), 2] of (g_q, (L+ + L-) / 2) per query.
Estimate = Callable[[LossFn, list[int]], torch.Tensor]
# guard(step, losses, grads): raises to stop the step before any weight moves.
Guard = Callable[[int, list[float], list[float]], None]


class ZOStep:
    """Q queries of two-sided SPSA, then the update rule:

        seeds -> estimate (sequential, batched replicas, or split across ranks) -> guard -> apply

    `estimate` returns only scalars, so it can be swapped (parallel replicas, torch.distributed)
    without touching the update; `guard` sees the step's losses and projected gradients before any
    weight is written."""

    def __init__(self, model, trainables: list[Trainable], cfg: MethodConfig, seed: int):
        mask = None
        if cfg.trainable == TrainableSet.sparse:
            mask = SparseMask(trainables, cfg.mask.value, cfg.sparsity, cfg.keep_ratio)
        self.spsa = SPSA(trainables, cfg.eps, mask=mask)
        self.mask, self.in_place_masks = mask, mask is not None and not cfg.in_forward
        if mask is not None and cfg.in_forward:
            self.spsa.loss_pair = InForwardPerturbation(model, self.spsa).losses
        kwargs = {}
        if cfg.update_rule.value == "momentum":
            kwargs = {"momentum": cfg.momentum}
        elif cfg.update_rule.value == "adam":
            kwargs = {"betas": tuple(cfg.betas), "adam_eps": cfg.adam_eps}
        self.rule = RULES[cfg.update_rule.value](self.spsa, cfg.lr, cfg.weight_decay, **kwargs)
        self.seed = seed
        self.estimate: Estimate = self.sequential
        self.guard: Guard | None = None
        # Whether `estimate` perturbs the weights in place (+eps z, -2 eps z, +eps z). Float addition
        # does not undo exactly, so the weights after a step carry the rounding of the queries it ran:
        # a query-parallel rank replays the others' round trips to round as one process would.
        self.writes_weights = not (mask is not None and cfg.in_forward)

    def sequential(self, loss_fn: LossFn, seeds: list[int]) -> torch.Tensor:
        """One query after another, each restoring the weights it perturbed."""
        return torch.tensor([self.spsa.projected_grad(loss_fn, s) for s in seeds], dtype=torch.float64)

    def __call__(self, loss_fn: LossFn, step: int, q: int) -> StepResult:
        seeds = [query_seed(self.seed, step, i) for i in range(q)]
        if self.in_place_masks:
            self.mask.store(self.spsa.trainables)  # from the unperturbed weights of this step
        try:
            results = self.estimate(loss_fn, seeds).tolist()
            grads, losses = [g for g, _ in results], [loss for _, loss in results]
            if self.guard is not None:
                self.guard(step, losses, grads)
            extra = self.rule.apply(seeds, grads, loss_fn)
        finally:
            if self.in_place_masks:
                self.mask.release()
        return StepResult(sum(losses) / q, sum(grads) / q, 2 * q + extra, seeds, grads)


class FOStep:
    """Backprop through the loss and one AdamW step (the first-order references)."""

    def __init__(self, model, trainables: list[Trainable], cfg: MethodConfig):
        groups = [
            {"params": [t.param for t in trainables if t.decay], "weight_decay": cfg.weight_decay},
            {"params": [t.param for t in trainables if not t.decay], "weight_decay": 0.0},
        ]
        self.model = model
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps)

    def __call__(self, loss_fn: LossFn, step: int, q: int) -> StepResult:
        self.model.train()  # dropout on, as in ordinary fine-tuning
        with torch.enable_grad():
            loss = loss_fn()
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.eval()
        return StepResult(float(loss.detach()), None, 1)


def build_method(model, cfg: MethodConfig, adapter: AdapterConfig, head: Head, seed: int) -> Method:
    if cfg.optimizer == Optimizer.fo and cfg.trainable == TrainableSet.sparse:
        raise ConfigError(
            "method.trainable=sparse is Sparse-MeZO's perturbation mask and needs method.optimizer=zo; "
            "for first-order training use trainable=full, lora or tt_adapter"
        )
    model, trainables = make_trainable(model, cfg, adapter, head)
    if cfg.optimizer == Optimizer.fo:
        step = FOStep(model, trainables, cfg)
    else:
        step = ZOStep(model, trainables, cfg, seed)
    return Method(model=model, trainables=trainables, step=step)
