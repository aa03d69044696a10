"""FZOO (adazeta/zo/fzoo.py): the Rademacher noise, the normalised one-sided estimate against autograd,
the update by hand, its direction on a model built from config, what it refuses, its memory
against inference, and the real entrypoint."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import build_method_on, compose_config, job_config, output, read_jsonl, run_entrypoint
from test_zo import mlp, mlp_loss
from torch import nn

from adazeta.config import FZOOConfig, MethodConfig, Optimizer, TrainableSet, ZOConfig
from adazeta.errors import ConfigError
from adazeta.params import Trainable
from adazeta.trainable.sets import collect
from adazeta.validate import validate
from adazeta.zo.fzoo import FZOOStep, Rademacher
from adazeta.zo.spsa import query_seed


def fzoo_cfg(**kw) -> MethodConfig:
    base = {"name": "fzoo", "trainable": TrainableSet.full, "optimizer": Optimizer.zo, "lr": 1.0, "eps": 1e-6,
            "fzoo": FZOOConfig(n=8)}
    return MethodConfig(**{**base, **kw})


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def flat_u(noise: Rademacher, seed: int) -> torch.Tensor:
    return torch.cat([noise.u(i, seed).flatten().double() for i in range(len(noise.units))])


def autograd_grad(model: nn.Module, loss_fn) -> torch.Tensor:
    model.zero_grad()
    with torch.enable_grad():
        loss_fn().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).detach().double()


def test_rademacher_noise_is_balanced_signs_reproducible_and_per_tensor():
    p = nn.Parameter(torch.zeros(3 * 16384 + 21))  # several chunks and a ragged tail
    q = nn.Parameter(torch.zeros(100))
    noise = Rademacher([Trainable("p", p, True), Trainable("q", q, True)])
    u = noise.u(0, 7)
    assert set(u.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(u.mean())) < 4 / math.sqrt(u.numel())  # 4 standard deviations of a fair coin
    assert torch.equal(u, Rademacher([Trainable("p", p, True)]).u(0, 7))  # a pure function of the seed
    assert not torch.equal(u, noise.u(0, 8))
    assert not torch.equal(noise.u(1, 7), u[:100])  # each tensor draws from its own seed
    noise.add([7], [0.5])  # a pass regenerates exactly the u that u() gives
    assert torch.equal(p.detach(), 0.5 * u)


def test_one_sided_differences_are_the_autograd_directional_derivatives():
    """g_i = (l_i - l_0) / (N sigma) with l_i - l_0 = eps u_i . grad + O(eps^2): from autograd alone,
    g_i = d_i / (N std(d)) with d_i = u_i . grad. A wrong sign, the unbiased std, a 1/eps factor or a
    u that differs between the forward and the update all fail this."""
    model = mlp()
    loss_fn = mlp_loss(model)
    grad = autograd_grad(model, loss_fn)
    step = FZOOStep(model, collect(model), fzoo_cfg(), seed=3, zo=ZOConfig())
    seeds = [query_seed(3, 1, i) for i in range(8)]
    d = torch.stack([flat_u(step.noise, s) @ grad for s in seeds])
    expected = d / (8 * d.std(unbiased=False))
    before, l0 = flat(model), float(loss_fn().detach())
    result = step(loss_fn, 1, 1)
    assert result.seeds == seeds and result.forward_passes == 9
    assert torch.allclose(torch.tensor(result.grads, dtype=torch.float64), expected, rtol=1e-4, atol=1e-7)
    # The update (lr 1) is sum_i g_i u_i, the u regenerated here from the seeds.
    moved = before - flat(model)
    by_hand = sum(g * flat_u(step.noise, s) for g, s in zip(result.grads, seeds, strict=True))
    assert torch.allclose(moved, by_hand, atol=1e-9)
    assert result.loss == l0  # the reported loss is l_0, at theta


@pytest.mark.parametrize("fused", [True, False])
def test_update_with_weight_decay_matches_the_formula_by_hand(fused):
    """theta <- d theta - lr sum_i g_i u_i, d = 1 - lr wd on weights and 1 on biases, with the last
    perturbation's restore folded into the update pass or not."""
    model = mlp()
    loss_fn = mlp_loss(model)
    lr, wd = 1e-2, 0.5
    step = FZOOStep(model, collect(model), fzoo_cfg(lr=lr, weight_decay=wd, eps=1e-3, fzoo=FZOOConfig(n=4)), seed=0,
                    zo=ZOConfig(fused_update=fused))
    before = [p.detach().clone() for p in model.parameters()]
    result = step(loss_fn, 5, 2)  # Q = 2 doubles N
    assert len(result.grads) == 8 and result.forward_passes == 9
    for i, (t, b) in enumerate(zip(step.trainables, before, strict=True)):
        f = 1 - lr * wd if t.decay else 1.0
        expected = f * b.double() - lr * sum(g * step.noise.u(i, s).double() for g, s in zip(result.grads, result.seeds, strict=True))
        assert torch.allclose(t.param.double(), expected, atol=1e-12), t.name


def test_equal_perturbed_losses_move_nothing():
    """sigma = 0 (every perturbed loss equal): the reference divides by zero; here g = 0."""
    model = mlp()
    before = flat(model)
    step = FZOOStep(model, collect(model), fzoo_cfg(), seed=0, zo=ZOConfig())
    result = step(lambda: torch.tensor(1.0), 1, 1)
    assert result.grads == [0.0] * 8
    assert torch.allclose(flat(model), before, atol=1e-12)


def test_fzoo_estimate_points_along_the_gradient_on_a_model_from_config():
    """method=fzoo with trainable=lora on the two-layer Llama of conf/model: the mean of the step's
    estimate sum_i g_i u_i over K steps (lr 1, weights put back after each) has a clearly positive
    cosine with the autograd gradient of the LoRA parameters (about 1 / sqrt(1 + d / (K N)) for d
    trainable values; about 1 / sqrt(d) = 0.02 for an estimate unrelated to the gradient)."""
    m, obj, task = build_method_on(["model=tiny-llama", "method=fzoo", "method.trainable=lora", "method.lr=1.0",
                                    "method.fzoo.n=8", "task.num_train=16"])
    batch = obj.encode(task.load().train[:4], train=True)
    loss_fn = obj.batch_loss(m.model, batch)
    params = [t.param for t in m.trainables]
    for p in params:
        p.grad = None
    with torch.enable_grad():
        loss_fn().backward()
    grad = torch.cat([p.grad.flatten() for p in params]).double()
    for p in params:
        p.grad = None
    start = [p.detach().clone() for p in params]
    total = torch.zeros_like(grad)
    steps = 60
    for k in range(1, steps + 1):
        m.step(loss_fn, k, 1)
        with torch.no_grad():
            total += torch.cat([(s - p).flatten() for s, p in zip(start, params, strict=True)]).double()
            for s, p in zip(start, params, strict=True):
                p.copy_(s)
    d = grad.numel()
    cos = float(total @ grad / (total.norm() * grad.norm()))
    expected = 1 / math.sqrt(1 + d / (steps * 8))
    assert cos > 0.25, (cos, expected, d)


@pytest.mark.parametrize(("overrides", "key"), [
    (["method.trainable=sparse"], "method.trainable=sparse"),
    (["method.update_rule=adam"], "method.update_rule=adam"),
    (["zo.parallel_queries=true", "method.trainable=lora"], "zo.parallel_queries=true"),
    (["model.dtype=bfloat16"], "model.dtype=float32"),
    (["train.replay_log=true"], "train.replay_log=true"),  # before the model loads (engine/build.py check_config)
])
def test_unsupported_combinations_are_refused_by_name(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_method_on(["model=tiny-llama", "method=fzoo", "task.num_train=16", *overrides])


@pytest.mark.parametrize(("overrides", "key"), [
    (["method.fzoo.n=1"], "method.fzoo.n"),
    (["method=mezo", "method.fzoo.n=4"], "method.fzoo.n"),  # a key the method does not read
])
def test_config_refusals_name_the_key(overrides, key):
    cfg = compose_config(["method=fzoo", *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(job_config(cfg), overrides)


@pytest.mark.slow  # a memory probe in a child process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resident set is read from /proc")
def test_fzoo_step_stays_near_inference_memory():
    """FZOO's perturbations and its update are drawn chunk by chunk into small buffers and added in
    place: on a model whose embedding and LM head are 119 MiB each, a training step peaks within a
    small fraction of the embedding above inference (one parameter-sized u would add 100%).
    Measured as the planner measures, in fresh processes."""
    from adazeta.cli import plan as planner

    wide = ["model=tiny-llama", "model.arch.hidden_size=1024", "model.arch.intermediate_size=1024",
            "model.arch.num_attention_heads=16", "model.device=cpu", "train.batch_size=8", "method=fzoo",
            "method.fzoo.n=2"]
    plan = planner.plan(wide, fit=(1, 2), seq_len=32, threads=1, jobs=2, log=lambda s: None)
    embedding_gib = 30522 * 1024 * 4 / 1024**3
    for m in plan.measurements:
        assert m.peak_gib - m.inference_gib < 0.2 * embedding_gib, (m.layers, m.peak_gib, m.inference_gib)


@pytest.mark.slow  # the entrypoint in a child process
def test_fzoo_entrypoint_trains_and_logs(tmp_path):
    """`adazeta-train method=fzoo` on the two-layer Llama: N + 1 forward passes per step, the usual
    metrics, no replay log, and the train loss (l_0, at theta) lower after the steps than before."""
    proc = run_entrypoint(["method=fzoo", "model=tiny-llama", "method.fzoo.n=4", "method.lr=3e-3",
                           "train.max_steps=12", "train.eval_steps=12", "train.log_steps=4", "train.batch_size=4",
                           "task.num_train=4", "task.num_dev=8", "task.num_test=8", "train.progress=false"], tmp_path)
    assert proc.returncode == 0, output(proc)[-3000:]
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["forward_passes"] for r in rows] == [20, 40, 60]
    assert all(r["zo/queries"] == 1 and math.isfinite(r["zo/projected_grad"]) for r in rows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"], rows
    assert not (tmp_path / "run" / "replay.jsonl").exists()


def test_study_budget_counts_n_plus_one_passes_per_step():
    """adazeta-study sizes a run by forward passes: FZOO's step costs method.fzoo.n x Q + 1 of them, so a
    budget of 120 at N = 8 is 13 steps (117 passes), where MeZO's 2 per step gives 60."""
    from adazeta.cli.study_plan import passes_per_step, steps_for_budget

    assert passes_per_step(["method=fzoo"], 3) == [9, 9, 9]
    assert passes_per_step(["method=fzoo", "method.fzoo.n=4", "schedule.q=2"], 2) == [9, 9]
    assert steps_for_budget(["method=fzoo"], 120) == 13
    assert steps_for_budget(["method=mezo"], 120) == 60
