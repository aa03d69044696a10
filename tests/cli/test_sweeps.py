"""Sweeps and launchers: the grid files of conf/grid (Hydra's basic sweeper), the Optuna search of
conf/hparams_search, and the launchers of conf/hydra/launcher (joblib; submitit's local executor
standing in for SLURM).

The composition checks are fast; each smoke test runs the real CLI as a multirun on tiny-llama
with one training step per job (8-17 s each, measured on the 2-core machine under load, so none is
marked slow). The plugin tests skip when their optional extra is absent; the dev extra has all three.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, TINY_RUN, compose_config, config_options, output, run_entrypoint
from omegaconf import OmegaConf

# TINY_RUN with one training step (train.max_steps=2 replaced).
ONE_STEP = [o for o in TINY_RUN if not o.startswith("train.max_steps=")] + ["train.max_steps=1"]
SMOKE = ["model=tiny-llama", "method=mezo", *ONE_STEP]

GRIDS = {  # file -> (swept key, values); the test pins the papers' grids
    "mezo_lr": ("method.lr", [1e-7, 1e-6, 1e-5]),
    "mezo_eps": ("method.eps", [1e-4, 1e-3, 1e-2]),
    "mezo_lora_lr": ("method.lr", [1e-5, 5e-5, 1e-4]),
    "adazeta_lr": ("method.lr", [1e-5, 5e-5, 1e-4, 5e-4]),
    "seeds": ("seed", [0, 1, 2]),
}
PLUGINS = {  # import name -> pip extra
    "optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
    "submitit": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}


def need(plugin: str) -> None:
    module, extra = PLUGINS[plugin]
    pytest.importorskip(module, reason=f"optional extra absent: pip install -e '.[{extra}]'")


def run_dirs(sweep: Path) -> list[Path]:
    """The job folders of a multirun, in job order (<n>_<method>_<task>_s<seed>)."""
    return sorted(
        (p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()),
        key=lambda p: int(p.name.split("_")[0]),
    )


def run_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def check_ok(proc, n_jobs: int, sweep: Path) -> list[Path]:
    assert proc.returncode == 0, output(proc)[-3000:]
    dirs = run_dirs(sweep)
    assert len(dirs) == n_jobs, (dirs, output(proc)[-3000:])
    for d in dirs:
        assert (d / "summary.json").is_file(), (d, output(proc)[-3000:])
    return dirs


# ---- composition (fast) -------------------------------------------------------------------------


def test_grid_files_are_the_papers_grids():
    assert set(config_options("grid")) == set(GRIDS)
    for name, (key, values) in GRIDS.items():
        params = compose_config([f"grid={name}"]).hydra.sweeper.params
        assert list(params) == [key]
        assert [float(v) for v in params[key].split(",")] == [float(v) for v in values]


def test_plain_run_and_cfg_job_compose_without_a_grid():
    cfg = compose_config([])
    assert cfg.hydra.runtime.choices.get("grid") is None
    assert cfg.hydra.runtime.choices.get("hparams_search") is None
    assert not cfg.hydra.sweeper.get("params")
    assert OmegaConf.to_yaml(cfg.method)  # what --cfg job prints


def test_grid_composes_with_an_experiment_and_keeps_its_values():
    cfg = compose_config(["experiment=roberta_large_mezo", "task=rte", "grid=mezo_lr"])
    assert cfg.hydra.runtime.choices.grid == "mezo_lr"
    assert cfg.method.name == "mezo" and cfg.task.name == "rte"
    assert cfg.hydra.sweeper.params["method.lr"] == "1e-7,1e-6,1e-5"


def test_optuna_search_composes():
    need("optuna")
    cfg = compose_config(["hparams_search=dev_metric_optuna"])
    sweeper = cfg.hydra.sweeper
    assert "OptunaSweeper" in sweeper._target_
    assert sweeper.direction == "maximize" and sweeper.n_trials == 20
    assert set(sweeper.params) == {"method.lr", "method.eps"}
    assert all("log" in v for v in sweeper.params.values())


@pytest.mark.parametrize(
    ("launcher", "plugin", "target"),
    [
        ("local_joblib", "joblib", "JoblibLauncher"),
        ("slurm", "submitit", "SlurmLauncher"),
        ("local_submitit", "submitit", "LocalLauncher"),
    ],
)
def test_launchers_compose(launcher, plugin, target):
    need(plugin)
    cfg = compose_config([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "local_joblib":
        assert cfg.hydra.launcher.n_jobs == 2
    if launcher == "slurm":
        for key in ("partition", "gpus_per_node", "timeout_min", "mem_gb", "cpus_per_task"):
            assert key in cfg.hydra.launcher


def test_launcher_files_are_listed():
    assert {p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml")} == {
        "local_joblib",
        "slurm",
        "local_submitit",
    }


# ---- smoke runs (real CLI, tiny-llama, one step per job) -----------------------------------------


@pytest.mark.slow  # Hydra multirun: one child process per job
def test_basic_sweeper_runs_one_job_per_grid_value(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_entrypoint(
        [*SMOKE, "grid=mezo_lr", f"hydra.sweep.dir={sweep}"], tmp_path, multirun=True
    )
    dirs = check_ok(proc, 3, sweep)
    assert [run_config(d)["method"]["lr"] for d in dirs] == pytest.approx([1e-7, 1e-6, 1e-5])


@pytest.mark.slow  # Hydra multirun: one child process per job
def test_optuna_runs_its_trials_and_writes_results(tmp_path):
    need("optuna")
    sweep = tmp_path / "sweep"
    proc = run_entrypoint(
        [
            *SMOKE,
            "hparams_search=dev_metric_optuna",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        multirun=True,
    )
    dirs = check_ok(proc, 2, sweep)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"method.lr", "method.eps"}
    assert 0.0 <= results["best_value"] <= 1.0  # a dev accuracy
    for d in dirs:  # each trial drew its own values inside the search space
        cfg = run_config(d)
        assert 1e-7 <= cfg["method"]["lr"] <= 1e-3 and 1e-4 <= cfg["method"]["eps"] <= 1e-2


@pytest.mark.slow  # Hydra multirun: one child process per job
@pytest.mark.parametrize(("launcher", "plugin"), [("local_joblib", "joblib"), ("local_submitit", "submitit")])
def test_launcher_runs_two_jobs_under_the_sweep_dir(tmp_path, launcher, plugin):
    need(plugin)
    sweep = tmp_path / "sweep"
    proc = run_entrypoint(
        [*SMOKE, f"hydra/launcher={launcher}", "seed=0,1", f"hydra.sweep.dir={sweep}"],
        tmp_path,
        multirun=True,
    )
    dirs = check_ok(proc, 2, sweep)
    assert [run_config(d)["seed"] for d in dirs] == [0, 1]
    if plugin == "joblib":
        assert "Joblib" in output(proc)
    else:  # submitit's pickles and logs stay in the sweep folder, not in the cwd.
        submitit = sweep / ".submitit"
        assert submitit.is_dir() and any(submitit.rglob("*_result.pkl")), output(proc)[-3000:]
        leaked = {p.name for p in tmp_path.iterdir()} - {"sweep", "home"}
        assert not leaked, leaked
