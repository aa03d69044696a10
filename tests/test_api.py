"""The library API (adazeta/api.py, adazeta/hf_trainer.py): a step through ZOFineTuner is
build_method's step, bit for bit; presets are adazeta-train's; bad names and keys fail naming the
valid ones; the state round-trips; ZOTrainer trains through transformers.Trainer; the two examples
run."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REPO, compose_config, subprocess_env, tiny_model

from adazeta import ZOFineTuner
from adazeta.api import compose_method, method_names
from adazeta.errors import ConfigError
from adazeta.methods import build_method

ZO_METHODS = ["adazeta", "mezo", "mezo_lora", "sparse_mezo"]


def batch_of(causal: bool = False, n: int = 4, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """A fixed batch for the model's own loss: labels are classes for a classification head,
    the tokens themselves for a causal LM."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 2000, (n, length), generator=g)
    labels = ids.clone() if causal else torch.tensor([i % 2 for i in range(n)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def weights(trainables) -> dict[str, torch.Tensor]:
    return {t.name: t.param.detach().clone() for t in trainables}


@pytest.mark.parametrize("method", ZO_METHODS)
def test_a_step_through_the_api_is_build_methods_step_bit_for_bit(method):
    # The reference: what adazeta-train builds from its composed config, stepped by hand.
    cfg = compose_config([f"method={method}", "method.lr=1e-3", "model=tiny-bert"], hydra_config=False)
    loaded = tiny_model("tiny-bert")  # seeded: the same base weights for both
    torch.manual_seed(0)
    ref = build_method(loaded.model, cfg.method, cfg.adapter, loaded.head, cfg.seed, zo=cfg.zo)
    batch = batch_of()
    start = weights(ref.trainables)
    ref_results = [ref.step(lambda: ref.model(**batch).loss, step, 2) for step in (1, 2)]

    model = tiny_model("tiny-bert").model
    torch.manual_seed(0)
    zo = ZOFineTuner(model, method, lr=1e-3)
    results = [zo.step(lambda: zo.model(**batch).loss, q=2) for _ in range(2)]

    assert [t.name for t in zo.trainables] == [t.name for t in ref.trainables]
    assert [r.grads for r in results] == [r.grads for r in ref_results]
    assert [r.seeds for r in results] == [r.seeds for r in ref_results]
    moved = [n for n, w in weights(ref.trainables).items() if not torch.equal(w, start[n])]
    assert moved, "the reference step moved nothing: the comparison would be empty"
    for (name, mine), theirs in zip(weights(zo.trainables).items(), ref.trainables, strict=True):
        assert torch.equal(mine, theirs.param), name
    assert zo.steps == 2


@pytest.mark.parametrize("method", method_names())
def test_presets_are_what_adazeta_train_composes(method):
    ours = compose_method(method)
    theirs = compose_config([f"method={method}"], hydra_config=False)
    for section in ("method", "adapter", "schedule", "zo"):
        assert ours[section] == theirs[section], section
    overridden = compose_method(method, lr=0.5, schedule="constant", q=3)
    expected = compose_config([f"method={method}", "method.lr=0.5", "schedule=constant", "schedule.q=3"],
                              hydra_config=False)
    assert overridden.method == expected.method and overridden.schedule == expected.schedule


@pytest.mark.parametrize(
    ("method", "kwargs", "says"),
    [
        ("mezzo", {}, ["method='mezzo' is not a method", "mezo_lora", "sparse_mezo"]),
        ("adazeta", {"lr_x": 1.0}, ["lr_x=1.0 is not a setting of method=adazeta", "valid keys:", "rank", "q_max"]),
        ("adazeta", {"q": 4}, ["q=4 is not a setting", "schedule=adaptive", "'constant'"]),
        ("adazeta", {"trainable": "full"}, ["trainable='full' is not a setting", "pick another of"]),
        ("adazeta", {"lora": {"r": 4}}, ["method.lora.r is not read by method=adazeta", "mezo_lora"]),
        ("mezo", {"rank": 4}, ["adapter.rank is not read by method=mezo"]),
        ("mezo", {"lr": -1.0}, ["method.lr=-1.0 is out of range", "> 0"]),
        ("mezo", {"lr": "fast"}, ["lr='fast'", "could not be converted to Float"]),
        ("mezo", {"update_rule": "lion"}, ["update_rule='lion'", "sgd", "adam"]),
        ("mezo", {"schedule": "cosine"}, ["schedule='cosine' is not a query schedule", "linear"]),
        ("mezo", {"head": "lm"}, ["head='lm' is not a head", "causal_lm"]),
    ],
)
def test_bad_methods_keys_and_values_fail_naming_the_valid_ones(method, kwargs, says):
    model = torch.nn.Linear(2, 2)  # never reached: the config fails first
    with pytest.raises(ConfigError) as e:
        ZOFineTuner(model, method, **kwargs)
    for text in says:
        assert text in str(e.value), (text, str(e.value))


def test_the_adaptive_schedule_counts_epochs_once_bound():
    model = tiny_model("tiny-bert").model
    batch = batch_of()
    zo = ZOFineTuner(model, "adazeta", alpha=2.0, q_min=1)
    with pytest.raises(ConfigError, match="pass steps_per_epoch= and max_steps= to ZOFineTuner"):
        zo.step(lambda: zo.model(**batch).loss)
    zo.schedule.bind(steps_per_epoch=2, max_steps=4)
    # Q = min(max(floor(2 * e ** 0.45), q_min=1), 20): epoch 0 -> 1, epoch 1 -> 2; 2Q forward passes each.
    passes = [zo.step(lambda: zo.model(**batch).loss).forward_passes for _ in range(4)]
    assert passes == [2, 2, 4, 4]


def test_state_dict_round_trip_continues_the_run_bit_for_bit(tmp_path):
    def start():
        model = tiny_model("tiny-bert").model
        torch.manual_seed(0)
        return ZOFineTuner(model, "mezo_lora", lr=1e-2, update_rule="momentum")  # momentum: rule state

    batch = batch_of()
    a = start()
    for _ in range(2):
        a.step(lambda: a.model(**batch).loss)
    torch.save(a.state_dict(), tmp_path / "zo.pt")
    for _ in range(2):
        a.step(lambda: a.model(**batch).loss)

    b = start()
    b.load_state_dict(torch.load(tmp_path / "zo.pt", weights_only=True))
    assert b.steps == 2
    for _ in range(2):
        b.step(lambda: b.model(**batch).loss)
    momentum = {k: v for k, v in b.state_dict()["update"]["tensors"].items()}
    assert momentum and any(v.abs().sum() > 0 for v in momentum.values())
    for ta, tb in zip(a.trainables, b.trainables, strict=True):
        assert torch.equal(ta.param, tb.param), ta.name
    other = ZOFineTuner(tiny_model("tiny-bert").model, "mezo")
    with pytest.raises(ConfigError, match="this state is of method=mezo_lora, not method=mezo"):
        other.load_state_dict(a.state_dict())


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def trainer_args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant")
    return TrainingArguments(**{**base, **kw})


def params(model) -> dict[str, torch.Tensor]:
    """Every parameter, named as in the bare model (the adapters' `base_layer` infix dropped)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()}


def test_zotrainer_takes_n_zo_steps_and_moves_only_the_trainable_set(tmp_path):
    from adazeta import ZOOptimizer, ZOTrainer

    model = tiny_model("tiny-llama").model
    data = TokenDataset(batch_of(causal=True, n=8))
    torch.manual_seed(0)
    zo = ZOFineTuner(model, "adazeta", lr=1e-2)
    start = params(zo.model)
    trainer = ZOTrainer(zo=zo, args=trainer_args(tmp_path, max_steps=3), train_dataset=data)
    trainer.train()

    assert trainer.state.global_step == 3 and zo.steps == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses)  # a causal LM's loss, not 0 or nan
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), ZOOptimizer)  # no AdamW
    trainable = {t.name for t in zo.trainables}
    assert trainable and all(".adapter." in n for n in trainable)
    moved = {n for n, p in params(zo.model).items() if not torch.equal(p, start[n])}
    assert moved and moved <= trainable, sorted(moved - trainable)


def test_zotrainer_refuses_what_a_zo_step_cannot_honour(tmp_path):
    from adazeta import ZOTrainer

    data = TokenDataset(batch_of(n=4))
    zo = ZOFineTuner(tiny_model("tiny-bert").model, "mezo_lora")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2"):
        ZOTrainer(zo=zo, args=trainer_args(tmp_path, gradient_accumulation_steps=2), train_dataset=data)
    with pytest.raises(ConfigError, match="learning_rate=0.001 would not be used"):
        ZOTrainer(zo=zo, args=trainer_args(tmp_path, learning_rate=1e-3), train_dataset=data)
    first_order = ZOFineTuner(tiny_model("tiny-bert").model, "lora_fo")
    with pytest.raises(ConfigError, match="method=lora_fo is first-order"):
        ZOTrainer(zo=first_order, args=trainer_args(tmp_path), train_dataset=data)


def test_import_adazeta_stays_light(tmp_path):
    code = "import sys, adazeta; assert 'torch' not in sys.modules, 'torch imported'; print(adazeta.__all__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "ZOFineTuner" in proc.stdout and "ZOTrainer" in proc.stdout


EXAMPLE_TIMEOUT = 900  # seconds in the worst case on a loaded machine; each runs in seconds on an idle CPU


def run_example(name: str, tmp_path) -> subprocess.CompletedProcess:
    env = subprocess_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)  # this checkout's adazeta, whichever one is installed
    return subprocess.run([sys.executable, str(REPO / "scripts" / "examples" / name)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT)


@pytest.mark.slow  # both examples of docs, 60 steps each
def test_both_examples_run_and_their_loss_goes_down(tmp_path):
    names = ["plain_loop.py", "hf_trainer.py"]
    with ThreadPoolExecutor(len(names)) as pool:
        procs = dict(zip(names, pool.map(lambda n: run_example(n, tmp_path), names), strict=True))
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}\n{proc.stderr}"
        # Each prints the loss on its batch before training and after it.
        first = float(re.search(r"loss before: ([\d.]+)", proc.stdout).group(1))
        last = float(re.search(r"loss after: ([\d.]+)", proc.stdout).group(1))
        assert last < first, f"{name}: {proc.stdout}"
