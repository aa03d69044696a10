"""The real CLI under SIGTERM and in a failing sweep: a run killed mid-way saves a checkpoint and
says how to resume, and the resumed run's metrics equal an uninterrupted run's; a sweep job that
fails leaves its error in its folder and the other jobs run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import output, read_jsonl, run_entrypoint, subprocess_env

# AdaZeta with Adam (rule state) on tiny-bert: about 50 ms a step, 3 s in all; log every 4 steps,
# so a kill most likely falls mid-window; eval every 16.
RUN = [
    "model=tiny-bert", "method=adazeta", "method.update_rule=adam", "method.lr=1e-3", "train.batch_size=4",
    "task.num_train=16", "task.num_dev=8", "task.num_test=8", "train.progress=false", "train.max_steps=64",
    "train.eval_steps=16", "train.log_steps=4", "train.save_steps=20",
]
VARYING = ("time/", "mem/")


def curve(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VARYING)} for r in read_jsonl(run_dir / "metrics.jsonl")]


def start(tmp_path: Path, run_dir: Path) -> subprocess.Popen:
    """`python -m adazeta.cli.train *RUN` (what `adazeta-train` runs) in the background."""
    (tmp_path / "home").mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "adazeta.cli.train", *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
        env=subprocess_env(tmp_path / "home"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow  # 15-30 s: three CLI processes (tests/engine/test_resume.py signals a run in process, fast)
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches(tmp_path):
    killed = tmp_path / "killed"
    proc, full = start(tmp_path, killed), start(tmp_path, tmp_path / "full")  # one per core
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:  # until step 8 is logged
            metrics = killed / "metrics.jsonl"
            if metrics.exists() and any(r["step"] >= 8 for r in read_jsonl(metrics)):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        full_out = "".join(full.communicate(timeout=180))
    finally:
        proc.kill()
        full.kill()
    assert full.returncode == 0, full_out[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM, (stdout + stderr)[-3000:]
    assert "Traceback" not in stdout + stderr
    (checkpoint,) = (killed / "checkpoints").iterdir()
    step = int(checkpoint.name.removeprefix("step-"))
    assert 8 <= step < 64, "the run ended before the signal: make RUN longer"
    assert f"interrupted by SIGTERM at step {step}: checkpoint saved in {checkpoint}; resume with: adazeta-train " in stderr
    assert f"train.resume={killed}" in stderr and "model=tiny-bert" in stderr
    assert not (killed / "summary.json").exists()

    resumed = run_entrypoint([*RUN, f"train.resume={killed}"], tmp_path)  # into tmp_path/run
    assert resumed.returncode == 0, output(resumed)[-3000:]
    losses = [r["train/loss"] for r in curve(tmp_path / "full") if "train/loss" in r]
    assert len(set(losses)) == len(losses) == 16
    assert curve(tmp_path / "run") == curve(tmp_path / "full")
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "run")]
    for key in ("best/step", "best/eval_loss", "test/loss", "test/accuracy", "forward_passes"):
        assert summaries[0][key] == summaries[1][key], key


@pytest.mark.slow  # a Hydra multirun in a child process
def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    """`-m method.eps=0,1e-3`: job 0 fails validation, job 1 trains; the error is in job 0's
    folder, and the sweep's exit status says a job failed."""
    sweep = tmp_path / "sweep"
    proc = run_entrypoint(
        ["model=tiny-llama", "method=mezo", "train.max_steps=1", "train.eval_steps=1", "train.batch_size=4",
         "task.num_train=16", "task.num_dev=8", "task.num_test=8", "train.progress=false", "method.eps=0,1e-3",
         f"hydra.sweep.dir={sweep}"],
        tmp_path, multirun=True,
    )
    text = output(proc)
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text
    failed, ok = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert "method.eps=0.0 is out of range: it must be > 0" in (failed / "error.txt").read_text()
    assert not (failed / "summary.json").exists() and (ok / "summary.json").is_file()
    assert f"error: 1 job(s) of the sweep failed, each with its error in error.txt: {failed}" in text
