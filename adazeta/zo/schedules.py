"""Query schedules: how many SPSA queries Q the ZO estimator averages at each step.

A schedule is any object with two methods (``QuerySchedule``):

    bind(steps_per_epoch, max_steps)   called once by the trainer before training
    __call__(step) -> int              Q for the 0-based global step `step` (updates done so far)

They are built from config nodes by Hydra ``instantiate`` (``_target_: adazeta.zo.schedules.<Name>``),
so constructor keyword arguments are the config keys.
"""

from __future__ import annotations

import logging
import math
from typing import Protocol, runtime_checkable

__all__ = ["AdaptiveSchedule", "ConstantSchedule", "LinearSchedule", "QuerySchedule"]

log = logging.getLogger(__name__)


@runtime_checkable
class QuerySchedule(Protocol):
    def bind(self, steps_per_epoch: int, max_steps: int) -> None: ...

    def __call__(self, step: int) -> int: ...


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return value


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0 (0-based global step), got step={step!r}")
    return step


class _Bound:
    """Shared bind(): validates and stores the training length."""

    steps_per_epoch: int | None = None
    max_steps: int | None = None

    def bind(self, steps_per_epoch: int, max_steps: int) -> None:
        self.steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1)
        self.max_steps = _check_int("max_steps", max_steps, 1)

    def _require_bound(self) -> None:
        if self.steps_per_epoch is None:
            raise RuntimeError(
                f"{type(self).__name__} is not bound: call bind(steps_per_epoch, max_steps) "
                "before asking for a query count"
            )


class ConstantSchedule(_Bound):
    """Q = q at every step (MeZO's default q = 1; AdaZeta on RoBERTa uses q = 1 too)."""

    def __init__(self, q: int = 1):
        self.q = _check_int("q", q, 1)

    def __call__(self, step: int) -> int:
        _check_step(step)
        return self.q

    def __repr__(self) -> str:
        return f"ConstantSchedule(q={self.q})"


class AdaptiveSchedule(_Bound):
    """AdaZeta's sublinearly growing query count (arXiv 2406.18060, eq. 2).

        Q_k = min(max(floor(alpha * e_k ** beta), q_min), q_max),   e_k = step // steps_per_epoch

    q_min = 1 is the paper's and the reference code's clamp. ``q_min`` is our addition: epochs
    count from 0, so with q_min = 1 the first epoch always runs at Q = 1, and at the alpha and beta
    of the paper Q first reaches 2 in the 7th epoch, beyond any CPU budget. On SmolLM2-135M / real
    SST-2 (docs/study.md, the ablation) AdaZeta at Q = 1 and lr 1e-3 diverged or never gained,
    and at Q = 2 with the same lr and forward passes gained 17.0 and 13.5 test points over two
    seeds; conf/schedule/adaptive.yaml sets q_min = 2, the paper experiments 1.

    Epochs count from 0, as in the reference code (yifanycc/AdaZeta,
    large_models/trainer_adazeta.py: ``min(max(int(shrink_factor * (epoch ** inc_rate)), 1),
    num_pertub_max)`` inside the Hugging Face ``for epoch in range(...)`` loop). So the first
    epoch always runs with Q = 1 and Q changes only at epoch starts. The paper reports alpha 0.85,
    beta 0.45, q_max 20 (the defaults here).

    ``q_target`` is how the released code runs it (large_models/run.py and run_all_large_exp.sh:
    NUM=20, NUM_MAX=15, SHRINK=0.85, and no --use_num, so the script's --inc_rate 0.4 is
    overwritten): beta = ln(q_target / alpha) / ln(E), E = max_steps / steps_per_epoch the run's
    length in epochs, derived at bind, with Q still capped at q_max. For Llama-2-7B (10k steps,
    1000 examples, batch 16: E = 160) that is beta = ln(20 / 0.85) / ln(160) = 0.622 and Q capped
    at 15 from epoch 101 on. (The released loader keeps the last partial batch, 63 steps an epoch
    against our 62, so its epochs start a little later.)

    ``reach_max_at_last_epoch=True`` (an earlier reference version, large_models/
    trainer_dist_adazeta.py) replaces beta by log(q_max / alpha) / log(E_last), E_last = the
    0-based index of the last epoch = (max_steps - 1) // steps_per_epoch, so that
    alpha * E_last ** beta = q_max: Q reaches q_max exactly at the last epoch. (The reference
    divides by log(num_epochs), one epoch too many, so it never quite reaches q_max; it also
    clamps at 3 instead of 1. We follow the stated intent.) Degenerate cases: beta is clamped
    at >= 0 when alpha >= q_max; with E_last <= 1 no beta can shape the curve (1 ** beta = 1),
    so the given beta is kept, the last epoch is set to q_max, and a warning is logged.
    A 1e-9 tolerance under the floor keeps float round-off (e.g. 19.999999999) from losing a query.
    """

    def __init__(
        self,
        alpha: float = 0.85,
        beta: float = 0.45,
        q_max: int = 20,
        reach_max_at_last_epoch: bool = False,
        q_min: int = 1,
        q_target: int | None = None,
    ):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a number > 0, got alpha={alpha!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"beta must be a number >= 0, got beta={beta!r}")
        if not isinstance(reach_max_at_last_epoch, bool):
            raise ValueError(
                f"reach_max_at_last_epoch must be true or false, got {reach_max_at_last_epoch!r}"
            )
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.q_max = _check_int("q_max", q_max, 1)
        self.q_min = _check_int("q_min", q_min, 1)
        if self.q_min > self.q_max:
            raise ValueError(f"q_min={self.q_min} is above q_max={self.q_max}: the adaptive schedule keeps Q "
                             "within [q_min, q_max]; lower q_min or raise q_max")
        self.reach_max_at_last_epoch = reach_max_at_last_epoch
        self.q_target = None if q_target is None else _check_int("q_target", q_target, 1)
        if self.q_target is not None and reach_max_at_last_epoch:
            raise ValueError("q_target and reach_max_at_last_epoch each derive beta from the run's length: set "
                             "one of them (q_target: the released code's rule; reach_max_at_last_epoch: Q = q_max "
                             "at the last epoch)")
        self.effective_beta = self.beta
        self.last_epoch: int | None = None

    def bind(self, steps_per_epoch: int, max_steps: int) -> None:
        super().bind(steps_per_epoch, max_steps)
        self.last_epoch = (max_steps - 1) // steps_per_epoch
        self.effective_beta = self.beta
        epochs = max_steps / steps_per_epoch
        if self.q_target is not None:
            # The released code's inc_rate; a run of at most one epoch has no exponent to derive
            # (ln 1 = 0), and its only epoch, e = 0, takes q_min whatever beta is.
            if epochs > 1:
                self.effective_beta = max(math.log(self.q_target / self.alpha) / math.log(epochs), 0.0)
        elif self.reach_max_at_last_epoch:
            if self.last_epoch >= 2:
                beta = math.log(self.q_max / self.alpha) / math.log(self.last_epoch)
                self.effective_beta = max(beta, 0.0)
            else:
                log.warning(
                    "AdaptiveSchedule: reach_max_at_last_epoch needs at least 3 epochs to derive "
                    "beta (training has %d); keeping beta=%s and using q_max=%d in the last epoch",
                    self.last_epoch + 1,
                    self.beta,
                    self.q_max,
                )

    def epoch(self, step: int) -> int:
        """0-based epoch index of a 0-based global step."""
        self._require_bound()
        return _check_step(step) // self.steps_per_epoch

    def q_for_epoch(self, epoch: int) -> int:
        if (
            self.reach_max_at_last_epoch
            and self.last_epoch is not None
            and epoch >= self.last_epoch
        ):
            return self.q_max
        try:
            value = self.alpha * epoch**self.effective_beta
        except OverflowError:  # e.g. beta=1e300: far past any q_max
            return self.q_max
        if not math.isfinite(value):  # alpha * inf
            return self.q_max
        q = math.floor(value + 1e-9)
        return min(max(q, self.q_min), self.q_max)

    def __call__(self, step: int) -> int:
        return self.q_for_epoch(self.epoch(step))

    def __repr__(self) -> str:
        return (
            f"AdaptiveSchedule(alpha={self.alpha}, beta={self.beta}, q_max={self.q_max}, "
            f"reach_max_at_last_epoch={self.reach_max_at_last_epoch}, q_min={self.q_min}, q_target={self.q_target})"
        )


class LinearSchedule(_Bound):
    """MeZO's "linear" sample scheduler (princeton-nlp/MeZO, medium_models/src/trainer.py,
    ``get_num_samples``): ``max(1, int(global_step / max_steps * zero_order_sample))``.

        Q_k = max(q_start, floor(k * q_end / max_steps)),   k = 0-based global step

    q_end plays MeZO's ``zero_order_sample``; q_start generalises MeZO's hard-coded floor of 1.
    Faithful to MeZO, the ramp starts at 0 (so the first steps are clamped to q_start) and
    reaches q_end only at k = max_steps: the last step (k = max_steps - 1) gets
    floor((max_steps - 1) * q_end / max_steps), which is q_end - 1 whenever max_steps >= q_end.
    Integer arithmetic replaces MeZO's float division (same values, without round-off).
    """

    def __init__(self, q_start: int = 1, *, q_end: int):
        self.q_start = _check_int("q_start", q_start, 1)
        self.q_end = _check_int("q_end", q_end, 1)
        if q_end < q_start:
            raise ValueError(f"q_end must be >= q_start, got q_start={q_start}, q_end={q_end}")

    def __call__(self, step: int) -> int:
        self._require_bound()
        return max(self.q_start, _check_step(step) * self.q_end // self.max_steps)

    def __repr__(self) -> str:
        return f"LinearSchedule(q_start={self.q_start}, q_end={self.q_end})"
