"""The leaderboard of a plan with `report: leaderboard` (conf/study/leaderboard.yaml): per setting
the methods ranked by mean test gain over zero-shot with its spread over seeds, forward passes to
the target, seconds per pass and memory over inference; across settings mean rank and wins; a
header recording the commit, torch, threads and machine, and each part's time."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adazeta.cli.compare import NA, Run, table
from adazeta.cli.study_plan import (
    Plan,
    planned_seed_runs,
    seed_runs,
)
from adazeta.cli.study_report import (
    _mean_std,
    _pm,
    chosen_groups,
    duration,
    plot,
    search_table,
    why_not,
)


@dataclass
class Entry:
    """A method on one setting: the finished runs of its chosen point over seeds (a ceiling: its
    runs), compare.table()'s row of them, and its test gain over zero-shot per seed, in points."""
    label: str
    point: str
    runs: list[Run]
    row: dict
    gains: list[float]
    ceiling: bool
    rank: int | None = None

    @property
    def mean_gain(self) -> float:
        return float(np.mean(self.gains))

    @property
    def s_per_pass(self) -> float:
        """Training seconds per forward pass: time/step_s over the passes of a step, mean over seeds."""
        return float(np.mean([r.time_per_step() * r.summary["steps"] / r.summary["forward_passes"]
                              if r.summary.get("forward_passes") else float("nan") for r in self.runs]))


@dataclass
class Board:
    """One setting of a leaderboard: its zero-shot, its target dev loss, every method with a result
    (ranked ZO methods first, in rank order, then the ceilings), and why the others have none."""
    floor: Run | None
    target: float
    entries: list[Entry]
    missing: dict[str, str]


def provenance() -> dict[str, str]:
    """What the report was drawn with: the commit (`unknown` outside a git checkout), torch's
    version and threads, and the machine."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() often says only the architecture
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"commit": commit, "torch": torch.__version__, "threads": str(torch.get_num_threads()),
            "machine": f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs"}


def rank_entries(entries: list[Entry]) -> None:
    """Rank the ZO entries by mean test gain, largest first; gains equal to the table's 0.1 point
    share a rank (1, 2, 2, 4)."""
    shown = {id(e): round(e.mean_gain, 1) for e in entries}
    for e in entries:
        e.rank = 1 + sum(shown[id(o)] > shown[id(e)] for o in entries)


def task_board(plan: Plan, setting: str) -> Board:
    """The setting's zero-shot, target dev loss (the plan's, else 95% of the zero-shot's) and
    entries; a method without finished runs is missing with its reason (absent, failed, not run)."""
    runs = [r for r in plan.runs + seed_runs(plan) if r.setting == setting]
    missing = {m: f"absent: {why}" for m, why in plan.absent.get(setting, {}).items()}
    labels = list(dict.fromkeys(r.label for r in runs if r.role == "search"))
    floor = next((r.read() for r in runs if r.role == "floor"), None)
    if floor is None:
        return Board(None, float("nan"), [], {**{m: "zero-shot not run yet" for m in labels}, **missing})
    fs = floor.summary
    metric = fs["metric"]
    target = plan.settings[setting].get("target_loss", round(fs["best/eval_loss"] * 0.95, 3))
    groups, points = chosen_groups(plan, setting, runs)
    rows = {row["group"]: row for row in table(groups, target)} if groups else {}
    ceilings = {r.label for r in runs if r.role == "ceiling"}
    entries = [Entry(label, points[label], done, rows[label],
                     [100 * (x.summary[f"test/{metric}"] - fs[f"test/{metric}"]) for x in done
                      if f"test/{metric}" in x.summary and f"test/{metric}" in fs], label in ceilings)
               for label, done in groups.items()]
    for label in labels:
        if label not in groups:
            failed = [why for why in (why_not(r) for r in runs if r.label == label) if why != "not run"]
            missing[label] = f"failed: {failed[0]}" if failed else "not run yet"
    ranked = [e for e in entries if not e.ceiling and e.gains]
    rank_entries(ranked)
    ranked.sort(key=lambda e: e.rank)  # stable: the plan's order within a tie
    return Board(floor, target, ranked + [e for e in entries if e not in ranked], missing)


def part_times(plan: Plan) -> list[str]:
    """Per setting (a part, run in its own sittings): its runs finished and the sum of their wall times."""
    every = plan.runs + planned_seed_runs(plan)
    lines = ["| part (setting) | runs finished | time (sum of its runs' wall seconds) |", "|---|---:|---:|"]
    for setting in plan.settings:
        runs = [r for r in every if r.setting == setting]
        done = [r for r in runs if r.done]
        lines.append(f"| {setting} | {len(done)} of {len(runs)} | {duration(sum(r.wall_s for r in done))} |")
    return [*lines, ""]


def overall(plan: Plan, boards: dict[str, Board]) -> list[str]:
    """The ranking across settings: per method its mean rank over the settings it ran on and its
    wins (first places). Methods ranked on more settings come first (a mean over fewer settings
    does not compare), then by mean rank, then by wins."""
    ranks: dict[str, dict[str, int]] = {}
    for setting, b in boards.items():
        for e in b.entries:
            if e.rank is not None:
                ranks.setdefault(e.label, {})[setting] = e.rank
    labels = list(dict.fromkeys([r.label for r in plan.runs if r.role == "search"]
                                + [m for b in plan.absent.values() for m in b]))
    order = sorted((m for m in labels if m in ranks),
                   key=lambda m: (-len(ranks[m]), np.mean(list(ranks[m].values())), -list(ranks[m].values()).count(1)))
    lines = ["## Overall", "",
             f"Ranks per setting by mean test gain over zero-shot (1: the largest; equal to 0.1 point: a shared "
             f"rank); mean rank over the settings a method ran on; wins: first places ({len(boards)} settings).", "",
             "| method | mean rank | wins | settings (rank) |", "|---|---:|---:|---|"]
    for m in order:
        where = ", ".join(f"{s} ({r})" for s, r in ranks[m].items())
        elsewhere = "; ".join(f"{s}: {b.missing[m]}" for s, b in boards.items() if m in b.missing)
        lines.append(f"| {m} | {np.mean(list(ranks[m].values())):.2f} | {list(ranks[m].values()).count(1)} | "
                     f"{where}{'; ' + elsewhere if elsewhere else ''} |")
    for m in (m for m in labels if m not in ranks):
        why = "; ".join(f"{s}: {b.missing.get(m, 'no test result')}" for s, b in boards.items())
        lines.append(f"| {m} | — | — | {why} |")
    return [*lines, ""]


def _gain(gains: list[float]) -> str:
    """`+15.3 ± 2.5 (n=3)`: mean and std (ddof=1) over seeds, in points."""
    m, s = _mean_std(gains)
    return f"{m:+.1f} ± {s:.1f} (n={len(gains)})" if len(gains) > 1 else f"{m:+.1f} (n=1)"


def task_section(plan: Plan, setting: str, b: Board) -> list[str]:
    """A setting's ranked table, its figure (dev loss over forward passes, bands over seeds) and
    its search."""
    s = plan.settings[setting]
    lines = [f"## {setting}", "", f"`{' '.join(s.overrides)}`; budget {s.budget:,} forward passes per ZO run", ""]
    if b.floor is None:
        return [*lines, "(zero-shot not run yet)", ""]
    fs = b.floor.summary
    metric = fs["metric"]
    lines += [f"Zero-shot: dev {metric} {fs[f'best/eval_{metric}']:.3f}, test {metric} "
              f"{fs.get(f'test/{metric}', float('nan')):.3f}, dev loss {fs['best/eval_loss']:.4f}. "
              f"Target dev loss: {b.target}.", "",
              f"| rank | method | point | test gain (points) | seeds | test {metric} | forward passes to dev loss ≤ "
              f"{b.target} | s / forward pass | peak / inference |",
              "|---:|---|---|---:|---|---:|---:|---:|---:|"]
    for e in b.entries:
        row = e.row
        to_target = (f"{row['forward_passes_to_target']:,.0f} ({row['reached_target']})"
                     if row["forward_passes_to_target"] != NA else f"not reached ({row['reached_target']})")
        test = [r.summary[f"test/{metric}"] for r in e.runs if f"test/{metric}" in r.summary]
        name = f"{e.label} (ceiling: first-order, a pass is a forward and a backward)" if e.ceiling else e.label
        lines.append(f"| {e.rank or '—'} | {name} | {e.point} | {_gain(e.gains) if e.gains else 'n/a'} | "
                     f"{' '.join(str(r.summary['seed']) for r in e.runs)} | {_pm(test)} | {to_target} | "
                     f"{e.s_per_pass:.2f} | {row['peak_over_inference']:.2f}× |")
    lines += [f"| — | {m} | | {why} | | | | | |" for m, why in b.missing.items()]
    lines.append("")
    groups = {e.label: e.runs for e in b.entries}
    if groups:
        fig_path = plan.out / f"{setting}_dev_loss.png"
        plot(groups, fs["best/eval_loss"], b.target, fig_path, f"{setting}: dev loss over forward passes (chosen points)")
        lines += [f"![{setting}]({fig_path.name})", ""]
    runs = [r for r in plan.runs if r.setting == setting]
    return [*lines, *search_table(plan, setting, runs, metric)]


def leaderboard(plan: Plan) -> str:
    """The leaderboard report: a header (commit, torch, machine, each part's time), the ranking
    across settings, then per setting its ranked table, figure and search."""
    info = provenance()
    lines = [f"# Leaderboard `{plan.name}`", "",
             f"Commit `{info['commit']}`; torch {info['torch']}, threads: {info['threads']}; machine: {info['machine']}.",
             "", f"Every run: `{' '.join(plan.common)}`.", "",
             f"Seeds {' '.join(map(str, plan.seeds))}: learning rates searched at seed {plan.seeds[0]} and chosen on "
             "dev only, the chosen point rerun at the other seeds; test at the best-dev weights, gains in points of "
             "the metric over the zero-shot's test, mean ± std over seeds (ddof 1).", "",
             *part_times(plan)]
    boards = {setting: task_board(plan, setting) for setting in plan.settings}
    lines += overall(plan, boards)
    for setting, b in boards.items():
        lines += task_section(plan, setting, b)
    return "\n".join(lines)
