"""What a trainable tensor is to every part of adazeta: the trainable sets build `Trainable`s, the
ZO estimators and update rules move them, the engine checks, saves and compares them.

`LOW_PRECISION` names the dtypes whose ZO updates are too small to survive rounding to nearest:
the update rules write them with stochastic rounding and the steps never perturb them in place
(adazeta/zo/spsa.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dtypes whose updates are written with stochastic rounding (adazeta/zo/spsa.py).
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class Trainable:
    """One trainable tensor and whether weight decay applies to it."""

    name: str
    param: torch.nn.Parameter
    decay: bool
