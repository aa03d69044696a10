"""Token helpers every head shares: padding rows into a batch, and whether a model's forward takes
an argument."""

from __future__ import annotations

import inspect

import torch

Row = tuple[list[int], int]  # token ids, and how many of the last ones are the continuation


def pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


_ACCEPTS: dict[tuple[type, type, str], bool] = {}


def accepts(model, arg: str) -> bool:
    """Whether the model's forward names `arg`. A peft wrapper's forward passes its **kwargs on
    to the model it wraps, so that model's signature is the one that counts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = (type(model), type(base), arg)
    if key not in _ACCEPTS:
        _ACCEPTS[key] = arg in inspect.signature(base.forward).parameters
    return _ACCEPTS[key]
