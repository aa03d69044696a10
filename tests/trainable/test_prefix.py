"""Prefix tuning (method.trainable=prefix, adazeta/trainable/prefix.py): the trainable set and its size, the
prefix changes the output and carries a gradient, padding and the mask are handled as the base
model handles them, the init from real activations equals transformers' own cache of those tokens,
and mezo_prefix / prefix_fo run and learn through the real build path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, build_run_on, compose_config, output, tiny_model
from safetensors.torch import load_file
from test_methods import changed_names, setup

from adazeta.errors import ConfigError
from adazeta.trainable.prefix import PREFIX_MARKER, inject_prefix

FAMILIES = ["tiny-llama", "tiny-opt", "tiny-gpt2", "tiny-roberta", "tiny-bert"]


def forward(loaded, ids, mask):
    """Logits as the objective computes them: causal LMs with positions counted from the first
    real token (left padding), encoders as they are."""
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if loaded.head.value == "causal_lm":
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return loaded.model(**kwargs).logits


def kv_width(model) -> int:
    """The k/v projection width of one layer (kv heads * head dim), from the model's config."""
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return heads * (c.hidden_size // c.num_attention_heads)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-roberta", "tiny-bert"])
def test_trainable_set_is_the_prefixes_of_every_layer(model):
    cfg, m, obj, batch, before = setup("mezo_prefix", model, "method.lr=1e-1")
    names = {t.name for t in m.trainables}
    prefix = {n for n in names if PREFIX_MARKER in n}
    assert names - prefix <= {n for n in names if n.startswith("classifier.")}  # tiny-bert: its new head
    layers = m.model.config.num_hidden_layers
    expected = layers * 2 * cfg.method.prefix.num * kv_width(m.model)  # llama: GQA, 2 kv heads of 4
    assert sum(t.param.numel() for t in m.trainables if t.name in prefix) == expected
    assert len(prefix) == 2 * layers
    assert not any(p.requires_grad for n, p in m.model.named_parameters() if n not in names)
    snapshot = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    m.step(lambda: obj.forward(m.model, batch)[0].mean(), 1, 1)
    moved = {n for n, p in m.model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert moved & prefix, "a ZO step must move the prefixes"
    assert moved <= names
    assert not changed_names(m.model, before) - names, "base weights must stay bit-identical"


@pytest.mark.parametrize("model", FAMILIES)
def test_prefix_changes_the_output_and_carries_a_gradient(model):
    loaded = tiny_model(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    base = forward(loaded, ids, mask).detach()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    prefixes = inject_prefix(loaded.model, 3, init_by_real_act=True)
    for p in prefixes.values():
        p.requires_grad_(True)
    out = forward(loaded, ids, mask)
    assert (out - base).abs().max() > 1e-4
    out.square().sum().backward()
    for name, p in prefixes.items():
        assert p.keys.grad is not None and p.keys.grad.abs().sum() > 0, name
        assert p.values.grad is not None and p.values.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in loaded.model.named_parameters() if PREFIX_MARKER not in n)


@pytest.mark.parametrize("model", FAMILIES)
def test_padded_batch_gives_the_unpadded_logits(model):
    """The prefix columns go in front of the mask: a padded example reads the same prefix and the
    same real tokens as when it is alone (causal LMs pad on the left, as adazeta's objective does;
    encoders on the right)."""
    loaded = tiny_model(model)
    inject_prefix(loaded.model, 4, init_by_real_act=True)
    causal = loaded.head.value == "causal_lm"
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 5, 6, 7, 8] if causal else [5, 6, 7, 8, 0, 0]])
    mask = (torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]) if causal else torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]]))
    padded = forward(loaded, ids, mask)
    real = slice(2, 6) if causal else slice(0, 4)
    alone = forward(loaded, ids[1:, real], mask[1:, real])
    first = forward(loaded, ids[:1], mask[:1])
    if padded.dim() == 2:  # a classification head: one row per example
        torch.testing.assert_close(padded[1], alone[0], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(padded[1, real], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], first[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_sdpa_and_eager_attention_agree_with_prefixes(model):
    """sdpa gets no mask for an unpadded batch (the hook builds the causal one), eager an additive
    mask: the same prefixed model must give the same logits through both."""
    loaded = tiny_model(model)
    inject_prefix(loaded.model, 4, init_by_real_act=False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    mask = torch.ones_like(ids)
    loaded.model.set_attn_implementation("sdpa")
    sdpa = forward(loaded, ids, mask)
    loaded.model.set_attn_implementation("eager")
    eager = forward(loaded, ids, mask)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_llama_init_from_real_activations_is_transformers_own_cache_of_random_tokens():
    """MeZO's init: the keys/values the model caches for num_prefix random vocabulary tokens
    (Llama: keys after RoPE at positions 0..P-1), read here from a transformers DynamicCache."""
    loaded = tiny_model("tiny-llama")
    model, p = loaded.model, 5
    torch.manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (1, p))
    cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    torch.manual_seed(7)
    prefixes = list(inject_prefix(model, p, init_by_real_act=True).values())
    assert len(prefixes) == len(cache.layers) == model.config.num_hidden_layers
    for layer, prefix in zip(cache.layers, prefixes, strict=True):
        torch.testing.assert_close(prefix.keys, layer.keys[0], atol=0, rtol=0)
        torch.testing.assert_close(prefix.values, layer.values[0], atol=0, rtol=0)


def test_bert_init_from_real_activations_is_the_key_value_projections():
    loaded = tiny_model("tiny-bert")
    model, p = loaded.model, 4
    seen = {}
    hooks = [
        mod.register_forward_hook(lambda _m, _a, out, n=name: seen.__setitem__(n, out.detach()))
        for name, mod in model.named_modules() if name.endswith(("attention.self.key", "attention.self.value"))
    ]
    torch.manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, p))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in hooks:
        h.remove()
    torch.manual_seed(3)
    prefixes = inject_prefix(model, p, init_by_real_act=True)
    heads = model.config.num_attention_heads
    for name, prefix in prefixes.items():
        for kind, got in (("key", prefix.keys), ("value", prefix.values)):
            want = seen[f"{name}.{kind}"][0].view(p, heads, -1).transpose(0, 1)  # (H, P, d)
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_random_init_is_small_and_not_the_activations():
    a = tiny_model("tiny-llama")
    torch.manual_seed(1)
    real = inject_prefix(a.model, 5, init_by_real_act=True)
    b = tiny_model("tiny-llama")
    torch.manual_seed(1)
    rand = inject_prefix(b.model, 5, init_by_real_act=False)
    for (name, r), q in zip(real.items(), rand.values(), strict=True):
        assert q.keys.shape == r.keys.shape
        assert 0.01 < float(q.keys.detach().std()) < 0.03, name
        assert not torch.allclose(q.values, r.values)


@pytest.mark.parametrize("estimator", ["fzoo", "hizoo"])
def test_the_estimators_of_their_own_move_only_the_prefixes(estimator):
    """FZOO and HiZOO compose with the prefix set as SPSA does: a step moves the prefixes (grouped
    into flat buffers, as for adapters and LoRA) and leaves every base weight bit-identical."""
    overrides = [f"method.estimator={estimator}", "method.lr=1e-1", "train.replay_log=false"]
    _, m, obj, batch, before = setup("mezo_prefix", "tiny-llama", *overrides)
    names = {t.name for t in m.trainables}
    snapshot = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    with torch.no_grad():
        m.step(lambda: obj.forward(m.model, batch)[0].mean(), 1, 1)
    moved = {n for n, p in m.model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert moved and moved <= names, moved
    assert not changed_names(m.model, before) - names, "base weights must stay bit-identical"


def test_prefix_fo_learns_a_batch():
    _, m, obj, batch, _ = setup("prefix_fo", "tiny-llama", "method.lr=1e-1")
    losses = [m.step(lambda: obj.forward(m.model, batch)[0].mean(), s, 1).loss for s in range(1, 31)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_mezo_prefix_lowers_the_loss_of_a_batch():
    """640 prefix values on a random two-layer model: SPSA moves slowly (measured: 0.657 -> 0.644
    in 60 steps at lr 1; a prefix the attention ignored would leave the loss exactly unchanged)."""
    _, m, obj, batch, _ = setup("mezo_prefix", "tiny-llama", "method.lr=1")

    def loss():
        return obj.forward(m.model, batch)[0].mean()

    with torch.no_grad():
        start = float(loss())
        for s in range(1, 61):
            m.step(loss, s, 1)
        end = float(loss())
    assert end < start - 0.005, (start, end)


def test_parallel_queries_are_refused_with_the_valid_sets():
    with pytest.raises(ConfigError, match=r"zo.parallel_queries=true.*method.trainable=prefix.*\['tt_adapter', 'lora'\]"):
        build_run_on(["method=mezo_prefix", "model=tiny-llama", "task.num_train=16", "task.num_dev=8",
                      "zo.parallel_queries=true"])


def test_prefix_keys_are_refused_on_other_methods():
    from adazeta.validate import check_ignored

    cfg = compose_config(["method=mezo_lora"], hydra_config=False)
    with pytest.raises(ConfigError, match="method.prefix.num is not read by method=mezo_lora.*mezo_prefix"):
        check_ignored(cfg, ["method.prefix.num=3"])


@pytest.mark.slow  # the entrypoint in a child process
def test_mezo_prefix_trains_through_the_entrypoint(entrypoint, tmp_path):
    proc = entrypoint("method=mezo_prefix", "model=tiny-llama", "method.prefix.num=3", *TINY_RUN)
    assert proc.returncode == 0, output(proc)[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "mezo_prefix"
    assert summary["trainable_params"] == 2 * 2 * 3 * 32  # layers * (k, v) * prefix * kv width
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("zo/projected_grad" in r and r["zo/projected_grad"] != 0 for r in metrics)
    saved = load_file(str(run / "best_trainable.safetensors"))
    assert saved and all(PREFIX_MARKER in k for k in saved)
