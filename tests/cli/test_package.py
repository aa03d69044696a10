"""The wheel is the whole program: built from this checkout, installed into a fresh virtual
environment, `adazeta-train` finds its configs and runs from a folder that knows nothing of the
checkout."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import CONF_DIR, REPO, TINY_RUN, output, subprocess_env


def run(args: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} exited {proc.returncode}:\n{output(proc)[-3000:]}"
    return proc


def running_site_packages() -> list[str]:
    """The site-packages folders of the interpreter running the suite (a system Python, a venv, a
    conda environment; the user's own folder too), where torch, hydra and transformers are.

    `python -m venv --system-site-packages` is not enough: from inside a venv its "system" is the
    base interpreter, which lacks them. A .pth file naming these folders adds them after the new
    environment's own site-packages, so the wheel installed there still comes first; .pth files
    inside them are not run, so the checkout's editable install stays out of sight."""
    dirs = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def test_the_wheel_ships_the_configs_and_adazeta_train_runs_from_it(tmp_path):
    # Built from a copy, so that the build's build/ and egg-info stay out of the checkout; the copy
    # keeps links as links (adazeta/conf is one in a checkout).
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "outputs", "build", "*.egg-info", "__pycache__", ".venv", ".pytest_cache", ".ruff_cache", "wandb",
    ))
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, src], tmp_path)
    (wheel,) = wheels.glob("adazeta-*.whl")

    shipped = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"adazeta/conf/{p.relative_to(CONF_DIR).as_posix()}"
               for suffix in ("*.yaml", "*.md") for p in CONF_DIR.rglob(suffix)}
    assert {"adazeta/conf/config.yaml", "adazeta/conf/model/tiny-llama.yaml",
            "adazeta/conf/experiment/README.md"} <= configs
    assert sorted(configs - shipped) == [], "config files missing from the wheel"

    # A fresh environment that sees the running environment's torch and transformers (nothing to
    # download) but not the checkout; that environment's pip installs into it.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python, train = venv / "bin" / "python", venv / "bin" / "adazeta-train"
    venv_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).stdout.strip())
    (venv_site / "zz_running_env.pth").write_text("".join(f"{d}\n" for d in running_site_packages()))
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], tmp_path)

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "home").mkdir(parents=True)
    env = subprocess_env(elsewhere / "home")
    env.pop("PYTHONPATH", None)
    # The package and its configs come from the venv, not from the checkout (an editable install
    # of the checkout may be on the system's path too).
    where = run([python, "-c", "import json, adazeta.cli.train as t; print(json.dumps([t.__file__, t.CONF_DIR]))"],
                elsewhere, env)
    module, conf = map(Path, json.loads(where.stdout))
    venv_site = venv_site.resolve()
    assert module.is_relative_to(venv_site) and conf == venv_site / "adazeta" / "conf"
    assert (conf / "config.yaml").is_file()

    job = run([train, "--cfg", "job", "model=tiny-llama"], elsewhere, env)
    assert "name: tiny-llama" in job.stdout and "max_steps:" in job.stdout

    run_dir = tmp_path / "run"
    run([train, "model=tiny-llama", *TINY_RUN, f"hydra.run.dir={run_dir}"], elsewhere, env)
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = {json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert max(steps) == 2 and summary["data/train"] == 16 and 0 <= summary["test/accuracy"] <= 1
