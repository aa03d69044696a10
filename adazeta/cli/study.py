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
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from adazeta.cli.compare import NA, Run, mean_band, read_run, table
from adazeta.config import CONF_DIR
from adazeta.errors import AdazetaError, ConfigError

STUDY_DIR = (Path(CONF_DIR) / "study").resolve()  # shipped with the package
ZERO_SHOT = "zero-shot"
ROLES = ("floor", "search", "seed", "ceiling", "long")
REPORTS = ("study", "leaderboard")  # a plan's `report`: the study's tables, or the leaderboard
# A first-order step's time in forward passes, for estimates: LoRA's backward is about one forward
# (the frozen weights need no gradient). With the leaderboard's SST-2 `estimate` it puts the full
# study's LoRA-with-Adam run (30 steps, dev 6 times) at 288 s; it took 233 s.
FIRST_ORDER_STEP_PASSES = 2


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
    passes: int = 0  # forward passes the run is sized for (its budget; a first-order run: its steps)
    eval_steps: int = 1

    @property
    def done(self) -> bool:
        """Finished with this spec's overrides (recorded in <folder>/study.json); a finished run of
        other settings in the same folder (the plan changed) is an error, never silently reused."""
        if not (self.folder / "summary.json").is_file():
            return False
        record = self.folder / "study.json"
        ran = json.loads(record.read_text())["overrides"] if record.is_file() else None
        if ran != self.overrides:
            changed = sorted(set(ran or []) ^ set(self.overrides))
            raise ConfigError(
                f"{self.folder} holds a finished run of other settings than the plan's now (differing: "
                f"{changed or 'no record of its settings'}); move it away, or give the study another --out"
            )
        return True

    def read(self) -> Run | None:
        return read_run(self.folder) if self.done and (self.folder / "metrics.jsonl").is_file() else None

    @property
    def wall_s(self) -> float:
        """Seconds the finished run took, process start included (<folder>/study.json); runs
        recorded before that key existed give their own `time/wall_s`, which starts after the
        imports."""
        record = json.loads((self.folder / "study.json").read_text())
        if "wall_s" in record:
            return float(record["wall_s"])
        return float(json.loads((self.folder / "summary.json").read_text()).get("time/wall_s", 0.0))


@dataclass
class Plan:
    name: str
    out: Path
    seeds: list[int]
    settings: dict[str, DictConfig]
    runs: list[RunSpec] = field(default_factory=list)
    kind: str = "study"  # one of REPORTS
    absent: dict[str, dict[str, str]] = field(default_factory=dict)  # setting -> {method: why not run}
    common: list[str] = field(default_factory=list)  # the overrides of every run


def _fmt_value(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def point_name(point: dict[str, object]) -> str:
    """`method.lr=0.001,method.eps=0.01` -> `lr0.001_eps0.01` (a folder name)."""
    return "_".join(f"{k.rsplit('.', 1)[-1]}{_fmt_value(v)}" for k, v in point.items()) or "default"


def grid_points(grid: DictConfig | None) -> list[dict[str, object]]:
    """The cartesian product of a method's grid ({key: [values]}), in the plan's order."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def passes_per_step(overrides: list[str], max_steps: int) -> list[int]:
    """Forward passes at each step of a run composed from `overrides`: 2Q from its own query
    schedule for a ZO method (method.fzoo_n x Q + 1 for FZOO, 2Q + 1 for HiZOO: L(theta) as well),
    1 (a forward and a backward) for a first-order one, as the loop counts."""
    from hydra.utils import instantiate

    from adazeta.config import Optimizer, compose_config

    cfg = compose_config(overrides)
    if cfg.method.optimizer != Optimizer.zo:
        return [1] * max_steps
    num_train = cfg.task.num_train or cfg.train.batch_size
    schedule = instantiate(cfg.schedule)
    schedule.bind(steps_per_epoch=max(num_train // cfg.train.batch_size, 1), max_steps=max_steps)
    if cfg.method.estimator.value == "fzoo":  # N = fzoo_n x Q one-sided queries and l_0
        return [cfg.method.fzoo_n * schedule(s) + 1 for s in range(max_steps)]
    if cfg.method.estimator.value == "hizoo":  # Q pairs of perturbed losses and L(theta)
        return [2 * schedule(s) + 1 for s in range(max_steps)]
    return [2 * schedule(s) for s in range(max_steps)]


def steps_for_budget(overrides: list[str], budget: int) -> int:
    """The number of steps whose forward passes add up to `budget` (at least one step)."""
    steps = max(budget, 1)  # every step costs at least one pass
    for _ in range(3):  # a schedule may depend on max_steps: settle it
        qs = np.cumsum(passes_per_step(overrides, steps))
        settled, steps = steps, max(int(np.searchsorted(qs, budget, side="right")), 1)
        if steps == settled:  # a fixed point: composing again gives the same
            break
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
    kind = spec.get("report", "study")
    if kind not in REPORTS:
        raise ConfigError(f"{path}: report: {kind!r} is not a report; give one of {list(REPORTS)}")
    plan = Plan(spec.get("name", path.stem), out or Path(spec.out), list(spec.seeds), settings, kind=kind)
    common = plan.common = list(spec.get("common", []))
    absent = check_absent(path, "absent", dict(spec.get("absent", {})), spec)
    for sname, s in settings.items():
        base = common + list(s.overrides)
        root = plan.out / sname
        plan.runs.append(run_spec(sname, s, ZERO_SHOT, "floor", {}, plan.seeds[0], [*base, "method=mezo"], 0,
                                  root / "zero_shot"))
        plan.absent[sname] = {**absent, **check_absent(path, f"settings.{sname}.absent", dict(s.get("absent", {})), spec)}
        methods = {m: spec.methods[m] for m in s.get("methods", list(spec.methods)) if m not in plan.absent[sname]}
        for mname, m in methods.items():
            method_base = [*base, *m.get("overrides", [f"method={mname}"])]
            grid = s.get("grids", {}).get(mname, m.get("grid"))
            for point in grid_points(grid):
                over = [*method_base, *(f"{k}={_fmt_value(v)}" for k, v in point.items())]
                plan.runs.append(run_spec(sname, s, mname, "search", point, plan.seeds[0], over,
                                          steps_for_budget(over, s.budget),
                                          root / mname / f"{point_name(point)}_s{plan.seeds[0]}", s.budget))
        for cname, c in dict(s.get("ceiling", {})).items():
            for seed in c.get("seeds", plan.seeds):
                plan.runs.append(run_spec(sname, s, cname, "ceiling", {}, seed, [*base, *c.overrides], c.steps,
                                          root / cname / f"s{seed}", c.steps))
        for lname, lg in dict(s.get("long", {})).items():
            over = [*base, *lg.overrides]
            plan.runs.append(run_spec(sname, s, lname, "long", {}, plan.seeds[0], over,
                                      steps_for_budget(over, lg.budget), root / lname / f"s{plan.seeds[0]}", lg.budget))
    return plan


def check_absent(path: Path, where: str, absent: dict, spec: DictConfig) -> dict[str, str]:
    """A plan's `absent` mapping (method -> why it is not run): every key a method of conf/method or
    of the plan, every reason a non-empty sentence; at plan level, no method the plan also runs."""
    known = sorted(set(conf_methods()) | set(spec.methods))
    for name, why in absent.items():
        if name not in known:
            raise ConfigError(f"{path}: {where}: {name!r} is not a method; give one of {known}")
        if not isinstance(why, str) or not why.strip():
            raise ConfigError(f"{path}: {where}.{name}: {why!r} is no reason; say why {name} is not run")
        if where == "absent" and name in spec.methods:
            raise ConfigError(f"{path}: absent.{name}: the plan also runs {name} (methods.{name}); keep one of the two")
    return {str(k): str(v) for k, v in absent.items()}


def conf_methods(optimizer: str | None = None) -> list[str]:
    """The methods of conf/method (file names), those with `optimizer: <optimizer>` if given."""
    files = sorted((Path(CONF_DIR) / "method").glob("*.yaml"))
    return [p.stem for p in files if optimizer is None or OmegaConf.load(p).method.get("optimizer") == optimizer]


def unplanned_zo_methods(plan_path: Path) -> list[str]:
    """The ZO methods of conf/method a plan neither runs (a method's `method=` override, else its
    name) nor lists under `absent` with a reason: what a leaderboard would silently leave out."""
    spec = OmegaConf.load(plan_path)
    ran = set()
    for name, m in spec.methods.items():
        chosen_by = [o.split("=", 1)[1] for o in m.get("overrides", []) if o.startswith("method=")]
        ran.add(chosen_by[-1] if chosen_by else name)
    return [m for m in conf_methods("zo") if m not in ran and m not in spec.get("absent", {})]


def run_spec(setting: str, s: DictConfig, label: str, role: str, point: dict, seed: int, overrides: list[str],
             steps: int, folder: Path, passes: int = 0) -> RunSpec:
    """A run of `setting` (plan entry `s`): dev every `eval_every` forward passes of the setting's
    budget (first-order ceilings: four times over their steps), its seed and its label."""
    if role == "ceiling":
        eval_steps = max(1, steps // 4)
    else:
        eval_steps = max(1, round(steps * s.get("eval_every", s.budget // 4) / max(s.budget, 1)))
    full = [*overrides, f"train.max_steps={steps}", f"train.eval_steps={eval_steps}", f"seed={seed}", f"label={label}"]
    return RunSpec(setting, label, role, point, seed, full, folder, steps, passes, eval_steps)


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
        out += [at_seed(best, seed) for seed in plan.seeds[1:]]
    return out


def at_seed(run: RunSpec, seed: int) -> RunSpec:
    """A search run's point rerun at `seed`, in a folder of its own next to it."""
    over = [o for o in run.overrides if not o.startswith("seed=")] + [f"seed={seed}"]
    folder = run.folder.parent / f"{point_name(run.point)}_s{seed}"
    return replace(run, role="seed", seed=seed, overrides=over, folder=folder)


def planned_seed_runs(plan: Plan) -> list[RunSpec]:
    """seed_runs, and for a method whose search has not finished a run yet, its first grid point
    at the other seeds in their stead: what the seeds stage will run, for counts and estimates."""
    out = seed_runs(plan)
    have = {(r.setting, r.label) for r in out}
    for r in plan.runs:
        if r.role == "search" and (r.setting, r.label) not in have and chosen(plan, r.setting, r.label) is None:
            have.add((r.setting, r.label))
            out += [at_seed(r, seed) for seed in plan.seeds[1:]]
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


def duration(seconds: float) -> str:
    """`4 h 05 min`, `27 min`, `45 s`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


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

# ---------------------------------------------------------------------------------- leaderboard


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
