"""The training loop behind `adazeta-train` (entrypoint: adazeta/train.py).

The loop: each step draws a batch, asks the query schedule for Q, estimates Q projected gradients
with two-sided SPSA (2Q forward passes, no autograd) and applies the update; every
`train.eval_steps` it evaluates on dev and keeps the best-dev weights; at the end it evaluates
those on test. Everything the run writes goes into its Hydra output folder.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from adazeta import distributed
from adazeta.config import Head, HeadInit
from adazeta.loggers import JsonlLogger, Loggers, MetricLogger, WandbLogger
from adazeta.memory import get_memory_stats, peak_gib, reset_peak
from adazeta.methods import build_method
from adazeta.models import load_model, prompt_init_head
from adazeta.objectives import Objective
from adazeta.tasks import Example, build_task
from adazeta.zo import Trainable

log = logging.getLogger("adazeta")


def batches(examples: list[Example], batch_size: int, seed: int):
    """Endless stream of training batches; a new shuffle each epoch, from its own RNG."""
    epoch = 0
    while True:
        order = list(examples)
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size) or [0]:
            yield order[i : i + batch_size]
        epoch += 1


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def save_trainables(trainables: list[Trainable], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({t.name: t.param.detach().contiguous().cpu() for t in trainables}, str(tmp))
    tmp.replace(path)  # atomic: a crash never leaves a half-written file


@torch.no_grad()
def load_trainables(trainables: list[Trainable], path: Path) -> None:
    state = load_file(str(path))
    for t in trainables:
        t.param.copy_(state[t.name])


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
    """Train and evaluate; return the summary (also written to <run_dir>/summary.json)."""
    t_start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)  # only the new head's init draws from the global RNG

    dist = distributed.setup(cfg.dist, cfg.model, cfg.method, cfg.train.batch_size)  # no-op without torchrun
    task = build_task(cfg.task)
    splits = task.load()
    loaded = load_model(cfg.model, num_labels=task.num_labels)
    model, device = loaded.model, loaded.device
    objective = Objective(task, loaded.tokenizer, loaded.head, cfg.model.max_length)
    bs, ebs = cfg.train.batch_size, cfg.train.eval_batch_size
    dev_batches, test_batches = objective.eval_batches(splits.dev, ebs), objective.eval_batches(splits.test, ebs)
    stream = batches(splits.train, min(bs, len(splits.train)), cfg.seed)

    # Inference memory of this model and batch size, measured before any training state exists.
    reset_peak(device)
    with torch.no_grad():
        objective.forward(model, to_device(objective.encode(splits.train[:bs], train=True), device))
    inference_gib = peak_gib(device)

    method = build_method(model, cfg.method, cfg.adapter, loaded.head, cfg.seed)
    model, trainables = method.model, method.trainables
    distributed.distribute(method.step, dist)  # no-op without torchrun
    n_trainable = sum(t.param.numel() for t in trainables)
    if loaded.head == Head.classification and cfg.model.head_init == HeadInit.prompt:
        blank = Example(fields={f: "" for f in task.text_fields}, label=0)
        # LM-BFF label words take their leading space from the tokenizer side: add it here.
        prompts = [task.mlm_template(blank, " " + word).strip() for word in task.label_words]
        prompt_init_head(model, objective, prompts, device)
    reset_peak(device)  # the training peak: weights, method state, activations; not model loading
    schedule = instantiate(cfg.schedule)
    steps_per_epoch = max(len(splits.train) // bs, 1)
    schedule.bind(steps_per_epoch=steps_per_epoch, max_steps=max(cfg.train.max_steps, 1))
    log.info(
        "%s on %s/%s: %d trainable parameters, %d train / %d dev / %d test examples, %d steps",
        cfg.method.name, cfg.task.name, cfg.model.name, n_trainable,
        len(splits.train), len(splits.dev), len(splits.test), cfg.train.max_steps,
    )
    loggers = build_loggers(cfg, run_dir) if dist.is_main else Loggers([])  # only rank 0 writes
    metric = objective.metric  # accuracy, or f1 for SQuAD/DROP
    best = {"step": -1, f"eval/{metric}": -1.0, "eval/loss": math.inf}
    best_path = run_dir / "best_trainable.safetensors"
    forward_passes, window, resyncs = 0, [], 0

    def evaluate_dev(step: int) -> dict[str, float]:
        """Dev metrics now; keeps the trainable weights if they are the best so far."""
        nonlocal best
        dev = {f"eval/{k}": v for k, v in objective.evaluate(model, dev_batches, device).items()}
        if (dev[f"eval/{metric}"], -dev["eval/loss"]) > (best[f"eval/{metric}"], -best["eval/loss"]):
            best = {"step": step, **dev}
            save_trainables(trainables, best_path)
        log.info("step %d: dev loss %.4f, dev %s %.4f", step, dev["eval/loss"], metric, dev[f"eval/{metric}"])
        return dev

    if cfg.train.max_steps == 0 and dist.is_main:  # zero-shot: evaluate the untrained model on dev (and test)
        loggers.log_dict({"forward_passes": 0, **evaluate_dev(0)}, 0)
    bar = tqdm(range(1, cfg.train.max_steps + 1), disable=not (cfg.train.progress and dist.is_main), desc=cfg.method.name)
    for step in bar:
        t0 = time.perf_counter()
        batch = to_device(objective.encode(dist.shard(next(stream)), train=True), device)
        q = schedule(step - 1)  # schedules count steps from 0
        result = method.step(lambda b=batch: objective.forward(model, b)[0].mean(), step, q)
        forward_passes += result.forward_passes
        step_s = time.perf_counter() - t0
        window.append((result.loss, result.projected_grad, q, step_s))
        bar.set_postfix(loss=f"{result.loss:.4f}", q=q, step_s=f"{step_s:.2f}")

        if dist.enabled and cfg.dist.check_steps and step % cfg.dist.check_steps == 0:
            resyncs += distributed.check_drift(trainables, dist, step)

        metrics = {}
        if step % cfg.train.log_steps == 0 or step == cfg.train.max_steps:
            n = len(window)
            metrics = {
                "forward_passes": forward_passes,
                "train/loss": sum(w[0] for w in window) / n,
                "zo/queries": window[-1][2],
                "time/step_s": sum(w[3] for w in window) / n,
                **get_memory_stats(device),
            }
            if dist.enabled:
                metrics["dist/resyncs"] = resyncs
            if window[-1][1] is not None:  # first-order methods have no projected gradient
                metrics["zo/projected_grad"] = sum(w[1] for w in window) / n
            window = []
        if dist.is_main and (step % cfg.train.eval_steps == 0 or step == cfg.train.max_steps):
            metrics.update({"forward_passes": forward_passes, **evaluate_dev(step)})
        if metrics:
            loggers.log_dict(metrics, step)

    summary = {
        "method": cfg.method.name, "task": cfg.task.name, "model": cfg.model.name, "seed": cfg.seed,
        "steps": cfg.train.max_steps, "forward_passes": forward_passes,
        "metric": metric, "best/step": best["step"],
        **{f"best/{k.replace('/', '_')}": v for k, v in best.items() if k != "step"},
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
    peak = peak_gib(device)
    summary.update({
        "mem/peak_gib": peak, "mem/inference_gib": inference_gib, "mem/peak_over_inference": peak / inference_gib,
        "time/wall_s": time.perf_counter() - t_start, "device": str(device),
    })
    loggers.log_dict({k: v for k, v in summary.items() if k.startswith(("test/", "best/"))}, cfg.train.max_steps)
    loggers.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("summary: %s", json.dumps(summary))
    return summary
