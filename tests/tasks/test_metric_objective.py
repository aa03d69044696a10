"""method.objective=metric: a ZO step minimises minus the task metric of the
batch, a quantity without a gradient (MeZO's --non_diff): accuracy for classification, the F1 of
greedy generations for SQuAD."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from conftest import REPO, build_method_on, output, read_jsonl, tiny_model
from task_files import make_task, task_cfg
from test_tasks import hand_causal_scores

from adazeta.config import Head, ZOObjective
from adazeta.objectives import BatchLoss, MetricLoss, Objective, first_line
from adazeta.tasks import build_task
from adazeta.tasks.metrics import f1_score


def squad_sample():
    spec = importlib.util.spec_from_file_location("squad_sample", REPO / "scripts" / "squad_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llama():
    return tiny_model("tiny-llama")  # seeded random weights, a causal LM


@torch.no_grad()
def test_metric_loss_is_minus_the_accuracy_of_hand_scored_candidates(tmp_path, llama):
    loaded = llama
    task = make_task("sst2", tmp_path)
    exs = task.read_split("train")[:8]
    obj = Objective(task, loaded.tokenizer, Head.causal_lm, 128)
    loss = obj.batch_loss(loaded.model, obj.encode(exs), ZOObjective.metric, exs)
    assert isinstance(loss, MetricLoss)
    right = 0
    for ex in exs:  # argmax of each candidate's mean log-prob, one unpadded sequence at a time
        scores = hand_causal_scores(loaded.model, loaded.tokenizer, obj.encoder.prefix, task.causal_prompt(ex),
                                    task.causal_candidates(ex))
        right += int(scores.argmax()) == ex.label
    assert float(loss()) == pytest.approx(-right / len(exs))
    assert isinstance(obj.batch_loss(loaded.model, obj.encode(exs, train=True)), BatchLoss)  # the default


@torch.no_grad()
def test_metric_loss_of_squad_is_minus_the_f1_of_greedy_generations(tmp_path, llama):
    loaded = llama
    model, tok = loaded.model, loaded.tokenizer
    task = make_task("squad", tmp_path)
    exs = task.read_split("validation")
    obj = Objective(task, tok, Head.causal_lm, 128)
    f1 = []
    for ex in exs:  # greedy by hand, no cache, up to the task's cap
        ids, new = obj.encoder.prefix + tok(task.causal_prompt(ex), add_special_tokens=False).input_ids, []
        for _ in range(task.max_new_tokens):
            new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
            if new[-1] == model.generation_config.eos_token_id or "\n" in tok.decode(new):
                break
        f1.append(f1_score(first_line(tok.decode(new, skip_special_tokens=True)), ex.answers))
    loss = obj.batch_loss(model, obj.encode(exs), ZOObjective.metric, exs)
    assert float(loss()) == pytest.approx(-sum(f1) / len(f1))
    with pytest.raises(ValueError, match="gold answers"):
        obj.batch_loss(model, obj.encode(exs), ZOObjective.metric)


def test_a_zo_step_on_accuracy_sees_only_whole_examples_change(tmp_path):
    """Each query's L+ and L- are minus an accuracy over the batch's 8 examples: multiples of 1/8
    in [-1, 0], which a cross-entropy never is. The step still moves the weights when they differ."""
    m, obj, task = build_method_on(["model=tiny-llama", "method=mezo", "method.eps=0.5", "method.lr=1e-3",
                                    "method.objective=metric"])
    exs = task.read_split("train")[:8]
    loss_fn = obj.batch_loss(m.model, obj.encode(exs), ZOObjective.metric, exs)
    before = [t.param.detach().clone() for t in m.trainables]
    moved = False
    for step in range(1, 9):
        result = m.step(loss_fn, step, 1)  # one query: result.loss = (L+ + L-) / 2, g = (L+ - L-) / (2 eps)
        [g] = result.grads
        for value in (result.loss + g * 0.5, result.loss - g * 0.5):  # L+ and L-
            assert -1 - 1e-6 <= value <= 1e-6 and abs(value * 8 - round(value * 8)) < 1e-4
        moved = moved or g != 0
    assert moved, "at eps 0.5 some query should change an answer of the batch"
    changed = any(not torch.equal(b, t.param) for b, t in zip(before, m.trainables, strict=True))
    assert changed


def test_the_squad_sample_script_writes_answers_that_are_spans_of_their_context(tmp_path):
    squad_sample().write(tmp_path, n_train=30, n_dev=10)
    task = build_task(task_cfg("squad", tmp_path, num_dev=5))
    train, dev = task.read_split("train"), task.read_split("validation")
    assert (len(train), len(dev)) == (30, 10)
    for ex in train + dev:
        [answer] = ex.answers
        assert answer in ex.fields["context"] and ex.fields["question"].endswith("?")
    assert len({ex.fields["context"] for ex in train}) > 25  # varied stories, not one repeated


@pytest.mark.slow  # the entrypoint with greedy generation
def test_training_on_squad_f1_runs_and_logs_minus_the_f1(entrypoint, tmp_path):
    data = tmp_path / "squad"
    squad_sample().write(data, n_train=8, n_dev=4)
    proc = entrypoint("model=tiny-llama", "task=squad", f"task.data_dir={data}", "method=mezo",
                      "method.objective=metric", "method.eps=0.5", "train.max_steps=2", "train.batch_size=2",
                      "train.log_steps=1", "train.eval_steps=2", "train.progress=false")
    assert proc.returncode == 0, output(proc)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 2 and all(-1 <= r["train/loss"] <= 0 for r in rows)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=lora_fo", "method.objective=metric"], r"method.objective=metric with method=lora_fo \(method.optimizer=fo\)"),
        (["method=mezo", "method.objective=metric", "zo.parallel_queries=true"],
         r"method.objective=metric with zo.parallel_queries=true"),
        (["method=mezo", "method.objective=accuracy"], r"method.objective"),
    ],
)
def test_a_metric_objective_it_cannot_train_is_refused(entrypoint, overrides, message):
    proc = entrypoint("model=tiny-llama", "train.max_steps=1", *overrides)
    assert proc.returncode != 0
    assert re.search(message, output(proc)), output(proc)
    assert "Traceback" not in output(proc)
