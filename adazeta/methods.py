"""A method is a composition, not a subclass tree: a trainable-set transform (full, TT adapters,
LoRA, sparse mask) + an optimiser (the ZO estimator with an update rule, or backprop with AdamW).
`build_method` returns the (possibly wrapped) model and its step, built once from the config:

    method = build_method(model, cfg.method, cfg.adapter, head, seed, zo=cfg.zo, dist=dist)
    result = method.step(loss_fn, step, q, guard=guard)        # a `Step`: ZOStep or FOStep

Who builds what: `make_trainable` the trainable set; `ZOStep` its SPSA (with the sparse mask and
the noise stream), its estimator (`estimators.build_estimator`) and its update rule; `FOStep`
AdamW. The guard and the query schedule belong to the caller and are passed in, never assigned."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adazeta.config import AdapterConfig, Head, MethodConfig, Optimizer, TrainableSet, ZOConfig
from adazeta.config import Estimator as EstimatorKind
from adazeta.errors import ConfigError
from adazeta.params import LOW_PRECISION, Trainable
from adazeta.step import (  # noqa: F401  (StepResult, Guard, Step, FLOAT32_MAX: re-exported, their old home)
    FLOAT32_MAX,
    GROUPED_SETS,
    UPDATE_SCALE,
    Guard,
    LossFn,
    RuleStep,
    Step,
    StepResult,
    check_update_fits,
    weight_norm,
)
from adazeta.trainable.sets import make_trainable
from adazeta.zo.estimators import Estimator, EstimatorFactory, build_estimator
from adazeta.zo.fzoo import FZOOStep
from adazeta.zo.hizoo import HiZOOStep
from adazeta.zo.lozo import LOZOStep
from adazeta.zo.sparse import SparseMask
from adazeta.zo.spsa import SPSA, query_seed
from adazeta.zo.updates import ADAM_RULES, RULES


@dataclass
class Method:
    model: torch.nn.Module
    trainables: list[Trainable]
    step: Step


class ZOStep(RuleStep):
    """Q queries of two-sided SPSA, then the update rule:

        seeds -> estimate -> guard -> update rule

    composed once, here, from the config: the SPSA over the trainable set (z from the noise stream,
    adazeta/zo/noise.py; Sparse-MeZO's mask), the estimator (sequential, in-forward, parallel
    replicas, sharded over ranks: adazeta/zo/estimators.py), the update rule (adazeta/zo/updates.py).
    Nothing of it is replaced afterwards. The estimator returns only scalars; the guard, passed to
    each call, sees the step's losses and projected gradients before any weight is written.

    Fused restore (`zo.fused_update`, plain SGD or sign rules, an estimator that can defer the
    restore): the sequential estimate leaves the last query's weights at theta - eps z
    (`spsa.displaced`), and the update folds the restore into its own pass over that z. Whatever
    stops the step in between (the guard, an error) restores the weights instead. Under
    torch.distributed the queries of a step are split across ranks, so every query restores on its
    own and no rank fuses.

    `writes` is the record of the in-place perturbations (seed, scale) the last step's estimate
    made, in order (SPSA tells the step of each: `on_perturb`): the replay log keeps it, because
    float addition does not undo exactly and the weights after a step carry those round trips."""

    def __init__(
        self, model, trainables: list[Trainable], cfg: MethodConfig, seed: int, zo: ZOConfig | None = None,
        dist=None, estimator: EstimatorFactory | None = None,
    ):
        zo = zo if zo is not None else ZOConfig()
        mask = None
        if cfg.trainable == TrainableSet.sparse:
            mask = SparseMask(trainables, cfg.mask.value, cfg.sparsity, cfg.keep_ratio)
        # Adapter, LoRA and prefix sets (many small tensors: 1,344 for AdaZeta on Llama-2-7B) live in one
        # flat buffer per (device, dtype, decay) group, so a pass draws z with one RNG call per
        # group, not one per tensor. Full-parameter sets keep a z per tensor: flattening a model's
        # weights would copy them, and the in-forward perturbation regenerates one layer's z.
        group = cfg.trainable in GROUPED_SETS
        self.writes: list[tuple[int, float]] = []
        self.recording = False  # True while the estimate runs: its in-place writes go into `writes`
        self.spsa = SPSA(trainables, cfg.eps, mask=mask, group=group, on_perturb=self.observe)
        in_forward = functional_perturbation(trainables, cfg)
        self.mask, self.in_place_masks = mask, mask is not None and not in_forward
        self.estimator: Estimator = build_estimator(model, self.spsa, cfg, zo, in_forward, dist, estimator)
        kwargs = {}
        if cfg.update_rule.value == "momentum":
            kwargs = {"momentum": cfg.momentum}
        elif cfg.update_rule.value in ADAM_RULES:
            kwargs = {"betas": tuple(cfg.betas), "adam_eps": cfg.adam_eps}
        self.rule = RULES[cfg.update_rule.value](self.spsa, cfg.lr, cfg.weight_decay, **kwargs)
        self.update_scale = UPDATE_SCALE[cfg.update_rule.value]
        self.numel = sum(t.param.numel() for t in trainables)
        self.norm: float | None = None  # of the trainables, measured at the first guarded step
        self.seed = seed
        self.fuse = zo.fused_update and self.rule.fusable and self.estimator.can_defer_restore

    @property
    def writes_weights(self) -> bool:
        """Whether the estimate perturbs the weights in place (+eps z, -2 eps z, +eps z). Float
        addition does not undo exactly, so the weights after a step carry the rounding of the
        queries it ran: a query-parallel rank replays the others' round trips to round as one
        process would, and the replay log records them."""
        return self.estimator.writes_weights

    def observe(self, seed: int, scale: float) -> None:
        """SPSA's `on_perturb`: record the in-place writes of the estimate (not the update's restores)."""
        if self.recording:
            self.writes.append((seed, scale))

    def __call__(self, loss_fn: LossFn, step: int, q: int, guard: Guard | None = None) -> StepResult:
        """Step `step` (counted from 1) with q queries, seeds query_seed(seed, step, 0..q-1)."""
        seeds = [query_seed(self.seed, step, i) for i in range(q)]
        return self.run(self.estimator, loss_fn, step, seeds, guard)

    def run(
        self, estimate: Estimator, loss_fn: LossFn, step: int, seeds: list[int], guard: Guard | None = None
    ) -> StepResult:
        """The step with a given estimate of the seeds' projected gradients: the method's own
        (`__call__`), or one that repeats a logged step (adazeta-replay)."""
        q = len(seeds)
        if self.in_place_masks:
            self.mask.store(self.spsa.trainables)  # from the unperturbed weights of this step
        try:
            self.writes, self.recording = [], True
            try:
                results = estimate(loss_fn, seeds, defer_restore=self.fuse).tolist()  # the step's one host sync
            finally:
                self.recording = False
            grads, losses = [g for g, _ in results], [loss for _, loss in results]
            if guard is not None:
                guard(step, losses, grads)
                if self.norm is None:
                    self.norm = weight_norm(self.spsa.trainables)
                if self.norm > 0:
                    ratio = self.rule.lr * self.update_scale(grads) * self.numel**0.5 / self.norm
                    guard.check_update(step, ratio, self.rule.lr, grads)
            check_update_fits(step, self.rule.lr, grads)
            if self.spsa.displaced and self.rule.fusable:  # the weights sit at theta - eps z_last
                coeffs = self.rule.coefficients(grads)
                self.spsa.sgd_update(seeds, coeffs, self.rule.lr, self.rule.wd, restore=True)
                extra = 0
            else:
                self.spsa.restore()
                extra = self.rule.apply(seeds, grads, loss_fn)
        finally:
            self.spsa.restore()  # a no-op, unless the step stopped (guard, error) with the weights displaced
            if self.in_place_masks:
                self.mask.release()
        return StepResult(sum(losses) / q, sum(grads) / q, 2 * q + extra, seeds, grads)


def functional_perturbation(trainables: list[Trainable], cfg: MethodConfig) -> bool:
    """Whether the estimate perturbs the weights inside each layer's forward (never writing them)
    rather than in place: Sparse-MeZO with method.in_forward=true, and any full-parameter method
    whose weights are bf16/fp16, where an in-place +eps z / -2 eps z / +eps z round trip leaves
    rounding drift of the order of an ulp per query (scripts/bf16_zo.py), more than the updates move."""
    low = [t for t in trainables if t.param.dtype in LOW_PRECISION]
    if cfg.trainable == TrainableSet.sparse and cfg.in_forward:
        return True
    if not low:
        return False
    if cfg.trainable == TrainableSet.full:
        return True
    kind = f"{cfg.trainable.value} (method.in_forward=false)" if cfg.trainable == TrainableSet.sparse else cfg.trainable.value
    raise ConfigError(
        f"method={cfg.name} perturbs its trainable set {kind} in place, and {len(low)} of its tensors are "
        f"{low[0].param.dtype} (e.g. {low[0].name}): a rounded +eps z / -2 eps z / +eps z round trip does not "
        "restore them. Use method.in_forward=true (perturbation inside the forward), or model.dtype=float32"
    )


class FOStep:
    """Backprop through the loss and one AdamW step (the first-order references)."""

    def __init__(self, model, trainables: list[Trainable], cfg: MethodConfig):
        groups = [
            {"params": [t.param for t in trainables if t.decay], "weight_decay": cfg.weight_decay},
            {"params": [t.param for t in trainables if not t.decay], "weight_decay": 0.0},
        ]
        self.model = model
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = value

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """AdamW's state: its tensors as `opt.<param>.<name>`, the rest as JSON scalars."""
        sd = self.opt.state_dict()
        tensors, per_param = {}, {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{i}.{k}"] = v
                else:
                    per_param.setdefault(str(i), {})[k] = v
        return tensors, {"lr": self.lr, "param_groups": sd["param_groups"], "state": per_param}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        for i, st in scalars["state"].items():
            state.setdefault(int(i), {}).update(st)
        groups = [{**g, "betas": tuple(g["betas"])} for g in scalars["param_groups"]]
        self.opt.load_state_dict({"state": state, "param_groups": groups})

    def __call__(self, loss_fn: LossFn, step: int, q: int, guard: Guard | None = None) -> StepResult:
        """One forward and backward; `guard` sees the loss before backward: a bad loss moves no weight."""
        self.model.train()  # dropout on, as in ordinary fine-tuning
        with torch.enable_grad():
            loss = loss_fn()
            if guard is not None:
                try:
                    guard(step, [float(loss.detach())], [])
                finally:
                    self.model.eval()
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.eval()
        return StepResult(float(loss.detach()), None, 1)


# The estimators whose noise is not SPSA's Gaussian z, each a step of its own (its own perturbation
# and update passes), with the Step protocol and the guard of ZOStep.
OWN_STEPS = {EstimatorKind.fzoo: FZOOStep, EstimatorKind.lozo: LOZOStep, EstimatorKind.hizoo: HiZOOStep}


def build_method(
    model, cfg: MethodConfig, adapter: AdapterConfig, head: Head, seed: int, zo: ZOConfig | None = None,
    dist=None, estimator: EstimatorFactory | None = None,
) -> Method:
    """The method of `cfg` on `model`. `zo` (default: ZOConfig()) configures the ZO estimator;
    `dist` (an adazeta.zo.sharded.Dist; None or a world of 1: one process) shares its queries
    across torchrun ranks; `estimator` (a factory (model, spsa) -> estimator, adazeta/zo/estimators.py)
    replaces the configured one. First-order methods have no queries: they ignore zo.fused_update
    and zo.max_replicas, and refuse zo.parallel_queries=true rather than silently run sequentially."""
    if cfg.optimizer == Optimizer.fo and cfg.trainable == TrainableSet.sparse:
        raise ConfigError(
            "method.trainable=sparse is Sparse-MeZO's perturbation mask and needs method.optimizer=zo; "
            "for first-order training use trainable=full, lora, tt_adapter or prefix"
        )
    model, trainables = make_trainable(model, cfg, adapter, head)
    if cfg.optimizer == Optimizer.fo:
        if zo is not None and zo.parallel_queries:
            raise ConfigError(
                f"zo.parallel_queries=true runs the perturbed forwards of ZO queries side by side; "
                f"method={cfg.name} is first-order (one forward and backward per step, no queries). "
                "Use a ZO method (adazeta, mezo_lora) or set zo.parallel_queries=false"
            )
        step = FOStep(model, trainables, cfg)
    elif cfg.estimator == EstimatorKind.spsa:
        step = ZOStep(model, trainables, cfg, seed, zo, dist=dist, estimator=estimator)
    else:
        if estimator is not None:
            raise ConfigError(
                f"an estimator factory replaces two-sided SPSA's estimate; method.estimator={cfg.estimator.value} "
                "is a step of its own. Use method.estimator=spsa with a factory"
            )
        step = OWN_STEPS[cfg.estimator](model, trainables, cfg, seed, zo if zo is not None else ZOConfig())
    return Method(model=model, trainables=trainables, step=step)
