"""Memory accounting (adazeta/memory.py): memory-mapped weights count once `make_resident` reads
them, as they would on a device."""

from __future__ import annotations

import sys

import pytest
import torch

from adazeta.memory import make_resident
from adazeta.planner import resident_gib

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_make_resident_counts_memory_mapped_weights(tmp_path):
    n = 64 * 1024 * 1024 // 4  # 64 MiB of float32
    path = tmp_path / "weights.bin"
    torch.zeros(n).numpy().tofile(path)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.from_file(str(path), shared=False, size=n), requires_grad=False)
    before = resident_gib()
    model.w.data[:1024].sum()  # like a forward that reads a few embedding rows
    assert resident_gib() - before < 8 / 1024
    make_resident(model)
    assert resident_gib() - before > 0.9 * 64 / 1024
