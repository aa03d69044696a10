"""`adazeta-study`: does ZO fine-tuning lift a real model above its own zero-shot, and which method
gets there in the fewest forward passes? One plan file under conf/study/ answers it end to end.

    adazeta-study quick                               # conf/study/quick.yaml (< 20 min, 2 CPU cores)
    adazeta-study full --settings smollm2_sst2        # one part of the full study, in its own sitting
    adazeta-study full --report-only                  # tables and figures from the finished runs
    adazeta-study full --dry-run                      # the runs it would start, and their budgets
    adazeta-study leaderboard --settings smollm2_sst2 --methods adazeta,mezo   # a part of a setting

For every setting (a model on a task) of the plan, in this order:
1. **floor**: the zero-shot of the model (`method=mezo train.max_steps=0`: no adapter, no update);
2. **search**: each method over its grid (the learning rate, and eps where the plan says) at one
   seed and one forward-pass budget (`budget`), so a method that spends Q queries per step gets
   fewer steps: the comparison is at equal forward passes;
3. **selection on dev only**: per method, the grid point with the best dev accuracy (ties: lower
   dev loss), as the training loop keeps its best-dev weights; test is never looked at;
4. **seeds**: the chosen point rerun with the plan's other seeds;
5. **ceiling**: first-order references (`lora_fo`, `ft`) for a few steps;
6. **long** (optional): one method with a larger budget, to show how far it gets.
The settings run one after the other, each through these steps, so a setting (or the methods of
it that `--methods` names) is finished before the next starts. Every run is an ordinary
`adazeta-train` run (its own Hydra folder, `label=` naming it in comparisons) under
`<out>/<setting>/`; a run whose folder holds `summary.json` is not run again, and one interrupted
is moved aside and rerun, so a study interrupted or split over sittings goes on where it stopped.
`--dry-run` counts the runs and, where the plan gives each setting an `estimate`, their hours.
The report (`<out>/report.md`, also printed) and one figure per setting
(`<out>/<setting>_dev_loss.png`: dev loss over forward passes, mean and min-max band over seeds,
the zero-shot as a dashed line) are drawn from whatever runs are finished. A plan with
`report: leaderboard` (conf/study/leaderboard.yaml) gets the leaderboard instead: per setting the
methods ranked by mean test gain over zero-shot, and a ranking across settings by mean rank and
wins, under a header that records the commit, torch and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from adazeta.cli.leaderboard import (
    leaderboard,
)
from adazeta.cli.study_plan import (
    FIRST_ORDER_STEP_PASSES,
    Plan,
    RunSpec,
    load_plan,
    planned_seed_runs,
    point_name,
    seed_runs,
)
from adazeta.cli.study_report import (
    duration,
    report,
)
from adazeta.errors import AdazetaError, ConfigError


def execute(run: RunSpec, log_dir: Path) -> tuple[bool, float]:
    """One adazeta-train run in its own process; (finished, wall seconds)."""
    if run.folder.exists() and not run.done:  # an interrupted earlier attempt: kept, never overwritten
        aside = run.folder.with_name(f"{run.folder.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
        run.folder.rename(aside)
        print(f"  moved the unfinished {run.folder} to {aside}", file=sys.stderr)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{run.setting}_{run.label}_{run.folder.name}.log"
    cmd = [sys.executable, "-m", "adazeta.cli.train", *run.overrides, "train.progress=false", f"hydra.run.dir={run.folder}"]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode == 0 and (run.folder / "summary.json").is_file():
        record = {"overrides": run.overrides, "wall_s": round(wall, 1)}  # a part's time is the sum of these
        (run.folder / "study.json").write_text(json.dumps(record, indent=1) + "\n")
    return proc.returncode == 0 and run.done, wall


def check_methods(plan: Plan, methods: list[str] | None) -> None:
    """--methods names labels of the plan's runs (its methods and ceilings)."""
    labels = sorted({r.label for r in plan.runs if r.role != "floor"})
    unknown = sorted(set(methods or []) - set(labels))
    if unknown:
        raise ConfigError(f"--methods {','.join(unknown)}: not run by this plan; its methods: {labels}")


def run_plan(plan: Plan, dry_run: bool, methods: list[str] | None = None) -> None:
    """Every setting in turn (its floor, search and ceiling, then the seeds of what its search
    chose, then its long runs), restricted to `methods` (labels; the floor always runs: every
    gain is measured from it). With `dry_run`, list the runs to start and estimate their time."""
    check_methods(plan, methods)

    def picked(r: RunSpec) -> bool:
        return r.role == "floor" or methods is None or r.label in methods

    for setting in plan.settings:
        stages = [("search", "floor, search and ceiling", lambda: [r for r in plan.runs if r.role != "long"]),
                  ("seeds", "seeds of the chosen points", lambda: seed_runs(plan)),
                  ("long", "long runs", lambda: [r for r in plan.runs if r.role == "long"])]
        for stage, title, runs_of in stages:
            runs = [r for r in runs_of() if r.setting == setting and picked(r)]
            if stage == "long" and not runs:  # most plans have none: no line for them
                continue
            run_stage(plan, f"{setting} {stage}", f"{setting}: {title}", runs, dry_run)
    if dry_run:
        print_estimate(plan, picked)


def run_stage(plan: Plan, desc: str, title: str, runs: list[RunSpec], dry_run: bool) -> None:
    """Start the runs of one stage of a setting that are not finished (with `dry_run`: list them)."""
    from tqdm.auto import tqdm

    todo = [r for r in runs if not r.done]
    print(f"{plan.name}: {title}: {len(runs) - len(todo)} of {len(runs)} runs finished, {len(todo)} to run",
          file=sys.stderr)
    if dry_run:
        for r in todo:
            print(f"  {r.setting} {r.label} [{r.role}] {r.steps} steps: {' '.join(r.overrides)}")
        if desc.endswith("seeds"):
            print("  (seeds follow the search's dev results)")
        return
    if todo:
        bar = tqdm(todo, desc=f"{plan.name} {desc}", unit="run")
        for r in bar:
            bar.set_postfix_str(f"{r.setting} {r.label} {point_name(r.point)} s{r.seed}")
            ok, wall = execute(r, plan.out / "logs")
            result = r.read() if ok else None
            if result is None:
                print(f"  {r.setting} {r.label} {point_name(r.point)} s{r.seed}: failed after {wall:.0f} s "
                      f"(see {plan.out / 'logs'}; {r.folder / 'error.txt'})", file=sys.stderr)
            else:
                s = result.summary
                print(f"  {r.setting} {r.label} {point_name(r.point)} s{r.seed}: best dev {s['best/eval_' + s['metric']]:.4f}, "
                      f"test {s.get('test/' + s['metric'], float('nan')):.4f}, {wall:.0f} s", file=sys.stderr)


def estimate_s(run: RunSpec, s: DictConfig, sizes: tuple[int, int]) -> float:
    """A run's seconds from its setting's `estimate` (start_s, pass_s: a training forward pass of
    the batch, example_s: an evaluated example), given the setting's (dev, test) sizes: its start,
    its passes (a first-order step: FIRST_ORDER_STEP_PASSES), dev at step 0 and every eval_steps
    and at the end, and the test."""
    est = s.estimate
    passes = run.passes * (FIRST_ORDER_STEP_PASSES if run.role == "ceiling" else 1)
    evals = 1 + -(-run.steps // run.eval_steps)  # at step 0, then every eval_steps and the last step
    return est.start_s + passes * est.pass_s + (evals * sizes[0] + sizes[1]) * est.example_s


def eval_sizes(run: RunSpec) -> tuple[int, int]:
    """(dev, test) examples of a run's task, as its overrides compose them (0 where unset)."""
    from adazeta.config import compose_config

    task = compose_config(run.overrides).task
    return task.num_dev or 0, task.num_test or 0


def print_estimate(plan: Plan, picked: Callable[[RunSpec], bool]) -> None:
    """The dry-run's count of runs, and their time where each setting has an `estimate`: per
    setting and per method, the parts one sitting can take."""
    runs = [r for r in plan.runs + planned_seed_runs(plan) if picked(r)]
    todo = [r for r in runs if not r.done]
    print(f"{plan.name}: {len(runs)} runs ({len(runs) - len(todo)} finished, {len(todo)} to run; the seeds' "
          f"points follow their search)")
    total = 0.0
    for setting, s in plan.settings.items():
        mine = [r for r in todo if r.setting == setting]
        if "estimate" not in s:
            print(f"  {setting}: {len(mine)} runs to run (no `estimate` in the plan: no time)")
            continue
        sizes = eval_sizes(next(r for r in plan.runs if r.setting == setting))
        per_label: dict[str, list[float]] = {}
        for r in mine:
            per_label.setdefault(r.label, []).append(estimate_s(r, s, sizes))
        seconds = sum(sum(v) for v in per_label.values())
        total += seconds
        parts = ", ".join(f"{label} {len(v)} ({duration(sum(v))})" for label, v in per_label.items())
        print(f"  {setting}: {len(mine)} runs to run, about {duration(seconds)}: {parts}")
    if total:
        print(f"  estimate: about {duration(total)} on this machine (the plan's `estimate`: an idle machine)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adazeta-study", description=__doc__.split("\n")[0])
    parser.add_argument("plan", help="a plan of conf/study/ (quick, full) or a path to a plan .yaml")
    parser.add_argument("--settings", type=lambda v: [x for x in v.split(",") if x], default=None,
                        help="comma-separated settings of the plan to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="the study's folder (default: the plan's `out`)")
    parser.add_argument("--methods", type=lambda v: [x for x in v.split(",") if x], default=None,
                        help="comma-separated methods (and ceilings) of the plan to run (default: all); the "
                             "zero-shot always runs; the report still covers every method")
    parser.add_argument("--dry-run", action="store_true", help="list the runs to start, start none, count and time them")
    parser.add_argument("--report-only", action="store_true", help="only draw the report from finished runs")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan, args.out, args.settings)
        if not args.report_only:
            run_plan(plan, args.dry_run, args.methods)
        if args.dry_run:
            return 0
        plan.out.mkdir(parents=True, exist_ok=True)
        text = leaderboard(plan) if plan.kind == "leaderboard" else report(plan)
    except AdazetaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (plan.out / "report.md").write_text(text + "\n")
    print(text)
    print(f"wrote {plan.out / 'report.md'} and its figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
