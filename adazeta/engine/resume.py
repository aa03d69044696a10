"""Resuming: the checkpoint `train.resume` names (a checkpoint folder, a run folder's newest one, or
`auto`: the newest intact checkpoint of a run with this config), whether it belongs to this run,
and rewinding a run folder to it: the metric rows and replay records up to its step carried over on
resume, the rows after it set aside after a guard rollback."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from adazeta.engine.checkpoint import (
    PREFIX,
    complete,
    config_changes,
    damage,
    mismatch,
    plain_config,
    read_json,
    verify,
)
from adazeta.errors import CheckpointError

log = logging.getLogger("adazeta")


def output_root(run_dir: Path, sweep_dir: Path | None) -> Path:
    """Where `train.resume=auto` looks: outputs/runs for single runs (run folders are
    <root>/<date>/<time>_...), outputs/multirun for sweep jobs (<root>/<date>/<time>/<job>)."""
    return sweep_dir.parent.parent if sweep_dir is not None else run_dir.parent.parent


def find(resume: str, cfg: DictConfig, run_dir: Path, sweep_dir: Path | None = None) -> Path | None:
    """The checkpoint folder `train.resume` names: a checkpoint folder, a run folder's newest
    checkpoint, or (`auto`) the newest checkpoint under the output root of a run with this config,
    None if there is none (so the same command starts a run and resumes it after a pre-emption)."""
    if resume == "auto":
        root = output_root(run_dir, sweep_dir)
        mine = plain_config(cfg)
        candidates = []
        states = [*root.glob(f"*/*/checkpoints/{PREFIX}*/state.json"), *root.glob(f"*/*/*/checkpoints/{PREFIX}*/state.json")]
        for state in states:
            try:
                saved = json.loads(state.read_text())
            except (OSError, ValueError):
                continue
            if not config_changes(saved.get("config", {}), mine):
                candidates.append((saved.get("time", 0.0), state.parent))
        if not candidates:
            log.info("train.resume=auto: no checkpoint of a run with this config under %s; starting afresh", root)
            return None
        damaged = []
        for _, folder in sorted(candidates, reverse=True):  # newest first
            wrong = damage(folder)
            if wrong is None:
                log.info("train.resume=auto: resuming from %s, the newest intact one of %d checkpoints of runs with "
                         "this config%s", folder, len(candidates),
                         f" (skipped {len(damaged)} newer damaged ones: {', '.join(map(str, damaged))})" if damaged else "")
                return folder
            log.warning("train.resume=auto: skipping a damaged checkpoint: %s", wrong)
            damaged.append(folder)
        log.warning("train.resume=auto: every checkpoint of a run with this config under %s is damaged; starting afresh", root)
        return None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"train.resume={resume!r} is not a folder: give a run folder, one of its "
                              "checkpoints/step-<N> folders, or auto")
    if (path / "state.json").is_file():
        return intact(path, cfg)
    if path.name.startswith(PREFIX):
        raise CheckpointError(f"train.resume={resume!r} is an incomplete checkpoint (no state.json): the run was "
                              "stopped while writing it; resume from its run folder to take the newest complete one")
    found = complete(path / "checkpoints")
    if not found:
        raise CheckpointError(
            f"train.resume={resume!r} has no checkpoint (no checkpoints/{PREFIX}<N>/state.json in it): "
            "runs save one every train.save_steps steps, at the end and on SIGINT/SIGTERM; start this run "
            "afresh, or give the folder of a run that saved one"
        )
    return intact(found[-1], cfg)


def intact(folder: Path, cfg: DictConfig) -> Path:
    """precheck(), and when the checkpoint is damaged, an error that names the newest intact
    checkpoint of the same run."""
    wrong = damage(folder)
    if wrong:
        other = next((f for f in reversed(complete(folder.parent)) if f != folder and damage(f) is None), None)
        hint = f". The newest intact checkpoint of this run is {other}: resume from it with train.resume={other}"
        raise CheckpointError(wrong + (hint if other else ""))
    return precheck(folder, cfg)


def precheck(folder: Path, cfg: DictConfig) -> Path:
    """What can be checked before the model loads: every file (verify), the run's identity and
    the step."""
    saved = verify(folder)
    mine = {"method": cfg.method.name, "optimizer": cfg.method.optimizer.value, "update_rule": cfg.method.update_rule.value,
            "trainable": cfg.method.trainable.value, "model": cfg.model.name, "task": cfg.task.name, "seed": cfg.seed}
    mismatch(folder, saved["identity"], mine)
    if saved["step"] > cfg.train.max_steps:
        raise CheckpointError(f"checkpoint {folder} is at step {saved['step']}, past train.max_steps={cfg.train.max_steps}: "
                              f"set train.max_steps >= {saved['step']} to continue the run")
    return folder


def rows_until(path: Path, step: int) -> list[dict]:
    """The JSONL rows of a run up to `step`, without the end-of-run best/test rows."""
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or type(row.get("step")) is not int:
            raise CheckpointError(f"{path}, line {i}: not a metrics row with a step ({line[:80]!r}); the earlier run's "
                                  "curve is damaged: fix or delete that line, then resume again (nothing was changed)")
        rows.append(row)
    return [r for r in rows if r["step"] <= step and not any(k.startswith(("best/", "test/")) for k in r)]


def carry_over(folder: Path, run_dir: Path) -> tuple[list[dict], list[str]]:
    """Prepare a resumed run's folder: returns the old run's metric rows up to the checkpoint (to
    log again, so every logger sees the whole curve) and its replay records; copies the best-dev
    weights. Resuming into the old run's own folder rewinds it to the checkpoint."""
    old_run = folder.parent.parent
    saved = read_json(folder / "state.json")
    step, count = saved["step"], saved.get("replay_records") or 0
    rows = rows_until(old_run / "metrics.jsonl", step)
    replay = old_run / "replay.jsonl"
    records = replay.read_text().splitlines()[:count] if replay.is_file() else []
    for name in ("metrics.jsonl", "replay.jsonl", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)  # only non-empty when resuming in place
    for later in complete(run_dir / "checkpoints"):
        if int(later.name[len(PREFIX):]) > step:
            shutil.rmtree(later)
    best = folder / "best_trainable.safetensors"
    if best.exists():
        tmp = run_dir / "best_trainable.safetensors.tmp"
        shutil.copyfile(best, tmp)
        tmp.replace(run_dir / "best_trainable.safetensors")
    (run_dir / "resumed_from.txt").write_text(f"{folder}\n")
    log.info("resuming from %s (step %d of run %s)", folder, step, old_run)
    return rows, records


def rewind_metrics(run_dir: Path, step: int) -> None:
    """After a rollback: move the rows logged after `step` to metrics_rolled_back.jsonl, so
    metrics.jsonl stays one curve (the log file keeps the whole story)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    with (run_dir / "metrics_rolled_back.jsonl").open("a") as f:
        f.writelines(line for line in lines if json.loads(line)["step"] > step)
    path.write_text("".join(keep))  # same file: the logger's append-mode handle writes after it
