"""scripts/gpu_check.py (`make gpu-check`) without a GPU: its dry run runs every check on CPU at
tiny width through the real entrypoints, prints one table and writes only under its folder."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import REPO, subprocess_env

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
spec.loader.exec_module(gpu_check)


def rows(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]


@pytest.mark.slow  # every check of scripts/gpu_check.py, in child processes
def test_dry_run_runs_every_check_and_writes_only_under_its_folder(tmp_path):
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--methods", "mezo", "--out", str(out)],
        cwd=tmp_path, env=subprocess_env(home), capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plan:" in proc.stdout and "torchrun: 2 ranks, gloo on CPU" in proc.stdout  # the plan, before the runs
    table = (out / "table.md").read_text()
    assert table.strip() in proc.stdout  # printed as written
    by_check = {r["check"]: r for r in rows(table)}
    assert list(by_check) == ["step", "replay", "parallel", "torchrun"]
    step = by_check["step"]
    assert step["method"] == "mezo" and step["result"].startswith("ok (finite loss)")
    assert float(step["expected"].split()[1]) > 0  # adazeta-plan's prediction, parsed from its report
    assert by_check["replay"]["result"] == "ok: equal bit for bit"
    assert by_check["parallel"]["result"].split("x;")[0].replace(".", "").isdigit()
    assert by_check["torchrun"]["result"] == "ok"
    a, b = by_check["torchrun"]["measured"].split(",")[0].split()[1:]
    assert a == b  # the two ranks' checksums
    # The planner's report and every command's log are kept; nothing else was written anywhere.
    assert "Predicted peak of mezo" in (out / "plan.md").read_text()
    assert {p.name for p in (out / "logs").iterdir()} >= {"plan.log", "train-mezo.log", "replay-mezo.log", "torchrun.log"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "out"]
    assert not any(home.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA runs the real check")
def test_without_cuda_the_default_is_a_dry_run_that_says_so():
    s, note = gpu_check.setting(dry_run=False)
    assert s.dry and s.device == "cpu" and "no CUDA device here: a dry run on CPU" in note
    assert gpu_check.setting(dry_run=True)[1] == ""


def test_unknown_method_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--methods", "adazeta,nope"])
    assert exit_.value.code == 2
    assert "--methods 'adazeta,nope': choose from adazeta,mezo,mezo_lora,sparse_mezo,lora_fo,ft" in capsys.readouterr().err
