"""What every ZO or first-order step shares: its result, the guard it is handed, the protocol
the loop, the checkpoint and the library API use, and the checks made before any weight moves.

A ZO step whose learning rate, weight decay and state live in an update rule (`RuleStep`) gets
`lr` and `state_dict()` from it: ZOStep (adazeta/methods.py), FZOOStep (adazeta/zo/fzoo.py),
LOZOStep (adazeta/zo/lozo.py).

The steps of adazeta/zo/ implement this contract, so it sits below zo: it imports only the config,
the errors and `Trainable` (adazeta/params.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from adazeta.config import TrainableSet
from adazeta.errors import DivergenceError
from adazeta.params import Trainable

LossFn = Callable[[], torch.Tensor]
# Sets of many small tensors (adapters, LoRA factors, prefixes): a ZO step keeps them in one flat
# buffer per (device, dtype, decay) group and draws each group's noise with one RNG call.
GROUPED_SETS = (TrainableSet.tt_adapter, TrainableSet.lora, TrainableSet.prefix)


@dataclass
class StepResult:
    loss: float  # the loss at theta (ZO: the mean of L+ and L- over queries)
    projected_grad: float | None  # mean g_q over the step's queries (ZO only)
    forward_passes: int
    seeds: list[int] | None = None  # ZO: the query seeds of this step, in query order
    grads: list[float] | None = None  # ZO: g_q per query (what the replay log records)


# guard(step, losses, grads): raises to stop the step before any weight moves (adazeta.engine.guard.Guard;
# a ZO step also calls its check_update(step, ratio, lr, grads)).
Guard = Callable[[int, list[float], list[float]], None]


class Step(Protocol):
    """What the loop, the checkpoint, the guard's rollback and the library API use of a method's
    step: call it, read and set its learning rate, and save and load its state (tensors, saved as
    safetensors, and JSON scalars; never a pickle). `ZOStep` and `FOStep` are the two kinds."""

    lr: float

    def __call__(self, loss_fn: LossFn, step: int, q: int, guard: Guard | None = None) -> StepResult: ...

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None: ...


class RuleStep:
    """A step whose update rule (`self.rule`, adazeta/zo/updates.py) holds its learning rate, weight
    decay and state: `lr` reads and sets the rule's, `state_dict()` saves the rule's tensors as
    `rule.<name>` and its scalars (lr, Adam's t)."""

    rule: object

    @property
    def lr(self) -> float:
        return self.rule.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.rule.lr = value

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, scalars = self.rule.state_dict()
        return {f"rule.{k}": v for k, v in tensors.items()}, scalars

    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        self.rule.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("rule.")}, scalars)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# The coefficient c of an update lr * (1/Q) sum_q c_q z_q per rule, as an RMS over queries: the
# update's norm is about lr * UPDATE_SCALE(grads) * sqrt(n) for z ~ N(0, I) over n values.
UPDATE_SCALE: dict[str, Callable[[list[float]], float]] = {
    "sgd": lambda g: math.sqrt(sum(x * x for x in g)) / len(g),
    "momentum": lambda g: math.sqrt(sum(x * x for x in g)) / len(g),  # this step's share of m
    "conservative": lambda g: math.sqrt(sum(x * x for x in g)) / len(g),
    "sign": lambda g: 1 / math.sqrt(len(g)),
    "adam": lambda g: 1.0,  # normalised by the second moment: about one z per step
    "sign_adamw": lambda g: 1.0,
    "conservative_adamw": lambda g: 1.0,
}


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
