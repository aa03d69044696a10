"""Peak-memory accounting: CUDA allocator stats on GPU, the process's peak resident set on CPU.

On Linux the CPU peak (VmHWM) can be reset by writing 5 to /proc/self/clear_refs, so that a peak
measures one phase (inference, training) and not the transient of loading the model.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

GIB = 1024**3
_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR.write_text("5")
    except OSError:  # not Linux, or not permitted: the peak stays a whole-process high-water mark
        pass


def peak_gib(device: torch.device) -> float:
    """Peak memory since the last reset_peak: torch.cuda.max_memory_allocated on CUDA, the peak
    resident set (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / GIB


@torch.no_grad()
def make_resident(model: torch.nn.Module) -> None:
    """Read one value per memory page of every CPU parameter and buffer. Weights loaded from
    safetensors are memory-mapped and enter the resident set only when read: without this an
    inference measurement misses the rows of an embedding its batch never looks up, which a training
    step (that perturbs every weight) does touch."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.numel():
            step = max(1, 4096 // t.element_size())
            t.detach().reshape(-1)[::step].sum()


def get_memory_stats(device: torch.device) -> dict[str, float]:
    stats = {"mem/peak_gib": peak_gib(device)}
    if device.type == "cuda":
        stats["mem/reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return stats
