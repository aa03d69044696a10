"""Every method measured side by side in one run: step time over bare forwards, peak memory over
inference, how step time scales, parallel against sequential queries, and the memory planner's
check on a real model. Prints markdown tables, the machine on top.

    adazeta-bench                                        # MiniLM, every table
    adazeta-bench --model smollm2-135m --tables speed,memory --qs 1,4
    adazeta-bench --model tiny-llama --quick             # seconds: a smoke test
    adazeta-bench --tables parallel --parallel-batches 1,4,16,32,64
    make bench                                           # MiniLM, then SmolLM2-135M

Tables (`--tables`, comma-separated; default: all of them):
- speed: per method and Q, the median time of one step over the median time of the 2Q bare
  forward passes of the same model object (adapters, LoRA or hooks in place) on the same batch,
  timed alternately so that load drifts hit both. A ZO step can never beat its 2Q forwards; the
  ratio is what the method adds. `z draws / step` counts the normal values a step draws over the
  trainable size, and `z floor s` is the time spent drawing them (every `normal_` of the last timed
  step counted and timed, per thread): what a seed-trick step spends besides forwards, at least.
  fzoo's bare passes are its method.fzoo.n x Q + 1 forwards; its Rademacher signs (random_) and lozo's
  low-rank U, V (randn) are not `normal_` calls, so their z columns read 0.
  First-order rows (ft, lora_fo) compare one forward+backward+AdamW step with one forward.
- memory: per method, in fresh processes: (1) the real entrypoint, `adazeta-train`, on a batch
  of exactly batch x seq-len tokens, its summary.json's training peak over inference peak (CPU:
  the process's resident set, Python and libraries included); (2) the same step measured as the
  planner does (adazeta/engine/plan/measure.py): peaks above the resident set before the model was built.
- scaling: step time of adazeta and mezo against batch size, sequence length, Q and model size
  (random-weight Llama architectures of growing width and depth).
- parallel: `zo.parallel_queries=true` (batched replicas, adazeta/zo/parallel.py) against sequential
  queries, Q = 8, at several batch sizes: where batching the 2Q forwards pays, and where it stops.
  `bare tokens/s` is the forward throughput at each batch's size; `ceiling` is the sequential step
  over 2Q x rows x tokens at the table's best throughput: the most any batching could gain.
- planner: `adazeta-plan` on this model: fitted on 1 and 2 layers, checked at deeper sizes up to
  the full depth (a real-size run).
- peer: our MeZO step against the reference MeZO step's algorithm as published (Malladi et al.,
  princeton-nlp/MeZO `zo_perturb_parameters` / `zo_step` / `zo_update`), re-implemented here:
  `torch.manual_seed(seed)` then one `torch.normal` tensor per parameter, a new tensor per
  perturbation (`p.data = p.data + scale * eps * z`), four passes over the weights (+eps, -2eps,
  +eps, update). Same model object, same batch, timed alternately with ours and with the 2 bare
  forwards; `ours / reference` below 1 means our step is faster.

CPU timings here are fp32: an AVX2 CPU runs bf16 matmuls at a few GFLOP/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from adazeta.cli import plan as planner  # noqa: E402
from adazeta.config import Optimizer, compose_config, method_presets  # noqa: E402
from adazeta.engine.build import build_run  # noqa: E402
from adazeta.engine.plan import arch as plan_arch  # noqa: E402
from adazeta.engine.plan import measure as plan_measure  # noqa: E402
from adazeta.objectives import Objective  # noqa: E402
from adazeta.tasks import Example  # noqa: E402

TABLES = ["speed", "memory", "scaling", "parallel", "planner", "peer"]
# Random-weight Llama architectures for the model-size axis: (hidden, layers).
SIZES = [(256, 4), (512, 4), (1024, 4), (512, 2), (512, 8)]
WORDS = "a quietly moving film with a fine cast and a story that holds"


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        ram = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal")) / 1024**2
    except (OSError, StopIteration):
        ram = float("nan")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"machine: {cpu}, {os.cpu_count()} cores ({isa}), {ram:.1f} GiB RAM, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), float32; load average {load_average()} at start; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# -- one model, one method, one batch --------------------------------------------------------------------
@dataclass
class Bench:
    method: str
    cfg: object
    model: torch.nn.Module
    step: object
    trainable: int
    objective: Objective
    task: object
    device: torch.device
    params: list  # (name, parameter, decays) of every trainable tensor, in the step's order
    batch: dict | None = None
    loss: object = None
    steps_taken: int = 0

    def with_batch(self, batch_size: int, seq_len: int) -> Bench:
        self.objective.max_length = seq_len
        # Sentences longer than seq_len tokens: every row is cut to the same length.
        text = " ".join([WORDS] * (seq_len // 8 + 4))
        labels = max(self.task.num_labels, 1)
        examples = [Example(fields={f: text for f in self.task.text_fields}, label=i % labels)
                    for i in range(batch_size)]
        self.batch = {k: v.to(self.device) for k, v in self.objective.encode(examples, train=True).items()}
        self.loss = self.objective.batch_loss(self.model, self.batch)  # replicable: parallel queries
        return self

    @property
    def shape(self) -> str:
        rows, tokens = self.batch["input_ids"].shape
        return f"{rows} x {tokens}"

    def forwards(self, n: int) -> None:
        with torch.no_grad():
            for _ in range(n):
                self.objective.forward(self.model, self.batch)

    def run_step(self, q: int) -> None:
        self.steps_taken += 1
        self.step(self.loss, self.steps_taken, q)

    def tokens_per_forward(self, q: int) -> int:
        """Run a step and return the most tokens one forward of the model took in it: a step of
        parallel queries stacks replicas of the batch into each forward (adazeta/zo/parallel.py)."""
        seen = []

        def hook(module, args, kwargs):
            seen.append(kwargs["input_ids"].numel() if "input_ids" in kwargs else args[0].numel())

        handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.run_step(q)
        finally:
            handle.remove()
        return max(seen)

    @property
    def zo(self) -> bool:
        return self.cfg.method.optimizer == Optimizer.zo

    def passes(self, q: int) -> int:
        """Forward passes of one ZO step with Q queries: 2Q, method.fzoo.n x Q + 1 for FZOO, 2Q + 1 for HiZOO."""
        m = self.cfg.method
        if m.estimator.value == "fzoo":
            return m.fzoo.n * q + 1
        return 2 * q + 1 if m.estimator.value == "hizoo" else 2 * q


def setup(model: str, method: str, overrides: list[str]) -> Bench:
    """`method` on `model`, built as adazeta-train builds it (adazeta/engine/build.py); `overrides` are
    Hydra overrides (`zo.*` ones included)."""
    cfg = compose_config([f"method={method}", f"model={model}", *overrides])
    run = build_run(cfg)
    m = run.method
    return Bench(method, cfg, m.model, m.step, run.trainable_params, run.objective, run.task, run.device,
                 [(t.name, t.param, t.decay) for t in m.trainables])


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fns: dict[str, callable], repeats: int, counted: str | None = None, counter=None) -> dict[str, float]:
    """Median seconds of each function, called alternately `repeats` times. The last call of
    fns[counted] runs inside `counter` (no extra step just to count)."""
    times = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            ctx = counter if (k == counted and i == repeats - 1) else contextlib.nullcontext()
            with ctx:
                t0 = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def repeats_for(q: int, repeats: int) -> int:
    """Fewer repeats for larger Q: one repeat of Q = 16 is already 32 forwards."""
    return max(1, math.ceil(repeats / q))


class NormalCounter:
    """Counts and times every `Tensor.normal_` while active, from whichever thread draws, so that
    the z draws of a step are counted however the estimator organises its passes. Its own cost is
    about a microsecond per call (one call per 16k-value chunk of a large tensor)."""

    def __init__(self):
        self.values, self.seconds, self.threads = 0, 0.0, set()
        self.lock = threading.Lock()

    def __enter__(self):
        self.had_own = "normal_" in torch.Tensor.__dict__
        original = self.original = torch.Tensor.normal_

        def counting(tensor, *args, **kwargs):
            t0 = time.perf_counter()
            out = original(tensor, *args, **kwargs)
            dt = time.perf_counter() - t0
            with self.lock:
                self.values += tensor.numel()
                self.seconds += dt
                self.threads.add(threading.get_ident())
            return out

        torch.Tensor.normal_ = counting
        return self

    def __exit__(self, *exc):
        if self.had_own:
            torch.Tensor.normal_ = self.original
        else:
            del torch.Tensor.normal_

    def floor(self, trainable: int) -> tuple[float, float]:
        """(z draws per step: normal values / trainable values, seconds of drawing them: time
        inside normal_ summed over threads, divided by the number of threads that drew)."""
        return self.values / trainable, self.seconds / max(len(self.threads), 1)


# -- tables --------------------------------------------------------------------------------------------------
def speed_table(args) -> str:
    rows = ["| method | Q | batch (rows x tokens) | trainable | bare forwards s | step s | step / bare "
            "| z draws / step | z floor s | (bare + z floor) / bare |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in args.methods:
        b = setup(args.model, method, args.overrides).with_batch(args.batch_size, args.seq_len)
        b.forwards(1)  # warm-up: allocator, lazy buffers, thread pools
        b.run_step(1)
        if not b.zo:
            t = timed({"bare": lambda b=b: b.forwards(1), "step": lambda b=b: b.run_step(1)}, args.repeats)
            rows.append(f"| {method} | 1 fwd+bwd | {b.shape} | {b.trainable:,} | {t['bare']:.3f} | {t['step']:.3f} "
                        f"| {t['step'] / t['bare']:.2f} | | | |")
            print(f"  speed: {method} done", file=sys.stderr, flush=True)
            continue
        for q in args.qs:
            counter = NormalCounter()
            t = timed({"bare": lambda b=b, q=q: b.forwards(b.passes(q)), "step": lambda b=b, q=q: b.run_step(q)},
                      repeats_for(q, args.repeats), counted="step", counter=counter)
            z = counter.floor(b.trainable)
            zcols = f"{z[0]:.1f} | {z[1]:.3f} | {(t['bare'] + z[1]) / t['bare']:.2f}" if z else "n/a | n/a | n/a"
            rows.append(f"| {method} | {q} | {b.shape} | {b.trainable:,} | {t['bare']:.3f} | {t['step']:.3f} "
                        f"| {t['step'] / t['bare']:.2f} | {zcols} |")
            args.speed_rows[(method, q)] = t
        print(f"  speed: {method} done", file=sys.stderr, flush=True)
    return "\n".join(rows)


def write_data(folder: Path, n: int, seq_len: int) -> None:
    """A GLUE-format SST-2 folder whose every sentence is longer than seq_len tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    text = " ".join([WORDS] * (seq_len // 8 + 4))
    for name in ("train.tsv", "dev.tsv"):
        lines = ["sentence\tlabel"] + [f"{text}\t{i % 2}" for i in range(n)]
        (folder / name).write_text("\n".join(lines) + "\n")


def trainer_run(method: str, args, tmp: Path) -> dict:
    """`python -m adazeta.cli.train` on exactly batch x seq-len tokens; its summary.json."""
    run_dir = tmp / f"run_{method}"
    overrides = [
        f"method={method}", f"model={args.model}", f"train.max_steps={args.mem_steps}",
        f"train.batch_size={args.batch_size}", f"train.eval_batch_size={args.batch_size}",
        f"train.eval_steps={10**9}", "train.eval_on_test=false", "train.progress=false",
        "schedule=constant", "schedule.q=1", f"task.data_dir={tmp / 'data'}", "task.builtin=false",
        f"task.num_train={args.batch_size * max(args.mem_steps, 4)}", f"task.num_dev={args.batch_size}",
        f"task.num_test={args.batch_size}", f"model.max_length={args.seq_len}", f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]
    proc = subprocess.run([sys.executable, "-m", "adazeta.cli.train", *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"adazeta-train {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def net_run(method: str, args, batch_path: str) -> plan_measure.Measurement:
    """The planner's measurement of the real model: peaks above the pre-model resident set."""
    spec = {"overrides": [f"method={method}", f"model={args.model}", *args.overrides], "arch": None,
            "dtype": None, "batch": batch_path, "q": 1, "steps": 2, "warmup": True}
    return plan_measure.measure(spec)


def memory_table(args) -> str:
    b = setup(args.model, args.methods[0], args.overrides).with_batch(args.batch_size, args.seq_len)
    shape = b.shape
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_data(tmp / "data", args.batch_size * max(args.mem_steps, 4), args.seq_len)
        batch_path = str(tmp / "batch.pt")
        torch.save({k: v.cpu() for k, v in b.batch.items()}, batch_path)
        del b
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job is its own process
            jobs = {m: (pool.submit(trainer_run, m, args, tmp), pool.submit(net_run, m, args, batch_path))
                    for m in args.methods}
            results = {m: (t.result(), n.result()) for m, (t, n) in jobs.items()}
    rows = [f"batch {shape} tokens, {args.mem_steps} trainer steps, Q = 1",
            "",
            "| method | trainable | trainer: inference GiB | trainer: peak GiB | trainer: peak / inference "
            "| net: weights GiB | net: inference GiB | net: peak GiB | net: peak / inference |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, (s, n) in results.items():
        rows.append(f"| {m} | {s['trainable_params']:,} | {s['mem/inference_gib']:.3f} | {s['mem/peak_gib']:.3f} "
                    f"| {s['mem/peak_over_inference']:.3f} | {n.weights_gib:.3f} | {n.inference_gib:.3f} "
                    f"| {n.peak_gib:.3f} | {n.peak_gib / n.inference_gib:.3f} |")
    return "\n".join(rows)


def scaling_table(args) -> str:
    rows = ["| method | axis | batch (rows x tokens) | Q | bare forwards s | step s | step / bare | step s per query |",
            "|---|---|---|---:|---:|---:|---:|---:|"]

    def add(b: Bench, axis: str, q: int = 1) -> None:
        b.forwards(1)
        t = timed({"bare": lambda: b.forwards(2 * q), "step": lambda: b.run_step(q)}, repeats_for(q, args.repeats))
        rows.append(f"| {b.method} | {axis} | {b.shape} | {q} | {t['bare']:.3f} | {t['step']:.3f} "
                    f"| {t['step'] / t['bare']:.2f} | {t['step'] / q:.3f} |")

    for method in args.scaling_methods:
        b = setup(args.model, method, args.overrides)
        b.with_batch(args.batch_size, args.seq_len).run_step(1)  # warm-up
        for bs in args.scaling_batches:
            add(b.with_batch(bs, args.seq_len), "batch size")
        for sl in args.scaling_lengths:
            add(b.with_batch(args.batch_size, sl), "sequence length")
        b.with_batch(args.batch_size, args.seq_len)
        for q in args.qs:
            if (method, q) in args.speed_rows:  # measured by the speed table already
                t = args.speed_rows[(method, q)]
                rows.append(f"| {method} | Q (speed table) | {b.shape} | {q} | {t['bare']:.3f} | {t['step']:.3f} "
                            f"| {t['step'] / t['bare']:.2f} | {t['step'] / q:.3f} |")
            else:
                add(b, "Q", q)
        print(f"  scaling: {method} on {args.model} done", file=sys.stderr, flush=True)
        del b
    rows += ["", "model size: random-weight Llama (hidden, layers), intermediate 2.6875 x hidden, 64-dim heads",
             "", "| method | hidden x layers | params | batch (rows x tokens) | bare forwards s | step s | step / bare |",
             "|---|---|---:|---|---:|---:|---:|"]
    for method in args.scaling_methods:
        for hidden, layers in args.sizes:
            arch = [f"model.arch.hidden_size={hidden}", f"model.arch.intermediate_size={int(hidden * 2.6875)}",
                    f"model.arch.num_hidden_layers={layers}", f"model.arch.num_attention_heads={max(hidden // 64, 1)}",
                    f"model.arch.num_key_value_heads={max(hidden // 64, 1)}", "model.device=auto"]
            b = setup("tiny-llama", method, arch).with_batch(args.batch_size, args.seq_len)
            params = sum(p.numel() for p in b.model.parameters())
            b.forwards(1)
            b.run_step(1)
            t = timed({"bare": lambda b=b: b.forwards(2), "step": lambda b=b: b.run_step(1)}, args.repeats)
            rows.append(f"| {method} | {hidden} x {layers} | {params / 1e6:.1f}M | {b.shape} | {t['bare']:.3f} "
                        f"| {t['step']:.3f} | {t['step'] / t['bare']:.2f} |")
            del b
        print(f"  scaling: {method} model sizes done", file=sys.stderr, flush=True)
    return "\n".join(rows)


def parallel_rows(measured: list[tuple[str, int, int, dict[str, float]]], q: int) -> list[list[str]]:
    """The parallel table's cells from its timings: `measured` holds (shape, tokens per row batch,
    tokens per parallel forward, {"bare", "seq", "par"} seconds) per batch size. The ceiling is the
    sequential step over 2Q x tokens at the best bare throughput of the table."""
    best = max(2 * q * tokens / t["bare"] for _, tokens, _, t in measured)
    return [[shape, f"{tokens} / {per_chunk}", f"{t['bare']:.3f}", f"{2 * q * tokens / t['bare']:,.0f}",
             f"{t['seq']:.3f}", f"{t['par']:.3f}", f"{t['seq'] / t['par']:.2f}",
             f"{t['seq'] * best / (2 * q * tokens):.2f}", f"{t['par'] / t['bare']:.2f}"]
            for shape, tokens, per_chunk, t in measured]


def parallel_table(args) -> str:
    """Sequential against batched queries, and why batching stops paying: the bare forwards at each
    batch give this CPU's forward throughput against tokens per forward; the best of them bounds
    any batched step from below (2Q x rows x tokens at the best rate), hence the speed-up ceiling."""
    q = args.parallel_q
    rows = [f"Q = {q} on {args.parallel_model}, {args.parallel_seq_len} tokens per row; replicas per forward: "
            "all 2Q, or as many as fit (zo.max_replicas=null)",
            "", "| method | batch (rows x tokens) | tokens per forward: seq / par | bare 2Q forwards s "
            "| bare tokens/s | sequential step s | parallel step s | speed-up | ceiling | parallel / bare |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in args.parallel_methods:
        seq = setup(args.parallel_model, method, [*args.overrides, "zo.parallel_queries=false"])
        par = setup(args.parallel_model, method, [*args.overrides, "zo.parallel_queries=true"])
        measured = []
        for bs in args.parallel_batches:
            seq.with_batch(bs, args.parallel_seq_len)
            par.with_batch(bs, args.parallel_seq_len)
            seq.run_step(1)  # warm-up, and the replicated batch of the parallel path
            per_chunk = par.tokens_per_forward(q)
            t = timed({"bare": lambda s=seq: s.forwards(2 * q), "seq": lambda s=seq: s.run_step(q),
                       "par": lambda p=par: p.run_step(q)}, max(args.repeats - 1, 1))
            tokens = seq.batch["input_ids"].numel()
            measured.append((seq.shape, tokens, per_chunk, t))
        rows += [f"| {method} | " + " | ".join(cells) + " |" for cells in parallel_rows(measured, q)]
        print(f"  parallel: {method} done", file=sys.stderr, flush=True)
    rows += ["", "ceiling: the sequential step time over 2Q x rows x tokens at the best bare throughput of the "
             "table, the most any batching of the same forwards could gain."]
    return "\n".join(rows)


def planner_table(args) -> str:
    cfg = compose_config([f"model={args.model}"])
    arch = plan_arch.architecture(cfg.model)
    depth = int(arch[plan_arch.layer_key(arch)])
    check = sorted({d for d in (4, depth // 4, depth) if 2 < d <= depth})
    p = planner.plan([f"model={args.model}", "method=adazeta", f"train.batch_size={args.batch_size}", *args.overrides],
                     fit=(1, 2), check=tuple(check), seq_len=args.seq_len,
                     # checked against runs on this machine: predict for its device
                     target_device="cuda" if torch.cuda.is_available() else "cpu",
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    return planner.report(p)


@torch.no_grad()
def reference_mezo_step(params: list, loss_fn, seed: int, lr: float, eps: float, weight_decay: float) -> float:
    """One step of the reference MeZO algorithm as published (see the module docstring: `peer`),
    on `params` [(name, parameter, decays)]; returns the projected gradient. Our own code of their
    algorithm: every perturbation re-seeds the global generator and draws a fresh `torch.normal`
    tensor per parameter, and the update draws them once more."""

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for _, p, _ in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * z * eps

    perturb(1)
    loss_plus = loss_fn()
    perturb(-2)
    loss_minus = loss_fn()
    perturb(1)
    grad = float((loss_plus - loss_minus) / (2 * eps))
    torch.manual_seed(seed)
    for _, p, decays in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data - lr * (grad * z + (weight_decay * p.data if decays else 0))
    return grad


def peer_table(args) -> str:
    rows = ["| model | batch (rows x tokens) | trainable | bare 2 forwards s | ours s | reference s "
            "| ours / reference | ours / bare | reference / bare |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    b = setup(args.model, "mezo", args.overrides).with_batch(args.batch_size, args.seq_len)
    m = b.cfg.method
    seed = iter(range(10**6))
    reference = lambda: reference_mezo_step(b.params, b.loss, next(seed), m.lr, m.eps, m.weight_decay)  # noqa: E731
    b.forwards(1)  # warm-up: allocator, lazy buffers, thread pools
    b.run_step(1)
    reference()
    t = timed({"bare": lambda: b.forwards(2), "ours": lambda: b.run_step(1), "reference": reference}, args.repeats)
    rows.append(f"| {args.model} | {b.shape} | {b.trainable:,} | {t['bare']:.3f} | {t['ours']:.3f} "
                f"| {t['reference']:.3f} | {t['ours'] / t['reference']:.2f} | {t['ours'] / t['bare']:.2f} "
                f"| {t['reference'] / t['bare']:.2f} |")
    return "\n".join(rows)


def csv(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x]


def default_methods() -> list[str]:
    """Every method preset of conf/method/: the ZO ones, then the first-order ones, each in name order."""
    presets = method_presets()
    return [name for optimizer in (Optimizer.zo, Optimizer.fo) for name, m in presets.items() if m.optimizer == optimizer]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="adazeta-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="conf/model/<name>.yaml (minilm, smollm2-135m, tiny-llama, ...)")
    p.add_argument("--tables", default=None, help=f"comma-separated, from {','.join(TABLES)} (default: all)")
    p.add_argument("--methods", default=",".join(default_methods()),
                   help="conf/method/<name>.yaml presets (default: every one, the ZO methods first)")
    p.add_argument("--qs", default="1,4,16", help="queries per step (speed and scaling tables)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (fewer for large Q)")
    p.add_argument("--mem-steps", type=int, default=3, help="training steps of each memory run")
    p.add_argument("--jobs", type=int, default=2, help="memory runs at once (each in its own process)")
    p.add_argument("--scaling-methods", default="adazeta,mezo")
    p.add_argument("--scaling-batches", default="1,4,16,32")
    p.add_argument("--scaling-lengths", default="16,32,64,128")
    p.add_argument("--parallel-model", default=None, help="default: minilm (or --model with --quick)")
    p.add_argument("--parallel-methods", default="adazeta,mezo_lora")
    p.add_argument("--parallel-batches", default="1,4,16,32")
    p.add_argument("--parallel-seq-len", type=int, default=32)
    p.add_argument("--parallel-q", type=int, default=8)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's). On a machine shared with other jobs, 1 thread "
                        "avoids OpenMP teams stalling on a core another process holds")
    p.add_argument("--quick", action="store_true", help="few methods, sizes and repeats: a smoke test")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every model load")
    args = p.parse_args(argv)
    args.methods, args.qs = csv(args.methods), csv(args.qs, int)
    args.scaling_methods, args.parallel_methods = csv(args.scaling_methods), csv(args.parallel_methods)
    args.scaling_batches, args.scaling_lengths = csv(args.scaling_batches, int), csv(args.scaling_lengths, int)
    args.parallel_batches, args.sizes = csv(args.parallel_batches, int), SIZES
    args.parallel_model = args.parallel_model or (args.model if args.quick else "minilm")
    if args.quick:
        args.repeats, args.mem_steps = 1, 1
        args.qs = [q for q in args.qs if q <= 4] or [1]
        args.scaling_batches, args.scaling_lengths = args.scaling_batches[:2], args.scaling_lengths[:2]
        args.sizes, args.parallel_batches = [(128, 2)], args.parallel_batches[:2]
        args.parallel_q = min(args.parallel_q, 2)
    args.tables = csv(args.tables) if args.tables else TABLES
    unknown = sorted(set(args.tables) - set(TABLES))
    if unknown:
        p.error(f"--tables: unknown {unknown}; choose from {','.join(TABLES)}")
    args.speed_rows = {}  # (method, Q) -> timings, reused by the scaling table
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The synthetic rows are cut to --seq-len on purpose: no truncation warning per batch; and the
    # task's own split (which build_run loads) is not what the tables time.
    logging.getLogger("adazeta.objectives").setLevel(logging.ERROR)
    logging.getLogger("adazeta.tasks").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar among the tables
    print(machine_line(), flush=True)
    print(f"command: adazeta-bench {' '.join(sys.argv[1:] if argv is None else argv)}\n", flush=True)
    builders = {"speed": speed_table, "memory": memory_table, "scaling": scaling_table,
                "parallel": parallel_table, "planner": planner_table, "peer": peer_table}
    titles = {"speed": f"Step time over bare forwards: {args.model}",
              "memory": f"Peak memory over inference: {args.model}",
              "scaling": f"Step time scaling: {args.model}",
              "parallel": "Parallel against sequential queries",
              "planner": f"Memory planner checked on {args.model}",
              "peer": f"Our MeZO step against the reference MeZO algorithm: {args.model}"}
    t_start = time.perf_counter()
    for name in args.tables:
        t0 = time.perf_counter()
        body = builders[name](args)
        print(f"### {titles[name]}\n\n{body}\n\n({name}: {time.perf_counter() - t0:.0f} s, "
              f"load average {load_average()})\n", flush=True)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
