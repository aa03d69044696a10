"""Prefix tuning (Li and Liang, 2021, arXiv 2101.00190) as a trainable set, in MeZO's form
(Malladi et al., arXiv 2305.17333; princeton-nlp/MeZO large_models/prefix.py, `PrefixTuning` with
`--no_reparam --prefix_init_by_real_act`; the ZO-LLM benchmark, arXiv 2402.11592, uses the same).

Every self-attention layer l gets P trainable key and value vectors per key/value head,

    K_l' = [P_k^l ; K_l],   V_l' = [P_v^l ; V_l],   P_k^l, P_v^l in R^{H_kv x P x d},

so every query attends to the P prefix positions as well as to the real tokens; the base model is
frozen. The trainable count is layers * 2 * P * H_kv * d (H_kv * d = the k/v projection width).

Injection, without touching any module's `forward`: each attention module gets a child `prefix`
(a `Prefix`, holding the two parameters) and a forward pre-hook. The hook hands the attention a
`PrefixedCache` in its `cache` argument: transformers' attention modules (Llama, Mistral, Qwen,
OPT, GPT-2, BERT, RoBERTa in transformers 5) call `cache.update(keys, values, layer_idx)` after
projecting (and, for rotary families, rotating) the real tokens' keys, and attend over what it
returns, so the prefix enters exactly where a key/value cache would. A real cache (generation) is
kept and updated inside it, so generated tokens never store the prefix. The hook also prepends P
always-visible columns to the 4-D attention mask (boolean for sdpa, additive for eager); where the
model passes no mask (sdpa without padding: causal by `is_causal`, which sdpa aligns to the top
left and would get wrong with P extra keys), it builds the causal mask explicitly.

Positions. Real tokens keep positions 0..T-1 (the model never sees the prefix in its cache
length). The prefix keys carry no position of their own: they are used as stored, after the point
where rotary families rotate keys, as in MeZO, whose Llama/OPT hook passes the prefix as
`past_key_value`, concatenated after RoPE (and with learned absolute positions, as in OPT, GPT-2
and BERT, positions only enter through the embeddings, which the prefix bypasses anyway).

Initialisation (`method.prefix.init_by_real_act`, MeZO's default): run the frozen model once on P
token ids drawn uniformly from the vocabulary and take each layer's keys and values of them, as
they would be cached (for rotary families: rotated at positions 0..P-1, exactly MeZO's
`past_key_values` of those tokens). Otherwise a small random init, N(0, 0.02^2) (MeZO without
reparametrisation draws N(0, 1), which swamps the attention of a pretrained model).

Usage::

    prefixes = inject_prefix(model, num_prefix=5, init_by_real_act=True)   # {name: Prefix}
    [n for n, p in model.named_parameters() if PREFIX_MARKER in n]          # the trainable set
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from adazeta.errors import ConfigError

PREFIX_MARKER = ".prefix."
RANDOM_STD = 0.02

_P = r"(?:.*\.)?"
# The self-attention modules per `config.model_type`: those that call cache.update(k, v, layer_idx).
FAMILY_ATTENTION: dict[str, str] = {
    "llama": _P + r"layers\.\d+\.self_attn",  # also SmolLM/SmolLM2
    "mistral": _P + r"layers\.\d+\.self_attn",
    "qwen2": _P + r"layers\.\d+\.self_attn",
    "qwen3": _P + r"layers\.\d+\.self_attn",
    "opt": _P + r"layers\.\d+\.self_attn",
    "gpt2": _P + r"h\.\d+\.attn",
    "bert": _P + r"layer\.\d+\.attention\.self",  # also all-MiniLM-L6-v2
    "roberta": _P + r"layer\.\d+\.attention\.self",
    "xlm-roberta": _P + r"layer\.\d+\.attention\.self",
}
CACHE_ARGS = ("cache", "past_key_values")  # the attention's cache argument (transformers 5 / late 4.x)


class PrefixedCache:
    """What one attention layer gets as its cache for one forward: `update` returns the prefix
    followed by the real keys/values (those of `inner`, a real cache, updated first, if any).
    With `capture` set it returns the real keys/values unchanged and records them instead."""

    def __init__(self, prefix: Prefix | None, inner=None, capture: list | None = None):
        self.prefix, self.inner, self.capture = prefix, inner, capture

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.inner is not None:
            inner = getattr(self.inner, "self_attention_cache", self.inner)  # an EncoderDecoderCache
            keys, values = inner.update(keys, values, layer_idx, *args, **kwargs)
        if self.capture is not None:
            self.capture.append((keys.detach(), values.detach()))
            return keys, values
        b = keys.shape[0]
        pk = self.prefix.keys.to(keys.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        pv = self.prefix.values.to(values.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        return torch.cat([pk, keys], dim=2), torch.cat([pv, values], dim=2)


class Prefix(nn.Module):
    """The trainable keys and values (H_kv, P, d) of one attention layer, fp32 whatever the model's
    dtype (docs/design.md, section 4.1: in-place ZO perturbations of low-precision tensors do not round-trip)."""

    def __init__(self, heads: int, num_prefix: int, head_dim: int, device: torch.device):
        super().__init__()
        shape = (heads, num_prefix, head_dim)
        self.keys = nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))
        self.values = nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))
        self.capture: list | None = None  # set by `real_activations` for one forward
        self.cache_arg = "cache"

    @property
    def num_prefix(self) -> int:
        return self.keys.shape[1]

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        """The attention module's forward pre-hook (with_kwargs): the prefixed cache and mask."""
        inner = kwargs.pop(self.cache_arg, None)
        for name in CACHE_ARGS:  # a caller may use the other (deprecated) name
            inner = kwargs.pop(name, None) if inner is None else inner
        if self.capture is not None:
            kwargs[self.cache_arg] = PrefixedCache(None, inner, capture=self.capture)
            return args, kwargs
        kwargs[self.cache_arg] = PrefixedCache(self, inner)
        if "attention_mask" not in kwargs and len(args) > 1:
            raise RuntimeError(f"prefix tuning: {type(module).__name__} got its attention mask positionally")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        past = inner.get_seq_length(getattr(module, "layer_idx", 0) or 0) if inner is not None else 0
        kwargs["attention_mask"] = extend_mask(
            kwargs.get("attention_mask"), self.num_prefix, bool(getattr(module, "is_causal", True)),
            hidden.shape[1], past, hidden.device,
        )
        return args, kwargs


def extend_mask(mask: torch.Tensor | None, num_prefix: int, causal: bool, q_len: int, past: int,
                device: torch.device) -> torch.Tensor | None:
    """The attention mask with `num_prefix` always-visible key columns in front.

    `mask` is what transformers passes an attention layer: 4-D (batch or 1, 1, q_len, k_len),
    boolean (sdpa: True attends) or additive float (eager: 0 attends), or None (no padding; the
    layer is causal by its `is_causal`). None stays None where nothing would be masked (an
    encoder, or a single query); a causal layer gets its mask built here, since sdpa's `is_causal`
    is aligned to the top left and would hide the last real keys behind the prefix."""
    if mask is None:
        if not causal or q_len == 1:
            return None
        real = torch.ones(q_len, past + q_len, dtype=torch.bool, device=device).tril(diagonal=past)
        return torch.cat([real.new_ones(q_len, num_prefix), real], dim=-1)[None, None]
    if mask.dim() != 4:
        raise ConfigError(
            f"prefix tuning needs the 4-D attention mask of the eager or sdpa attention; this model passes a "
            f"{mask.dim()}-D one (flash attention?). Load the model with attn_implementation sdpa or eager"
        )
    pad = (torch.ones if mask.dtype == torch.bool else torch.zeros)(
        (*mask.shape[:-1], num_prefix), dtype=mask.dtype, device=mask.device
    )
    return torch.cat([pad, mask], dim=-1)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    model_type = model.config.model_type
    pattern = FAMILY_ATTENTION.get(model_type)
    if pattern is None:
        raise ConfigError(
            f"method.trainable=prefix has no attention placement for model_type {model_type!r} "
            f"(known: {sorted(FAMILY_ATTENTION)}); use one of these families or another trainable set"
        )
    found = [(n, m) for n, m in model.named_modules() if re.fullmatch(pattern, n)]
    if not found:
        raise ConfigError(f"method.trainable=prefix: no module of this {model_type} model matches {pattern!r}")
    return found


def cache_arg(module: nn.Module) -> str:
    params = inspect.signature(module.forward).parameters
    for name in CACHE_ARGS:
        if name in params:
            return name
    import transformers

    raise ConfigError(
        f"method.trainable=prefix: {type(module).__name__}.forward takes no key/value cache argument "
        f"({list(CACHE_ARGS)}) in transformers {transformers.__version__}; prefix tuning needs transformers >= 5"
    )


@torch.no_grad()
def real_activations(model: nn.Module, prefixes: list[Prefix], num_prefix: int) -> list[tuple[torch.Tensor, ...]]:
    """Each layer's (keys, values) of `num_prefix` token ids drawn from the vocabulary (global CPU
    generator, seeded by the run): MeZO's prefix init from real activations."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, num_prefix)).to(device)
    captured: list[list] = [[] for _ in prefixes]
    for p, c in zip(prefixes, captured, strict=True):
        p.capture = c
    try:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for p in prefixes:
            p.capture = None
    return [c[0] for c in captured]


def inject_prefix(model: nn.Module, num_prefix: int, init_by_real_act: bool = True) -> dict[str, Prefix]:
    """Give every self-attention layer of `model` a trainable prefix of `num_prefix` keys and values
    (frozen nothing: the caller picks the trainable set). Returns {attention module name: Prefix}."""
    if num_prefix < 1:
        raise ConfigError(f"method.prefix.num must be >= 1, got {num_prefix}")
    found = attention_modules(model)
    args = [cache_arg(m) for _, m in found]
    prefixes: dict[str, Prefix] = {}
    # Hooks first, in capture mode: one forward gives the shapes (heads, head_dim) of every layer.
    for (name, module), arg in zip(found, args, strict=True):
        device = next(module.parameters()).device
        prefix = Prefix(1, num_prefix, 1, device)
        prefix.cache_arg = arg
        module.add_module("prefix", prefix)
        module.register_forward_pre_hook(prefix.pre_hook, with_kwargs=True)
        prefixes[name] = prefix
    acts = real_activations(model, list(prefixes.values()), num_prefix)
    with torch.no_grad():
        for prefix, (keys, values) in zip(prefixes.values(), acts, strict=True):
            _, heads, _, head_dim = keys.shape
            fresh = Prefix(heads, num_prefix, head_dim, keys.device)
            if init_by_real_act:
                fresh.keys.copy_(keys[0])
                fresh.values.copy_(values[0])
            else:  # drawn on the CPU (global generator), so every device starts from the same prefix
                fresh.keys.copy_(torch.randn(fresh.keys.shape) * RANDOM_STD)
                fresh.values.copy_(torch.randn(fresh.values.shape) * RANDOM_STD)
            prefix.keys, prefix.values = fresh.keys, fresh.values
    return prefixes
