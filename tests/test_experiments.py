"""The paper settings in conf/experiment/: every file composes to the values of its paper (the
model, method, learning rate, eps, batch, steps), and every file trains one step on a tiny random
stand-in of its model, on a tiny fixture of a task it is run with, through `adazeta.engine.loop.run`.

The files are discovered from conf/experiment/*.yaml, so a new experiment is tested without editing
this file: it only needs an entry in EXPECTED (the test fails until it has one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, REPO, compose_config, config_options, job_config, subprocess_env
from omegaconf import OmegaConf
from task_files import mnli_files, squad_files, write_csv, write_jsonl, write_tsv

from adazeta import config as schema
from adazeta.engine.loop import run

EXPERIMENTS = config_options("experiment")

# What each paper setting must compose to: (model, method, lr, eps, batch, steps, eval_steps).
LLAMA = {"model": "llama2-7b", "batch": 16, "eval_steps": 200}
ROBERTA = {"model": "roberta-large", "batch": 64, "steps": 100_000, "eval_steps": 1000}
CPU = {"model": "smollm2-135m", "batch": 8, "steps": 60, "eval_steps": 15}
EXPECTED = {
    "llama2_7b_adazeta": {**LLAMA, "method": "adazeta", "lr": 1e-4, "eps": 1e-3, "steps": 10_000},
    "llama2_7b_adazeta_paper": {**LLAMA, "method": "adazeta", "lr": 1e-4, "eps": 1e-3, "steps": 10_000},
    "llama2_7b_mezo": {**LLAMA, "method": "mezo", "lr": 5e-7, "eps": 1e-3, "steps": 20_000},
    "llama2_7b_mezo_lora": {
        **LLAMA,
        "method": "mezo_lora",
        "lr": 1e-4,
        "eps": 1e-2,
        "steps": 20_000,
    },
    "llama2_7b_sparse_mezo": {
        **LLAMA,
        "method": "sparse_mezo",
        "lr": 1e-6,
        "eps": 1e-3,
        "steps": 20_000,
    },
    "roberta_large_adazeta": {**ROBERTA, "method": "adazeta", "lr": 1e-4, "eps": 1e-3},
    "roberta_large_mezo": {**ROBERTA, "method": "mezo", "lr": 1e-6, "eps": 1e-3},
    "roberta_large_mezo_lora": {**ROBERTA, "method": "mezo_lora", "lr": 1e-4, "eps": 1e-3},
    "roberta_large_sparse_mezo": {**ROBERTA, "method": "sparse_mezo", "lr": 1e-6, "eps": 1e-3},
    "cpu_sst2_adazeta": {**CPU, "method": "adazeta", "lr": 3e-4, "eps": 1e-3},
    "cpu_sst2_mezo": {**CPU, "method": "mezo", "lr": 1e-5, "eps": 1e-3},
    "cpu_sst2_mezo_lora": {**CPU, "method": "mezo_lora", "lr": 3e-3, "eps": 1e-3},
    "cpu_sst2_sparse_mezo": {**CPU, "method": "sparse_mezo", "lr": 2e-5, "eps": 1e-3},
}

# The task each experiment is smoke-run with (the Llama and RoBERTa files take the task from the
# command line): together they cover the causal prompts, generation (SQuAD), the LM-BFF k-shot
# sampling and the masked-LM head.
SMOKE_TASK = {
    "llama2_7b_adazeta": "rte",
    "llama2_7b_adazeta_paper": "rte",
    "llama2_7b_mezo": "squad",
    "llama2_7b_mezo_lora": "boolq",
    "llama2_7b_sparse_mezo": "cb",
    "roberta_large_adazeta": "rte",
    "roberta_large_mezo": "sst5",
    "roberta_large_mezo_lora": "mnli",
    "roberta_large_sparse_mezo": "sst2",
}
STAND_IN = {"llama2-7b": "tiny-llama", "roberta-large": "tiny-roberta", "smollm2-135m": "tiny-llama"}
# One step, dev and test evaluated once at that step, on a few examples.
ONE_STEP = [
    "model.dtype=float32",
    "model.device=cpu",
    "train.max_steps=1",
    "train.batch_size=2",
    "train.eval_batch_size=4",
    "train.progress=false",
]


# ------------------------------------------------------------------ tiny fixtures, public formats
# Every class appears several times, so that k-shot sampling (2k per class) and the 8/4/4 sizes fit.


def rte_fixture(d: Path) -> None:
    rows = [
        [i, f"Premise number {i} is here.", f"Claim {i}.", ["entailment", "not_entailment"][i % 2]]
        for i in range(16)
    ]
    write_tsv(d / "train.tsv", ["index", "sentence1", "sentence2", "label"], rows)
    write_tsv(d / "dev.tsv", ["index", "sentence1", "sentence2", "label"], rows[:8])


def sst2_fixture(d: Path) -> None:
    rows = [[f"a film with {i} {'great' if i % 2 else 'dull'} scenes .", i % 2] for i in range(16)]
    write_tsv(d / "train.tsv", ["sentence", "label"], rows)
    write_tsv(d / "dev.tsv", ["sentence", "label"], rows[:8])


def sst5_fixture(d: Path) -> None:
    rows = [[i % 5, f"review number {i} ."] for i in range(25)]
    write_csv(d / "train.csv", rows)
    write_csv(d / "test.csv", rows[:10])


def boolq_fixture(d: Path) -> None:
    rows = [
        {
            "passage": f"Passage {i} says yes or no.",
            "question": f"is {i} even",
            "label": i % 2 == 0,
            "idx": i,
        }
        for i in range(16)
    ]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "val.jsonl", rows[:8])


def cb_fixture(d: Path) -> None:
    labels = ["entailment", "contradiction", "neutral"]
    rows = [
        {
            "premise": f"Mary said {i} things.",
            "hypothesis": f"She said {i}",
            "label": labels[i % 3],
            "idx": i,
        }
        for i in range(18)
    ]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "val.jsonl", rows[:6])


def repeated(writer):
    """A fixture writer whose rows are repeated (MNLI's three classes, SQuAD's two questions)."""

    def write(d: Path) -> None:
        writer(d)
        for path in d.iterdir():
            if path.suffix == ".json":
                data = json.loads(path.read_text())
                data["data"] = data["data"] * 6
                path.write_text(json.dumps(data))
            else:
                header, *rows = path.read_text().splitlines()
                path.write_text("\n".join([header, *(rows * 6)]) + "\n")

    return write


FIXTURES = {
    "rte": rte_fixture,
    "sst2": sst2_fixture,
    "sst5": sst5_fixture,
    "boolq": boolq_fixture,
    "cb": cb_fixture,
    "mnli": repeated(mnli_files),
    "squad": repeated(squad_files),
}


def smoke_overrides(name: str, tmp_path: Path) -> list[str]:
    """The overrides that turn experiment `name` into a one-step run on a tiny stand-in."""
    paper = compose_config([f"experiment={name}"], hydra_config=False)
    overrides = [f"experiment={name}", *ONE_STEP]
    if paper.model.name in STAND_IN:
        overrides.append(f"model={STAND_IN[paper.model.name]}")
    task = SMOKE_TASK.get(name)
    if task is not None:
        data = tmp_path / task
        data.mkdir()
        FIXTURES[task](data)
        overrides += [f"task={task}", f"task.data_dir={data}"]
    else:  # the CPU comparison: its own task, the built-in sample when ADAZETA_SST2_DIR is unset
        overrides.append("task.data_dir=null")
    if paper.task.k_shot is not None:
        overrides.append("task.k_shot=2")
    else:
        overrides += ["task.num_train=8", "task.num_dev=4", "task.num_test=4"]
    return overrides


# ------------------------------------------------------------------ tests


def test_experiments_are_discovered_and_each_has_expectations():
    assert len(EXPERIMENTS) >= 12, EXPERIMENTS
    assert set(EXPERIMENTS) == set(EXPECTED), "add the new experiment's paper values to EXPECTED"
    for name in EXPERIMENTS:
        text = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n"), (
            f"{name}.yaml must start with '# @package _global_'"
        )


def test_composing_without_an_experiment_is_the_embedded_default():
    cfg = compose_config([], hydra_config=True)
    assert cfg.hydra.runtime.choices.get("experiment") is None
    assert (cfg.model.name, cfg.method.name, cfg.task.name) == ("smollm2-135m", "adazeta", "sst2")
    # The CPU-sized departures from the paper (docs/study.md): identity adapter init, lr 1e-3,
    # at least two queries a step, batch 8, 20 steps.
    assert (cfg.adapter.init.value, cfg.method.lr, cfg.schedule.q_min) == ("identity", 1e-3, 2)
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.train.eval_steps) == (8, 20, 10)


@pytest.mark.parametrize("name", ["llama2_7b_adazeta", "roberta_large_adazeta"])
def test_paper_experiments_keep_the_papers_adapter_init_and_lr(name):
    cfg = compose_config([f"experiment={name}"], hydra_config=True)
    assert (cfg.adapter.init.value, cfg.method.lr) == ("paper", 1e-4)
    assert cfg.schedule.get("q_min", 1) == 1 and cfg.schedule.get("q", 1) == 1  # one query from the first step


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_to_its_paper_values(name, monkeypatch):
    monkeypatch.delenv("ADAZETA_SST2_DIR", raising=False)
    want = EXPECTED[name]
    task = SMOKE_TASK.get(name, "sst2")
    cfg = compose_config([f"experiment={name}", f"task={task}"], hydra_config=True)
    assert cfg.hydra.runtime.choices.experiment == name
    assert cfg.hydra.runtime.choices.task == task  # the command line's task wins
    obj = OmegaConf.to_object(job_config(cfg))  # typed: fails on any value that does not fit
    assert (obj.model.name, obj.method.name) == (want["model"], want["method"])
    assert obj.method.lr == pytest.approx(want["lr"]) and obj.method.eps == pytest.approx(
        want["eps"]
    )
    assert (obj.train.batch_size, obj.train.max_steps, obj.train.eval_steps) == (
        want["batch"],
        want["steps"],
        want["eval_steps"],
    )
    if want["model"] == "roberta-large":  # LM-BFF: k = 16 per class, whatever the task file says
        assert (obj.task.k_shot, obj.task.data_seed, obj.task.num_test) == (16, 13, 1000)
        assert obj.model.head in (schema.Head.auto, schema.Head.masked_lm)
    if want["model"] == "llama2-7b":  # MeZO's protocol from the task file, real data only
        assert (obj.task.k_shot, obj.task.builtin, obj.model.dtype) == (None, False, "bfloat16")
        assert (obj.task.num_train, obj.task.num_test) == (1000, 1000)
    if want["method"] == "adazeta":  # on Llama: the released code's Q (capped at 15) or the paper's; RoBERTa: Q = 1
        if want["model"] == "roberta-large":
            assert isinstance(obj.schedule, schema.ConstantScheduleConfig) and obj.schedule.q == 1
        else:
            assert isinstance(obj.schedule, schema.AdaptiveScheduleConfig)
            if name == "llama2_7b_adazeta":
                assert (obj.schedule.q_target, obj.schedule.q_max) == (20, 15)
            elif want["model"] == "llama2-7b":
                assert (obj.schedule.q_target, obj.schedule.beta, obj.schedule.q_max) == (None, 0.45, 20)
    if want["method"] == "sparse_mezo":
        assert obj.method.sparse.sparsity == 0.8 and obj.method.sparse.in_forward
    if name.startswith("cpu_sst2_"):  # the built-in sample unless ADAZETA_SST2_DIR names real files
        assert obj.task.data_dir is None and obj.task.builtin


def test_cpu_comparison_reads_the_sst2_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAZETA_SST2_DIR", str(tmp_path))
    cfg = compose_config(["experiment=cpu_sst2_mezo"], hydra_config=False)
    assert cfg.task.data_dir == str(tmp_path)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains_one_step_on_a_tiny_stand_in(name, tmp_path, monkeypatch):
    monkeypatch.delenv("ADAZETA_SST2_DIR", raising=False)
    overrides = smoke_overrides(name, tmp_path)
    cfg = job_config(compose_config(overrides, hydra_config=False))
    paper = EXPECTED[name]
    assert cfg.method.name == paper["method"] and cfg.method.lr == pytest.approx(paper["lr"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = run(cfg, run_dir)
    assert summary["steps"] == 1 and summary["method"] == paper["method"]
    assert summary["model"] == STAND_IN.get(paper["model"], paper["model"])
    assert summary["forward_passes"] >= 2  # one two-sided query at least
    # The zero-shot (step 0, train.eval_at_start) competes for the best dev weights.
    assert summary["trainable_params"] > 0 and summary["best/step"] in (0, 1)
    assert summary["test/loss"] > 0 and (run_dir / "summary.json").is_file()


def test_the_cli_takes_an_experiment_and_a_task(tmp_path):
    """`adazeta-train experiment=... task=... --cfg job` through the real entrypoint."""
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "adazeta.cli.train",
            "experiment=llama2_7b_adazeta",
            "task=rte",
            "--cfg",
            "job",
        ],
        cwd=tmp_path,
        env=subprocess_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = OmegaConf.create(proc.stdout)
    assert (cfg.model.name, cfg.task.name, cfg.method.name) == ("llama2-7b", "rte", "adazeta")
    assert cfg.train.max_steps == 10_000 and (cfg.schedule.q_target, cfg.schedule.q_max) == (20, 15)


def test_readme_names_every_experiment():
    readme = (REPO / "conf" / "experiment" / "README.md").read_text()
    for name in EXPERIMENTS:
        assert name in readme, f"conf/experiment/README.md misses {name}"
