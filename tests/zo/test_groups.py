"""One RNG call per group: adapter and LoRA tensors live in one flat buffer per
(device, dtype, decay) group, the parameters are views of it, and a pass draws z once per group
and query instead of once per tensor (AdaZeta on Llama-2-7B: 1,344 tensors; scripts/rng_calls.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_method_on

from adazeta.params import Trainable
from adazeta.zo.spsa import SPSA, tensor_seed


@pytest.fixture
def rng_calls(monkeypatch) -> list[int]:
    """The sizes of the normal_ draws made while the test runs."""
    calls: list[int] = []
    original = torch.Tensor.normal_

    def normal_(self, *args, **kwargs):
        calls.append(self.numel())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", normal_)
    return calls


@pytest.mark.parametrize("method", ["adazeta", "mezo_lora"])
def test_a_pass_draws_z_once_per_group(rng_calls, method):
    m, _, _ = build_method_on(["model=tiny-llama", f"method={method}"])
    spsa = m.step.spsa
    groups = {(t.param.device, t.param.dtype, t.decay) for t in m.trainables}
    assert len(m.trainables) > 2 * len(groups)  # many tensors, few groups
    assert len(spsa.units) == len(groups)
    rng_calls.clear()
    spsa.perturb(123, 1.0)
    assert len(rng_calls) == len(groups)
    assert sum(rng_calls) == sum(t.param.numel() for t in m.trainables)
    rng_calls.clear()
    spsa.sgd_update([5, 6, 7], [0.1, 0.2, 0.3], lr=1e-3, weight_decay=0.01)  # three queries' z, one pass
    assert len(rng_calls) == 3 * len(groups)


def test_the_parameters_are_views_of_their_group_and_move_by_its_z():
    """The model computes with the group's values, and an update moves each tensor by its slice
    of the group's z, drawn from tensor_seed(seed, the group's first tensor): an oracle built from
    torch.randn alone."""
    m, _, _ = build_method_on(["model=tiny-llama", "method=adazeta"])
    spsa = m.step.spsa
    before = [t.param.detach().clone() for t in m.trainables]
    seed, g, lr = 99, 0.7, 1e-2
    spsa.sgd_update([seed], [g], lr, 0.0)
    for u, members in enumerate(spsa.members):
        flat = spsa.units[u].param
        z = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(tensor_seed(seed, members[0])))
        for i in members:
            p = m.trainables[i].param
            assert p.data_ptr() == flat[spsa.offsets[i]:].data_ptr()  # a view of the group
            a = spsa.offsets[i]
            expected = before[i] - lr * g * z[a : a + p.numel()].view_as(p)
            # add_ with alpha may fuse the multiply-add: equal to rounding (another z: off by ~1e-2)
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=m.trainables[i].name)


def test_a_group_of_one_tensor_draws_that_tensors_own_z():
    """Where the draw order is unchanged (a group holds one tensor), grouping changes no bit."""
    torch.manual_seed(0)
    values = [torch.randn(40, 30), torch.randn(50)]
    plain = SPSA([Trainable("w", torch.nn.Parameter(values[0].clone()), True),
                  Trainable("b", torch.nn.Parameter(values[1].clone()), False)], eps=1e-3)
    grouped = SPSA([Trainable("w", torch.nn.Parameter(values[0].clone()), True),
                    Trainable("b", torch.nn.Parameter(values[1].clone()), False)], eps=1e-3, group=True)
    assert len(grouped.units) == 2  # decay and no-decay: one tensor each
    for spsa in (plain, grouped):
        spsa.perturb(7, 1.0)
        spsa.sgd_update([7, 8], [0.5, -0.25], lr=1e-2, weight_decay=0.1, restore=True)
    for a, b in zip(plain.trainables, grouped.trainables, strict=True):
        assert torch.equal(a.param, b.param)
        assert torch.equal(plain.z(0, 3), grouped.z(0, 3))
