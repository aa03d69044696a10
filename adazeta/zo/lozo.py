"""LOZO and LOZO-M: two-sided SPSA with low-rank perturbations U V^T, V resampled lazily.

Chen, Zhang, Cao, Yuan, Wen, "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures" (arXiv 2410.07698, ICLR 2025); public code optsuite/LOZO (LOZOtrainer.py,
`lowrank_zo_perturb_parameters`, `lowrank_zo_step`, `lowrank_zo_update`,
`lowrank_zo_update_momentum`). For each weight matrix W (m x n) of the trainable set, at step t:

    U_t ~ N(0, I) of shape m x r, new every step (and every query);
    V_k ~ N(0, I) of shape n x r, new every nu steps: k = floor((t - 1) / nu)     (lazy sampling)
    Z = U_t V_k^T;   g = (L(theta + eps Z) - L(theta - eps Z)) / (2 eps)         (the paper's eq. 4)
    LOZO:    W <- W - lr (g U_t V_k^T + wd W)
    LOZO-M:  M <- beta M + (1 - beta) g U_t   (m x r: the momentum lives in the low-rank space)
             W <- W - lr (M V_k^T + wd W)
             at a new V (k -> k + 1): M <- beta M V_k^T V_{k+1} / n + (1 - beta) g U_t
             (the old momentum re-expressed on the new subspace), and M <- g U_t at the first step.

Tensors that are not matrices (biases, norm weights) get an ordinary Gaussian z of their own shape,
as in the reference code; with LOZO-M their momentum is full-size (they are small). Q queries per
step (the query schedule; the paper uses 1) share V_k and average: g U becomes (1/Q) sum_q g_q U_q.
method.update_rule selects the variant: sgd (LOZO) or momentum (LOZO-M, beta = method.momentum).

The perturbation is written in place with one addmm per matrix (W += c U V^T: no m x n temporary),
so memory stays at inference plus U and V (and M for LOZO-M): (m + n) r values per matrix.

Deviations from the reference code, for exactness: U, V and z come from explicit generators seeded
by pure functions of (seed, step, query, tensor) and (seed, k, tensor), never the global RNG, so V
is regenerated rather than stored and a resumed run draws exactly the same noise; the update folds
in the last query's restore (W <- d (W + eps U V^T) - lr D V^T in one addmm) when zo.fused_update is
on. A tensor with more than two dimensions gets a Gaussian z (the reference would fail on it).
Not supported (SUPPORTS, refused by key when the method is built): zo.parallel_queries,
torch.distributed, the replay log, bf16/fp16 trainable weights, and trainable sets other than full.
"""

from __future__ import annotations

import math

import torch

from adazeta.config import MethodConfig, TrainableSet, Update, ZOConfig
from adazeta.errors import ConfigError
from adazeta.params import Trainable
from adazeta.step import (
    CudaBuffer,
    Guard,
    LossFn,
    RuleStep,
    StepResult,
    Supports,
    check_update_fits,
    register_step,
    weight_norm,
)
from adazeta.zo.noise import query_seed, splitmix64, tensor_seed
from adazeta.zo.updates import UpdateRule

V_TAG = 0x4C4F5A4F56  # "LOZOV": V's seeds are a stream of their own, apart from every query seed


def v_seed(seed: int, block: int) -> int:
    """The seed of V_k: a pure function of (run seed, k)."""
    return splitmix64(query_seed(seed, block, 0) ^ V_TAG) & ((1 << 63) - 1)


class LowRank:
    """Low-rank perturbations over a fixed, ordered list of trainable tensors: U V^T for matrices,
    a Gaussian z for the rest, all regenerated from seeds (V cached for the current k)."""

    def __init__(self, trainables: list[Trainable], rank: int, seed: int):
        self.trainables, self.rank, self.seed = trainables, rank, seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.cached: dict[int, list[torch.Tensor | None]] = {}  # k -> V_k per tensor (None: not a matrix)

    def is_matrix(self, i: int) -> bool:
        return self.trainables[i].param.dim() == 2

    def gen(self, p: torch.Tensor, seed: int) -> torch.Generator:
        g = self.generators.get(p.device)
        if g is None:
            g = self.generators[p.device] = torch.Generator(device=p.device)
        return g.manual_seed(seed)

    def vs(self, block: int) -> list[torch.Tensor | None]:
        """V_k (n x r) of every matrix; the current and the previous k are kept."""
        if block not in self.cached:
            s = v_seed(self.seed, block)
            self.cached[block] = [
                torch.randn(t.param.shape[1], self.rank, generator=self.gen(t.param, tensor_seed(s, i)),
                            device=t.param.device, dtype=t.param.dtype) if self.is_matrix(i) else None
                for i, t in enumerate(self.trainables)
            ]
            for old in [k for k in self.cached if k < block - 1]:
                del self.cached[old]
        return self.cached[block]

    def u(self, i: int, seed: int) -> torch.Tensor:
        """U (m x r) of matrix i for query seed `seed`; for another tensor, its Gaussian z."""
        p = self.trainables[i].param
        shape = (p.shape[0], self.rank) if self.is_matrix(i) else p.shape
        return torch.randn(shape, generator=self.gen(p, tensor_seed(seed, i)), device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def perturb(self, block: int, seed: int, scale: float) -> None:
        """theta <- theta + scale * (U V_k^T, or z)."""
        vs = self.vs(block)
        for i, t in enumerate(self.trainables):
            u = self.u(i, seed)
            if vs[i] is not None:
                t.param.addmm_(u, vs[i].t(), alpha=scale)
            else:
                t.param.add_(u, alpha=scale)

    def direction(self, i: int, seeds: list[int], coeffs: list[float]) -> torch.Tensor:
        """sum_q c_q U_q (m x r) of a matrix, or sum_q c_q z_q of another tensor, in float32."""
        p = self.trainables[i].param
        out = None
        for seed, c in zip(seeds, coeffs, strict=True):
            u = self.u(i, seed).float()
            out = u.mul_(c) if out is None else out.add_(u, alpha=c)
        return out if out is not None else torch.zeros((p.shape[0], self.rank) if self.is_matrix(i) else p.shape)


class LOZOMomentum(UpdateRule):
    """LOZO-M's state: M (m x r, float32) per matrix, a full-size m per other tensor, the number of
    updates applied (`t`) and the k whose V the Ms are expressed on (`block`)."""

    def __init__(self, low: LowRank, lr: float, weight_decay: float, beta: float):
        super().__init__(None, lr, weight_decay)
        self.low, self.beta, self.t, self.block = low, beta, 0, 0
        shapes = [(t.param.shape[0], low.rank) if low.is_matrix(i) else t.param.shape
                  for i, t in enumerate(low.trainables)]
        self.m = [torch.zeros(s, device=t.param.device, dtype=torch.float32)
                  for s, t in zip(shapes, low.trainables, strict=True)]

    def buffers(self) -> dict[str, torch.Tensor]:
        return {f"m.{i}": m for i, m in enumerate(self.m)}

    def state_dict(self):
        tensors, scalars = super().state_dict()
        return tensors, {**scalars, "t": self.t, "block": self.block}

    def load_state_dict(self, tensors, scalars) -> None:
        super().load_state_dict(tensors, scalars)
        self.t, self.block = scalars["t"], scalars["block"]

    @torch.no_grad()
    def advance(self, i: int, block: int, d: torch.Tensor) -> torch.Tensor:
        """M <- its LOZO-M update with this step's direction d = (1/Q) sum_q g_q U_q."""
        m, b = self.m[i], self.beta
        if self.t == 0:
            return m.copy_(d)
        if block != self.block and self.low.is_matrix(i):  # a new V: carry M over to it
            v_old, v_new = self.low.vs(self.block)[i].float(), self.low.vs(block)[i].float()
            m.copy_(m @ (v_old.t() @ v_new) / v_old.shape[0])
        return m.mul_(b).add_(d, alpha=1 - b)


class LOZOStep(RuleStep):
    """One LOZO(-M) step (module docstring): Q two-sided queries with U V_k^T, guard, then the
    update. A `Step` (adazeta/step.py): `rule` holds lr, wd and LOZO-M's momentum."""

    def __init__(
        self, model, trainables: list[Trainable], cfg: MethodConfig, seed: int, zo: ZOConfig, dist=None,
    ):
        if cfg.lozo.rank < 1 or cfg.lozo.interval < 1:
            raise ConfigError(f"method.lozo.rank={cfg.lozo.rank}, method.lozo.interval={cfg.lozo.interval}: both "
                              "must be >= 1")
        self.trainables, self.eps, self.seed, self.interval = trainables, cfg.eps, seed, cfg.lozo.interval
        self.low = LowRank(trainables, cfg.lozo.rank, seed)
        if cfg.update_rule.value == "momentum":
            self.rule = LOZOMomentum(self.low, cfg.lr, cfg.weight_decay, cfg.momentum)
        else:
            self.rule = UpdateRule(None, cfg.lr, cfg.weight_decay)
        self.fuse = zo.fused_update
        # |U V^T|_F^2 ~ r m n: an update moves the weights by about lr |g| sqrt(r n_values)
        self.numel = sum(t.param.numel() * (cfg.lozo.rank if t.param.dim() == 2 else 1) for t in trainables)
        self.norm: float | None = None

    def cuda_buffers(self, target_dtype: str, kept: set[int]) -> list[CudaBuffer]:
        """None: U, V and z are drawn whole per tensor on every device, and V cached: a CPU measurement holds what CUDA allocates."""
        return []

    @torch.no_grad()
    def __call__(self, loss_fn: LossFn, step: int, q: int, guard: Guard | None = None) -> StepResult:
        block = (step - 1) // self.interval
        seeds = [query_seed(self.seed, step, i) for i in range(q)]
        eps, lr, low = self.eps, self.rule.lr, self.low
        displaced = None  # (seed, s): the weights sit at theta + s eps U V^T
        try:
            pairs = []
            for k, s in enumerate(seeds):
                low.perturb(block, s, eps)
                plus = loss_fn().double()
                low.perturb(block, s, -2 * eps)
                displaced = (s, -1.0)
                pairs.append(torch.stack([plus, loss_fn().double()]))
                if k < q - 1 or not self.fuse:
                    low.perturb(block, s, eps)
                    displaced = None
            values = torch.stack(pairs).double().tolist()  # the step's one host sync
            grads = [(a - b) / (2 * eps) for a, b in values]
            losses = [(a + b) / 2 for a, b in values]
            if guard is not None:
                guard(step, losses, grads)
                if self.norm is None:
                    self.norm = weight_norm(self.trainables)
                if self.norm > 0:
                    scale = math.sqrt(sum(g * g for g in grads)) / q
                    guard.check_update(step, lr * scale * self.numel**0.5 / self.norm, lr, grads)
            check_update_fits(step, lr, grads)
            self.update(block, seeds, grads, displaced)
            displaced = None
        finally:
            if displaced is not None:  # the step stopped (guard, error) with the weights displaced
                low.perturb(block, displaced[0], -displaced[1] * eps)
        return StepResult(sum(losses) / q, sum(grads) / q, 2 * q, seeds, grads)

    @torch.no_grad()
    def update(self, block: int, seeds: list[int], grads: list[float], displaced) -> None:
        """theta <- d (theta - s eps U_last V^T) - lr (D or M) V^T per matrix (D = (1/Q) sum g_q U_q),
        the same with z for the other tensors; d = 1 - lr wd where weight decay applies."""
        lr, wd, q, eps, low = self.rule.lr, self.rule.wd, len(seeds), self.eps, self.low
        vs = low.vs(block)
        momentum = isinstance(self.rule, LOZOMomentum)
        for i, t in enumerate(self.trainables):
            p = t.param
            d = 1.0 - lr * wd if t.decay else 1.0
            direction = low.direction(i, seeds, [g / q for g in grads])
            if momentum:
                direction = self.rule.advance(i, block, direction)
            step = direction.mul(-lr)
            if displaced is not None:  # undo s eps U_last: its term is -d s eps U_last
                seed, s = displaced
                step.add_(low.u(i, seed).float(), alpha=-d * s * eps)
            if d != 1.0:
                p.mul_(d)
            if vs[i] is not None:
                p.addmm_(step.to(p.dtype), vs[i].t())
            else:
                p.add_(step.to(p.dtype))
        if momentum:
            self.rule.t, self.rule.block = self.rule.t + 1, block


# One process, queries one after another, weights perturbed in place (float32 only), no replay log.
SUPPORTS = Supports(trainable=(TrainableSet.full,), update_rules=(Update.sgd, Update.momentum))
register_step("lozo", LOZOStep, SUPPORTS)
