"""The zeroth-order estimator shared by every ZO method: two-sided SPSA with MeZO's seed trick.

For query q with seed s_q, z_q ~ N(0, I) over the trainable set is regenerated from s_q whenever it
is needed and never stored (MeZO, arXiv 2305.17333, Algorithm 1):

    g_q = (L(theta + eps z_q) - L(theta - eps z_q)) / (2 eps)
    theta <- theta - lr * ((1/Q) sum_q g_q z_q + wd * theta)      (wd skipped for biases and norms)

The perturbation is applied in place: +eps z, forward; -2 eps z, forward; +eps z to restore.
A method may restrict z with a mask per tensor (Sparse-MeZO: z_hat = m(theta) * z).

Each tensor i draws its z from its own seed, tensor_seed(s_q, i), so that one tensor's noise can be
regenerated without the others' (per-layer perturbation inside a forward, per-tensor updates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def query_seed(seed: int, step: int, query: int) -> int:
    """A pure function of (run seed, step, query): the same z on a resume, a replay or another
    rank, and independent streams for different queries (no global RNG involved)."""
    return splitmix64(splitmix64(splitmix64(seed) ^ step) ^ query) & ((1 << 63) - 1)


def tensor_seed(seed: int, index: int) -> int:
    return splitmix64(seed ^ splitmix64(index + 1)) & ((1 << 63) - 1)


@dataclass
class Trainable:
    """One trainable tensor and whether weight decay applies to it."""

    name: str
    param: torch.nn.Parameter
    decay: bool


# mask(index, param, seed) -> a bool tensor shaped like param (or None: all of it moves).
MaskFn = Callable[[int, torch.Tensor, int], "torch.Tensor | None"]


class SPSA:
    """Two-sided SPSA over a fixed, ordered list of trainable tensors.

    z is drawn into a reusable scratch buffer from one explicit torch.Generator per device, so a
    step allocates nothing parameter-sized and never touches the global RNG.
    """

    def __init__(self, trainables: list[Trainable], eps: float, mask: MaskFn | None = None):
        if eps <= 0:
            raise ValueError(f"method.eps must be > 0, got {eps}")
        self.trainables, self.eps, self.mask = trainables, eps, mask
        # How the pair L(theta + eps z), L(theta - eps z) is evaluated: in place by default;
        # Sparse-MeZO's memory-efficient mode swaps in a perturbation inside each layer's forward.
        self.loss_pair: Callable[[Callable[[], torch.Tensor], int], tuple] = self.losses
        self.generators: dict[torch.device, torch.Generator] = {}
        self.scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        for t in trainables:
            p = t.param
            if p.device not in self.generators:
                self.generators[p.device] = torch.Generator(device=p.device)
            key = (p.device, p.dtype)
            numel = max(p.numel(), self.scratch[key].numel() if key in self.scratch else 0)
            self.scratch[key] = torch.empty(numel, device=p.device, dtype=p.dtype)

    def z(self, index: int, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """z_q for tensor `index` (masked if the method masks), written into `out` or the scratch
        buffer: valid until the next call."""
        p = self.trainables[index].param
        if out is None:
            out = self.scratch[(p.device, p.dtype)][: p.numel()].view_as(p)
        gen = self.generators[p.device]
        gen.manual_seed(tensor_seed(seed, index))
        out.normal_(generator=gen)
        if self.mask is not None:
            m = self.mask(index, p, seed)
            if m is not None:
                out.mul_(m)
        return out

    def noise(self, seed: int) -> Iterator[tuple[Trainable, torch.Tensor]]:
        for i, t in enumerate(self.trainables):
            yield t, self.z(i, seed)

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """theta <- theta + scale * eps * z(seed)."""
        for t, z in self.noise(seed):
            t.param.add_(z, alpha=scale * self.eps)

    @torch.no_grad()
    def losses(self, loss_fn: Callable[[], torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """L(theta + eps z) and L(theta - eps z), weights restored afterwards (in place)."""
        self.perturb(seed, +1.0)
        loss_plus = loss_fn()
        self.perturb(seed, -2.0)
        loss_minus = loss_fn()
        self.perturb(seed, +1.0)
        return loss_plus, loss_minus

    def projected_grad(self, loss_fn: Callable[[], torch.Tensor], seed: int) -> tuple[float, float]:
        """g = (L+ - L-) / (2 eps) for one query. Returns (g, (L+ + L-) / 2), the latter an
        estimate of the loss at theta."""
        loss_plus, loss_minus = self.loss_pair(loss_fn, seed)
        # One host sync per query for both scalars, not one per parameter.
        lp, lm = torch.stack([loss_plus.float(), loss_minus.float()]).tolist()
        return (lp - lm) / (2 * self.eps), (lp + lm) / 2

    @torch.no_grad()
    def estimate(self, index: int, seeds: list[int], grads: list[float], out: torch.Tensor) -> torch.Tensor:
        """The gradient estimate of one tensor, (1/Q) sum_q g_q z_q, written into `out`."""
        out.zero_()
        for seed, g in zip(seeds, grads, strict=True):
            out.add_(self.z(index, seed), alpha=g / len(seeds))
        return out

    @torch.no_grad()
    def decay(self, lr: float, weight_decay: float) -> None:
        if weight_decay:
            for t in self.trainables:
                if t.decay:
                    t.param.mul_(1.0 - lr * weight_decay)

    @torch.no_grad()
    def sgd_update(self, seeds: list[int], grads: list[float], lr: float, weight_decay: float) -> None:
        """theta <- theta - lr * ((1/Q) sum_q g_q z_q + wd * theta), decay only where t.decay."""
        self.decay(lr, weight_decay)
        for seed, g in zip(seeds, grads, strict=True):
            for t, z in self.noise(seed):
                t.param.add_(z, alpha=-lr * g / len(seeds))
