"""The divergence guard: a step whose loss or projected gradient is not finite, whose loss
explodes past `guard.explode_factor` times the recent accepted losses, or (ZO) whose update would
move the weights by more than `guard.max_update` times their norm, is not applied.

The reference is the mean of the last `guard.window` accepted step losses; until that many have
been accepted, the largest accepted so far, so the guard protects from the second step on (the
first step's losses are those of the weights the run starts from): a mean of a few losses is a
noisy reference, and the largest of them is the cautious one.

The guard sits between the estimate and the update (`ZOStep`: seeds -> estimate -> guard ->
apply; `FOStep`: loss -> guard -> backward -> AdamW), so it raises before any weight moves. The
loop then either stops (checkpoint saved, message naming the step and values) or rolls back to
the last checkpoint with a lower learning rate (`guard.action=rollback`).

Also here: the precision note of the trainable set. The in-place +eps z / -2 eps z / +eps z round
trip of two-sided SPSA restores fp32 weights to within one rounding, but bf16/fp16 weights drift
by about an ulp per query (docs/design.md, section 4.1; scripts/bf16_zo.py); adapters, LoRA and new heads are kept
in fp32, and a full-parameter ZO method on a low-precision model perturbs inside the forward and
rounds its updates stochastically (adazeta/zo/spsa.py, adazeta/zo/spsa_step.py); the run says so.
"""

from __future__ import annotations

import logging
import math
from collections import deque

from adazeta.config import GuardConfig
from adazeta.errors import DivergenceError
from adazeta.params import LOW_PRECISION, Trainable

log = logging.getLogger("adazeta")


def show(values: list[float], limit: int = 8) -> str:
    shown = ", ".join(f"{v:.6g}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


class Guard:
    """`guard(step, losses, grads)` raises DivergenceError or accepts the step's loss into the
    reference. `losses` are the per-query losses at theta, `grads` the projected gradients g_q
    (empty for first-order methods)."""

    def __init__(self, cfg: GuardConfig):
        self.factor, self.window, self.max_update = cfg.explode_factor, cfg.window, cfg.max_update
        self.recent: deque[float] = deque(maxlen=cfg.window)

    def check_update(self, step: int, ratio: float, lr: float, grads: list[float]) -> None:
        """Stop a step whose update would move the trainables by `ratio` (> guard.max_update)
        times their norm, before it is applied."""
        if self.max_update is not None and ratio > self.max_update:
            raise DivergenceError(
                f"step {step}: the update would move the trainable weights by about {ratio:.3g} times their "
                f"norm (> guard.max_update={self.max_update:g}; lr {lr:.3g}, projected gradients "
                f"{show(grads)}); the step was not applied",
                step,
            )

    def __call__(self, step: int, losses: list[float], grads: list[float]) -> None:
        if not all(math.isfinite(v) for v in [*losses, *grads]):
            what = "loss" if not all(math.isfinite(v) for v in losses) else "projected gradient"
            raise DivergenceError(
                f"step {step}: the {what} is not finite (losses {show(losses)}, projected gradients "
                f"{show(grads)}); the step was not applied",
                step,
            )
        if self.factor is not None and self.recent:
            full = len(self.recent) == self.window
            ref = sum(self.recent) / len(self.recent) if full else max(self.recent)
            what = f"the mean of the last {len(self.recent)}" if full else f"the largest of the first {len(self.recent)}"
            worst = max(losses)
            if ref > 0 and worst > self.factor * ref:
                raise DivergenceError(
                    f"step {step}: the loss exploded: {worst:.6g} > guard.explode_factor={self.factor:g} x "
                    f"{ref:.6g} ({what} step losses; losses {show(losses)}, projected gradients "
                    f"{show(grads)}); the step was not applied",
                    step,
                )
        self.recent.append(sum(losses) / len(losses))

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque(state["recent"], maxlen=self.window)


def get_lr(stepper) -> float:
    """The learning rate of a method's step (`methods.Step.lr`: the ZO update rule's, or AdamW's)."""
    return stepper.lr


def set_lr(stepper, lr: float) -> None:
    """Set the learning rate of a method's step (a rollback lowers it)."""
    stepper.lr = lr


def check_precision(trainables: list[Trainable], zo: bool) -> list[str]:
    """Say how a ZO method treats low-precision trainable weights; returns their names."""
    low = [t for t in trainables if t.param.dtype in LOW_PRECISION]
    if low and zo:
        log.info(
            "%d of %d trainable tensors are %s (e.g. %s): perturbed inside each layer's forward (never "
            "written, so no round-trip drift) and updated with stochastic rounding (unbiased: an update "
            "under half an ulp moves a weight by one ulp with the matching probability)",
            len(low), len(trainables), low[0].param.dtype, low[0].name,
        )
    return [t.name for t in low]
