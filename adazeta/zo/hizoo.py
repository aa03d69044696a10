"""HiZOO: two-sided SPSA along Sigma^(-1/2) z, with Sigma a diagonal Hessian estimate.

Zhao, Dang, Ye, Dai, Qian, Tsang, "Second-Order Fine-Tuning without Pain for LLMs: A Hessian
Informed Zeroth-Order Optimizer" (arXiv 2402.15173, ICLR 2025); public code Yanjun-Zhao/HiZOO
(trainer.py: `zo_Hessian_step_update`, `efficient_Hessian_perturb_parameters`). Sigma has the shape
of the trainable set and starts at ones. Per step, on one batch, with z_q ~ N(0, I) read from the
noise stream (adazeta/zo/noise.py) for query seed s_q, and D = Sigma^(-1/2) elementwise:

    L0   = L(theta)                                                       (1 forward)
    L+_q = L(theta + eps D z_q),   L-_q = L(theta - eps D z_q)            (2 forwards per query)
    g_q  = (L+_q - L-_q) / (2 eps)                the derivative along D z_q
    h_q  = |L+_q + L-_q - 2 L0| / (2 eps^2)       the curvature along D z_q, over 2 (as the code)
    Sigma <- (1 - alpha) Sigma + alpha (1/Q) sum_q h_q Sigma z_q^2       (alpha = method.hizoo.alpha)
    theta <- (1 - lr wd) theta - lr (1/Q) sum_q g_q Sigma^(-1/2) z_q      (the updated Sigma)

Sigma z_q^2 is the diagonal of Sigma^(1/2) z z^T Sigma^(1/2) (the form the brief and the paper's
Algorithm give). Sigma is the code's `Hessian_matrix`: it estimates the Hessian's diagonal, and the
perturbation divides by its square root. The equations here were settled against the code
(trainer.py, lines 475-517 of the stored snapshot); the paper's equation numbers were not checked
against its text, which was not at hand. A step costs 2Q + 1 forward passes; its state
is Sigma, one extra copy of the trainable set (in the trainables' dtype, fp32: 4 bytes per
trainable value; 0.5 GiB for SmolLM2-135M's full set), saved in every checkpoint (`state_dict`),
so a resumed run continues bit for bit.

What Sigma converges to. On a quadratic 0.5 x^T H x with H = diag(H_i) over d values,
L+ + L- - 2 L0 = eps^2 sum_j (H_j / Sigma_j) z_j^2 exactly, and E[z_j^2 z_i^2] = 1 + 2 [i = j], so
the mean of the moving average has one fixed point, Sigma_i = (d + 2) / 2 * H_i: proportional to
the Hessian's diagonal (which is what the preconditioner needs) but (d + 2) / 2 times it, because
the estimate keeps z z^T where an unbiased one would use z z^T - I (tests/zo/test_hizoo.py checks this
fixed point). The factor only rescales lr and eps; at the reference's alpha (1e-8) Sigma moves by
about alpha h per step and stays near its initial ones for a run's length.

Deviations from the reference code, all deliberate:
- Q queries per step (the query schedule): the code has Q = 1. All Q perturbations use the same
  Sigma (the step's old one); the Hessian term and the update average over the queries. With
  Q = 1 the equations above are the code's.
- The logged loss (StepResult.loss, train/loss) is L0, the loss at theta before the update; the
  code logs a fourth forward after the update (L(theta_{t+1})), which is not paid here: 2Q + 1
  forward passes, not 2Q + 2.
- Weight decay is skipped for biases and norm weights (docs/design.md, section 4.1, as every ZO method here);
  the code decays every tensor. Its default weight decay is 0, where the two agree.
- z comes from the run's noise stream, keyed by (seed, step, query, tensor) (adazeta/zo/noise.py), not
  torch.manual_seed(np.random.randint(...)): the same seed gives MeZO's z here (`ZOStep`), and a
  resumed run draws the z it would have drawn.
- The moving average is written as Sigma <- Sigma + Sigma * alpha (mean_q h_q z_q^2 - 1), which
  is the code's (1 - alpha) Sigma + alpha h Sigma z^2 with one rounding instead of two: in fp32,
  1 - 1e-8 rounds to 1, so the code's decay term is lost at its own alpha; here a change of
  Sigma is lost only if it is under half an ulp of Sigma.
- The Hessian smoothing schedule (`--hessian_smooth_type`, constant values only in the code) is a
  constant alpha here; the code's learning-rate schedules are this project's schedules.
- What is not supported is declared in SUPPORTS and refused by key when the method is built
  (adazeta/step.py `check_supports`): zo.parallel_queries (the queries run one after another),
  torchrun, bf16/fp16 trainable weights (an in-place +eps / -2 eps / +eps round trip does not
  restore them; the code runs HiZOO in fp16 regardless), update rules other than sgd, the sparse
  trainable set, and the replay log (adazeta-replay rebuilds SPSA steps only).

Cost per step: the perturbations are in place, a chunk of z at a time as SPSA does (z is drawn in
the chunks of `chunk_bounds` where `chunks_exact` holds, so z equals SPSA's z bit for bit, and
whole per tensor elsewhere, on CUDA: Q + 1 scratch rows the size of the largest trainable tensor); passes
over the weights: 3 per query (+eps, -2 eps, +eps) and one for the Hessian and the update
together. The restore is not folded into the update (zo.fused_update has no effect), and passes run
on one thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from adazeta.config import MethodConfig, TrainableSet, Update, ZOConfig
from adazeta.errors import ConfigError
from adazeta.params import Trainable
from adazeta.step import (
    GIB,
    GROUPED_SETS,
    CudaBuffer,
    StepResult,
    Supports,
    check_update_fits,
    dtype_bytes,
    register_step,
    weight_norm,
)
from adazeta.zo.noise import Stream, query_seed
from adazeta.zo.spsa import SPSA

LossFn = Callable[[], torch.Tensor]
# The trainable sets HiZOO composes with (the paper: full parameters, LoRA and prefix tuning).
HIZOO_SETS = (TrainableSet.full, *GROUPED_SETS)


class HiZOOStep:
    """One HiZOO step (module docstring): L0, the Q pairs of perturbed losses one query after
    another, the guard, then Sigma and theta in one pass over the weights. A `Step` (adazeta/step.py): call
    it, read and set `lr`, save and load `state_dict` (Sigma and lr)."""

    def __init__(
        self, model, trainables: list[Trainable], cfg: MethodConfig, seed: int, zo: ZOConfig, dist=None,
    ):
        if not 0 <= cfg.hizoo.alpha < 1:
            raise ConfigError(f"method.hizoo.alpha={cfg.hizoo.alpha!r} is out of range: in [0, 1)")
        # SPSA gives the layout (adapter and LoRA sets grouped into flat buffers, as ZOStep groups
        # them) and each unit's key and chunks in the noise stream; its own passes are not used.
        group = cfg.trainable in GROUPED_SETS
        self.spsa = SPSA(trainables, cfg.eps, group=group, workers=1)
        self.trainables, self.units = trainables, self.spsa.units
        self.eps, self.alpha, self.seed = cfg.eps, cfg.hizoo.alpha, seed
        self._lr, self.wd = cfg.lr, cfg.weight_decay
        self.sigma = [torch.ones_like(u.param) for u in self.units]  # the code's Hessian_matrix
        self.numel = sum(t.param.numel() for t in trainables)
        self.inverse_sum: torch.Tensor | float = float(self.numel)  # sum of 1 / Sigma, for the guard
        self.norm: float | None = None  # of the trainables, measured at the first guarded step
        self.displaced: tuple[int, float] | None = None  # (seed, s): the weights sit at theta + s eps D z
        self.streams: dict[torch.device, list[Stream]] = {}
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = value

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Sigma as `hessian.<tensor index>` (views shaped like each trainable tensor, whatever the
        grouping), and lr."""
        spsa, out = self.spsa, {}
        for i, t in enumerate(self.trainables):
            a, n = spsa.offsets[i], t.param.numel()
            out[f"hessian.{i}"] = self.sigma[spsa.unit_of[i]].view(-1)[a : a + n].view(t.param.shape)
        return out, {"lr": self._lr}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        self._lr = scalars["lr"]
        for name, view in self.state_dict()[0].items():
            if name not in tensors or tensors[name].shape != view.shape:
                raise KeyError(f"HiZOO state {name!r} missing or of the wrong shape")
            view.copy_(tensors[name])
        self.inverse_sum = sum(float(s.double().reciprocal().sum()) for s in self.sigma)

    def cuda_buffers(self, target_dtype: str, kept: set[int]) -> list[CudaBuffer]:
        """On CUDA (no `chunks_exact`) `add` reads every unit's z whole, into a scratch of Q + 1 rows
        (each query's z and Sigma^(-1/2)) the size of the largest trainable tensor, Q = 1 as the
        planner measures; on CPU the rows are chunks. Sigma itself, one copy of the trainable set,
        is allocated alike on both devices."""
        largest = max(self.units, key=lambda u: u.param.numel())
        cpu = sum(b.numel() * b.element_size() for b in self.buffers.values()) / GIB
        return [CudaBuffer(
            f"z and Sigma^(-1/2) scratch: 2 rows of the largest trainable tensor, {largest.name} "
            f"({largest.param.numel():,} {target_dtype})", "zo/hizoo.py HiZOOStep.add (whole tensors)",
            2 * largest.param.numel() * dtype_bytes(target_dtype) / GIB, cpu)]

    # -- the noise -----------------------------------------------------------------------------
    def z(self, unit: int, seed: int) -> torch.Tensor:
        """z(seed) over unit `unit`, whole (a copy): what the passes read chunk by chunk."""
        return self.spsa.unit_z(unit, seed).clone()

    def readers(self, device: torch.device, n: int) -> list[Stream]:
        have = self.streams.setdefault(device, [])
        while len(have) < n:
            have.append(Stream(device))
        return have[:n]

    def scratch(self, p: torch.Tensor, rows: int, width: int) -> torch.Tensor:
        """A (rows, width) scratch of p's device and dtype: one row per query's chunk of z, and
        one for Sigma^(-1/2) (a chunk, or a whole tensor where chunks are not exact)."""
        key = (p.device, p.dtype)
        if key not in self.buffers or self.buffers[key].numel() < rows * width:
            self.buffers[key] = torch.empty(rows * width, device=p.device, dtype=p.dtype)
        return self.buffers[key][: rows * width].view(rows, width)

    @torch.no_grad()
    def add(
        self, seeds: list[int], coeffs: list[float], curvatures: list[float] | None = None, decay: float = 1.0,
    ) -> torch.Tensor | None:
        """One pass over the weights: theta <- f theta + sum_k c_k Sigma^(-1/2) z(seed_k), f = `decay`
        where weight decay applies and 1 elsewhere. With `curvatures` h_k (the update), Sigma is
        first moved to Sigma + Sigma alpha (mean_k h_k z_k^2 - 1) in the same pass, and the pass
        returns sum 1 / Sigma (a device scalar). Each unit reads its z in SPSA's chunks
        (`SPSA.bounds`), so the z are SPSA's to the bit."""
        n = len(seeds)
        inverse = None
        for u, t in enumerate(self.units):
            p, sigma = t.param.view(-1), self.sigma[u].view(-1)
            f = decay if t.decay else 1.0
            streams = [s.z(seed, self.spsa.unit_seed[u]) for s, seed in zip(self.readers(p.device, n), seeds, strict=True)]
            bounds = self.spsa.bounds[u] or [(0, p.numel())]
            rows = self.scratch(p, n + 1, max(b - a for a, b in bounds))
            for a, b in bounds:
                zs = [s.read(rows[k, : b - a]) for k, s in enumerate(streams)]
                sig, dst, scratch = sigma[a:b], p[a:b], rows[n, : b - a]
                if curvatures is not None:
                    acc = scratch.zero_()
                    for z, h in zip(zs, curvatures, strict=True):
                        acc.addcmul_(z, z, value=h)
                    sig.addcmul_(sig, acc.mul_(self.alpha / n).sub_(self.alpha))
                r = torch.rsqrt(sig, out=scratch)
                if curvatures is not None:
                    part = r.square().sum(dtype=torch.float64)
                    inverse = part if inverse is None else inverse + part
                if f != 1.0:
                    dst.mul_(f)
                for z, c in zip(zs, coeffs, strict=True):
                    dst.addcmul_(z, r, value=c)
        return inverse

    def perturb(self, seed: int, scale: float) -> None:
        """theta <- theta + scale eps Sigma^(-1/2) z(seed), remembered until restored."""
        self.add([seed], [scale * self.eps])
        s = (self.displaced[1] if self.displaced else 0.0) + scale
        self.displaced = (seed, s) if s != 0.0 else None

    def restore(self) -> None:
        if self.displaced is not None:
            seed, s = self.displaced
            self.perturb(seed, -s)

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, loss_fn: LossFn, step: int, q: int, guard=None):
        """Step `step` (counted from 1) with q queries, seeds query_seed(seed, step, 0..q-1)."""
        seeds = [query_seed(self.seed, step, i) for i in range(q)]
        eps, lr = self.eps, self._lr
        try:
            values = [loss_fn()]
            for s in seeds:
                self.perturb(s, +1.0)
                values.append(loss_fn())
                self.perturb(s, -2.0)
                values.append(loss_fn())
                self.perturb(s, +1.0)
            l0, *pairs = torch.stack([v.detach().double() for v in values]).tolist()  # the step's one host sync
            plus, minus = pairs[0::2], pairs[1::2]
            grads = [(a - b) / (2 * eps) for a, b in zip(plus, minus, strict=True)]
            curvatures = [abs(a + b - 2 * l0) / (2 * eps * eps) for a, b in zip(plus, minus, strict=True)]
            if guard is not None:
                guard(step, [l0, *[(a + b) / 2 for a, b in zip(plus, minus, strict=True)]], grads)
                if self.norm is None:
                    self.norm = weight_norm(self.trainables)
                if self.norm > 0:  # |Sigma^(-1/2) z| ~ sqrt(sum 1 / Sigma), Sigma of the last step
                    scale = math.sqrt(sum(g * g for g in grads)) / q
                    ratio = lr * scale * math.sqrt(float(self.inverse_sum)) / self.norm
                    guard.check_update(step, ratio, lr, grads)
            check_update_fits(step, lr, grads)
            if not all(math.isfinite(h) for h in curvatures):
                curvatures = [0.0] * q  # a loss overflowed without the guard: keep Sigma finite
            self.inverse_sum = self.add(seeds, [-lr * g / q for g in grads], curvatures, 1.0 - lr * self.wd)
        finally:
            self.restore()  # a no-op, unless the step stopped (an error) with the weights displaced
        return StepResult(l0, sum(grads) / q, 2 * q + 1, seeds, grads)


# One process, queries one after another, weights perturbed in place (float32 only), no replay log.
SUPPORTS = Supports(trainable=HIZOO_SETS, update_rules=(Update.sgd,))
register_step("hizoo", HiZOOStep, SUPPORTS)
