"""MeZO's step: Q queries of two-sided SPSA (adazeta/zo/spsa.py) through the configured estimator
(adazeta/zo/estimators.py), then the update rule (adazeta/zo/updates.py). Registered as
method.estimator=spsa: every method of conf/method/ whose estimator is not FZOO, LOZO or HiZOO
(MeZO, AdaZeta, MeZO-LoRA, MeZO on prefixes, Sparse-MeZO) steps with it."""

from __future__ import annotations

import torch

from adazeta.config import MethodConfig, TrainableSet, Update, ZOConfig
from adazeta.params import LOW_PRECISION, Trainable
from adazeta.step import (
    GIB,
    GROUPED_SETS,
    UPDATE_SCALE,
    CudaBuffer,
    Guard,
    LossFn,
    RuleStep,
    StepResult,
    Supports,
    check_update_fits,
    dtype_bytes,
    register_step,
    weight_norm,
)
from adazeta.zo.estimators import Estimator, EstimatorFactory, build_estimator
from adazeta.zo.noise import CHUNK, query_seed
from adazeta.zo.sharded import Dist
from adazeta.zo.sparse import InForwardPerturbation, SparseMask
from adazeta.zo.spsa import SPSA
from adazeta.zo.updates import ADAM_RULES, RULES


class ZOStep(RuleStep):
    """Q queries of two-sided SPSA, then the update rule:

        seeds -> estimate -> guard -> update rule

    composed once, here, from the config: the SPSA over the trainable set (z from the noise stream,
    adazeta/zo/noise.py; Sparse-MeZO's mask), the estimator (sequential, in-forward, parallel
    replicas, sharded over ranks: adazeta/zo/estimators.py), the update rule (adazeta/zo/updates.py).
    Nothing of it is replaced afterwards. The estimator returns only scalars; the guard, passed to
    each call, sees the step's losses and projected gradients before any weight is written.

    Fused restore (`zo.fused_update`, plain SGD or sign rules, an estimator that can defer the
    restore): the sequential estimate leaves the last query's weights at theta - eps z
    (`spsa.displaced`), and the update folds the restore into its own pass over that z. Whatever
    stops the step in between (the guard, an error) restores the weights instead. Under
    torch.distributed the queries of a step are split across ranks, so every query restores on its
    own and no rank fuses.

    `writes` is the record of the in-place perturbations (seed, scale) the last step's estimate
    made, in order (SPSA tells the step of each: `on_perturb`): the replay log keeps it, because
    float addition does not undo exactly and the weights after a step carry those round trips."""

    def __init__(
        self, model, trainables: list[Trainable], cfg: MethodConfig, seed: int, zo: ZOConfig,
        dist: Dist | None = None, estimator: EstimatorFactory | None = None,
    ):
        mask = None
        if cfg.trainable == TrainableSet.sparse:
            mask = SparseMask(trainables, cfg.sparse.mask.value, cfg.sparse.sparsity, cfg.sparse.keep_ratio)
        # Adapter, LoRA and prefix sets (many small tensors: 1,344 for AdaZeta on Llama-2-7B) live in one
        # flat buffer per (device, dtype, decay) group, so a pass draws z with one RNG call per
        # group, not one per tensor. Full-parameter sets keep a z per tensor: flattening a model's
        # weights would copy them, and the in-forward perturbation regenerates one layer's z.
        group = cfg.trainable in GROUPED_SETS
        self.model = model  # the module tree the in-forward perturbation hooks (`cuda_buffers`)
        self.writes: list[tuple[int, float]] = []
        self.recording = False  # True while the estimate runs: its in-place writes go into `writes`
        self.spsa = SPSA(trainables, cfg.eps, mask=mask, group=group, on_perturb=self.observe)
        in_forward = functional_perturbation(trainables, cfg)
        self.mask, self.in_place_masks = mask, mask is not None and not in_forward
        self.estimator: Estimator = build_estimator(model, self.spsa, zo, in_forward, dist, estimator)
        kwargs = {}
        if cfg.update_rule.value == "momentum":
            kwargs = {"momentum": cfg.momentum}
        elif cfg.update_rule.value in ADAM_RULES:
            kwargs = {"betas": tuple(cfg.betas), "adam_eps": cfg.adam_eps}
        self.rule = RULES[cfg.update_rule.value](self.spsa, cfg.lr, cfg.weight_decay, **kwargs)
        self.update_scale = UPDATE_SCALE[cfg.update_rule.value]
        self.numel = sum(t.param.numel() for t in trainables)
        self.norm: float | None = None  # of the trainables, measured at the first guarded step
        self.seed = seed
        self.fuse = zo.fused_update and self.rule.fusable and self.estimator.can_defer_restore

    @property
    def writes_weights(self) -> bool:
        """Whether the estimate perturbs the weights in place (+eps z, -2 eps z, +eps z). Float
        addition does not undo exactly, so the weights after a step carry the rounding of the
        queries it ran: a query-parallel rank replays the others' round trips to round as one
        process would, and the replay log records them."""
        return self.estimator.writes_weights

    def observe(self, seed: int, scale: float) -> None:
        """SPSA's `on_perturb`: record the in-place writes of the estimate (not the update's restores)."""
        if self.recording:
            self.writes.append((seed, scale))

    def __call__(self, loss_fn: LossFn, step: int, q: int, guard: Guard | None = None) -> StepResult:
        """Step `step` (counted from 1) with q queries, seeds query_seed(seed, step, 0..q-1)."""
        seeds = [query_seed(self.seed, step, i) for i in range(q)]
        return self.run(self.estimator, loss_fn, step, seeds, guard)

    def run(
        self, estimate: Estimator, loss_fn: LossFn, step: int, seeds: list[int], guard: Guard | None = None
    ) -> StepResult:
        """The step with a given estimate of the seeds' projected gradients: the method's own
        (`__call__`), or one that repeats a logged step (adazeta-replay)."""
        q = len(seeds)
        if self.in_place_masks:
            self.mask.store(self.spsa.trainables)  # from the unperturbed weights of this step
        try:
            self.writes, self.recording = [], True
            try:
                results = estimate(loss_fn, seeds, defer_restore=self.fuse).tolist()  # the step's one host sync
            finally:
                self.recording = False
            grads, losses = [g for g, _ in results], [loss for _, loss in results]
            if guard is not None:
                guard(step, losses, grads)
                if self.norm is None:
                    self.norm = weight_norm(self.spsa.trainables)
                if self.norm > 0:
                    ratio = self.rule.lr * self.update_scale(grads) * self.numel**0.5 / self.norm
                    guard.check_update(step, ratio, self.rule.lr, grads)
            check_update_fits(step, self.rule.lr, grads)
            if self.spsa.displaced and self.rule.fusable:  # the weights sit at theta - eps z_last
                coeffs = self.rule.coefficients(grads)
                self.spsa.sgd_update(seeds, coeffs, self.rule.lr, self.rule.wd, restore=True)
                extra = 0
            else:
                self.spsa.restore()
                extra = self.rule.apply(seeds, grads, loss_fn)
        finally:
            self.spsa.restore()  # a no-op, unless the step stopped (guard, error) with the weights displaced
            if self.in_place_masks:
                self.mask.release()
        return StepResult(sum(losses) / q, sum(grads) / q, 2 * q + extra, seeds, grads)

    def cuda_buffers(self, target_dtype: str, kept: set[int]) -> list[CudaBuffer]:
        """On CUDA `chunks_exact` is False (adazeta/zo/noise.py), so every pass draws each tensor's z
        whole: a z scratch of the largest trainable tensor per dtype, a magnitude mask's two bools
        per value of it, and for the in-forward perturbation a copy of the largest module's
        trainables (with its two bool masks). Sized at `target_dtype` (`kept` tensors: float32),
        beside what this CPU process's buffers reached."""
        spsa, mask = self.spsa, self.mask
        magnitude = mask is not None and getattr(mask, "chunked", False)

        def dtype_of(p) -> str:
            return "float32" if id(p) in kept else target_dtype

        def held(buffers, kind=None) -> float:  # GiB of the CPU buffers (of a kind: "float", "bool")
            bufs = [b for b in buffers if kind is None or (b.dtype == torch.bool) == (kind == "bool")]
            return sum(b.numel() * b.element_size() for b in bufs) / GIB

        # Per dtype, the largest trainable tensor: SPSA.bounds are all None on CUDA, and run_lane
        # draws every tensor's z whole through SPSA.z into `SPSA.scratch`, one buffer per (device,
        # dtype) grown to the largest tensor drawn.
        largest: dict[str, tuple[int, str]] = {}
        for t in spsa.trainables:
            d = dtype_of(t.param)
            largest[d] = max(largest.get(d, (0, "")), (t.param.numel(), t.name))
        lanes = [b for lane in spsa.lanes for b in lane.buffers.values()]
        names = ", ".join(f"{n} ({numel:,} {d})" for d, (numel, n) in largest.items())
        out = [CudaBuffer(
            f"z scratch: the largest trainable tensor per dtype, {names}", "zo/spsa.py SPSA.z (run_lane, whole tensors)",
            sum(numel * dtype_bytes(d) for d, (numel, _) in largest.items()) / GIB,
            held(spsa.scratch.values()) + held(lanes, "float"))]
        top = max(numel for numel, _ in largest.values())
        if magnitude:
            # run_lane's whole-tensor branch computes the magnitude mask into lane.buffer(p, 2n, bool).
            out.append(CudaBuffer(
                "update mask: 2 bools per value of the largest tensor", "zo/spsa.py run_lane (mask.chunk into lane.buffer)",
                max(2 * top, 2 * CHUNK) / GIB, held(lanes, "bool")))
        if isinstance(self.estimator, InForwardPerturbation):
            # No module is `blockable` on CUDA (it needs chunks_exact): pre_hook -> perturbed_copy
            # takes each module's own trainables whole from the work buffer, stacked over the
            # enclosing modules that own trainables too (`take`).
            index_of = {id(t.param) for t in spsa.trainables}
            stacked: dict[str, int] = {}

            def walk(module, above: dict[str, int]) -> None:
                here = dict(above)
                for p in module.parameters(recurse=False):
                    if id(p) in index_of:
                        here[dtype_of(p)] = here.get(dtype_of(p), 0) + p.numel()
                for d, n in here.items():
                    stacked[d] = max(stacked.get(d, 0), n)
                for child in module.children():
                    walk(child, here)

            walk(self.model, {})
            out.append(CudaBuffer(
                "perturbed copy: the largest module's trainable weights", "zo/sparse.py InForwardPerturbation.perturbed_copy",
                sum(n * dtype_bytes(d) for d, n in stacked.items()) / GIB, held(self.estimator.work.values())))
            if magnitude:
                # SPSA.z -> SparseMask.__call__ -> compute(out=scratch(w, 1)) -> within(..., scratch(w)):
                # two bool buffers per device, grown to the largest tensor.
                out.append(CudaBuffer(
                    "forward masks: 2 bools per value of the largest tensor", "zo/sparse.py SparseMask.scratch (slots 0, 1)",
                    2 * top / GIB, held(mask.buffers.values())))
        return out


def functional_perturbation(trainables: list[Trainable], cfg: MethodConfig) -> bool:
    """Whether the estimate perturbs the weights inside each layer's forward (never writing them)
    rather than in place: Sparse-MeZO with method.sparse.in_forward=true, and any full-parameter method
    whose weights are bf16/fp16, where an in-place +eps z / -2 eps z / +eps z round trip leaves
    rounding drift of the order of an ulp per query (scripts/bf16_zo.py), more than the updates move.
    Low-precision tensors of the other sets are refused before the step is built (SUPPORTS)."""
    if cfg.trainable == TrainableSet.sparse:
        return cfg.sparse.in_forward
    return cfg.trainable == TrainableSet.full and any(t.param.dtype in LOW_PRECISION for t in trainables)


SUPPORTS = Supports(
    trainable=tuple(TrainableSet),
    update_rules=tuple(Update),
    parallel_queries=(TrainableSet.tt_adapter, TrainableSet.lora),  # adazeta/zo/parallel.py
    torchrun=True,  # adazeta/zo/sharded.py
    low_precision=(TrainableSet.full, TrainableSet.sparse),  # perturbed inside the forward
    replay_log=True,
    estimator_factory=True,
)
register_step("spsa", ZOStep, SUPPORTS)
