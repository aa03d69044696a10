"""Checkpoints: save, check and restore everything a run needs to continue exactly (which one to
resume from, and rewinding the run folder to it: adazeta/engine/resume.py).

    <run>/checkpoints/step-0000040/
        trainable.safetensors       the trainable parameters
        state.safetensors           the update rule's tensors (momentum, Adam moments; AdamW's for
                                    first-order methods) and the torch RNG states
        state.json                  step, data position, forward passes, the open log window, best
                                    dev metrics, the guard's recent losses, lr and rule scalars,
                                    Python/NumPy RNG states, the schedule, and the run's identity
                                    (method, model, task, seed, trainable names and shapes) + config
        best_trainable.safetensors  the best-dev weights as of this step (a hard link when possible)

A checkpoint is written into a temporary folder and renamed into place, so a crash never leaves a
half-written one; state.json is written last. Tensors are read with safetensors and scalars with
json: nothing is ever unpickled. `train.save_total_limit` newest checkpoints are kept; the run's
best_trainable.safetensors is kept apart.

Schedules and query seeds are pure functions of the step and the data order a pure function of
(seed, epoch), so the step and the number of batches consumed restore them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from adazeta.engine.guard import Guard, get_lr, set_lr
from adazeta.engine.tensor_files import fsync, read_tensors, tensor_specs, write_tensors
from adazeta.errors import CheckpointError
from adazeta.legacy_keys import upgrade_config
from adazeta.params import Trainable

log = logging.getLogger("adazeta")
FORMAT = 1
PREFIX = "step-"
IDENTITY_KEYS = ("method", "optimizer", "update_rule", "trainable", "model", "task", "seed")
# Keys a resumed run may change without the checkpoint becoming someone else's.
FREE_KEYS = ("train.resume",)
# What restore() reads from state.json.
STATE_KEYS = ("step", "forward_passes", "window", "best", "rollbacks", "truncated", "optimizer", "guard", "rng",
              "identity", "config")


@dataclass
class LoopState:
    """What the training loop carries from one step to the next, besides the weights and the
    update rule: all of it goes into a checkpoint."""

    step: int = 0  # steps applied; also the data position (one batch per step)
    forward_passes: int = 0
    window: list[list] = field(default_factory=list)  # [loss, g, q, step_s, tokens] since the last train log
    best: dict = field(default_factory=dict)  # step and dev metrics of the best-dev weights
    rollbacks: int = 0
    tokens: int = 0  # forward tokens this process has processed in training steps (tokens x passes)
    train_s: float = 0.0  # wall seconds this process has spent in training steps


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({e}): the checkpoint is incomplete or damaged; "
                              "resume from another checkpoint of the run") from e


def differences(a: dict, b: dict, a_name: str, b_name: str) -> str:
    """What differs between two {name: (shape, dtype)} tables, a few names of each kind."""
    parts = {
        f"not in {a_name}": sorted(b.keys() - a.keys()),
        f"not in {b_name}": sorted(a.keys() - b.keys()),
        f"shape/dtype differs ({a_name.removeprefix('the ')} vs {b_name})": [
            f"{n}: {a[n][0]} {a[n][1]} vs {b[n][0]} {b[n][1]}" for n in sorted(a.keys() & b.keys()) if a[n] != b[n]
        ],
    }
    return "; ".join(f"{what}: {', '.join(names[:2])}{' ...' if len(names) > 2 else ''} ({len(names)})"
                     for what, names in parts.items() if names)


# The JSON types of state.json's entries that restore() reads (where present).
STATE_TYPES = {"step": int, "forward_passes": int, "rollbacks": int, "window": list, "best": dict, "guard": dict,
               "rng": dict, "identity": dict}


def verify(folder: Path) -> dict:
    """Read every file of a checkpoint and check that they fit together, before anything is
    restored or any file of a run is touched: state.json holds what restore() reads; every
    safetensors header is whole; trainable.safetensors (and best_trainable.safetensors, when
    present) hold exactly the tensors, shapes and dtypes state.json lists; state.safetensors holds
    the torch RNG state. Returns state.json; writes nothing. Only headers are read: a damaged
    tensor inside a whole file is found when restore() loads it, still before any file changes."""
    saved = read_json(folder / "state.json")
    if saved.get("format") != FORMAT or "identity" not in saved:
        raise CheckpointError(f"{folder / 'state.json'} is not an adazeta checkpoint of format {FORMAT}; "
                              "resume from a checkpoint written by this version of adazeta-train")
    lacking = [k for k in STATE_KEYS if k not in saved] + [f"rng.{k}" for k in ("python", "numpy")
                                                           if k not in (saved.get("rng") or {})]
    if lacking:
        raise CheckpointError(f"{folder / 'state.json'} lacks {', '.join(lacking)}: the checkpoint is incomplete "
                              "or damaged; resume from another checkpoint of the run")
    mistyped = [k for k, t in STATE_TYPES.items() if not isinstance(saved[k], t) or isinstance(saved[k], bool)]
    if mistyped:
        shown = ", ".join(f"{k}={saved[k]!r}" for k in mistyped)
        raise CheckpointError(f"{folder / 'state.json'} holds {shown}, not what adazeta-train writes: the checkpoint "
                              "is damaged; resume from another checkpoint of the run")
    listed = {n: (list(shape), dtype) for n, shape, dtype in saved["identity"]["trainables"]}
    for name in ("trainable.safetensors", "best_trainable.safetensors"):
        path = folder / name
        if name == "trainable.safetensors" or path.exists():
            held = tensor_specs(path)
            if held != listed:
                raise CheckpointError(
                    f"{path} does not hold the tensors its state.json lists ({differences(held, listed, 'the file', 'state.json')}): "
                    "the checkpoint is damaged; resume from another checkpoint of the run"
                )
    if "rng.torch" not in tensor_specs(folder / "state.safetensors"):
        raise CheckpointError(f"{folder / 'state.safetensors'} lacks the torch RNG state (rng.torch): the checkpoint "
                              "is damaged; resume from another checkpoint of the run")
    return saved


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint's files, or None if they are intact."""
    try:
        verify(folder)
    except CheckpointError as e:
        return str(e)
    return None


def complete(root: Path) -> list[Path]:
    """The run's complete checkpoints (state.json present), oldest first."""
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(folders, key=lambda p: int(p.name[len(PREFIX):]))


def identity(cfg: DictConfig, trainables: list[Trainable]) -> dict:
    """What makes a checkpoint this run's: the method, model, task, seed and trainable set."""
    m = cfg.method
    return {
        "method": m.name, "optimizer": m.optimizer.value, "update_rule": m.update_rule.value,
        "trainable": m.trainable.value, "model": cfg.model.name, "task": cfg.task.name, "seed": cfg.seed,
        "trainables": [[t.name, list(t.param.shape), str(t.param.dtype).removeprefix("torch.")] for t in trainables],
    }


def plain_config(cfg: DictConfig) -> dict:
    out = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    out.pop("hydra", None)
    return out


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ between a checkpoint's config and this run's, as
    `key: old -> new`; a checkpoint of an earlier release is read with its flat method keys moved
    into their nodes (adazeta/legacy_keys.py)."""
    old, new = flatten(upgrade_config(copy.deepcopy(saved))), flatten(current)
    keys = sorted((old.keys() | new.keys()) - set(FREE_KEYS))
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys if old.get(k) != new.get(k)]


def mismatch(folder: Path, theirs: dict, mine: dict) -> None:
    diff = [f"{k}={theirs.get(k)!r} (this run: {mine[k]!r})" for k in IDENTITY_KEYS if theirs.get(k) != mine[k]]
    if diff:
        raise CheckpointError(
            f"checkpoint {folder} belongs to a different run: {', '.join(diff)}. Resume with the "
            "same method, model, task and seed as the run that wrote it (other keys may change)"
        )



# -- RNG and optimiser state -----------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every global RNG: torch (CPU, CUDA), Python, NumPy. ZO seeds and the data order use
    explicit generators seeded from pure functions; the global ones matter for dropout (first-order
    methods) and for anything a library draws."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    scalars = {"python": [version, list(state), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    return tensors, scalars


def cuda_rng_states(tensors: dict[str, torch.Tensor], device_count: int) -> tuple[dict[int, torch.Tensor], list[int]]:
    """The saved CUDA RNG states (`rng.cuda.<index>`, one per GPU visible when the checkpoint was
    written) that this process can restore: ({index: state} for index < device_count, in index
    order, and the indices dropped). Indices compare as numbers, not strings (rng.cuda.10 after
    rng.cuda.2); a run resumed on fewer GPUs restores those it has."""
    found = sorted((int(k.removeprefix("rng.cuda.")), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    return {i: v for i, v in found if i < device_count}, [i for i, _ in found if i >= device_count]


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda, dropped = cuda_rng_states(tensors, torch.cuda.device_count())
        for index, state in cuda.items():
            torch.cuda.set_rng_state(state, index)
        if dropped:
            log.warning("the checkpoint holds CUDA RNG states for GPUs %s, which this process does not see "
                        "(%d visible): they are not restored", dropped, torch.cuda.device_count())
    version, state, gauss = scalars["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_state(stepper) -> tuple[dict[str, torch.Tensor], dict]:
    """The update rule's state (ZO) or AdamW's (first order), as tensors + JSON scalars: the step's
    own `state_dict()` (adazeta.step.Step)."""
    return stepper.state_dict()


def load_optimizer_state(stepper, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    stepper.load_state_dict(tensors, scalars)


# -- the checkpointer ------------------------------------------------------------------------


class Checkpointer:
    """Saves, prunes and restores the checkpoints of one run (only rank 0 writes)."""

    def __init__(self, run_dir: Path, cfg: DictConfig, method, guard: Guard, objective, replay=None, writes=True):
        self.run_dir, self.root = run_dir, run_dir / "checkpoints"
        self.every, self.limit = cfg.train.save_steps, cfg.train.save_total_limit
        self.method, self.guard, self.objective, self.writes = method, guard, objective, writes
        self.replay = replay  # the ReplayLog, whose position a checkpoint records
        self.identity = identity(cfg, method.trainables)
        self.config = plain_config(cfg)
        self.last: Path | None = None  # the newest checkpoint written or restored

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    @torch.no_grad()
    def save(self, state: LoopState) -> Path:
        """Write checkpoints/step-<N> atomically; returns its folder."""
        final = self.root / f"{PREFIX}{state.step:07d}"
        if not self.writes:
            return final
        tmp = self.root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # One tensor at a time (write_tensors): trainables may be views of one flat buffer per group
        # (adazeta/zo/spsa.py), and a full-parameter set is the whole model.
        opt_tensors, opt_scalars = optimizer_state(self.method.step)
        rng_tensors, rng_scalars = rng_state()
        write_tensors(tmp / "trainable.safetensors", [(t.name, t.param) for t in self.method.trainables])
        write_tensors(tmp / "state.safetensors", {**opt_tensors, **rng_tensors})
        best = self.run_dir / "best_trainable.safetensors"
        if best.exists():
            try:  # the best file is replaced (never rewritten in place), so a link keeps this version
                os.link(best, tmp / best.name)
            except OSError:
                shutil.copyfile(best, tmp / best.name)
        payload = {
            "format": FORMAT, **asdict(state), "data_position": state.step,
            "truncated": self.objective.truncated, "optimizer": opt_scalars, "guard": self.guard.state_dict(),
            "replay_records": self.replay.count if self.replay is not None else None,
            "rng": rng_scalars, "identity": self.identity, "config": self.config, "time": time.time(),
        }
        (tmp / "state.json").write_text(json.dumps(payload))
        for p in tmp.iterdir():
            fsync(p)
        if final.exists():  # reached again after a rollback
            shutil.rmtree(final)
        tmp.rename(final)
        fsync(self.root)
        self.last = final
        self.prune()
        return final

    def prune(self) -> None:
        for old in complete(self.root)[: -self.limit]:
            shutil.rmtree(old, ignore_errors=True)

    def check(self, folder: Path, saved: dict) -> None:
        """Refuse a checkpoint written by another method, model, task, seed or trainable set."""
        mine, theirs = self.identity, saved["identity"]
        mismatch(folder, theirs, mine)
        have = {n: (s, d) for n, s, d in mine["trainables"]}
        got = {n: (s, d) for n, s, d in theirs["trainables"]}
        if have != got:
            shown = differences(got, have, "the checkpoint", "this run")
            raise CheckpointError(
                f"checkpoint {folder} has a different trainable set: {shown}. Resume with the same "
                "method, adapter and LoRA settings and model.dtype as the run that wrote it"
            )

    @torch.no_grad()
    def restore(self, folder: Path, rollback: bool = False) -> LoopState:
        """Load a checkpoint into the trainables, the update rule, the guard and the RNGs; return
        the loop state. A rollback keeps the lr it has just lowered and rewinds the replay log."""
        saved = read_json(folder / "state.json")
        self.check(folder, saved)
        trainables = read_tensors(folder / "trainable.safetensors")
        tensors = read_tensors(folder / "state.safetensors")
        for t in self.method.trainables:
            t.param.copy_(trainables[t.name])
        lr = get_lr(self.method.step)
        try:
            load_optimizer_state(self.method.step, tensors, saved["optimizer"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {folder}: the update rule's state does not fit this run ({e})") from e
        try:
            return self.apply(folder, saved, tensors, lr, rollback)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:  # a whole file with odd values
            raise CheckpointError(f"checkpoint {folder}: state.json or state.safetensors holds values this version "
                                  f"cannot restore ({type(e).__name__}: {e}): the checkpoint is damaged; resume from "
                                  "another checkpoint of the run") from None

    def apply(self, folder: Path, saved: dict, tensors: dict, lr: float, rollback: bool) -> LoopState:
        """The rest of restore(): config changes, lr, RNGs, guard and loop state."""
        changes = config_changes(saved["config"], self.config)
        if rollback:
            set_lr(self.method.step, lr)
            if self.replay is not None:
                self.replay.rewind(saved["replay_records"])
        elif changes:
            log.warning("resuming with a changed config: %s", "; ".join(changes))
            if saved["config"]["method"]["lr"] != self.config["method"]["lr"]:  # the new method.lr wins
                set_lr(self.method.step, self.config["method"]["lr"])
        set_rng_state(tensors, saved["rng"])
        self.guard.load_state_dict(saved["guard"])
        self.objective.truncated = saved["truncated"]
        self.last = folder
        # Checkpoints written before tokens were counted: their window entries lack the count (0).
        window = [w + [0] * (5 - len(w)) for w in saved["window"]]
        return LoopState(**{k: saved[k] for k in ("step", "forward_passes", "best", "rollbacks")}, window=window,
                         tokens=saved.get("tokens", 0), train_s=saved.get("train_s", 0.0))
