"""The one build path: a composed config -> task -> model -> objective -> method, as a `Run`.

    from adazeta.config import compose_config
    from adazeta.engine.build import build_run
    run = build_run(compose_config(["method=mezo", "model=tiny-llama"]))
    run.method.step(run.objective.batch_loss(run.method.model, batch), step=1, q=1)

Everything that needs a run's objects builds them here, and nowhere else: the training loop
(adazeta/engine/loop.py), `adazeta-replay` (which must rebuild a run's starting weights bit for bit), the
memory planner (adazeta/engine/plan/), adazeta/cli/bench.py and the tests. The order of the calls is
part of the contract: random-init weights, a new head and adapters draw from the global RNG, which
is seeded with `cfg.seed` first.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from adazeta.config import Head, HeadInit
from adazeta.engine import replay_log
from adazeta.engine.memory import (
    device_peaks_gib,
    in_use_gib,
    make_resident,
    model_devices,
    reset_peak,
)
from adazeta.methods import Method, build_method
from adazeta.models.load import classification_head, load_model, prompt_init_head, resolve_device
from adazeta.objectives import Objective
from adazeta.step import check_supports
from adazeta.tasks import Example, Splits, Task, build_task
from adazeta.zo.schedules import QuerySchedule
from adazeta.zo.sharded import Dist, launched

log = logging.getLogger("adazeta")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class Run:
    """A run's objects, built from its config by `build_run`."""

    cfg: DictConfig
    task: Task
    splits: Splits
    objective: Objective
    device: torch.device  # the input device (the first of mem_devices under model.device_map)
    method: Method  # method.model: the network as trained (adapters, LoRA or hooks in place)
    schedule: QuerySchedule  # Q per step, bound to this run's epoch length and max_steps
    inference_gib: float  # peak of one no-grad forward on a training batch, summed over mem_devices
    inference_device_max_gib: float  # the largest one device's share of it
    mem_devices: list[torch.device]  # every device holding weights (several under model.device_map)
    memory_before_gib: float | None  # memory in use on `device` just before the model was loaded
    # Parameters the run adds to the loaded network: a new classification head and the method's
    # adapters or LoRA factors (a low-precision run keeps these in float32).
    new_params: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def trainable_params(self) -> int:
        return sum(t.param.numel() for t in self.method.trainables)


def check_config(cfg: DictConfig) -> None:
    """Refuse, by key, what the step of `cfg`'s method does not support (adazeta/step.py
    `check_supports`, from the step's registered declaration): its trainable set, update rule,
    zo.parallel_queries, torchrun (WORLD_SIZE > 1) and the replay log. Cheap, and needs no model:
    the loop calls it before it joins a process group, `build_run` before it loads anything."""
    check_supports(cfg.method, cfg.zo, torchrun=launched(), replay_log=replay_log.kept(cfg))


def build_run(cfg: DictConfig, dist: Dist | None = None,
              inference_batch: dict[str, torch.Tensor] | None = None) -> Run:
    """Data, model, objective, method and query schedule of `cfg`, built in the order that fixes the
    global RNG's draws (random-init weights, new heads, adapters): `adazeta-replay` rebuilds a
    run's starting weights exactly by calling it again. `dist` spreads the method over torchrun's
    ranks (no-op without torchrun). The inference peak is measured on `inference_batch` (encoded,
    on the model's device) if given, else on the first `train.batch_size` training examples.
    `check_config` runs first: nothing loads for a config the method's step does not support."""
    check_config(cfg)
    torch.manual_seed(cfg.seed)  # random-init models, new heads and adapters draw from the global RNG
    task = build_task(cfg.task)
    splits = task.load()
    memory_before = in_use_gib(resolve_device(cfg.model.device))
    loaded = load_model(cfg.model, num_labels=task.num_labels)
    model, device = loaded.model, loaded.device
    objective = Objective(task, loaded.tokenizer, loaded.head, cfg.model.max_length)

    # Inference memory of this model and batch size, measured before any training state exists,
    # with every weight resident (on CPU, mmapped weights count once read).
    make_resident(model)
    mem_devices = model_devices(model)  # input `device` is only the first of them under device_map
    reset_peak(mem_devices)
    if inference_batch is None:
        inference_batch = to_device(objective.encode(splits.train[: cfg.train.batch_size], train=True), device)
    with torch.no_grad():
        objective.forward(model, inference_batch)
    inference = device_peaks_gib(mem_devices)

    loaded_params = {id(p) for p in model.parameters()}
    # Under torchrun the estimator shares each step's queries (or batch) across the ranks.
    method = build_method(model, cfg.method, cfg.adapter, loaded.head, cfg.seed, zo=cfg.zo, dist=dist)
    new_params = [p for p in method.model.parameters() if id(p) not in loaded_params]
    if loaded.head == Head.classification:  # load_model keeps a new head in fp32
        with contextlib.suppress(ValueError):  # a head under a name classification_head does not know
            new_params += [p for p in classification_head(model).parameters() if id(p) in loaded_params]
    if loaded.head == Head.classification and cfg.model.head_init == HeadInit.prompt and not task.has_mlm:
        log.warning("model.head_init=prompt: task %s has no label prompt (no label words); the head keeps its "
                    "random init, as with model.head_init=random", task.name)
    elif loaded.head == Head.classification and cfg.model.head_init == HeadInit.prompt:
        blank = Example(fields={f: "" for f in task.text_fields}, label=0)
        # LM-BFF label words take their leading space from the tokenizer side: add it here.
        prompts = [task.mlm_template(blank, " " + word).strip() for word in task.label_words]
        prompt_init_head(method.model, objective, prompts, device)

    schedule = instantiate(cfg.schedule)
    schedule.bind(steps_per_epoch=max(len(splits.train) // cfg.train.batch_size, 1),
                  max_steps=max(cfg.train.max_steps, 1))
    return Run(cfg, task, splits, objective, device, method, schedule, sum(inference), max(inference), mem_devices,
               memory_before, new_params)
