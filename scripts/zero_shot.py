"""Zero-shot evaluation of a model on tasks' validation files, through the project's own config,
task, model and objective code (no training, no Hydra output folder).

    python scripts/zero_shot.py --model smollm2-135m --tasks sst2,rte,boolq,cb,copa,wic \
        --data-root ../shared/data --limit 200

Each task reads `<data-root>/<task>` and evaluates on its test split: up to --limit examples sampled
(with the task's data seed) from the validation file (dev.tsv / val.jsonl), exactly as a training
run's final test evaluation would. Extra Hydra overrides go after `--`, e.g. `-- model.max_length=512`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from adazeta.config import compose_config
from adazeta.models.load import load_model
from adazeta.objectives import Objective
from adazeta.tasks import build_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model option")
    parser.add_argument(
        "--tasks", default="sst2,rte,boolq,cb,copa,wic", help="comma-separated tasks"
    )
    parser.add_argument(
        "--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    parser.add_argument("--limit", type=int, default=200, help="examples per task (null: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, after --")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    results, loaded = [], None
    for name in args.tasks.split(","):
        cfg = compose_config([
            f"model={args.model}",
            f"task={name}",
            f"task.data_dir={Path(args.data_root) / name}",
            f"task.num_test={args.limit}",
            *args.overrides,
        ])
        t0 = time.perf_counter()
        task = build_task(cfg.task)
        test = task.load().test
        if loaded is None:
            loaded = load_model(cfg.model, num_labels=task.num_labels)
        objective = Objective(task, loaded.tokenizer, loaded.head, cfg.model.max_length)
        metrics = objective.evaluate(loaded.model, test, loaded.device, args.batch_size)
        row = {
            "task": name,
            "n": len(test),
            **metrics,
            "truncated": objective.truncated,
            "seconds": time.perf_counter() - t0,
        }
        results.append(row)
        print(json.dumps(row), flush=True)

    extra = ("task", "n", "seconds", "truncated")
    metrics = [k for k in results[0] if k not in extra]
    print(f"\n| task | examples | {' | '.join(metrics)} | truncated | seconds |")
    for r in results:
        values = " | ".join(f"{r[k]:.3f}" for k in metrics)
        print(f"| {r['task']} | {r['n']} | {values} | {r['truncated']} | {r['seconds']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
