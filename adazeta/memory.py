"""Peak-memory accounting: CUDA allocator stats on GPU, the process's peak resident set on CPU."""

from __future__ import annotations

import resource
import sys

import torch

GIB = 1024**3


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak memory so far: torch.cuda.max_memory_allocated on CUDA, peak RSS of the process on CPU
    (a high-water mark since the process started, so it includes loading the model)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / GIB


def get_memory_stats(device: torch.device) -> dict[str, float]:
    stats = {"mem/peak_gib": peak_gib(device)}
    if device.type == "cuda":
        stats["mem/reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return stats
