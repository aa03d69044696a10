"""Peak memory of each method over the inference memory of the same model and batch, and step time.

    python scripts/benchmark_memory.py                                # MiniLM, batch 16, all methods
    python scripts/benchmark_memory.py --model smollm2-135m --steps 5
    python scripts/benchmark_memory.py --model tiny-llama --methods mezo,ft

Each method runs the real entrypoint (`python -m adazeta.train`) in its own process, one after the
other in this one invocation, on the same model, task and batch; each run measures its inference
memory (one forward of the training batch, right after loading) and its training peak, both after
resetting the peak (CUDA allocator stats; VmHWM on Linux CPUs, so model loading is excluded).
On CPU, resident memory also holds the Python runtime and libraries, common to both phases.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ["adazeta", "mezo", "mezo_lora", "sparse_mezo", "ft", "lora_fo"]


def run_method(method: str, args, out: Path) -> dict:
    overrides = [
        f"method={method}", f"model={args.model}", f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"train.eval_steps={10**9}", "train.eval_on_test=false",
        "train.progress=false", "schedule=constant", f"schedule.q={args.q}", "task.num_dev=16",
        f"task.num_train={max(64, args.batch_size * args.steps)}", f"hydra.run.dir={out / method}",
        *args.overrides,
    ]
    proc = subprocess.run([sys.executable, "-m", "adazeta.train", *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / method / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
    times = [r["time/step_s"] for r in rows if "time/step_s" in r]
    summary["step_s"] = sum(times[1:]) / max(len(times) - 1, 1) if len(times) > 1 else times[0]
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--q", type=int, default=1, help="queries per step for the ZO methods")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model.max_length=64")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: run_method(m, args, Path(tmp)) for m in args.methods.split(",")}
    print(f"\nmodel {args.model}, batch {args.batch_size}, {args.steps} steps, Q={args.q} "
          f"(device {next(iter(results.values()))['device']})\n")
    print("| method | trainable params | inference GiB | peak GiB | peak / inference | step s |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, s in results.items():
        print(f"| {m} | {s['trainable_params']:,} | {s['mem/inference_gib']:.3f} | {s['mem/peak_gib']:.3f} "
              f"| {s['mem/peak_over_inference']:.2f} | {s['step_s']:.3f} |")


if __name__ == "__main__":
    main()
