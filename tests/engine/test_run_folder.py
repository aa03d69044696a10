"""One run per folder, one process in it at a time, and a resume that checks everything before it
touches anything: a folder that holds a run is refused and left byte for byte as it was (through
the real CLI not even Hydra's config copy changes), a folder in use names the process that holds
it, and a damaged checkpoint leaves the run it would rewind as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    SMALL,
    compose_config,
    job_config,
    output,
    read_jsonl,
    run_entrypoint,
    subprocess_env,
)
from safetensors.torch import load_file, save_file

from adazeta.engine import run_folder
from adazeta.engine.loop import run
from adazeta.errors import CheckpointError, RunFolderError
from adazeta.validate import validate

SAVING = [*SMALL, "train.eval_steps=2", "train.save_steps=2", "train.save_total_limit=10", "train.log_steps=1"]
# MeZO on tiny-llama: about 0.1 s a step; checkpoints at steps 2 and 4.
RUN = ["model=tiny-llama", "method=mezo", "method.lr=1e-3", *SAVING, "train.max_steps=4"]
VARYING = ("time/", "mem/")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under a folder (hidden ones included) -> its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train(run_dir: Path, *overrides: str) -> dict:
    """run() in process, as adazeta-train runs it once Hydra has composed the config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = job_config(compose_config([*RUN, *overrides]))
    validate(cfg)
    return run(cfg, run_dir)


def curve(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VARYING)} for r in read_jsonl(run_dir / "metrics.jsonl")]


# -- a folder that holds a run --------------------------------------------------------------


@pytest.mark.slow  # the entrypoint in child processes
def test_a_second_run_into_a_run_folder_is_refused_untouched_and_the_run_resumes_in_place(tmp_path):
    """The same command again with other keys would mix two runs in one folder: it is refused
    before Hydra writes anything; resuming in place still works."""
    folder = tmp_path / "run"
    first = run_entrypoint(RUN, tmp_path)
    assert first.returncode == 0, output(first)[-3000:]
    before = snapshot(folder)
    assert {".hydra/config.yaml", "metrics.jsonl", "replay.jsonl", "summary.json",
            "checkpoints/step-0000004/trainable.safetensors"} <= before.keys()

    second = run_entrypoint([*RUN, "train.max_steps=2", "method.lr=5e-4"], tmp_path)
    text = output(second)
    assert second.returncode != 0 and "Traceback" not in text, text[-3000:]
    assert (f"error: run folder {folder} already holds a run (metrics.jsonl, replay.jsonl, summary.json, "
            "checkpoints/, best_trainable.safetensors, config.yaml)") in text
    assert f"train.resume={folder} hydra.run.dir={folder}" in text and "another hydra.run.dir" in text
    assert snapshot(folder) == before  # .hydra/, the log, and no error.txt either

    resumed = run_entrypoint([*RUN, "train.max_steps=6", f"train.resume={folder}"], tmp_path)
    assert resumed.returncode == 0, output(resumed)[-3000:]
    assert (folder / "resumed_from.txt").read_text().strip() == str(folder / "checkpoints" / "step-0000004")
    rows = read_jsonl(folder / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]  # one curve, continued
    assert [r["step"] for r in read_jsonl(folder / "replay.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_the_loop_refuses_a_run_folder_too_and_auto_resumes_in_place(tmp_path):
    """Sweep jobs and `train.resume=auto` are claimed by the loop: a run whose `auto` finds no
    checkpoint of its config (here another seed) is refused in a folder that holds a run; one
    whose `auto` finds this folder's own checkpoint continues it."""
    folder = tmp_path / "runs" / "day" / "run"  # `auto` searches <root>/runs/*/*
    train(folder)
    before = snapshot(folder)
    for overrides in (["seed=1", "train.resume=auto"], ["method.lr=5e-4"]):
        with pytest.raises(RunFolderError, match=f"run folder {folder} already holds a run"):
            train(folder, *overrides)
        assert snapshot(folder) == before
    summary = train(folder, "train.resume=auto")  # the same config: `auto` finds this folder's checkpoint
    assert summary["resumed_from"] == str(folder / "checkpoints" / "step-0000004")


def test_what_hydra_writes_does_not_make_a_folder_hold_a_run(tmp_path):
    """.hydra/, the job log and error.txt of an attempt that failed before training: a new run may
    start there (a failed attempt is retried with the same hydra.run.dir)."""
    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    for name in (".hydra/config.yaml", "train.log", "error.txt"):
        (folder / name).write_text("x\n")
    assert run_folder.run_files(folder) == []
    run_folder.claim(folder, None)
    run_folder.release(folder)
    (folder / "checkpoints").mkdir()
    assert run_folder.run_files(folder) == ["checkpoints/"]


# -- a folder in use ------------------------------------------------------------------------


def test_a_folder_in_use_is_refused_naming_the_process_and_a_killed_holder_leaves_no_lock(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(  # another run's process: it holds the folder's lock
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from adazeta.engine.run_folder import lock; "
         "lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)", str(folder)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(tmp_path),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = run_entrypoint(RUN, tmp_path)
        text = output(refused)
        assert refused.returncode != 0 and "Traceback" not in text, text[-3000:]
        assert f"error: run folder {folder} is in use by another run (process {holder.pid} on " in text
        assert sorted(p.name for p in folder.iterdir()) == [run_folder.LOCK]  # Hydra wrote nothing
        with pytest.raises(RunFolderError, match=f"is in use by another run \\(process {holder.pid} on "):
            train(folder)  # the loop's own claim (sweep jobs, in-process callers)
    finally:
        holder.kill()  # SIGKILL: no exit handler runs, and the kernel drops the lock anyway
        holder.wait()
    run_folder.claim(folder, None)
    assert json.loads((folder / run_folder.LOCK).read_text())["pid"] != holder.pid
    run_folder.release(folder)


# -- a damaged checkpoint -------------------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # best weights are hard links shared between checkpoints: damage this one only
    path.write_bytes(data[: len(data) // 2])


def rename_a_tensor(path: Path) -> None:
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors["renamed." + name] = tensors.pop(name)
    save_file(tensors, str(path))


def drop_the_rng(path: Path) -> None:
    tensors = load_file(str(path))
    del tensors["rng.torch"]
    save_file(tensors, str(path))


DAMAGE = {  # file of the newest checkpoint -> what is done to it, what the message says
    "truncated weights": ("trainable.safetensors", truncate, "damaged or truncated"),
    "truncated best weights": ("best_trainable.safetensors", truncate, "damaged or truncated"),
    "renamed tensor": ("trainable.safetensors", rename_a_tensor, "does not hold the tensors its state.json lists"),
    "no RNG state": ("state.safetensors", drop_the_rng, "lacks the torch RNG state"),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run with checkpoints at steps 2 and 4 (copied before each test damages it)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    train(folder)
    return folder


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resuming_in_place_from_a_damaged_checkpoint_touches_nothing(finished, tmp_path, case):
    """A damaged checkpoint is found bad before anything is touched: metrics.jsonl, replay.jsonl and
    summary.json stay as they were."""
    name, damage, says = DAMAGE[case]
    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    damage(folder / "checkpoints" / "step-0000004" / name)
    before = snapshot(folder)
    with pytest.raises(CheckpointError) as info:
        train(folder, f"train.resume={folder}")
    message = str(info.value)
    assert str(folder / "checkpoints" / "step-0000004" / name) in message and says in message
    intact = folder / "checkpoints" / "step-0000002"
    assert f"The newest intact checkpoint of this run is {intact}: resume from it with train.resume={intact}" in message
    assert snapshot(folder) == before


def test_a_checkpoint_that_does_not_fit_the_run_leaves_its_folder_untouched(tmp_path):
    """Whole files that do not fit this run's trainable set (another adapter rank) are found when
    the model is built: still before the folder resumed in place is rewound."""
    folder = tmp_path / "run"
    adazeta = ["model=tiny-bert", "method=adazeta", "method.lr=1e-3"]
    train(folder, *adazeta)
    before = snapshot(folder)
    with pytest.raises(CheckpointError, match="has a different trainable set"):
        train(folder, *adazeta, "adapter.rank=3", f"train.resume={folder}")
    after = snapshot(folder)
    after.pop(run_folder.LOCK), before.pop(run_folder.LOCK)  # the lock changed hands: nothing else changed
    assert after == before


@pytest.mark.slow  # the entrypoint in child processes
def test_resuming_in_place_from_a_damaged_checkpoint_through_the_cli(finished, tmp_path):
    """One line, no traceback, and not even Hydra's config copy or log changes."""
    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    truncate(folder / "checkpoints" / "step-0000004" / "trainable.safetensors")
    before = snapshot(folder)
    proc = run_entrypoint([*RUN, f"train.resume={folder}"], tmp_path)
    text = output(proc)
    assert proc.returncode != 0 and "Traceback" not in text, text[-3000:]
    assert f"error: cannot read {folder / 'checkpoints' / 'step-0000004' / 'trainable.safetensors'}" in text
    assert f"train.resume={folder / 'checkpoints' / 'step-0000002'}" in text
    assert snapshot(folder) == before
