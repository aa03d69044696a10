"""ZO update rules: how the projected gradients (g_q, with z_q regenerated from seeds) move theta.

The rules of the ZO-LLM benchmark (Zhang et al., arXiv 2402.11592), selected by `method.update_rule`:
- sgd:          theta -= lr * ((1/Q) sum_q g_q z_q + wd * theta)              (MeZO)
- sign:         as sgd with g_q replaced by sign(g_q)                         (ZO-SGD-Sign)
- momentum:     m = beta * m + g_hat;  theta -= lr * (m + wd * theta)          (ZO-SGD-MMT)
- conservative: keep the lowest-loss of theta, theta - lr g_hat, theta + lr g_hat (ZO-SGD-Cons;
                3 extra forward passes per step)
- adam:         Adam moments on g_hat (bias-corrected), decoupled weight decay  (ZO-Adam)
- sign_adamw, conservative_adamw: ZO-SGD-Sign and ZO-SGD-Cons as the benchmark's released code
                runs them: an AdamW step on sign(g) z, resp. on g z with the conservative choice
                (see SignAdamW and ConservativeAdamW)
where g_hat = (1/Q) sum_q g_q z_q. sgd and sign need no state; momentum and adam keep one or two
fp32 buffers per trainable tensor (that is what they cost), whatever the tensor's dtype: in bf16,
v.mul_(0.999) rounds back to v and m + (1 - beta) g_hat drops g_hat. g_hat is formed in fp32 too;
a low-precision tensor's new value is written with stochastic rounding (`SPSA.write`).

`state_dict()` / `load_state_dict()` carry a rule's state through a checkpoint: tensors (saved as
safetensors) and scalars (saved as JSON), never a pickle.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adazeta.params import LOW_PRECISION
from adazeta.zo.spsa import SPSA, rounding_seed


class UpdateRule:
    """apply(...) moves the trainables and returns the number of extra forward passes it used."""

    def __init__(self, spsa: SPSA, lr: float, weight_decay: float):
        self.spsa, self.lr, self.wd = spsa, lr, weight_decay

    # True when the update is plain SGD on `coefficients(grads)` (defined by such rules only),
    # theta -= lr ((1/Q) sum_q c_q z_q + wd theta): ZOStep may then fold the last query's restore
    # into it (`zo.fused_update`).
    fusable = False

    def apply(self, seeds: list[int], grads: list[float], loss_fn: Callable[[], torch.Tensor]) -> int:
        self.spsa.sgd_update(seeds, grads, self.lr, self.wd)
        return 0

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, scalars): everything that, with the trainables, fixes the next updates."""
        return dict(self.buffers()), {"lr": self.lr}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        self.lr = scalars["lr"]
        for name, buffer in self.buffers().items():
            if name not in tensors or tensors[name].shape != buffer.shape:
                raise KeyError(f"update-rule state {name!r} missing or of the wrong shape")
            buffer.copy_(tensors[name])

    def buffers(self) -> dict[str, torch.Tensor]:
        """The rule's state tensors by name (none for sgd and sign)."""
        return {}

    def estimates(self, seeds: list[int], grads: list[float]):
        """Yield (unit index, unit, g_hat) per unit of the SPSA (a tensor, or a group's flat
        buffer), g_hat in a reused fp32 buffer."""
        buffers: dict[torch.device, torch.Tensor] = getattr(self, "_buffers", {})
        self._buffers = buffers
        for u, t in enumerate(self.spsa.units):
            p = t.param
            if p.device not in buffers or buffers[p.device].numel() < p.numel():
                buffers[p.device] = torch.empty(p.numel(), device=p.device, dtype=torch.float32)
            yield u, t, self.spsa.estimate(u, seeds, grads, buffers[p.device][: p.numel()].view_as(p))

    def step_to(self, u: int, delta: torch.Tensor, alpha: float, rounding: int) -> None:
        """unit u += alpha * delta (fp32): stochastically rounded for a low-precision unit."""
        p = self.spsa.units[u].param
        if p.dtype in LOW_PRECISION:
            self.spsa.write(u, p.float().add_(delta, alpha=alpha), rounding)
        else:
            p.add_(delta, alpha=alpha)

    def per_tensor(self, prefix: str, states: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-unit state as `<prefix>.<tensor index>` views shaped like each trainable tensor: the
        checkpoint names do not depend on how the tensors are grouped."""
        spsa, out = self.spsa, {}
        for i, t in enumerate(spsa.trainables):
            a, n = spsa.offsets[i], t.param.numel()
            out[f"{prefix}.{i}"] = states[spsa.unit_of[i]].view(-1)[a : a + n].view(t.param.shape)
        return out


def fp32_zeros(units: list) -> list[torch.Tensor]:
    """Optimiser state: fp32 whatever the parameter's dtype (see the module docstring)."""
    return [torch.zeros_like(t.param, dtype=torch.float32) for t in units]


class SGD(UpdateRule):
    fusable = True

    def coefficients(self, grads: list[float]) -> list[float]:
        return list(grads)


class Sign(UpdateRule):
    fusable = True

    def coefficients(self, grads: list[float]) -> list[float]:
        return [float((g > 0) - (g < 0)) for g in grads]

    def apply(self, seeds, grads, loss_fn) -> int:
        self.spsa.sgd_update(seeds, self.coefficients(grads), self.lr, self.wd)
        return 0


class Momentum(UpdateRule):
    def __init__(self, spsa: SPSA, lr: float, weight_decay: float, momentum: float = 0.9):
        super().__init__(spsa, lr, weight_decay)
        self.beta = momentum
        self.m = fp32_zeros(spsa.units)

    def buffers(self) -> dict[str, torch.Tensor]:
        return self.per_tensor("m", self.m)

    @torch.no_grad()
    def apply(self, seeds, grads, loss_fn) -> int:
        self.spsa.decay(self.lr, self.wd, seeds)
        rounding = rounding_seed(seeds, [*grads, self.lr])
        for i, _, g_hat in self.estimates(seeds, grads):
            self.m[i].mul_(self.beta).add_(g_hat)
            self.step_to(i, self.m[i], -self.lr, rounding)
        return 0


class Adam(UpdateRule):
    def __init__(self, spsa: SPSA, lr: float, weight_decay: float, betas=(0.9, 0.999), adam_eps: float = 1e-8):
        super().__init__(spsa, lr, weight_decay)
        self.b1, self.b2 = betas
        self.adam_eps, self.t = adam_eps, 0
        self.m, self.v = fp32_zeros(spsa.units), fp32_zeros(spsa.units)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {**self.per_tensor("m", self.m), **self.per_tensor("v", self.v)}

    def state_dict(self):
        tensors, scalars = super().state_dict()
        return tensors, {**scalars, "t": self.t}

    def load_state_dict(self, tensors, scalars) -> None:
        super().load_state_dict(tensors, scalars)
        self.t = scalars["t"]

    @torch.no_grad()
    def apply(self, seeds, grads, loss_fn) -> int:
        self.t += 1
        self.spsa.decay(self.lr, self.wd, seeds)
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        rounding = rounding_seed(seeds, [*grads, self.lr, float(self.t)])
        for i, t, g_hat in self.estimates(seeds, grads):
            self.m[i].mul_(self.b1).add_(g_hat, alpha=1 - self.b1)
            self.v[i].mul_(self.b2).addcmul_(g_hat, g_hat, value=1 - self.b2)
            denom = torch.div(self.v[i], c2, out=g_hat).sqrt_().add_(self.adam_eps)  # g_hat is spent: reuse it
            if t.param.dtype in LOW_PRECISION:
                self.step_to(i, torch.div(self.m[i], denom, out=denom), -self.lr / c1, rounding)
            else:
                t.param.addcdiv_(self.m[i], denom, value=-self.lr / c1)
        return 0


class Conservative(UpdateRule):
    last_losses: list[float] = []  # the step's three losses, for the replay log

    @torch.no_grad()
    def apply(self, seeds, grads, loss_fn) -> int:
        sgd = self.spsa.sgd_update
        loss_here = float(loss_fn())
        sgd(seeds, grads, self.lr, 0.0)  # theta - lr g_hat
        loss_minus = float(loss_fn())
        sgd(seeds, [-2 * g for g in grads], self.lr, 0.0)  # theta + lr g_hat
        loss_plus = float(loss_fn())
        self.last_losses = [loss_here, loss_minus, loss_plus]
        best = min(loss_here, loss_minus, loss_plus)
        if best == loss_here:
            sgd(seeds, grads, self.lr, 0.0)
        elif best == loss_minus:
            sgd(seeds, [2 * g for g in grads], self.lr, 0.0)
        self.spsa.decay(self.lr, self.wd, seeds)
        return 3


def signs(grads: list[float]) -> list[float]:
    return [float((g > 0) - (g < 0)) for g in grads]


# ZO-Bench's released code (ZO-Bench/ZO-LLM, zo-bench/trainer.py) builds SGD for the sign and
# conservative trainers only when run.py's `--optimizer` is sgd (or Adam for adam). Its default is
# "adamw", which matches neither branch, and its sweeps pass no --optimizer, so the Hugging Face
# Trainer's AdamW stays: every update is an AdamW step on param.grad = c * z (lr constant, betas
# 0.9/0.999, eps 1e-8, the sweeps' weight decay 0). The paper's text describes SGD: `sign` and
# `conservative` above. These two are what the released sweeps ran.


class SignAdamW(Adam):
    """ZO-Bench's `--trainer zo_sign_opt` as released: an AdamW step on sign(g_q) z_q (the sign of
    the projected gradient, not of g z element-wise)."""

    def apply(self, seeds, grads, loss_fn) -> int:
        return super().apply(seeds, signs(grads), loss_fn)


class ConservativeAdamW(Adam):
    """ZO-Bench's `--trainer zo_conserv` as released (its zo_conserv_step): L0 = L(theta); an AdamW
    step on g z, L1; an AdamW step on -2 g z, L2; then, if L1 > L0, one more on g z when L0 < L2,
    and if L1 <= L0, one on 2 g z when L1 < L2. The code means to return to theta or to the first
    step's point, as SGD would; under AdamW every call is a full step (its moments and t advance),
    so it lands elsewhere. 3 extra forward passes per step, like `conservative`."""

    last_losses: list[float] = []  # the step's three losses, for the replay log

    def apply(self, seeds, grads, loss_fn) -> int:
        loss_here = float(loss_fn())
        super().apply(seeds, grads, loss_fn)
        loss_after = float(loss_fn())
        super().apply(seeds, [-2 * g for g in grads], loss_fn)
        loss_back = float(loss_fn())
        self.last_losses = [loss_here, loss_after, loss_back]
        if loss_after > loss_here:
            if loss_here < loss_back:
                super().apply(seeds, grads, loss_fn)
        elif loss_after < loss_back:
            super().apply(seeds, [2 * g for g in grads], loss_fn)
        return 3


RULES = {"sgd": SGD, "sign": Sign, "momentum": Momentum, "adam": Adam, "conservative": Conservative,
         "sign_adamw": SignAdamW, "conservative_adamw": ConservativeAdamW}
# The rules that take Adam's betas and epsilon (method.betas, method.adam_eps).
ADAM_RULES = ("adam", "sign_adamw", "conservative_adamw")
