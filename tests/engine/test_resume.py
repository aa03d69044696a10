"""Checkpoints and resume, in process on two-layer models: a run continued from a checkpoint (one
that falls mid log window and between evaluations) writes exactly the uninterrupted run's metrics,
update-rule state, RNG states and data position included; an interrupted run resumes with
`train.resume=auto`. (tests/engine/test_interrupt.py does the same through the real CLI and SIGTERM.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from conftest import compose_config, job_config, read_jsonl
from safetensors.torch import load_file

from adazeta.cli.replay import replay
from adazeta.engine.loop import run
from adazeta.engine.replay_log import ReplayLog
from adazeta.errors import Interrupted
from adazeta.validate import validate

BASE = [
    "train.batch_size=4", "task.num_train=16", "task.num_dev=8", "task.num_test=8", "train.progress=false",
    "train.max_steps=10", "train.eval_steps=5", "train.log_steps=4", "train.save_steps=3",
    "train.save_total_limit=10",
]
# Each exercises other state: Adam moments; momentum on every weight of a decoder; AdamW's moments
# and dropout, which draws from the global torch RNG (first-order methods train with dropout on).
METHODS = {
    "adazeta-adam": ["model=tiny-bert", "method=adazeta", "method.update_rule=adam", "method.lr=1e-3"],
    "mezo-momentum": ["model=tiny-llama", "method=mezo", "method.update_rule=momentum", "method.lr=1e-3"],
    "ft": ["model=tiny-bert", "method=ft", "method.lr=1e-3"],
    # FZOO (stateless, Rademacher noise from seeds) and LOZO-M (low-rank momentum; with
    # nu = 4 the checkpoint at step 6 falls inside the second V, which the resumed run regenerates).
    "fzoo": ["model=tiny-llama", "method=fzoo", "method.fzoo.n=2", "method.lr=1e-3"],
    "lozo-m": ["model=tiny-llama", "method=lozo_m", "method.lozo.interval=4", "method.lr=1e-3"],
    # HiZOO's Hessian estimate Sigma (alpha large enough that it moves every step).
    "hizoo": ["model=tiny-llama", "method=hizoo", "method.hizoo.alpha=1e-2", "method.lr=1e-3"],
}
VARYING = ("time/", "mem/")  # wall-clock and memory differ between processes; everything else may not


def train(root: Path, name: str, *overrides: str) -> Path:
    """run() in process, in <root>/runs/day/<name> (so that `auto` searches <root>/runs)."""
    run_dir = root / "runs" / "day" / name
    run_dir.mkdir(parents=True)
    cfg = job_config(compose_config([*BASE, *overrides]))
    validate(cfg)
    run(cfg, run_dir)
    return run_dir


def curve(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(VARYING)} for row in read_jsonl(run_dir / "metrics.jsonl")]


def assert_same_run(resumed: Path, full: Path) -> None:
    assert curve(resumed) == curve(full)
    assert (resumed / "replay.jsonl").exists() == (full / "replay.jsonl").exists()
    if (full / "replay.jsonl").exists():
        assert (resumed / "replay.jsonl").read_text() == (full / "replay.jsonl").read_text()
    a, b = (load_file(str(d / "checkpoints" / "step-0000010" / "trainable.safetensors")) for d in (resumed, full))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (resumed, full))
    assert {k: v for k, v in sa.items() if not k.startswith(VARYING) and k != "resumed_from"} == \
        {k: v for k, v in sb.items() if not k.startswith(VARYING) and k != "resumed_from"}


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_from_a_mid_window_checkpoint_reproduces_the_run(tmp_path, name):
    full = train(tmp_path, "full", *METHODS[name])
    # Step 6: two steps into a log window of 4, one step after the eval at 5.
    resumed = train(tmp_path, "resumed", *METHODS[name], f"train.resume={full}/checkpoints/step-0000006")
    losses = [r["train/loss"] for r in curve(full) if "train/loss" in r]
    assert len(set(losses)) == len(losses) == 3  # the run moves: equal curves are not vacuous
    assert_same_run(resumed, full)
    assert (resumed / "resumed_from.txt").read_text().strip() == str(full / "checkpoints" / "step-0000006")
    state = json.loads((full / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["step"] == state["data_position"] == 6 and len(state["window"]) == 2


def test_checkpoints_are_pruned_to_the_limit_and_keep_the_best_apart(tmp_path):
    run_dir = train(tmp_path, "run", *METHODS["adazeta-adam"], "train.save_total_limit=2")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000009", "step-0000010"]
    summary = json.loads((run_dir / "summary.json").read_text())
    best = load_file(str(run_dir / "best_trainable.safetensors"))
    kept = load_file(str(run_dir / "checkpoints" / "step-0000010" / "best_trainable.safetensors"))
    assert summary["best/step"] in (5, 10) and all(best[k].equal(kept[k]) for k in best)


def test_interrupted_run_resumes_with_auto(tmp_path, monkeypatch):
    """SIGTERM at step 6 (sent from inside the run) stops it after that step with a checkpoint and
    the command to resume; `train.resume=auto` with the same config finds it and finishes the run
    exactly as an uninterrupted one."""
    overrides = METHODS["adazeta-adam"]
    full = train(tmp_path / "elsewhere", "full", *overrides)  # another output root: auto must not find it
    append = ReplayLog.append

    def append_and_signal(self, step, *args):
        append(self, step, *args)
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ReplayLog, "append", append_and_signal)
    # The resume hint repeats the command line: make it this run's, not pytest's (whose -m would
    # read as a sweep).
    monkeypatch.setattr(sys, "argv", ["adazeta-train", *overrides])
    with pytest.raises(Interrupted) as info:
        train(tmp_path, "first", *overrides)
    first = tmp_path / "runs" / "day" / "first"
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert f"interrupted by SIGTERM at step 6: checkpoint saved in {first / 'checkpoints' / 'step-0000006'}" in str(info.value)
    assert f"train.resume={first}" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone
    monkeypatch.setattr(ReplayLog, "append", append)

    resumed = train(tmp_path, "second", *overrides, "train.resume=auto")
    assert (resumed / "resumed_from.txt").read_text().strip() == str(first / "checkpoints" / "step-0000006")
    assert_same_run(resumed, full)


def test_an_interrupted_run_leaves_its_replay_log_closed_and_complete(tmp_path, monkeypatch):
    """SIGTERM at step 6: the run's exit closes the replay log (as every exit does), and the log
    holds every step up to the checkpoint, so that adazeta-replay rebuilds that checkpoint's
    weights exactly from it."""
    overrides = METHODS["adazeta-adam"]
    append, logs = ReplayLog.append, []

    def append_and_signal(self, step, *args):
        append(self, step, *args)
        logs.append(self)
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ReplayLog, "append", append_and_signal)
    monkeypatch.setattr(sys, "argv", ["adazeta-train", *overrides])
    with pytest.raises(Interrupted):
        train(tmp_path, "first", *overrides)
    first = tmp_path / "runs" / "day" / "first"
    (log,) = set(logs)
    assert log.file.closed
    assert [r["step"] for r in read_jsonl(first / "replay.jsonl")] == [1, 2, 3, 4, 5, 6]
    out = replay(first)
    assert out["steps"] == 6 and out["checkpoint"] == str(first / "checkpoints" / "step-0000006")
    assert out["unequal"] == [] and out["tensors"] > 0


def test_auto_without_a_checkpoint_starts_afresh(tmp_path):
    run_dir = train(tmp_path, "run", *METHODS["adazeta-adam"], "train.max_steps=2", "train.resume=auto")
    assert not (run_dir / "resumed_from.txt").exists()
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"] is None


def test_resume_with_a_changed_lr_uses_the_new_lr(tmp_path):
    full = train(tmp_path, "full", *METHODS["mezo-momentum"], "train.max_steps=6")
    resumed = train(tmp_path, "resumed", *METHODS["mezo-momentum"], "train.max_steps=8", "method.lr=5e-4",
                    f"train.resume={full}")
    lrs = {r["step"]: r["train/lr"] for r in read_jsonl(resumed / "metrics.jsonl") if "train/lr" in r}
    assert lrs == {4: 1e-3, 6: 1e-3, 8: 5e-4}


def test_auto_skips_damaged_checkpoints_says_so_and_still_reproduces_the_run(tmp_path, caplog):
    """The newest two checkpoints of the run `auto` finds are damaged (truncated weights; truncated
    best weights): it resumes from the newest intact one, says which it skipped, and the resumed
    run still equals the uninterrupted one."""
    overrides = METHODS["mezo-momentum"]
    first = train(tmp_path, "first", *overrides)  # checkpoints at steps 3, 6, 9, 10
    full = tmp_path / "elsewhere" / "full"  # an intact copy, in a root `auto` does not search
    shutil.copytree(first, full)
    for step, name in ((10, "trainable.safetensors"), (9, "best_trainable.safetensors")):
        path = first / "checkpoints" / f"step-{step:07d}" / name
        data = path.read_bytes()[:100]
        path.unlink()  # best weights are hard links shared between checkpoints: damage this one only
        path.write_bytes(data)
    caplog.set_level(logging.INFO, logger="adazeta")
    resumed = train(tmp_path, "second", *overrides, "train.resume=auto")
    assert (resumed / "resumed_from.txt").read_text().strip() == str(first / "checkpoints" / "step-0000006")
    assert caplog.text.count("train.resume=auto: skipping a damaged checkpoint: cannot read") == 2
    assert "the newest intact one of 4 checkpoints of runs with this config (skipped 2 newer damaged ones" in caplog.text
    assert_same_run(resumed, full)


def test_cuda_rng_states_restore_by_numeric_index_and_drop_missing_gpus(monkeypatch, caplog):
    """A checkpoint written with 12 visible GPUs, resumed with 4: GPU i gets rng.cuda.<i> (string
    order would hand GPU 2 the state of GPU 10), the others are dropped with a warning. CUDA's
    setters are faked (no GPU here); the restore code is the real one."""
    import torch

    from adazeta.engine.checkpoint import cuda_rng_states, rng_state, set_rng_state

    now, scalars = rng_state()  # restoring them below leaves this process's RNGs as they are
    tensors = {**now, **{f"rng.cuda.{i}": torch.full((8,), i, dtype=torch.uint8) for i in range(12)}}
    kept, dropped = cuda_rng_states(tensors, 4)
    assert list(kept) == [0, 1, 2, 3] and dropped == list(range(4, 12))
    assert all(torch.equal(state, tensors[f"rng.cuda.{i}"]) for i, state in kept.items())
    assert cuda_rng_states(tensors, 16) == ({i: tensors[f"rng.cuda.{i}"] for i in range(12)}, [])

    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.__setitem__(device, state))
    with caplog.at_level(logging.WARNING, logger="adazeta"):
        set_rng_state(tensors, scalars)
    assert sorted(restored) == [0, 1, 2, 3]
    assert all(int(restored[i][0]) == i for i in range(4))
    assert "[4, 5, 6, 7, 8, 9, 10, 11]" in caplog.text and "not restored" in caplog.text
