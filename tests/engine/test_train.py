"""The real entrypoint, `python -m adazeta.cli.train`, on two-layer random models: two steps, then the
files a run promises (README "What a run writes") are checked field by field.

The runs are independent subprocesses, mostly import time; they are started together (one per
core) by a module fixture, and each test checks one of them.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from conftest import (
    TINY_RUN,
    compose_config,
    files_under,
    job_config,
    output,
    read_jsonl,
    run_entrypoints,
    tiny_model,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open

TRAIN_KEYS = {"train/loss", "zo/projected_grad", "zo/queries", "time/step_s", "time/tokens_per_s", "mem/peak_gib"}
EVAL_KEYS = {"eval/loss", "eval/accuracy"}
SUMMARY_KEYS = {
    "best/step", "best/eval_accuracy", "best/eval_loss", "test/loss", "test/accuracy",
    "mem/peak_gib", "mem/inference_gib", "trainable_params", "time/wall_s", "forward_passes",
    "train/tokens", "time/tokens_per_s",
}
NUM_TRAIN, NUM_DEV, NUM_TEST, BATCH, STEPS = 16, 8, 8, 4, 2


# One run per head (classification, causal LM, masked LM) and method. The tiny-bert MeZO run also
# logs to wandb (offline): one process less, and its local files are checked like the others'.
WANDB_RUN = "mezo-tiny-bert"
RUNS = {
    f"{method}-{model}": [f"method={method}", f"model={model}"]
    for method in ("mezo", "adazeta") for model in ("tiny-bert", "tiny-llama", "tiny-roberta")
}
RUNS[WANDB_RUN] += ["logger=wandb", "logger.mode=offline"]
RUNS["mezo_q2-tiny-llama"] = ["method=mezo", "model=tiny-llama", "schedule=constant", "schedule.q=2"]
TWO_STEP = list(RUNS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple]:
    """{name: (CompletedProcess, tmp folder, overrides)} for every run in RUNS, run concurrently."""
    jobs = {name: ([*ov, *TINY_RUN], tmp_path_factory.mktemp(name)) for name, ov in RUNS.items()}
    done = run_entrypoints(jobs)
    return {name: (done[name], jobs[name][1], jobs[name][0]) for name in RUNS}


def completed(runs, name) -> tuple[Path, list[str]]:
    proc, tmp, overrides = runs[name]
    assert proc.returncode == 0, output(proc)[-3000:]
    assert "Traceback" not in output(proc)
    return tmp, overrides


def expected_forward_passes(overrides: list[str]) -> list[int]:
    """2 * sum of Q over steps 1..k, Q from the run's own composed schedule (bound like adazeta/engine/build.py binds it)."""
    cfg = job_config(compose_config(overrides))
    sched = instantiate(cfg.schedule)
    sched.bind(steps_per_epoch=max(NUM_TRAIN // BATCH, 1), max_steps=STEPS)
    total, out = 0, []
    for step in range(1, STEPS + 1):
        total += 2 * sched(step - 1)
        out.append(total)
    return out


def is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.slow  # the entrypoint, one child process per method
@pytest.mark.parametrize("name", TWO_STEP)
def test_two_step_run_writes_well_formed_metrics(runs, name):
    tmp, overrides = completed(runs, name)
    run = tmp / "run"
    rows = read_jsonl(run / "metrics.jsonl")  # every line parses
    assert all(isinstance(r, dict) and isinstance(r["step"], int) for r in rows)
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps), steps

    # The zero-shot evaluation at step 0 (train.eval_at_start), one row per step (eval every
    # step, train metrics at the last step), then the final one with the best-dev and test metrics.
    start, *rows = rows
    assert start.keys() == {"step", "forward_passes", *EVAL_KEYS} and (start["step"], start["forward_passes"]) == (0, 0)
    step_rows = [r for r in rows if not any(k.startswith(("best/", "test/")) for k in r)]
    final = [r for r in rows if r not in step_rows]
    assert [r["step"] for r in step_rows] == list(range(1, STEPS + 1))
    assert len(final) == 1 and final[0]["step"] == STEPS
    passes = expected_forward_passes(overrides)
    for r in step_rows:
        assert EVAL_KEYS <= r.keys()
        assert r["forward_passes"] == passes[r["step"] - 1]
        assert 0 <= r["eval/accuracy"] <= 1 and (r["eval/accuracy"] * NUM_DEV).is_integer()
        assert is_number(r["eval/loss"]) and r["eval/loss"] > 0
    last = step_rows[-1]
    assert TRAIN_KEYS <= last.keys()
    assert all(is_number(last[k]) for k in TRAIN_KEYS)
    assert last["train/loss"] > 0 and last["time/step_s"] > 0 and last["mem/peak_gib"] > 0
    assert last["zo/queries"] == (passes[-1] - (passes[-2] if len(passes) > 1 else 0)) // 2

    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["forward_passes"] == passes[-1]
    assert summary["best/eval_accuracy"] == max(r["eval/accuracy"] for r in [start, *step_rows])
    at_best = next(r for r in [start, *step_rows] if r["step"] == summary["best/step"])
    assert at_best["eval/accuracy"] == summary["best/eval_accuracy"]
    assert at_best["eval/loss"] == summary["best/eval_loss"]
    assert 0 <= summary["test/accuracy"] <= 1 and (summary["test/accuracy"] * NUM_TEST).is_integer()
    assert final[0]["test/accuracy"] == summary["test/accuracy"]
    assert summary["mem/peak_gib"] >= summary["mem/inference_gib"] > 0
    assert summary["time/wall_s"] > 0
    # Every row holds at least one token and at most the model's max_length; each pass reads them all.
    max_length = job_config(compose_config(overrides)).model.max_length
    assert BATCH * passes[-1] <= summary["train/tokens"] <= BATCH * passes[-1] * max_length
    assert summary["time/tokens_per_s"] > 0 and last["time/tokens_per_s"] > 0
    assert (summary["data/train"], summary["data/dev"], summary["data/test"]) == (NUM_TRAIN, NUM_DEV, NUM_TEST)


@pytest.mark.slow  # the entrypoint, one child process per method
def test_tokens_count_every_forward_pass(runs):
    """The same batches (one seed) read by twice the queries: exactly twice the forward tokens."""
    tokens = {name: json.loads((completed(runs, name)[0] / "run" / "summary.json").read_text())["train/tokens"]
              for name in ("mezo-tiny-llama", "mezo_q2-tiny-llama")}
    assert tokens["mezo_q2-tiny-llama"] == 2 * tokens["mezo-tiny-llama"] > 0


@pytest.mark.slow  # the entrypoint, one child process per method
@pytest.mark.parametrize("name", TWO_STEP)
def test_two_step_run_saves_exactly_the_trainable_set(runs, name):
    """trainable_params counts what moves: every weight for MeZO, the adapters (and a new
    classification head) for AdaZeta; best_trainable.safetensors holds exactly those numbers."""
    tmp, overrides = completed(runs, name)
    run = tmp / "run"
    summary = json.loads((run / "summary.json").read_text())
    with safe_open(str(run / "best_trainable.safetensors"), "pt") as f:
        saved = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    assert sum(math.prod(s) for s in saved.values()) == summary["trainable_params"] > 0
    model_name = next(o.split("=", 1)[1] for o in overrides if o.startswith("model="))
    total = sum(p.numel() for p in tiny_model(model_name).model.parameters())
    if "method=mezo" in overrides:
        assert summary["trainable_params"] == total
    else:
        assert summary["trainable_params"] < total / 2
        assert any("adapter" in k for k in saved)


@pytest.mark.slow  # the entrypoint, one child process per method
@pytest.mark.parametrize("name", TWO_STEP)
def test_run_writes_only_into_its_folder(runs, name):
    tmp, overrides = completed(runs, name)
    outside = {p for p in files_under(tmp) if p.parts[0] != "run"}
    if "logger=wandb" in overrides:  # wandb-core puts its own debug logs under ~/.cache/wandb/logs
        outside = {p for p in outside if p.parts[:4] != ("home", ".cache", "wandb", "logs")}
    assert not outside, f"written outside the run folder: {sorted(map(str, outside))}"
    inside = {str(p) for p in files_under(tmp / "run")}
    assert {"metrics.jsonl", "summary.json", "config.yaml", ".hydra/config.yaml",
            "best_trainable.safetensors"} <= inside
    assert any(p.endswith(".log") for p in inside)
    cfg = OmegaConf.load(tmp / "run" / "config.yaml")  # the resolved config of this run
    assert cfg.train.max_steps == STEPS and cfg.task.num_train == NUM_TRAIN
    assert f"model={cfg.model.name}" in overrides and f"method={cfg.method.name}" in overrides


# -- Weights & Biases ------------------------------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (LevelDB log format after a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, off, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while off + 7 <= len(data):
        left = block - off % block
        if left < 7:
            off += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[off : off + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            off += left
            continue
        chunk, off = data[off + 7 : off + 7 + length], off + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


@pytest.mark.slow  # the entrypoint, one child process per method
def test_wandb_offline_run_lives_in_the_run_folder(runs):
    tmp, _ = completed(runs, WANDB_RUN)
    run = tmp / "run"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].is_dir()
    (wandb_file,) = offline[0].glob("run-*.wandb")

    records = list(wandb_records(wandb_file))
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {"method:mezo", "task:sst2", "model:tiny-bert"} <= set(meta.tags)
    assert meta.job_type == "mezo" and meta.display_name == "mezo-sst2-tiny-bert-s0"
    config_keys = {i.key for r in records if r.WhichOneof("record_type") == "config" for i in r.config.update}
    assert {"model", "task", "method", "train", "seed"} <= config_keys
    # The same rows as metrics.jsonl, on the `step` axis.
    history = [
        {k: json.loads(i.value_json) for i in r.history.item
         if not (k := i.key or "/".join(i.nested_key)).startswith("_")}
        for r in records if r.WhichOneof("record_type") == "history"
    ]
    assert history == read_jsonl(run / "metrics.jsonl")


# -- multirun ------------------------------------------------------------------------------


@pytest.mark.slow
def test_multirun_sweeps_seeds_into_separate_folders_and_replays(tmp_path, entrypoint):
    """`-m seed=0,1`: one folder per job under hydra.sweep.dir, each with its summary; seed 0
    run again on its own reproduces the same loss curve and projected gradients exactly (every
    z is a pure function of seed, step and query)."""
    sweep = tmp_path / "multi"
    proc = entrypoint("method=mezo", "model=tiny-bert", *TINY_RUN, "train.log_steps=1", "seed=0,1",
                      f"hydra.sweep.dir={sweep}", multirun=True)
    assert proc.returncode == 0, output(proc)[-3000:]
    folders = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["0_mezo_sst2_s0", "1_mezo_sst2_s1"]
    summaries = [json.loads((p / "summary.json").read_text()) for p in folders]
    assert [s["seed"] for s in summaries] == [0, 1]
    curves = [[(r["train/loss"], r["zo/projected_grad"]) for r in read_jsonl(p / "metrics.jsonl")
               if "train/loss" in r] for p in folders]
    assert len(curves[0]) == STEPS and curves[0] != curves[1]
    assert not {p for p in files_under(tmp_path) if p.parts[0] != "multi"}

    again = entrypoint("method=mezo", "model=tiny-bert", *TINY_RUN, "train.log_steps=1", "seed=0")
    assert again.returncode == 0, output(again)[-3000:]
    replay = [(r["train/loss"], r["zo/projected_grad"]) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
              if "train/loss" in r]
    assert replay == curves[0]


@pytest.mark.slow  # the entrypoint, one child process per method
def test_zero_steps_evaluates_the_untrained_model(tmp_path, entrypoint):
    """train.max_steps=0 is a zero-shot evaluation: dev at step 0, then test on those weights."""
    proc = entrypoint("model=tiny-llama", "method=mezo", *TINY_RUN, "train.max_steps=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["step"] == 0 and rows[0]["forward_passes"] == 0 and "eval/accuracy" in rows[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best/step"] == 0 and summary["forward_passes"] == 0
    assert summary["best/eval_accuracy"] == rows[0]["eval/accuracy"] and "test/accuracy" in summary
    assert summary["train/tokens"] == 0 and "time/tokens_per_s" not in summary  # no throughput without steps
