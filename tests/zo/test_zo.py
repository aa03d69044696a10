"""The ZO estimator (adazeta/zo/spsa.py): seeds, perturbation, the SPSA estimate and the SGD update.

Checked against independent computations: autograd gradients, a by-hand update, and noise
regenerated from fresh generators.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from torch import nn

from adazeta.params import Trainable
from adazeta.trainable.sets import collect
from adazeta.zo.spsa import SPSA, query_seed, tensor_seed


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def mlp(dtype=torch.float64, hidden=32, norm=False, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(8, hidden)] + ([nn.LayerNorm(hidden)] if norm else []) + [nn.Tanh(), nn.Linear(hidden, 3)]
    return nn.Sequential(*layers).to(dtype)


def mlp_loss(model: nn.Module, seed=1, n=64):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return lambda: nn.functional.cross_entropy(model(x), y)


def flat_z(spsa: SPSA, seed: int) -> torch.Tensor:
    return torch.cat([spsa.z(i, seed).flatten().clone() for i in range(len(spsa.trainables))])


def autograd_grad(model: nn.Module, loss_fn) -> torch.Tensor:
    model.zero_grad()
    with torch.enable_grad():
        loss_fn().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).detach().clone()


# -- query_seed -------------------------------------------------------------------------------


def test_query_seed_is_a_pure_function():
    assert query_seed(0, 1, 0) == query_seed(0, 1, 0)
    torch.manual_seed(123)  # no hidden dependence on global RNG state
    a = query_seed(7, 3, 2)
    torch.manual_seed(456)
    assert query_seed(7, 3, 2) == a
    # Pinned: a change here silently changes every z of every run, so replays and resumes of
    # runs made with earlier versions stop matching their logs.
    assert query_seed(0, 1, 0) == 4964578127960768432


def test_query_seed_differs_across_seed_step_query():
    grid = [(s, k, q) for s in range(4) for k in range(50) for q in range(10)]
    values = [query_seed(*x) for x in grid]
    assert len(set(values)) == len(grid)  # includes swaps like (0, 1, 0) vs (0, 0, 1)
    assert all(0 <= v < 2**63 for v in values)  # a valid torch.Generator seed
    assert query_seed(0, 1, 0) != query_seed(1, 1, 0) != query_seed(1, 2, 0) != query_seed(1, 2, 1)


# -- z -------------------------------------------------------------------------------------------


def test_z_is_reproducible_and_independent_of_the_global_rng():
    model = mlp()
    spsa = SPSA(collect(model), eps=1e-3)
    torch.manual_seed(1)
    first = flat_z(spsa, 42)
    torch.manual_seed(2)
    torch.rand(1000)  # consume global randomness in between
    assert torch.equal(flat_z(spsa, 42), first)
    assert not torch.allclose(flat_z(spsa, 43), first)


def test_z_is_standard_normal_and_differs_between_tensors():
    """Each tensor's z is N(0, 1) from an explicit generator seeded with tensor_seed(seed, i)
    (adazeta/zo/spsa.py docstring), and two tensors of the same shape do not share noise."""
    a, b = nn.Parameter(torch.zeros(300, 400)), nn.Parameter(torch.zeros(300, 400))
    spsa = SPSA([Trainable("a", a, True), Trainable("b", b, True)], eps=1e-3)
    za, zb = spsa.z(0, 5).clone(), spsa.z(1, 5).clone()
    for z in (za, zb):
        assert abs(float(z.mean())) < 0.01
        assert abs(float(z.std()) - 1.0) < 0.01
    assert abs(float((za * zb).mean())) < 0.01  # uncorrelated
    for i, z in enumerate((za, zb)):
        expected = torch.randn(300, 400, generator=torch.Generator().manual_seed(tensor_seed(5, i)))
        assert torch.equal(z, expected)


def test_zo_step_leaves_the_global_rng_untouched():
    model = mlp()
    spsa = SPSA(collect(model), eps=1e-3)
    loss_fn = mlp_loss(model)
    state = torch.get_rng_state()
    seeds = [query_seed(0, 1, q) for q in range(3)]
    grads = [spsa.projected_grad(loss_fn, s)[0] for s in seeds]
    spsa.sgd_update(seeds, grads, lr=1e-2, weight_decay=0.1)
    assert torch.equal(torch.get_rng_state(), state)


# -- perturbation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert():
    loaded = tiny_model("tiny-bert")
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 2000, (4, 12), generator=g),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
    }
    labels = torch.tensor([0, 1, 1, 0])

    def loss_fn():
        return nn.functional.cross_entropy(model(**batch).logits.float(), labels)

    return model, loss_fn


def test_perturb_plus_minus_restores_weights(tiny_bert):
    model, _ = tiny_bert
    spsa = SPSA(collect(model), eps=1e-3)
    before = snapshot(model)
    seed = query_seed(0, 1, 0)
    spsa.perturb(seed, +1.0)
    moved = snapshot(model)
    assert max_diff(moved, before) > 1e-3  # eps * |z| reaches a few eps somewhere
    spsa.perturb(seed, -2.0)
    spsa.perturb(seed, +1.0)
    assert max_diff(snapshot(model), before) < 1e-6  # fp32 round-off of three adds only


def test_perturb_moves_by_exactly_eps_z():
    model = mlp()
    spsa = SPSA(collect(model), eps=1e-3)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    spsa.perturb(11, +1.0)
    after = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    torch.testing.assert_close(after - before, 1e-3 * flat_z(spsa, 11), rtol=0, atol=1e-12)


def test_projected_grad_restores_weights_and_is_the_directional_derivative(tiny_bert):
    model, loss_fn = tiny_bert
    spsa = SPSA(collect(model), eps=1e-3)
    before = snapshot(model)
    g, loss = spsa.projected_grad(loss_fn, query_seed(0, 1, 0))
    assert max_diff(snapshot(model), before) < 1e-6
    with torch.no_grad():
        assert loss == pytest.approx(float(loss_fn()), abs=1e-4)  # (L+ + L-)/2 = L + O(eps^2)
    assert g != 0.0


def test_projected_grad_equals_autograd_directional_derivative():
    """g = (L+ - L-) / (2 eps) approximates grad . z: in float64 the central difference is exact
    to O(eps^2); what remains is projected_grad reading the losses as float32 (~6e-8 / (2 eps))."""
    model = mlp()
    loss_fn = mlp_loss(model)
    grad = autograd_grad(model, loss_fn)
    spsa = SPSA(collect(model), eps=1e-3)  # eps * |z| ~ 0.02: third-order terms stay ~1e-5
    for seed in (1, 2, 3):
        g, loss = spsa.projected_grad(loss_fn, seed)
        directional = float(grad @ flat_z(spsa, seed))
        assert abs(directional) > 0.05
        assert g == pytest.approx(directional, rel=1e-3)
        assert loss == pytest.approx(float(loss_fn()), rel=1e-3)


# -- the estimate and the update ---------------------------------------------------------------


def test_averaged_estimate_points_along_the_gradient():
    """(1/Q) sum_q g_q z_q, read off a real sgd_update, has cosine ~ 1/sqrt(1 + (d+1)/Q) with the
    autograd gradient (E over z ~ N(0, I_d)); with d = 387 and Q = 400 that is ~0.71. A wrong sign,
    a z that differs between the estimate and the update, or one z reused for every query
    (cosine ~ 1/sqrt(d) ~ 0.05) all fail this."""
    model = mlp(dtype=torch.float32)
    loss_fn = mlp_loss(model)
    grad = autograd_grad(model, loss_fn).double()
    trainables = collect(model)
    d = sum(t.param.numel() for t in trainables)
    q = 400
    spsa = SPSA(trainables, eps=1e-3)
    seeds = [query_seed(0, 1, i) for i in range(q)]
    grads = [spsa.projected_grad(loss_fn, s)[0] for s in seeds]
    before = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    spsa.sgd_update(seeds, grads, lr=1.0, weight_decay=0.0)
    estimate = before - torch.cat([p.detach().flatten().double() for p in model.parameters()])
    cos = float(estimate @ grad / (estimate.norm() * grad.norm()))
    expected = 1 / math.sqrt(1 + (d + 1) / q)
    assert d == 387
    assert cos > 0.5
    assert abs(cos - expected) < 0.15, (cos, expected)


def test_sgd_update_matches_the_formula_by_hand():
    """theta - lr * ((1/Q) sum g_q z_q + wd * theta), wd skipped for biases and norm weights, with
    z regenerated from fresh generators seeded like adazeta/zo/spsa.py's docstring says."""
    model = mlp(norm=True)  # 0: Linear, 1: LayerNorm, 2: Tanh, 3: Linear
    trainables = collect(model)
    no_decay = {"0.bias", "1.weight", "1.bias", "3.bias"}
    assert {t.name: t.decay for t in trainables} == {
        name: name not in no_decay for name, _ in model.named_parameters()
    }
    seeds = [query_seed(3, 7, q) for q in range(3)]
    grads = [0.7, -1.3, 0.2]
    lr, wd = 0.05, 0.1
    expected = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        est = torch.zeros_like(p)
        for s, g in zip(seeds, grads, strict=True):
            gen = torch.Generator().manual_seed(tensor_seed(s, i))
            est += g * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        est /= len(seeds)
        decay = 0.0 if name in no_decay else wd
        expected[name] = p.detach() - lr * (est + decay * p.detach())
    SPSA(trainables, eps=1e-3).sgd_update(seeds, grads, lr=lr, weight_decay=wd)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-12, msg=name)


def test_norm_weights_of_a_decoder_are_not_decayed():
    """RMSNorm (Llama) counts as a norm; linear weights decay, norm weights do not."""
    model = tiny_model("tiny-llama").model
    for p in model.parameters():
        p.requires_grad_(True)
    flags = {t.name: t.decay for t in collect(model)}
    norms = [n for n in flags if "norm" in n]
    assert norms and not any(flags[n] for n in norms)
    assert flags["model.layers.0.self_attn.q_proj.weight"]
    assert flags["model.layers.0.mlp.down_proj.weight"]


def test_a_many_query_step_lowers_the_loss():
    model = mlp(dtype=torch.float32)
    loss_fn = mlp_loss(model)
    spsa = SPSA(collect(model), eps=1e-3)
    with torch.no_grad():
        start = float(loss_fn())
    seeds = [query_seed(1, 1, i) for i in range(64)]
    grads = [spsa.projected_grad(loss_fn, s)[0] for s in seeds]
    spsa.sgd_update(seeds, grads, lr=0.05, weight_decay=0.0)
    with torch.no_grad():
        assert float(loss_fn()) < start - 1e-4
