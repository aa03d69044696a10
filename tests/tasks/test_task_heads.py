"""Every task on every head it can have: one training step and an evaluation of each task on a tiny
model of each head kind it runs on (a causal LM, a masked LM, a classification head), built by the
loop's own build path; the heads it cannot run on refused by name.

The fast tests read the tasks' fixtures of test_tasks.py (their public formats, written into
tmp_path). The slow test steps each task that has real files in <repo>/../shared/data once on the
packaged SmolLM2-135M, through the real entrypoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_run_on, run_entrypoint
from task_files import WRITERS, task_cfg
from test_tasks import REAL, SHARED_DATA

from adazeta.config import Head
from adazeta.errors import ConfigError
from adazeta.tasks import TASKS, build_task

# Which task runs on which head: the table of adazeta/tasks/__init__.py.
CHOICES_AND_GENERATION = {"copa", "record", "squad", "drop"}
HEADS = {
    name: (Head.causal_lm,)
    if name in CHOICES_AND_GENERATION
    else (Head.causal_lm, Head.masked_lm, Head.classification)
    for name in TASKS
}
# A tiny random model of each head (conf/model/tiny-*.yaml; `head: auto` picks the head).
TINY = {Head.causal_lm: "tiny-llama", Head.masked_lm: "tiny-roberta", Head.classification: "tiny-bert"}
PAIRS = [(name, head) for name in sorted(TASKS) for head in HEADS[name]]
REFUSED = [
    (name, head)
    for name in sorted(TASKS)
    for head in (Head.masked_lm, Head.classification)
    if head not in HEADS[name]
]


def task_dir(name: str, tmp_path: Path) -> Path:
    """The task's fixture files; ReCoRD's single query is asked twice, so that the train split
    holds one dev and one training example as every other fixture does."""
    d = tmp_path / name
    d.mkdir()
    WRITERS[name](d)
    if name == "record":
        row = json.loads((d / "train.jsonl").read_text())
        row["qas"] = row["qas"] * 2
        (d / "train.jsonl").write_text(json.dumps(row) + "\n")
    return d


def overrides(name: str, data: Path, model: str) -> list[str]:
    """Every fixture row: one dev example, the rest train (the k-shot tasks sampled as MeZO does)."""
    return [
        f"task={name}", f"task.data_dir={data}", f"model={model}", "model.device=cpu", "method=mezo",
        "task.k_shot=null", "task.num_train=null", "task.num_dev=1", "task.num_test=null",
        "train.batch_size=2",
    ]


def test_the_head_table_is_what_the_tasks_say():
    assert {name: build_task(task_cfg(name)).heads for name in TASKS} == HEADS


@pytest.mark.parametrize(("name", "head"), PAIRS, ids=[f"{n}-{h.value}" for n, h in PAIRS])
def test_one_step_of_every_task_on_every_head_it_runs_on(name, head, tmp_path):
    run = build_run_on(overrides(name, task_dir(name, tmp_path), TINY[head]))
    assert run.objective.head == head
    examples = run.splits.train[:2]
    batch = run.objective.encode(examples, train=True)  # on the CPU, as the model
    before = [t.param.detach().clone() for t in run.method.trainables]
    result = run.method.step(run.objective.batch_loss(run.method.model, batch), 1, 1)
    assert math.isfinite(result.loss) and result.loss > 0 and result.forward_passes == 2
    moved = [not torch.equal(b, t.param) for b, t in zip(before, run.method.trainables, strict=True)]
    assert any(moved)
    scores = run.objective.evaluate(run.method.model, run.splits.test, "cpu")
    metrics = ("f1", "em") if name in ("squad", "drop") else ("accuracy",)
    assert set(scores) == {"loss", *metrics} and math.isfinite(scores["loss"])
    assert all(0.0 <= scores[m] <= 1.0 for m in metrics)


@pytest.mark.parametrize(("name", "head"), REFUSED, ids=[f"{n}-{h.value}" for n, h in REFUSED])
def test_choice_and_generation_tasks_refuse_the_other_heads_by_name(name, head, tmp_path):
    with pytest.raises(ConfigError) as info:
        build_run_on(overrides(name, task_dir(name, tmp_path), TINY[head]))
    message = str(info.value)
    assert message.startswith(f"task {name} does not run on the ")
    assert f"(model.head={head.value})" in message
    assert "It runs on the causal-LM head (model.head=causal_lm, e.g. model=smollm2-135m" in message
    assert "masked_lm," not in message and "classification," not in message  # the only head named


# -------------------------------------------------------------------- slow: real files, SmolLM2


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_every_real_task_steps_once_on_smollm2(name, tmp_path, tmp_path_factory, monkeypatch):
    data = SHARED_DATA / name
    if not data.is_dir():
        pytest.skip(f"{data} is absent: the real task files ship beside the repo (../shared/data)")
    # One conversion of the packaged GGUF for the whole module, not one per run's fresh HOME.
    monkeypatch.setenv("ADAZETA_CACHE", str(tmp_path_factory.getbasetemp() / "adazeta-cache"))
    proc = run_entrypoint(
        [
            f"task={name}", f"task.data_dir={data}", "model=smollm2-135m", "method=mezo",
            "train.max_steps=1", "train.eval_steps=1", "train.batch_size=2", "task.k_shot=null",
            "task.num_train=8", "task.num_dev=4", "task.num_test=4", "train.progress=false",
        ],
        tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m" and summary["forward_passes"] == 2
    assert 0.0 <= summary["test/accuracy"] <= 1.0 and math.isfinite(summary["test/loss"])
