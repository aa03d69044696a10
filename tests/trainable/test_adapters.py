"""TT adapters: paper parameter counts, placement per family, exact residual, dtypes, errors."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
)
from transformers.pytorch_utils import Conv1D

from adazeta.trainable.tt_adapters import (
    FAMILY_TARGETS,
    AdaptedLinear,
    TTAdapter,
    adapter_parameters,
    inject_tt_adapters,
)

# ---------------------------------------------------------------- paper parameter counts (meta)


def _llama2_7b_on_meta():
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _roberta_large_on_meta():
    config = RobertaConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        vocab_size=50265,
        max_position_embeddings=514,
        type_vocab_size=1,
    )
    with torch.device("meta"):
        return RobertaForMaskedLM(config)


def _count(model):
    return sum(p.numel() for _, p in adapter_parameters(model))


def test_llama2_7b_ffn_count_is_610560():
    model = _llama2_7b_on_meta()
    names = inject_tt_adapters(model, rank=5, bottleneck=64)
    assert len(names) == 96
    # per adapter: D 4096->64 and U 64->4096, each 1100 core params (16x16x16 | 4x4x4), + biases
    assert _count(model) == 96 * (2 * 1100 + 64 + 4096) == 610_560
    assert all(p.is_meta and p.dtype == torch.float32 for _, p in adapter_parameters(model))


def test_roberta_large_count_is_136704():
    model = _roberta_large_on_meta()
    names = inject_tt_adapters(model, rank=5, bottleneck=64)
    assert len(names) == 48
    assert sum(n.endswith("attention.output.dense") for n in names) == 24
    assert not any("lm_head" in n for n in names)
    assert _count(model) == 136_704
    down = model.roberta.encoder.layer[0].output.dense.adapter.down
    assert (down.in_modes, down.out_modes) == ((8, 16, 8), (8, 8))


def test_roberta_large_plain_factorize_gives_127104():
    # modes={} opts out of the family's reference modes: 1024 = 8x8x16, 64 = 4x4x4.
    model = _roberta_large_on_meta()
    inject_tt_adapters(model, modes={})
    assert _count(model) == 127_104


# ---------------------------------------------------------------- tiny random models

V = 97


def _tiny_llama(dtype=torch.float32):
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype)


def _tiny_qwen2():
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


def _tiny_bert():
    config = BertConfig(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=V,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(config)


def _tiny_roberta_cls():
    config = RobertaConfig(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=V,
        max_position_embeddings=70,
        num_labels=3,
    )
    return RobertaForSequenceClassification(config)


def _tiny_opt():
    config = OPTConfig(
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=V,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
    )
    return OPTForCausalLM(config)


def _tiny_gpt2():
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64)
    return GPT2LMHeadModel(config)


TINY = {
    "llama": (_tiny_llama, 6),
    "qwen2": (_tiny_qwen2, 6),
    "bert": (_tiny_bert, 4),
    "roberta": (_tiny_roberta_cls, 4),
    "opt": (_tiny_opt, 4),
    "gpt2": (_tiny_gpt2, 4),
}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, V, (2, 9), generator=g),
        "attention_mask": torch.ones(2, 9, dtype=torch.long),
    }


def _logits(model):
    with torch.no_grad():
        return model(**_inputs()).logits


def _zero_up(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TTAdapter):
                for p in m.up.parameters():
                    p.zero_()


@pytest.mark.parametrize("family", sorted(TINY))
def test_injection_keeps_base_weights_and_residual_is_exact(family):
    build, expected_adapters = TINY[family]
    torch.manual_seed(0)
    model = build().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _logits(model)

    names = inject_tt_adapters(model, rank=3, bottleneck=8)
    assert len(names) == expected_adapters
    assert model.config.model_type in FAMILY_TARGETS

    after = model.state_dict()
    base_after = {
        k.replace(".base_layer.", "."): v for k, v in after.items() if ".adapter." not in k
    }
    assert base_after.keys() == before.keys()
    for k, v in before.items():
        assert base_after[k].dtype == v.dtype and torch.equal(base_after[k], v), k
    assert sum(".base_layer." in k for k in after) >= expected_adapters  # weights (+ biases)

    adapted = _logits(model)
    assert adapted.shape == reference.shape
    assert not torch.equal(adapted, reference)  # the random-init adapters do act

    _zero_up(model)
    assert torch.equal(_logits(model), reference)


def test_llama_placement_sides_and_dims():
    model = _tiny_llama()
    names = inject_tt_adapters(model, bottleneck=8)
    assert names[:3] == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
    ]
    mlp = model.model.layers[0].mlp
    assert (mlp.gate_proj.side, mlp.up_proj.side, mlp.down_proj.side) == (
        "input",
        "input",
        "output",
    )
    assert mlp.gate_proj.adapter.dim == 64  # in_features of gate_proj
    assert mlp.down_proj.adapter.dim == 64  # out_features of down_proj
    assert mlp.gate_proj.weight is mlp.gate_proj.base_layer.weight
    assert (mlp.down_proj.in_features, mlp.down_proj.out_features) == (96, 64)


def test_llama_attention_option():
    model = _tiny_llama()
    names = inject_tt_adapters(model, bottleneck=8, attention=True)
    assert len(names) == 2 * (3 + 4)
    attn = model.model.layers[1].self_attn
    assert (attn.q_proj.side, attn.k_proj.side, attn.v_proj.side, attn.o_proj.side) == (
        "input",
        "input",
        "input",
        "output",
    )
    assert attn.k_proj.adapter.dim == 64  # input side: in_features, even though k_proj is 64->32
    assert _logits(model).shape == (2, 9, V)


def test_bert_placement_excludes_pooler_heads_and_intermediate():
    model = _tiny_roberta_cls()
    names = inject_tt_adapters(model, bottleneck=8)
    assert names == [
        "roberta.encoder.layer.0.attention.output.dense",
        "roberta.encoder.layer.0.output.dense",
        "roberta.encoder.layer.1.attention.output.dense",
        "roberta.encoder.layer.1.output.dense",
    ]
    names = inject_tt_adapters(_tiny_bert(), bottleneck=8, attention=True)
    assert sum(n.endswith(("query", "key", "value")) for n in names) == 6


def test_gpt2_conv1d_dims():
    model = _tiny_gpt2()
    inject_tt_adapters(model, bottleneck=8)
    mlp = model.transformer.h[0].mlp
    assert isinstance(mlp.c_fc.base_layer, Conv1D)
    assert (mlp.c_fc.in_features, mlp.c_fc.out_features) == (64, 256)
    assert mlp.c_fc.adapter.dim == 64 and mlp.c_fc.side == "input"
    assert mlp.c_proj.adapter.dim == 64 and mlp.c_proj.side == "output"
    names = inject_tt_adapters(_tiny_gpt2(), bottleneck=8, attention=True)
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.0.attn.c_proj" in names


def test_bf16_base_keeps_fp32_adapters():
    torch.manual_seed(0)
    model = _tiny_llama(torch.bfloat16).eval()
    reference = _logits(model)
    inject_tt_adapters(model, bottleneck=8)
    params = adapter_parameters(model)
    assert params and all(p.dtype == torch.float32 for _, p in params)
    assert all(
        p.dtype == torch.bfloat16 for n, p in model.named_parameters() if ".adapter." not in n
    )
    logits = _logits(model)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    _zero_up(model)
    assert torch.equal(_logits(model), reference)


def test_adapter_casts_back_to_input_dtype():
    adapter = TTAdapter(64, bottleneck=8, rank=2)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = adapter(x)
    assert y.dtype == torch.bfloat16
    expected = x.float() + adapter.up(torch.relu(adapter.down(x.float())))
    torch.testing.assert_close(y, expected.to(torch.bfloat16))


def test_adapter_scale():
    torch.manual_seed(0)
    adapter = TTAdapter(64, bottleneck=8, rank=2, scale=0.5)
    x = torch.randn(4, 64)
    torch.testing.assert_close(adapter(x), x + 0.5 * adapter.up(torch.relu(adapter.down(x))))


def test_identity_init_starts_as_the_identity_and_learns_through_u():
    torch.manual_seed(0)
    paper = TTAdapter(64, bottleneck=8, rank=2)
    torch.manual_seed(0)
    ident = TTAdapter(64, bottleneck=8, rank=2, init="identity")
    x = torch.randn(4, 64)
    assert torch.equal(ident(x), x)  # exactly the zero-shot model
    assert not torch.equal(paper(x), x)
    # The same draws as the paper's init, except U's last core and bias.
    for (name, a), (_, b) in zip(paper.named_parameters(), ident.named_parameters(), strict=True):
        zeroed = name in (f"up.cores.{len(ident.up.cores) - 1}", "up.bias")
        assert torch.equal(b, torch.zeros_like(a)) if zeroed else torch.equal(a, b), name
    # A zero U blocks no learning: the loss has a gradient on U's last core and bias (as LoRA's B).
    ident(x).pow(2).sum().backward()
    assert ident.up.cores[-1].grad.abs().sum() > 0 and ident.up.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="'paper', 'identity'"):
        TTAdapter(64, bottleneck=8, rank=2, init="zeros")


def test_adapter_parameters_names_and_trainability_untouched():
    model = _tiny_llama()
    inject_tt_adapters(model, rank=2, bottleneck=8)
    params = adapter_parameters(model)
    names = [n for n, _ in params]
    assert "model.layers.0.mlp.gate_proj.adapter.down.cores.0" in names
    assert all(".adapter." in n for n in names)
    assert len(names) == 6 * 2 * (6 + 1)  # 6 adapters x (D, U) x (6 cores + bias)
    assert names == [n for n, _ in model.named_parameters() if ".adapter." in n]
    # injection does not freeze anything: the caller chooses the trainable set
    assert all(p.requires_grad for p in model.parameters())


def test_modes_override_and_omegaconf():
    model = _tiny_llama()
    modes = OmegaConf.create({64: [8, 8], 8: [2, 4]})
    inject_tt_adapters(model, bottleneck=8, modes=modes)
    down = model.model.layers[0].mlp.up_proj.adapter.down
    assert (down.in_modes, down.out_modes) == ((8, 8), (2, 4))


def test_explicit_targets_and_meta_device():
    with torch.device("meta"):
        model = _tiny_llama()
    targets = [{"pattern": r".*\.o_proj", "side": "output"}]
    names = inject_tt_adapters(model, bottleneck=8, targets=targets)
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert all(p.is_meta for _, p in adapter_parameters(model))


def test_adapter_init_does_not_depend_on_the_layers_device():
    # Layer 0 on meta stands in for a layer on another GPU (a device with a generator of its
    # own): the adapters of layer 1, on the CPU, must hold the values they get when every layer
    # is on the CPU, not the first draws of a fresh sequence (which repeat layer 0's).
    torch.manual_seed(0)
    model = _tiny_llama()
    torch.manual_seed(1)
    inject_tt_adapters(model, bottleneck=8)
    reference = dict(adapter_parameters(model))

    torch.manual_seed(0)
    spread = _tiny_llama()
    spread.model.layers[0].to("meta")
    torch.manual_seed(1)
    inject_tt_adapters(spread, bottleneck=8)
    params = dict(adapter_parameters(spread))
    assert params.keys() == reference.keys()
    on_meta = [n for n in params if n.startswith("model.layers.0.")]
    on_cpu = [n for n in params if n.startswith("model.layers.1.")]
    assert on_meta and all(params[n].is_meta for n in on_meta)
    assert on_cpu and all(torch.equal(params[n], reference[n]) for n in on_cpu)
    # and the two layers got different draws
    first = reference["model.layers.0.mlp.gate_proj.adapter.down.cores.0"]
    assert not torch.equal(reference["model.layers.1.mlp.gate_proj.adapter.down.cores.0"], first)


def test_tt_init_draws_from_the_cpu_generator_whatever_the_device():
    torch.manual_seed(3)
    with torch.device("meta"):  # a default device other than the CPU: the draws stay on the CPU
        TTAdapter(64, bottleneck=8)
    after_meta = torch.randn(4)
    torch.manual_seed(3)
    TTAdapter(64, bottleneck=8)
    assert torch.equal(after_meta, torch.randn(4))  # the meta build drew as many CPU values


def test_unknown_family_needs_targets():
    model = _tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"model_type='mystery'.*llama.*Set targets"):
        inject_tt_adapters(model)
    names = inject_tt_adapters(model, targets=[{"pattern": r".*mlp\.up_proj", "side": "input"}])
    assert len(names) == 2


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"no module .* matches the target patterns \['nothing'\]"):
        inject_tt_adapters(_tiny_llama(), targets=[{"pattern": "nothing", "side": "input"}])
    with pytest.raises(ValueError, match=r"side='middle'"):
        inject_tt_adapters(_tiny_llama(), targets=[{"pattern": ".*up_proj", "side": "middle"}])
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp' .* LlamaMLP, not an nn.Linear"):
        inject_tt_adapters(_tiny_llama(), targets=[{"pattern": r".*\.mlp", "side": "input"}])
    with pytest.raises(ValueError, match="attention=True"):
        inject_tt_adapters(
            _tiny_llama(), targets=[{"pattern": ".*up_proj", "side": "input"}], attention=True
        )
    model = _tiny_llama()
    inject_tt_adapters(model, bottleneck=8)
    with pytest.raises(ValueError, match="already has an adapter"):
        inject_tt_adapters(model, bottleneck=8)


def test_adapted_linear_rejects_bad_side():
    base = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="side='both'"):
        AdaptedLinear(base, TTAdapter(8, bottleneck=4, rank=2), "both")
