"""The fused restore + update (`zo.fused_update`) and the allocation-free passes over the weights
(adazeta/zo/spsa.py, adazeta/zo/sparse.py): the same parameters as the plain path, one regeneration of z
fewer, a guard that stops the step leaves the weights where they were, and z drawn in chunks on
several threads is exactly the z of one normal_ call per tensor."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import build_method_on
from torch import nn

from adazeta.config import MethodConfig, TrainableSet, Update, ZOConfig
from adazeta.params import Trainable
from adazeta.trainable.sets import collect
from adazeta.zo.sparse import InForwardPerturbation, SparseMask
from adazeta.zo.spsa import CHUNK, SPSA, chunk_bounds, tensor_seed
from adazeta.zo.spsa_step import ZOStep


def setup(method: str, *extra: str, model: str = "tiny-llama"):
    overrides = ["task.num_train=16", "task.num_dev=8", f"method={method}", f"model={model}", *extra]
    m, obj, task = build_method_on(overrides)
    return m, obj.batch_loss(m.model, obj.encode(task.load().train[:4], train=True))


def count_passes(spsa: SPSA) -> list[int]:
    """Counts the passes over the weights (each one regenerates the z of its seeds)."""
    calls = [0]
    inner = spsa.add_noise

    def add_noise(seeds, *args, **kwargs):
        calls[0] += len(seeds)
        return inner(seeds, *args, **kwargs)

    spsa.add_noise = add_noise
    return calls


def mlp_step(fused: bool, rule: str, weight_decay: float) -> tuple[ZOStep, Callable]:
    """A float64 MLP whose first weight (8 x 4096) is large enough to be drawn in chunks; in
    float64 the losses, hence the g_q, do not amplify the rounding differences of the two paths
    from step to step (in float32, (L+ - L-) / (2 eps) turns a last-bit change of the weights
    into a ~1e-4 change of g)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4096), nn.LayerNorm(4096), nn.Tanh(), nn.Linear(4096, 3)).double()
    cfg = MethodConfig(name="t", trainable=TrainableSet.full, lr=1e-2, eps=1e-3, weight_decay=weight_decay,
                       update_rule=Update(rule))
    step = ZOStep(model, collect(model), cfg, seed=0, zo=ZOConfig(fused_update=fused))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)
    return step, lambda: nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize(("rule", "q"), [("sgd", 1), ("sgd", 3), ("sign", 1)])
def test_fused_and_unfused_steps_give_the_same_parameters(rule, q, weight_decay):
    runs = {}
    for fused in (True, False):
        step, loss_fn = mlp_step(fused, rule, weight_decay)
        passes = count_passes(step.spsa)
        start = [t.param.detach().clone() for t in step.spsa.trainables]
        grads = [g for k in range(1, 6) for g in step(loss_fn, k, q).grads]
        runs[fused] = ([t.param.detach().clone() for t in step.spsa.trainables], grads, passes[0])
    (fused, grads_f, passes_f), (plain, grads_p, passes_p) = runs[True], runs[False]
    assert step.spsa.bounds[0] is not None
    assert grads_f == pytest.approx(grads_p, rel=1e-6)
    for t, a, b, s in zip(step.spsa.trainables, fused, plain, start, strict=True):
        assert float((b - s).abs().max()) > 1e-4, f"{t.name} did not move"
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()), t.name
    # Per query: 3 passes for the perturbation round trip and 1 for the update; fusing saves one
    # pass (one regeneration of z) per step.
    assert passes_p == 5 * 4 * q
    assert passes_f == 5 * (4 * q - 1)


@pytest.mark.parametrize("method", ["mezo", "adazeta"])
def test_fused_step_on_a_model_equals_the_unfused_one(method):
    """One float32 step on tiny-llama (every weight, 2M values; or the TT adapters), weight
    decay on: the same g (same weights, same forwards) and the same parameters to rounding."""
    params = {}
    for fused in (True, False):
        m, loss_fn = setup(method, f"zo.fused_update={str(fused).lower()}", "method.weight_decay=0.1", "method.lr=1e-2")
        passes = count_passes(m.step.spsa)
        result = m.step(loss_fn, 1, 1)
        params[fused] = ([t.param.detach().clone() for t in m.trainables], result.grads, passes[0])
    (a_params, a_grads, a_passes), (b_params, b_grads, b_passes) = params[True], params[False]
    assert a_grads == b_grads
    assert (a_passes, b_passes) == (3, 4)
    for t, a, b in zip(m.trainables, a_params, b_params, strict=True):
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()), t.name


def test_fused_update_matches_the_formula_by_hand():
    """From theta - eps z: p <- d p + (d eps - lr g) z on decayed tensors, p + (eps - lr g) z on the
    others, i.e. d theta - lr g z (float64, so exact to rounding)."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(40, 3, dtype=torch.float64)), nn.Parameter(torch.randn(3, dtype=torch.float64))
    spsa = SPSA([Trainable("w", w, True), Trainable("b", b, False)], eps=1e-3)
    theta = [w.detach().clone(), b.detach().clone()]
    seed, g, lr, wd = 77, 0.4, 0.05, 0.1
    spsa.perturb(seed, +1.0)
    spsa.perturb(seed, -2.0)
    assert spsa.displaced == {seed: -1.0}
    spsa.sgd_update([seed], [g], lr, wd, restore=True)
    assert spsa.displaced == {}
    for i, (p, t0, d) in enumerate(zip((w, b), theta, (1 - lr * wd, 1.0), strict=True)):
        z = torch.randn(p.shape, generator=torch.Generator().manual_seed(tensor_seed(seed, i)), dtype=p.dtype)
        torch.testing.assert_close(p.detach(), d * t0 - lr * g * z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_a_guard_that_stops_the_step_leaves_the_weights(fused):
    m, loss_fn = setup("mezo", f"zo.fused_update={str(fused).lower()}", "method.lr=1e-2")
    before = [t.param.detach().clone() for t in m.trainables]

    def guard(step, losses, grads):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        m.step(loss_fn, 1, 1, guard=guard)
    assert m.step.spsa.displaced == {}
    for a, t in zip(before, m.trainables, strict=True):
        # The +eps z, -2 eps z, +eps z round trip in float32: back to within a rounding.
        torch.testing.assert_close(t.param.detach(), a, rtol=0, atol=1e-6)


def test_an_error_in_a_forward_restores_the_weights():
    m, loss_fn = setup("mezo")
    before = [t.param.detach().clone() for t in m.trainables]
    calls = [0]

    def failing():
        calls[0] += 1
        if calls[0] == 2:  # during L-: the weights sit at theta - eps z
            raise MemoryError("out of memory")
        return loss_fn()

    with pytest.raises(MemoryError):
        m.step(failing, 1, 1)
    for a, t in zip(before, m.trainables, strict=True):
        torch.testing.assert_close(t.param.detach(), a, rtol=0, atol=1e-6)


def test_chunks_cover_a_tensor_and_end_on_at_least_sixteen_values():
    for n in (16, 2 * CHUNK - 1, 2 * CHUNK, 5 * CHUNK + 7):
        bounds = chunk_bounds(n)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:], strict=False))
        assert all((b - a) % 16 == 0 for a, b in bounds[:-1]) and bounds[-1][1] - bounds[-1][0] >= 16


@pytest.mark.parametrize("workers", [1, 2])
def test_chunked_threaded_passes_equal_whole_tensor_noise(workers):
    """A pass draws large tensors' z chunk by chunk, on several threads: the values must be
    exactly those of one normal_ call per tensor (what z(), the parallel replicas and a replay
    regenerate), whatever the number of threads."""
    torch.manual_seed(0)
    shapes = [(700, 3001), (5 * CHUNK + 7,), (31,), (3, 5), (2 * CHUNK,)]  # 2.1M values: threaded
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    spsa = SPSA([Trainable(f"p{i}", p, i % 2 == 0) for i, p in enumerate(params)], eps=1e-3, workers=workers)
    assert len(spsa.lanes) == workers
    assert [b is not None for b in spsa.bounds] == [True, True, False, False, True]
    start = [p.detach().clone() for p in params]
    seeds, coeffs, decayed = [11, 12], [0.5, -0.25], [0.75, 0.125]
    spsa.add_noise(seeds, coeffs, factor=0.9, decayed=decayed)
    for i, (p, p0) in enumerate(zip(params, start, strict=True)):
        f, cs = (0.9, decayed) if i % 2 == 0 else (1.0, coeffs)
        expected = p0 * f if f != 1.0 else p0.clone()
        for seed, c in zip(seeds, cs, strict=True):
            expected.add_(spsa.z(i, seed), alpha=c)
        assert torch.equal(p.detach(), expected), f"tensor {i}"


def test_in_forward_perturbation_of_nested_modules_equals_in_place():
    """Sparse-MeZO's in-forward perturbation writes each module's perturbed tensors into one
    reused work buffer, as a stack: a module that owns a trainable tensor and runs a child that
    owns others must keep its own perturbed copy while the child's forward runs."""

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(16))
            self.inner = nn.Linear(16, 16)

        def forward(self, x):
            return (self.inner(x * self.scale) * self.scale).pow(2).mean()

    torch.manual_seed(0)
    model, x = Outer(), torch.randn(8, 16)
    trainables = collect(model)
    mask = SparseMask(trainables, "magnitude", sparsity=0.5, keep_ratio=1.0)
    spsa = SPSA(trainables, eps=1e-2, mask=mask)
    in_forward = InForwardPerturbation(model, spsa)
    before = [t.param.detach().clone() for t in trainables]
    plus_f, minus_f = in_forward.losses(lambda: model(x), 5)
    assert all(torch.equal(a, t.param) for a, t in zip(before, trainables, strict=True))
    mask.store(trainables)
    plus_i, minus_i = spsa.losses(lambda: model(x), 5)
    mask.release()
    torch.testing.assert_close(plus_f, plus_i, rtol=0, atol=1e-6)
    torch.testing.assert_close(minus_f, minus_i, rtol=0, atol=1e-6)
    assert abs(float(plus_f) - float(minus_f)) > 1e-4
