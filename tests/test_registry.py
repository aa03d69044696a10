"""The step registry (adazeta/step.py): every estimator of the config's enum has a registered step,
build_method builds the registered step of a config through the one constructor signature, and a
step's declared `Supports` decides what build_method refuses, by key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adazeta.config import (
    AdapterConfig,
    Estimator,
    Head,
    MethodConfig,
    Optimizer,
    TrainableSet,
    Update,
    ZOConfig,
)
from adazeta.methods import build_method  # imports, and so registers, every shipped step
from adazeta.step import STEPS, RegisteredStep, StepResult, Supports, registered, step_name


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


class FakeStep:
    """A step that records how it was built and moves nothing."""

    built: list[tuple] = []

    def __init__(self, model, trainables, cfg, seed, zo, dist=None):
        FakeStep.built.append((model, len(trainables), cfg.name, seed, zo, dist))
        self.lr = cfg.lr

    def __call__(self, loss_fn, step, q, guard=None):
        return StepResult(float(loss_fn()), 0.0, 1)

    def state_dict(self):
        return {}, {"lr": self.lr}

    def load_state_dict(self, tensors, scalars):
        self.lr = scalars["lr"]


@pytest.fixture
def fake(monkeypatch):
    """FakeStep registered in place of LOZO's step (method.estimator=lozo): full set, sgd only."""
    FakeStep.built = []
    supports = Supports(trainable=(TrainableSet.full,), update_rules=(Update.sgd,))
    monkeypatch.setitem(STEPS, "lozo", RegisteredStep("lozo", FakeStep, supports))
    return FakeStep


def fake_cfg(**kw) -> MethodConfig:
    base = {"name": "fake", "trainable": TrainableSet.full, "optimizer": Optimizer.zo, "estimator": Estimator.lozo}
    return MethodConfig(**{**base, **kw})


def test_every_estimator_of_the_config_has_a_registered_step():
    for estimator in Estimator:
        entry = registered(fake_cfg(estimator=estimator))
        assert entry.name == estimator.value and entry.optimizer == Optimizer.zo
    fo = registered(fake_cfg(optimizer=Optimizer.fo))
    assert fo.name == step_name(fake_cfg(optimizer=Optimizer.fo)) == "fo" and fo.optimizer == Optimizer.fo
    assert set(STEPS) == {e.value for e in Estimator} | {"fo"}


def test_build_method_builds_the_registered_step_with_the_one_signature(fake):
    model = mlp()
    zo = ZOConfig()
    m = build_method(model, fake_cfg(), AdapterConfig(), Head.causal_lm, seed=7, zo=zo)
    assert isinstance(m.step, FakeStep)
    assert fake.built == [(model, 4, "fake", 7, zo, None)]
    assert m.step(lambda: torch.tensor(0.5), 1, 1).loss == 0.5
