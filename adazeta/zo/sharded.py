"""A ZO step across torchrun ranks: `Dist`, this process's place in the run, and `Sharded`, the
estimator that shares a step's work across the ranks and hands every rank the same Q projected
gradients (the modes are described in adazeta/engine/distributed.py, which joins the process group
and keeps the replicas identical).

`launched()` tells a process started by torchrun from a single one, so that the steps that run in
one process only can refuse torchrun before the process group exists.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

from adazeta.config import DistMode
from adazeta.zo.spsa import SPSA


def launched() -> bool:
    """True in a process started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Dist:
    """This process's place in the run; world == 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    mode: DistMode = DistMode.query
    comm_device: torch.device = torch.device("cpu")  # where the collectives' tensors live

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, examples: list) -> list:
        """Data mode: this rank's contiguous shard of a training batch (batch % world == 0)."""
        if not self.enabled or self.mode != DistMode.data:
            return examples
        n = len(examples) // self.world
        return examples[self.rank * n : (self.rank + 1) * n]

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (e.g. a signal that reached one rank first)."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self.comm_device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t.item())

    def from_main(self, value):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.enabled:
            return value
        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled and td.is_initialized():
            td.destroy_process_group()


class Sharded:
    """An estimator whose work is shared across ranks (wraps the method's own estimator, chosen
    when the method is built with a Dist of world > 1: adazeta/zo/estimators.py). Called like it:
    (loss_fn, seeds) -> [Q, 2] of (g_q, loss_q), identical on every rank.

    Every query restores its own perturbation (`can_defer_restore` is False): the queries of a step
    are split across ranks, so no rank holds the last query's displacement for a fused update."""

    can_defer_restore = False

    def __init__(self, inner, d: Dist, spsa: SPSA):
        self.inner, self.dist, self.spsa = inner, d, spsa
        self.writes_weights = inner.writes_weights

    def __call__(self, loss_fn, seeds: list[int], defer_restore: bool = False) -> torch.Tensor:
        d = self.dist
        if d.mode == DistMode.data:
            local = self.inner(loss_fn, seeds).to(d.comm_device)
            td.all_reduce(local, op=td.ReduceOp.SUM)  # g and the loss are linear in the shard means
            return (local / d.world).cpu()
        per_rank = math.ceil(len(seeds) / d.world)
        local = torch.full((per_rank, 2), math.nan, dtype=torch.float64)
        if self.writes_weights:
            # Query i runs on rank i mod W; the other ranks replay its in-place round trip (z only,
            # no forward), so every rank's weights round exactly as in a single process.
            for i, seed in enumerate(seeds):
                if i % d.world == d.rank:
                    local[i // d.world] = self.inner(loss_fn, [seed])[0]
                else:
                    self.spsa.perturb(seed, +1.0)
                    self.spsa.perturb(seed, -2.0)
                    self.spsa.perturb(seed, +1.0)
        elif mine := seeds[d.rank :: d.world]:
            local[: len(mine)] = self.inner(loss_fn, mine)
        local = local.to(d.comm_device)
        gathered = [torch.empty_like(local) for _ in range(d.world)]
        td.all_gather(gathered, local)
        gathered = [g.cpu() for g in gathered]
        return torch.stack([gathered[i % d.world][i // d.world] for i in range(len(seeds))])
