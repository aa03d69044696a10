"""Range checks: each out-of-range value fails before anything loads, naming the key and range."""

from __future__ import annotations

import pytest

from adazeta.errors import ConfigError
from adazeta.validate import validate

BAD = [
    ("method=adazeta", "method.eps=0", "method.eps=0.0", "> 0"),
    ("method=adazeta", "method.eps=-1e-3", "method.eps=-0.001", "> 0"),
    ("method=adazeta", "method.lr=0", "method.lr=0.0", "> 0"),
    ("method=adazeta", "adapter.rank=0", "adapter.rank=0", ">= 1"),
    ("method=adazeta", "adapter.bottleneck=0", "adapter.bottleneck=0", ">= 1"),
    ("method=adazeta", "schedule.q_max=0", "schedule.q_max=0", ">= 1"),
    ("method=adazeta", "schedule.alpha=-1", "schedule.alpha=-1.0", "> 0"),
    ("method=mezo", "schedule.q=0", "schedule.q=0", ">= 1"),
    ("method=sparse_mezo", "method.sparse.sparsity=1.0", "method.sparse.sparsity=1.0", "in [0, 1)"),
    ("method=sparse_mezo", "method.sparse.keep_ratio=0", "method.sparse.keep_ratio=0.0", "in (0, 1]"),
    ("method=mezo_lora", "method.lora.r=0", "method.lora.r=0", ">= 1"),
    ("method=adazeta", "method.momentum=1.5", "method.momentum=1.5", "in [0, 1)"),
    ("method=adazeta", "train.batch_size=0", "train.batch_size=0", ">= 1"),
    ("method=adazeta", "train.eval_steps=0", "train.eval_steps=0", ">= 1"),
    ("method=adazeta", "train.max_steps=-1", "train.max_steps=-1", ">= 0"),
    ("method=adazeta", "task.k_shot=0", "task.k_shot=0", ">= 1"),
    ("method=adazeta", "method.lr=nan", "method.lr=nan", "> 0"),
]


@pytest.mark.parametrize(("method", "override", "shown", "allowed"), BAD, ids=[b[1] for b in BAD])
def test_out_of_range_values_are_rejected(compose_cfg, method, override, shown, allowed):
    cfg = compose_cfg(method, override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert shown in str(err.value) and allowed in str(err.value)


def test_bad_adam_betas(compose_cfg):
    with pytest.raises(ConfigError, match=r"method.betas=\[0.9, 1.5\]"):
        validate(compose_cfg("method=adazeta", "method.betas=[0.9,1.5]"))


@pytest.mark.parametrize("method", ["adazeta", "mezo", "mezo_lora", "sparse_mezo", "ft", "lora_fo"])
def test_every_shipped_method_passes(compose_cfg, method):
    validate(compose_cfg(f"method={method}"))


def test_entrypoint_reports_the_range_without_traceback(entrypoint):
    proc = entrypoint("method.eps=0")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "method.eps=0.0 is out of range: it must be > 0" in text and "Traceback" not in text
