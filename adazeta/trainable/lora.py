"""LoRA via peft (Hu et al., 2021): the trainable set of MeZO-LoRA and of the first-order LoRA
reference. B is zero-initialised (peft's default), so the adapted model starts equal to the base."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from adazeta.errors import ConfigError

# Query/value projections per architecture family, as in the MeZO-LoRA reference settings.
FAMILY_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


def inject_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, targets: list[str] | None):
    """Wrap `model` with peft LoRA; returns the PeftModel (LoRA parameters trainable, rest frozen)."""
    model_type = model.config.model_type
    targets = list(targets) if targets else FAMILY_TARGETS.get(model_type)
    if not targets:
        raise ConfigError(
            f"no default LoRA targets for model_type {model_type!r} (known: {sorted(FAMILY_TARGETS)}); "
            "set method.lora.targets, e.g. [q_proj, v_proj]"
        )
    if r < 1:
        raise ConfigError(f"method.lora.r must be >= 1, got {r}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft: no module matches, or a match is a layer type LoRA cannot wrap
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"method.lora.targets={targets}: {str(e).splitlines()[0]} This {model_type} model's linear layers "
            f"are named {linear}; set method.lora.targets to some of them, or null for {FAMILY_TARGETS.get(model_type)}"
        ) from None
