"""The run's safetensors files, written and read one tensor at a time (adazeta/engine/tensor_files.py
write_tensors, read_into): files safetensors itself reads back exactly, tensors that are views of
one flat buffer (a ZO step's adapter groups), refusals that name the tensor, and a peak memory of
about one tensor rather than a copy of the whole set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adazeta.engine.memory import _status_gib, reset_peak
from adazeta.engine.tensor_files import read_into, write_tensors
from adazeta.errors import CheckpointError


def mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(30, generator=g)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.arange(7),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "view_a": flat[:12].view(3, 4),  # two views of one buffer, as the adapter groups are
        "view_b": flat[12:30],
        "transposed": torch.randn(4, 3, generator=g).t(),  # not contiguous
    }


def test_safetensors_reads_back_exactly_what_was_written(tmp_path):
    tensors = mixed()
    write_tensors(tmp_path / "t.safetensors", tensors)
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors)


def test_read_into_fills_views_and_other_layouts_in_place(tmp_path):
    tensors = mixed()
    write_tensors(tmp_path / "t.safetensors", tensors)
    flat = torch.zeros(30)
    targets = {name: torch.zeros_like(t) for name, t in tensors.items()}
    targets["view_a"], targets["view_b"] = flat[:12].view(3, 4), flat[12:30]
    targets["transposed"] = torch.zeros(4, 3).t()
    storage = targets["view_a"].data_ptr()
    read_into(tmp_path / "t.safetensors", targets)
    for name, t in tensors.items():
        assert torch.equal(targets[name], t), name
    assert targets["view_a"].data_ptr() == storage and torch.equal(flat[:12], tensors["view_a"].reshape(-1))


def test_read_into_refuses_a_missing_mismatched_or_truncated_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    write_tensors(path, {"a": torch.ones(4), "b": torch.ones(2, 3)})
    with pytest.raises(CheckpointError, match="lacks 1 of the trainable tensors, e.g. c"):
        read_into(path, {"a": torch.zeros(4), "c": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"b is F32 \[2, 3\], the run's tensor F32 \[3, 2\]"):
        read_into(path, {"b": torch.zeros(3, 2)})
    with pytest.raises(CheckpointError, match="b is F32"):
        read_into(path, {"b": torch.zeros(2, 3, dtype=torch.float64)})
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        read_into(path, {"a": torch.zeros(4), "b": torch.zeros(2, 3)})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak resident set is read from /proc")
def test_writing_and_reading_a_large_set_costs_about_one_tensor(tmp_path: Path):
    """16 tensors of 16 MiB (256 MiB, views of one buffer as a ZO step keeps them): writing and
    reading them raise the peak resident set by far less than the set (safetensors' save_file of
    copies raised it by the whole set, its mapped loaders by the whole file)."""
    flat = torch.randn(16 * (1 << 22))
    tensors = {f"t{i}": flat[i << 22 : (i + 1) << 22] for i in range(16)}
    size_gib = flat.numel() * 4 / 2**30
    path = tmp_path / "big.safetensors"
    cpu = [torch.device("cpu")]
    reset_peak(cpu)
    if _status_gib("VmHWM") - _status_gib("VmRSS") > 0.05:
        pytest.skip("the peak resident set cannot be reset here (/proc/self/clear_refs)")
    before = _status_gib("VmRSS")
    write_tensors(path, tensors)
    wrote = _status_gib("VmHWM") - before
    flat.zero_()
    reset_peak(cpu)
    before = _status_gib("VmRSS")
    read_into(path, tensors)
    read = _status_gib("VmHWM") - before
    assert torch.equal(tensors["t3"], load_file(str(path))["t3"]) and flat.abs().sum() > 0
    assert wrote < 0.25 * size_gib, (wrote, size_gib)
    assert read < 0.25 * size_gib, (read, size_gib)
