"""The composition of a ZO step (adazeta/zo/estimators.py, adazeta/zo/spsa_step.py): the estimator is chosen
when the step is built, a caller's own estimator plugs in through a factory, and the step records the
in-place writes its estimate made (what the replay log keeps)."""

from __future__ import annotations

import torch

from adazeta.config import MethodConfig, TrainableSet, ZOConfig
from adazeta.trainable.sets import collect
from adazeta.zo.estimators import Sequential
from adazeta.zo.noise import Stream, query_seed, tensor_seed
from adazeta.zo.spsa_step import ZOStep


def toy(fused: bool = False, estimator=None):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)
    cfg = MethodConfig(name="mezo", trainable=TrainableSet.full, lr=1e-2, eps=1e-3, weight_decay=0.0)
    step = ZOStep(model, collect(model), cfg, seed=3, zo=ZOConfig(fused_update=fused), estimator=estimator)
    return model, step, lambda: torch.nn.functional.mse_loss(model(x), y)


class Fixed:
    """An estimator of a caller's own: every query's g is 0.5, and the weights are never touched."""

    writes_weights = False
    can_defer_restore = False

    def __init__(self, model, spsa):
        self.calls = []

    def __call__(self, loss_fn, seeds, defer_restore=False):
        self.calls.append(list(seeds))
        return torch.tensor([[0.5, 1.0] for _ in seeds], dtype=torch.float64)


def test_an_estimator_of_ones_own_plugs_in_and_the_update_rule_applies_its_grads():
    """theta <- theta - lr (1/Q) sum_q g_q z_q with the plugged estimator's g_q = 0.5, z_q read from
    fresh generators seeded as adazeta/zo/noise.py says (an oracle outside SPSA)."""
    model, step, loss_fn = toy(estimator=Fixed)
    assert isinstance(step.estimator, Fixed) and not step.writes_weights
    before = [p.detach().clone() for p in model.parameters()]
    result = step(loss_fn, 4, 2)
    seeds = [query_seed(3, 4, q) for q in range(2)]
    assert step.estimator.calls == [seeds] and result.grads == [0.5, 0.5] and result.loss == 1.0
    assert step.writes == []  # the estimate wrote nothing in place
    for i, (p, p0) in enumerate(zip(model.parameters(), before, strict=True)):
        z = [torch.randn(p.shape, generator=torch.Generator().manual_seed(tensor_seed(s, i))) for s in seeds]
        torch.testing.assert_close(p.detach(), p0 - 1e-2 * 0.5 * (z[0] + z[1]) / 2, rtol=0, atol=1e-6)


def test_the_step_records_the_in_place_writes_of_its_estimate():
    """Sequential queries write +eps z, -2 eps z, +eps z each; with the fused update the last +eps z
    is folded into the update and is not an estimate's write (replay.jsonl's round_trip_fused)."""
    seeds = [query_seed(3, 1, q) for q in range(2)]
    for fused, tail in ((False, [(seeds[1], 1.0)]), (True, [])):
        _, step, loss_fn = toy(fused=fused)
        assert isinstance(step.estimator, Sequential) and step.fuse == fused
        step(loss_fn, 1, 2)
        assert step.writes == [(seeds[0], 1.0), (seeds[0], -2.0), (seeds[0], 1.0), (seeds[1], 1.0), (seeds[1], -2.0), *tail]
        assert step.spsa.displaced == {}


def test_a_unit_read_in_pieces_equals_one_read():
    """The noise stream's contract: pieces of multiples of 16 values (the last one any size) read
    the values of one read over the whole unit (on CPU)."""
    whole = Stream().z(11, 2).read(torch.empty(1000))
    stream, parts = Stream().z(11, 2), []
    for n in (16, 320, 64, 600):
        parts.append(stream.read(torch.empty(n)))
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(whole, torch.randn(1000, generator=torch.Generator().manual_seed(tensor_seed(11, 2))))
