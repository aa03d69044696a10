"""adazeta-study: budgets in forward passes, selection on dev only, the seeds of the chosen point,
a report from the runs, and no run started twice. Runs the real entrypoint on a tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

from adazeta.cli.compare import read_run
from adazeta.cli.study import main
from adazeta.cli.study_plan import STUDY_DIR, load_plan, seed_runs, steps_for_budget

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
    assert json.loads((root / "zero_shot" / "study.json").read_text())["wall_s"] > 0  # the part's time adds these
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
    from adazeta.cli.study_plan import RunSpec
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


# ------------------------------------------------------------------------------ the leaderboard
# A leaderboard of three ZO methods (and one never run) on two settings, written as finished run
# folders the way adazeta/engine/loop.py writes them (tests/run_files.py's write_run), with
# numbers chosen so that the ranks, means and stds below can be computed by hand.
BOARD = {
    "name": "board", "report": "leaderboard", "seeds": [0, 1, 2],
    "common": ["train.progress=false", "task.data_dir=null", *TINY, "task=sst2"],
    "settings": {
        "t1": {"overrides": [], "budget": 8, "eval_every": 4, "target_loss": 0.6,
               "estimate": {"start_s": 10, "pass_s": 1, "example_s": 0.5},
               "ceiling": {"lora_fo": {"overrides": ["method=lora_fo"], "steps": 4}}},
        "t2": {"overrides": ["task.num_dev=6"], "budget": 8, "eval_every": 4, "target_loss": 0.6,
               "absent": {"mezo": "full-parameter MeZO is out of this setting's memory"}},
    },
    "methods": {"mezo_lora": {"grid": {"method.lr": [1e-3, 1e-2]}}, "mezo": {}, "lozo": {}, "hizoo": {}},
    "absent": {"fzoo": "its 9 passes a step leave too few steps at this budget"},
}
ZERO_SHOT_TEST = {"t1": 0.50, "t2": 0.40}
# (setting, method) -> per seed: test accuracy, dev loss at 0 / 4 / 8 forward passes, step seconds,
# peak over inference. The search's other point (mezo_lora lr 1e-2) has a worse dev accuracy.
RESULTS = {
    ("t1", "mezo_lora"): [(0.60, [0.9, 0.7, 0.55], 0.5, 1.02), (0.64, [0.9, 0.58, 0.5], 0.6, 1.04),
                          (0.62, [0.9, 0.65, 0.62], 0.7, 1.06)],
    ("t1", "mezo"): [(0.55, [0.9, 0.8, 0.7], 1.0, 1.5)] * 2 + [(0.58, [0.9, 0.8, 0.7], 1.0, 1.5)],
    ("t1", "lozo"): [(0.70, [0.9, 0.8, 0.7], 1.0, 1.5), (0.40, [0.9, 0.8, 0.7], 1.0, 1.5),
                     (0.52, [0.9, 0.8, 0.7], 1.0, 1.5)],
    ("t1", "lora_fo"): [(0.80, [0.9, 0.5, 0.4], 2.0, 1.7), (0.82, [0.9, 0.5, 0.4], 2.0, 1.7),
                        (0.84, [0.9, 0.5, 0.4], 2.0, 1.7)],
    ("t2", "mezo_lora"): [(0.45, [0.9, 0.8, 0.7], 0.5, 1.02)] * 3,
    ("t2", "lozo"): [(0.50, [0.9, 0.8, 0.7], 1.0, 1.5), (0.48, [0.9, 0.8, 0.7], 1.0, 1.5),
                     (0.52, [0.9, 0.8, 0.7], 1.0, 1.5)],
}


def finish(spec, test: float, dev: list[float], step_s: float, ratio: float, best_dev: float = 0.7,
           wall_s: float | None = 60.0) -> None:
    """A finished run in `spec`'s folder: dev at step 0 and every eval_steps, a logged step time at
    each, its study.json (with the study's wall seconds, or without them as before they existed)."""
    spec.folder.mkdir(parents=True)
    passes = spec.passes // max(spec.steps, 1)  # per step
    rows = [{"step": 0, "forward_passes": 0, "eval/loss": dev[0], "eval/accuracy": 0.5}]
    for i, loss in enumerate(dev[1:], 1):
        step = i * spec.eval_steps
        rows.append({"step": step, "forward_passes": passes * step, "time/step_s": step_s,
                     "eval/loss": loss, "eval/accuracy": 0.6})
    (spec.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"method": spec.label, "label": spec.label, "task": "sst2", "model": "tiny-llama", "seed": spec.seed,
               "steps": spec.steps, "forward_passes": spec.passes, "metric": "accuracy",
               "best/eval_loss": min(dev), "best/eval_accuracy": best_dev, "test/accuracy": test,
               "mem/peak_gib": ratio, "mem/inference_gib": 1.0, "mem/peak_over_inference": ratio, "time/wall_s": 120.0}
    (spec.folder / "summary.json").write_text(json.dumps(summary))
    record = {"overrides": spec.overrides, **({} if wall_s is None else {"wall_s": wall_s})}
    (spec.folder / "study.json").write_text(json.dumps(record))


@pytest.fixture
def board(tmp_path: Path):
    """The BOARD plan with its runs finished (hizoo's search failed on t1, not run on t2)."""
    from adazeta.cli.study_plan import seed_runs

    plan_file = tmp_path / "board.yaml"
    plan_file.write_text(json.dumps({**BOARD, "out": str(tmp_path / "board")}))
    plan = load_plan(str(plan_file), None, None)
    for r in plan.runs:
        if r.role == "floor":  # t2's as recorded before study.json had wall_s: its own 120 s count
            finish(r, ZERO_SHOT_TEST[r.setting], [0.9], 0.0, 1.0, best_dev=0.5, wall_s=None if r.setting == "t2" else 60.0)
        elif r.label == "mezo_lora" and r.point["method.lr"] == 1e-2:
            finish(r, 0.99, [0.9, 0.9, 0.9], 0.5, 1.0, best_dev=0.55)  # worse on dev: never chosen, test unseen
        elif r.label == "hizoo":
            if r.setting == "t1":
                r.folder.mkdir(parents=True)
                (r.folder / "error.txt").write_text("Traceback ...\nRuntimeError: the loss is nan at step 2\n")
        elif r.role in ("search", "ceiling"):
            finish(r, *RESULTS[(r.setting, r.label)][r.seed])
    for r in seed_runs(plan):
        finish(r, *RESULTS[(r.setting, r.label)][r.seed])
    return plan_file, plan


def test_leaderboard_ranks_by_mean_test_gain_over_seeds(board):
    from adazeta.cli.leaderboard import leaderboard, task_board

    plan_file, plan = board
    b1, b2 = task_board(plan, "t1"), task_board(plan, "t2")
    assert [(e.label, e.rank) for e in b1.entries] == [("mezo_lora", 1), ("mezo", 2), ("lozo", 3), ("lora_fo", None)]
    assert [(e.label, e.rank) for e in b2.entries] == [("lozo", 1), ("mezo_lora", 2)]
    by = {e.label: e for e in b1.entries}
    assert by["mezo_lora"].gains == pytest.approx([10, 14, 12]) and by["mezo_lora"].point == "lr0.001"
    assert by["mezo_lora"].s_per_pass == pytest.approx((0.25 + 0.30 + 0.35) / 3)  # step seconds over 2 passes a step
    fzoo = "absent: its 9 passes a step leave too few steps at this budget"
    assert b1.missing == {"fzoo": fzoo, "hizoo": "failed: RuntimeError: the loss is nan at step 2"}
    assert b2.missing == {"fzoo": fzoo, "mezo": "absent: full-parameter MeZO is out of this setting's memory",
                          "hizoo": "not run yet"}

    plan.out.mkdir(parents=True, exist_ok=True)  # the run folders made it
    text = leaderboard(plan)
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    # t1: gains 10, 14, 12 (mean 12, std 2); dev loss <= 0.6 at 8 and 4 passes, not on seed 2;
    # peak over inference (1.02 + 1.04 + 1.06) / 3. Rows of the later table (t2) win the dict: check t1's in text.
    assert ("| 1 | mezo_lora | lr0.001 | +12.0 ± 2.0 (n=3) | 0 1 2 | 0.620 ± 0.020 | 6 (2/3) | 0.30 | 1.04× |"
            in text)
    assert "| 2 | mezo | default | +6.0 ± 1.7 (n=3) | 0 1 2 | 0.560 ± 0.017 | not reached (0/3) | 0.50 | 1.50× |" in text
    assert "| 3 | lozo | default | +4.0 ± 15.1 (n=3) |" in text  # gains 20, -10, 2
    assert "| — | lora_fo (ceiling: first-order, a pass is a forward and a backward) |  | +32.0 ± 2.0 (n=3) |" in text
    assert "| 1 | lozo | default | +10.0 ± 2.0 (n=3) |" in text and "| 2 | mezo_lora | lr0.001 | +5.0 ± 0.0 (n=3) |" in text
    # Overall: mezo_lora ranks 1 and 2, lozo 3 and 1; mezo ran on one setting only, so it comes after.
    overall = text.split("## Overall")[1].split("## t1")[0]
    assert [line.split(" | ")[0][2:] for line in overall.splitlines() if line.startswith("| ") and "---" not in line][1:] \
        == ["mezo_lora", "lozo", "mezo", "hizoo", "fzoo"]
    assert "| mezo_lora | 1.50 | 1 | t1 (1), t2 (2) |" in overall
    assert "| lozo | 2.00 | 1 | t1 (3), t2 (1) |" in overall
    assert "| mezo | 2.00 | 0 | t1 (2); t2: absent: full-parameter MeZO is out of this setting's memory |" in overall
    assert "| hizoo | — | — | t1: failed: RuntimeError: the loss is nan at step 2; t2: not run yet |" in overall
    assert ("| fzoo | — | — | t1: absent: its 9 passes a step leave too few steps at this budget; "
            "t2: absent: its 9 passes a step leave too few steps at this budget |") in overall
    assert rows["fzoo"].endswith("| absent: its 9 passes a step leave too few steps at this budget | | | | | |")


def test_leaderboard_header_records_commit_torch_machine_and_each_part_time(board, capsys):
    import os
    import subprocess

    import torch

    plan_file, plan = board
    assert main([str(plan_file), "--report-only"]) == 0
    text = (plan.out / "report.md").read_text()
    assert text == capsys.readouterr().out
    head = text.split("## Overall")[0]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert f"Commit `{commit or 'unknown'}`" in head
    assert f"torch {torch.__version__}, threads: {torch.get_num_threads()};" in head
    assert f"{os.cpu_count()} CPUs" in head
    # t1: 14 runs (zero-shot, 4 searched, 6 seeds, 3 ceilings) of 17 (hizoo's search and seeds to
    # come) at 60 s each; t2: 7 at 60 s and the zero-shot's own 120 s (no wall_s recorded) of 11.
    assert "| t1 | 14 of 17 | 14 min |" in head and "| t2 | 8 of 11 | 9 min |" in head
    for setting in ("t1", "t2"):
        assert f"![{setting}]({setting}_dev_loss.png)" in text
        assert (plan.out / f"{setting}_dev_loss.png").stat().st_size > 0
    assert text.count("✓") == 3 + 2  # the search tables: the chosen point of each method run on t1, on t2


def test_ranks_shared_where_the_table_shows_equal_gains():
    from adazeta.cli.leaderboard import Entry, rank_entries

    entries = [Entry(name, "", [], {}, gains, False) for name, gains in
               (("a", [1.04]), ("b", [0.96]), ("c", [0.5]), ("d", [2.0, 0.0]))]
    rank_entries(entries)
    assert [e.rank for e in entries] == [1, 1, 4, 1]  # 1.0, 1.0, 0.5, 1.0 as printed


def test_leaderboard_runs_every_zo_method_or_says_why_not(tmp_path):
    """Every method of conf/method with `optimizer: zo` is in the leaderboard plan, or under its
    `absent:` with a reason: a new ZO method cannot be left off the board by omission."""
    from omegaconf import OmegaConf

    from adazeta.cli.study_plan import conf_methods, unplanned_zo_methods

    assert {"adazeta", "mezo", "mezo_lora", "hizoo_lora"} <= set(conf_methods("zo"))
    assert "lora_fo" not in conf_methods("zo")
    assert unplanned_zo_methods(STUDY_DIR / "leaderboard.yaml") == []
    spec = OmegaConf.load(STUDY_DIR / "leaderboard.yaml")
    del spec.methods["fzoo"]
    OmegaConf.save(spec, tmp_path / "plan.yaml")
    assert unplanned_zo_methods(tmp_path / "plan.yaml") == ["fzoo"]
    spec.absent = {"fzoo": "measured elsewhere"}
    OmegaConf.save(spec, tmp_path / "plan.yaml")
    assert unplanned_zo_methods(tmp_path / "plan.yaml") == []


@pytest.mark.parametrize("absent, error", [
    ({"mezzo": "typo"}, r"absent: 'mezzo' is not a method; give one of \[.*'mezo'"),
    ({"fzoo": ""}, r"absent.fzoo: '' is no reason"),
    ({"mezo": "twice"}, r"absent.mezo: the plan also runs mezo"),
])
def test_a_bad_absent_entry_names_the_method_and_the_choices(tmp_path, absent, error):
    from adazeta.errors import ConfigError

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(json.dumps({**BOARD, "out": str(tmp_path), "absent": absent}))
    with pytest.raises(ConfigError, match=error):
        load_plan(str(plan_file), None, None)


def test_dry_run_counts_and_estimates_a_part_of_the_plan(tmp_path, capsys):
    from adazeta.cli.study import estimate_s, eval_sizes

    plan_file = tmp_path / "board.yaml"
    plan_file.write_text(json.dumps({**BOARD, "out": str(tmp_path / "board")}))
    plan = load_plan(str(plan_file), None, None)
    t1 = {(r.label, r.role): r for r in plan.runs if r.setting == "t1"}
    s1 = plan.settings["t1"]
    assert eval_sizes(t1[("zero-shot", "floor")]) == (8, 8)
    # 10 s start, 1 s a pass, 0.5 s an evaluated example: dev at steps 0, 2 and 4 and the test.
    assert estimate_s(t1[("mezo_lora", "search")], s1, (8, 8)) == 10 + 8 + (3 * 8 + 8) * 0.5
    assert estimate_s(t1[("zero-shot", "floor")], s1, (8, 8)) == 10 + (8 + 8) * 0.5
    # LoRA with Adam: 4 steps of two passes' time, dev after each.
    assert estimate_s(t1[("lora_fo", "ceiling")], s1, (8, 8)) == 10 + 2 * 4 + (5 * 8 + 8) * 0.5

    assert main([str(plan_file), "--dry-run", "--methods", "lozo"]) == 0
    out = capsys.readouterr().out
    assert "t1 lozo [search]" in out and "t1 zero-shot [floor]" in out and "mezo_lora [" not in out
    # Per setting: the zero-shot, and lozo's search and two seeds at 34 s each.
    assert "board: 8 runs (0 finished, 8 to run" in out
    assert "t1: 4 runs to run, about 2 min: zero-shot 1 (18 s), lozo 3 (2 min)" in out
    assert "t2: 4 runs to run (no `estimate` in the plan: no time)" in out
    assert main([str(plan_file), "--dry-run", "--methods", "lozo,sgd"]) == 2
    err = capsys.readouterr().err
    assert "--methods sgd: not run by this plan" in err and "'lora_fo'" in err


def test_an_interrupted_run_is_moved_aside_and_the_rerun_records_its_wall_time(tmp_path, monkeypatch):
    from adazeta.cli import study

    plan_file = tmp_path / "board.yaml"
    plan_file.write_text(json.dumps({**BOARD, "out": str(tmp_path / "board")}))
    run = load_plan(str(plan_file), None, None).runs[1]
    run.folder.mkdir(parents=True)
    (run.folder / "metrics.jsonl").write_text('{"step": 0}\n')  # killed before its summary

    def train(cmd, **kwargs):  # stands in for the child adazeta-train process
        folder = Path(next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1])
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text("{}")
        return study.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(study.subprocess, "run", train)
    ok, wall = study.execute(run, tmp_path / "logs")
    assert ok and wall >= 0
    aside = [p for p in run.folder.parent.iterdir() if ".unfinished-" in p.name]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").is_file()
    record = json.loads((run.folder / "study.json").read_text())
    assert record["overrides"] == run.overrides and record["wall_s"] == round(wall, 1) and run.wall_s == record["wall_s"]
