"""`transformers.Trainer` whose training step is adazeta's ZO step.

    zo = adazeta.ZOFineTuner(model, "mezo_lora", lr=1e-4)
    trainer = adazeta.ZOTrainer(zo=zo, args=TrainingArguments(..., lr_scheduler_type="constant"),
                                train_dataset=..., data_collator=...)
    trainer.train()

Each Trainer step calls `zo.step` on its batch with the Trainer's own loss (`compute_loss`: the
model's loss, or your compute_loss_func), under torch.no_grad(): 2Q forward passes, no backward.
The optimizer the Trainer builds is a `ZOOptimizer`: it holds the trainable tensors and the lr and
moves nothing (the ZO step already has), so that no AdamW state is allocated, the Trainer's lr
scheduler (args.lr_scheduler_type, warmup) sets the lr of each ZO step, and the Trainer's
checkpoints carry the ZO state (update rule, step count, guard). Logging, evaluation, callbacks and
saving are the Trainer's.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import has_length

from adazeta.api import ZOFineTuner
from adazeta.errors import ConfigError

__all__ = ["ZOOptimizer", "ZOTrainer"]

DEFAULT_LR = next(f.default for f in fields(TrainingArguments) if f.name == "learning_rate")


class ZOOptimizer(torch.optim.Optimizer):
    """What the Trainer takes for an optimizer: the trainable tensors in one group at the ZO lr, a
    step() that does nothing, and the ZO state (all but the weights) in state_dict()."""

    def __init__(self, zo: ZOFineTuner):
        super().__init__([t.param for t in zo.trainables], {"lr": zo.lr})
        self.zo = zo

    def step(self, closure=None):
        return None  # ZOTrainer.training_step has applied the update

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # the loss is never backpropagated: no gradient exists

    def state_dict(self) -> dict:
        # The Trainer saves the weights with the model; accelerate also round-trips this state once
        # when it prepares the optimizer, which must not copy a full-parameter method's weights.
        return {**self.zo.state_dict(weights=False), "lr": self.param_groups[0]["lr"]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.zo.load_state_dict(state_dict)
        for group in self.param_groups:
            group["lr"] = state_dict["lr"]


class ZOTrainer(Trainer):
    """A Trainer for `zo.model` whose training_step is `zo.step`. Takes every Trainer argument but
    `model` (it is zo.model) and `optimizers` (the ZOOptimizer is built here)."""

    def __init__(self, *args, zo: ZOFineTuner, **kwargs):
        if "model" in kwargs or args:
            raise TypeError("ZOTrainer trains zo.model: pass zo=ZOFineTuner(model, ...) and keyword arguments only")
        if not zo.is_zo:
            raise ConfigError(f"method={zo.config.method.name} is first-order (backprop + AdamW): use "
                              "transformers.Trainer itself; ZOTrainer runs the ZO methods")
        super().__init__(model=zo.model, **kwargs)
        self.zo, self.bound = zo, False
        a = self.args
        if a.gradient_accumulation_steps != 1:
            raise ConfigError(f"gradient_accumulation_steps={a.gradient_accumulation_steps}: a ZO step moves the "
                              "weights on its own batch and accumulates nothing; set it to 1 and raise "
                              "per_device_train_batch_size instead")
        if a.world_size > 1:
            raise ConfigError(f"ZOTrainer runs in one process (world_size={a.world_size}); across processes, "
                              "run adazeta-train under torchrun (dist.mode=query or data)")
        if a.learning_rate not in (DEFAULT_LR, zo.lr):
            raise ConfigError(f"learning_rate={a.learning_rate:g} would not be used: the ZO step trains at "
                              f"zo.lr={zo.lr:g} (method={zo.config.method.name}'s preset, or lr= given to "
                              "ZOFineTuner); pass lr= to ZOFineTuner and leave learning_rate at its default")

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = ZOOptimizer(self.zo)
        return self.optimizer

    def train(self, *args, **kwargs):
        self.bound = False  # the query schedule is bound to this run's length at its first step
        return super().train(*args, **kwargs)

    def bind_schedule(self) -> None:
        """Tell the query schedule the epoch length and the steps of this train() call (AdaZeta's
        adaptive Q grows with the epoch)."""
        loader = self.callback_handler.train_dataloader
        per_epoch = len(loader) if loader is not None and has_length(loader) else self.state.max_steps
        self.zo.schedule.bind(steps_per_epoch=max(per_epoch, 1), max_steps=max(self.state.max_steps, 1))
        self.bound = True

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if not self.bound:
            self.bind_schedule()
        inputs = self._prepare_inputs(inputs)
        self.zo.lr = self.optimizer.param_groups[0]["lr"]  # the Trainer's lr schedule drives the ZO lr
        # transformers < 4.46 has no num_items_in_batch (training_step(model, inputs)).
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}

        def loss_fn() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, **extra)

        result = self.zo.step(loss_fn)
        return torch.tensor(result.loss, device=self.args.device)
