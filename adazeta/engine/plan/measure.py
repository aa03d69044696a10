"""One measurement of the planner: the architecture cut to a few layers, built with random weights,
one training step of the longest batch, in a fresh Python process so that each peak starts clean
(`python -m adazeta.engine.plan.measure <spec.json>` prints the result after RESULT_TAG)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adazeta.config import compose_config  # light: the schemas and Hydra's compose

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RESULT_TAG = "ADAZETA_PLAN_RESULT "


@dataclass
class CudaTerm:
    """A buffer a CUDA run allocates whose size a CPU measurement does not show (docs/design.md, the memory planner)."""

    name: str  # what it is, with the tensor that sizes it
    source: str  # where the code allocates it
    cuda_gib: float  # its size on CUDA, in the target dtype
    cpu_gib: float  # what the CPU measurement held of it, in the measured dtype

    def added(self, ratio: float) -> float:
        """GiB to add to a measurement converted with `ratio` (target over measured bytes per
        value): the conversion scaled the CPU buffer by `ratio` too, so that is what it holds."""
        return self.cuda_gib - ratio * self.cpu_gib


@dataclass
class Measurement:
    """One measured training step of the architecture cut to `layers` layers (a fresh process)."""

    layers: int
    dtype: str
    peak_gib: float  # peak of `steps` training steps, above the pre-model baseline
    inference_gib: float  # peak of one no-grad forward of the same batch, same baseline
    weights_gib: float  # all parameters, as built
    kept_gib: float  # parameters a low-precision run keeps in float32 (adapters, LoRA, new head)
    params: int
    trainable_params: int
    step_s: float
    tokens: list[int] = field(default_factory=list)  # batch shape: rows x tokens
    cuda_terms: list[CudaTerm] = field(default_factory=list)  # measured on CPU: what CUDA adds
    reserved_gib: float | None = None  # measured on CUDA: the allocator's reserved peak, same baseline

    def __post_init__(self):
        self.cuda_terms = [CudaTerm(**t) if isinstance(t, dict) else t for t in self.cuda_terms]

    def converted(self, dtype: str) -> tuple[float, float]:
        """(peak, inference) in GiB as a `dtype` run would have them (docs/design.md, the memory planner)."""
        r = DTYPE_BYTES[dtype] / DTYPE_BYTES[self.dtype]
        # Inference is measured before the method builds its parameters: all of it scales.
        return self.kept_gib + r * (self.peak_gib - self.kept_gib), r * self.inference_gib


def param_gib(params) -> float:
    return sum(p.numel() * p.element_size() for p in params) / GIB


def cuda_terms(method, target_dtype: str, kept: set[int]) -> list[CudaTerm]:
    """What a CUDA run of `method` allocates that this CPU process did not, after a step has run
    here, as its step reports it (`Step.cuda_buffers`, adazeta/step.py): each buffer's CUDA size
    (values of the largest tensor or module, at the target dtype's bytes; `kept` parameters stay
    float32) beside the size this process's buffers reached. Empty for first-order methods:
    backprop allocates alike on both devices."""
    return [CudaTerm(b.name, b.source, b.cuda_gib, b.cpu_gib) for b in method.step.cuda_buffers(target_dtype, kept)]


def measure_here(spec: dict) -> dict:
    """Build the run of `spec` (adazeta/engine/build.py: one inference forward on the saved batch), run
    `spec["steps"]` training steps on that batch, and return the peaks above the memory in use
    before the model was built."""
    import torch
    from omegaconf import open_dict

    from adazeta.engine.build import build_run
    from adazeta.engine.memory import peak_gib, reset_peak
    from adazeta.models.load import resolve_device

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = compose_config(spec["overrides"])
    with open_dict(cfg):
        if spec.get("arch") is not None:
            cfg.model.init, cfg.model.arch = "random", spec["arch"]
        if spec.get("dtype"):
            cfg.model.dtype = spec["dtype"]
    device = resolve_device(cfg.model.device)
    batch = {k: v.to(device) for k, v in torch.load(spec["batch"], weights_only=True).items()}
    if spec.get("warmup"):
        # One forward of a throwaway build first: the CPU's first use of each kernel maps library
        # code and per-thread buffers (tens of MiB), a constant that would otherwise count as the
        # model's. Worth it for small models; noise at 7B width.
        build_run(cfg, inference_batch=batch)  # dropped at once

    gc.collect()
    base_reserved = torch.cuda.memory_reserved(device) / GIB if device.type == "cuda" else 0.0
    # Pretrained weights may come as pages of a memory-mapped file, resident only once read;
    # build_run reads every weight once before its inference forward, so that inference counts all
    # the weights, as device memory would.
    run = build_run(cfg, inference_batch=batch)
    if run.memory_before_gib is None:
        raise OSError("no VmRSS in /proc/self/status: CPU memory planning needs Linux")
    base = run.memory_before_gib  # in use just before the model was built
    inference = run.inference_gib - base
    method = run.method
    params = list(method.model.parameters())
    kept = run.new_params  # a new head, adapters, LoRA factors: fp32 in a low-precision run
    q = spec.get("q", 1)

    loss_fn = run.objective.batch_loss(method.model, batch)  # replicable: zo.parallel_queries works here
    gc.collect()
    reset_peak(device)
    times = []
    for step in range(1, spec.get("steps", 1) + 1):
        t0 = time.perf_counter()
        method.step(loss_fn, step, q)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    kept_ids = {id(p) for p in kept}
    target = spec.get("target_dtype") or str(cfg.model.dtype)
    terms = cuda_terms(method, target, kept_ids) if device.type == "cpu" else []
    reserved = torch.cuda.max_memory_reserved(device) / GIB - base_reserved if device.type == "cuda" else None
    return asdict(Measurement(
        layers=spec.get("layers") or 0, dtype=str(cfg.model.dtype), peak_gib=peak_gib(device) - base,
        inference_gib=inference, weights_gib=param_gib(params), kept_gib=param_gib({id(p): p for p in kept}.values()),
        params=sum(p.numel() for p in params),
        trainable_params=sum(t.param.numel() for t in method.trainables), step_s=times[-1],
        tokens=list(batch["input_ids"].shape), cuda_terms=terms, reserved_gib=reserved,
    ))


def measure(spec: dict, timeout: float | None = None) -> Measurement:
    """measure_here in a fresh Python process, so that each peak starts clean."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        # A fixed mmap threshold turns off glibc's adaptive one, under which freed blocks of up to
        # 32 MiB stay in the heap: every tensor above 128 KiB is then mapped and unmapped on its
        # own, and the resident set follows the live tensors as a GPU allocator's counter would.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        proc = subprocess.run([sys.executable, "-m", "adazeta.engine.plan.measure", f.name],
                              capture_output=True, text=True, timeout=timeout, env=env)
    finally:
        os.unlink(f.name)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        from adazeta.errors import AdazetaError

        killed = " (killed: out of memory? lower the --fit/--check depths)" if proc.returncode < 0 else ""
        raise AdazetaError(f"measurement at {spec.get('layers')} layers failed with exit code "
                           f"{proc.returncode}{killed}:\n{proc.stderr[-3000:]}")
    return Measurement(**json.loads(lines[-1][len(RESULT_TAG):]))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    print(RESULT_TAG + json.dumps(measure_here(json.loads(Path(sys.argv[1]).read_text()))), flush=True)
