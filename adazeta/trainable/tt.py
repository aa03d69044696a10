"""Tensor-train (TT) linear layer: the building block of AdaZeta's tensorized adapters.

AdaZeta (Yang et al., arXiv 2406.18060, tensorized adapters) factors a d_in x d_out weight W
into a train of small 3-way cores. With d_in = prod(m_1..m_M) and d_out = prod(n_1..n_N), the
cores run over the concatenated modes [m_1, ..., m_M, n_1, ..., n_N]:

    W[(i_1..i_M), (j_1..j_N)] = G_1[:, i_1, :] ... G_M[:, i_M, :]
                                  G_{M+1}[:, j_1, :] ... G_{M+N}[:, j_N, :]

core k of shape (r_{k-1}, n_k, r_k), TT ranks [1, r, ..., r, 1]. Row and column indices are the
row-major (C-order) flattenings of the mode indices, so ``dense_weight()`` equals
``torch.einsum`` over the cores followed by ``reshape(d_in, d_out)``.

"Fast forward" (as in the paper): the input-side cores contract to A (d_in x r) and the
output-side cores to B (r x d_out), then y = (x @ A) @ B + b. The d_in x d_out matrix is never
built in forward; the cost per token is O(r (d_in + d_out)), and forming A and B costs
O(r^2 (d_in + d_out)) once per call, independent of the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TTLinear", "factorize", "tt_factors"]


def factorize(n: int, num_modes: int = 3) -> tuple[int, ...]:
    """Balanced factorisation of ``n`` into ``num_modes`` integer factors, sorted ascending.

    Among all multisets of ``num_modes`` factors whose product is ``n``, pick the one with the
    fewest factors equal to 1, then the most balanced one (smallest sum of squared log-factors,
    which for a fixed product means closest to equal), then the lexicographically smallest.
    Deterministic. Examples: 1024 -> (8, 8, 16), 4096 -> (16, 16, 16), 384 -> (6, 8, 8),
    64 -> (4, 4, 4), 50 -> (2, 5, 5), 7 -> (1, 1, 7) (a prime cannot avoid 1s).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"factorize: n must be an integer >= 1, got n={n!r}")
    if isinstance(num_modes, bool) or not isinstance(num_modes, int) or num_modes < 1:
        raise ValueError(
            f"factorize: num_modes must be an integer >= 1, got num_modes={num_modes!r}"
        )

    def candidates(rest: int, k: int, lo: int):
        # Non-decreasing factor tuples (each >= lo) with product `rest`.
        if k == 1:
            if rest >= lo:
                yield (rest,)
            return
        f = lo
        while f**k <= rest:
            if rest % f == 0:
                for tail in candidates(rest // f, k - 1, f):
                    yield (f, *tail)
            f += 1

    def key(factors: tuple[int, ...]):
        return (factors.count(1), sum(math.log(f) ** 2 for f in factors), factors)

    return min(candidates(n, num_modes, 1), key=key)


def tt_factors(cores, num_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = the first ``num_in`` cores contracted over their ranks, B = the others:
    cores (..., r_{k-1}, n_k, r_k) -> A (..., prod n_in, r_M), B (..., r_M, prod n_out)."""
    lead = cores[0].shape[:-3]
    a = cores[0].reshape(*lead, -1, cores[0].shape[-1])  # (..., n_1, r_1): r_0 = 1
    for core in cores[1:num_in]:
        r_left, n_k, r_right = core.shape[-3:]
        a = (a @ core.reshape(*lead, r_left, n_k * r_right)).reshape(*lead, -1, r_right)
    b = cores[-1].reshape(*lead, cores[-1].shape[-3], -1)  # (..., r_{K-1}, n_K): r_K = 1
    for core in reversed(cores[num_in:-1]):
        r_left, n_k, r_right = core.shape[-3:]
        b = (core.reshape(*lead, r_left * n_k, r_right) @ b).reshape(*lead, r_left, -1)
    return a, b


def _check_modes(name: str, modes, dim: int) -> tuple[int, ...]:
    modes = tuple(int(m) for m in modes)
    if not modes or any(m < 1 for m in modes) or math.prod(modes) != dim:
        raise ValueError(
            f"TTLinear: {name}={list(modes)} must be positive integers whose product is the layer "
            f"size {dim} (product is {math.prod(modes) if modes else 0}); "
            f"e.g. use factorize({dim}) = {list(factorize(dim))}"
        )
    return modes


def _fill(param: torch.Tensor, values: torch.Tensor) -> None:
    """Copy CPU-drawn values into a parameter on any device; a meta parameter holds no values."""
    if not param.is_meta:
        param.copy_(values)


class TTLinear(nn.Module):
    """Linear map d_in -> d_out whose weight is a tensor train (AdaZeta, arXiv 2406.18060).

    Args:
        d_in, d_out: input and output sizes.
        rank: the TT rank r; ranks are [1, r, ..., r, 1] over the cores.
        in_modes, out_modes: factorisations of d_in and d_out (default ``factorize(d)``).
        bias: add a bias of size d_out.
        device, dtype: where and in which precision the cores live (meta is fine).

    Parameters: ``cores[k]`` of shape (r_{k-1}, n_k, r_k) for the modes [*in_modes, *out_modes],
    and ``bias`` (d_out,).

    Init (as in the paper and its reference code): core k ~ N(0, 1) / sqrt(r_k) * sigma^(1/K), with
    r_k the core's *right* rank, K the number of cores and sigma = sqrt(1 / (d_in + d_out)), so the
    entries of the dense weight have a standard deviation of about sigma. The bias is
    U(-1/sqrt(d_out), 1/sqrt(d_out)). Drawn on the CPU whatever ``device`` is, so a layer starts
    from the same values on every device (see ``reset_parameters``); building on meta works.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        rank: int = 5,
        in_modes=None,
        out_modes=None,
        bias: bool = True,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        for key, value in (("d_in", d_in), ("d_out", d_out), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TTLinear: {key} must be an integer >= 1, got {key}={value!r}")
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.in_modes = _check_modes(
            "in_modes", in_modes if in_modes is not None else factorize(d_in), d_in
        )
        self.out_modes = _check_modes(
            "out_modes", out_modes if out_modes is not None else factorize(d_out), d_out
        )
        modes = self.in_modes + self.out_modes
        self.ranks = (1,) + (rank,) * (len(modes) - 1) + (1,)

        self.cores = nn.ParameterList(
            nn.Parameter(
                torch.empty(self.ranks[k], n_k, self.ranks[k + 1], device=device, dtype=dtype)
            )
            for k, n_k in enumerate(modes)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(d_out, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re-)draw the paper's init, e.g. after ``to_empty()`` on a model built on meta.

        The values are drawn on the CPU, from ``generator`` (default: the global CPU generator that
        ``torch.manual_seed`` seeds), in core order, and then copied to the cores' device. Drawing
        on the cores' device would use that device's generator: a GPU run would start from other
        adapters than a CPU run of the same seed, and, since ``torch.manual_seed`` seeds every GPU
        alike, under ``device_map`` the first adapters on GPU 1 would repeat GPU 0's. On the meta
        device the draws are made (so the layers after it draw what they would anyway) and dropped.
        """
        sigma = math.sqrt(1.0 / (self.d_in + self.d_out))
        for core in self.cores:
            std = sigma ** (1.0 / len(self.cores)) / math.sqrt(core.shape[-1])
            values = torch.empty(core.shape, dtype=core.dtype, device="cpu")
            _fill(core, values.normal_(0.0, std, generator=generator))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.d_out)
            values = torch.empty(self.d_out, dtype=self.bias.dtype, device="cpu")
            _fill(self.bias, values.uniform_(-bound, bound, generator=generator))

    def factors(self, cores=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Contract the cores into A (d_in x r_M) and B (r_M x d_out), with W = A @ B.

        ``cores`` (default: this layer's own) may carry leading replica dimensions, e.g.
        (R, r_{k-1}, n_k, r_k) per core: then A is (R, d_in, r_M) and B (R, r_M, d_out), one pair
        per replica (parallel queries, ``adazeta.zo.parallel``). A loop over the (few) modes, never
        over the batch: each step is one small (batched) matmul.
        """
        return tt_factors(list(self.cores) if cores is None else cores, len(self.in_modes))

    def replica_factors(
        self, params: dict[str, torch.Tensor], n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A (n, d_in, r_M), B (n, r_M, d_out) and the bias of n replicas of this layer, whose
        forward is then y_r = (x_r A_r) B_r + bias_r. ``params`` maps some of the layer's parameter
        names (``cores.<k>``, ``bias``) to per-replica stacks (n, *shape); the others are shared by
        every replica. The bias is (n, d_out), (d_out,) or None. What parallel queries
        (``adazeta.zo.parallel``) ask of a layer that computes with its submodules' parameters.
        """
        cores = [params.get(f"cores.{k}", c.expand(n, *c.shape)) for k, c in enumerate(self.cores)]
        a, b = self.factors(cores)
        return a, b, params.get("bias", self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The full (d_in, d_out) weight, so that forward(x) == x @ dense_weight() + bias.

        For tests and inspection only: forward never builds it.
        """
        a, b = self.factors()
        return a @ b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = (x @ A) @ B + bias for x of shape (..., d_in)."""
        a, b = self.factors()
        # As F.linear with A^T and B^T laid out contiguously (copies of r x d values): CPU GEMMs
        # with a skinny right-hand side are up to 14x faster that way than x @ A with A row-major
        # (measured on AVX2: 0.55 ms against 7.5 ms for 1024 tokens, 64 -> 5 -> 1536); the bias
        # add rides along in the second GEMM.
        return F.linear(F.linear(x, a.t().contiguous()), b.t().contiguous(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, "
            f"in_modes={list(self.in_modes)}, out_modes={list(self.out_modes)}, "
            f"bias={self.bias is not None}"
        )
