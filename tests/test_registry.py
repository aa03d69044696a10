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
from adazeta.errors import ConfigError
from adazeta.methods import build_method  # imports, and so registers, every shipped step
from adazeta.step import (
    STEPS,
    RegisteredStep,
    StepResult,
    Supports,
    check_supports,
    registered,
    step_name,
)


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

    def cuda_buffers(self, target_dtype, kept):
        return []


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
    for entry in STEPS.values():  # the Step protocol, the planner's part included
        assert all(callable(getattr(entry.cls, name, None)) for name in ("state_dict", "load_state_dict", "cuda_buffers"))


def test_build_method_builds_the_registered_step_with_the_one_signature(fake):
    model = mlp()
    zo = ZOConfig()
    m = build_method(model, fake_cfg(), AdapterConfig(), Head.causal_lm, seed=7, zo=zo)
    assert isinstance(m.step, FakeStep)
    assert fake.built == [(model, 4, "fake", 7, zo, None)]
    assert m.step(lambda: torch.tensor(0.5), 1, 1).loss == 0.5


@pytest.mark.parametrize(("change", "message"), [
    ({"cfg": {"trainable": TrainableSet.sparse}},
     "method.trainable=sparse is not supported by method.estimator=lozo; valid: full "
     "(method.trainable=sparse works with method.estimator=spsa)"),
    ({"cfg": {"update_rule": Update.adam}},
     "method.update_rule=adam is not supported by method.estimator=lozo; valid: sgd (or use method.estimator=spsa)"),
    ({"zo": {"parallel_queries": True}},
     "zo.parallel_queries=true (a step's queries as batched forwards) is not supported by method.estimator=lozo; "
     "set zo.parallel_queries=false"),
    ({"env": {"WORLD_SIZE": "2"}},
     "method=fake is stepped by method.estimator=lozo; torchrun runs method.estimator=spsa only"),
    ({"dtype": torch.bfloat16},
     "method=fake (method.estimator=lozo) perturbs its trainable set full in place, and 4 of its tensors are "
     "torch.bfloat16 (e.g. 0.weight)"),
    ({"factory": lambda model, spsa: None},
     "an estimator factory replaces a step's estimate, and method.estimator=lozo takes none"),
])
def test_what_a_registered_step_does_not_declare_is_refused_by_key(fake, monkeypatch, change, message):
    for key, value in change.get("env", {}).items():
        monkeypatch.setenv(key, value)
    model = mlp().to(change.get("dtype", torch.float32))
    with pytest.raises(ConfigError) as err:
        build_method(model, fake_cfg(**change.get("cfg", {})), AdapterConfig(), Head.causal_lm, seed=0,
                     zo=ZOConfig(**change.get("zo", {})), estimator=change.get("factory"))
    assert message in str(err.value)
    assert fake.built == []  # refused before the step is built


def test_what_a_registered_step_declares_is_built(fake, monkeypatch):
    supports = Supports(trainable=(TrainableSet.full, TrainableSet.sparse), update_rules=tuple(Update),
                        parallel_queries=(TrainableSet.full,), torchrun=True, low_precision=(TrainableSet.full,))
    monkeypatch.setitem(STEPS, "lozo", RegisteredStep("lozo", FakeStep, supports))
    monkeypatch.setenv("WORLD_SIZE", "2")
    build_method(mlp().to(torch.bfloat16), fake_cfg(update_rule=Update.adam), AdapterConfig(), Head.causal_lm,
                 seed=0, zo=ZOConfig(parallel_queries=True))
    assert len(fake.built) == 1


def test_the_replay_log_is_refused_from_the_declaration(fake):
    with pytest.raises(ConfigError, match="train.replay_log=true is not supported by method.estimator=lozo: "
                                          "adazeta-replay rebuilds the steps of method.estimator=spsa only"):
        check_supports(fake_cfg(), ZOConfig(), replay_log=True)
    assert check_supports(fake_cfg(estimator=Estimator.spsa), ZOConfig(), replay_log=True).name == "spsa"


def test_first_order_refusals_come_from_its_declaration(monkeypatch):
    fo = fake_cfg(name="ft", optimizer=Optimizer.fo)
    with pytest.raises(ConfigError, match=r"method.trainable=sparse is not supported by method.optimizer=fo "
                                          r"\(first-order\); valid: full, tt_adapter, lora, prefix"):
        check_supports(MethodConfig(**{**fo.__dict__, "trainable": TrainableSet.sparse}))
    with pytest.raises(ConfigError, match="zo.parallel_queries=true .* method.optimizer=fo \\(first-order\\)"):
        check_supports(fo, ZOConfig(parallel_queries=True))
    with pytest.raises(ConfigError, match="method=ft is first-order; torchrun runs the ZO methods only"):
        check_supports(fo, torchrun=True)
    check_supports(fo, replay_log=False)  # a first-order run keeps no replay log (engine/replay_log.py kept)
