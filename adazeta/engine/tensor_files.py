"""Safetensors files of a run (checkpoints, best-dev weights, adazeta-replay --save), written and
read one tensor at a time, so that saving or loading a set never holds a second copy of it; and
the errors that say what is wrong with such a file. Nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from adazeta.errors import CheckpointError

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors -> torch

# torch dtype -> safetensors dtype name
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@torch.no_grad()
def write_tensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]] | dict[str, torch.Tensor]) -> None:
    """Write `tensors` as a safetensors file, one tensor at a time: the header first (names, dtypes,
    shapes, offsets: known without the data), then each tensor's bytes straight from its storage
    (moved to the CPU, and made contiguous, one tensor at a time). safetensors' own save_file
    takes every tensor at once and turns each into a bytes copy, and tensors that share memory (the
    views of one flat buffer a ZO step keeps its adapters in) must be copied before it accepts them:
    for a full-parameter set that is one or two extra copies of the model in host memory (SmolLM2-
    135M: +0.96 GiB on a 0.46 GiB model, measured). Here the peak is the largest tensor."""
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    header, offset = {}, 0
    for name, t in items:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"write_tensors: {name} has dtype {t.dtype}, which safetensors has no name for here")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in items:
            if t.numel():
                f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))


@torch.no_grad()
def read_into(path: Path, params: dict[str, torch.Tensor]) -> None:
    """Copy the tensors of a safetensors file into `params` (name -> tensor), one at a time, read
    with plain file reads straight into each CPU tensor's storage (through a buffer of that tensor's
    size for another device or layout). safetensors' loaders map the file, and its mapped pages
    count in the process's resident set: the whole file on top of the model (+0.50 GiB for
    SmolLM2-135M, measured)."""
    present(path)
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            start = 8 + size
            missing = set(params) - set(header)
            if missing:
                raise CheckpointError(f"{path} lacks {len(missing)} of the trainable tensors, e.g. {sorted(missing)[0]}")
            for name, p in params.items():
                spec = header[name]
                a, b = spec["data_offsets"]
                if spec["dtype"] != SAFETENSORS_DTYPES.get(p.dtype) or list(spec["shape"]) != list(p.shape):
                    raise CheckpointError(f"{path}: {name} is {spec['dtype']} {spec['shape']}, the run's tensor "
                                          f"{SAFETENSORS_DTYPES.get(p.dtype)} {list(p.shape)}")
                direct = p.device.type == "cpu" and p.is_contiguous()
                dst = p if direct else torch.empty(p.shape, dtype=p.dtype)
                f.seek(start + a)
                if b > a and f.readinto(memoryview(dst.reshape(-1).view(torch.uint8).numpy())) != b - a:
                    raise CheckpointError(f"{path} ends inside {name}: the file is truncated")
                if not direct:
                    p.copy_(dst)
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise unreadable(path, e) from e



def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a CheckpointError saying what is wrong with it."""
    present(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, e) from e


def tensor_specs(path: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) of a safetensors file, from its header alone: safetensors refuses a
    header that does not cover the whole file, so a truncated file fails here too."""
    present(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118  (safe_open is no dict)
            return {k: (list(s.get_shape()), DTYPES.get(s.get_dtype(), s.get_dtype())) for k, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, e) from e


def present(path: Path) -> None:
    if not path.is_file():
        found = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        pickles = [n for n in found if n.endswith((".pt", ".pth", ".bin", ".pkl", ".ckpt"))]
        hint = (f" (found {', '.join(pickles)}: checkpoints are read as safetensors only, never "
                "unpickled, because loading a pickle can run arbitrary code)") if pickles else ""
        raise CheckpointError(f"checkpoint file {path} is missing{hint}; resume from a complete checkpoint folder")


def unreadable(path: Path, e: Exception) -> CheckpointError:
    with path.open("rb") as f:
        head = f.read(2)
    what = "a pickle, not safetensors" if head[:1] == b"\x80" or head == b"PK" else "damaged or truncated"
    return CheckpointError(
        f"cannot read {path} ({e}): the file is {what}. Checkpoints are loaded with safetensors "
        "only; resume from another checkpoint of the run"
    )
