"""Finished runs' files (metrics.jsonl, summary.json) written by the tests, with the keys
adazeta/engine/loop.py writes: synthetic runs for adazeta-compare and the reports that read them."""

from __future__ import annotations

import json
from pathlib import Path

# (method, seed) -> dev loss at steps 20, 40, 60; forward passes per step; seconds per step;
# best dev accuracy; test accuracy; peak and inference memory (GiB).
RUNS = {
    ("adazeta", 0): ([0.70, 0.60, 0.50], 4, 0.1, 0.70, 0.68, 0.60, 0.50),
    ("adazeta", 1): ([0.58, 0.55, 0.45], 4, 0.1, 0.74, 0.70, 0.62, 0.50),
    ("mezo", 0): ([0.70, 0.68, 0.66], 2, 0.2, 0.60, 0.58, 0.80, 0.50),
    ("mezo", 1): ([0.69, 0.62, 0.60], 2, 0.3, 0.64, 0.62, 0.90, 0.50),
}


def write_run(folder: Path, method: str, seed: int, task: str = "sst2", model: str = "minilm") -> None:
    """A finished run: log every 10 steps, eval every 20, 60 steps, keys as in adazeta/engine/loop.py."""
    dev, fp_per_step, step_s, best, test, peak, infer = RUNS[(method, seed)]
    folder.mkdir(parents=True)
    rows = []
    for step in range(10, 61, 10):
        row = {"step": step, "forward_passes": fp_per_step * step, "train/loss": 0.6,
               "zo/queries": fp_per_step // 2, "time/step_s": step_s, "mem/peak_gib": peak,
               "zo/projected_grad": 0.1}
        if step % 20 == 0:
            row.update({"eval/loss": dev[step // 20 - 1], "eval/accuracy": 0.6})
        rows.append(row)
    rows.append({"step": 60, "best/eval_accuracy": best, "test/accuracy": test})  # loop's last row
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "method": method, "task": task, "model": model, "seed": seed, "steps": 60,
        "forward_passes": 60 * fp_per_step, "metric": "accuracy", "best/step": 60,
        "best/eval_loss": min(dev), "best/eval_accuracy": best, "trainable_params": 100,
        "test/loss": 0.6, "test/accuracy": test, "mem/peak_gib": peak, "mem/inference_gib": infer,
        "mem/peak_over_inference": peak / infer, "time/wall_s": 60 * step_s, "device": "cpu",
        "time/tokens_per_s": 8 * 32 * fp_per_step / step_s,  # 8 rows of 32 tokens per forward pass
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
