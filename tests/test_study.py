"""adazeta-study: budgets in forward passes, selection on dev only, the seeds of the chosen point,
a report from the runs, and no run started twice. Runs the real entrypoint on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

from adazeta.cli.compare import read_run
from adazeta.cli.study import STUDY_DIR, load_plan, main, seed_runs, steps_for_budget

TINY = ["model=tiny-llama", "train.batch_size=4", "task.num_train=16", "task.num_dev=8", "task.num_test=8"]


def test_budget_counts_forward_passes_of_the_query_schedule():
    # 16 examples at batch 4: 4 steps per epoch. Constant Q=3 costs 6 passes a step.
    constant = [*TINY, "method=adazeta", "schedule=constant", "schedule.q=3"]
    assert steps_for_budget(constant, 60) == 10
    # AdaZeta's schedule with alpha 2, beta 1: Q = 1 in epoch 0 (floor at 1), 2 in epoch 1, 4 in
    # epoch 2: 4 steps x 2 + 4 x 4 = 24 passes, then 8 passes a step in epoch 2.
    adaptive = [*TINY, "method=adazeta", "schedule.alpha=2", "schedule.beta=1", "schedule.q_max=8", "schedule.q_min=1"]
    assert steps_for_budget(adaptive, 24) == 8
    assert steps_for_budget(adaptive, 24 + 8 * 3) == 11
    assert steps_for_budget([*TINY, "method=lora_fo"], 7) == 7  # one forward (and backward) a step


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDY_DIR.glob("*.yaml")))
def test_every_shipped_plan_composes_every_run(name):
    plan = load_plan(name, Path("/nonexistent"), None)
    roles = {r.role for r in plan.runs}
    # Every plan measures its zero-shot, and something against it: a search, or (the ceiling plan) LoRA with Adam.
    assert "floor" in roles and roles & {"search", "ceiling"}, roles
    for r in plan.runs:
        assert r.steps >= 0 and any(o.startswith("task.data_dir=") for o in r.overrides), r.overrides


def test_unknown_plan_and_setting_name_the_choices(capsys):
    assert main(["nope"]) == 2
    assert "no study plan 'nope'" in capsys.readouterr().err
    assert main(["quick", "--settings", "smollm2_sst3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "smollm2_sst3" in err and "smollm2_sst2" in err


@pytest.mark.slow  # a whole study: eight runs
def test_study_selects_on_dev_reruns_the_choice_and_skips_finished_runs(tmp_path, monkeypatch):
    plan_file = tmp_path / "tiny.yaml"
    plan_file.write_text(json.dumps({
        "name": "tiny", "out": str(tmp_path / "study"), "seeds": [0, 1],
        "common": ["train.progress=false", "task.data_dir=null"],
        "settings": {"tiny_sst2": {"overrides": [*TINY, "task=sst2"], "budget": 8, "eval_every": 4}},
        # One lr that cannot move the weights measurably and one that can: selection must follow dev.
        "methods": {"mezo_lora": {"grid": {"method.lr": [1e-9, 0.5]}}},
    }))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "executable", sys.executable)
    import os

    for k, v in subprocess_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    assert main([str(plan_file)]) == 0
    root = tmp_path / "study" / "tiny_sst2"
    search = {p.name: read_run(p) for p in (root / "mezo_lora").iterdir() if p.name.endswith("_s0")}
    assert sorted(search) == ["lr0.5_s0", "lr1e-09_s0"]
    for run in search.values():  # 8 passes at 2 per step; the curve starts at zero-shot (step 0)
        assert run.summary["forward_passes"] == 8 and run.rows[0]["step"] == 0
        assert run.summary["label"] == "mezo_lora"
    best = max(search, key=lambda n: (search[n].summary["best/eval_accuracy"], -search[n].summary["best/eval_loss"]))
    point = best.removesuffix("_s0")
    rerun = read_run(root / "mezo_lora" / f"{point}_s1")
    assert rerun.summary["seed"] == 1
    assert (root / "zero_shot" / "summary.json").is_file()
    report = (tmp_path / "study" / "report.md").read_text()
    assert "## tiny_sst2" in report and "Zero-shot: dev accuracy" in report
    assert report.count("✓") == 1 and f"| mezo_lora | {point} |" in report
    assert (tmp_path / "study" / "tiny_sst2_dev_loss.png").stat().st_size > 0

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "study").rglob("summary.json")}
    assert main([str(plan_file)]) == 0  # a second call finds every run finished
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "study").rglob("summary.json")} == stamps
    assert len(seed_runs(load_plan(str(plan_file), None, None))) == 1
    assert os.listdir(tmp_path / "study" / "logs")


def test_makefile_and_readme_name_the_study():
    assert "adazeta-study quick" in (REPO / "Makefile").read_text()


def test_a_finished_run_of_other_settings_is_never_reused(tmp_path):
    from adazeta.cli.study import RunSpec
    from adazeta.errors import ConfigError

    spec = RunSpec("s", "adazeta", "search", {"method.lr": 0.01}, 0, ["method.lr=0.01", "train.max_steps=150"],
                   tmp_path / "lr0.01_s0")
    assert not spec.done  # nothing there yet
    spec.folder.mkdir()
    (spec.folder / "summary.json").write_text("{}")
    (spec.folder / "study.json").write_text(json.dumps({"overrides": ["method.lr=0.01", "train.max_steps=100"]}))
    with pytest.raises(ConfigError, match=r"other settings.*train.max_steps=100.*train.max_steps=150"):
        assert spec.done  # the plan's budget changed since that run: a rerun is needed, not a silent reuse
    (spec.folder / "study.json").write_text(json.dumps({"overrides": spec.overrides}))
    assert spec.done
