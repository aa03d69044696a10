"""The training loop behind `adazeta-train` (entrypoint: adazeta/train.py).

The loop: each step draws a batch, asks the query schedule for Q, estimates Q projected gradients
with two-sided SPSA (2Q forward passes, no autograd) and applies the update; every
`train.eval_steps` it evaluates on dev and keeps the best-dev weights; at the end it evaluates
those on test. Everything the run writes goes into its Hydra output folder.

Reliability is a few named calls: the divergence guard checks each step before its update
(adazeta/guard.py); checkpoints are saved every `train.save_steps` and restored by `train.resume`
(adazeta/checkpoint.py); SIGINT/SIGTERM stop the run after the current step with a checkpoint
(adazeta/interrupt.py); ZO steps are appended to a replay log (adazeta/replay.py).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from adazeta import checkpoint, distributed, run_folder
from adazeta.config import GuardAction, Head, HeadInit, Optimizer
from adazeta.errors import ConfigError, DivergenceError, Interrupted
from adazeta.guard import Guard, check_precision, get_lr, set_lr
from adazeta.interrupt import interruption, resume_command
from adazeta.loggers import JsonlLogger, Loggers, MetricLogger, WandbLogger
from adazeta.memory import (
    device_peaks_gib,
    get_memory_stats,
    make_resident,
    model_devices,
    reset_peak,
)
from adazeta.methods import Method, build_method
from adazeta.models import load_model, prompt_init_head
from adazeta.objectives import Objective
from adazeta.replay import ReplayLog
from adazeta.tasks import Example, Splits, Task, build_task
from adazeta.zo import Trainable

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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def save_trainables(trainables: list[Trainable], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({t.name: t.param.detach().to("cpu", copy=True) for t in trainables}, str(tmp))  # views: copy
    tmp.replace(path)  # atomic: a crash never leaves a half-written file


@torch.no_grad()
def load_trainables(trainables: list[Trainable], path: Path) -> None:
    state = load_file(str(path))
    for t in trainables:
        t.param.copy_(state[t.name])


def find_resume(cfg: DictConfig, run_dir: Path) -> Path:
    """The checkpoint `train.resume` names (`auto`: searched for under the output root)."""
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    sweep = Path(hc.sweep.dir) if hc is not None and hc.mode == RunMode.MULTIRUN else None
    return checkpoint.find(cfg.train.resume, cfg, run_dir, sweep)


def claim(cfg: DictConfig, run_dir: Path) -> Path | None:
    """Hold the run folder and return the checkpoint to resume from (None: a fresh start). A
    folder that another process runs in, or that holds a run other than the one resumed in place,
    is refused before anything is written into it (adazeta/run_folder.py)."""
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


@dataclass
class Setup:
    task: Task
    splits: Splits
    objective: Objective
    device: torch.device
    method: Method
    inference_gib: float  # summed over mem_devices
    inference_device_max_gib: float  # the largest one device's share
    mem_devices: list[torch.device]  # every device holding weights (several under model.device_map)


def setup(cfg: DictConfig, dist: distributed.Dist | None = None) -> Setup:
    """Data, model, objective and method, built in the order that fixes the global RNG's draws
    (random-init weights, new heads, adapters): `adazeta-replay` calls it to rebuild a run's
    starting weights exactly."""
    torch.manual_seed(cfg.seed)  # random-init models, new heads and adapters draw from the global RNG
    task = build_task(cfg.task)
    splits = task.load()
    loaded = load_model(cfg.model, num_labels=task.num_labels)
    model, device = loaded.model, loaded.device
    objective = Objective(task, loaded.tokenizer, loaded.head, cfg.model.max_length)

    # Inference memory of this model and batch size, measured before any training state exists,
    # with every weight resident (on CPU, mmapped weights count once read).
    make_resident(model)
    mem_devices = model_devices(model)  # input `device` is only the first of them under device_map
    reset_peak(mem_devices)
    with torch.no_grad():
        objective.forward(model, to_device(objective.encode(splits.train[: cfg.train.batch_size], train=True), device))
    inference = device_peaks_gib(mem_devices)

    # Under torchrun the estimator shares each step's queries (or batch) across the ranks.
    method = build_method(model, cfg.method, cfg.adapter, loaded.head, cfg.seed, zo=cfg.zo, dist=dist)
    if loaded.head == Head.classification and cfg.model.head_init == HeadInit.prompt and not task.has_mlm:
        log.warning("model.head_init=prompt: task %s has no label prompt (no label words); the head keeps its "
                    "random init, as with model.head_init=random", task.name)
    elif loaded.head == Head.classification and cfg.model.head_init == HeadInit.prompt:
        blank = Example(fields={f: "" for f in task.text_fields}, label=0)
        # LM-BFF label words take their leading space from the tokenizer side: add it here.
        prompts = [task.mlm_template(blank, " " + word).strip() for word in task.label_words]
        prompt_init_head(method.model, objective, prompts, device)
    return Setup(task, splits, objective, device, method, sum(inference), max(inference), mem_devices)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train and evaluate; return the summary (also written to <run_dir>/summary.json). The run
    folder stays locked until the run ends."""
    try:
        return fit(cfg, run_dir)
    finally:
        run_folder.release(run_dir)


def fit(cfg: DictConfig, run_dir: Path) -> dict:
    """The run: setup, the training loop, the final evaluation and the summary."""
    t_start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dist = distributed.setup(cfg.dist, cfg.model, cfg.method, cfg.train.batch_size)  # no-op without torchrun
    # Fails before anything loads; under torchrun rank 0 holds the folder and finds the checkpoint.
    resume_from = dist.from_main(claim(cfg, run_dir) if dist.is_main else None)
    if dist.enabled and cfg.guard.action == GuardAction.rollback:
        raise ConfigError("guard.action=rollback is not available under torchrun (only rank 0 keeps checkpoints); "
                          "use guard.action=stop and resume with train.resume=<run folder>")

    built = setup(cfg, dist)
    splits, objective, device, method = built.splits, built.objective, built.device, built.method
    model, trainables = method.model, method.trainables
    bs, ebs = cfg.train.batch_size, cfg.train.eval_batch_size
    dev_batches, test_batches = objective.eval_batches(splits.dev, ebs), objective.eval_batches(splits.test, ebs)
    n_trainable = sum(t.param.numel() for t in trainables)
    reset_peak(built.mem_devices)  # the training peak: weights, method state, activations; not model loading
    schedule = instantiate(cfg.schedule)
    steps_per_epoch = max(len(splits.train) // bs, 1)
    schedule.bind(steps_per_epoch=steps_per_epoch, max_steps=max(cfg.train.max_steps, 1))
    log.info(
        "%s on %s/%s: %d trainable parameters, %d train / %d dev / %d test examples, %d steps",
        cfg.method.name, cfg.task.name, cfg.model.name, n_trainable,
        len(splits.train), len(splits.dev), len(splits.test), cfg.train.max_steps,
    )
    guard = Guard(cfg.guard)  # passed to each step: sees its losses and projected gradients before its update
    check_precision(trainables, zo=cfg.method.optimizer == Optimizer.zo)
    ckpt = checkpoint.Checkpointer(run_dir, cfg, method, guard, objective, writes=dist.is_main)
    metric = objective.metric  # accuracy, or f1 for SQuAD/DROP
    state = checkpoint.LoopState(best={"step": -1, f"eval/{metric}": -1.0, "eval/loss": math.inf})
    rows, records = [], []
    if resume_from is not None:
        # Every file is read and checked against this run first: a bad checkpoint fails here,
        # before carry_over rewinds a run folder resumed in place.
        state = ckpt.restore(resume_from)
        if dist.is_main:
            rows, records = checkpoint.carry_over(resume_from, run_dir)
    replay = None
    if cfg.train.replay_log and cfg.method.optimizer == Optimizer.zo and dist.is_main:
        replay = ReplayLog(run_dir / "replay.jsonl", method.step, records)
    ckpt.replay = replay  # its position goes into each checkpoint; a rollback rewinds it
    loggers = build_loggers(cfg, run_dir) if dist.is_main else Loggers([])  # only rank 0 writes
    for row in rows:  # a resumed run's folder starts with the old run's curve up to its checkpoint
        loggers.log_dict({k: v for k, v in row.items() if k != "step"}, row["step"])
    if cfg.guard.action == GuardAction.rollback and ckpt.last is None:
        ckpt.save(state)  # a good state to roll back to before the first periodic checkpoint
    best_path = run_dir / "best_trainable.safetensors"
    resyncs = 0

    def evaluate_dev(step: int) -> dict[str, float]:
        """Dev metrics now; keeps the trainable weights if they are the best so far."""
        dev = {f"eval/{k}": v for k, v in objective.evaluate(model, dev_batches, device).items()}
        if (dev[f"eval/{metric}"], -dev["eval/loss"]) > (state.best[f"eval/{metric}"], -state.best["eval/loss"]):
            state.best = {"step": step, **dev}
            save_trainables(trainables, best_path)
        log.info("step %d: dev loss %.4f, dev %s %.4f", step, dev["eval/loss"], metric, dev[f"eval/{metric}"])
        return dev

    def diverged(e: DivergenceError) -> checkpoint.LoopState:
        """guard.action=rollback: back to the last checkpoint with a lower lr. Otherwise stop, with
        the weights of the last good step saved (the bad step was not applied)."""
        lr = get_lr(method.step)
        if cfg.guard.action == GuardAction.rollback and state.rollbacks < cfg.guard.max_rollbacks:
            set_lr(method.step, lr * cfg.guard.lr_factor)
            back = ckpt.restore(ckpt.last, rollback=True)
            back.rollbacks, back.best = state.rollbacks + 1, state.best  # best-dev weights stay valid
            log.warning("%s; rollback %d of %d to step %d (%s), lr %.3g -> %.3g", e, back.rollbacks,
                        cfg.guard.max_rollbacks, back.step, ckpt.last, lr, get_lr(method.step))
            checkpoint.rewind_metrics(run_dir, back.step)
            event = {"guard/rollbacks": back.rollbacks, "guard/diverged_step": e.step, "train/lr": get_lr(method.step)}
            loggers.log_dict(event, back.step)
            return back
        if replay is not None:
            replay.reject(e.step)  # its round trips happened (they round the saved weights)
        folder = ckpt.save(state)
        tried = f" after {state.rollbacks} rollbacks (guard.max_rollbacks={cfg.guard.max_rollbacks})" if state.rollbacks else ""
        raise DivergenceError(
            f"{e}{tried}. The weights of step {state.step} are saved in {folder}. Lower method.lr (now {lr:.3g}) "
            f"or method.eps and resume with train.resume={run_dir}"
            + ("" if tried else ", or let the run roll back and lower the lr itself with guard.action=rollback"),
            e.step,
        ) from None

    # The zero-shot point of the curve (and the only evaluation of a run with max_steps=0); a
    # resumed run already has it from the run it continues.
    if (cfg.train.eval_at_start or cfg.train.max_steps == 0) and state.step == 0 and dist.is_main:
        loggers.log_dict({"forward_passes": 0, **evaluate_dev(0)}, 0)
    stream = batches(splits.train, min(bs, len(splits.train)), cfg.seed, start=state.step)
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not (cfg.train.progress and dist.is_main),
               desc=cfg.method.name)
    with interruption(run_dir) as stop:  # SIGINT/SIGTERM: checkpoint and exit after the current step
        while state.step < cfg.train.max_steps:
            step = state.step + 1
            t0 = time.perf_counter()
            encoded = objective.encode(dist.shard(next(stream)), train=True)
            tokens = int(encoded["attention_mask"].sum()) if "attention_mask" in encoded else encoded["input_ids"].numel()
            batch = to_device(encoded, device)
            q = schedule(step - 1)  # schedules count steps from 0
            try:
                result = method.step(objective.batch_loss(model, batch), step, q, guard=guard)
            except DivergenceError as e:  # raised by the guard before the update: no weight moved
                state = diverged(e)
                stream = batches(splits.train, min(bs, len(splits.train)), cfg.seed, start=state.step)
                continue
            state.step, state.forward_passes = step, state.forward_passes + result.forward_passes
            if replay is not None:
                replay.append(step, result.seeds, result.grads, get_lr(method.step))
            step_s = time.perf_counter() - t0
            step_tokens = tokens * result.forward_passes  # every forward pass of the step reads the batch
            state.tokens, state.train_s = state.tokens + step_tokens, state.train_s + step_s
            state.window.append([result.loss, result.projected_grad, q, step_s, step_tokens])
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{result.loss:.4f}", q=q, step_s=f"{step_s:.2f}", tok_s=f"{step_tokens / step_s:.0f}")

            if dist.enabled and cfg.dist.check_steps and step % cfg.dist.check_steps == 0:
                resyncs += distributed.check_drift(trainables, dist, step)

            metrics = {}
            if step % cfg.train.log_steps == 0 or step == cfg.train.max_steps:
                window, n = state.window, len(state.window)
                metrics = {
                    "forward_passes": state.forward_passes,
                    "train/loss": sum(w[0] for w in window) / n,
                    "train/lr": get_lr(method.step),
                    "zo/queries": window[-1][2],
                    "time/step_s": sum(w[3] for w in window) / n,
                    "time/tokens_per_s": sum(w[4] for w in window) / max(sum(w[3] for w in window), 1e-9),
                    **get_memory_stats(built.mem_devices),
                }
                if dist.enabled:
                    metrics["dist/resyncs"] = resyncs
                if window[-1][1] is not None:  # first-order methods have no projected gradient
                    metrics["zo/projected_grad"] = sum(w[1] for w in window) / n
                state.window = []
            if dist.is_main and (step % cfg.train.eval_steps == 0 or step == cfg.train.max_steps):
                metrics.update({"forward_passes": state.forward_passes, **evaluate_dev(step)})
            if metrics:
                loggers.log_dict(metrics, step)
            stopping = dist.any(bool(stop.signum))  # every rank stops at the same step
            if stopping and not stop.signum:  # another rank was signalled first
                stop.signum = signal.SIGTERM
            if ckpt.due(step) or step == cfg.train.max_steps or stopping:
                ckpt.save(state)
            if stopping:
                bar.close()
                loggers.close()
                raise Interrupted(f"interrupted by {stop.name} at step {step}: checkpoint saved in {ckpt.last}; "
                                  f"resume with: {resume_command(run_dir)}", stop.signum)
    bar.close()
    if replay is not None:
        replay.close()

    summary = {
        "method": cfg.method.name, "label": cfg.label or cfg.method.name, "task": cfg.task.name,
        "model": cfg.model.name, "seed": cfg.seed,
        "steps": cfg.train.max_steps, "forward_passes": state.forward_passes,
        "metric": metric, "best/step": state.best["step"],
        **{f"best/{k.replace('/', '_')}": v for k, v in state.best.items() if k != "step"},
        "guard/rollbacks": state.rollbacks, "resumed_from": str(resume_from) if resume_from else None,
        "trainable_params": n_trainable,
        "data/train": len(splits.train), "data/dev": len(splits.dev), "data/test": len(splits.test),
        "data/truncated": objective.truncated,
    }
    if dist.enabled:  # bit-identical replicas have equal digests
        summary["dist/world_size"], summary["dist/mode"] = dist.world, cfg.dist.mode.value
        summary["dist/checksums"] = distributed.gather_checksums(trainables, dist)
        summary["dist/resyncs"] = resyncs
        dist.close()
        if not dist.is_main:
            return summary
    if cfg.train.eval_on_test and best_path.exists():
        load_trainables(trainables, best_path)
        summary.update({f"test/{k}": v for k, v in objective.evaluate(model, test_batches, device).items()})
    peaks = device_peaks_gib(built.mem_devices)
    peak = sum(peaks)
    summary.update({
        "mem/peak_gib": peak, "mem/inference_gib": built.inference_gib, "mem/peak_over_inference": peak / built.inference_gib,
        "mem/peak_device_max_gib": max(peaks), "mem/inference_device_max_gib": built.inference_device_max_gib,
        "mem/devices": [str(d) for d in built.mem_devices],
        "time/wall_s": time.perf_counter() - t_start, "device": str(device),
        "train/tokens": state.tokens,
    })
    if state.train_s > 0:  # a run of max_steps=0 has no throughput
        summary["time/tokens_per_s"] = state.tokens / state.train_s
    loggers.log_dict({k: v for k, v in summary.items() if k.startswith(("test/", "best/"))}, cfg.train.max_steps)
    loggers.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("summary: %s", json.dumps(summary))
    return summary
