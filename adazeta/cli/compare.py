"""Compare finished runs: dev-loss curves, peak memory and a summary table per method.

    adazeta-compare outputs/multirun/2026-11-24/10-00-00 -o compare/ --target-loss 0.58
    adazeta-compare outputs/runs/run_a outputs/runs/run_b -o compare/ --band std

Each FOLDER is a run folder, a multirun folder or any parent of them: every folder below it that
holds both `summary.json` and `metrics.jsonl` (what `adazeta-train` writes, see adazeta/engine/loop.py)
is a run. Runs are grouped by method, or by method/task/model when several tasks or models are
present; the seeds of a group are averaged.

OUT receives:
- `dev_loss_vs_steps.png`, `dev_loss_vs_forward_passes.png`, `dev_loss_vs_wallclock.png`: mean
  dev loss over seeds with a min-max (`--band minmax`) or +-1 std (`--band std`) band, as in the
  AdaZeta paper's Figure 1 (arXiv 2406.18060). Seeds are interpolated onto the union of their x
  values and averaged only where every seed has a value (the overlap of their ranges).
- `peak_memory.png`: training peak memory (`mem/peak_gib`) per group, next to the inference
  memory of the same model and batch (`mem/inference_gib`).
- `summary.md` (also printed) and `summary.csv`: one row per group.

Wall-clock is training time only, rebuilt from the logged `time/step_s`, which is the mean step
time over the steps since the previous logged row: the time at a logged step is the cumulative
sum of `time/step_s * (step - previous logged step)`, linearly interpolated to the eval steps.
Evaluation time is excluded, so methods with different eval costs compare fairly. Time per step
in the table is the same total divided by the steps (the mean of `time/step_s` weighted by the
steps each row covers). Standard deviations are over seeds, with ddof=1 (0 for a single run).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from adazeta.errors import AdazetaError, DataError  # noqa: E402

RUN_FILES = ("summary.json", "metrics.jsonl")
X_AXES = {  # file stem -> (x key of a curve, axis label)
    "dev_loss_vs_steps": ("step", "step"),
    "dev_loss_vs_forward_passes": ("forward_passes", "forward passes"),
    "dev_loss_vs_wallclock": ("wallclock", "training wall-clock (s, excl. evaluation)"),
}
NA = "n/a"


@dataclass
class Run:
    folder: Path
    summary: dict
    rows: list[dict]

    def curve(self, x: str) -> tuple[np.ndarray, np.ndarray]:
        """Dev loss at the eval rows against `x`: step, forward_passes or wallclock (seconds)."""
        evals = [r for r in self.rows if "eval/loss" in r]
        steps = np.array([r["step"] for r in evals], dtype=float)
        loss = np.array([r["eval/loss"] for r in evals], dtype=float)
        if x == "wallclock":
            return np.interp(steps, *self.train_time()), loss
        return np.array([r[x] for r in evals], dtype=float), loss

    def train_time(self) -> tuple[np.ndarray, np.ndarray]:
        """(logged steps, cumulative training seconds at them), both starting at 0."""
        train = [r for r in self.rows if "time/step_s" in r]
        steps = np.array([0] + [r["step"] for r in train], dtype=float)
        times = np.array([r["time/step_s"] for r in train], dtype=float)
        return steps, np.concatenate([[0.0], np.cumsum(times * np.diff(steps))])

    def time_per_step(self) -> float:
        steps, seconds = self.train_time()
        return seconds[-1] / steps[-1] if steps[-1] else float("nan")

    def first_below(self, target: float) -> dict | None:
        return next((r for r in self.rows if r.get("eval/loss", np.inf) <= target), None)


def read_run(folder: Path) -> Run:
    summary_path, metrics_path = (folder / name for name in RUN_FILES)
    summary = read_json(summary_path, 1, summary_path.read_bytes(), SUMMARY_KEYS)
    text = metrics_path.read_bytes()
    rows = [read_json(metrics_path, i, line, ("step",)) for i, line in enumerate(text.split(b"\n"), 1) if line.strip()]
    # metrics.jsonl is appended to: if a folder was reused, keep only the last run's rows.
    restarts = [i for i in range(1, len(rows)) if rows[i]["step"] < rows[i - 1]["step"]]
    return Run(folder, summary, rows[restarts[-1] :] if restarts else rows)


# What table() and the figures read from every summary.json (a run that lacks one is not comparable).
SUMMARY_KEYS = ("method", "task", "model", "seed", "metric", "mem/peak_gib", "mem/inference_gib",
                "mem/peak_over_inference")


# Values the figures and the table compute with.
NUMBERS = ("step", "forward_passes", "eval/loss", "time/step_s", "seed", "mem/peak_gib", "mem/inference_gib",
           "mem/peak_over_inference", "time/tokens_per_s")


def read_json(path: Path, line: int, data: bytes, keys: Sequence[str]) -> dict:
    """One JSON object (a file, or a line of a .jsonl) holding `keys`, else a DataError naming the
    file and the line."""
    where = f"{path}" + (f", line {line}" if path.suffix == ".jsonl" else "")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text; was it written by adazeta-train? re-run that run") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e}); delete or re-run this run") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; re-run this run")
    missing = [k for k in keys if k not in obj]
    if path.name == "summary.json" and "metric" in obj:
        missing += [k for k in (f"best/eval_{obj['metric']}",) if k not in obj]
    if missing:
        raise DataError(f"{where}: lacks {missing}; was it written by adazeta-train? re-run that run")
    odd = [k for k in NUMBERS if k in obj and (type(obj[k]) not in (int, float))]
    if odd:
        raise DataError(f"{where}: {odd[0]}={obj[odd[0]]!r} is not a number; re-run that run")
    return obj


def find_runs(folders: Sequence[Path]) -> list[Run]:
    """Every run folder at or below each of `folders`, in order; an error if one holds none."""
    found: dict[Path, Run] = {}
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder; pass run folders, multirun folders or a parent")
        candidates = sorted({p.parent for p in folder.rglob("metrics.jsonl")} | {folder})
        runs = [c for c in candidates if all((c / name).is_file() for name in RUN_FILES)]
        unfinished = [c for c in candidates if (c / "metrics.jsonl").is_file() and c not in runs]
        for c in unfinished:
            print(f"skipping {c}: metrics.jsonl but no summary.json (unfinished or failed run)", file=sys.stderr)
        if not runs:
            raise DataError(
                f"no runs found in {folder}: a run folder holds {' and '.join(RUN_FILES)} "
                "(written by adazeta-train when a run finishes); pass run folders, multirun "
                "folders or a parent of them"
            )
        for c in runs:
            found.setdefault(c.resolve(), read_run(c))
    return list(found.values())


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Group by label (the method where a run has none); by label/task/model when the runs span
    several tasks or models."""
    several = len({(r.summary["task"], r.summary["model"]) for r in runs}) > 1
    groups: dict[str, list[Run]] = {}
    for r in runs:
        s = r.summary
        name = s.get("label") or s["method"]  # runs written before `label` existed have none
        key = f"{name}/{s['task']}/{s['model']}" if several else name
        groups.setdefault(key, []).append(r)
    return groups


def mean_band(
    curves: list[tuple[np.ndarray, np.ndarray]], band: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Interpolate the seeds' curves onto the union of their x values inside the overlap of their
    ranges; return (x, mean, low, high)."""
    lo, hi = max(x.min() for x, _ in curves), min(x.max() for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    mean = ys.mean(axis=0)
    if band == "std":
        return grid, mean, mean - ys.std(axis=0), mean + ys.std(axis=0)
    return grid, mean, ys.min(axis=0), ys.max(axis=0)


def plot_curves(groups: dict[str, list[Run]], x: str, xlabel: str, path: Path, band: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, runs in groups.items():
        curves = [c for c in (r.curve(x) for r in runs) if len(c[0])]
        if not curves:
            continue
        grid, mean, low, high = mean_band(curves, band)
        (line,) = ax.plot(grid, mean, marker="o", markersize=3, label=f"{key} (n={len(curves)})")
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set(xlabel=xlabel, ylabel="dev loss", title=f"Dev loss vs {xlabel.split(' (')[0]}")
    band_label = "min-max" if band == "minmax" else "±1 std"
    ax.legend(title=f"mean over seeds, {band_label} band", fontsize=8, title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_memory(groups: dict[str, list[Run]], path: Path) -> None:
    keys = list(groups)
    peak = [np.mean([r.summary["mem/peak_gib"] for r in groups[k]]) for k in keys]
    infer = [np.mean([r.summary["mem/inference_gib"] for r in groups[k]]) for k in keys]
    ratio = [np.mean([r.summary["mem/peak_over_inference"] for r in groups[k]]) for k in keys]
    pos, width = np.arange(len(keys)), 0.38
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(keys) + 2), 4), dpi=120)
    bars = ax.bar(pos - width / 2, peak, width, label="training peak")
    ax.bar(pos + width / 2, infer, width, label="inference", color="lightgray", hatch="//")
    for bar, p, x in zip(bars, peak, ratio, strict=True):  # the table's mean ratio
        ax.annotate(f"{x:.2f}×", (bar.get_x() + width / 2, p), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(pos, keys, rotation=20 if len(keys) > 3 else 0, ha="right" if len(keys) > 3 else "center")
    ax.set(ylabel="memory (GiB)", title="Peak memory per method (× inference)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def table(groups: dict[str, list[Run]], target: float | None) -> list[dict]:
    """One row per group: the numbers of summary.csv (means and stds over seeds)."""
    rows = []
    for key, runs in groups.items():
        s0 = runs[0].summary
        metric = s0["metric"]
        best = [r.summary[f"best/eval_{metric}"] for r in runs]
        test = [r.summary[f"test/{metric}"] for r in runs if f"test/{metric}" in r.summary]
        row = {
            "group": key, "method": s0["method"], "task": s0["task"], "model": s0["model"],
            "metric": metric, "runs": len(runs),
            "seeds": " ".join(str(r.summary["seed"]) for r in runs),
            "best_dev_mean": np.mean(best), "best_dev_std": _std(best),
            "test_at_best_dev_mean": np.mean(test) if test else NA,
            "test_at_best_dev_std": _std(test) if test else NA,
            "target_loss": NA if target is None else target,
            "steps_to_target": NA, "forward_passes_to_target": NA, "reached_target": NA,
            "peak_mem_gib": np.mean([r.summary["mem/peak_gib"] for r in runs]),
            "inference_mem_gib": np.mean([r.summary["mem/inference_gib"] for r in runs]),
            "peak_over_inference": np.mean([r.summary["mem/peak_over_inference"] for r in runs]),
            "time_per_step_s": np.mean([r.time_per_step() for r in runs]),
            # Forward tokens per second of training (runs from before it was logged have none).
            "tokens_per_s": (np.mean([r.summary["time/tokens_per_s"] for r in runs])
                             if all("time/tokens_per_s" in r.summary for r in runs) else NA),
        }
        if target is not None:
            hits = [h for h in (r.first_below(target) for r in runs) if h is not None]
            row["reached_target"] = f"{len(hits)}/{len(runs)}"
            if hits:
                row["steps_to_target"] = np.mean([h["step"] for h in hits])
                row["forward_passes_to_target"] = np.mean([h["forward_passes"] for h in hits])
        rows.append({k: float(v) if isinstance(v, np.floating) else v for k, v in row.items()})
    return rows


def _fmt(v: object) -> str:
    """A count or a mean of counts: `30`, `30.5`, `1,200`; strings (n/a) unchanged."""
    return v if isinstance(v, str) else f"{v:,.1f}".removesuffix(".0")


def _pm(mean: float | str, std: float | str, runs: int) -> str:
    """`mean ± std`, the mean alone for a single run, `n/a` unchanged."""
    if isinstance(mean, str):
        return mean
    return f"{mean:.4f} ± {std:.4f}" if runs > 1 else f"{mean:.4f}"


def markdown(rows: list[dict]) -> str:
    target = rows[0]["target_loss"]
    head = [
        "method", "runs", "best dev", "test at best dev",
        "steps to target" if target == NA else f"steps to dev loss ≤ {target}",
        "forward passes to target", "reached", "peak mem (GiB)", "peak / inference", "s / step", "tokens / s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["group"], f"{r['runs']} (seeds {r['seeds']})",
            f"{_pm(r['best_dev_mean'], r['best_dev_std'], r['runs'])} {r['metric']}",
            _pm(r["test_at_best_dev_mean"], r["test_at_best_dev_std"], r["runs"]),
            _fmt(r["steps_to_target"]), _fmt(r["forward_passes_to_target"]),
            r["reached_target"], f"{r['peak_mem_gib']:.3f}", f"{r['peak_over_inference']:.2f}×",
            f"{r['time_per_step_s']:.3f}", _fmt(round(r["tokens_per_s"])) if r["tokens_per_s"] != NA else NA,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def target_loss(text: str) -> float:
    """argparse type of --target-loss: a dev loss a run can reach, a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a dev loss to reach: give a finite number > 0, e.g. 0.6")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adazeta-compare", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="FOLDER",
                        help="run folders, multirun folders, or parents of them")
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for figures and tables")
    parser.add_argument("--target-loss", type=target_loss, default=None,
                        help="dev loss to reach for the steps/forward-passes-to-target columns")
    parser.add_argument("--band", choices=["minmax", "std"], default="minmax",
                        help="band around the mean over seeds (default: minmax)")
    args = parser.parse_args(argv)
    try:
        groups = group_runs(find_runs(args.folders))
        rows = table(groups, args.target_loss)
    except AdazetaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: a summary.json or metrics.jsonl lacks the key {e}; was it written by "
              "adazeta-train? re-run that run", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot read {e.filename} ({e.strerror or e}); check that the run's files are readable",
              file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for stem, (x, xlabel) in X_AXES.items():
            plot_curves(groups, x, xlabel, args.out / f"{stem}.png", args.band)
        plot_memory(groups, args.out / "peak_memory.png")
        md = markdown(rows)
        (args.out / "summary.md").write_text(md)
        with (args.out / "summary.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    except OSError as e:
        print(f"error: cannot write the comparison into -o {args.out} ({e.strerror or e}: {e.filename or args.out}); "
              "choose a folder you can write", file=sys.stderr)
        return 2
    print(md, end="")
    print(f"wrote {len(X_AXES) + 1} figures, summary.md and summary.csv to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
