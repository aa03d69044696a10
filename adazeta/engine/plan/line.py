"""The plan: measurements at a few depths, the line peak = a + b x layers fitted through them, read
at the model's full depth (converted to the target dtype, plus the buffers only CUDA allocates)."""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from adazeta.config import compose_config  # light: the schemas and Hydra's compose
from adazeta.engine.plan.arch import architecture, layer_key, plan_batch
from adazeta.engine.plan.measure import DTYPE_BYTES, CudaTerm, Measurement, measure


@dataclass
class Plan:
    """A prediction for one method: measurements, the fitted line, and its checks."""

    model: str
    method: str
    depth: int  # the architecture's full number of layers
    dtype: str  # the dtype the run would use (model.dtype)
    measured_dtype: str
    device: str
    batch: str  # what the batch is, in words
    fit_layers: list[int]
    measurements: list[Measurement]
    a: float  # peak(layers) = a + b * layers, in GiB of the target dtype
    b: float
    a_inf: float  # the same line for inference
    b_inf: float
    # (layers, converted, native) peaks in the target dtype, at depths measured natively too.
    dtype_checks: list[tuple[int, float, float]] = field(default_factory=list)
    target_device: str = "cpu"  # the device type the prediction is for: cpu or cuda
    # A CUDA target measured on a CPU: the buffers only CUDA allocates (of the deepest fitted
    # measurement; their sizes do not depend on depth), added to the line's prediction.
    cuda_terms: list[CudaTerm] = field(default_factory=list)
    reserved: tuple[float, float] | None = None  # measured on CUDA: (a, b) of the reserved line

    @property
    def ratio(self) -> float:
        return DTYPE_BYTES[self.dtype] / DTYPE_BYTES[self.measured_dtype]

    @property
    def added_gib(self) -> float:
        return sum(t.added(self.ratio) for t in self.cuda_terms)

    @property
    def line_gib(self) -> float:
        """The fitted line at full depth: the measured step, converted to the target dtype."""
        return self.a + self.b * self.depth

    @property
    def peak_gib(self) -> float:
        return self.line_gib + self.added_gib

    @property
    def reserved_gib(self) -> float | None:
        return None if self.reserved is None else self.reserved[0] + self.reserved[1] * self.depth

    @property
    def inference_gib(self) -> float:
        return self.a_inf + self.b_inf * self.depth

    def line_in_measured_dtype(self) -> tuple[float, float]:
        fit = [m for m in self.measurements if m.layers in self.fit_layers]
        return fit_line([m.layers for m in fit], [m.peak_gib for m in fit])

    def checks(self) -> list[tuple[Measurement, float, float]]:
        """(measurement, predicted GiB, relative error) at every depth not used by the fit, both in
        the measured dtype (so that the check does not depend on the dtype conversion)."""
        a, b = self.line_in_measured_dtype()
        out = []
        for m in self.measurements:
            if m.layers not in self.fit_layers:
                pred = a + b * m.layers
                out.append((m, pred, (pred - m.peak_gib) / m.peak_gib))
        return out


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x; exact through two points."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError(f"a line needs at least two different depths, got {xs}")
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def own_tokenizer(model_cfg, log=print) -> str:
    """The model's own tokenizer when it can be had (a local or packaged checkpoint, or the hub
    when online), else the packaged MiniLM one, with a note: token counts set the batch's length."""
    from transformers import AutoTokenizer

    from adazeta.models.load import resolve_path

    try:
        AutoTokenizer.from_pretrained(resolve_path(model_cfg.path), trust_remote_code=model_cfg.trust_remote_code)
        return model_cfg.path
    except (OSError, ValueError) as e:
        log(f"  tokenizer of {model_cfg.path} not available ({type(e).__name__}); lengths from packaged:minilm "
            "(set model.tokenizer=..., e.g. packaged:smollm2-135m for a Llama-family BPE)")
        return "packaged:minilm"


def native_is_slow(device_name: str, dtype: str) -> bool:
    """Low precision on a CPU: measure in float32 and convert (module docstring). A GPU in the
    machine does not make a CPU measurement (model.device=cpu) faster."""
    from adazeta.models.load import resolve_device

    return dtype != "float32" and resolve_device(device_name).type == "cpu"


def plan(overrides: list[str], fit: tuple[int, ...] = (1, 2), check: tuple[int, ...] = (), seq_len: int | None = None,
         q: int = 1, steps: int | None = None, check_dtype: tuple[int, ...] = (), threads: int | None = None,
         jobs: int = 1, target_device: str = "auto", log=print) -> Plan:
    """Measure the architecture of `overrides` at the `fit` and `check` depths (`jobs` processes
    at a time) and fit the line. `target_device` (auto, cpu, cuda): the device the prediction is
    for; auto takes model.device's type, and CUDA for model.device=auto."""
    from adazeta.config import Optimizer
    from adazeta.engine.build import check_config
    from adazeta.errors import ConfigError
    from adazeta.validate import validate

    if len(set(fit)) < 2 or min(fit) < 1:
        raise ConfigError(f"--fit {','.join(map(str, fit))}: the line needs two or more different depths >= 1, e.g. --fit 1,2")

    cfg = compose_config(overrides)
    validate(cfg)
    check_config(cfg)  # what the method's step does not support, before any measurement starts
    target_device = target_device_of(target_device, str(cfg.model.device))
    arch = architecture(cfg.model)
    key, depth = layer_key(arch), int(arch[layer_key(arch)])
    extra = [*overrides, "model.init=random"]  # never the weights: the architecture only
    if cfg.model.tokenizer is None:
        extra.append(f"model.tokenizer={own_tokenizer(cfg.model, log)}")
    cfg = compose_config(extra)
    target = str(cfg.model.dtype)
    measured = "float32" if native_is_slow(cfg.model.device, target) else target
    steps = steps or (2 if cfg.method.optimizer == Optimizer.fo else 1)  # Adam's moments appear at step 1
    batch, batch_desc, _ = plan_batch(cfg, arch, seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        import torch

        batch_path = str(Path(tmp) / "batch.pt")
        torch.save(batch, batch_path)

        def spec(layers: int, dtype: str) -> dict:
            return {"overrides": extra, "arch": {**arch, key: layers}, "dtype": dtype, "batch": batch_path,
                    "q": q, "steps": steps, "layers": layers, "threads": threads, "target_dtype": target}

        def timed_measure(layers: int, dtype: str) -> Measurement:
            t0 = time.perf_counter()
            m = measure(spec(layers, dtype))
            log(f"  {cfg.method.name}: {layers} layer(s) measured in {dtype} in {time.perf_counter() - t0:.0f} s: "
                f"peak {m.peak_gib:.3f} GiB")
            return m

        depths = sorted(set(fit) | set(check))
        with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:  # each measurement is its own process
            results = list(pool.map(lambda n: timed_measure(n, measured), depths))
        natives = []
        if check_dtype and measured != target:
            natives = [timed_measure(n, target) for n in sorted(set(check_dtype))]
    fitted = [m for m in results if m.layers in fit]
    conv = [m.converted(target) for m in fitted]
    a, b = fit_line([m.layers for m in fitted], [c[0] for c in conv])
    a_inf, b_inf = fit_line([m.layers for m in fitted], [c[1] for c in conv])
    by_depth = {m.layers: m for m in results}
    dtype_checks = [(n.layers, by_depth[n.layers].converted(target)[0] if n.layers in by_depth else a + b * n.layers,
                     n.peak_gib) for n in natives]
    deepest = max(fitted, key=lambda m: m.layers)
    # Measured on CUDA: the buffers are in the measurement, and the allocator's reserved peak is known.
    terms = deepest.cuda_terms if target_device == "cuda" else []
    reserved = None
    if all(m.reserved_gib is not None for m in fitted):
        reserved = fit_line([m.layers for m in fitted], [m.reserved_gib for m in fitted])
    return Plan(model=cfg.model.name, method=cfg.method.name, depth=depth, dtype=target, measured_dtype=measured,
                device=str(cfg.model.device), batch=batch_desc, fit_layers=sorted(fit), measurements=results,
                a=a, b=b, a_inf=a_inf, b_inf=b_inf, dtype_checks=dtype_checks, target_device=target_device,
                cuda_terms=terms, reserved=reserved)


TARGET_DEVICES = ("auto", "cpu", "cuda")


def target_device_of(target: str, model_device: str) -> str:
    """cpu or cuda: `target` (--target-device), or for auto the type of model.device, and CUDA for
    model.device=auto (a plan sizes a run before it starts, and auto runs on CUDA wherever there is
    a GPU)."""
    from adazeta.errors import ConfigError

    if target not in TARGET_DEVICES:
        raise ConfigError(f"--target-device {target!r} is not a device type; choose one of {', '.join(TARGET_DEVICES)}")
    if target == "auto":
        target = "cuda" if model_device == "auto" else model_device.split(":")[0]
    if target not in ("cpu", "cuda"):
        raise ConfigError(f"model.device={model_device!r}: the planner predicts for cpu or cuda; "
                          "give --target-device cpu or cuda")
    if target == "cpu" and model_device.startswith("cuda"):
        raise ConfigError(f"--target-device cpu with model.device={model_device!r}: the measurement would run on "
                          "CUDA; set model.device=cpu to plan a CPU run")
    return target
