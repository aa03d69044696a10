"""ZO on bf16 weights: a full-parameter method on a bf16 model trains,
its perturbation leaves no drift, and optimiser state lives in fp32.

An update lr g z of about 1e-6 is under half a bf16 ulp of a weight near 0.02 (1.2e-4): rounded
to nearest it is dropped, and an in-place +eps z / -2 eps z / +eps z round trip leaves about an
ulp of drift per query (numbers: scripts/bf16_zo.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import built_step

from adazeta.errors import ConfigError
from adazeta.params import Trainable
from adazeta.zo import spsa as zo
from adazeta.zo.spsa import SPSA
from adazeta.zo.updates import Adam, Momentum


def weights(method) -> dict[str, torch.Tensor]:
    return {t.name: t.param.detach().clone() for t in method.trainables}


def layer_weights(n: int, dtype: torch.dtype) -> torch.nn.Parameter:
    """n weights of a layer's scale (std 0.02), as a parameter of `dtype`."""
    return torch.nn.Parameter((torch.randn(n, generator=torch.Generator().manual_seed(7)) * 0.02).to(dtype))


def test_stochastic_rounding_is_unbiased_and_stays_on_the_two_neighbours():
    base = torch.tensor(0.02).to(torch.bfloat16).float().item()
    x = torch.full((200_000,), base + 3e-5)  # a quarter of a bf16 ulp (1.2e-4) above a bf16 value
    lo = x.to(torch.bfloat16)
    r = zo.stochastic_round(x, torch.bfloat16, torch.Generator().manual_seed(0))
    hi = torch.nextafter(lo, torch.full_like(lo, 1.0))
    assert set(r.unique().tolist()) == {lo[0].item(), hi[0].item()}
    assert r.float().mean().item() == pytest.approx(x[0].item(), abs=2e-6)  # rounded to nearest: off by 3e-5
    assert (lo.float().mean() - x[0]).abs().item() > 2e-5


def test_a_bf16_update_moves_the_weights_in_expectation_as_the_fp32_update_does():
    """One MeZO update (lr 5e-7, g = 2: lr g z ~ 1e-6) of 2^18 bf16 weights: regressed on the
    update computed in fp32 from the same z, the bf16 displacement has slope 1 (stochastic
    rounding: unbiased); rounded to nearest, almost every weight would not move (slope ~ 0)."""
    p = layer_weights(1 << 18, torch.bfloat16)
    spsa = SPSA([Trainable("w", p, decay=True)], eps=1e-3)
    before = p.detach().float().clone()
    seed, g, lr = 12345, 2.0, 5e-7
    intended = -lr * g * spsa.z(0, seed).float()  # the fp32 twin's displacement
    spsa.sgd_update([seed], [g], lr, 0.0)
    moved = p.detach().float() - before
    slope = (moved * intended).sum() / (intended * intended).sum()
    # Per weight the rounding noise is ~10x the update (sqrt(ulp |update|)): slope std ~ 10 / 512.
    assert 0.9 < slope.item() < 1.1
    assert 0.003 < (moved != 0).float().mean().item() < 0.1  # about |update| / ulp of the weights flip


def test_bf16_weight_decay_is_applied_in_expectation():
    p = layer_weights(1 << 18, torch.bfloat16)
    spsa = SPSA([Trainable("w", p, decay=True)], eps=1e-3)
    before = p.detach().float().clone()
    spsa.decay(lr=1e-3, weight_decay=0.1, seeds=[3])  # a factor 1 - 1e-4: far under half an ulp
    shrink = 1 - ((p.detach().float() * before).sum() / (before * before).sum()).item()
    assert shrink == pytest.approx(1e-4, rel=0.15)


def test_a_bf16_full_parameter_step_leaves_no_drift_and_moves_by_its_update():
    """MeZO on a bf16 tiny Llama: with lr = 0 the steps' perturbations (inside the forward) leave
    every weight bit-identical (in place, the +eps z / -2 eps z / +eps z round trip would not);
    with lr > 0 the update moves them."""
    _, b, loss_fn, guard = built_step("model=tiny-llama", "model.dtype=bfloat16", "method=mezo", "method.lr=0.0")
    assert {t.param.dtype for t in b.method.trainables} == {torch.bfloat16}
    assert not b.method.step.writes_weights
    start = weights(b.method)
    for k in (1, 2, 3):
        b.method.step(loss_fn, k, 2, guard=guard)
    assert all(start[n].equal(v) for n, v in weights(b.method).items())
    b.method.step.lr = 1e-5
    result = b.method.step(loss_fn, 4, 1, guard=guard)
    assert abs(result.projected_grad) > 0
    changed = sum(int((start[n] != v).sum()) for n, v in weights(b.method).items())
    assert changed > 100


def test_in_place_sparse_perturbation_of_bf16_weights_is_refused():
    with pytest.raises(ConfigError, match=r"method.sparse.in_forward=true.*model.dtype=float32"):
        built_step("model=tiny-llama", "model.dtype=bfloat16", "method=sparse_mezo", "method.sparse.in_forward=false")


@pytest.mark.parametrize("rule", [Adam, Momentum])
def test_optimiser_state_of_bf16_weights_is_fp32_and_decays(rule):
    p = layer_weights(4096, torch.bfloat16)
    spsa = SPSA([Trainable("w", p, decay=True)], eps=1e-3)
    opt = rule(spsa, lr=1e-3, weight_decay=0.0)
    opt.apply([1], [3.0], lambda: None)
    states = opt.buffers()
    assert {s.dtype for s in states.values()} == {torch.float32}
    first = {k: s.clone() for k, s in states.items()}
    opt.apply([2], [0.0], lambda: None)  # no new gradient: the state only decays
    if rule is Adam:
        assert torch.equal(states["v.0"], first["v.0"] * 0.999)  # in bf16, v.mul_(0.999) returns v
        assert not torch.equal(states["v.0"], first["v.0"])
        assert torch.equal(states["m.0"], first["m.0"] * 0.9)
    else:
        assert torch.equal(states["m.0"], first["m.0"] * 0.9)
