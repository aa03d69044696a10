"""Shared fixtures: offline environment, Hydra compose, tiny models, and the real entrypoint as a
subprocess.

Everything runs on CPU, offline, on the two-layer random models of conf/model/tiny-*.yaml.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Before anything imports transformers/wandb: no network, no stray wandb mode from the shell.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("WANDB_MODE", None)  # logger.mode decides; a shell's WANDB_MODE would override it
os.environ.pop("HYDRA_FULL_ERROR", None)  # error tests check that no traceback is printed
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

import adazeta.config  # noqa: E402

# One thread: the tests' tensors are tiny, and with 2 threads on a 2-core machine that is busy with
# anything else, OpenMP barriers made tiny ops ~30x slower (measured: 1000 small Linear calls
# 0.03 s with 1 thread, 1.0 s with 2).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = Path(adazeta.config.CONF_DIR)
# The data of every small run in these tests: 16 train, 8 dev and 8 test examples, batches of 4, no
# progress bar.
SMALL = ["train.batch_size=4", "task.num_train=16", "task.num_dev=8", "task.num_test=8", "train.progress=false"]
# The spine of every two-step run.
TINY_RUN = ["train.max_steps=2", "train.eval_steps=1", *SMALL]
ENTRYPOINT_TIMEOUT = 180


def config_options(group: str) -> list[str]:
    """The options of a config group, discovered from conf/<group>/*.yaml."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# conf/study holds adazeta-study's plans (adazeta/cli/study.py), not a group of adazeta-train.
NOT_GROUPS = {"study"}


def config_groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in NOT_GROUPS)


def compose_config(overrides: Iterable[str] = (), hydra_config: bool = True) -> DictConfig:
    """Compose conf/config.yaml with Hydra's compose API, exactly as the entrypoint would
    (adazeta.config.compose_config), keeping the `hydra` node by default."""
    return adazeta.config.compose_config(overrides, hydra_config=hydra_config)


def job_config(cfg: DictConfig) -> DictConfig:
    """The config without its `hydra` node (which has interpolations only a real run can resolve)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg("model=tiny-bert", ...) -> the composed config (with its hydra node)."""
    return lambda *overrides: compose_config(overrides)


def tiny_model(name: str):
    """adazeta.models.load.load_model on conf/model/<name>.yaml (seeded, so the weights are fixed)."""
    from adazeta.models.load import load_model

    cfg = compose_config([f"model={name}", "model.device=cpu"], hydra_config=False)
    torch.manual_seed(0)
    return load_model(cfg.model, num_labels=2)


def build_run_on(overrides: Iterable[str]):
    """The run of a composed config, built by the loop's build path (adazeta/engine/build.py, seeded
    with `seed`, 0 by default) -> Run."""
    from adazeta.engine.build import build_run

    return build_run(compose_config(overrides, hydra_config=False))


def build_method_on(overrides: Iterable[str]):
    """The method, objective and task of a composed config, as the loop builds them:
    -> (Method, Objective, Task)."""
    run = build_run_on(overrides)
    return run.method, run.objective, run.task


def built_step(*overrides: str):
    """A small run (SMALL + overrides) built by the loop's build path, with the loss of one training
    batch as a closure and the guard a step is handed: -> (cfg, Run, loss_fn, Guard)."""
    from adazeta.engine.build import build_run, to_device
    from adazeta.engine.guard import Guard

    cfg = job_config(compose_config([*SMALL, *overrides]))
    b = build_run(cfg)
    batch = to_device(b.objective.encode(b.splits.train[:4], train=True), b.device)
    loss_fn = lambda: b.objective.forward(b.method.model, batch)[0].mean()  # noqa: E731
    return cfg, b, loss_fn, Guard(cfg.guard)


def subprocess_env(home: Path) -> dict[str, str]:
    """The caller's environment, offline, one thread, and HOME in the test's folder: a run that
    writes caches or logs into the user's home shows up there."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(home)})
    for key in ("WANDB_MODE", "HYDRA_FULL_ERROR", "WANDB_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        env.pop(key, None)
    return env


def run_entrypoint(
    overrides: Iterable[str], tmp_path: Path, multirun: bool = False, timeout: float = ENTRYPOINT_TIMEOUT,
) -> subprocess.CompletedProcess:
    """`python -m adazeta.cli.train *overrides hydra.run.dir=<tmp_path>/run` with cwd=tmp_path and
    HOME=<tmp_path>/home, so that anything written outside the run folder shows up in tmp_path.
    With multirun=True: `-m`, and the overrides should set hydra.sweep.dir."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    args = [sys.executable, "-m", "adazeta.cli.train"]
    if multirun:
        args.append("-m")
    args += list(overrides)
    if not multirun:
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    return subprocess.run(
        args, cwd=tmp_path, env=subprocess_env(home), capture_output=True, text=True, timeout=timeout,
    )


def run_entrypoints(jobs: dict[str, tuple[list[str], Path]], workers: int | None = None) -> dict:
    """Run several entrypoint subprocesses concurrently (each is mostly import time, single core):
    {name: (overrides, tmp_path)} -> {name: CompletedProcess}."""
    workers = workers or max(os.cpu_count() or 1, 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run_entrypoint, ov, path) for name, (ov, path) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


@pytest.fixture
def entrypoint(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """entrypoint("model=tiny-bert", ...) runs the real CLI in tmp_path; the run folder is tmp_path/run."""
    return lambda *overrides, **kw: run_entrypoint(overrides, tmp_path, **kw)


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
