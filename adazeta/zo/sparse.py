"""Sparse-MeZO (Liu et al., arXiv 2402.15751): perturb and update only small-magnitude weights.

Per tensor, a threshold h is fixed before training as the magnitude quantile given by the sparsity
s (s = 0.8: the smallest 20% of each tensor's weights may move). Every step the mask
m = [|theta| <= h] is recomputed from the unperturbed weights and z_hat = m * z.

Two ways to apply the perturbation:
- in place, with the masks of the step stored (one bool per weight: 1/4 of an fp32 model);
- in forward (`method.sparse.in_forward=true`, the memory-efficient form): a pre-hook on each module replaces its
  weight by theta + eps * m(theta) * z for the duration of that module's forward only, so the
  weights are never written during the two loss evaluations and no model-sized mask exists. This
  is an estimator of its own (`InForwardPerturbation`, chosen when the method is built).

A module whose weight is large (an embedding, a tied LM head, a wide projection: `block_min`
values or more) is not copied whole: its output is computed over row blocks of about BLOCK values,
each block perturbed into a small buffer just before use, with its z read from the tensor's noise
stream in order (adazeta/zo/noise.py), so the values equal the whole-tensor z the update draws (on
CPU: `chunks_exact`). The step's transient memory is then a few MB whatever the vocabulary size.
Torch has no hook that replaces a forward, so such a module's pre-hook hands its own forward an
empty batch (no work) and its forward hook returns the output computed block by block: the
module keeps its class and its forward, and removing the hooks leaves it as it was.

`method.sparse.mask=random` (R-MeZO) draws a random mask per step and tensor with keep probability
`method.sparse.keep_ratio`, from a generator seeded by the query seed, so it is reproducible and
never stored either.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from adazeta.params import Trainable
from adazeta.zo.noise import Stream
from adazeta.zo.spsa import SPSA, chunks_exact, query_stats

# Weights of at least this many values are perturbed block by block in the forward (see above).
BLOCK_MIN = 1 << 22
# About this many values per block (rows x columns); a block's row count is a multiple of 16, so
# every block but the last holds a multiple of 16 values and the chunked draws equal one whole draw.
BLOCK = 1 << 20


@torch.no_grad()
def thresholds(trainables: list[Trainable], sparsity: float) -> list[float]:
    """h_i: the (1 - s) quantile of |theta_i|, computed once before training."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"method.sparse.sparsity must be in [0, 1), got {sparsity}")
    out = []
    for t in trainables:
        flat = t.param.detach().abs().flatten().float()
        k = max(1, int(round((1.0 - sparsity) * flat.numel())))
        out.append(float(flat.kthvalue(k).values))
    return out


def row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """[r0, r1) row spans of about BLOCK values and even sizes, each a multiple of 16 rows but the
    last: every block but the last then holds a multiple of 16 values, and a last one of fewer than
    16 values joins the one before, so drawing z block by block equals one draw over the tensor."""
    per = max(16, BLOCK // max(cols, 1) // 16 * 16)
    n = math.ceil(rows / per)
    per = math.ceil(math.ceil(rows / n) / 16) * 16  # the rows spread evenly over n blocks
    out = [(r0, min(rows, r0 + per)) for r0 in range(0, rows, per)]
    if len(out) > 1 and (out[-1][1] - out[-1][0]) * cols < 16:
        out[-2:] = [(out[-2][0], rows)]
    return out


def within(weight: torch.Tensor, h: float, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """|weight| <= h into the bool tensor `out` (`tmp`: a second one), with no float temporary."""
    return torch.le(weight, h, out=out).logical_and_(torch.ge(weight, -h, out=tmp))


class SparseMask:
    """The mask function SPSA calls per tensor: magnitude (fixed thresholds) or random."""

    def __init__(self, trainables: list[Trainable], kind: str, sparsity: float, keep_ratio: float):
        if kind not in ("magnitude", "random"):
            raise ValueError(f"method.sparse.mask={kind!r}; choose magnitude or random")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"method.sparse.keep_ratio must be in (0, 1], got {keep_ratio}")
        self.kind, self.keep_ratio = kind, keep_ratio
        # A magnitude mask is elementwise in the weights, so SPSA's passes can compute it chunk by
        # chunk (`chunk`); a random mask is one draw over the whole tensor.
        self.chunked = kind == "magnitude"
        self.h = thresholds(trainables, sparsity) if kind == "magnitude" else []
        self.streams: dict[torch.device, Stream] = {}
        self.stored: dict[int, torch.Tensor] | None = None  # in-place mode: masks of the step
        self.buffers: dict[tuple[torch.device, int], torch.Tensor] = {}

    def compute(self, index: int, weight: torch.Tensor, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """m(theta) for tensor `index`, into `out` (a bool tensor of weight's shape) if given."""
        if self.kind == "magnitude":  # |w| <= h without a float temporary of the tensor's size
            h = self.h[index]
            if out is None:
                return (weight <= h).logical_and_(weight >= -h)
            return within(weight, h, out, self.scratch(weight))
        stream = self.streams.get(weight.device)
        if stream is None:
            stream = self.streams[weight.device] = Stream(weight.device)
        return stream.mask(seed, index, weight.shape, weight.device) < self.keep_ratio

    def chunk(self, index: int, flat: torch.Tensor, a: int, b: int, scratch: torch.Tensor) -> torch.Tensor:
        """The magnitude mask of values [a, b) of tensor `index`, whose current values are `flat`
        (the stored mask's slice in in-place mode); `scratch` holds 2 (b - a) bools."""
        if self.stored is not None:
            return self.stored[index].view(-1)[a:b]
        n = b - a
        return within(flat, self.h[index], scratch[:n], scratch[n : 2 * n])

    def __call__(self, index: int, weight: torch.Tensor, seed: int) -> torch.Tensor:
        if self.stored is not None and self.kind == "magnitude":
            return self.stored[index]
        if self.kind == "magnitude":  # recomputed per call: into a reused buffer, not a new one
            return self.compute(index, weight, seed, out=self.scratch(weight, 1))
        return self.compute(index, weight, seed)

    def scratch(self, weight: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """Two reusable bool buffers per device, grown to the largest tensor seen."""
        key = (weight.device, slot)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < weight.numel():
            buf = self.buffers[key] = torch.empty(weight.numel(), dtype=torch.bool, device=weight.device)
        return buf[: weight.numel()].view_as(weight)

    @torch.no_grad()
    def store(self, trainables: list[Trainable]) -> None:
        """In-place mode: freeze this step's magnitude masks from the unperturbed weights."""
        if self.kind == "magnitude":
            self.stored = {i: self.compute(i, t.param, 0) for i, t in enumerate(trainables)}

    def release(self) -> None:
        self.stored = None


class InForwardPerturbation:
    """The in-forward estimator: L(theta + eps z) and L(theta - eps z) with each module's own
    trainable tensors swapped for their perturbed versions during that module's forward only (a
    forward pre-hook and a forward hook), so the weights are never written. Called like every
    estimator: (loss_fn, seeds) -> float64 [Q, 2] of (g_q, (L+ + L-) / 2)."""

    writes_weights = False  # the perturbation lives in a work buffer, never in the weights
    can_defer_restore = False  # nothing to restore: no update can fold a restore in

    def __init__(self, model: torch.nn.Module, spsa: SPSA, block_min: int = BLOCK_MIN):
        self.spsa = spsa
        self.active: tuple[int, float] | None = None  # (seed, scale) while a loss is evaluated
        index_of = {id(t.param): i for i, t in enumerate(spsa.trainables)}
        self.handles = []
        # The perturbed copies of a module's tensors live in a work buffer that every module reuses
        # (the largest module's size): no allocation, and no fresh pages, per layer and forward.
        self.work: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.top: dict[tuple[torch.device, torch.dtype], int] = {}  # first free value of each buffer
        self.blocked: list[torch.nn.Module] = []  # modules whose output is computed block by block
        # Per module inside its forward: its own tensors and the work buffer's top before it.
        self.swapped: dict[int, tuple[torch.nn.Module, dict[str, torch.Tensor], dict]] = {}
        self.inputs: dict[int, torch.Tensor] = {}  # a blocked module's input, pre-hook -> forward hook
        self.streams: dict[torch.device, Stream] = {}  # the blocks' readers of the noise stream
        for module in model.modules():
            owned = [(name, index_of[id(p)]) for name, p in module.named_parameters(recurse=False) if id(p) in index_of]
            if not owned:
                continue
            weight = dict(owned).get("weight")
            if weight is not None and self.blockable(module, block_min):
                rest = [(name, i) for name, i in owned if name != "weight"]
                self.handles.append(module.register_forward_pre_hook(self.blocked_pre_hook, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self.blocked_hook(weight, rest)))
                self.blocked.append(module)
                continue
            self.handles.append(module.register_forward_pre_hook(self.pre_hook(owned)))
            self.handles.append(module.register_forward_hook(self.post_hook))

    def blockable(self, module: torch.nn.Module, block_min: int) -> bool:
        """A plain Linear or Embedding whose weight is large, contiguous and drawn chunk-exactly,
        with a magnitude mask (elementwise in the weight, so it can be computed per block)."""
        w = module.weight
        if type(module) not in (torch.nn.Linear, torch.nn.Embedding) or w.numel() < block_min:
            return False
        if type(module) is torch.nn.Embedding and module.max_norm is not None:
            return False  # max_norm renormalises the rows it reads, in place
        if hasattr(module, "_hf_hook"):
            return False  # accelerate (device_map) already wraps this module's forward
        mask = self.spsa.mask
        chunked_mask = mask is None or getattr(mask, "chunked", False)
        return chunked_mask and w.is_contiguous() and chunks_exact(w.device.type, w.dtype)

    def blocks(self, w: torch.Tensor, index: int, seed: int, scale: float):
        """(r0, r1, perturbed rows r0:r1) over w's rows in order: z read block by block from the
        tensor's noise stream (adazeta/zo/noise.py), masked by the block's own (unwritten) weights."""
        stream = self.streams.get(w.device)
        if stream is None:
            stream = self.streams[w.device] = Stream(w.device)
        stream.z(seed, self.spsa.unit_seed[index])
        mask = self.spsa.mask
        for r0, r1 in row_blocks(w.shape[0], w[0].numel()):
            blk = w[r0:r1]
            out = stream.read(self.take(blk))  # z, then W + a m z in the same buffer
            if mask is not None:
                out.mul_(mask.compute(index, blk, seed, out=mask.scratch(blk, 1)))
            yield r0, r1, torch.add(blk, out, alpha=scale * self.spsa.eps, out=out)
            self.top[(w.device, w.dtype)] -= blk.numel()  # release the block's buffer

    def blocked_pre_hook(self, module, args, kwargs):
        """While a loss is evaluated: keep the input for `blocked_hook` and give the module's own
        forward an empty batch, so it computes nothing (its output is replaced)."""
        if self.active is None:
            return None
        if args:
            self.inputs[id(module)] = args[0]
            return (args[0][:0], *args[1:]), kwargs
        self.inputs[id(module)] = kwargs["input"]
        return args, {**kwargs, "input": kwargs["input"][:0]}

    def blocked_hook(self, index: int, rest: list[tuple[str, int]]) -> Callable:
        """The forward hook of a blocked module: its output from perturbed row blocks of its weight
        (`blocks`); its other trainable tensors (a bias) perturbed whole."""

        def hook(module, args, output):
            x = self.inputs.pop(id(module), None)
            if x is None:  # not in a perturbed evaluation: the plain forward's output stands
                return None
            seed, scale = self.active
            top = dict(self.top)
            others = {name: self.perturbed_copy(module._parameters[name], i, seed, scale) for name, i in rest}
            w = module.weight
            try:
                if type(module) is torch.nn.Embedding:
                    out = torch.nn.functional.embedding(x, w, module.padding_idx)
                    ids, flat = x.reshape(-1), out.view(-1, w.shape[1])
                    for r0, r1, blk in self.blocks(w, index, seed, scale):
                        sel = ((ids >= r0) & (ids < r1)).nonzero().squeeze(1)
                        if sel.numel():
                            flat[sel] = blk[ids[sel] - r0]
                    return out
                bias = others.get("bias", module.bias)
                out = x.new_empty(*x.shape[:-1], w.shape[0])
                for r0, r1, blk in self.blocks(w, index, seed, scale):
                    out[..., r0:r1] = torch.nn.functional.linear(x, blk, None if bias is None else bias[r0:r1])
                return out
            finally:
                self.top = top

        return hook

    def pre_hook(self, owned: list[tuple[str, int]]) -> Callable:
        def hook(module, args):
            if self.active is None:
                return
            seed, scale = self.active
            saved = {}
            self.swapped[id(module)] = (module, saved, dict(self.top))
            for name, i in owned:
                weight = module._parameters[name]
                saved[name] = weight
                module._parameters[name] = self.perturbed_copy(weight, i, seed, scale)
        return hook

    def perturbed_copy(self, weight: torch.Tensor, index: int, seed: int, scale: float) -> torch.Tensor:
        """W + scale * eps * m(W) * z in the work buffer (z drawn there first, then W added): a
        stack, so that a module running inside another one (both owning trainables) takes the
        space above its parent's."""
        out = self.spsa.z(index, seed, out=self.take(weight))
        return torch.add(weight, out, alpha=scale * self.spsa.eps, out=out)

    def take(self, weight: torch.Tensor) -> torch.Tensor:
        key, n = (weight.device, weight.dtype), weight.numel()
        start = self.top.get(key, 0)
        buf = self.work.get(key)
        if buf is None or buf.numel() < start + n:
            # A larger buffer; slices of the old one still in use keep it alive until released.
            buf = self.work[key] = torch.empty(start + n, device=weight.device, dtype=weight.dtype)
        self.top[key] = start + n
        return buf[start : start + n].view_as(weight)

    def post_hook(self, module, args, output) -> None:
        swapped = self.swapped.pop(id(module), None)
        if swapped is not None:
            _, saved, self.top = swapped
            module._parameters.update(saved)

    @contextlib.contextmanager
    def perturbed(self, seed: int, scale: float):
        self.active, self.top = (seed, scale), {}
        try:
            yield
        finally:
            self.active = None
            # A forward that raised skipped its modules' forward hooks: give them their own tensors back.
            for module, saved, _ in self.swapped.values():
                module._parameters.update(saved)
            self.swapped.clear()
            self.inputs.clear()

    @torch.no_grad()
    def losses(self, loss_fn: Callable[[], torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self.perturbed(seed, +1.0):
            loss_plus = loss_fn()
        with self.perturbed(seed, -1.0):
            loss_minus = loss_fn()
        return loss_plus, loss_minus

    def __call__(self, loss_fn: Callable[[], torch.Tensor], seeds: list[int], defer_restore: bool = False) -> torch.Tensor:
        """One query after another (`query_stats` of each pair); the result stays on the loss's device."""
        return torch.stack([query_stats(*self.losses(loss_fn, seed), self.spsa.eps) for seed in seeds])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
