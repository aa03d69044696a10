"""Step time of each method over the time of its bare forward passes, measured side by side.

    python scripts/benchmark_speed.py                          # MiniLM, batch 16 x 64 tokens
    python scripts/benchmark_speed.py --model smollm2-135m --qs 1,4
    python scripts/benchmark_speed.py --model tiny-llama --methods adazeta,mezo --repeats 2

A ZO step with Q queries can never be cheaper than its 2Q forward passes. For each method this
loads the model, applies the method's trainable-set transform (adapters included), builds one
batch of `--batch-size` x `--seq-len` tokens, and times (median over `--repeats`):
- bare: 2Q forward passes of that model on that batch, under no_grad;
- step: one optimisation step with Q queries (perturb, 2Q forwards, restore, update).
The ratio step / bare is the overhead of the method itself. First-order methods run one
forward+backward per step; their row compares it with one bare forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import adazeta.train  # noqa: F401  (registers the config schemas)
from adazeta.config import Optimizer
from adazeta.methods import build_method
from adazeta.models import load_model
from adazeta.objectives import Objective
from adazeta.tasks import Example, build_task

CONF = str(Path(__file__).resolve().parent.parent / "conf")
METHODS = ["adazeta", "mezo", "mezo_lora", "sparse_mezo", "ft", "lora_fo"]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocators, lazy buffers
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(method: str, args) -> list[tuple]:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={method}", f"model={args.model}", *args.overrides])
    torch.manual_seed(0)
    task = build_task(cfg.task)
    loaded = load_model(cfg.model, num_labels=task.num_labels)
    m = build_method(loaded.model, cfg.method, cfg.adapter, loaded.head, cfg.seed)
    objective = Objective(task, loaded.tokenizer, loaded.head, args.seq_len)
    # Sentences long enough to fill seq_len tokens, so every row is batch x seq_len.
    words = " ".join(["a quietly moving film with a fine cast and a story that holds"] * 20)
    examples = [Example(fields={f: words for f in task.text_fields}, label=i % 2) for i in range(args.batch_size)]
    batch = {k: v.to(loaded.device) for k, v in objective.encode(examples, train=True).items()}
    tokens = tuple(batch["input_ids"].shape)

    def forward():
        with torch.no_grad():
            return objective.forward(m.model, batch)[0].mean()

    def loss_fn():
        return objective.forward(m.model, batch)[0].mean()

    rows = []
    if cfg.method.optimizer == Optimizer.fo:
        bare = timed(forward, args.repeats)
        step = timed(lambda: m.step(loss_fn, 1, 1), args.repeats)
        rows.append((method, "-", tokens, bare, step))
        return rows
    for q in args.qs:
        bare = timed(lambda q=q: [forward() for _ in range(2 * q)], args.repeats)
        step = timed(lambda q=q: m.step(loss_fn, 1, q), args.repeats)
        rows.append((method, q, tokens, bare, step))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--qs", default="1,4,16", help="queries per step for the ZO methods")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = p.parse_args()
    args.qs = [int(q) for q in args.qs.split(",")]
    rows = [row for method in args.methods.split(",") for row in measure(method, args)]
    print(f"\nmodel {args.model}, threads {torch.get_num_threads()}, median of {args.repeats}\n")
    print("| method | Q | batch (rows x tokens) | bare forwards s | step s | step / bare |")
    print("|---|---:|---|---:|---:|---:|")
    for method, q, tokens, bare, step in rows:
        print(f"| {method} | {q} | {tokens[0]} x {tokens[1]} | {bare:.3f} | {step:.3f} | {step / bare:.2f} |")


if __name__ == "__main__":
    main()
