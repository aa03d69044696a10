"""Parallel queries: a step's 2Q perturbed forwards as batched forwards over replicas of the batch.

AdaZeta (arXiv 2406.18060) names as a limitation that its queries run one after another. Here the
batch is repeated R = 2Q times and replica r = 2q + s runs with its own trainable weights

    theta_r = theta + eps z_q  (s = 0),    theta_r = theta - eps z_q  (s = 1),

z_q regenerated from the query's seed exactly as the sequential path does (`SPSA.z`), so
g_q = (L_{2q} - L_{2q+1}) / (2 eps) is the same projected gradient, within float rounding.

The base model is shared by all replicas and never written: only the modules that own trainable
parameters compute per replica, each from a stack of R copies of its own tensors (R x the
trainable size: small for TT adapters, LoRA and a classification head; that is why full-weight
methods cannot run this way). During a replicated forward such a module's `forward` is swapped
for a batched one that splits its input into the R replicas' row blocks:

- nn.Linear (LoRA's A and B, classification heads): y_r = x_r W_r^T + b_r, one `baddbmm`;
- a `FactoredLinear` (TTLinear, AdaZeta's adapters): A_r, B_r from the replica's parameters, as
  the layer forms them (for TTLinear, batched contractions of the fast-forward path's cores), then
  y_r = (x_r A_r) B_r + b_r, two `bmm`s.

Replicas are evaluated in chunks of at most `zo.max_replicas`; when that is null, as many as an
estimate of the replicated activations allows (half the free memory, see `BatchLoss.replica_bytes`)
and, on CPU, at most CPU_TOKENS tokens per forward. A chunk may split a query's pair: the losses
are gathered before any g_q is formed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from adazeta.errors import ConfigError
from adazeta.zo.spsa import SPSA

# Automatic chunking (zo.max_replicas=null): replicated activations may take at most this
# fraction of the free memory ...
MEMORY_FRACTION = 0.5
# ... and on CPU a chunk holds at most this many tokens: past about a thousand, batched GEMMs
# gain nothing while the activations fall out of cache. MiniLM, 2 AVX2 cores, Q = 8, speed-up over
# sequential queries with 1024 / 2048 tokens per forward: 1.67 / 1.60x at 4 x 32 tokens,
# 1.32 / 1.22x at 8 x 32, 1.11 / 1.16x at 16 x 32 (4096 tokens: 1.07x; 8192: 0.99x).
CPU_TOKENS = 1024


class FactoredLinear(Protocol):
    """A linear layer y = (x A) B + bias whose A and B it forms from parameters held by its
    submodules (TTLinear: its cores, in a ParameterList). It owns all of them, and forms A and B
    per replica itself, so this module needs to know no class of the trainable sets."""

    d_out: int

    def replica_factors(
        self, params: dict[str, torch.Tensor], n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A (n, d_in, r), B (n, r, d_out) and the bias ((n, d_out), (d_out,) or None) of n replicas,
        from `params`: per-replica stacks (n, *shape) of some of its parameters by name
        (`named_parameters()`), the others shared by every replica."""
        ...


def factored(module: nn.Module) -> bool:
    """Whether `module` is a FactoredLinear. Read from its class, as an isinstance check would: a
    method of the layer, never a parameter or submodule of that name."""
    return callable(getattr(type(module), "replica_factors", None))


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: the CUDA driver's free bytes, or MemAvailable on a Linux host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ParallelQueries:
    """estimate(loss_fn, seeds) -> [Q, 2] float64 of (g_q, (L+ + L-) / 2), like the sequential
    estimator (adazeta/zo/estimators.py), from batched forwards over per-replica trainable weights.

    `loss_fn` must offer `replicated(r)` (the r per-replica mean losses of the batch repeated r
    times: `adazeta.objectives.BatchLoss`); `replica_bytes()`, if it has one, drives the
    automatic chunking.
    """

    writes_weights = False  # each replica has its own copy: the weights are never written
    can_defer_restore = False

    def __init__(self, model: nn.Module, spsa: SPSA, max_replicas: int | None = None):
        if max_replicas is not None and max_replicas < 1:
            raise ConfigError(f"zo.max_replicas={max_replicas} must be >= 1 (or null: all 2Q at once)")
        self.spsa, self.max_replicas = spsa, max_replicas
        self.owners = owners(model, spsa)
        self.device = spsa.trainables[0].param.device
        # The replicas' weights: per (device, dtype) group of trainables, one (capacity, group
        # size) buffer, replica r in row r; each tensor's (n, *shape) stack is a view into it.
        # Flat rows make filling a replica two adds over the group instead of two per tensor.
        self.groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(spsa.trainables):
            self.groups.setdefault((t.param.device, t.param.dtype), []).append(i)
        self.offsets = [0] * len(spsa.trainables)
        for indices in self.groups.values():
            at = 0
            for i in indices:
                self.offsets[i], at = at, at + spsa.trainables[i].param.numel()
        self.sizes = {key: sum(spsa.trainables[i].param.numel() for i in ix) for key, ix in self.groups.items()}
        self.rows: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # (capacity, size)
        self.theta = {key: torch.empty(n, device=key[0], dtype=key[1]) for key, n in self.sizes.items()}
        self.z = {key: torch.empty(n, device=key[0], dtype=key[1]) for key, n in self.sizes.items()}
        self.z_views = [
            self.z[(t.param.device, t.param.dtype)][self.offsets[i] : self.offsets[i] + t.param.numel()].view_as(t.param)
            for i, t in enumerate(spsa.trainables)
        ]
        self.stacks: list[torch.Tensor] = []  # per tensor, (capacity, *shape) views of `rows`

    def __call__(self, loss_fn: Callable[[], torch.Tensor], seeds: list[int], defer_restore: bool = False) -> torch.Tensor:
        replicated = getattr(loss_fn, "replicated", None)
        if replicated is None:
            raise TypeError(
                "zo.parallel_queries=true needs a loss that can evaluate replicas of its batch "
                f"(a `replicated(r)` method, e.g. adazeta.objectives.BatchLoss), got {loss_fn!r}"
            )
        total = 2 * len(seeds)
        chunk = self.chunk_size(loss_fn, total)
        losses = torch.empty(total, dtype=torch.float64)
        for start in range(0, total, chunk):
            n = min(chunk, total - start)
            self.fill(seeds, start, n)
            with torch.no_grad(), self.replicas(n):
                # One host sync per chunk, for n scalars.
                losses[start : start + n] = replicated(n).float().cpu().double()
        plus, minus = losses[0::2], losses[1::2]
        return torch.stack([(plus - minus) / (2 * self.spsa.eps), (plus + minus) / 2], dim=1)

    def chunk_size(self, loss_fn, total: int) -> int:
        """Replicas per batched forward: zo.max_replicas if set, else what memory (and on CPU
        the token cap) allows, as told by the loss's `replica_bytes()` and `replica_tokens()`."""
        if self.max_replicas is not None:
            return min(self.max_replicas, total)
        chunk = total
        estimate, free = getattr(loss_fn, "replica_bytes", None), available_bytes(self.device)
        if estimate is not None and free is not None:
            chunk = min(chunk, int(MEMORY_FRACTION * free) // max(estimate(), 1))
        tokens = getattr(loss_fn, "replica_tokens", None)
        if self.device.type == "cpu" and tokens is not None:
            chunk = min(chunk, CPU_TOKENS // max(tokens(), 1))
        chunks = math.ceil(total / max(1, chunk))
        return math.ceil(total / chunks)  # as many chunks as needed, of even sizes

    def reserve(self, n: int) -> None:
        """Room for n replicas (grows with Q under an adaptive schedule, then is reused)."""
        if self.stacks and self.stacks[0].shape[0] >= n:
            return
        self.rows = {key: torch.empty((n, size), device=key[0], dtype=key[1]) for key, size in self.sizes.items()}
        self.stacks = []
        for i, t in enumerate(self.spsa.trainables):
            key, numel = (t.param.device, t.param.dtype), t.param.numel()
            self.stacks.append(self.rows[key][:, self.offsets[i] : self.offsets[i] + numel].view(n, *t.param.shape))

    @torch.no_grad()
    def fill(self, seeds: list[int], start: int, n: int) -> None:
        """Replicas start .. start + n - 1: theta +/- eps z_q, each z_q regenerated once per chunk
        (tensor by tensor, from the same seeds as `SPSA.z`), then added over whole groups."""
        self.reserve(n)
        eps, trainables = self.spsa.eps, self.spsa.trainables
        for key, indices in self.groups.items():
            theta, z = self.theta[key], self.z[key]
            torch.cat([trainables[i].param.view(-1) for i in indices], out=theta)
            for q in range(start // 2, (start + n + 1) // 2):
                for i in indices:
                    self.spsa.z(i, seeds[q], out=self.z_views[i])
                for r, sign in ((2 * q, 1.0), (2 * q + 1, -1.0)):
                    if start <= r < start + n:
                        torch.add(theta, z, alpha=sign * eps, out=self.rows[key][r - start])

    @contextlib.contextmanager
    def replicas(self, n: int) -> Iterator[None]:
        """Swap each owner's forward for its per-replica version over the first n stacks. A module
        that accelerate hooked (under `model.device_map`) keeps its hook: the swap replaces the
        forward the hook wraps (`_old_forward`), so the hook still moves the inputs to the module's
        device and the outputs on, as it does for the sequential queries."""
        saved: list[tuple[nn.Module, str, Callable | None]] = []
        try:
            for module, owned in self.owners:
                attr = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"
                original = module.__dict__.get(attr)
                setattr(module, attr, replica_forward(module, {name: self.stacks[i][:n] for name, i in owned}, n))
                saved.append((module, attr, original))
            yield
        finally:
            for module, attr, original in saved:
                if original is None:
                    delattr(module, attr)  # back to the class's forward
                else:
                    setattr(module, attr, original)  # e.g. the forward an accelerate hook wraps


def owners(model: nn.Module, spsa: SPSA) -> list[tuple[nn.Module, list[tuple[str, int]]]]:
    """The modules that compute with trainable tensors, each with [(its name for the tensor,
    trainable index)]. A FactoredLinear owns its submodules' parameters (TTLinear: its cores, held
    by a ParameterList child)."""
    index = {id(t.param): i for i, t in enumerate(spsa.trainables)}
    found, claimed = [], set()
    for module in model.modules():
        is_factored = factored(module)
        if is_factored:
            params = module.named_parameters()
        elif isinstance(module, nn.ParameterList):
            continue  # holds tensors for the module above it (a FactoredLinear's: claimed by it above)
        else:
            params = module.named_parameters(recurse=False)
        owned = [(name, index[id(p)]) for name, p in params if id(p) in index and id(p) not in claimed]
        if not owned:
            continue
        if not (is_factored or isinstance(module, nn.Linear)):
            raise ConfigError(
                f"zo.parallel_queries=true: trainable {[n for n, _ in owned]} of a "
                f"{type(module).__name__} cannot get per-replica copies (supported: nn.Linear, "
                "TTLinear, i.e. trainable=tt_adapter or lora with a linear classification head); "
                "set zo.parallel_queries=false"
            )
        claimed.update(id(spsa.trainables[i].param) for _, i in owned)
        found.append((module, owned))
    missing = [t.name for t in spsa.trainables if id(t.param) not in claimed]
    if missing:
        raise ConfigError(
            f"zo.parallel_queries=true: no module of the model computes with trainable {missing[:3]}; "
            "set zo.parallel_queries=false"
        )
    return found


def replica_forward(module: nn.Module, params: dict[str, torch.Tensor], n: int) -> Callable:
    """The module's forward over an input of n row blocks, block r with weights params[.][r]."""
    if factored(module):
        # (n, d_in, r), (n, r, d_out): once per forward, not per row
        a, b, bias = module.replica_factors(params, n)
        # Right-hand sides as transposed views of contiguous (n, r, d) copies: the layout CPU GEMMs
        # are fast with for a skinny operand (see TTLinear.forward).
        a, b = a.mT.contiguous().mT, b.mT.contiguous().mT

        def factored_forward(x: torch.Tensor) -> torch.Tensor:
            xs = _blocks(x, n, module, a.device)
            h = torch.bmm(xs, a)
            y = torch.bmm(h, b) if bias is None else torch.baddbmm(_rows(bias), h, b)
            return y.reshape(*x.shape[:-1], module.d_out)

        return factored_forward

    weight = params.get("weight", module.weight)
    bias = params.get("bias", module.bias)

    def linear_forward(x: torch.Tensor) -> torch.Tensor:
        xs = _blocks(x, n, module, weight.device)
        w = weight.transpose(-1, -2)  # (n, in, out), or (in, out) when only the bias is trainable
        if bias is None:
            y = xs @ w
        elif w.dim() == 3:
            y = torch.baddbmm(_rows(bias), xs, w)
        else:
            y = xs @ w + _rows(bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return linear_forward


def _rows(bias: torch.Tensor) -> torch.Tensor:
    """A per-replica bias (n, d) as (n, 1, d); a shared one (d,) as is: both broadcast."""
    return bias.unsqueeze(1) if bias.dim() == 2 else bias


def _blocks(x: torch.Tensor, n: int, module: nn.Module, device: torch.device) -> torch.Tensor:
    """(n * rows, ..., d) -> (n, rows * ..., d): replica r's rows are the r-th block, on `device`
    (the weights'): under `device_map` a head's input comes from the final norm, which may sit on
    another GPU; accelerate's hook moves it, and so does this where no hook does."""
    x = x.to(device)
    if x.shape[0] % n:
        raise RuntimeError(
            f"parallel queries: a {type(module).__name__} got {x.shape[0]} rows, not a multiple "
            f"of the {n} replicas; its input is not batch-first"
        )
    return x.reshape(n, -1, x.shape[-1])
