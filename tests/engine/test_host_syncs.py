"""Host syncs: on a GPU every read of a device value by the host (`.item()`,
`.tolist()`, `int(t)`, a `repeat_interleave` without its output size) waits for the queue to drain.
A ZO step reads the device once, whatever its number of queries, and a causal-LM scoring forward
not at all: the sizes it needs are fixed when the batch is encoded.

The counters wrap torch's host-read entry points and count the calls made from adazeta's own code
(the model's internals are transformers' business)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import build_method_on
from task_files import copa_files

import adazeta
from adazeta.engine.build import to_device
from adazeta.tasks import Example

PACKAGE = str(Path(adazeta.__file__).parent)
HOST_READS = ["item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "repeat_interleave"]


@pytest.fixture
def host_reads(monkeypatch) -> list[str]:
    """The host reads adazeta's code makes while the test runs, as 'function (file:line)'."""
    seen: list[str] = []

    def counted(name, original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                seen.append(f"{name} ({Path(caller.f_code.co_filename).name}:{caller.f_lineno})")
            return original(*args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "repeat_interleave", counted("torch.repeat_interleave", torch.repeat_interleave))
    return seen


COPA = [  # multi-token candidates of different lengths, so the kept positions matter
    Example({"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
             "choice2": "He fell asleep.", "question": "cause"}, 0,
            candidates=("He dropped a hammer on his foot.", "He fell asleep.")),
    Example({"premise": "It started to rain.", "choice1": "The sun came out.",
             "choice2": "We opened our umbrellas.", "question": "effect"}, 1,
            candidates=("The sun came out.", "We opened our umbrellas.")),
    Example({"premise": "The glass fell.", "choice1": "It shattered.", "choice2": "It sang a song today.",
             "question": "effect"}, 0, candidates=("It shattered.", "It sang a song today.")),
]


@pytest.fixture
def copa_dir(tmp_path) -> Path:
    """COPA files in the task's public format: the build path loads the task's splits."""
    copa_files(tmp_path)
    return tmp_path


def causal_batch(method: str, data_dir: Path, train: bool = True):
    m, objective, _ = build_method_on(["model=tiny-llama", f"method={method}", "task=copa", f"task.data_dir={data_dir}",
                                     "task.num_train=1", "task.num_dev=1"])
    batch = to_device(objective.encode(COPA, train=train), torch.device("cpu"))
    return m, objective, batch


def test_a_causal_scoring_forward_reads_nothing_back_from_the_device(host_reads, copa_dir):
    m, objective, batch = causal_batch("mezo_lora", copa_dir, train=False)
    assert batch["cand_own"].shape[1] > 1  # multi-token candidates: the kept positions matter
    host_reads.clear()  # encoding is host work on host tensors
    with torch.no_grad():
        losses, preds = objective.forward(m.model, batch)
    assert host_reads == []
    assert losses.shape == preds.shape == (3,) and torch.isfinite(losses).all()


@pytest.mark.parametrize("q", [1, 4])
def test_a_zo_step_reads_the_device_once_whatever_its_queries(host_reads, q, copa_dir):
    m, objective, batch = causal_batch("mezo_lora", copa_dir)
    loss = objective.batch_loss(m.model, batch)
    host_reads.clear()
    result = m.step(loss, 1, q)
    assert len(result.grads) == q
    assert len(host_reads) == 1, host_reads  # the step's [Q, 2] (g_q, loss_q), read once
