"""`adazeta-study`: does ZO fine-tuning lift a real model above its own zero-shot, and which method
gets there in the fewest forward passes? One plan file under conf/study/ answers it end to end.

    adazeta-study quick                               # conf/study/quick.yaml (< 20 min, 2 CPU cores)
    adazeta-study full --settings smollm2_sst2        # one part of the full study, in its own sitting
    adazeta-study full --report-only                  # tables and figures from the finished runs
    adazeta-study full --dry-run                      # the runs it would start, and their budgets

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
Every run is an ordinary `adazeta-train` run (its own Hydra folder, `label=` naming it in
comparisons) under `<out>/<setting>/`; a run whose folder holds `summary.json` is not run again,
so a study interrupted or split over sittings goes on where it stopped. The report
(`<out>/report.md`, also printed) and one figure per setting (`<out>/<setting>_dev_loss.png`:
dev loss over forward passes, mean and min-max band over seeds, the zero-shot as a dashed line)
are drawn from whatever runs are finished.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from adazeta.cli.compare import Run, mean_band, read_run
from adazeta.config import CONF_DIR
from adazeta.errors import AdazetaError, ConfigError
from adazeta.legacy_keys import NESTED_KEYS, upgrade_overrides

STUDY_DIR = (Path(CONF_DIR) / "study").resolve()  # shipped with the package
ZERO_SHOT = "zero-shot"
ROLES = ("floor", "search", "seed", "ceiling", "long")


@dataclass
class RunSpec:
    setting: str
    label: str  # the run's name in tables and figures (adazeta-train's `label=`)
    role: str  # one of ROLES
    point: dict[str, object]  # the grid point (empty for the floor and the ceiling)
    seed: int
    overrides: list[str]
    folder: Path
    steps: int = 0

    @property
    def done(self) -> bool:
        """Finished with this spec's overrides (recorded in <folder>/study.json); a finished run of
        other settings in the same folder (the plan changed) is an error, never silently reused."""
        if not (self.folder / "summary.json").is_file():
            return False
        record = self.folder / "study.json"
        ran = json.loads(record.read_text())["overrides"] if record.is_file() else None
        if ran is not None:  # a run of an earlier release, with flat method keys
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                ran = upgrade_overrides(ran)
        if ran != self.overrides:
            changed = sorted(set(ran or []) ^ set(self.overrides))
            raise ConfigError(
                f"{self.folder} holds a finished run of other settings than the plan's now (differing: "
                f"{changed or 'no record of its settings'}); move it away, or give the study another --out"
            )
        return True

    def read(self) -> Run | None:
        return read_run(self.folder) if self.done and (self.folder / "metrics.jsonl").is_file() else None


@dataclass
class Plan:
    name: str
    out: Path
    seeds: list[int]
    settings: dict[str, DictConfig]
    runs: list[RunSpec] = field(default_factory=list)


def _fmt_value(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def point_name(point: dict[str, object]) -> str:
    """`method.lr=0.001,method.eps=0.01` -> `lr0.001_eps0.01` (a folder name). A key of a method's
    node is named by its flat name (`method.hizoo.alpha` -> `hizoo_alpha1e-08`), which the run
    folders of earlier plans carry."""
    return "_".join(f"{NESTED_KEYS.get(k, k).rsplit('.', 1)[-1]}{_fmt_value(v)}" for k, v in point.items()) or "default"


def grid_points(grid: DictConfig | None) -> list[dict[str, object]]:
    """The cartesian product of a method's grid ({key: [values]}), in the plan's order."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def passes_per_step(overrides: list[str], max_steps: int) -> list[int]:
    """Forward passes at each step of a run composed from `overrides`: 2Q from its own query
    schedule for a ZO method (method.fzoo.n x Q + 1 for FZOO, 2Q + 1 for HiZOO: L(theta) as well),
    1 (a forward and a backward) for a first-order one, as the loop counts."""
    from hydra.utils import instantiate

    from adazeta.config import Optimizer, compose_config

    cfg = compose_config(overrides)
    if cfg.method.optimizer != Optimizer.zo:
        return [1] * max_steps
    num_train = cfg.task.num_train or cfg.train.batch_size
    schedule = instantiate(cfg.schedule)
    schedule.bind(steps_per_epoch=max(num_train // cfg.train.batch_size, 1), max_steps=max_steps)
    if cfg.method.estimator.value == "fzoo":  # N = method.fzoo.n x Q one-sided queries and l_0
        return [cfg.method.fzoo.n * schedule(s) + 1 for s in range(max_steps)]
    if cfg.method.estimator.value == "hizoo":  # Q pairs of perturbed losses and L(theta)
        return [2 * schedule(s) + 1 for s in range(max_steps)]
    return [2 * schedule(s) for s in range(max_steps)]


def steps_for_budget(overrides: list[str], budget: int) -> int:
    """The number of steps whose forward passes add up to `budget` (at least one step)."""
    steps = max(budget, 1)  # every step costs at least one pass
    for _ in range(3):  # a schedule may depend on max_steps: settle it
        qs = np.cumsum(passes_per_step(overrides, steps))
        steps = max(int(np.searchsorted(qs, budget, side="right")), 1)
    return steps


def load_plan(name_or_path: str, out: Path | None, only: list[str] | None) -> Plan:
    path = Path(name_or_path)
    if not path.suffix:
        path = STUDY_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))
        raise ConfigError(f"no study plan {name_or_path!r}: give one of {choices} or a path to a .yaml plan")
    spec = OmegaConf.load(path)
    for key in ("seeds", "settings", "methods", "out"):
        if key not in spec:
            raise ConfigError(f"{path}: the plan has no `{key}` (see conf/study/quick.yaml)")
    settings = dict(spec.settings)
    if only:
        unknown = sorted(set(only) - set(settings))
        if unknown:
            raise ConfigError(f"--settings {','.join(unknown)}: not in {path.name}; its settings: {sorted(settings)}")
        settings = {k: v for k, v in settings.items() if k in only}
    plan = Plan(spec.get("name", path.stem), out or Path(spec.out), list(spec.seeds), settings)
    common = list(spec.get("common", []))
    for sname, s in settings.items():
        base = common + list(s.overrides)
        root = plan.out / sname
        plan.runs.append(run_spec(sname, s, ZERO_SHOT, "floor", {}, plan.seeds[0], [*base, "method=mezo"], 0,
                                  root / "zero_shot"))
        methods = {m: spec.methods[m] for m in s.get("methods", list(spec.methods))}
        for mname, m in methods.items():
            method_base = [*base, *m.get("overrides", [f"method={mname}"])]
            grid = s.get("grids", {}).get(mname, m.get("grid"))
            for point in grid_points(grid):
                over = [*method_base, *(f"{k}={_fmt_value(v)}" for k, v in point.items())]
                plan.runs.append(run_spec(sname, s, mname, "search", point, plan.seeds[0], over,
                                          steps_for_budget(over, s.budget),
                                          root / mname / f"{point_name(point)}_s{plan.seeds[0]}"))
        for cname, c in dict(s.get("ceiling", {})).items():
            for seed in c.get("seeds", plan.seeds):
                plan.runs.append(run_spec(sname, s, cname, "ceiling", {}, seed, [*base, *c.overrides], c.steps,
                                          root / cname / f"s{seed}"))
        for lname, lg in dict(s.get("long", {})).items():
            over = [*base, *lg.overrides]
            plan.runs.append(run_spec(sname, s, lname, "long", {}, plan.seeds[0], over,
                                      steps_for_budget(over, lg.budget), root / lname / f"s{plan.seeds[0]}"))
    return plan


def run_spec(setting: str, s: DictConfig, label: str, role: str, point: dict, seed: int, overrides: list[str],
             steps: int, folder: Path) -> RunSpec:
    """A run of `setting` (plan entry `s`): dev every `eval_every` forward passes of the setting's
    budget (first-order ceilings: four times over their steps), its seed and its label."""
    if role == "ceiling":
        eval_steps = max(1, steps // 4)
    else:
        eval_steps = max(1, round(steps * s.get("eval_every", s.budget // 4) / max(s.budget, 1)))
    full = [*upgrade_overrides(overrides), f"train.max_steps={steps}", f"train.eval_steps={eval_steps}", f"seed={seed}", f"label={label}"]
    return RunSpec(setting, label, role, point, seed, full, folder, steps)


def selection_key(run: Run) -> tuple[float, float]:
    """Best dev accuracy, then lower dev loss: how the loop picks its best-dev weights."""
    s = run.summary
    return (s[f"best/eval_{s['metric']}"], -s["best/eval_loss"])


def chosen(plan: Plan, setting: str, label: str) -> RunSpec | None:
    """The search run of `label` with the best dev result, among the finished ones."""
    done = [(r, r.read()) for r in plan.runs if r.setting == setting and r.label == label and r.role == "search"]
    done = [(r, run) for r, run in done if run is not None]
    return max(done, key=lambda rr: selection_key(rr[1]))[0] if done else None


def seed_runs(plan: Plan) -> list[RunSpec]:
    """The chosen grid point of every finished search, at the plan's other seeds."""
    out = []
    labels = dict.fromkeys((r.setting, r.label) for r in plan.runs if r.role == "search")  # in the plan's order
    for setting, label in labels:
        best = chosen(plan, setting, label)
        if best is None:
            continue
        for seed in plan.seeds[1:]:
            over = [o for o in best.overrides if not o.startswith(("seed=",))] + [f"seed={seed}"]
            over = [o for o in over if o != f"seed={best.seed}"]
            folder = best.folder.parent / f"{point_name(best.point)}_s{seed}"
            out.append(RunSpec(setting, label, "seed", best.point, seed, over, folder, best.steps))
    return out


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
    if proc.returncode == 0 and (run.folder / "summary.json").is_file():
        (run.folder / "study.json").write_text(json.dumps({"overrides": run.overrides}, indent=1) + "\n")
    return proc.returncode == 0 and run.done, time.perf_counter() - t0


def run_plan(plan: Plan, dry_run: bool) -> None:
    from tqdm.auto import tqdm

    stages = [("search", "floor, search and ceiling", lambda: [r for r in plan.runs if r.role != "long"]),
              ("seeds", "seeds of the chosen settings", lambda: seed_runs(plan)),
              ("long", "long runs", lambda: [r for r in plan.runs if r.role == "long"])]
    for stage, title, runs_of in stages:
        runs = runs_of()
        todo = [r for r in runs if not r.done]
        print(f"{plan.name}: {title}: {len(runs) - len(todo)} of {len(runs)} runs finished, {len(todo)} to run",
              file=sys.stderr)
        if dry_run:
            for r in todo:
                print(f"  {r.setting} {r.label} [{r.role}] {r.steps} steps: {' '.join(r.overrides)}")
            if stage == "seeds":
                print("  (seeds follow the search's dev results)")
            continue
        bar = tqdm(todo, desc=f"{plan.name} {stage}", unit="run")
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


# ------------------------------------------------------------------------------------- report


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
        # Search.
        lines += [f"Search (seed {plan.seeds[0]}, selected on dev):", "",
                  f"| method | point | steps | best dev {metric} | best dev loss | final dev loss | chosen |",
                  "|---|---|---:|---:|---:|---:|:-:|"]
        for label in dict.fromkeys(r.label for r in runs if r.role == "search"):
            best = chosen(plan, setting, label)
            for r in (r for r in runs if r.role == "search" and r.label == label):
                run = r.read()
                if run is None:
                    failed = (r.folder / "error.txt").is_file()
                    why = (r.folder / "error.txt").read_text().strip().splitlines()[-1][:90] if failed else "not run"
                    lines.append(f"| {label} | {point_name(r.point)} | {r.steps} | {why} | | | |")
                    continue
                sm = run.summary
                lines.append(f"| {label} | {point_name(r.point)} | {r.steps} | {sm[f'best/eval_{metric}']:.3f} | "
                             f"{sm['best/eval_loss']:.4f} | {final_dev(run)['eval/loss']:.4f} | {'✓' if r is best else ''} |")
        lines.append("")
        # Chosen settings over seeds, floor and ceiling.
        lines += [f"Chosen settings over seeds (test at the best-dev weights; gains in points of {metric} over zero-shot):", "",
                  f"| method | point | seeds | best dev {metric} | final dev {metric} | test {metric} | test gain | "
                  f"final dev loss | forward passes to dev loss ≤ {target} | peak GiB | peak / inference | wall s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
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


def plot(groups: dict[str, list[Run]], zero_shot: float, target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adazeta-study", description=__doc__.split("\n")[0])
    parser.add_argument("plan", help="a plan of conf/study/ (quick, full) or a path to a plan .yaml")
    parser.add_argument("--settings", type=lambda v: [x for x in v.split(",") if x], default=None,
                        help="comma-separated settings of the plan to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="the study's folder (default: the plan's `out`)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs to start, start none")
    parser.add_argument("--report-only", action="store_true", help="only draw the report from finished runs")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.plan, args.out, args.settings)
        if not args.report_only:
            run_plan(plan, args.dry_run)
        if args.dry_run:
            return 0
        plan.out.mkdir(parents=True, exist_ok=True)
        text = report(plan)
    except AdazetaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (plan.out / "report.md").write_text(text + "\n")
    print(text)
    print(f"wrote {plan.out / 'report.md'} and its figures", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
