"""The replay log of a ZO run: <run>/replay.jsonl (`train.replay_log`), which the loop appends to
after every step and `adazeta-replay` (adazeta/cli/replay.py) rebuilds the trainable parameters
from, without a forward pass.

A ZO run's whole update history is (seed_q, g_q) per step (docs/design.md, section 4.1): z_q is regenerated
from its seed, so each step's update can be applied again from the logged projected gradients.
<run>/replay.jsonl has one line per applied step:

    {"step": 12, "seeds": [s_0, ...], "grads": [g_0, ...], "lr": 1e-4, "perturbs": "round_trip"}

`perturbs` records the in-place writes the estimate made: "round_trip" (+eps z, -2 eps z, +eps z
per query, in order: in fp32 the round trip restores theta only to within a rounding, and an exact
replay repeats it), "round_trip_fused" (the same, but the last query's +eps z restore is folded
into the update: `zo.fused_update`), "none" (the in-forward perturbation of Sparse-MeZO, parallel
replicas, or any estimate that never writes the weights), or an explicit [[seed, scale], ...]
list: the step's own record of its estimate's writes (`ZOStep.writes`, which SPSA reports to it),
read after each step, so nothing of the method is wrapped or replaced to log them (`encode`;
`decode` reads it back). update_rule=conservative also logs the three losses it compared
(`rule_losses`), so it replays without a forward too. A step the divergence guard rejected is
logged as {"step": k, "applied": false, "perturbs": [...]}: its round trips happened, its update
did not. A checkpoint records how many records precede it (`ReplayLog.count`), and a rollback to
it rewinds the log there.

First-order methods (ft, lora_fo) have no replay log: backprop gradients are not a function of
seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from adazeta.config import Optimizer

# The in-place writes of one query's round trip: +eps z, -2 eps z, +eps z.
ROUND_TRIP = (1.0, -2.0, 1.0)


def kept(cfg: DictConfig) -> bool:
    """Whether a run of `cfg` keeps a replay log: train.replay_log=true with a ZO method (a
    first-order run keeps none, whatever the key says)."""
    return bool(cfg.train.replay_log) and cfg.method.optimizer == Optimizer.zo


class ReplayLog:
    """Appends one record per applied ZO step to <run>/replay.jsonl (`train.replay_log`)."""

    def __init__(self, path: Path, zo_step, records: list[str] = ()):
        self.path, self.step, self.rule = path, zo_step, zo_step.rule
        self.file = path.open("a", encoding="utf-8")
        self.file.writelines(line + "\n" for line in records)  # a resumed run's history
        self.file.flush()
        self.count = len(records)  # records written; a checkpoint saves it

    def append(self, step: int, seeds: list[int], grads: list[float], lr: float) -> None:
        record = {"step": step, "seeds": seeds, "grads": grads, "lr": lr, "perturbs": encode(self.step.writes, seeds)}
        if getattr(self.rule, "last_losses", None):
            record["rule_losses"] = self.rule.last_losses
        self.write(record)

    def reject(self, step: int) -> None:
        """A step the guard stopped before its update: only its in-place round trips happened."""
        self.write({"step": step, "applied": False, "perturbs": [list(p) for p in self.step.writes]})

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.count += 1

    def rewind(self, count: int) -> None:
        """After a rollback: keep the first `count` records (those before the checkpoint)."""
        self.file.close()
        self.path.write_text("".join(self.path.read_text().splitlines(keepends=True)[:count]))
        self.file = self.path.open("a", encoding="utf-8")
        self.count = count

    def close(self) -> None:
        self.file.close()


def patterns(seeds: list[int]) -> dict[str, list[tuple[int, float]]]:
    full = [(s, scale) for s in seeds for scale in ROUND_TRIP]
    return {"none": [], "round_trip": full, "round_trip_fused": full[:-1]}


def encode(perturbs: list[tuple[int, float]], seeds: list[int]):
    named = [name for name, writes in patterns(seeds).items() if writes == perturbs]
    return named[0] if named else [list(p) for p in perturbs]


def decode(perturbs, seeds: list[int]) -> list[tuple[int, float]]:
    if isinstance(perturbs, str):
        return patterns(seeds)[perturbs]
    return [(int(s), float(scale)) for s, scale in perturbs]
