"""The engine in your own loop: zeroth-order fine-tuning of any Hugging Face model, one call per step.

    import adazeta

    zo = adazeta.ZOFineTuner(model, "mezo_lora", lr=1e-4)   # injects LoRA; zo.model is the model to call
    for batch in loader:
        result = zo.step(lambda: zo.model(**batch).loss)     # 2Q forward passes, no backward
        print(result.loss)

`ZOFineTuner` is a thin front on what `adazeta-train` runs: the method preset is composed from the
shipped `conf/method/<name>.yaml` (with `conf/adapter/tt.yaml` and the preset's query schedule),
exactly as the command composes it, so the defaults are the command's; keyword overrides are the
config keys of those groups without their prefix (`lr`, `eps`, `update_rule`, `rank`, `q_max`, ...;
a method's own node as a dict, `lora={"r": 4}`, whose other keys keep the preset's values), checked
by the same schemas and range checks (adazeta/validate.py). The step itself
is `adazeta.methods.build_method`'s, called with the step number and the schedule's Q; the guard is
adazeta/engine/guard.py's. Nothing here changes what a step does (tests/test_api.py checks that the
weights come out bit-identical to `build_method`'s).

For `transformers.Trainer`, see `adazeta.ZOTrainer` (adazeta/hf_trainer.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adazeta.config import CONF_DIR, GuardConfig, Head, Optimizer, compose_config
from adazeta.engine.guard import Guard, check_precision
from adazeta.errors import ConfigError
from adazeta.legacy_keys import upgrade_keywords
from adazeta.methods import build_method
from adazeta.models.load import MeanPoolClassifier
from adazeta.step import StepResult
from adazeta.validate import check_ignored, validate

__all__ = ["ZOFineTuner", "StepResult", "method_names", "compose_method"]

# The groups a method preset spans; their keys are the keyword overrides.
SECTIONS = ("method", "adapter", "schedule", "zo")
# Keys that say which method this is: choose another method instead of overriding them.
FIXED = {"name", "trainable", "optimizer", "_target_"}


def method_names() -> list[str]:
    """The method presets shipped in conf/method/ (the `method=` options of adazeta-train)."""
    return sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))


def schedule_names() -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / "schedule").glob("*.yaml"))


def compose_method(method: str, schedule: str | None = None, **overrides) -> DictConfig:
    """The `method`, `adapter`, `schedule` and `zo` nodes that `adazeta-train method=<method>` composes,
    with `overrides` (keys without their group prefix) applied and checked. Raises ConfigError naming
    a bad method, schedule, key or value, and the valid ones."""
    if method not in method_names():
        raise ConfigError(f"method={method!r} is not a method; choose one of {method_names()}")
    choices = [f"method={method}"]
    if schedule is not None:
        if schedule not in schedule_names():
            raise ConfigError(f"schedule={schedule!r} is not a query schedule; choose one of {schedule_names()} "
                              "(or None: the method's own)")
        choices.append(f"schedule={schedule}")
    # Composed as adazeta-train composes it, with the schemas; a caller's own Hydra state is put back.
    full = compose_config(choices, hydra_config=True)
    cfg, schedule = OmegaConf.masked_copy(full, list(SECTIONS)), full.hydra.runtime.choices.schedule
    sections = {key: section for section in SECTIONS for key in cfg[section] if key not in FIXED}
    as_given = []
    for key, value in upgrade_keywords(overrides).items():
        if key not in sections:
            raise ConfigError(
                f"{key}={value!r} is not a setting of method={method} with schedule={schedule}; "
                f"valid keys: {', '.join(read_keys(cfg, sections))}. (name, trainable and optimizer are what method= "
                f"chooses: pick another of {method_names()}; schedule= picks another query schedule of "
                f"{schedule_names()}, with its own keys)"
            )
        node = cfg[sections[key]]
        nested = isinstance(value, Mapping) and OmegaConf.is_dict(node[key])
        try:  # the schema checks the type (and converts enum names); a node keeps the keys not given
            node[key] = OmegaConf.merge(node[key], value) if nested else value
        except OmegaConfBaseException as e:
            fields = f" (the keys of {key}: {', '.join(node[key])})" if nested else ""
            raise ConfigError(f"{key}={value!r}: {str(e).splitlines()[0]}{fields}") from None
        if nested:
            as_given += [f"{sections[key]}.{key}.{k}={v}" for k, v in value.items()]
        else:
            as_given.append(f"{sections[key]}.{key}={value}")
    # Ranges (eps > 0, rank >= 1, ...) and keys the method would ignore (lora with method=mezo).
    validate(cfg, as_given)
    return cfg


def read_keys(cfg: DictConfig, sections: dict[str, str]) -> list[str]:
    """The keys this method reads (validate.py refuses the others: lora with method=mezo, ...); a
    node with its keys, as `lora={r, alpha, dropout, targets}`."""
    keys = []
    for key, section in sorted(sections.items()):
        try:
            check_ignored(cfg, [f"{section}.{key}="])
        except ConfigError:
            continue
        node = cfg[section][key]
        keys.append(f"{key}={{{', '.join(node)}}}" if OmegaConf.is_dict(node) and section == "method" else key)
    return keys


def resolve_head(model: torch.nn.Module, head: str | Head) -> Head:
    """`auto`: a sequence-classification model trains its (new) head with the method's trainable
    set; any other model keeps its head frozen, as adazeta-train does for LM heads."""
    if isinstance(head, Head):
        return head
    if head == "auto":
        name = type(model).__name__
        if "ForSequenceClassification" in name or isinstance(model, MeanPoolClassifier):
            return Head.classification
        return Head.masked_lm if "ForMaskedLM" in name else Head.causal_lm
    valid = [h.value for h in Head]
    if head not in valid:
        raise ConfigError(f"head={head!r} is not a head; choose one of {valid}")
    return Head(head)


class ZOFineTuner:
    """A method of adazeta applied to `model`, stepped by you.

    model:           any Hugging Face (or torch) model; the method's trainable-set transform is applied
                     to it in place (TT adapters injected, LoRA via peft, everything for mezo).
                     Use `.model` afterwards: with LoRA it is the peft wrapper.
    method:          a preset of conf/method/ (`adazeta`, `mezo`, `mezo_lora`, `sparse_mezo`; `ft` and
                     `lora_fo` are the first-order references, stepped the same way).
    seed:            every query's z is a pure function of (seed, step, query). Adapter init and
                     new heads draw from torch's global RNG: call torch.manual_seed before.
    head:            `auto`, or a `Head` value; a classification head is trained with the method's set.
    schedule:        another query schedule than the preset's (`constant`, `linear`, `adaptive`).
    steps_per_epoch, max_steps: what the adaptive and linear schedules count Q by (bind them here,
                     or pass q= to step()); ZOTrainer binds them from the Trainer.
    guard:           stop a step whose loss is not finite or explodes before any weight moves
                     (raises adazeta.errors.DivergenceError; GuardConfig for other settings).
    **overrides:     config keys of the method, adapter, schedule and zo groups, without the prefix;
                     a method node as a dict (lora={"r": 4}, sparse={"sparsity": 0.9}). The flat
                     keys of earlier releases (lora_r=4) are rewritten to it with a FutureWarning.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: str = "adazeta",
        *,
        seed: int = 0,
        head: str | Head = "auto",
        schedule: str | None = None,
        steps_per_epoch: int | None = None,
        max_steps: int | None = None,
        guard: bool | GuardConfig = True,
        **overrides,
    ):
        self.config = compose_method(method, schedule, **overrides)
        cfg = self.config
        built = build_method(model, cfg.method, cfg.adapter, resolve_head(model, head), seed, zo=cfg.zo)
        self.model, self.trainables, self._step = built.model, built.trainables, built.step
        self.is_zo = cfg.method.optimizer == Optimizer.zo
        self.schedule = instantiate(cfg.schedule)
        if steps_per_epoch is not None or max_steps is not None:
            self.schedule.bind(steps_per_epoch=steps_per_epoch, max_steps=max_steps)
        # Passed to each step: sees its losses and g_q before the update.
        self.guard = Guard(guard if isinstance(guard, GuardConfig) else GuardConfig()) if guard else None
        check_precision(self.trainables, zo=self.is_zo)
        self.steps = 0  # steps taken; the next one is number steps + 1, as in adazeta-train

    @property
    def lr(self) -> float:
        return self._step.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._step.lr = value

    def queries(self) -> int:
        """Q of the next step, from the query schedule."""
        try:
            return self.schedule(self.steps)
        except RuntimeError:  # an adaptive or linear schedule that was never told the run's length
            raise ConfigError(
                f"method={self.config.method.name}'s query schedule {self.schedule!r} counts epochs or steps: "
                "pass steps_per_epoch= and max_steps= to ZOFineTuner, pass q= to step(), or choose "
                "schedule='constant'"
            ) from None

    def step(self, loss_fn: Callable[[], torch.Tensor], q: int | None = None) -> StepResult:
        """One step: `loss_fn()` returns the loss of the current batch at the current weights and is
        called 2Q times (ZO), under torch.no_grad(). q: the queries of this step (default: the
        schedule's). Returns the StepResult (loss, projected gradient, forward passes, seeds)."""
        if q is None:
            q = self.queries()
        elif isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ConfigError(f"q={q!r} must be an integer >= 1 (queries in this step)")
        if self.is_zo:
            self.model.eval()  # L+ and L- must see the same network: no dropout
            loss_fn = torch.no_grad()(loss_fn)  # forward passes only: never build a graph
        result = self._step(loss_fn, self.steps + 1, q, guard=self.guard)
        self.steps += 1
        return result

    def state_dict(self, weights: bool = True) -> dict:
        """The trainable weights (weights=False: left out, e.g. where the model is saved anyway), the
        update rule's state (momentum, Adam moments, lr), the step count and the guard's recent
        losses, as copies: save it with torch.save."""
        tensors, scalars = self._step.state_dict()
        state = {
            "method": self.config.method.name,
            "steps": self.steps,
            "update": {"tensors": {k: v.detach().clone() for k, v in tensors.items()}, "scalars": scalars},
            "guard": self.guard.state_dict() if self.guard is not None else None,
        }
        if weights:
            state["trainables"] = {t.name: t.param.detach().clone() for t in self.trainables}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.config.method.name:
            raise ConfigError(f"this state is of method={state['method']}, not method={self.config.method.name}")
        if "trainables" in state:  # absent from state_dict(weights=False)
            mine, theirs = {t.name for t in self.trainables}, set(state["trainables"])
            if mine != theirs:
                raise ConfigError(f"the state's trainable tensors do not match this model's: missing "
                                  f"{sorted(mine - theirs)}, unexpected {sorted(theirs - mine)}")
            for t in self.trainables:
                t.param.copy_(state["trainables"][t.name])
        self._step.load_state_dict(state["update"]["tensors"], state["update"]["scalars"])
        self.steps = state["steps"]
        if self.guard is not None and state["guard"] is not None:
            self.guard.load_state_dict(state["guard"])
