"""TT linear layer: factorisation, fast-forward == dense weight, init, meta device, errors."""

import math

import pytest
import torch

from adazeta.trainable.tt import TTLinear, factorize


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1024, (8, 8, 16)),
        (4096, (16, 16, 16)),
        (384, (6, 8, 8)),
        (64, (4, 4, 4)),
        (50, (2, 5, 5)),
        (7, (1, 1, 7)),
        (14, (1, 2, 7)),
        (1, (1, 1, 1)),
    ],
)
def test_factorize_examples(n, expected):
    assert factorize(n) == expected


def test_factorize_other_mode_counts():
    assert factorize(64, 2) == (8, 8)
    assert factorize(1024, 2) == (32, 32)
    assert factorize(4096, 4) == (8, 8, 8, 8)
    assert factorize(12, 1) == (12,)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_factorize_rejects_bad_n(bad):
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        factorize(bad)


@pytest.mark.parametrize(
    ("d_in", "d_out", "lead"),
    [(1024, 64, (2, 3)), (64, 1024, (5,)), (384, 64, (2, 1, 3)), (50, 7, (4,)), (4096, 64, ())],
)
def test_fast_forward_equals_dense(d_in, d_out, lead):
    torch.manual_seed(0)
    layer = TTLinear(d_in, d_out, rank=5, dtype=torch.float64)
    x = torch.randn(*lead, d_in, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*lead, d_out)
    expected = x @ layer.dense_weight() + layer.bias
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_dense_weight_matches_core_contraction_order():
    # W[(i1, i2), (j1, j2)] = G1[0, i1] G2[:, i2] G3[:, j1] G4[:, j2, 0]: row-major flattening.
    torch.manual_seed(1)
    layer = TTLinear(6, 10, rank=3, in_modes=(2, 3), out_modes=(5, 2), dtype=torch.float64)
    g1, g2, g3, g4 = (c.detach() for c in layer.cores)
    full = torch.einsum("aib,bjc,ckd,dle->ijkl", g1, g2, g3, g4).reshape(6, 10)
    torch.testing.assert_close(layer.dense_weight().detach(), full)


def test_no_bias_and_custom_modes():
    layer = TTLinear(1024, 64, rank=2, in_modes=[8, 16, 8], out_modes=[8, 8], bias=False)
    assert layer.bias is None
    assert [tuple(c.shape) for c in layer.cores] == [
        (1, 8, 2),
        (2, 16, 2),
        (2, 8, 2),
        (2, 8, 2),
        (2, 8, 1),
    ]
    x = torch.randn(3, 1024)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight())


def test_core_shapes_and_param_count_llama_adapter_projection():
    layer = TTLinear(4096, 64, rank=5)
    assert layer.in_modes == (16, 16, 16) and layer.out_modes == (4, 4, 4)
    assert layer.ranks == (1, 5, 5, 5, 5, 5, 1)
    # 16*5 + 2*5*16*5 + 2*5*4*5 + 5*4 = 1100 core params, + 64 bias
    assert sum(p.numel() for p in layer.parameters()) == 1164


def test_init_scale():
    torch.manual_seed(0)
    layer = TTLinear(1024, 1024, rank=5)
    sigma = math.sqrt(1 / 2048)
    num_cores = 6
    for core in layer.cores:
        r_right = core.shape[-1]
        expected_std = sigma ** (1 / num_cores) / math.sqrt(r_right)
        assert abs(core.std().item() / expected_std - 1) < 0.25
    bound = 1 / math.sqrt(1024)
    assert layer.bias.abs().max().item() <= bound
    assert layer.bias.abs().max().item() > 0.9 * bound
    # the dense weight ends up with a std of about sigma
    assert 0.5 < layer.dense_weight().std().item() / sigma < 1.5


def test_meta_device():
    with torch.device("meta"):
        layer = TTLinear(4096, 64)
    assert all(p.is_meta for p in layer.parameters())
    y = layer(torch.empty(2, 7, 4096, device="meta"))
    assert y.shape == (2, 7, 64) and y.is_meta
    explicit = TTLinear(64, 4096, device="meta")
    assert all(p.is_meta for p in explicit.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_modes": (8, 8, 8)}, r"in_modes=\[8, 8, 8\].*1024"),
        ({"out_modes": (4, 4)}, r"out_modes=\[4, 4\].*64"),
        ({"in_modes": (0, 1024)}, r"in_modes=\[0, 1024\]"),
        ({"rank": 0}, r"rank=0"),
    ],
)
def test_bad_arguments_name_the_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TTLinear(1024, 64, **kwargs)


def test_gradients_reach_every_core():
    layer = TTLinear(64, 32, rank=4)
    layer(torch.randn(5, 64)).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)


def test_reset_parameters_after_meta_to_empty():
    with torch.device("meta"):
        layer = TTLinear(64, 16, rank=3)
    layer = layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in layer.parameters())
    assert layer.bias.abs().max().item() <= 1 / 4
