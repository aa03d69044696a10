"""A study plan (conf/study/*.yaml) read into the runs it asks for: each setting's floor, search
grid, seeds, ceiling and long runs at one forward-pass budget, and the dev-only choice of each
method's grid point."""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from adazeta.cli.compare import Run, read_run
from adazeta.config import CONF_DIR
from adazeta.errors import ConfigError
from adazeta.legacy_keys import NESTED_KEYS, upgrade_overrides

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
    full = [*upgrade_overrides(overrides), f"train.max_steps={steps}", f"train.eval_steps={eval_steps}", f"seed={seed}", f"label={label}"]
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
