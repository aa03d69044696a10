"""Trainable-set transforms: which tensors a method moves. Everything else is frozen."""

from __future__ import annotations

import re

import torch
from omegaconf import OmegaConf

from adazeta.config import AdapterConfig, Head, MethodConfig, TrainableSet
from adazeta.errors import ConfigError
from adazeta.models.load import classification_head, is_norm
from adazeta.params import Trainable
from adazeta.trainable.lora import (
    inject_lora,  # imported up front: its import memory is not the method's
)
from adazeta.trainable.prefix import PREFIX_MARKER, inject_prefix
from adazeta.trainable.tt_adapters import inject_tt_adapters


def freeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def collect(model: torch.nn.Module) -> list[Trainable]:
    """The parameters with requires_grad, in named_parameters order (fixed, so z is reproducible),
    with weight decay off for biases and norm weights."""
    no_decay = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    return [
        Trainable(name, p, decay=not name.endswith("bias") and id(p) not in no_decay)
        for name, p in model.named_parameters()
        if p.requires_grad
    ]


def adapter_value(value):
    """A config value as the user wrote it (plain lists and dicts), for messages."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def make_trainable(model, cfg: MethodConfig, adapter: AdapterConfig, head: Head):
    """Apply a method's trainable-set transform; returns (model, trainables). The model may come
    back wrapped (peft LoRA)."""
    kind = cfg.trainable
    if kind in (TrainableSet.full, TrainableSet.sparse):
        for p in model.parameters():
            p.requires_grad_(True)
        return model, collect(model)
    freeze(model)
    if kind == TrainableSet.tt_adapter:
        try:
            inject_tt_adapters(
                model, rank=adapter.rank, bottleneck=adapter.bottleneck, scale=adapter.scale,
                targets=adapter.targets, attention=adapter.attention, modes=adapter.modes, init=adapter.init.value,
            )
        except (ValueError, re.error) as e:  # a placement rule or TT factorisation this model cannot take
            raise ConfigError(
                f"{str(e).removeprefix('inject_tt_adapters: ')} (adapter.targets={adapter_value(adapter.targets)}, "
                f"adapter.modes={adapter_value(adapter.modes)}); fix these keys or set them to null "
                "for the family's defaults"
            ) from None
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.requires_grad_(True)
    elif kind == TrainableSet.prefix:
        inject_prefix(model, cfg.prefix.num, cfg.prefix.init_by_real_act)
        for name, p in model.named_parameters():
            if PREFIX_MARKER in name:
                p.requires_grad_(True)
    elif kind == TrainableSet.lora:
        model = inject_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    if head == Head.classification:  # a new head must learn; an LM/MLM head stays frozen
        for p in classification_head(model.get_base_model() if kind == TrainableSet.lora else model).parameters():
            p.requires_grad_(True)
    return model, collect(model)
