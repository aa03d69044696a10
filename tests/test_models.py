"""Model loading (adazeta/models.py)."""

from __future__ import annotations

from conftest import compose_config

from adazeta.models import load_model


def test_random_init_arch_passes_nested_values_as_plain_containers():
    """model.arch values that are mappings (rope_scaling) reach transformers as dicts, not
    OmegaConf nodes, and take effect."""
    cfg = compose_config(["model=tiny-llama", "+model.arch.rope_scaling={rope_type: linear, factor: 2.0}"],
                         hydra_config=False)
    loaded = load_model(cfg.model, num_labels=2)
    scaling = loaded.model.config.rope_scaling
    assert type(scaling) is dict and scaling["factor"] == 2.0 and scaling["rope_type"] == "linear"
