"""Checkpoints: save, find, check and restore everything a run needs to continue exactly.

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

import json
import logging
import os
import random
import shutil
import struct
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from adazeta.engine.guard import Guard, get_lr, set_lr
from adazeta.errors import CheckpointError
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
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors -> torch


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


# -- files ---------------------------------------------------------------------------------

# torch dtype -> safetensors dtype name
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@torch.no_grad()
def write_tensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor]) -> None:
    """Write `tensors` as a safetensors file, one tensor at a time: the header first (names, dtypes,
    shapes, offsets: known without the data), then each tensor's bytes straight from its storage
    (moved to the CPU, and made contiguous, one tensor at a time). safetensors' own save_file
    takes every tensor at once and turns each into a bytes copy, and tensors that share memory (the
    views of one flat buffer a ZO step keeps its adapters in) must be copied before it accepts them:
    for a full-parameter set that is one or two extra copies of the model in host memory (SmolLM2-
    135M: +0.96 GiB on a 0.46 GiB model, measured). Here the peak is the largest tensor."""
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    header, offset = {}, 0
    for name, t in items:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"write_tensors: {name} has dtype {t.dtype}, which safetensors has no name for here")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))


@torch.no_grad()
def read_into(path: Path, params: dict[str, torch.Tensor]) -> None:
    """Copy the tensors of a safetensors file into `params` (name -> tensor), one at a time, read
    with plain file reads straight into each CPU tensor's storage (through a buffer of that tensor's
    size for another device or layout). safetensors' loaders map the file, and its mapped pages
    count in the process's resident set: the whole file on top of the model (+0.50 GiB for
    SmolLM2-135M, measured)."""
    present(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            start = 8 + size
            missing = set(params) - set(header)
            if missing:
                raise CheckpointError(f"{path} lacks {len(missing)} of the trainable tensors, e.g. {sorted(missing)[0]}")
            for name, p in params.items():
                spec = header[name]
                a, b = spec["data_offsets"]
                if spec["dtype"] != SAFETENSORS_DTYPES.get(p.dtype) or list(spec["shape"]) != list(p.shape):
                    raise CheckpointError(f"{path}: {name} is {spec['dtype']} {spec['shape']}, the run's tensor "
                                          f"{SAFETENSORS_DTYPES.get(p.dtype)} {list(p.shape)}")
                direct = p.device.type == "cpu" and p.is_contiguous()
                dst = p if direct else torch.empty(p.shape, dtype=p.dtype)
                f.seek(start + a)
                if b > a and f.readinto(memoryview(dst.reshape(-1).view(torch.uint8).numpy())) != b - a:
                    raise CheckpointError(f"{path} ends inside {name}: the file is truncated")
                if not direct:
                    p.copy_(dst)
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise unreadable(path, e) from e



def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a CheckpointError saying what is wrong with it."""
    present(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, e) from e


def tensor_specs(path: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) of a safetensors file, from its header alone: safetensors refuses a
    header that does not cover the whole file, so a truncated file fails here too."""
    present(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
            return {k: (list(s.get_shape()), DTYPES.get(s.get_dtype(), s.get_dtype())) for k, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, e) from e


def present(path: Path) -> None:
    if not path.is_file():
        found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        pickles = [n for n in found if n.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt"))]
        hint = (f" (found {', '.join(pickles)}: checkpoints are read as safetensors only, never "
                "unpickled, because loading a pickle can run arbitrary code)") if pickles else ""
        raise CheckpointError(f"checkpoint file {path} is missing{hint}; resume from a complete checkpoint folder")


def unreadable(path: Path, e: Exception) -> CheckpointError:
    with path.open("rb") as f:
        head = f.read(2)
    what = "a pickle, not safetensors" if head[:1] == b"\x80" or head == b"PK" else "damaged or truncated"
    return CheckpointError(
        f"cannot read {path} ({e}): the file is {what}. Checkpoints are loaded with safetensors "
        "only; resume from another checkpoint of the run"
    )


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
    old, new = flatten(saved), flatten(current)
    keys = sorted((old.keys() | new.keys()) - set(FREE_KEYS))
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys if old.get(k) != new.get(k)]


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


# -- resuming --------------------------------------------------------------------------------


def output_root(run_dir: Path, sweep_dir: Path | None) -> Path:
    """Where `train.resume=auto` looks: outputs/runs for single runs (run folders are
    <root>/<date>/<time>_...), outputs/multirun for sweep jobs (<root>/<date>/<time>/<job>)."""
    return sweep_dir.parent.parent if sweep_dir is not None else run_dir.parent.parent


def find(resume: str, cfg: DictConfig, run_dir: Path, sweep_dir: Path | None = None) -> Path | None:
    """The checkpoint folder `train.resume` names: a checkpoint folder, a run folder's newest
    checkpoint, or (`auto`) the newest checkpoint under the output root of a run with this config,
    None if there is none (so the same command starts a run and resumes it after a pre-emption)."""
    if resume == "auto":
        root = output_root(run_dir, sweep_dir)
        mine = plain_config(cfg)
        candidates = []
        states = [*root.glob(f"*/*/checkpoints/{PREFIX}*/state.json"), *root.glob(f"*/*/*/checkpoints/{PREFIX}*/state.json")]
        for state in states:
            try:
                saved = json.loads(state.read_text())
            except (OSError, ValueError):
                continue
            if not config_changes(saved.get("config", {}), mine):
                candidates.append((saved.get("time", 0.0), state.parent))
        if not candidates:
            log.info("train.resume=auto: no checkpoint of a run with this config under %s; starting afresh", root)
            return None
        damaged = []
        for _, folder in sorted(candidates, reverse=True):  # newest first
            wrong = damage(folder)
            if wrong is None:
                log.info("train.resume=auto: resuming from %s, the newest intact one of %d checkpoints of runs with "
                         "this config%s", folder, len(candidates),
                         f" (skipped {len(damaged)} newer damaged ones: {', '.join(map(str, damaged))})" if damaged else "")
                return folder
            log.warning("train.resume=auto: skipping a damaged checkpoint: %s", wrong)
            damaged.append(folder)
        log.warning("train.resume=auto: every checkpoint of a run with this config under %s is damaged; starting afresh", root)
        return None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume!r} is not a folder: give a run folder, one of its "
                              "checkpoints/step-<N> folders, or auto")
    if (path / "state.json").is_file():
        return intact(path, cfg)
    if path.name.startswith(PREFIX):
        raise CheckpointError(f"train.resume={resume!r} is an incomplete checkpoint (no state.json): the run was "
                              "stopped while writing it; resume from its run folder to take the newest complete one")
    found = complete(path / "checkpoints")
    if not found:
        raise CheckpointError(
            f"train.resume={resume!r} has no checkpoint (no checkpoints/{PREFIX}<N>/state.json in it): "
            "runs save one every train.save_steps steps, at the end and on SIGINT/SIGTERM; start this run "
            "afresh, or give the folder of a run that saved one"
        )
    return intact(found[-1], cfg)


def intact(folder: Path, cfg: DictConfig) -> Path:
    """precheck(), and when the checkpoint is damaged, an error that names the newest intact
    checkpoint of the same run."""
    wrong = damage(folder)
    if wrong:
        other = next((f for f in reversed(complete(folder.parent)) if f != folder and damage(f) is None), None)
        hint = f". The newest intact checkpoint of this run is {other}: resume from it with train.resume={other}"
        raise CheckpointError(wrong + (hint if other else ""))
    return precheck(folder, cfg)


def precheck(folder: Path, cfg: DictConfig) -> Path:
    """What can be checked before the model loads: every file (verify), the run's identity and
    the step."""
    saved = verify(folder)
    mine = {"method": cfg.method.name, "optimizer": cfg.method.optimizer.value, "update_rule": cfg.method.update_rule.value,
            "trainable": cfg.method.trainable.value, "model": cfg.model.name, "task": cfg.task.name, "seed": cfg.seed}
    mismatch(folder, saved["identity"], mine)
    if saved["step"] > cfg.train.max_steps:
        raise CheckpointError(f"checkpoint {folder} is at step {saved['step']}, past train.max_steps={cfg.train.max_steps}: "
                              f"set train.max_steps >= {saved['step']} to continue the run")
    return folder


def mismatch(folder: Path, theirs: dict, mine: dict) -> None:
    diff = [f"{k}={theirs.get(k)!r} (this run: {mine[k]!r})" for k in IDENTITY_KEYS if theirs.get(k) != mine[k]]
    if diff:
        raise CheckpointError(
            f"checkpoint {folder} belongs to a different run: {', '.join(diff)}. Resume with the "
            "same method, model, task and seed as the run that wrote it (other keys may change)"
        )


def rows_until(path: Path, step: int) -> list[dict]:
    """The JSONL rows of a run up to `step`, without the end-of-run best/test rows."""
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise CheckpointError(f"{path}, line {i}: not a metrics row with a step ({line[:80]!r}); the earlier run's "
                                  "curve is damaged: fix or delete that line, then resume again (nothing was changed)")
        rows.append(row)
    return [r for r in rows if r["step"] <= step and not any(k.startswith(("best/", "test/")) for k in r)]


def carry_over(folder: Path, run_dir: Path) -> tuple[list[dict], list[str]]:
    """Prepare a resumed run's folder: returns the old run's metric rows up to the checkpoint (to
    log again, so every logger sees the whole curve) and its replay records; copies the best-dev
    weights. Resuming into the old run's own folder rewinds it to the checkpoint."""
    old_run = folder.parent.parent
    saved = read_json(folder / "state.json")
    step, count = saved["step"], saved.get("replay_records") or 0
    rows = rows_until(old_run / "metrics.jsonl", step)
    replay = old_run / "replay.jsonl"
    records = replay.read_text().splitlines()[:count] if replay.is_file() else []
    for name in ("metrics.jsonl", "replay.jsonl", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)  # only non-empty when resuming in place
    for later in complete(run_dir / "checkpoints"):
        if int(later.name[len(PREFIX):]) > step:
            shutil.rmtree(later)
    best = folder / "best_trainable.safetensors"
    if best.exists():
        tmp = run_dir / "best_trainable.safetensors.tmp"
        shutil.copyfile(best, tmp)
        tmp.replace(run_dir / "best_trainable.safetensors")
    (run_dir / "resumed_from.txt").write_text(f"{folder}\n")
    log.info("resuming from %s (step %d of run %s)", folder, step, old_run)
    return rows, records


def rewind_metrics(run_dir: Path, step: int) -> None:
    """After a rollback: move the rows logged after `step` to metrics_rolled_back.jsonl, so
    metrics.jsonl stays one curve (the log file keeps the whole story)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    with (run_dir / "metrics_rolled_back.jsonl").open("a") as f:
        f.writelines(line for line in lines if json.loads(line)["step"] > step)
    path.write_text("".join(keep))  # same file: the logger's append-mode handle writes after it
