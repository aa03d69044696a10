"""`adazeta-plan`: the peak memory of a training run, predicted before the weights are downloaded.

    adazeta-plan model=llama2-7b method=adazeta train.batch_size=16 \
        task.data_dir=../shared/data/sst2 model.tokenizer=packaged:smollm2-135m
    adazeta-plan --methods adazeta,mezo,ft model=llama2-7b task.data_dir=../shared/data/sst2
    adazeta-plan --fit 1,2 --check 8,30 model=smollm2-135m     # check against a full-depth run
    make plan

Why a line: the peak of a step grows linearly with depth. Every layer adds the same weights (and,
for first-order methods, the same gradients, optimizer moments and saved activations), while the
embeddings, the LM head and the largest transient of a no-grad forward (one layer's activations,
the kept logits) are paid once. So the planner builds the architecture with random weights
(`model.init=random`: no download) at full width but with only a few layers (`--fit`, 1 and 2 by
default), measures the peak memory of a training step of each in a fresh process, fits
peak = a + b x layers and reads the line at the model's full depth. `--check` measures more depths
and reports the line's error there: run it with the largest depths that fit your machine.

Memory is measured as the trainer measures it (adazeta/engine/memory.py): torch.cuda.max_memory_allocated
on CUDA; on CPU the peak resident set (VmHWM), minus the resident set just before the model is
built, so that the Python runtime and libraries do not count. Two things make the CPU figure
follow the live tensors, as a GPU allocator's counter does: every weight is read once after
loading (memory-mapped checkpoint pages are resident only once read), and each measurement runs
with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_`), so that freed tensors go back to the
system instead of staying in the heap. The batch is the longest one the run
can draw: the `train.batch_size` longest examples of the task's training sample, encoded with the
model's tokenizer (`--seq-len N` uses N synthetic tokens per row instead). Token ids are folded
into the model's vocabulary: with random weights only the shapes matter.

A CUDA target measured on a CPU: some buffers exist on CUDA only, because the CPU paths that avoid
them need `normal_` drawn chunk by chunk to equal one draw over the tensor, which holds for torch's
CPU kernels only (adazeta/zo/spsa.py `chunks_exact`). On CUDA every pass over the weights draws each
tensor's z whole into one scratch buffer (the largest trainable tensor of each dtype: 250 MiB for
Llama-2-7B's bf16 embedding), masked passes keep two bools per value of that tensor, and
Sparse-MeZO's in-forward perturbation copies each module's weights whole with two bool masks
(adazeta/zo/sparse.py: no module is `blockable`). The measurement reports what the CPU run held of each
buffer; the plan adds the CUDA size minus that (`--target-device`, default: where `model.device`
runs, CUDA for model.device=auto) and prints both. A measurement on CUDA sees these buffers itself,
and also reports the allocator's reserved memory (`torch.cuda.max_memory_reserved`), which a CPU
measurement cannot predict: the caching allocator keeps freed blocks and rounds segments up.

Low precision on a CPU: an AVX2 CPU runs bf16 matmuls at a few GFLOP/s, so a bf16 forward at 7B
width takes minutes. The planner then measures in float32 and converts each measured peak:

    peak(bf16) = kept + (2 / 4) x (peak(fp32) - kept)

where `kept` are the parameters that a bf16 run keeps in float32 (the TT adapters, peft LoRA
weights, a new classification head; adazeta/trainable/tt_adapters.py, adazeta/trainable/lora.py, adazeta/models/load.py).
Everything else is assumed to take the base dtype: base weights, SPSA's z buffer (the dtype of the
tensor it perturbs), gradients and Adam moments of base weights, and activations. RMSNorm and
softmax compute in fp32 internally, but on hidden-size tensors far smaller than the FFN's
activations. `--check-dtype 1,2` also measures the target dtype natively at those depths and reports
the conversion's error there, and the native line's prediction (slow on CPU: minutes per layer at
7B width).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adazeta.config import compose_config  # light: the schemas and Hydra's compose

GIB, GB = 1024**3, 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Keys of a saved Hugging Face config that describe the checkpoint, not the architecture.
NOT_ARCH = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
            "_attn_implementation_autoset", "_commit_hash", "auto_map"}
# Reported peaks to print beside a prediction: (model name, method name) -> text.
REPORTED = {
    ("llama2-7b", "adazeta"): "14 GB (AdaZeta paper, Llama-2-7B, SST-2)",
    ("llama2-7b", "ft"): "about 118 GB (AdaZeta paper, full fine-tuning)",
}
RESULT_TAG = "ADAZETA_PLAN_RESULT "


@dataclass
class CudaTerm:
    """A buffer a CUDA run allocates whose size a CPU measurement does not show (module docstring)."""

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
        """(peak, inference) in GiB as a `dtype` run would have them (module docstring)."""
        r = DTYPE_BYTES[dtype] / DTYPE_BYTES[self.dtype]
        # Inference is measured before the method builds its parameters: all of it scales.
        return self.kept_gib + r * (self.peak_gib - self.kept_gib), r * self.inference_gib


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


# -- configuration -------------------------------------------------------------------------------
def architecture(model_cfg) -> dict:
    """The Hugging Face config keys of the model: `model.arch`, or the config.json of a local or
    packaged checkpoint (the weights are never read)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    from adazeta.config import Init
    from adazeta.errors import ConfigError
    from adazeta.models.load import resolve_path

    if model_cfg.arch and "model_type" in model_cfg.arch:
        return OmegaConf.to_container(model_cfg.arch, resolve=True)
    if model_cfg.init == Init.random:
        raise ConfigError(f"model {model_cfg.name!r} has init=random but no model.arch with a model_type")
    try:
        hf = AutoConfig.from_pretrained(resolve_path(model_cfg.path), trust_remote_code=model_cfg.trust_remote_code)
    except OSError as e:
        raise ConfigError(
            f"cannot read the config of model.path={model_cfg.path!r} ({e}); the planner needs the "
            "architecture only: give model.arch (see conf/model/llama2-7b.yaml) or a folder with config.json"
        ) from e
    # Nested dicts (rope parameters) set no tensor shape, and would reach the strict HF config as
    # OmegaConf nodes through model.arch: left out.
    return {k: v for k, v in hf.to_dict().items() if k not in NOT_ARCH and not isinstance(v, dict)}


def layer_key(arch: dict) -> str:
    for key in LAYER_KEYS:
        if key in arch:
            return key
    raise ValueError(f"no layer count ({' / '.join(LAYER_KEYS)}) in the architecture {sorted(arch)}")


# -- the batch -----------------------------------------------------------------------------------
def plan_batch(cfg, arch: dict, seq_len: int | None):
    """The batch one step sees at its longest, and its description."""
    import torch
    from transformers import AutoConfig

    from adazeta.config import Init
    from adazeta.models.load import load_tokenizer, pick_head, resolve_path
    from adazeta.objectives import Objective
    from adazeta.tasks import Example, build_task

    spec = dict(arch)
    hf = AutoConfig.for_model(spec.pop("model_type"), **spec)
    head = pick_head(hf, cfg.model.head)
    path = resolve_path(cfg.model.path) if cfg.model.init == Init.pretrained else cfg.model.path
    tokenizer = load_tokenizer(cfg.model, path)
    task = build_task(cfg.task)
    bs = cfg.train.batch_size
    if seq_len is None:
        objective = Objective(task, tokenizer, head, cfg.model.max_length)
        train = task.load().train
        lengths = [objective.encode([ex], train=True)["input_ids"].shape[1] for ex in train]
        order = sorted(range(len(train)), key=lambda i: -lengths[i])
        batch = objective.encode([train[i] for i in order[:bs]], train=True)
        median = sorted(lengths)[len(lengths) // 2]
        source = (f"the {bs} longest of {len(train)} {task.name} training examples (median "
                  f"{median} tokens)")
    else:
        objective = Objective(task, tokenizer, head, seq_len)
        words = " ".join(["a quietly moving film with a fine cast and a story that holds"] * (seq_len // 4 + 8))
        examples = [Example(fields={f: words for f in task.text_fields}, label=i % max(task.num_labels, 1))
                    for i in range(bs)]
        batch = objective.encode(examples, train=True)
        source = f"synthetic text cut to model.max_length={seq_len}"
    vocab = getattr(hf, "vocab_size", None)
    for key in ("input_ids", "cand_last", "cand_targets"):  # another tokenizer's ids may exceed the model's vocabulary
        if key in batch and vocab:
            batch[key] = batch[key] % vocab
    rows, tokens = batch["input_ids"].shape
    tok_name = cfg.model.tokenizer or ("packaged:minilm" if cfg.model.init == Init.random else cfg.model.path)
    return batch, f"{rows} x {tokens} tokens: {source}; tokenizer {tok_name}", torch.Size([rows, tokens])


# -- one measurement (in its own process) ----------------------------------------------------------
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
        proc = subprocess.run([sys.executable, "-m", "adazeta.cli.plan", "--child", f.name],
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


# -- the plan ------------------------------------------------------------------------------------------
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


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def report(p: Plan) -> str:
    """The plan as markdown: the measured depths against the line, then the prediction."""
    mdt = p.measured_dtype
    lines = [
        f"### {p.method} on {p.model}: {p.depth} layers, {p.dtype} base"
        + (f" (measured in {mdt}, converted)" if mdt != p.dtype else ""),
        "",
        f"batch {p.batch}",
        "",
        f"| layers | params | trainable | inference GiB ({mdt}) | step peak GiB ({mdt}) | line GiB | error | step s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    a, b = p.line_in_measured_dtype()
    for m in p.measurements:
        err = "fit" if m.layers in p.fit_layers else f"{100 * (a + b * m.layers - m.peak_gib) / m.peak_gib:+.1f}%"
        lines.append(f"| {m.layers} | {human(m.params)} | {human(m.trainable_params)} | {m.inference_gib:.3f} "
                     f"| {m.peak_gib:.3f} | {a + b * m.layers:.3f} | {err} | {m.step_s:.2f} |")
    lines.append(f"| **{p.depth}** | | | | | **{a + b * p.depth:.2f}** | predicted | |")
    lines.append("")
    if p.dtype_checks:
        lines += [f"dtype check: {p.dtype} measured natively against the {mdt} measurement converted",
                  "", f"| layers | {p.dtype} native GiB | converted GiB | error |", "|---:|---:|---:|---:|"]
        lines += [f"| {n} | {native:.3f} | {conv:.3f} | {100 * (conv - native) / native:+.1f}% |"
                  for n, conv, native in p.dtype_checks]
        if len({n for n, _, _ in p.dtype_checks}) >= 2:
            a, b = fit_line([n for n, _, _ in p.dtype_checks], [native for _, _, native in p.dtype_checks])
            lines.append(f"| **{p.depth}** | **{a + b * p.depth:.2f}** (native line) | **{p.peak_gib:.2f}** | "
                         f"{100 * (p.peak_gib - a - b * p.depth) / (a + b * p.depth):+.1f}% |")
        lines.append("")
    if p.cuda_terms:
        lines += [f"CUDA target, measured on {p.device}: buffers only CUDA allocates (adazeta/cli/plan.py docstring)",
                  "", f"| term | allocated by | CUDA GiB ({p.dtype}) | held in the measurement GiB ({mdt}) | added GiB |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {t.name} | {t.source} | {t.cuda_gib:.4f} | {t.cpu_gib:.4f} | {t.added(p.ratio):+.4f} |"
                  for t in p.cuda_terms]
        lines += [f"| **total** | | | | **{p.added_gib:+.4f}** |", ""]
    ref = REPORTED.get((p.model, p.method))
    measured_line = f" (the {mdt} line: {a + b * p.depth:.2f} GiB)" if mdt != p.dtype else ""
    parts = f" = line {p.line_gib:.2f} + CUDA terms {p.added_gib:.2f}" if p.cuda_terms else ""
    if p.reserved_gib is not None:
        kind = f"allocated; reserved by the CUDA allocator {p.reserved_gib:.2f} GiB"
    elif p.target_device == "cuda":
        kind = "allocated; the CUDA allocator reserves more: measure on a GPU for that"
    else:
        kind = "resident set"
    lines.append(f"**Predicted peak of {p.method} on {p.model} ({p.dtype}, {p.target_device}): {p.peak_gib:.2f} GiB "
                 f"({p.peak_gib * GIB / GB:.1f} GB)**{parts} ({kind}){measured_line}; inference {p.inference_gib:.2f} "
                 f"GiB, ratio {p.peak_gib / p.inference_gib:.2f}" + (f"; reported: {ref}" if ref else ""))
    return "\n".join(lines)


def summary_table(plans: list[Plan]) -> str:
    rows = ["| method | dtype | device | predicted peak GiB | of which CUDA terms | GB | inference GiB | peak / inference "
            "| worst check error | reported |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in plans:
        errs = [abs(e) for _, _, e in p.checks()]
        worst = f"{100 * max(errs):.1f}%" if errs else "not checked"
        terms = f"{p.added_gib:.2f}" if p.cuda_terms else ""
        rows.append(f"| {p.method} | {p.dtype} | {p.target_device} | {p.peak_gib:.2f} | {terms} | {p.peak_gib * GIB / GB:.1f} "
                    f"| {p.inference_gib:.2f} "
                    f"| {p.peak_gib / p.inference_gib:.2f} | {worst} | {REPORTED.get((p.model, p.method), '')} |")
    return "\n".join(rows)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def depths(text: str) -> str:
    """argparse type of --fit/--check/--check-dtype: comma-separated layer counts >= 1 (or empty)."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    if not all(x.isdigit() and int(x) >= 1 for x in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of layer counts >= 1, e.g. 1,2")
    return ",".join(parts)


def positive(text: str) -> int:
    """argparse type of --q/--steps/--seq-len/--threads: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="adazeta-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", type=depths, default="1,2", help="depths the line is fitted on (default 1,2)")
    p.add_argument("--check", type=depths, default="", help="further depths to measure and compare with the line")
    p.add_argument("--methods", default="", help="comma-separated methods (default: the config's method=)")
    p.add_argument("--seq-len", type=positive, default=None, help="synthetic rows of N tokens (default: the task's longest batch)")
    p.add_argument("--q", type=positive, default=1, help="queries per ZO step")
    p.add_argument("--steps", type=positive, default=None, help="training steps measured (default 1 for ZO, 2 for first order)")
    p.add_argument("--check-dtype", type=depths, default="", help="depths to measure natively in the target dtype too "
                   "(e.g. 1,2; slow on CPU), against the converted float32 measurement")
    p.add_argument("--threads", type=positive, default=None, help="torch threads in each measurement")
    p.add_argument("--target-device", choices=TARGET_DEVICES, default="auto",
                   help="the device the prediction is for (default auto: model.device's type; cuda for "
                   "model.device=auto); a cuda target measured on a CPU adds the buffers only CUDA allocates")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for adazeta-train")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.child:
        result = measure_here(json.loads(Path(args.child).read_text()))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from adazeta.errors import AdazetaError

    methods = [m for m in args.methods.split(",") if m] or [None]
    plans = []
    try:
        for method in methods:
            overrides = list(args.overrides) + ([f"method={method}"] if method else [])
            plans.append(plan(overrides, fit=ints(args.fit), check=ints(args.check), seq_len=args.seq_len,
                              q=args.q, steps=args.steps, check_dtype=ints(args.check_dtype), threads=args.threads,
                              target_device=args.target_device, log=lambda s: print(s, file=sys.stderr, flush=True)))
            print(report(plans[-1]) + "\n", flush=True)
    except (AdazetaError, HydraException, OmegaConfBaseException) as e:  # a bad override: its message, no traceback
        sys.exit(f"error: {e}")
    if len(plans) > 1:
        print(summary_table(plans))


if __name__ == "__main__":
    main()
