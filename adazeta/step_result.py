"""What every method's step returns (`StepResult`), and the two checks every ZO step makes before
it writes an update: the trainables' norm (the guard's update-size check) and whether lr * g fits
in float32. Kept apart from adazeta/methods.py so that a step of its own (adazeta/hizoo.py) uses
them without importing the module that builds it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adazeta.errors import DivergenceError
from adazeta.zo import Trainable

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class StepResult:
    loss: float  # the loss at theta (ZO: the mean of L+ and L- over queries)
    projected_grad: float | None  # mean g_q over the step's queries (ZO only)
    forward_passes: int
    seeds: list[int] | None = None  # ZO: the query seeds of this step, in query order
    grads: list[float] | None = None  # ZO: g_q per query (what the replay log records)


@torch.no_grad()
def weight_norm(trainables: list[Trainable]) -> float:
    """sqrt(sum of squares) of the trainable values, in float64, a slice at a time (no copy of a
    large low-precision tensor in fp32)."""
    total = 0.0
    for t in trainables:
        flat = t.param.detach().reshape(-1)
        for a in range(0, flat.numel(), 1 << 20):
            total += float(flat[a:a + (1 << 20)].double().pow(2).sum())
    return math.sqrt(total)


def check_update_fits(step: int, lr: float, grads: list[float]) -> None:
    """Stop a step whose update lr * g_q cannot be written into float32 weights (torch raises
    "value cannot be converted to type float without overflow") before any weight moves."""
    worst = max((abs(g) for g in grads), default=0.0)
    if lr * worst > FLOAT32_MAX:
        raise DivergenceError(
            f"step {step}: the update lr * projected gradient = {lr:.3g} * {worst:.3g} overflows float32", step
        )
