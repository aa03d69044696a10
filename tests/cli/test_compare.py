"""adazeta-compare on synthetic run folders written the way adazeta/engine/loop.py writes them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from run_files import RUNS, write_run

from adazeta.cli.compare import Run, main

PNGS = ["dev_loss_vs_steps", "dev_loss_vs_forward_passes", "dev_loss_vs_wallclock", "peak_memory"]
@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A multirun-like parent: 2 methods x 2 seeds, plus an unfinished run to be skipped."""
    root = tmp_path / "multirun" / "2026-11-24" / "10-00-00"
    for i, (method, seed) in enumerate(RUNS):
        write_run(root / f"{i}_{method}_sst2_s{seed}", method, seed)
    (root / "9_unfinished").mkdir()
    (root / "9_unfinished" / "metrics.jsonl").write_text('{"step": 10}\n')
    return tmp_path / "multirun"


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["group"]: row for row in csv.DictReader(f)}


def test_figures_and_table(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main([str(sweep), "-o", str(out), "--target-loss", "0.6"]) == 0
    for name in PNGS:
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name

    rows = read_csv(out / "summary.csv")
    assert list(rows) == ["adazeta", "mezo"]  # the unfinished run is skipped, not counted
    a, m = rows["adazeta"], rows["mezo"]
    assert (a["runs"], a["seeds"], m["runs"]) == ("2", "0 1", "2")
    assert float(a["best_dev_mean"]) == pytest.approx((0.70 + 0.74) / 2)
    assert float(a["best_dev_std"]) == pytest.approx(0.02 * 2**0.5)  # ddof=1 of two values
    assert float(m["test_at_best_dev_mean"]) == pytest.approx((0.58 + 0.62) / 2)
    assert float(m["peak_mem_gib"]) == pytest.approx(0.85)
    assert float(m["peak_over_inference"]) == pytest.approx((1.6 + 1.8) / 2)
    assert float(m["time_per_step_s"]) == pytest.approx(0.25)
    assert float(a["time_per_step_s"]) == pytest.approx(0.1)
    expected_tps = {g: np.mean([256 * RUNS[k][1] / RUNS[k][2] for k in RUNS if k[0] == g]) for g in ("adazeta", "mezo")}
    assert float(a["tokens_per_s"]) == pytest.approx(expected_tps["adazeta"])
    assert float(m["tokens_per_s"]) == pytest.approx(expected_tps["mezo"])
    # Target 0.6: adazeta seed 0 at step 40 (160 passes), seed 1 at step 20 (80 passes);
    # mezo seed 0 never, seed 1 at step 60 (120 passes).
    assert (float(a["steps_to_target"]), float(a["forward_passes_to_target"])) == (30.0, 120.0)
    assert a["reached_target"] == "2/2"
    assert (float(m["steps_to_target"]), float(m["forward_passes_to_target"])) == (60.0, 120.0)
    assert m["reached_target"] == "1/2"

    printed = capsys.readouterr().out
    assert printed == (out / "summary.md").read_text()
    assert "| adazeta | 2 (seeds 0 1) | 0.7200 ± 0.0283 accuracy |" in printed


def test_no_target_says_na(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep), "-o", str(tmp_path / "out")]) == 0
    row = read_csv(tmp_path / "out" / "summary.csv")["mezo"]
    assert [row[k] for k in ("steps_to_target", "forward_passes_to_target", "reached_target")] == ["n/a"] * 3
    assert "9_unfinished: metrics.jsonl but no summary.json" in capsys.readouterr().err


def test_several_tasks_group_by_method_task_model(tmp_path: Path) -> None:
    write_run(tmp_path / "a", "mezo", 0, task="sst2")
    write_run(tmp_path / "b", "mezo", 1, task="rte")
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "out")]) == 0
    assert list(read_csv(tmp_path / "out" / "summary.csv")) == ["mezo/sst2/minilm", "mezo/rte/minilm"]


def test_runs_group_by_label_where_they_have_one(tmp_path: Path) -> None:
    # Two settings of one method (e.g. adazeta with two adapter inits) are two groups; a run
    # without a label (written before the key existed) still groups by its method.
    write_run(tmp_path / "a", "adazeta", 0)
    write_run(tmp_path / "b", "adazeta", 1)
    write_run(tmp_path / "c", "mezo", 0)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    (tmp_path / "b" / "summary.json").write_text(json.dumps({**summary, "label": "adazeta-identity"}))
    assert main([str(tmp_path), "-o", str(tmp_path / "out")]) == 0
    assert sorted(read_csv(tmp_path / "out" / "summary.csv")) == ["adazeta", "adazeta-identity", "mezo"]


def test_wallclock_weights_step_time_by_steps_covered(tmp_path: Path) -> None:
    # Rows at steps 10 and 15 (a short last window): 10 * 1.0 s + 5 * 3.0 s = 25 s over 15 steps.
    rows = [{"step": 10, "forward_passes": 20, "time/step_s": 1.0},
            {"step": 12, "forward_passes": 24, "eval/loss": 0.5},  # eval between logged rows
            {"step": 15, "forward_passes": 30, "time/step_s": 3.0, "eval/loss": 0.4}]
    run = Run(tmp_path, {}, rows)
    x, loss = run.curve("wallclock")
    assert x.tolist() == pytest.approx([10 + 2 / 5 * 15, 25.0]) and loss.tolist() == [0.5, 0.4]
    assert run.time_per_step() == pytest.approx(25 / 15)


def test_empty_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    assert main([str(empty), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"no runs found in {empty}" in err and "summary.json and metrics.jsonl" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert main([str(tmp_path / "missing"), "-o", str(tmp_path / "out")]) == 2
    assert "missing: not a folder" in capsys.readouterr().err
