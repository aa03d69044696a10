"""The divergence guard: a NaN or an explosion is caught at its step before any weight moves; the
run stops with a message naming the step and values, or rolls back with a lower lr. And why the
trainable parameters are kept in fp32: in bf16 the SPSA round trip drifts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SMALL, compose_config, job_config, read_jsonl
from conftest import built_step as built

from adazeta.cli.replay import replay
from adazeta.engine.guard import Guard, check_precision
from adazeta.engine.loop import run
from adazeta.engine.replay_log import ReplayLog
from adazeta.errors import DivergenceError
from adazeta.objectives import Objective
from adazeta.params import Trainable
from adazeta.validate import validate
from adazeta.zo.spsa import SPSA, query_seed


def weights(method) -> dict[str, torch.Tensor]:
    return {t.name: t.param.detach().clone() for t in method.trainables}


# (overrides, whether the estimate perturbs the weights in place)
NAN_CASES = {
    "mezo": (["model=tiny-llama", "method=mezo", "method.lr=1e-2"], True),
    "adazeta": (["model=tiny-bert", "method=adazeta", "method.lr=1e-2"], True),
    "sparse_mezo-in-forward": (["model=tiny-llama", "method=sparse_mezo", "method.lr=1e-2"], False),
    "ft": (["model=tiny-bert", "method=ft", "method.lr=1e-2"], False),
}


@pytest.mark.parametrize("name", list(NAN_CASES))
def test_nan_loss_is_caught_at_its_step_and_moves_no_weight(name):
    overrides, in_place = NAN_CASES[name]
    cfg, b, loss_fn, guard = built(*overrides)
    step = b.method.step
    for k in (1, 2):  # two ordinary steps first: they do move the weights
        before = weights(b.method)
        step(loss_fn, k, 1, guard=guard)
        assert any(not before[n].equal(v) for n, v in weights(b.method).items())
    before = weights(b.method)
    with pytest.raises(DivergenceError) as info:
        step(lambda: loss_fn() * math.nan, 3, 1, guard=guard)
    assert info.value.step == 3
    assert str(info.value).startswith("step 3: the loss is not finite (losses [nan]")
    after = weights(b.method)
    if not in_place:
        assert all(before[n].equal(after[n]) for n in before)  # bit-identical
    else:
        # The in-place +eps z / -2 eps z / +eps z round trip of the step's query ran (in fp32 it
        # restores theta to within a rounding, as in every step); the update did not: the weights
        # equal, bit for bit, those of the round trip alone.
        # Grouped as the method's own estimator groups its trainables (one z per flat buffer).
        spsa = SPSA([Trainable(n, torch.nn.Parameter(v.clone()), t.decay) for (n, v), t in zip(before.items(), step.spsa.trainables, strict=True)],
                    cfg.method.eps, group=step.spsa.grouped)
        seed = query_seed(cfg.seed, 3, 0)
        for scale in (1.0, -2.0, 1.0):
            spsa.perturb(seed, scale)
        assert all(t.param.detach().equal(after[t.name]) for t in spsa.trainables)
        assert max((after[n] - before[n]).abs().max().item() for n in before) < 1e-6


def test_non_finite_projected_gradient_and_explosion_are_caught():
    guard = Guard(job_config(compose_config(["guard.window=3", "guard.explode_factor=4"])).guard)
    with pytest.raises(DivergenceError, match=r"step 1: the projected gradient is not finite .*inf"):
        guard(1, [0.7], [math.inf])
    for k, loss in enumerate([1.0, 2.0, 3.0], start=2):
        guard(k, [loss], [0.1])
    guard(5, [7.9], [0.1])  # below 4 x mean(1, 2, 3) = 8: accepted
    with pytest.raises(DivergenceError) as info:  # 4 x mean(2, 3, 7.9) = 17.2
        guard(6, [0.5, 18.0], [0.1, 0.2])
    assert "step 6: the loss exploded: 18 > guard.explode_factor=4 x 4.3" in str(info.value)
    assert "losses [0.5, 18]" in str(info.value)


def train(tmp_path: Path, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = job_config(compose_config([*SMALL, *overrides]))
    validate(cfg)
    run(cfg, run_dir)
    return run_dir


def poison(monkeypatch, at: int) -> None:
    """From step `at` on, every training loss the model computes is NaN."""
    state = {"on": False}
    forward, append = Objective.forward, ReplayLog.append

    def forward_poisoned(self, model, batch):
        losses, pred = forward(self, model, batch)
        return (losses * math.nan if state["on"] else losses), pred

    def append_and_poison(self, step, *args):
        append(self, step, *args)
        state["on"] = step >= at - 1

    monkeypatch.setattr(Objective, "forward", forward_poisoned)
    monkeypatch.setattr(ReplayLog, "append", append_and_poison)


def explode(monkeypatch, at: int, times: int = 1_000) -> None:
    """The guard sees step `at`'s losses 1000x larger, the first `times` times it is reached."""
    call, count = Guard.__call__, {"n": 0}

    def inflated(self, step, losses, grads):
        if step == at and count["n"] < times:
            count["n"] += 1
            losses = [1000 * v for v in losses]
        return call(self, step, losses, grads)

    monkeypatch.setattr(Guard, "__call__", inflated)


def test_nan_in_a_run_stops_it_at_that_step_with_the_last_good_weights_saved(tmp_path, monkeypatch):
    """From step 5 on every training loss is NaN: the run stops at step 5 naming it, and the
    checkpoint it saves holds the weights of step 4 (with step 5's in-place round trip, which the
    replay log records as a rejected step: the replay rebuilds them exactly)."""
    poison(monkeypatch, at=5)
    with pytest.raises(DivergenceError) as info:
        train(tmp_path, "model=tiny-bert", "method=mezo", "train.max_steps=8", "train.save_steps=0")
    run_dir = tmp_path / "run"
    message = str(info.value)
    assert message.startswith("step 5: the loss is not finite (losses [nan], projected gradients [nan])")
    assert f"The weights of step 4 are saved in {run_dir / 'checkpoints' / 'step-0000004'}" in message
    assert "method.lr" in message and f"train.resume={run_dir}" in message and "guard.action=rollback" in message
    *_, last_good, rejected = read_jsonl(run_dir / "replay.jsonl")
    assert last_good["step"] == 4 and rejected["step"] == 5 and rejected["applied"] is False
    assert replay(run_dir)["unequal"] == []


EXPLODING = ["model=tiny-bert", "method=mezo", "method.lr=1e-3", "guard.window=3", "train.max_steps=12",
             "train.eval_steps=5", "train.log_steps=2", "train.save_steps=5"]


def test_explosion_with_rollback_lowers_the_lr_and_finishes(tmp_path, monkeypatch):
    """Step 8's loss is 1000x the running mean the first time: the run goes back to the checkpoint
    of step 5, halves the lr, and runs steps 6-12 again; metrics.jsonl stays one curve."""
    explode(monkeypatch, at=8, times=1)
    run_dir = train(tmp_path, *EXPLODING, "guard.action=rollback")
    assert json.loads((run_dir / "summary.json").read_text())["guard/rollbacks"] == 1
    rows = read_jsonl(run_dir / "metrics.jsonl")
    (event,) = [r for r in rows if "guard/rollbacks" in r]
    assert event == {"step": 5, "guard/rollbacks": 1, "guard/diverged_step": 8, "train/lr": 5e-4}
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8, 10, 12]  # one curve: undone rows moved out
    assert [r["train/lr"] for r in train_rows] == [1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 5e-4]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics_rolled_back.jsonl")] == [6]
    assert [r["lr"] for r in read_jsonl(run_dir / "replay.jsonl")] == [1e-3] * 5 + [5e-4] * 7
    assert replay(run_dir)["unequal"] == []  # the replay log holds the steps that stood, with their lr


def test_rollbacks_are_bounded(tmp_path, monkeypatch):
    explode(monkeypatch, at=8)
    with pytest.raises(DivergenceError) as info:
        train(tmp_path, *EXPLODING, "guard.action=rollback", "guard.max_rollbacks=2")
    message = str(info.value)
    assert message.startswith("step 8: the loss exploded") and "guard.explode_factor=10" in message
    assert "after 2 rollbacks (guard.max_rollbacks=2)" in message and "(now 0.00025)" in message


# -- precision -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_spsa_round_trips_drift_in_bf16_and_not_in_fp32(dtype):
    """100 queries' +eps z / -2 eps z / +eps z round trips (eps = 1e-3) on weights of a layer's
    scale, against what one MeZO update moves a weight by (lr * |g| * |z| ~ 1e-6): bf16 weights
    wander by about eps itself, a thousand updates' worth, so the updates drown; fp32 weights move
    only by float32 rounding (~1e-8), a small fraction of one update."""
    torch.manual_seed(0)
    w0 = torch.randn(256, 256) * 0.05
    spsa = SPSA([Trainable("w", torch.nn.Parameter(w0.to(dtype)), True)], eps=1e-3)
    start = spsa.trainables[0].param.detach().float().clone()
    for seed in range(100):
        for scale in (1.0, -2.0, 1.0):
            spsa.perturb(seed, scale)
    drift = (spsa.trainables[0].param.detach().float() - start).abs()
    one_update = 1e-6
    if dtype == torch.bfloat16:
        assert drift.mean() > 500 * one_update and drift.max() > 1e-2
    else:
        assert drift.mean() < one_update / 20 and drift.max() < one_update


def test_trainables_stay_fp32_on_a_bf16_base_and_full_methods_are_told(caplog):
    _, b, _, _ = built("model=tiny-bert", "method=adazeta", "model.dtype=bfloat16")
    assert {t.param.dtype for t in b.method.trainables} == {torch.float32}  # adapters and head
    assert any(p.dtype == torch.bfloat16 for p in b.method.model.parameters())  # the frozen base
    assert check_precision(b.method.trainables, zo=True) == []
    # MeZO over every weight of a bf16 model moves the bf16 weights themselves (load_model and
    # make_trainable keep them in the base dtype): the run says how (tests/zo/test_low_precision.py).
    _, b, _, _ = built("model=tiny-bert", "method=mezo", "model.dtype=bfloat16")
    caplog.set_level("INFO", logger="adazeta")
    low = check_precision(b.method.trainables, zo=True)
    assert low and "bfloat16" in caplog.text and "stochastic rounding" in caplog.text


def test_guard_stop_checkpoint_resumes_with_a_lower_lr(tmp_path, monkeypatch):
    """The stop message's advice works: resume the stopped run, with a lower lr."""
    explode(monkeypatch, at=8, times=1)
    with pytest.raises(DivergenceError):
        train(tmp_path, *EXPLODING)
    saved = tmp_path / "run" / "checkpoints" / "step-0000007"
    cfg = job_config(compose_config([*SMALL, *EXPLODING, "method.lr=5e-4", f"train.resume={tmp_path / 'run'}"]))
    (tmp_path / "again").mkdir()
    summary = run(cfg, tmp_path / "again")
    assert summary["resumed_from"] == str(saved) and summary["guard/rollbacks"] == 0
    lrs = {r["step"]: r["train/lr"] for r in read_jsonl(tmp_path / "again" / "metrics.jsonl") if "train/lr" in r}
    assert lrs == {2: 1e-3, 4: 1e-3, 6: 1e-3, 8: 5e-4, 10: 5e-4, 12: 5e-4}
    assert replay(tmp_path / "again")["unequal"] == []  # the rejected step 8 is in its log too


def test_the_explosion_check_protects_from_the_second_step():
    """Before `window` losses are accepted the reference is the largest accepted so far: the
    check runs from the second step (the first step's losses are the starting weights')."""
    guard = Guard(job_config(compose_config(["guard.window=20", "guard.explode_factor=10"])).guard)
    guard(1, [0.7], [0.1])
    with pytest.raises(DivergenceError) as info:
        guard(2, [550571.0], [-9750.0])
    assert str(info.value).startswith("step 2: the loss exploded: 550571 > guard.explode_factor=10 x 0.7 "
                                      "(the largest of the first 1 step losses;")
    guard(2, [0.2], [0.1])
    guard(3, [6.9], [0.1])  # above 10 x mean(0.7, 0.2) = 4.5, below 10 x max = 7: accepted
    with pytest.raises(DivergenceError, match=r"step 4: the loss exploded: 70 > .* x 6.9 \(the largest of the first 3"):
        guard(4, [70.0], [0.1])


@pytest.mark.parametrize("batch", [16, 8])
def test_a_huge_lr_is_stopped_before_its_first_step(tmp_path, batch):
    """MeZO at lr 1e3 for ten steps: at batch 16 a step whose loss is about 5.5e5 would be applied
    and the run end without an error; at batch 8 (the default) the first step would flatten the
    model to a loss of exactly ln 2, which no loss check can tell from learning, and the run would
    end with exit 0. The update-size check stops it before step 1 moves a weight."""
    cfg = job_config(compose_config(["model=tiny-llama", "method=mezo", "method.lr=1e3", "train.max_steps=10",
                                     f"train.batch_size={batch}", "train.log_steps=1", "train.progress=false"]))
    (tmp_path / "run").mkdir()
    with pytest.raises(DivergenceError) as info:
        run(cfg, tmp_path / "run")
    message = str(info.value)
    assert info.value.step == 1
    assert "the update would move the trainable weights by about" in message and "guard.max_update=10" in message
    assert "(now 1e+03)" in message
    (rejected,) = read_jsonl(tmp_path / "run" / "replay.jsonl")
    assert rejected == {**rejected, "step": 1, "applied": False}
    assert not [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]  # no step applied


@pytest.mark.parametrize("rule", ["sgd", "sign"])
def test_the_update_size_is_known_before_the_update(rule):
    """The ratio the guard checks equals the size of the update the step then applies,
    ||theta' - theta|| / ||theta||, measured with the check off (z over ~4M values: within 2%)."""
    from adazeta.step import weight_norm

    cfg, b, loss_fn, guard = built("model=tiny-llama", "method=mezo", "method.lr=1e-3", f"method.update_rule={rule}",
                            "guard.max_update=null", "schedule=constant", "schedule.q=2")
    seen = []

    class Seeing(Guard):  # the ratio the guard is asked about, never refused (max_update=null)
        def check_update(self, step, ratio, lr, grads):
            seen.append(ratio)

    guard = Seeing(cfg.guard)
    before = weights(b.method)
    norm = math.sqrt(sum(float(w.double().pow(2).sum()) for w in before.values()))
    assert weight_norm(b.method.trainables) == pytest.approx(norm, rel=1e-9)
    b.method.step(loss_fn, 1, 2, guard=guard)
    moved = math.sqrt(sum(float((t.param.detach().double() - before[t.name].double()).pow(2).sum())
                          for t in b.method.trainables))
    assert seen and seen[0] == pytest.approx(moved / norm, rel=0.02)


def test_a_large_update_is_not_applied_and_null_turns_the_check_off():
    cfg, b, loss_fn, guard = built("model=tiny-llama", "method=mezo", "method.lr=1e-3", "guard.max_update=1e-6")
    before = weights(b.method)
    with pytest.raises(DivergenceError, match=r"step 1: the update would move .* guard.max_update=1e-06"):
        b.method.step(loss_fn, 1, 1, guard=guard)
    # Only the query's +eps z / -2 eps z / +eps z round trip ran (within a rounding); no update.
    assert max(float((t.param.detach() - before[t.name]).abs().max()) for t in b.method.trainables) < 1e-6
    cfg, b, loss_fn, guard = built("model=tiny-llama", "method=mezo", "method.lr=1e-3", "guard.max_update=null")
    b.method.step(loss_fn, 1, 1, guard=guard)  # the same step, applied
    assert max(float((t.param.detach() - before[t.name]).abs().max()) for t in b.method.trainables) > 1e-5
