"""Peak-memory accounting: CUDA allocator stats on GPU, the process's peak resident set on CPU.

Every call takes one device or several: under `model.device_map` a model's layers sit on several
GPUs, and the peaks of all of them (`model_devices`) are reset and read together.

On Linux the CPU peak (VmHWM) can be reset by writing 5 to /proc/self/clear_refs, so that a peak
measures one phase (inference, training) and not the transient of loading the model.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

GIB = 1024**3
_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


Devices = torch.device | Iterable[torch.device]


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """The devices whose memory a run of `model` uses: every CUDA device holding one of its
    parameters or buffers, in index order (several under `model.device_map`), or else the CPU."""
    found = {t.device for t in [*model.parameters(), *model.buffers()]}
    cuda = sorted((d for d in found if d.type == "cuda"), key=lambda d: d.index or 0)
    return cuda or [torch.device("cpu")]


def _devices(devices: Devices) -> list[torch.device]:
    if isinstance(devices, (torch.device, str)):
        devices = [devices]
    devices = [torch.device(d) for d in devices]
    # A CUDA device without an index is the current one: pin it, so that each is counted once.
    return list(dict.fromkeys(
        torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
        for d in devices
    ))


def reset_peak(devices: Devices) -> None:
    """Start a new peak on each of `devices` (a device or several)."""
    for device in _devices(devices):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            continue
        try:
            _CLEAR.write_text("5")
        except OSError:  # not Linux, or not permitted: the peak stays a whole-process high-water mark
            pass


def device_peaks_gib(devices: Devices) -> list[float]:
    """Peak memory of each device since the last reset_peak: torch.cuda.max_memory_allocated on
    CUDA, the peak resident set (VmHWM) of the process on the CPU."""
    return [_peak_gib(device) for device in _devices(devices)]


def peak_gib(devices: Devices) -> float:
    """Peak memory since the last reset_peak, summed over `devices`: under `device_map` the model's
    layers share the GPUs, so one GPU's peak (GPU 0 holds least under balanced_low_0) describes a
    part of the model only. The sum is an upper bound of the peaks' simultaneous total."""
    return sum(device_peaks_gib(devices))


def _status_gib(field: str) -> float | None:
    """A memory line of /proc/self/status (VmHWM: peak resident set, VmRSS: now) in GiB; None
    where the system has no /proc."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    peak = _status_gib("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / GIB


def in_use_gib(device: torch.device) -> float | None:
    """Memory in use on `device` now: torch.cuda.memory_allocated on CUDA, the process's resident
    set (VmRSS) on the CPU; None where the system does not tell (no /proc). Taken before a model is
    built, it is what a later peak subtracts to count the model's memory only (adazeta/engine/plan/measure.py)."""
    device = _devices(device)[0]
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GIB
    return _status_gib("VmRSS")


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


def get_memory_stats(devices: Devices) -> dict[str, float]:
    """`mem/peak_gib`: the peaks summed over `devices`; `mem/peak_device_max_gib`: the largest
    one device's peak (what must fit on a GPU); `mem/reserved_gib`: CUDA's reserved memory, summed."""
    devices = _devices(devices)
    peaks = device_peaks_gib(devices)
    stats = {"mem/peak_gib": sum(peaks), "mem/peak_device_max_gib": max(peaks)}
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        stats["mem/reserved_gib"] = sum(torch.cuda.max_memory_reserved(d) for d in cuda) / GIB
    return stats
