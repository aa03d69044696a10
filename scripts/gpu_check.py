"""`make gpu-check`: what a GPU changes, checked in one short script (minutes on one GPU).

    python scripts/gpu_check.py                          # on a CUDA machine
    python scripts/gpu_check.py --dry-run                # on CPU at tiny width: tests the script itself
    python scripts/gpu_check.py --out outputs/gpu-check/h200 --methods adazeta,mezo --checks step,replay
    make gpu-check                                       # ARGS="--dry-run" etc.

On a Llama built from config with random weights, at TinyLlama-1.1B's width (hidden 2048,
intermediate 5632, 32 heads, 4 KV heads, 32000 tokens) with 4 layers and a bf16 base, every check
runs the real entrypoints as subprocesses (`python -m adazeta.cli.train`, `adazeta.cli.plan`,
`adazeta.cli.replay`, `torch.distributed.run`):
- step: two training steps of each method (adazeta, mezo, mezo_lora, sparse_mezo, lora_fo, ft) on
  the whole 16-example training sample as one batch, and the CUDA peak of those steps (allocated
  and reserved, metrics.jsonl at step 2: two steps, so that Adam's moments and the buffers a ZO
  step keeps count) against `adazeta-plan --target-device cuda` measured on this machine's CPU, the
  path of a user who plans before renting a GPU (same examples, same overrides). Within 10% (the
  planner's goal) is ok.
- replay: `adazeta-replay` of each ZO run rebuilds its trainable parameters bit for bit.
- parallel: AdaZeta at Q = 8 with zo.parallel_queries=true against false: the third step's time
  (the first ones warm up), and how far the first step's projected gradients differ.
- torchrun: two ranks with NCCL (dist.mode=query, Q = 4) end with equal checksums and no resync;
  skipped, with the reason, when fewer than two GPUs are visible.
It ends with one table (also in <out>/table.md); it exits 1 if a check failed.

Without CUDA, or with --dry-run, the same steps run on CPU at conf/model/tiny-llama.yaml's width
(hidden 64, 2 layers), one thread each, and torchrun uses gloo: the numbers test the script, not a
GPU, and memory is not compared (a CPU run's peak is the process's resident set, Python included).

Everything is written under --out (default outputs/gpu-check/<timestamp>): run folders, each
command's log in logs/, the planner's report in plan.md, the table. The subprocesses run in that
folder, with TMPDIR inside it, and import adazeta from this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["adazeta", "mezo", "mezo_lora", "sparse_mezo", "lora_fo", "ft"]
ZO_METHODS = {"adazeta", "mezo", "mezo_lora", "sparse_mezo"}
CHECKS = ["step", "replay", "parallel", "torchrun"]
# TinyLlama-1.1B's width, 4 layers: about 340M parameters, 0.7 GB in bf16.
GPU_ARCH = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
            "vocab_size": 32000, "max_position_embeddings": 2048, "num_hidden_layers": 4}
DRY_ARCH = {"num_hidden_layers": 2}  # conf/model/tiny-llama.yaml otherwise
TOLERANCE = 0.10  # the planner's goal (docs/benchmarks.md)
# One batch of the whole training sample, so that the step sees the batch the planner plans for
# (the train.batch_size longest examples); the last step is always evaluated and checkpointed.
RUN = ["task=sst2", "task.num_train=16", "task.num_dev=16", "task.num_test=16", "train.batch_size=16",
       "train.eval_batch_size=16", "train.max_steps=2", "train.eval_steps=2", "train.log_steps=1",
       "train.eval_at_start=false", "train.eval_on_test=false", "train.progress=false", "model.max_length=128"]


@dataclass
class Row:
    check: str
    method: str
    measured: str
    expected: str
    result: str
    ok: bool | None  # None: not a pass/fail (skipped, or information only)


@dataclass
class Setting:
    """Where the checks run and at what size."""

    device: str  # cuda or cpu
    dry: bool
    gpus: int

    @property
    def arch(self) -> dict:
        return DRY_ARCH if self.dry else GPU_ARCH

    def model(self, device: str | None = None) -> list[str]:
        overrides = ["model=tiny-llama", *(f"model.arch.{k}={v}" for k, v in self.arch.items()),
                     "model.dtype=bfloat16", f"model.device={device or self.device}"]
        return overrides + (["train.threads=1"] if self.dry else [])


class Runner:
    """Runs `python <args>` in the output folder and keeps its output in logs/<name>.log."""

    def __init__(self, out: Path, dry: bool, timeout: float):
        self.out, self.logs = out, out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (out / "tmp").mkdir(exist_ok=True)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TMPDIR": str(out / "tmp"),
                    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if dry:
            self.env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        self.timeout = timeout

    def __call__(self, name: str, args: list[str]) -> subprocess.CompletedProcess:
        t0 = time.perf_counter()
        print(f"  {name}: python {shlex.join(args)[:160]}", file=sys.stderr, flush=True)
        # A session of its own, so that a timeout ends its children too (the planner's measurements,
        # torchrun's ranks), not only the process started here.
        child = subprocess.Popen([sys.executable, *args], cwd=self.out, env=self.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = child.communicate(timeout=self.timeout)
            proc = subprocess.CompletedProcess(args, child.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, _ = child.communicate()
            proc = subprocess.CompletedProcess(args, 124, stdout, f"timed out after {self.timeout:.0f} s")
        (self.logs / f"{name}.log").write_text(f"$ python {shlex.join(args)}\nexit {proc.returncode} after "
                                               f"{time.perf_counter() - t0:.0f} s\n\n{proc.stdout}\n{proc.stderr}")
        return proc

    def failed(self, name: str, proc: subprocess.CompletedProcess) -> str:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        return f"FAILED (exit {proc.returncode}: {last[:120]}; logs/{name}.log)"


def metrics(run: Path) -> dict[int, dict]:
    """metrics.jsonl of a run: the training rows by step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def plan_peaks(runner: Runner, s: Setting, methods: list[str]) -> tuple[dict[str, float], str]:
    """adazeta-plan's predicted peak (GiB) per method, for CUDA, measured on CPU."""
    args = ["-m", "adazeta.cli.plan", "--methods", ",".join(methods), "--fit", "1,2", "--target-device", "cuda",
            *(["--threads", "1"] if s.dry else []), *s.model("cpu"), *RUN]
    proc = runner("plan", args)
    (runner.out / "plan.md").write_text(proc.stdout)
    found = re.findall(r"\*\*Predicted peak of (\S+) on .*?: ([0-9.]+) GiB", proc.stdout)
    return {m: float(gib) for m, gib in found}, "" if proc.returncode == 0 else runner.failed("plan", proc)


def step_rows(runner: Runner, s: Setting, methods: list[str]) -> tuple[list[Row], list[str]]:
    """Two steps of each method, and their peak against the plan. Returns the rows and the ZO runs
    that finished (for the replay)."""
    plans, plan_error = plan_peaks(runner, s, methods)
    rows, finished = [], []
    for m in methods:
        run = runner.out / "runs" / m
        proc = runner(f"train-{m}", ["-m", "adazeta.cli.train", *s.model(), *RUN, f"method={m}", f"hydra.run.dir={run}"])
        if proc.returncode != 0:
            rows.append(Row("step", m, "", "", runner.failed(f"train-{m}", proc), False))
            continue
        last = metrics(run)[2]
        finished += [m] if m in ZO_METHODS else []
        loss, peak, reserved = last["train/loss"], last["mem/peak_gib"], last.get("mem/reserved_gib")
        measured = f"loss {loss:.4f}, peak {peak:.3f} GiB" + (f", reserved {reserved:.3f}" if reserved else "")
        finite = loss is not None  # metrics.jsonl writes a non-finite value as null
        if m not in plans:
            rows.append(Row("step", m, measured, "", plan_error or "no plan", False))
        elif s.device != "cuda":
            rows.append(Row("step", m, measured, f"plan {plans[m]:.3f} GiB",
                            ("ok (finite loss); memory not compared on CPU" if finite else "FAILED: loss not finite"),
                            finite))
        else:
            err = (plans[m] - peak) / peak
            good = finite and abs(err) <= TOLERANCE
            rows.append(Row("step", m, measured, f"plan {plans[m]:.3f} GiB",
                            f"{'ok' if good else 'OFF'}: plan {100 * err:+.1f}% of the peak"
                            + ("" if finite else ", loss not finite"), good))
    return rows, finished


def replay_rows(runner: Runner, runs: list[str]) -> list[Row]:
    rows = []
    for m in runs:
        proc = runner(f"replay-{m}", ["-m", "adazeta.cli.replay", str(runner.out / "runs" / m)])
        equal = proc.returncode == 0 and "exactly" in proc.stdout
        result = "ok: equal bit for bit" if equal else runner.failed(f"replay-{m}", proc)
        rows.append(Row("replay", m, "2 steps rebuilt from seeds", "the checkpoint's tensors", result, equal))
    return rows


def parallel_rows(runner: Runner, s: Setting) -> list[Row]:
    """AdaZeta at Q = 8, batched replicas against one query after another."""
    common = [*s.model(), *RUN, "method=adazeta", "schedule=constant", "schedule.q=8", "train.max_steps=3",
              "train.eval_steps=3"]
    found = {}
    for mode in ("true", "false"):
        name = f"parallel-{mode}"
        proc = runner(name, ["-m", "adazeta.cli.train", *common, f"zo.parallel_queries={mode}",
                             f"hydra.run.dir={runner.out / 'runs' / name}"])
        if proc.returncode != 0:
            return [Row("parallel", "adazeta", "", "", runner.failed(name, proc), False)]
        found[mode] = metrics(runner.out / "runs" / name)
    par, seq = found["true"][3]["time/step_s"], found["false"][3]["time/step_s"]
    g_par, g_seq = found["true"][1]["zo/projected_grad"], found["false"][1]["zo/projected_grad"]
    diff = abs(g_par - g_seq) / max(abs(g_seq), 1e-30)
    return [Row("parallel", "adazeta Q=8", f"parallel {par:.3f} s/step", f"sequential {seq:.3f} s/step",
                f"{seq / par:.2f}x; step-1 projected gradient differs by {diff:.1e} (relative)", True)]


def torchrun_rows(runner: Runner, s: Setting) -> list[Row]:
    """Two ranks splitting the queries of each step: NCCL on two GPUs (gloo in a dry run)."""
    if not s.dry and s.gpus < 2:
        return [Row("torchrun", "adazeta", "", "", f"skipped: {s.gpus} CUDA device(s) visible, 2 needed", None)]
    backend = "gloo" if s.dry else "nccl"
    run = runner.out / "runs" / "torchrun"
    proc = runner("torchrun", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "adazeta.cli.train", *s.model(), *RUN, "method=adazeta", "schedule=constant",
                               "schedule.q=4", "train.max_steps=3", "train.eval_steps=3", f"dist.backend={backend}",
                               "dist.check_steps=1", f"hydra.run.dir={run}"])
    what = f"2 ranks, {backend}, Q=4"
    if proc.returncode != 0:
        return [Row("torchrun", what, "", "", runner.failed("torchrun", proc), False)]
    summary = json.loads((run / "summary.json").read_text())
    sums, resyncs = summary["dist/checksums"], summary["dist/resyncs"]
    good = len(sums) == 2 and len(set(sums)) == 1 and resyncs == 0
    return [Row("torchrun", what, f"checksums {' '.join(c[:8] for c in sums)}, {resyncs} resyncs",
                "equal, 0 resyncs", "ok" if good else "FAILED: the ranks' parameters differ", good)]


def table(rows: list[Row]) -> str:
    lines = ["| check | method | measured | expected | result |", "|---|---|---|---|---|"]
    lines += [f"| {r.check} | {r.method} | {r.measured} | {r.expected} | {r.result} |" for r in rows]
    return "\n".join(lines)


def machine(s: Setting) -> str:
    if s.device == "cuda":
        names = sorted({torch.cuda.get_device_name(i) for i in range(s.gpus)})
        where = f"{s.gpus} x {', '.join(names)}, CUDA {torch.version.cuda}"
    else:
        where = "CPU (dry run: tiny width, the script's own test)"
    arch = ", ".join(f"{k} {v}" for k, v in s.arch.items())
    return f"torch {torch.__version__}; {where}; Llama from config ({arch}), bf16 base"


def plan_lines(s: Setting, methods: list[str], checks: list[str]) -> list[str]:
    """The table's rows before anything runs: check and what it does."""
    out = []
    if "step" in checks:
        out += ["step: adazeta-plan --target-device cuda (measured on CPU) for " + ", ".join(methods)]
        out += [f"step: {m}: two steps; loss, peak against the plan" for m in methods]
    if "replay" in checks:
        out += [f"replay: {m}: adazeta-replay equal bit for bit" for m in methods if m in ZO_METHODS]
    if "parallel" in checks:
        out += ["parallel: adazeta Q=8, zo.parallel_queries=true against false"]
    if "torchrun" in checks:
        out += ["torchrun: 2 ranks, " + ("gloo on CPU" if s.dry else "NCCL" if s.gpus >= 2
                                         else f"skipped ({s.gpus} CUDA device(s) visible, 2 needed)")]
    return out


def setting(dry_run: bool) -> tuple[Setting, str]:
    """The setting of this machine, and a note when a dry run was not asked for but is all there is."""
    cuda = torch.cuda.is_available()
    s = Setting(device="cuda" if cuda and not dry_run else "cpu", dry=dry_run or not cuda,
                gpus=torch.cuda.device_count() if cuda else 0)
    note = "" if cuda or dry_run else (
        "no CUDA device here: a dry run on CPU at tiny width instead (the script's own test; --dry-run asks for "
        "it explicitly). Run it on a machine with a GPU for the real check.")
    return s, note


def choices(text: str, valid: list[str], what: str) -> list[str]:
    picked = [x for x in text.split(",") if x]
    bad = [x for x in picked if x not in valid]
    if bad or not picked:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: choose from {','.join(valid)}")
    return picked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run on CPU at tiny width (the default without CUDA)")
    p.add_argument("--out", type=Path, default=None, help="the folder for everything (default outputs/gpu-check/<timestamp>)")
    p.add_argument("--methods", type=lambda t: choices(t, METHODS, "--methods"), default=METHODS,
                   help=f"comma-separated, default {','.join(METHODS)}")
    p.add_argument("--checks", type=lambda t: choices(t, CHECKS, "--checks"), default=CHECKS,
                   help=f"comma-separated, default {','.join(CHECKS)} (replay needs step)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per command (default 900)")
    args = p.parse_args(argv)
    s, note = setting(args.dry_run)
    if note:
        print(note, flush=True)
    out = (args.out or Path("outputs/gpu-check") / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(machine(s), flush=True)
    print(f"output: {out}\nplan:", flush=True)
    for line in plan_lines(s, args.methods, args.checks):
        print(f"  {line}", flush=True)

    runner, rows, zo_runs = Runner(out, s.dry, args.timeout), [], []
    t0 = time.perf_counter()
    if "step" in args.checks:
        step, zo_runs = step_rows(runner, s, args.methods)
        rows += step
    if "replay" in args.checks:
        rows += replay_rows(runner, zo_runs)
    if "parallel" in args.checks:
        rows += parallel_rows(runner, s)
    if "torchrun" in args.checks:
        rows += torchrun_rows(runner, s)
    text = f"{machine(s)}; {time.perf_counter() - t0:.0f} s\n\n{table(rows)}\n"
    (out / "table.md").write_text(text)
    print("\n" + text, flush=True)
    failed = [r for r in rows if r.ok is False]
    if failed:
        print(f"{len(failed)} check(s) failed: see {out / 'logs'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
