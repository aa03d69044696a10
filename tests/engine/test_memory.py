"""Memory accounting (adazeta/engine/memory.py): memory-mapped weights count once `make_resident` reads
them, as they would on a device."""

from __future__ import annotations

import sys

import pytest
import torch

from adazeta.engine.memory import in_use_gib, make_resident

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the resident set is read from /proc/self/status, which only Linux has")


def resident_gib() -> float:
    return in_use_gib(torch.device("cpu"))  # the process's resident set (VmRSS)


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


@pytest.mark.slow  # a memory probe in a child process
def test_sparse_mezo_step_stays_near_inference_memory():
    """Sparse-MeZO's in-forward perturbation never copies a large weight whole: the embedding and
    the LM head (here 30522 x 1024 each, 119 MiB) are perturbed block by block, so a training step
    peaks within a small fraction of the embedding above inference (a whole perturbed copy, its z
    and its mask would add more than the embedding itself). Measured as the planner measures, in
    fresh processes."""
    from adazeta.cli import plan as planner

    wide = ["model=tiny-llama", "model.arch.hidden_size=1024", "model.arch.intermediate_size=1024",
            "model.arch.num_attention_heads=16", "model.device=cpu", "train.batch_size=8", "method=sparse_mezo"]
    plan = planner.plan(wide, fit=(1, 2), seq_len=32, threads=1, jobs=2, log=lambda s: None)
    embedding_gib = 30522 * 1024 * 4 / 1024**3
    for m in plan.measurements:
        assert m.peak_gib - m.inference_gib < 0.2 * embedding_gib, (m.layers, m.peak_gib, m.inference_gib)


def test_peaks_under_device_map_count_every_gpu(monkeypatch):
    """Under device_map the layers share the GPUs: every GPU holding weights is reset and read, the
    summary gives the sum and the largest one. CUDA's counters are faked (no GPU here), per index."""
    from types import SimpleNamespace

    from adazeta.engine.memory import GIB, get_memory_stats, model_devices, peak_gib, reset_peak

    peaks = {0: 1 * GIB, 1: 5 * GIB, 2: 3 * GIB}
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: peaks[torch.device(d).index])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 2 * peaks[torch.device(d).index])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: resets.append(torch.device(d).index))

    class Spread(torch.nn.Module):  # weights on cuda:2, cuda:0 and cuda:1, as accelerate places them
        def parameters(self, recurse=True):
            return iter([SimpleNamespace(device=torch.device("cuda", i)) for i in (2, 0, 0)])

        def buffers(self, recurse=True):
            return iter([SimpleNamespace(device=torch.device("cuda", 1))])

    devices = model_devices(Spread())
    assert devices == [torch.device("cuda", i) for i in (0, 1, 2)]
    reset_peak(devices)
    assert sorted(resets) == [0, 1, 2]
    stats = get_memory_stats(devices)
    assert stats == {"mem/peak_gib": 9.0, "mem/peak_device_max_gib": 5.0, "mem/reserved_gib": 18.0}
    assert peak_gib(devices) == 9.0 and peak_gib(torch.device("cuda", 1)) == 5.0
    assert model_devices(torch.nn.Linear(2, 2)) == [torch.device("cpu")]
