"""adazeta-replay: the trainable parameters rebuilt from the base model and <run>/replay.jsonl
alone (no forward pass) equal the run's checkpoint bit for bit, for every way a ZO step writes the
weights: in-place round trips with and without the fused restore, in-forward perturbation,
parallel replicas, stored sparse masks, and stateful or forward-using update rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMALL, compose_config, job_config, read_jsonl
from safetensors.torch import load_file

from adazeta.cli.replay import main, replay
from adazeta.engine.loop import run

RUN = [*SMALL, "train.eval_steps=6", "train.max_steps=12"]
# name -> (overrides, how replay.jsonl records the estimate's in-place writes)
RUNS = {
    "mezo": (["model=tiny-llama", "method=mezo", "method.lr=1e-3"], "round_trip_fused"),
    "mezo-unfused-q2": (["model=tiny-llama", "method=mezo", "method.lr=1e-3", "zo.fused_update=false",
                         "schedule.q=2"], "round_trip"),
    "sparse_mezo-in-forward": (["model=tiny-llama", "method=sparse_mezo", "method.lr=1e-3"], "none"),
    "sparse_mezo-in-place-momentum": (["model=tiny-llama", "method=sparse_mezo", "method.lr=1e-3",
                                       "method.sparse.in_forward=false", "method.update_rule=momentum"], "round_trip"),
    "adazeta-conservative": (["model=tiny-bert", "method=adazeta", "method.lr=1e-2",
                              "method.update_rule=conservative"], "round_trip"),
    "mezo_lora-adam-q3": (["model=tiny-llama", "method=mezo_lora", "method.lr=1e-3", "method.update_rule=adam",
                           "schedule.q=3"], "round_trip"),
    # ZO-Bench's released conservative rule: up to three AdamW steps, chosen by the logged losses.
    "mezo_lora-conservative_adamw": (["model=tiny-llama", "method=mezo_lora", "method.lr=1e-3",
                                      "method.update_rule=conservative_adamw"], "round_trip"),
    # bf16 weights: perturbed in the forward, updates (and decay) stochastically rounded from seeds
    "mezo-bf16-decay": (["model=tiny-llama", "model.dtype=bfloat16", "method=mezo", "method.lr=1e-4",
                         "method.weight_decay=0.1"], "none"),
    "mezo-bf16-adam": (["model=tiny-llama", "model.dtype=bfloat16", "method=mezo", "method.lr=1e-4",
                        "method.update_rule=adam"], "none"),
    "adazeta-parallel-queries": (["model=tiny-bert", "method=adazeta", "method.lr=1e-2", "zo.parallel_queries=true",
                                  "schedule=constant", "schedule.q=2"], "none"),
}


def train(tmp_path: Path, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run(job_config(compose_config([*RUN, *overrides])), run_dir)
    return run_dir


def test_replay_rebuilds_a_50_step_run_exactly(tmp_path, capsys):
    """AdaZeta (TT adapters, adaptive Q, weight decay, fused restore) for 50 steps; the replay
    is checked against the final checkpoint and the intermediate one it keeps."""
    run_dir = train(tmp_path, "model=tiny-bert", "method=adazeta", "method.lr=1e-2", "train.max_steps=50",
                    "train.save_steps=20", "train.save_total_limit=3")
    records = read_jsonl(run_dir / "replay.jsonl")
    assert [r["step"] for r in records] == list(range(1, 51))
    assert max(len(r["seeds"]) for r in records) > 1  # the adaptive schedule's Q grew
    main([str(run_dir)])
    out = capsys.readouterr().out
    final = run_dir / "checkpoints" / "step-0000050"
    assert f"replayed 50 steps from the base model: the trainable parameters equal {final}" in out
    assert out.rstrip().endswith("exactly")
    middle = replay(run_dir, checkpoint=run_dir / "checkpoints" / "step-0000040", save=tmp_path / "rebuilt.safetensors")
    assert middle["unequal"] == [] and middle["steps"] == 40
    rebuilt = load_file(str(tmp_path / "rebuilt.safetensors"))
    saved = load_file(str(run_dir / "checkpoints" / "step-0000040" / "trainable.safetensors"))
    first = load_file(str(run_dir / "checkpoints" / "step-0000020" / "trainable.safetensors"))
    assert all(rebuilt[k].equal(saved[k]) for k in saved)
    assert any(not first[k].equal(saved[k]) for k in saved)  # the weights did move in between


# bf16 weights on CPU: their stochastically rounded updates run at a fraction of fp32's speed.
SLOW_RUNS = {"mezo-bf16-decay", "mezo-bf16-adam"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_RUNS else n for n in RUNS])
def test_replay_is_exact_for_every_kind_of_step(tmp_path, name):
    overrides, perturbs = RUNS[name]
    run_dir = train(tmp_path, *overrides)
    records = read_jsonl(run_dir / "replay.jsonl")
    assert {json.dumps(r["perturbs"]) for r in records} == {json.dumps(perturbs)}
    out = replay(run_dir)
    assert out["steps"] == 12 and out["unequal"] == [], out
    assert out["values"] == json.loads((run_dir / "summary.json").read_text())["trainable_params"]


def test_replay_detects_a_log_that_does_not_match(tmp_path):
    run_dir = train(tmp_path, *RUNS["mezo"][0])
    lines = (run_dir / "replay.jsonl").read_text().splitlines()
    record = json.loads(lines[6])
    record["grads"][0] *= 1.0001
    lines[6] = json.dumps(record)
    (run_dir / "replay.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as info:
        main([str(run_dir)])
    assert str(info.value).startswith("MISMATCH after replaying 12 steps:") and "max abs diff" in str(info.value)
