"""HiZOO (adazeta/zo/hizoo.py): MeZO's step when Sigma = 1, the projected gradient and the curvature
against autograd along Sigma^(-1/2) z, where the Hessian estimate converges on a quadratic, exact
resume, what it refuses, its memory against inference, and the real entrypoint."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from conftest import build_method_on, compose_config, job_config, output, read_jsonl, run_entrypoint
from safetensors.torch import load_file
from test_zo import mlp_loss
from torch import nn

from adazeta.config import (
    AdapterConfig,
    Estimator,
    Head,
    HiZOOConfig,
    MethodConfig,
    Optimizer,
    TrainableSet,
    ZOConfig,
)
from adazeta.errors import ConfigError
from adazeta.methods import build_method
from adazeta.params import Trainable
from adazeta.trainable.sets import collect
from adazeta.validate import validate
from adazeta.zo.hizoo import HiZOOStep
from adazeta.zo.spsa import query_seed
from adazeta.zo.spsa_step import ZOStep


def mlp(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 3)).to(dtype)


def hizoo_cfg(**kw) -> MethodConfig:
    base = {"name": "hizoo", "trainable": TrainableSet.full, "optimizer": Optimizer.zo, "estimator": Estimator.hizoo,
            "lr": 1e-2, "eps": 1e-3, "hizoo": HiZOOConfig(alpha=0.0)}
    return MethodConfig(**{**base, **kw})


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


def flat_z(step: HiZOOStep, seed: int) -> torch.Tensor:
    return torch.cat([step.z(u, seed).flatten().double() for u in range(len(step.units))])


def random_sigma(step: HiZOOStep, seed=5) -> None:
    """Sigma in [0.25, 4], through load_state_dict (the checkpoint's way in)."""
    g = torch.Generator().manual_seed(seed)
    tensors, scalars = step.state_dict()
    step.load_state_dict({k: 0.25 + 3.75 * torch.rand(v.shape, generator=g, dtype=v.dtype) for k, v in tensors.items()},
                         scalars)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_with_sigma_one_a_step_is_mezos_step_plus_one_forward(weight_decay):
    """alpha = 0 keeps Sigma = 1: the perturbations, g_q and the update are MeZO's (ZOStep, the
    same seed, eps, lr and weight decay, Q = 2), up to the rounding of the update's pass; the step
    costs one forward more (L(theta)) and reports that loss. The losses are read as float32, as a
    real model's are (ZOStep reads every loss as float32; HiZOO keeps the loss's own dtype)."""
    cfg = hizoo_cfg(weight_decay=weight_decay)
    a, b = mlp(), mlp()
    zo_step = ZOStep(a, collect(a), MethodConfig(**{**cfg.__dict__, "estimator": Estimator.spsa}), seed=4,
                     zo=ZOConfig(fused_update=False))
    hizoo = HiZOOStep(b, collect(b), cfg, seed=4, zo=ZOConfig())
    loss_a, loss_b = mlp_loss(a), mlp_loss(b)
    l0 = float(loss_b().detach().float())
    mezo = zo_step(lambda: loss_a().float(), 3, 2)
    ours = hizoo(lambda: loss_b().float(), 3, 2)
    assert ours.seeds == mezo.seeds == [query_seed(4, 3, 0), query_seed(4, 3, 1)]
    assert ours.grads == pytest.approx(mezo.grads, rel=1e-9)
    assert (ours.forward_passes, mezo.forward_passes) == (5, 4)
    assert ours.loss == l0
    moved = flat(b.parameters()) - flat(mlp().parameters())
    assert moved.abs().max() > 1e-4  # the step moves (a no-op would pass the next line)
    torch.testing.assert_close(flat(b.parameters()), flat(a.parameters()), rtol=0, atol=1e-14)
    assert all(torch.equal(s, torch.ones_like(s)) for s in hizoo.sigma)


def test_the_update_uses_the_updated_sigma_as_the_reference_code_does():
    """With alpha > 0 the perturbations still use the step's old Sigma (= 1: g is MeZO's g), and the
    update divides by the square root of the new one: theta - lr g z / sqrt(Sigma_new)."""
    cfg = hizoo_cfg(hizoo=HiZOOConfig(alpha=0.3))
    a, b = mlp(), mlp()
    mezo = ZOStep(a, collect(a), MethodConfig(**{**cfg.__dict__, "estimator": Estimator.spsa}), seed=4,
                  zo=ZOConfig(fused_update=False))(lambda: mlp_loss(a)().float(), 1, 1)
    step = HiZOOStep(b, collect(b), cfg, seed=4, zo=ZOConfig())
    before = flat(b.parameters())
    loss_b = mlp_loss(b)
    result = step(lambda: loss_b().float(), 1, 1)
    assert result.grads == pytest.approx(mezo.grads, rel=1e-9)
    sigma = flat(step.sigma)
    assert (sigma - 1).abs().max() > 0.1  # Sigma moved
    z = flat_z(step, result.seeds[0])
    torch.testing.assert_close(flat(b.parameters()), before - cfg.lr * result.grads[0] * z / sigma.sqrt(),
                               rtol=0, atol=1e-14)


def test_g_and_the_curvature_are_autograds_derivatives_along_sigma_minus_half_z():
    """With D = Sigma^(-1/2) (Sigma random in [0.25, 4]) and v = D z: g = (L+ - L-) / (2 eps) is
    grad . v, and the Hessian term h = |L+ + L- - 2 L0| / (2 eps^2), read back from Sigma's move
    (Sigma_new = Sigma (1 + alpha (h z^2 - 1))), is v^T H v / 2 (autograd's Hessian-vector product).
    A perturbation by z, Sigma^(+1/2) z or Sigma^(-1) z, or a curvature without the 1/2, fails."""
    model = mlp()
    loss_fn = mlp_loss(model)
    params = list(model.parameters())
    alpha = 1e-3
    # eps 1e-4: |v| ~ 25 here, so the central differences' next terms (eps |v|)^2 stay ~1e-5
    step = HiZOOStep(model, collect(model), hizoo_cfg(lr=0.0, eps=1e-4, hizoo=HiZOOConfig(alpha=alpha)), seed=9, zo=ZOConfig())
    random_sigma(step)
    for k in (1, 2, 3):
        sigma = flat(step.sigma)
        z = flat_z(step, query_seed(9, k, 0))
        v = z / sigma.sqrt()
        with torch.enable_grad():  # before the step: its in-place perturbations would spoil the graph
            grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
            vs = [x.view_as(p) for x, p in zip(torch.split(v, [p.numel() for p in params]), params, strict=True)]
            hv = torch.autograd.grad(grads, params, vs)
        directional, curvature = float(flat(grads) @ v), float(flat(hv) @ v) / 2
        result = step(loss_fn, k, 1)
        assert abs(directional) > 0.005
        assert result.grads[0] == pytest.approx(directional, rel=1e-4)
        h = ((flat(step.sigma) / sigma - 1) / alpha + 1) / z.square()
        keep = z.abs() > 0.5  # where z^2 is not tiny, h is read back without cancellation
        assert abs(curvature) > 0.01
        torch.testing.assert_close(h[keep], torch.full_like(h[keep], abs(curvature)), rtol=1e-3, atol=0)


def test_on_a_quadratic_sigma_converges_to_d_plus_2_over_2_times_the_hessian_diagonal():
    """L = 0.5 x^T H x, H = diag(H_i) over d = 8 values spanning a factor 64: L+ + L- - 2 L0 =
    eps^2 sum_j (H_j / Sigma_j) z_j^2, and E[z_i^2 z_j^2] = 1 + 2 [i = j] give the moving average one
    fixed point, Sigma_i = (d + 2) / 2 H_i (module docstring). Its time average (geometric, after a
    burn-in) is checked: proportional to H within the estimate's noise, at the predicted scale 5. A
    Sigma stuck at 1, one that tracks H itself, or a wrong power of Sigma in the perturbation or
    the estimate, fails."""
    hess = torch.tensor([0.5, 1, 2, 4, 8, 16, 0.25, 3.0], dtype=torch.float64)
    x = nn.Parameter(torch.linspace(-1, 1, 8, dtype=torch.float64))
    step = HiZOOStep(None, [Trainable("x", x, True)], hizoo_cfg(lr=0.0, hizoo=HiZOOConfig(alpha=0.005)), seed=0, zo=ZOConfig())
    loss_fn = lambda: 0.5 * (hess * x * x).sum()  # noqa: E731
    log_sum, n = torch.zeros(8, dtype=torch.float64), 0
    for k in range(1, 8001):
        step(loss_fn, k, 1)
        if k > 3000:
            log_sum += step.sigma[0].log()
            n += 1
    ratio = (log_sum / n).exp() / hess
    d = 8
    assert float(ratio.log().mean().exp()) == pytest.approx((d + 2) / 2, rel=0.1), ratio
    assert float(ratio.min()) > 0.7 * (d + 2) / 2 and float(ratio.max()) < 1.5 * (d + 2) / 2, ratio


def test_state_dict_round_trip_gives_a_bit_identical_next_step():
    """Sigma is the step's whole state besides the weights: a fresh step on a copy of the weights,
    loaded with the state_dict after 3 steps, takes the 4th step bit for bit as the original
    (a fresh Sigma = 1 would not)."""
    model = mlp(torch.float32)
    step = HiZOOStep(model, collect(model), hizoo_cfg(hizoo=HiZOOConfig(alpha=0.05), lr=1e-3), seed=2, zo=ZOConfig())
    loss_fn = mlp_loss(model)
    for k in (1, 2, 3):
        step(loss_fn, k, 2)
    tensors, scalars = step.state_dict()
    saved = {k: v.clone() for k, v in tensors.items()}
    twin = copy.deepcopy(model)
    fresh = HiZOOStep(twin, collect(twin), hizoo_cfg(hizoo=HiZOOConfig(alpha=0.05), lr=1.0), seed=2, zo=ZOConfig())
    untouched = copy.deepcopy(twin)
    plain = HiZOOStep(untouched, collect(untouched), hizoo_cfg(hizoo=HiZOOConfig(alpha=0.05), lr=1e-3), seed=2, zo=ZOConfig())
    fresh.load_state_dict(saved, scalars)
    assert fresh.lr == 1e-3
    a, b, c = step(loss_fn, 4, 2), fresh(mlp_loss(twin), 4, 2), plain(mlp_loss(untouched), 4, 2)
    assert a.grads == b.grads and a.loss == b.loss
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    assert all(torch.equal(s, t) for s, t in zip(step.sigma, fresh.sigma, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), untouched.parameters(), strict=True))
    assert c.grads != a.grads


def test_lora_state_is_named_per_tensor_and_one_copy_of_the_trainable_set():
    """method=hizoo_lora groups the LoRA tensors into flat buffers, as ZOStep does; its state is
    named per tensor (`hessian.<i>`, shaped like each) and adds exactly one copy of the set."""
    m, obj, task = build_method_on(["model=tiny-llama", "method=hizoo_lora", "task.num_train=16"])
    tensors, scalars = m.step.state_dict()
    assert list(tensors) == [f"hessian.{i}" for i in range(len(m.trainables))]
    assert all(tensors[f"hessian.{i}"].shape == t.param.shape for i, t in enumerate(m.trainables))
    assert sum(s.numel() for s in m.step.sigma) == sum(t.param.numel() for t in m.trainables)
    batch = obj.encode(task.load().train[:4], train=True)
    result = m.step(obj.batch_loss(m.model, batch), 1, 1)
    assert result.forward_passes == 3 and math.isfinite(result.grads[0])


@pytest.mark.parametrize(("overrides", "key"), [
    (["method.trainable=sparse"], "method.trainable=sparse"),
    (["method.update_rule=momentum"], "method.update_rule=momentum"),
    (["zo.parallel_queries=true", "method.trainable=lora"], "zo.parallel_queries=true"),
    (["model.dtype=bfloat16"], "model.dtype=float32"),
    (["train.replay_log=true"], "train.replay_log=true"),  # before the model loads (engine/build.py check_config)
])
def test_unsupported_combinations_are_refused_by_name(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_method_on(["model=tiny-llama", "method=hizoo", "task.num_train=16", *overrides])


def test_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun runs method.estimator=spsa only"):
        build_method(mlp(), hizoo_cfg(), AdapterConfig(), Head.causal_lm, seed=0)


@pytest.mark.parametrize(("overrides", "key"), [
    (["method.hizoo.alpha=1.0"], "method.hizoo.alpha"),
    (["method.hizoo.alpha=-0.1"], "method.hizoo.alpha"),
    (["method=mezo", "method.hizoo.alpha=0.1"], "method.hizoo.alpha"),  # a key the method does not read
    (["method=ft", "method.estimator=hizoo"], "method.estimator"),
])
def test_config_refusals_name_the_key(overrides, key):
    cfg = compose_config(["method=hizoo", *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(job_config(cfg), overrides)


@pytest.mark.slow  # a memory probe in a child process
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resident set is read from /proc")
def test_hizoo_step_costs_one_copy_of_the_trainable_set_over_inference():
    """Sigma is one fp32 value per trainable value; the perturbations and the update go a chunk
    at a time. On a model whose embedding and LM head are 119 MiB each, a training step peaks
    above inference by Sigma (the weights' size) plus a small fraction of the embedding, not
    by a second copy (a parameter-sized z or Sigma^(-1/2) would add one). Measured as the
    planner measures, in fresh processes."""
    from adazeta.cli import plan as planner

    wide = ["model=tiny-llama", "model.arch.hidden_size=1024", "model.arch.intermediate_size=1024",
            "model.arch.num_attention_heads=16", "model.device=cpu", "train.batch_size=8", "method=hizoo"]
    plan = planner.plan(wide, fit=(1, 2), seq_len=32, threads=1, jobs=2, log=lambda s: None)
    embedding_gib = 30522 * 1024 * 4 / 1024**3
    for m in plan.measurements:
        sigma_gib = m.trainable_params * 4 / 1024**3
        extra = m.peak_gib - m.inference_gib
        assert 0.9 * sigma_gib < extra < sigma_gib + 0.2 * embedding_gib, (m.layers, extra, sigma_gib)


@pytest.mark.slow  # the entrypoint in a child process
def test_hizoo_entrypoint_trains_and_logs_2q_plus_1_passes(tmp_path):
    """`adazeta-train method=hizoo` on the two-layer Llama with Q = 2: 5 forward passes per step
    in the logged count, the usual metrics, no replay log, and Sigma in the checkpoint's state."""
    proc = run_entrypoint(["method=hizoo", "model=tiny-llama", "method.lr=1e-3", "method.hizoo.alpha=1e-4",
                           "schedule.q=2", "train.max_steps=8", "train.eval_steps=8", "train.log_steps=4",
                           "train.batch_size=4", "task.num_train=4", "task.num_dev=8", "task.num_test=8",
                           "train.progress=false"], tmp_path)
    assert proc.returncode == 0, output(proc)[-3000:]
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["forward_passes"] for r in rows] == [20, 40]
    assert all(r["zo/queries"] == 2 and math.isfinite(r["zo/projected_grad"]) for r in rows)
    assert not (tmp_path / "run" / "replay.jsonl").exists()
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000008" / "state.safetensors"))
    sigma = [v for k, v in state.items() if "hessian." in k]
    assert sigma and all(bool((v > 0).all()) for v in sigma) and any(not bool((v == 1).all()) for v in sigma)


def test_study_budget_counts_2q_plus_1_passes_per_step():
    """adazeta-study sizes a run by forward passes: a HiZOO step costs 2Q + 1 of them, so a budget
    of 120 at Q = 1 is 40 steps, where MeZO's 2 per step gives 60."""
    from adazeta.cli.study_plan import passes_per_step, steps_for_budget

    assert passes_per_step(["method=hizoo"], 3) == [3, 3, 3]
    assert passes_per_step(["method=hizoo", "schedule.q=2"], 2) == [5, 5]
    assert steps_for_budget(["method=hizoo"], 120) == 40
    assert steps_for_budget(["method=mezo"], 120) == 60


def test_planner_adds_the_cuda_only_scratch_of_whole_tensor_z():
    """On CUDA (no exact chunks) HiZOO reads each unit's z whole: the plan adds 2 rows (z and
    Sigma^(-1/2), Q = 1) of the largest trainable tensor, here tiny-llama's embedding."""
    from adazeta.engine.plan.measure import cuda_terms

    m, obj, task = build_method_on(["model=tiny-llama", "method=hizoo", "task.num_train=16"])
    m.step(obj.batch_loss(m.model, obj.encode(task.load().train[:4], train=True)), 1, 1)
    (term,) = cuda_terms(m, "float32", set())
    largest = max(t.param.numel() for t in m.trainables)
    assert term.cuda_gib == 2 * largest * 4 / 1024**3 and "embed_tokens" in term.name
    assert 0 < term.cpu_gib < term.cuda_gib / 10  # on CPU the rows are chunks
