"""What every ZO or first-order step shares: its result, the guard it is handed, the protocol
the loop, the checkpoint and the library API use, the checks made before any weight moves, and
the registry the steps enter themselves in.

A ZO step whose learning rate, weight decay and state live in an update rule (`RuleStep`) gets
`lr` and `state_dict()` from it: ZOStep (adazeta/zo/spsa_step.py), FZOOStep (adazeta/zo/fzoo.py),
LOZOStep (adazeta/zo/lozo.py).

The registry: each step's module calls `register_step(name, cls, supports)` once, beside its class,
with what the step composes with (`Supports`); `adazeta.methods.build_method` looks the step of a
config up by name (`step_name`: method.estimator's value for a ZO method, `fo` for a first-order
one) and builds every step with one signature, `cls(model, trainables, cfg, seed, zo, dist=None)`.

The steps of adazeta/zo/ and adazeta/first_order.py implement this contract, so it sits below
both: it imports only the config, the errors and `Trainable` (adazeta/params.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from adazeta.config import MethodConfig, Optimizer, TrainableSet, Update, ZOConfig
from adazeta.errors import ConfigError, DivergenceError
from adazeta.params import LOW_PRECISION, Trainable

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


GIB = 1024**3


@dataclass
class CudaBuffer:
    """A buffer a CUDA run of a step allocates beyond the weights, at a size a CPU run does not
    show (on CPU its draws go a chunk at a time where CUDA's go a whole tensor at a time): what the
    memory planner adds to a CPU measurement (adazeta/engine/plan/measure.py)."""

    name: str  # what it is, with the tensor that sizes it
    source: str  # where the code allocates it
    cuda_gib: float  # its size on CUDA, in the target dtype
    cpu_gib: float  # what this CPU process held of it, in the measured dtype


def dtype_bytes(name: str) -> int:
    """Bytes per value of a dtype named as model.dtype names it (float32, bfloat16, float16)."""
    return getattr(torch, name).itemsize


class Step(Protocol):
    """What the loop, the checkpoint, the guard's rollback, the library API and the memory planner
    use of a method's step: call it, read and set its learning rate, save and load its state
    (tensors, saved as safetensors, and JSON scalars; never a pickle), and list its CUDA buffers.
    Every registered step (`register_step`) is one."""

    lr: float

    def __call__(self, loss_fn: LossFn, step: int, q: int, guard: Guard | None = None) -> StepResult: ...

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]: ...

    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None: ...

    def cuda_buffers(self, target_dtype: str, kept: set[int]) -> list[CudaBuffer]:
        """After a step has run on CPU: what a CUDA run of this step allocates that the CPU run
        did not, at `target_dtype`'s bytes per value (parameters whose id is in `kept` stay
        float32 in a low-precision run); [] when the CPU run held the same buffers."""
        ...


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


@dataclass(frozen=True)
class Supports:
    """What a step composes with, declared once beside its class and passed to `register_step`."""

    trainable: tuple[TrainableSet, ...]
    """The method.trainable values it trains."""
    update_rules: tuple[Update, ...] | None
    """The method.update_rule values it applies; None: it has no ZO update rule (first-order: AdamW)."""
    parallel_queries: tuple[TrainableSet, ...] = ()
    """The trainable sets whose queries zo.parallel_queries=true runs as batched replicas (): none."""
    torchrun: bool = False
    """It runs under torchrun (WORLD_SIZE > 1)."""
    low_precision: tuple[TrainableSet, ...] = ()
    """The trainable sets whose bf16/fp16 tensors it trains (a ZO step perturbs them inside the
    forward, never in place; the sparse set only with method.sparse.in_forward=true)."""
    replay_log: bool = False
    """adazeta-replay rebuilds its steps from the replay log (train.replay_log=true)."""
    estimator_factory: bool = False
    """build_method(estimator=...) replaces its estimate."""


@dataclass(frozen=True)
class RegisteredStep:
    name: str  # the registry key: method.estimator's value, or `fo` (method.optimizer=fo)
    cls: type  # built as cls(model, trainables, cfg, seed, zo, dist=None)
    supports: Supports

    @property
    def optimizer(self) -> Optimizer:
        return Optimizer.fo if self.name == Optimizer.fo.value else Optimizer.zo

    @property
    def selected_by(self) -> str:
        """The config assignment that selects this step, as messages name it."""
        return "method.optimizer=fo (first-order)" if self.optimizer == Optimizer.fo else f"method.estimator={self.name}"


STEPS: dict[str, RegisteredStep] = {}


def register_step(name: str, cls: type, supports: Supports) -> None:
    """Enter a step class in the registry under `name`: the value of method.estimator that selects
    it, or `fo` for the first-order step (method.optimizer=fo)."""
    if name in STEPS and STEPS[name].cls is not cls:
        raise ValueError(f"a step named {name!r} is registered already: {STEPS[name].cls.__qualname__}")
    STEPS[name] = RegisteredStep(name, cls, supports)


def step_name(cfg: MethodConfig) -> str:
    """The registry key of the step `cfg` selects: `fo` for a first-order method (which does not
    read method.estimator), else method.estimator's value."""
    return Optimizer.fo.value if cfg.optimizer == Optimizer.fo else cfg.estimator.value


def registered(cfg: MethodConfig) -> RegisteredStep:
    """The registered step of `cfg`; a ConfigError naming the registered ones if there is none."""
    name = step_name(cfg)
    if name not in STEPS:
        valid = ", ".join(sorted(n for n in STEPS if n != Optimizer.fo.value))
        raise ConfigError(f"method.estimator={name} has no registered step; valid: {valid}")
    return STEPS[name]


def _names(values) -> str:
    return ", ".join(v.value for v in values)


def _others(entry: RegisteredStep, ok: Callable[[Supports], bool]) -> str:
    """The other registered steps that support what `entry` does not ('' if none): by their
    selection when they share its optimizer, else as the ZO or the first-order methods."""
    found = []
    for other in STEPS.values():
        if other is entry or not ok(other.supports):
            continue
        same = other.optimizer == entry.optimizer
        name = other.selected_by if same else f"the {'ZO' if other.optimizer == Optimizer.zo else 'first-order'} methods"
        if name not in found:
            found.append(name)
    return ", ".join(found)


def check_supports(
    cfg: MethodConfig, zo: ZOConfig | None = None, trainables: list[Trainable] | None = None, *,
    torchrun: bool = False, replay_log: bool = False, estimator_factory: bool = False,
) -> RegisteredStep:
    """Refuse what the step `cfg` selects does not support (its registered `Supports`), naming the
    key, its value, the valid choices and the fix; return the step's registry entry. The config's
    keys always; `zo`'s (zo.parallel_queries) when given; the trainables' dtypes when given (after
    the trainable set is built); `torchrun`: this process is one of several (WORLD_SIZE > 1);
    `replay_log`: the run keeps a replay log; `estimator_factory`: a caller's estimator is to
    replace the step's."""
    entry = registered(cfg)
    s, by, t = entry.supports, entry.selected_by, cfg.trainable
    if t not in s.trainable:
        alts = _others(entry, lambda o: t in o.trainable)
        raise ConfigError(f"method.trainable={t.value} is not supported by {by}; valid: {_names(s.trainable)}"
                          + (f" (method.trainable={t.value} works with {alts})" if alts else ""))
    if s.update_rules is not None and cfg.update_rule not in s.update_rules:
        alts = _others(entry, lambda o: o.update_rules is not None and cfg.update_rule in o.update_rules)
        raise ConfigError(f"method.update_rule={cfg.update_rule.value} is not supported by {by}; valid: "
                          f"{_names(s.update_rules)}" + (f" (or use {alts})" if alts else ""))
    if zo is not None and zo.parallel_queries and t not in s.parallel_queries:
        if s.parallel_queries:
            valid = [v.value for v in s.parallel_queries]
            raise ConfigError(
                f"zo.parallel_queries=true is not supported by {by} with method.trainable={t.value}: its batched "
                "forwards hold a copy of the trainable set per replica and batch the linear layers that own it; "
                f"valid trainable sets: {valid}. Set zo.parallel_queries=false for this method"
            )
        alts = _others(entry, lambda o: t in o.parallel_queries)
        raise ConfigError(f"zo.parallel_queries=true (a step's queries as batched forwards) is not supported by {by}; "
                          "set zo.parallel_queries=false" + (f", or use {alts}" if alts else ""))
    if torchrun and not s.torchrun:
        what = "first-order" if entry.optimizer == Optimizer.fo else f"stepped by {by}"
        alts = _others(entry, lambda o: o.torchrun)
        raise ConfigError(f"method={cfg.name} is {what}; torchrun runs {alts or 'no other step'} only (WORLD_SIZE > 1 "
                          "is not supported): run it without torchrun")
    if replay_log and not s.replay_log:
        alts = _others(entry, lambda o: o.replay_log)
        raise ConfigError(f"train.replay_log=true is not supported by {by}: adazeta-replay rebuilds the steps of "
                          f"{alts or 'no other step'} only; set train.replay_log=false"
                          + (f", or use {alts}" if alts else ""))
    if estimator_factory and not s.estimator_factory:
        alts = _others(entry, lambda o: o.estimator_factory)
        raise ConfigError(f"an estimator factory replaces a step's estimate, and {by} takes none (it is a step of its "
                          "own)" + (f"; use {alts} with a factory" if alts else ""))
    low = [x for x in trainables or () if x.param.dtype in LOW_PRECISION]
    # Sparse-MeZO perturbs in place (its masks stored) with method.sparse.in_forward=false.
    in_place = t == TrainableSet.sparse and not cfg.sparse.in_forward
    if low and (t not in s.low_precision or in_place):
        kind = f"{t.value} (method.sparse.in_forward=false)" if t == TrainableSet.sparse else t.value
        fixes = ["method.sparse.in_forward=true (perturbation inside the forward)"] if in_place and t in s.low_precision else []
        fixes.append("model.dtype=float32")
        alts = _others(entry, lambda o: t in o.low_precision)
        fixes += [alts] if alts and not in_place else []
        raise ConfigError(
            f"method={cfg.name} ({by}) perturbs its trainable set {kind} in place, and {len(low)} of its tensors are "
            f"{low[0].param.dtype} (e.g. {low[0].name}): a rounded +eps z / -2 eps z / +eps z round trip does not "
            f"restore them. Use {', or '.join(fixes)}"
        )
    return entry
