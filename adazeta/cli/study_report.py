"""The report of a study from its finished runs: per setting the zero-shot, each method's chosen
point over seeds against it, forward passes to a target dev loss, the search table, and a figure
of dev loss over forward passes with seed bands."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adazeta.cli.compare import Run, mean_band
from adazeta.cli.study_plan import (
    Plan,
    RunSpec,
    chosen,
    point_name,
    seed_runs,
)


def duration(seconds: float) -> str:
    """`4 h 05 min`, `27 min`, `45 s`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _pm(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    if not values:
        return "n/a"
    m, s = _mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def final_dev(run: Run) -> dict:
    return [r for r in run.rows if "eval/loss" in r][-1]


def passes_to(run: Run, target: float) -> float | None:
    hit = run.first_below(target)
    return None if hit is None else hit["forward_passes"]


def report(plan: Plan) -> str:
    lines = [f"# Study `{plan.name}`", ""]
    everything = plan.runs + seed_runs(plan)
    for setting, s in plan.settings.items():
        runs = [r for r in everything if r.setting == setting]
        floor = next((r.read() for r in runs if r.role == "floor"), None)
        lines += [f"## {setting}", "", f"`{' '.join(s.overrides)}`; budget {s.budget:,} forward passes per ZO run", ""]
        if floor is None:
            lines += ["(zero-shot not run yet)", ""]
            continue
        fs = floor.summary
        metric = fs["metric"]
        zs_dev, zs_test, zs_loss = fs[f"best/eval_{metric}"], fs.get(f"test/{metric}", float("nan")), fs["best/eval_loss"]
        target = s.get("target_loss", round(zs_loss * 0.95, 3))
        lines += [f"Zero-shot: dev {metric} {zs_dev:.3f}, test {metric} {zs_test:.3f}, dev loss {zs_loss:.4f}. "
                  f"Target dev loss: {target}.", ""]
        lines += search_table(plan, setting, runs, metric)
        # Chosen settings over seeds, floor and ceiling.
        lines += [f"Chosen settings over seeds (test at the best-dev weights; gains in points of {metric} over zero-shot):", "",
                  f"| method | point | seeds | best dev {metric} | final dev {metric} | test {metric} | test gain | "
                  f"final dev loss | forward passes to dev loss ≤ {target} | peak GiB | peak / inference | wall s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        groups, points = chosen_groups(plan, setting, runs)
        for lname in dict.fromkeys(r.label for r in runs if r.role == "long"):
            done = [run for run in (r.read() for r in runs if r.label == lname and r.role == "long") if run]
            if done:
                groups[f"{lname} (long)"], points[f"{lname} (long)"] = done, ""
        for label, done in groups.items():
            sm = [run.summary for run in done]
            test = [x[f"test/{metric}"] for x in sm if f"test/{metric}" in x]
            hits = [passes_to(run, target) for run in done]
            reached = [h for h in hits if h is not None]
            to_target = (f"{np.mean(reached):,.0f} ({len(reached)}/{len(done)})" if reached else f"not reached (0/{len(done)})")
            lines.append(
                f"| {label} | {points[label]} | {' '.join(str(x['seed']) for x in sm)} | "
                f"{_pm([x[f'best/eval_{metric}'] for x in sm])} | {_pm([final_dev(run)[f'eval/{metric}'] for run in done])} | "
                f"{_pm(test)} | {_pm([t - zs_test for t in test], 100, 1)} | {_pm([final_dev(run)['eval/loss'] for run in done], digits=4)} | "
                f"{to_target} | {np.mean([x['mem/peak_gib'] for x in sm]):.2f} | "
                f"{np.mean([x['mem/peak_over_inference'] for x in sm]):.2f} | {np.mean([x['time/wall_s'] for x in sm]):.0f} |")
        lines.append("")
        if groups:
            fig_path = plan.out / f"{setting}_dev_loss.png"
            plot(groups, zs_loss, target, fig_path, f"{setting}: dev loss over forward passes (chosen points)")
            lines += [f"![{setting}]({fig_path.name})", ""]
        searched = {f"{r.label} {point_name(r.point)}": [run] for r in runs if r.role == "search"
                    for run in [r.read()] if run is not None}
        if searched:  # every grid point, the ones not chosen included: how each lr behaves
            fig_path = plan.out / f"{setting}_search_dev_loss.png"
            plot(searched, zs_loss, target, fig_path, f"{setting}: dev loss of every searched point (seed {plan.seeds[0]})")
            lines += [f"![{setting} search]({fig_path.name})", ""]
    return "\n".join(lines)


def why_not(r: RunSpec) -> str:
    """Why a run has no result: the last line of its error.txt, or `not run`."""
    failed = (r.folder / "error.txt").is_file()
    return (r.folder / "error.txt").read_text().strip().splitlines()[-1][:90] if failed else "not run"


def search_table(plan: Plan, setting: str, runs: list[RunSpec], metric: str) -> list[str]:
    """Every searched point of `setting` at the first seed, the one chosen on dev ticked."""
    lines = [f"Search (seed {plan.seeds[0]}, selected on dev):", "",
             f"| method | point | steps | best dev {metric} | best dev loss | final dev loss | chosen |",
             "|---|---|---:|---:|---:|---:|:-:|"]
    for label in dict.fromkeys(r.label for r in runs if r.role == "search"):
        best = chosen(plan, setting, label)
        for r in (r for r in runs if r.role == "search" and r.label == label):
            run = r.read()
            if run is None:
                lines.append(f"| {label} | {point_name(r.point)} | {r.steps} | {why_not(r)} | | | |")
                continue
            sm = run.summary
            lines.append(f"| {label} | {point_name(r.point)} | {r.steps} | {sm[f'best/eval_{metric}']:.3f} | "
                         f"{sm['best/eval_loss']:.4f} | {final_dev(run)['eval/loss']:.4f} | {'✓' if r is best else ''} |")
    return [*lines, ""]


def chosen_groups(plan: Plan, setting: str, runs: list[RunSpec]) -> tuple[dict[str, list[Run]], dict[str, str]]:
    """Per method of `setting`, the finished runs of its chosen point over seeds (a ceiling: its
    runs), and the point's name: ({label: runs}, {label: point})."""
    groups: dict[str, list[Run]] = {}
    points: dict[str, str] = {}
    for label in dict.fromkeys(r.label for r in runs if r.role in ("search", "ceiling")):
        best = chosen(plan, setting, label)
        members = ([r for r in runs if r.label == label and r.role == "ceiling"] if best is None else
                   [best] + [r for r in runs if r.label == label and r.role == "seed"])
        done = [run for run in (r.read() for r in members) if run is not None]
        if not done:
            continue
        groups[label], points[label] = done, "" if best is None else point_name(best.point)
    return groups, points


def plot(groups: dict[str, list[Run]], zero_shot: float, target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if len(groups) > 10:  # the default cycle has ten colours: a leaderboard's eleven lines would share one
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for label, runs in groups.items():
        curves = [c for c in (r.curve("forward_passes") for r in runs) if len(c[0])]
        if not curves:
            continue
        x, mean, low, high = mean_band(curves, "minmax")
        first_order = runs[0].summary.get("method") in ("lora_fo", "ft")
        (line,) = ax.plot(x, mean, marker="o", markersize=3, linestyle=":" if first_order else "-",
                          label=f"{label}{' (1 fwd+bwd per pass)' if first_order else ''} (n={len(curves)})")
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.axhline(zero_shot, color="gray", linestyle="--", linewidth=1, label="zero-shot")
    ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"target {target}")
    ax.set(xlabel="forward passes", ylabel="dev loss", title=title)
    ax.legend(fontsize=7, title="mean over seeds, min-max band", title_fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
