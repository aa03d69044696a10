"""The zeroth-order estimator shared by every ZO method: two-sided SPSA with MeZO's seed trick.

For query q with seed s_q, z_q ~ N(0, I) over the trainable set is regenerated from s_q whenever it
is needed and never stored (MeZO, arXiv 2305.17333, Algorithm 1):

    g_q = (L(theta + eps z_q) - L(theta - eps z_q)) / (2 eps)
    theta <- theta - lr * ((1/Q) sum_q g_q z_q + wd * theta)      (wd skipped for biases and norms)

The perturbation is applied in place: +eps z, forward; -2 eps z, forward; +eps z to restore.
A method may restrict z with a mask per tensor (Sparse-MeZO: z_hat = m(theta) * z). With plain SGD
the last restore can ride along in the update's own pass over that z (`sgd_update(restore=True)`):
with d = 1 - lr wd (1 where weight decay is skipped) and the weights at theta - eps z,

    p <- d p + (d eps - lr g) z    =    d theta - lr g z,

one regeneration of z fewer per step (3 instead of 4 passes over the weights for Q = 1).

Each tensor i reads its z from its own stream, keyed by tensor_seed(s_q, i) (adazeta/zo/noise.py, the
one place z is drawn), so that one tensor's noise can be regenerated without the others' (per-layer
perturbation inside a forward, per-tensor updates).
Adapter and LoRA sets (SPSA(group=True), set by ZOStep) are the exception: their tensors are views
of one flat buffer per (device, dtype, decay) group, whose z is one draw from tensor_seed(s_q, the
index of the group's first tensor), so a pass makes one RNG call per group instead of one per
tensor (AdaZeta on Llama-2-7B: 2 instead of 1,344 on CUDA; scripts/rng_calls.py). A tensor's z is
its slice of that draw; a group of one tensor draws exactly that tensor's own z.

Low-precision (bf16/fp16) trainable tensors: an update lr g z of about 1e-6 is under half a bf16
ulp of a weight near 0.02 (ulp 1.2e-4), so a rounded-to-nearest write drops it. Updates of such
tensors are therefore computed in float32 and written with stochastic rounding (`stochastic_round`:
up or down with the probabilities that make the expected value exact), from a generator seeded by
the step's seeds and coefficients (`rounding_seed`), so a replay rounds the same way. Their
perturbations are never written in place (ZOStep perturbs them inside the forward), because a
rounded +eps z / -2 eps z / +eps z round trip does not restore them (scripts/bf16_zo.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from adazeta.params import LOW_PRECISION, Trainable
from adazeta.zo.noise import (  # noqa: F401  (query_seed, tensor_seed: the seeds SPSA draws its z from, importable here too)
    CHUNK,
    Stream,
    chunk_bounds,
    chunks_exact,
    query_seed,
    rounding_seed,
    tensor_seed,
)

# Passes over fewer trainable values than this run on the calling thread only (adapters, LoRA).
THREADED_MIN = 1 << 20
# Stochastic rounding of a whole tensor (a large one on CUDA) goes through float32 temporaries of
# at most this many values at a time.
ROUND_SLICE = 1 << 22


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """x (float32) in `dtype`, rounded to the neighbour below or above x with probabilities that make
    the expectation x itself: lo = x rounded to nearest, hi the next value of `dtype` on x's side,
    P(hi) = |x - lo| / |hi - lo|. Unbiased where rounding to nearest drops every update smaller
    than half an ulp (Gupta et al. 2015, "Deep learning with limited numerical precision")."""
    lo = x.to(dtype)
    err = x - lo.float()
    toward = torch.where(err >= 0, float("inf"), float("-inf")).to(dtype)
    hi = torch.nextafter(lo, toward)
    gap = (hi.float() - lo.float()).abs_()
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(u.mul_(gap) < err.abs_(), hi, lo)


def query_stats(loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> torch.Tensor:
    """(g, (L+ + L-) / 2) with g = (L+ - L-) / (2 eps) (MeZO, arXiv 2305.17333, eq. 2) as a float64
    tensor on the losses' device, no host sync: float64 arithmetic on the float32 losses, as Python
    floats would do it. Every estimator forms a query's pair of numbers here."""
    pair = torch.stack([loss_plus.float(), loss_minus.float()]).double()
    return torch.stack([(pair[0] - pair[1]) / (2 * eps), (pair[0] + pair[1]) / 2])


@torch.no_grad()
def write_rounded(dst: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> None:
    """dst <- stochastic_round(x), a slice at a time (float32 temporaries of ROUND_SLICE values)."""
    flat_dst, flat_x = dst.view(-1), x.reshape(-1)
    for a in range(0, flat_x.numel(), ROUND_SLICE):
        b = min(a + ROUND_SLICE, flat_x.numel())
        flat_dst[a:b] = stochastic_round(flat_x[a:b], dst.dtype, generator)


def group_trainables(trainables: list[Trainable]) -> tuple[list[Trainable], list[int], list[int], list[list[int]]]:
    """Put the tensors of each (device, dtype, decay) group into one flat buffer and make every
    parameter a view of its slice (the module still holds the same Parameter object). Returns
    (units: one Trainable per group over its flat buffer, unit of each tensor, offset of each
    tensor in its unit, member tensors of each unit). Weight decay is part of the key so that a
    pass applies one factor and one set of coefficients per buffer."""
    keys: dict[tuple, list[int]] = {}
    for i, t in enumerate(trainables):
        keys.setdefault((t.param.device, t.param.dtype, t.decay), []).append(i)
    units, unit_of, offsets, members = [], [0] * len(trainables), [0] * len(trainables), []
    with torch.no_grad():
        for (device, dtype, decay), ix in keys.items():
            flat = torch.empty(sum(trainables[i].param.numel() for i in ix), device=device, dtype=dtype)
            at = 0
            for i in ix:
                p = trainables[i].param
                flat[at : at + p.numel()].copy_(p.detach().reshape(-1))
                p.data = flat[at : at + p.numel()].view(p.shape)
                unit_of[i], offsets[i], at = len(units), at, at + p.numel()
            units.append(Trainable(f"group {len(units)}: {trainables[ix[0]].name} ...", flat, decay))
            members.append(ix)
    return units, unit_of, offsets, members


# mask(index, param, seed) -> a bool tensor shaped like param (or None: all of it moves).
MaskFn = Callable[[int, torch.Tensor, int], "torch.Tensor | None"]


class Lane:
    """One thread's share of a pass over the weights: its tensors, its own readers of the noise
    stream (one per query of the pass) and its own chunk buffer, so lanes never share state."""

    def __init__(self, indices: list[int]):
        self.indices = indices
        self.readers: dict[torch.device, list[Stream]] = {}
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def streams(self, device: torch.device, n: int) -> list[Stream]:
        have = self.readers.setdefault(device, [])
        while len(have) < n:
            have.append(Stream(device))
        return have[:n]

    def buffer(self, p: torch.Tensor, numel: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = (p.device, dtype or p.dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[key] = torch.empty(max(numel, 2 * CHUNK), device=p.device, dtype=key[1])
        return buf[:numel]


class SPSA:
    """Two-sided SPSA over a fixed, ordered list of trainable tensors.

    A pass over the weights (perturb, update) adds to each tensor its z, read from the noise stream
    (adazeta/zo/noise.py: a generator seeded by tensor_seed(seed, index), never the global RNG). Without a mask, or
    with one that is computed chunk by chunk (Sparse-MeZO's magnitude mask), z is drawn in
    cache-sized chunks and never exists whole; the tensors are dealt to `workers` threads
    (torch's normal_ is single-threaded; each tensor's z depends only on its own seed, so the
    result does not depend on the number of threads). A step allocates nothing parameter-sized.

    `displaced` records where the weights sit relative to theta: {seed: s} for theta + s eps z(seed)
    (every in-place write goes through `perturb`); `restore()` brings them back. `on_perturb(seed,
    scale)`, given at construction, is told of every such write (the step's record of what its
    estimate wrote, which the replay log keeps: adazeta/engine/replay_log.py).
    """

    def __init__(
        self, trainables: list[Trainable], eps: float, mask: MaskFn | None = None, workers: int | None = None,
        group: bool = False, on_perturb: Callable[[int, float], None] | None = None,
    ):
        if eps <= 0:
            raise ValueError(f"method.eps must be > 0, got {eps}")
        if group and mask is not None:
            raise ValueError("SPSA(group=True) draws z over whole groups; a per-tensor mask needs group=False")
        self.trainables, self.eps, self.mask = trainables, eps, mask
        # The units a pass walks over: one per tensor, or with group=True one flat buffer per
        # (device, dtype, decay) group whose slices the parameters are (`group_trainables`).
        # Unit u's z is drawn from tensor_seed(seed, its first tensor's index): for a unit of one
        # tensor, that tensor's own z.
        if group:
            self.units, self.unit_of, self.offsets, self.members = group_trainables(trainables)
        else:
            self.units, self.unit_of = trainables, list(range(len(trainables)))
            self.offsets, self.members = [0] * len(trainables), [[i] for i in range(len(trainables))]
        self.grouped = group
        self.unit_seed = [ix[0] for ix in self.members]
        self.cached: tuple[int, int] | None = None  # (unit, seed) whose z the scratch holds (grouped)
        self.displaced: dict[int, float] = {}
        self.on_perturb = on_perturb
        # z() for one tensor at a time (parallel replicas, in-forward perturbation, stateful rules):
        # one reader of the noise stream per device and a scratch buffer grown to the largest
        # tensor asked for.
        self.streams: dict[torch.device, Stream] = {}
        self.scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.rounders: dict[torch.device, Stream] = {}  # stochastic rounding in `write`
        # Per tensor, the chunks its z is drawn in by a pass (None: drawn whole by z()). A mask
        # that can be cut into chunks (`mask.chunk`, Sparse-MeZO's magnitude mask) keeps this path.
        chunkable = mask is None or getattr(mask, "chunked", False)
        self.bounds = [
            chunk_bounds(t.param.numel())
            if chunkable and t.param.is_contiguous() and t.param.numel() >= 2 * CHUNK
            and chunks_exact(t.param.device.type, t.param.dtype) else None
            for t in self.units
        ]
        workers = torch.get_num_threads() if workers is None else workers
        total = sum(t.param.numel() for t in self.units)
        # A chunked mask is computed from each lane's own weights into the lane's own buffers, so
        # masked passes thread too; a random mask draws from one shared generator and does not.
        threaded = (
            workers > 1 and chunkable and total >= THREADED_MIN
            and all(t.param.device.type == "cpu" for t in trainables)
        )
        self.lanes = self.deal(workers if threaded else 1)
        self.pool = None
        if len(self.lanes) > 1:  # the calling thread runs the first lane itself
            self.pool = ThreadPoolExecutor(len(self.lanes) - 1, "spsa")
            weakref.finalize(self, self.pool.shutdown, wait=False)

    def deal(self, n: int) -> list[Lane]:
        """Split the units into n lanes of about equal size (largest first to the lightest)."""
        lanes, load = [Lane([]) for _ in range(n)], [0] * n
        for i in sorted(range(len(self.units)), key=lambda i: -self.units[i].param.numel()):
            k = load.index(min(load))
            lanes[k].indices.append(i)
            load[k] += self.units[i].param.numel()
        for lane in lanes:
            lane.indices.sort()
        return [lane for lane in lanes if lane.indices] or [Lane([])]

    def stream(self, device: torch.device) -> Stream:
        """This SPSA's reader of the noise stream on `device` (the calling thread's, not a lane's)."""
        reader = self.streams.get(device)
        if reader is None:
            reader = self.streams[device] = Stream(device)
        return reader

    def unit_z(
        self, unit: int, seed: int, out: torch.Tensor | None = None, stream: Stream | None = None,
        masked: bool = True,
    ) -> torch.Tensor:
        """z_q over unit `unit` (masked if the method masks, unless masked=False), written into
        `out` or the scratch buffer: valid until the next call."""
        p = self.units[unit].param
        if out is None:  # grown to the largest unit asked for, not the largest there is
            self.cached = None  # the scratch is overwritten (`z` sets it again)
            key = (p.device, p.dtype)
            if key not in self.scratch or self.scratch[key].numel() < p.numel():
                self.scratch[key] = torch.empty(p.numel(), device=p.device, dtype=p.dtype)
            out = self.scratch[key][: p.numel()].view_as(p)
        (stream or self.stream(p.device)).z(seed, self.unit_seed[unit]).read(out)
        if self.mask is not None and masked:  # ungrouped only: unit == tensor index
            m = self.mask(unit, p, seed)
            if m is not None:
                out.mul_(m)
        return out

    def z(
        self, index: int, seed: int, out: torch.Tensor | None = None, stream: Stream | None = None,
        masked: bool = True,
    ) -> torch.Tensor:
        """z_q for tensor `index` (masked if the method masks, unless masked=False), written into
        `out` or the scratch buffer: valid until the next call. Grouped: the tensor's slice of its
        unit's z, which is drawn once and kept while the following calls ask for the same unit and
        seed (a pass over a group's tensors for one query draws once)."""
        if not self.grouped:
            return self.unit_z(index, seed, out, stream, masked)
        u, p = self.unit_of[index], self.trainables[index].param
        if self.cached != (u, seed):
            self.unit_z(u, seed, stream=stream)
            self.cached = (u, seed)
        flat = self.units[u].param
        whole = self.scratch[(flat.device, flat.dtype)][: flat.numel()]
        part = whole[self.offsets[index] : self.offsets[index] + p.numel()].view_as(p)
        if out is None:
            return part
        return out.copy_(part)

    def noise(self, seed: int) -> Iterator[tuple[Trainable, torch.Tensor]]:
        """(tensor, its z) for every trainable tensor."""
        for i, t in enumerate(self.trainables):
            yield t, self.z(i, seed)

    @torch.no_grad()
    def add_noise(
        self, seeds: list[int], coeffs: list[float], factor: float = 1.0, decayed: list[float] | None = None,
        rounding: int | None = None,
    ) -> None:
        """One pass over the weights: p <- f p + sum_k c_k z(seed_k) for every tensor, with f =
        `factor` and c = `decayed` (default: `coeffs`) where weight decay applies, f = 1 and
        c = `coeffs` elsewhere. Each z is regenerated once; no host sync. With a `rounding` seed
        (an update), low-precision tensors are computed in float32 and written with stochastic
        rounding; without one (a perturbation) every tensor is written rounded to nearest."""
        decayed = coeffs if decayed is None else decayed
        if self.pool is None:
            self.run_lane(self.lanes[0], seeds, coeffs, factor, decayed, rounding)
            return
        futures = [
            self.pool.submit(self.run_lane, lane, seeds, coeffs, factor, decayed, rounding) for lane in self.lanes[1:]
        ]
        self.run_lane(self.lanes[0], seeds, coeffs, factor, decayed, rounding)
        for f in futures:
            f.result()

    @torch.no_grad()
    def run_lane(
        self, lane: Lane, seeds: list[int], coeffs: list[float], factor: float, decayed: list[float],
        rounding: int | None = None,
    ) -> None:
        own = self.pool is not None  # on a worker thread: the lane's own generators and buffers
        for i in lane.indices:
            t = self.units[i]
            f, cs = (factor, decayed) if t.decay else (1.0, coeffs)
            p = t.param
            rounder = None  # a low-precision update: accumulate in float32, round stochastically
            if rounding is not None and p.dtype in LOW_PRECISION:
                rounder = lane.streams(p.device, len(seeds) + 1)[len(seeds)].rounding(rounding, i)
            if self.bounds[i] is None:  # whole tensor: small, randomly masked, or not chunkable
                m = None  # a magnitude mask: from the weights as the pass found them, for every seed
                if self.mask is not None and getattr(self.mask, "chunked", False):
                    n = p.numel()
                    m = self.mask.chunk(i, p.view(-1), 0, n, lane.buffer(p, 2 * n, torch.bool)).view_as(p)
                acc = p if rounder is None else p.float()
                if f != 1.0:
                    acc.mul_(f)
                for seed, c in zip(seeds, cs, strict=True):
                    out = lane.buffer(p, p.numel()).view_as(p) if own else None
                    reader = lane.streams(p.device, 1)[0] if own else None
                    z = self.unit_z(i, seed, out=out, stream=reader, masked=m is None)
                    if m is not None:
                        z.mul_(m)
                    acc.add_(z, alpha=c)
                if rounder is not None:
                    write_rounded(p, acc, rounder)
                continue
            streams = [s.z(seed, self.unit_seed[i]) for s, seed in zip(lane.streams(p.device, len(seeds)), seeds, strict=True)]
            flat, buf = p.view(-1), lane.buffer(p, 2 * CHUNK)
            masks = lane.buffer(p, 4 * CHUNK, torch.bool) if self.mask is not None else None
            wide = lane.buffer(p, 2 * CHUNK, torch.float32) if rounder is not None else None
            for a, b in self.bounds[i]:  # each z chunk is added while it is still in cache
                dst, z = flat[a:b], buf[: b - a]
                # The chunk's mask, from its weights as the pass found them (before any write).
                m = None if masks is None else self.mask.chunk(i, dst, a, b, masks[: 2 * (b - a)])
                acc = dst if wide is None else wide[: b - a].copy_(dst)
                if f != 1.0:
                    acc.mul_(f)
                for stream, c in zip(streams, cs, strict=True):
                    stream.read(z)
                    if m is not None:
                        z.mul_(m)
                    acc.add_(z, alpha=c)
                if rounder is not None:
                    dst.copy_(stochastic_round(acc, p.dtype, rounder))

    @torch.no_grad()
    def write(self, index: int, value: torch.Tensor, rounding: int) -> None:
        """Unit `index` <- value (float32): stochastically rounded if it is low-precision
        (generator seeded by tensor_seed(rounding, index)), copied otherwise."""
        p = self.units[index].param
        if p.dtype not in LOW_PRECISION:
            p.copy_(value)
            return
        reader = self.rounders.get(p.device)
        if reader is None:
            reader = self.rounders[p.device] = Stream(p.device)
        write_rounded(p, value, reader.rounding(rounding, index))

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """theta <- theta + scale * eps * z(seed)."""
        self.add_noise([seed], [scale * self.eps])
        if self.on_perturb is not None:
            self.on_perturb(seed, scale)
        s = self.displaced.pop(seed, 0.0) + scale
        if s != 0.0:
            self.displaced[seed] = s

    @torch.no_grad()
    def restore(self) -> None:
        """Undo what is left of the in-place perturbations (`displaced`); a no-op when none is."""
        for seed, s in list(self.displaced.items()):
            self.perturb(seed, -s)

    @torch.no_grad()
    def losses(
        self, loss_fn: Callable[[], torch.Tensor], seed: int, restore: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L(theta + eps z) and L(theta - eps z), in place. The weights are restored afterwards,
        or with restore=False left at theta - eps z for the caller to restore or to fold the
        restore into the update (`sgd_update(..., restore=True)`)."""
        self.perturb(seed, +1.0)
        loss_plus = loss_fn()
        self.perturb(seed, -2.0)
        loss_minus = loss_fn()
        if restore:
            self.perturb(seed, +1.0)
        return loss_plus, loss_minus

    def projected_grad(
        self, loss_fn: Callable[[], torch.Tensor], seed: int, restore: bool = True
    ) -> tuple[float, float]:
        """g = (L+ - L-) / (2 eps) for one query. Returns (g, (L+ + L-) / 2), the latter an
        estimate of the loss at theta. restore=False: see `losses` (in-place pairs only). Reads
        the values back to the host: a step's estimate uses `query` and reads once per step."""
        g, loss = self.query(loss_fn, seed, restore).tolist()
        return g, loss

    def query(self, loss_fn: Callable[[], torch.Tensor], seed: int, restore: bool = True) -> torch.Tensor:
        """(g, (L+ + L-) / 2) of one query in place (`losses`) as a float64 tensor on the loss's
        device, no host sync (`query_stats`)."""
        return query_stats(*self.losses(loss_fn, seed, restore=restore), self.eps)

    @torch.no_grad()
    def estimate(self, index: int, seeds: list[int], grads: list[float], out: torch.Tensor) -> torch.Tensor:
        """The gradient estimate of one unit, (1/Q) sum_q g_q z_q, written into `out`."""
        out.zero_()
        for seed, g in zip(seeds, grads, strict=True):
            out.add_(self.unit_z(index, seed), alpha=g / len(seeds))
        return out

    @torch.no_grad()
    def decay(self, lr: float, weight_decay: float, seeds: list[int] = ()) -> None:
        """theta <- (1 - lr wd) theta where weight decay applies; low-precision tensors are
        rounded stochastically (a factor 1 - 1e-8 would round back to theta)."""
        if weight_decay:
            rounding = rounding_seed(list(seeds), [lr * weight_decay])
            for i, t in enumerate(self.units):
                if t.decay and t.param.dtype in LOW_PRECISION:
                    self.write(i, t.param.float().mul_(1.0 - lr * weight_decay), rounding)
                elif t.decay:
                    t.param.mul_(1.0 - lr * weight_decay)

    @torch.no_grad()
    def sgd_update(
        self, seeds: list[int], grads: list[float], lr: float, weight_decay: float, restore: bool = False
    ) -> None:
        """theta <- theta - lr * ((1/Q) sum_q g_q z_q + wd * theta), decay only where t.decay, in
        one pass over the weights. restore=True: the weights sit at theta + s eps z(seed) for a
        seed of this step (`displaced`, e.g. s = -1 after the last query's L-): with d the decay
        factor, that query's term becomes (-d s eps - lr g_q / Q) z_q, so the restore costs no
        regeneration of z of its own."""
        d = 1.0 - lr * weight_decay
        plain = [-lr * g / len(seeds) for g in grads]
        decayed = list(plain)
        if restore:
            for seed in [s for s in self.displaced if s not in seeds]:
                self.perturb(seed, -self.displaced[seed])  # not this step's: restore on its own
            for k, seed in enumerate(seeds):
                s = self.displaced.pop(seed, 0.0)
                plain[k] -= s * self.eps
                decayed[k] -= d * s * self.eps
        rounding = rounding_seed(seeds, [*plain, *decayed, d])
        self.add_noise(seeds, plain, factor=d, decayed=decayed, rounding=rounding)
