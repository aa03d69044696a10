"""Model loading (adazeta/models/load.py)."""

from __future__ import annotations

from conftest import compose_config

from adazeta.models.load import load_model


def test_random_init_arch_passes_nested_values_as_plain_containers():
    """model.arch values that are mappings (rope_scaling) reach transformers as dicts, not
    OmegaConf nodes, and take effect."""
    cfg = compose_config(["model=tiny-llama", "+model.arch.rope_scaling={rope_type: linear, factor: 2.0}"],
                         hydra_config=False)
    loaded = load_model(cfg.model, num_labels=2)
    scaling = loaded.model.config.rope_scaling
    assert type(scaling) is dict and scaling["factor"] == 2.0 and scaling["rope_type"] == "linear"


def _tiny_roberta_cls():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
    ))


def test_new_heads_draw_from_the_cpu_generator_whatever_their_device():
    """A head on meta stands in for one on a GPU (a device with a generator of its own): its init
    must take the CPU draws a CPU head takes, or everything drawn after it would shift."""
    import torch

    from adazeta.models.load import MeanPoolClassifier, init_head_on_cpu

    encoder = _tiny_roberta_cls().roberta
    torch.manual_seed(5)
    on_cpu = MeanPoolClassifier(encoder, 3)
    after_cpu = torch.randn(4)
    torch.manual_seed(5)
    on_meta = MeanPoolClassifier(encoder.to("meta"), 3)
    assert on_meta.classifier.weight.is_meta
    assert torch.equal(torch.randn(4), after_cpu)
    assert on_cpu.classifier.weight.std().item() > 0

    model = _tiny_roberta_cls()
    torch.manual_seed(7)
    init_head_on_cpu(model, model.classifier)
    drawn = {n: p.clone() for n, p in model.classifier.named_parameters()}
    after_cpu = torch.randn(4)
    assert drawn["dense.bias"].abs().max() == 0 and drawn["out_proj.weight"].std() > 0
    std = model.config.initializer_range  # the model's own init: N(0, initializer_range)
    assert abs(drawn["dense.weight"].std().item() - std) < 0.25 * std
    model.classifier.to("meta")
    torch.manual_seed(7)
    init_head_on_cpu(model, model.classifier)
    assert torch.equal(torch.randn(4), after_cpu) and model.classifier.dense.weight.is_meta


def test_device_map_that_offloads_is_refused_with_the_modules_named():
    import pytest
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adazeta.errors import ConfigError
    from adazeta.models.load import gpu_max_memory, refuse_offload

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=64))
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                           "model.norm": 1, "lm_head": "disk"}
    with pytest.raises(ConfigError, match="offloaded 2 module") as err:
        refuse_offload(model, "auto")
    message = str(err.value)
    assert "model.layers.1" in message and "lm_head" in message and "cpu/disk" in message
    assert "model.max_memory" in message and "model.layers.0" not in message

    model.hf_device_map = {"": "cpu"}  # the whole model on the CPU: nothing offloaded
    refuse_offload(model, "auto")
    del model.hf_device_map
    model.model.layers[1].mlp.to("meta")  # offloaded weights as accelerate leaves them
    with pytest.raises(ConfigError, match=r"to meta \(model\.layers\.1\.mlp\.gate_proj"):
        refuse_offload(model, "auto")
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, torch.nn.Parameter)

    assert gpu_max_memory({"0": "70GiB", 1: "70GiB"}) == {0: "70GiB", 1: "70GiB"}
    with pytest.raises(ConfigError, match="'cpu'.*only GPU indices"):
        gpu_max_memory({0: "70GiB", "cpu": "200GiB"})
