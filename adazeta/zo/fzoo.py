"""FZOO: batched one-sided Rademacher estimates with a step normalised by the losses' std.

Dang, Guo, Zhao, Ye, Zheng, Dai, Tsang, "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large
Language Models towards Adam-Scale Speed" (arXiv 2506.09034, ICLR 2026); public code DKmiyan/FZOO
(trainer.py, `zo_step` / `zo_update`). Per step, on one batch B, with N = method.fzoo.n x the query
schedule's Q perturbations u_i whose entries are independent +-1 (Rademacher):

    l_0 = L(theta; B),   l_i = L(theta + eps u_i; B)                 (N + 1 forward passes)
    sigma = sqrt((1/N) sum_i (l_i - mean_j l_j)^2)                  (population std of the l_i)
    g_i = (l_i - l_0) / (N sigma)
    theta <- theta - lr * (sum_i g_i u_i + wd * theta)              (wd skipped for biases, norms)

Since l_i - l_0 ~ eps u_i . grad and sigma ~ eps ||grad|| (u_i . grad has variance ||grad||^2),
the step is about lr * (1/N) sum_i (u_i . grad / ||grad||) u_i: normalised SGD (the paper's
Theorem), so lr sets the step length in weight space whatever the loss's scale: an update moves
the weights by about lr * sqrt(n / N) for n trainable values.

Where this follows the code rather than the paper's equations: the paper writes
g = (1 / (eps N)) sum_i (l_i - l_0) u_i and theta <- theta - eta g / sigma with the unbiased std
(1/(N-1)); the released trainer divides by N sigma_population without 1/eps. The two differ by a
constant, eta = lr * eps * sqrt(N / (N-1)); method.lr here is the code's learning rate (the one
its scripts set: 1e-5 by default, 5e-5 with eps 1e-4 on OPT-13B).

Deviations, all for robustness or exactness:
- sigma = 0 (every perturbed loss equal, e.g. eps below the loss's float resolution) gives g = 0
  and no move; the reference divides by zero and writes NaN into every weight.
- u_i is drawn from an explicit generator seeded by tensor_seed(query_seed(seed, step, i), unit),
  never the global RNG, so a resumed run redraws the same u (the reference draws
  torch.randint under torch.manual_seed(np.random.randint(...))).
- The last perturbation's restore is folded into the update's pass over u_N (zo.fused_update), as
  for SPSA: p <- d (p - eps u_N) - lr sum_i g_i u_i, one pass over the weights fewer.
- Queries run one after another; the paper's batched forward of the N perturbations (one CUDA
  kernel over N weight copies, ParallelOPTForCausalLM) is not implemented: zo.parallel_queries
  is refused (SUPPORTS, checked when the method is built). So are torch.distributed, the replay
  log and low-precision trainable weights (an in-place +eps u / -eps u round trip does not restore
  bf16 weights).

Rademacher signs are drawn as random 64-bit words whose bytes are expanded through a 256 x 8 table
of +-1 (64 signs per random draw): on CPU about a tenth of the time of a normal_ over the same
values. A step still draws every u three times (perturb, restore, update: 3N draws over the weights
for N + 1 forwards), which on CPU is most of a full-parameter step; the restore of u_i and the
perturbation by u_(i+1) share one pass over the weights.
"""

from __future__ import annotations

import math

import torch

from adazeta.config import MethodConfig, TrainableSet, Update, ZOConfig
from adazeta.errors import ConfigError
from adazeta.params import Trainable
from adazeta.step import (
    GROUPED_SETS,
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
from adazeta.zo.noise import chunk_bounds, query_seed, tensor_seed
from adazeta.zo.spsa import group_trainables
from adazeta.zo.updates import UpdateRule

# The trainable sets FZOO composes with (the paper: full parameters, LoRA and prefix tuning).
FZOO_SETS = (TrainableSet.full, *GROUPED_SETS)


class Rademacher:
    """Perturbations u ~ Rademacher (entries +-1) over a fixed, ordered list of trainable tensors,
    regenerated from a seed whenever needed and never stored whole.

    Each unit (a tensor, or with group=True one flat buffer per (device, dtype, decay) group, as
    SPSA does for adapter and LoRA sets) draws its u from its own generator seeded by
    tensor_seed(seed, index of its first tensor), in the fixed chunks of `chunk_bounds`, so a pass
    allocates nothing parameter-sized."""

    def __init__(self, trainables: list[Trainable], group: bool = False):
        self.trainables = trainables
        if group:
            self.units, _, _, members = group_trainables(trainables)
            self.unit_seed = [ix[0] for ix in members]
        else:
            self.units, self.unit_seed = trainables, list(range(len(trainables)))
        self.generators: dict[torch.device, list[torch.Generator]] = {}
        self.tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def gens(self, device: torch.device, n: int) -> list[torch.Generator]:
        have = self.generators.setdefault(device, [])
        while len(have) < n:
            have.append(torch.Generator(device=device))
        return have[:n]

    def table(self, p: torch.Tensor) -> torch.Tensor:
        """Row b: the 8 signs of byte b (bit k set: +1)."""
        key = (p.device, p.dtype)
        if key not in self.tables:
            bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
            self.tables[key] = (bits * 2 - 1).to(device=p.device, dtype=p.dtype)
        return self.tables[key]

    def buffer(self, p: torch.Tensor, numel: int) -> torch.Tensor:
        key = (p.device, p.dtype)
        if key not in self.buffers or self.buffers[key].numel() < numel:
            self.buffers[key] = torch.empty(numel, device=p.device, dtype=p.dtype)
        return self.buffers[key][:numel]

    def draw(self, p: torch.Tensor, n: int, gen: torch.Generator, out: torch.Tensor) -> torch.Tensor:
        """The next n signs of `gen` into out[:n]: 64 signs per random 64-bit word, each byte of it
        expanded through the table (out needs room for n rounded up to a multiple of 64)."""
        words = (n + 63) // 64
        # random_(-2**63, None): every bit of the word (random_() without bounds leaves the top bit 0)
        raw = torch.empty(words, device=p.device, dtype=torch.int64).random_(-(2**63), None, generator=gen)
        signs = out[: 64 * words].view(8 * words, 8)
        torch.index_select(self.table(p), 0, raw.view(torch.uint8).long(), out=signs)
        return out[:n]

    @torch.no_grad()
    def u(self, index: int, seed: int) -> torch.Tensor:
        """u(seed) over unit `index`, whole (tests and small tensors)."""
        p = self.units[index].param
        gen = self.gens(p.device, 1)[0].manual_seed(tensor_seed(seed, self.unit_seed[index]))
        out = torch.empty(p.numel() + 64, device=p.device, dtype=p.dtype)
        parts = [self.draw(p, b - a, gen, out[a:])[: b - a].clone() for a, b in chunk_bounds(p.numel())]
        return torch.cat(parts).view_as(p)

    @torch.no_grad()
    def add(
        self, seeds: list[int], coeffs: list[float], factor: float = 1.0, decayed: list[float] | None = None,
    ) -> None:
        """One pass over the weights: p <- f p + sum_k c_k u(seed_k), with f = `factor` and
        c = `decayed` (default `coeffs`) where weight decay applies, f = 1 and c = `coeffs` elsewhere."""
        decayed = coeffs if decayed is None else decayed
        for i, t in enumerate(self.units):
            f, cs = (factor, decayed) if t.decay else (1.0, coeffs)
            p = t.param
            gens = self.gens(p.device, len(seeds))
            for gen, seed in zip(gens, seeds, strict=True):
                gen.manual_seed(tensor_seed(seed, self.unit_seed[i]))
            flat = p.view(-1)
            bounds = chunk_bounds(p.numel())
            buf = self.buffer(p, max(b - a for a, b in bounds) + 64)
            for a, b in bounds:  # each chunk of u is added while it is in cache
                dst = flat[a:b]
                if f != 1.0:
                    dst.mul_(f)
                for gen, c in zip(gens, cs, strict=True):
                    dst.add_(self.draw(p, b - a, gen, buf), alpha=c)


class FZOOStep(RuleStep):
    """One FZOO step (module docstring): l_0, then the N perturbed losses one after another, then
    guard, then the normalised update in one pass over the weights. A `Step` (adazeta/step.py): `rule`
    holds lr and weight decay."""

    def __init__(
        self, model, trainables: list[Trainable], cfg: MethodConfig, seed: int, zo: ZOConfig, dist=None,
    ):
        if cfg.fzoo.n < 2:
            raise ConfigError(f"method.fzoo.n={cfg.fzoo.n}: FZOO normalises by the std of the N perturbed losses, "
                              "so it needs N >= 2 (the paper uses 8)")
        self.trainables, self.n, self.eps, self.seed = trainables, cfg.fzoo.n, cfg.eps, seed
        self.noise = Rademacher(trainables, group=cfg.trainable in GROUPED_SETS)
        self.rule = UpdateRule(None, cfg.lr, cfg.weight_decay)  # lr and wd; no state tensors
        self.fuse = zo.fused_update
        self.numel = sum(t.param.numel() for t in trainables)
        self.norm: float | None = None  # of the trainables, measured at the first guarded step

    @staticmethod
    def coefficients(l0: float, losses: list[float]) -> list[float]:
        """g_i = (l_i - l_0) / (N sigma), sigma the population std of the l_i; all 0 if sigma = 0."""
        n = len(losses)
        mean = sum(losses) / n
        sigma = math.sqrt(sum((v - mean) ** 2 for v in losses) / n)
        if not math.isfinite(sigma):
            return [math.nan] * n  # the guard names the bad loss
        if sigma == 0.0:
            return [0.0] * n
        return [(v - l0) / (n * sigma) for v in losses]

    def cuda_buffers(self, target_dtype: str, kept: set[int]) -> list[CudaBuffer]:
        """None: Rademacher draws each unit's u in the fixed chunks of `chunk_bounds` on every device, into
        the same buffers: a CPU measurement holds what CUDA allocates."""
        return []

    @torch.no_grad()
    def __call__(self, loss_fn: LossFn, step: int, q: int, guard: Guard | None = None) -> StepResult:
        n = self.n * q
        seeds = [query_seed(self.seed, step, i) for i in range(n)]
        eps, lr, wd = self.eps, self.rule.lr, self.rule.wd
        displaced = None  # the seed whose +eps u the weights still carry
        try:
            values = [loss_fn().double()]
            for s in seeds:  # one pass: restore the previous u, perturb by this one
                before = [] if displaced is None else [displaced]
                self.noise.add([*before, s], [-eps] * len(before) + [eps])
                displaced = s
                values.append(loss_fn().double())
            if not self.fuse:
                self.noise.add([displaced], [-eps])
                displaced = None
            l0, *losses = torch.stack(values).double().tolist()  # the step's one host sync
            grads = self.coefficients(l0, losses)
            if guard is not None:
                guard(step, [l0, *losses], grads)
                if self.norm is None:
                    self.norm = weight_norm(self.trainables)
                if self.norm > 0:  # u_i are near-orthogonal, |u_i| = sqrt(n)
                    scale = math.sqrt(sum(g * g for g in grads))
                    guard.check_update(step, lr * scale * self.numel**0.5 / self.norm, lr, grads)
            check_update_fits(step, lr, grads)
            d = 1.0 - lr * wd
            plain = [-lr * g for g in grads]
            decayed = list(plain)
            if displaced is not None:  # fold the restore of the last perturbation into the update
                plain[-1] -= eps
                decayed[-1] -= d * eps
                displaced = None
            self.noise.add(seeds, plain, factor=d, decayed=decayed)
        finally:
            if displaced is not None:  # the step stopped (guard, error) with the weights displaced
                self.noise.add([displaced], [-eps])
        return StepResult(l0, sum(grads) / n, n + 1, seeds, grads)


# One process, queries one after another, weights perturbed in place (float32 only), no replay log.
SUPPORTS = Supports(trainable=FZOO_SETS, update_rules=(Update.sgd,))
register_step("fzoo", FZOOStep, SUPPORTS)
