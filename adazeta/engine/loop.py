"""The training loop behind `adazeta-train` (entrypoint: adazeta/cli/train.py).

A run is three calls (`fit`): `start` builds it (the task, model, objective and method come from
the one build path, adazeta/engine/build.py; then resume, the guard, checkpoints, the replay log and the
loggers), `train` runs the steps, `finish` evaluates the best-dev weights on test and writes the
summary. Each step draws a batch, asks the query schedule for Q, estimates Q projected gradients
with two-sided SPSA (2Q forward passes, no autograd) and applies the update; every
`train.eval_steps` it evaluates on dev and keeps the best-dev weights. Everything the run writes
goes into its Hydra output folder; `start` closes what it opened on every exit.

Reliability is a few named calls: the divergence guard checks each step before its update
(adazeta/engine/guard.py); checkpoints are saved every `train.save_steps` and restored by `train.resume`
(adazeta/engine/checkpoint.py, adazeta/engine/resume.py); SIGINT/SIGTERM stop the run after the current step with a checkpoint
(adazeta/engine/interrupt.py); ZO steps are appended to a replay log (adazeta/engine/replay_log.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from adazeta.config import GuardAction, Optimizer, ZOObjective
from adazeta.engine import checkpoint, distributed, replay_log, resume, run_folder
from adazeta.engine.build import Run, build_run, check_config, to_device
from adazeta.engine.guard import Guard, check_precision, get_lr, set_lr
from adazeta.engine.interrupt import interruption, resume_command
from adazeta.engine.loggers import JsonlLogger, Loggers, MetricLogger, WandbLogger
from adazeta.engine.memory import device_peaks_gib, get_memory_stats, reset_peak
from adazeta.engine.replay_log import ReplayLog
from adazeta.engine.tensor_files import read_into, write_tensors
from adazeta.errors import ConfigError, DivergenceError, Interrupted
from adazeta.params import Trainable
from adazeta.tasks import Example
from adazeta.zo.sharded import Dist

log = logging.getLogger("adazeta")


def batches(examples: list[Example], batch_size: int, seed: int, start: int = 0):
    """Endless stream of training batches; a new shuffle each epoch, from its own RNG. `start`
    skips that many batches (a resumed run's data position) without drawing them."""
    offsets = range(0, len(examples) - batch_size + 1, batch_size) or [0]
    epoch, skip = divmod(start, len(offsets))
    while True:
        order = list(examples)
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for i in offsets[skip:]:
            yield order[i : i + batch_size]
        epoch, skip = epoch + 1, 0


def save_trainables(trainables: list[Trainable], path: Path) -> None:
    """The trainables as a safetensors file, one tensor at a time (no copy of the set in memory)."""
    tmp = path.with_suffix(".tmp")
    write_tensors(tmp, [(t.name, t.param) for t in trainables])
    tmp.replace(path)  # atomic: a crash never leaves a half-written file


def load_trainables(trainables: list[Trainable], path: Path) -> None:
    read_into(path, {t.name: t.param for t in trainables})


def find_resume(cfg: DictConfig, run_dir: Path) -> Path:
    """The checkpoint `train.resume` names (`auto`: searched for under the output root)."""
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    sweep = Path(hc.sweep.dir) if hc is not None and hc.mode == RunMode.MULTIRUN else None
    return resume.find(cfg.train.resume, cfg, run_dir, sweep)


def claim(cfg: DictConfig, run_dir: Path) -> Path | None:
    """Hold the run folder and return the checkpoint to resume from (None: a fresh start). A
    folder that another process runs in, or that holds a run other than the one resumed in place,
    is refused before anything is written into it (adazeta/engine/run_folder.py)."""
    run_folder.in_use(run_dir)
    resume_from = find_resume(cfg, run_dir) if cfg.train.resume else None
    run_folder.claim(run_dir, resume_from.parent.parent if resume_from is not None else None)
    return resume_from


def build_loggers(cfg: DictConfig, run_dir: Path) -> Loggers:
    loggers: list[MetricLogger] = [JsonlLogger(run_dir)]
    if cfg.logger.name == "wandb":
        hc = HydraConfig.get()
        group = None
        if hc.mode == RunMode.MULTIRUN:
            group = "/".join(Path(hc.sweep.dir).parts[-2:])
        name = cfg.logger.name_template or f"{cfg.method.name}-{cfg.task.name}-{cfg.model.name}-s{cfg.seed}"
        tags = [f"method:{cfg.method.name}", f"task:{cfg.task.name}", f"model:{cfg.model.name}", *cfg.logger.tags]
        wandb_cfg = OmegaConf.merge(cfg.logger, {"job_type": cfg.logger.job_type or cfg.method.name})
        loggers.append(WandbLogger(wandb_cfg, run_dir, name=name, group=group, tags=tags))
    out = Loggers(loggers)
    out.log_config(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return out


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train and evaluate; return the summary (also written to <run_dir>/summary.json). The run
    folder stays locked until the run ends."""
    try:
        return fit(cfg, run_dir)
    finally:
        run_folder.release(run_dir)


class StepStats(NamedTuple):
    """One step in the metric window (the steps since the last train log; a checkpoint keeps the
    open window, as lists in this order)."""

    loss: float
    projected_grad: float | None  # None for first-order methods
    q: int
    step_s: float
    tokens: int  # forward tokens: the batch's tokens times the step's forward passes


@dataclass
class Training:
    """A run in training: its objects (`run`) and what trains them. Made by `start`."""

    cfg: DictConfig
    run_dir: Path
    run: Run
    dist: Dist
    ckpt: checkpoint.Checkpointer
    state: checkpoint.LoopState
    replay: ReplayLog | None
    loggers: Loggers
    bar: tqdm
    dev_batches: list  # the dev and test splits, encoded once
    test_batches: list
    resume_from: Path | None
    t_start: float
    resyncs: int = 0  # replicas put back in step by the drift check (torchrun)

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best_trainable.safetensors"


def fit(cfg: DictConfig, run_dir: Path) -> dict:
    """The run: build, train, finish."""
    with start(cfg, run_dir) as t:
        train(t)
        return finish(t)


@contextlib.contextmanager
def start(cfg: DictConfig, run_dir: Path) -> Iterator[Training]:
    """Build the run (adazeta/engine/build.py) and what trains it: the guard, the checkpointer (restoring
    `train.resume`), the replay log, the loggers and the progress bar. On every exit (the end, an
    error, a divergence, an interruption) the replay log, the loggers and the bar are closed."""
    t_start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_config(cfg)  # what the method's step does not support: before any process group is joined
    dist = distributed.setup(cfg.dist, cfg.model, cfg.train.batch_size)  # no-op without torchrun
    # Fails before anything loads; under torchrun rank 0 holds the folder and finds the checkpoint.
    resume_from = dist.from_main(claim(cfg, run_dir) if dist.is_main else None)
    if dist.enabled and cfg.guard.action == GuardAction.rollback:
        raise ConfigError("guard.action=rollback is not available under torchrun (only rank 0 keeps checkpoints); "
                          "use guard.action=stop and resume with train.resume=<run folder>")

    run = build_run(cfg, dist)
    method, splits, ebs = run.method, run.splits, cfg.train.eval_batch_size
    dev_batches, test_batches = run.objective.eval_batches(splits.dev, ebs), run.objective.eval_batches(splits.test, ebs)
    reset_peak(run.mem_devices)  # the training peak: weights, method state, activations; not model loading
    log.info(
        "%s on %s/%s: %d trainable parameters, %d train / %d dev / %d test examples, %d steps",
        cfg.method.name, cfg.task.name, cfg.model.name, run.trainable_params,
        len(splits.train), len(splits.dev), len(splits.test), cfg.train.max_steps,
    )
    guard = Guard(cfg.guard)  # passed to each step: sees its losses and projected gradients before its update
    check_precision(method.trainables, zo=cfg.method.optimizer == Optimizer.zo)
    ckpt = checkpoint.Checkpointer(run_dir, cfg, method, guard, run.objective, writes=dist.is_main)
    metric = run.objective.metric  # accuracy, or f1 for SQuAD/DROP
    state = checkpoint.LoopState(best={"step": -1, f"eval/{metric}": -1.0, "eval/loss": math.inf})
    rows, records = [], []
    if resume_from is not None:
        # Every file is read and checked against this run first: a bad checkpoint fails here,
        # before carry_over rewinds a run folder resumed in place.
        state = ckpt.restore(resume_from)
        if dist.is_main:
            rows, records = resume.carry_over(resume_from, run_dir)
    with contextlib.ExitStack() as opened:
        replay = None
        if replay_log.kept(cfg) and dist.is_main:
            replay = opened.enter_context(contextlib.closing(ReplayLog(run_dir / "replay.jsonl", method.step, records)))
        ckpt.replay = replay  # its position goes into each checkpoint; a rollback rewinds it
        loggers = build_loggers(cfg, run_dir) if dist.is_main else Loggers([])  # only rank 0 writes
        opened.enter_context(contextlib.closing(loggers))
        for row in rows:  # a resumed run's folder starts with the old run's curve up to its checkpoint
            loggers.log_dict({k: v for k, v in row.items() if k != "step"}, row["step"])
        if cfg.guard.action == GuardAction.rollback and ckpt.last is None:
            ckpt.save(state)  # a good state to roll back to before the first periodic checkpoint
        bar = opened.enter_context(contextlib.closing(tqdm(
            total=cfg.train.max_steps, initial=state.step, disable=not (cfg.train.progress and dist.is_main),
            desc=cfg.method.name)))
        yield Training(cfg, run_dir, run, dist, ckpt, state, replay, loggers, bar, dev_batches, test_batches,
                       resume_from, t_start)


def train(t: Training) -> None:
    """The training steps, from the checkpoint's step (or 0) to `train.max_steps`: batch, Q, step,
    log, eval, checkpoint, stop."""
    cfg, run, dist = t.cfg, t.run, t.dist
    # The zero-shot point of the curve (and the only evaluation of a run with max_steps=0); a
    # resumed run already has it from the run it continues.
    if (cfg.train.eval_at_start or cfg.train.max_steps == 0) and t.state.step == 0 and dist.is_main:
        t.loggers.log_dict({"forward_passes": 0, **evaluate_dev(t, 0)}, 0)
    stream = train_batches(t)
    with interruption(t.run_dir) as stop:  # SIGINT/SIGTERM: checkpoint and exit after the current step
        while t.state.step < cfg.train.max_steps:
            step, t0 = t.state.step + 1, time.perf_counter()
            examples = dist.shard(next(stream))
            # method.objective=metric scores the batch as evaluation does (prompts, no gold continuation)
            encoded = run.objective.encode(examples, train=cfg.method.objective != ZOObjective.metric)
            tokens = int(encoded["attention_mask"].sum()) if "attention_mask" in encoded else encoded["input_ids"].numel()
            batch = to_device(encoded, run.device)
            q = run.schedule(step - 1)  # schedules count steps from 0
            try:
                loss_fn = run.objective.batch_loss(run.method.model, batch, cfg.method.objective, examples)
                result = run.method.step(loss_fn, step, q, guard=t.ckpt.guard)
            except DivergenceError as e:  # raised by the guard before the update: no weight moved
                t.state = diverged(t, e)
                stream = train_batches(t)
                continue
            state = t.state
            state.step, state.forward_passes = step, state.forward_passes + result.forward_passes
            if t.replay is not None:
                t.replay.append(step, result.seeds, result.grads, get_lr(run.method.step))
            step_s = time.perf_counter() - t0
            step_tokens = tokens * result.forward_passes  # every forward pass of the step reads the batch
            state.tokens, state.train_s = state.tokens + step_tokens, state.train_s + step_s
            state.window.append(StepStats(result.loss, result.projected_grad, q, step_s, step_tokens))
            t.bar.update(step - t.bar.n)
            t.bar.set_postfix(loss=f"{result.loss:.4f}", q=q, step_s=f"{step_s:.2f}", tok_s=f"{step_tokens / step_s:.0f}")
            if dist.enabled and cfg.dist.check_steps and step % cfg.dist.check_steps == 0:
                t.resyncs += distributed.check_drift(run.method.trainables, dist, step)

            last = step == cfg.train.max_steps
            metrics = train_metrics(t) if step % cfg.train.log_steps == 0 or last else {}
            if dist.is_main and (step % cfg.train.eval_steps == 0 or last):
                metrics.update({"forward_passes": state.forward_passes, **evaluate_dev(t, step)})
            if metrics:
                t.loggers.log_dict(metrics, step)
            stopping = dist.any(bool(stop.signum))  # every rank stops at the same step
            if stopping and not stop.signum:  # another rank was signalled first
                stop.signum = signal.SIGTERM
            if t.ckpt.due(step) or last or stopping:
                t.ckpt.save(state)
            if stopping:
                raise Interrupted(f"interrupted by {stop.name} at step {step}: checkpoint saved in {t.ckpt.last}; "
                                  f"resume with: {resume_command(t.run_dir)}", stop.signum)


def train_batches(t: Training):
    """The training batches from the current step's data position on."""
    train_set = t.run.splits.train
    return batches(train_set, min(t.cfg.train.batch_size, len(train_set)), t.cfg.seed, start=t.state.step)


def train_metrics(t: Training) -> dict:
    """The train log: means over the metric window (the steps since the last log), which it empties."""
    steps = [StepStats(*s) for s in t.state.window]  # a resumed run's window comes back as lists
    n, seconds = len(steps), sum(s.step_s for s in steps)
    metrics = {
        "forward_passes": t.state.forward_passes,
        "train/loss": sum(s.loss for s in steps) / n,
        "train/lr": get_lr(t.run.method.step),
        "zo/queries": steps[-1].q,
        "time/step_s": seconds / n,
        "time/tokens_per_s": sum(s.tokens for s in steps) / max(seconds, 1e-9),
        **get_memory_stats(t.run.mem_devices),
    }
    if t.dist.enabled:
        metrics["dist/resyncs"] = t.resyncs
    if steps[-1].projected_grad is not None:  # first-order methods have no projected gradient
        metrics["zo/projected_grad"] = sum(s.projected_grad for s in steps) / n
    t.state.window = []
    return metrics


def evaluate_dev(t: Training, step: int) -> dict[str, float]:
    """Dev metrics now; keeps the trainable weights if they are the best so far."""
    run, metric, best = t.run, t.run.objective.metric, t.state.best
    dev = {f"eval/{k}": v for k, v in run.objective.evaluate(run.method.model, t.dev_batches, run.device).items()}
    if (dev[f"eval/{metric}"], -dev["eval/loss"]) > (best[f"eval/{metric}"], -best["eval/loss"]):
        t.state.best = {"step": step, **dev}
        save_trainables(run.method.trainables, t.best_path)
    log.info("step %d: dev loss %.4f, dev %s %.4f", step, dev["eval/loss"], metric, dev[f"eval/{metric}"])
    return dev


def diverged(t: Training, e: DivergenceError) -> checkpoint.LoopState:
    """guard.action=rollback: back to the last checkpoint with a lower lr. Otherwise stop, with
    the weights of the last good step saved (the bad step was not applied)."""
    cfg, step_fn, state, ckpt = t.cfg, t.run.method.step, t.state, t.ckpt
    lr = get_lr(step_fn)
    if cfg.guard.action == GuardAction.rollback and state.rollbacks < cfg.guard.max_rollbacks:
        set_lr(step_fn, lr * cfg.guard.lr_factor)
        back = ckpt.restore(ckpt.last, rollback=True)
        back.rollbacks, back.best = state.rollbacks + 1, state.best  # best-dev weights stay valid
        log.warning("%s; rollback %d of %d to step %d (%s), lr %.3g -> %.3g", e, back.rollbacks,
                    cfg.guard.max_rollbacks, back.step, ckpt.last, lr, get_lr(step_fn))
        resume.rewind_metrics(t.run_dir, back.step)
        event = {"guard/rollbacks": back.rollbacks, "guard/diverged_step": e.step, "train/lr": get_lr(step_fn)}
        t.loggers.log_dict(event, back.step)
        return back
    if t.replay is not None:
        t.replay.reject(e.step)  # its round trips happened (they round the saved weights)
    folder = ckpt.save(state)
    tried = f" after {state.rollbacks} rollbacks (guard.max_rollbacks={cfg.guard.max_rollbacks})" if state.rollbacks else ""
    raise DivergenceError(
        f"{e}{tried}. The weights of step {state.step} are saved in {folder}. Lower method.lr (now {lr:.3g}) "
        f"or method.eps and resume with train.resume={t.run_dir}"
        + ("" if tried else ", or let the run roll back and lower the lr itself with guard.action=rollback"),
        e.step,
    ) from None


def finish(t: Training) -> dict:
    """The summary of a trained run: best dev, test of the best-dev weights, memory, time; also
    written to <run_dir>/summary.json."""
    cfg, run, dist, state, splits = t.cfg, t.run, t.dist, t.state, t.run.splits
    t.bar.close()
    summary = {
        "method": cfg.method.name, "label": cfg.label or cfg.method.name, "task": cfg.task.name,
        "model": cfg.model.name, "seed": cfg.seed,
        "steps": cfg.train.max_steps, "forward_passes": state.forward_passes,
        "metric": run.objective.metric, "best/step": state.best["step"],
        **{f"best/{k.replace('/', '_')}": v for k, v in state.best.items() if k != "step"},
        "guard/rollbacks": state.rollbacks, "resumed_from": str(t.resume_from) if t.resume_from else None,
        "trainable_params": run.trainable_params,
        "data/train": len(splits.train), "data/dev": len(splits.dev), "data/test": len(splits.test),
        "data/truncated": run.objective.truncated,
    }
    if dist.enabled:  # bit-identical replicas have equal digests
        summary["dist/world_size"], summary["dist/mode"] = dist.world, cfg.dist.mode.value
        summary["dist/checksums"] = distributed.gather_checksums(run.method.trainables, dist)
        summary["dist/resyncs"] = t.resyncs
        dist.close()
        if not dist.is_main:
            return summary
    if cfg.train.eval_on_test and t.best_path.exists():
        load_trainables(run.method.trainables, t.best_path)
        test = run.objective.evaluate(run.method.model, t.test_batches, run.device)
        summary.update({f"test/{k}": v for k, v in test.items()})
    peaks = device_peaks_gib(run.mem_devices)
    peak = sum(peaks)
    summary.update({
        "mem/peak_gib": peak, "mem/inference_gib": run.inference_gib, "mem/peak_over_inference": peak / run.inference_gib,
        "mem/peak_device_max_gib": max(peaks), "mem/inference_device_max_gib": run.inference_device_max_gib,
        "mem/devices": [str(d) for d in run.mem_devices],
        "time/wall_s": time.perf_counter() - t.t_start, "device": str(run.device),
        "train/tokens": state.tokens,
    })
    if state.train_s > 0:  # a run of max_steps=0 has no throughput
        summary["time/tokens_per_s"] = state.tokens / state.train_s
    t.loggers.log_dict({k: v for k, v in summary.items() if k.startswith(("test/", "best/"))}, cfg.train.max_steps)
    (t.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("summary: %s", json.dumps(summary))
    return summary
