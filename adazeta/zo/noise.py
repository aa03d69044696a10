"""The one noise stream of a ZO run: every random draw of a step (z, a random sparse mask, the
stochastic rounding of a low-precision write) is keyed here, and z is read here only.

The key of a draw is (run seed, step, query, unit, position):

    s_q      = query_seed(seed, step, q)                 a pure function: no global RNG
    z(s_q, u) = N(0, I) values of the generator seeded with tensor_seed(s_q, key of unit u),
                read front to back; position k of the unit is the k-th value read

(MeZO's seed trick, arXiv 2305.17333, Algorithm 1: z is regenerated from its seed, never stored).
A unit is a trainable tensor, or for grouped adapter/LoRA sets a flat buffer whose key is its first
tensor's index (adazeta/zo/spsa.py). Every path that needs z reads it through a `Stream`: a whole unit
at once (`SPSA.z`, the parallel replicas, the in-forward perturbation of a small module), in
cache-sized chunks (`SPSA.run_lane`, the passes over the weights), or in row blocks (the
in-forward perturbation of a large weight, adazeta/zo/sparse.py). Reading a unit in pieces gives the
values one read gives when every piece but the last holds a multiple of 16 values, on a device
where `chunks_exact` holds (torch's CPU kernels); that is why `chunk_bounds` and sparse.py's
`row_blocks` cut as they do, and why a unit elsewhere is read whole. So the estimators, the sparse
masks and the replays of other ranks' perturbations (adazeta/zo/sharded.py) agree bit for bit by
construction: they read the same stream.
"""

from __future__ import annotations

import functools
import struct

import torch

MASK64 = (1 << 64) - 1
# A large tensor's z is drawn CHUNK values at a time into a small per-thread buffer and added while
# it is still in cache: no parameter-sized scratch, and every add stays under torch's intra-op grain
# size (32768), so it never starts an OpenMP team (which stalls when another process holds a core).
CHUNK = 1 << 14
# The salt of a random sparse mask's key (R-MeZO), so that its uniforms never reuse z's stream.
MASK_SALT = 0x5EED


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def query_seed(seed: int, step: int, query: int) -> int:
    """A pure function of (run seed, step, query): the same z on a resume, a replay or another
    rank, and independent streams for different queries (no global RNG involved)."""
    return splitmix64(splitmix64(splitmix64(seed) ^ step) ^ query) & ((1 << 63) - 1)


def tensor_seed(seed: int, index: int) -> int:
    """The generator seed of unit `index`'s draws under seed `seed` (a query seed, or a rounding seed)."""
    return splitmix64(seed ^ splitmix64(index + 1)) & ((1 << 63) - 1)


def rounding_seed(seeds: list[int], coeffs: list[float]) -> int:
    """The seed of a low-precision write's stochastic rounding: a pure function of the step's query
    seeds and the write's coefficients, so that two writes of one step (ZO-SGD-Cons, decay then
    update) round independently and a replay rounds exactly as the run did."""
    x = splitmix64(0x5352)  # "SR"
    for v in seeds:
        x = splitmix64(x ^ (v & MASK64))
    for c in coeffs:
        x = splitmix64(x ^ struct.unpack("<Q", struct.pack("<d", c))[0])
    return x & ((1 << 63) - 1)


class Stream:
    """A reader of the noise stream on one device: `z(seed, key)` positions it at the start of a
    unit's z, `read(out)` then fills `out` with the next out.numel() values. One reader serves one
    thread; it holds one torch.Generator and nothing else."""

    __slots__ = ("generator",)

    def __init__(self, device: torch.device | str = "cpu"):
        self.generator = torch.Generator(device=device)

    def z(self, seed: int, key: int) -> Stream:
        """Position at value 0 of z(seed, key)."""
        self.generator.manual_seed(tensor_seed(seed, key))
        return self

    def read(self, out: torch.Tensor) -> torch.Tensor:
        """The next out.numel() values of the stream, written into `out`."""
        return out.normal_(generator=self.generator)

    def mask(self, seed: int, key: int, shape, device: torch.device) -> torch.Tensor:
        """Uniforms in [0, 1) for a random sparse mask of unit `key` under query seed `seed`."""
        self.generator.manual_seed(tensor_seed(seed ^ MASK_SALT, key))
        return torch.rand(shape, generator=self.generator, device=device)

    def rounding(self, seed: int, key: int) -> torch.Generator:
        """The generator of unit `key`'s stochastic rounding under rounding seed `seed`."""
        return self.generator.manual_seed(tensor_seed(seed, key))


@functools.cache
def chunks_exact(device_type: str, dtype: torch.dtype) -> bool:
    """Whether normal_ drawn chunk by chunk from one generator gives the values one call over the
    whole tensor gives (true for torch's CPU kernels: uniforms in order, transformed in blocks of
    16, the tail block redrawn at the end; not on CUDA, whose offsets depend on the launch).
    Checked once per device type and dtype, so a torch that changes this only costs speed."""
    if device_type != "cpu":
        return False
    n = 3 * CHUNK + 21
    whole = Stream().z(1, 0).read(torch.empty(n, dtype=dtype))
    return torch.equal(whole, _chunked_normal(n, Stream().z(1, 0), dtype))


def _chunked_normal(n: int, stream: Stream, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(n, dtype=dtype)
    for a, b in chunk_bounds(n):
        stream.read(out[a:b])
    return out


def chunk_bounds(n: int) -> list[tuple[int, int]]:
    """[a, b) spans of CHUNK values (multiples of 16); the last one takes the remainder, so it is
    never shorter than 16 (a tensor's z then equals one normal_ call over it)."""
    out, a = [], 0
    while a < n:
        b = n if n - a < 2 * CHUNK else a + CHUNK
        out.append((a, b))
        a = b
    return out
