"""AdaZeta tensorized adapters and their injection into Hugging Face models.

Adapter (AdaZeta, arXiv 2406.18060: a Houlsby-style bottleneck whose layers are tensor trains):

    A(x) = U(ReLU(D(x))),   adapter(x) = x + scale * A(x)

with D = TTLinear(dim -> bottleneck) and U = TTLinear(bottleneck -> dim) (see ``adazeta.trainable.tt``).

Injection works like peft: walk ``named_modules()``, match qualified names against per-family regex
rules, and replace each matched Linear (or GPT-2 Conv1D) by an ``AdaptedLinear`` that keeps the
original layer as ``base_layer`` and applies the adapter before it (``side="input"``) or after it
(``side="output"``). Nothing is frozen here: the caller picks the trainable set, for instance with
``adapter_parameters(model)``.

Usage::

    names = inject_tt_adapters(model, rank=5, bottleneck=64)   # family defaults from model_type
    trainable = adapter_parameters(model)                      # [(name, param), ...]
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adazeta.trainable.tt import TTLinear

__all__ = [
    "ATTENTION_TARGETS",
    "FAMILY_DEFAULT_MODES",
    "FAMILY_TARGETS",
    "AdaptedLinear",
    "TTAdapter",
    "adapter_parameters",
    "inject_tt_adapters",
]

SIDES = ("input", "output")
INITS = ("paper", "identity")

# Placement rules per `config.model_type`. Each pattern is matched with re.fullmatch against the
# qualified module name from named_modules(); "(?:.*\.)?" lets the same rule work whether the
# model is a bare backbone ("layers.0.mlp.up_proj") or wrapped in a head ("model.layers.0...").
_P = r"(?:.*\.)?"

# RoBERTa/BERT: after the attention-output and FFN-output projections (Houlsby placement, as in
# the reference code's medium_models/adapters/roberta.py): 2 per layer, 48 on RoBERTa-large.
# `layer\.\d+\.output\.dense` does not match `attention.output.dense`, nor the pooler/LM-head dense.
_BERT_TARGETS = [
    {"pattern": _P + r"layer\.\d+\.attention\.output\.dense", "side": "output"},
    {"pattern": _P + r"layer\.\d+\.output\.dense", "side": "output"},
]
# Llama family: the reference code (large_models/loretta/tuners/loretta_adp.py) wraps the FFN only:
# gate and up get an input-side adapter, down an output-side one: 3 per layer, 96 on Llama-2-7B.
_LLAMA_TARGETS = [
    {"pattern": _P + r"mlp\.gate_proj", "side": "input"},
    {"pattern": _P + r"mlp\.up_proj", "side": "input"},
    {"pattern": _P + r"mlp\.down_proj", "side": "output"},
]
_OPT_TARGETS = [
    {"pattern": _P + r"layers\.\d+\.fc1", "side": "input"},
    {"pattern": _P + r"layers\.\d+\.fc2", "side": "output"},
]
_GPT2_TARGETS = [
    {"pattern": _P + r"mlp\.c_fc", "side": "input"},
    {"pattern": _P + r"mlp\.c_proj", "side": "output"},
]

FAMILY_TARGETS: dict[str, list[dict]] = {
    "bert": _BERT_TARGETS,  # also all-MiniLM-L6-v2 (model_type "bert")
    "roberta": _BERT_TARGETS,
    "xlm-roberta": _BERT_TARGETS,
    "llama": _LLAMA_TARGETS,  # also SmolLM/SmolLM2 (model_type "llama")
    "mistral": _LLAMA_TARGETS,
    "qwen2": _LLAMA_TARGETS,
    "qwen3": _LLAMA_TARGETS,
    "opt": _OPT_TARGETS,
    "gpt2": _GPT2_TARGETS,
}

# Extra rules added by inject_tt_adapters(..., attention=True). The paper text names attention too;
# the reference code for Llama does not use them (so the 610,560 count excludes them).
_BERT_ATTENTION = [
    {"pattern": _P + r"attention\.self\.(query|key|value)", "side": "input"},
]
_LLAMA_ATTENTION = [
    {"pattern": _P + r"self_attn\.(q_proj|k_proj|v_proj)", "side": "input"},
    {"pattern": _P + r"self_attn\.o_proj", "side": "output"},
]
_OPT_ATTENTION = [
    {"pattern": _P + r"self_attn\.(q_proj|k_proj|v_proj)", "side": "input"},
    {"pattern": _P + r"self_attn\.out_proj", "side": "output"},
]
_GPT2_ATTENTION = [
    {"pattern": _P + r"attn\.c_attn", "side": "input"},
    {"pattern": _P + r"attn\.c_proj", "side": "output"},
]
ATTENTION_TARGETS: dict[str, list[dict]] = {
    "bert": _BERT_ATTENTION,
    "roberta": _BERT_ATTENTION,
    "xlm-roberta": _BERT_ATTENTION,
    "llama": _LLAMA_ATTENTION,
    "mistral": _LLAMA_ATTENTION,
    "qwen2": _LLAMA_ATTENTION,
    "qwen3": _LLAMA_ATTENTION,
    "opt": _OPT_ATTENTION,
    "gpt2": _GPT2_ATTENTION,
}

# TT modes used when inject_tt_adapters(modes=None). The RoBERTa reference
# (yifanycc/AdaZeta medium_models/adapters/roberta.py) uses one 5-core TT of shape [8, 8, 16, 8, 8]
# at rank 5 for both D (1024 -> 64) and U (64 -> 1024), contracted and reshaped to (d_in, d_out):
# D = in (8, 8, 16) x out (8, 8), U = in (8, 8) x out (16, 8, 8); 880 core parameters each, i.e.
# 2 * 880 + 64 + 1024 = 2,848 per adapter and 48 * 2,848 = 136,704 on RoBERTa-large. One
# {dim: modes} dict cannot give 1024 two orders, but 1024 -> (8, 16, 8) yields exactly the same
# core shapes (up to the position of the 16) on both sides, hence the same count and capacity.
# With plain factorize (1024 -> (8, 8, 16), 64 -> (4, 4, 4)) the count would be 127,104.
_ROBERTA_REFERENCE_MODES = {1024: (8, 16, 8), 64: (8, 8)}
FAMILY_DEFAULT_MODES: dict[str, dict[int, tuple[int, ...]]] = {
    "roberta": _ROBERTA_REFERENCE_MODES,
    "xlm-roberta": _ROBERTA_REFERENCE_MODES,
}


class TTAdapter(nn.Module):
    """Residual TT bottleneck adapter x + scale * U(ReLU(D(x))) (AdaZeta, arXiv 2406.18060).

    ``down`` is D (dim -> bottleneck) and ``up`` is U (bottleneck -> dim), both ``TTLinear`` with
    the paper's init. The adapter always computes in fp32, whatever the dtype of ``x`` (a bf16 base
    model keeps fp32 adapters, so the ZO +eps/-2eps/+eps round trip on them is exact); the
    residual sum is done in fp32 and cast back to ``x.dtype`` once.

    Args:
        dim: feature size at the adapter's place.
        bottleneck: hidden size b of the adapter (64 in the paper).
        rank: TT rank r.
        scale: multiplier on the adapter branch.
        modes: optional {size: factors} overriding ``factorize`` for dim and/or bottleneck.
        bias: biases in D and U (the paper's counts include them).
        device: where to build the parameters (meta is fine).
        init: ``"paper"``: every core and bias drawn as in the paper (``TTLinear``), so the untrained
            adapter already changes the model's output; ``"identity"``: the same draws, then U's last
            core and bias set to zero (as LoRA zeroes B), so the adapter starts as the identity and
            the untrained model keeps its zero-shot accuracy. Not the paper's: see docs/study.md.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int = 64,
        rank: int = 5,
        scale: float = 1.0,
        modes: dict | None = None,
        bias: bool = True,
        device=None,
        init: str = "paper",
    ):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"TTAdapter: init must be one of {list(INITS)}, got {init!r}")
        modes = _normalize_modes(modes)
        self.dim, self.bottleneck, self.scale = dim, bottleneck, float(scale)
        dim_modes, b_modes = modes.get(dim), modes.get(bottleneck)
        self.down = TTLinear(dim, bottleneck, rank, dim_modes, b_modes, bias, device, torch.float32)
        self.up = TTLinear(bottleneck, dim, rank, b_modes, dim_modes, bias, device, torch.float32)
        if init == "identity":
            with torch.no_grad():  # drawn first, so the other parameters equal the paper init's
                self.up.cores[-1].zero_()
                if self.up.bias is not None:
                    self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        out = torch.add(h, self.up(torch.relu(self.down(h))), alpha=self.scale)  # one pass, no scaled copy
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.bottleneck}, scale={self.scale}"


class AdaptedLinear(nn.Module):
    """A Linear/Conv1D layer with a TT adapter before (side="input") or after (side="output") it.

    input side: ``base_layer(adapter(x))``; output side: ``adapter(base_layer(x))``. The original
    layer is kept untouched as ``base_layer`` (peft style), so its state-dict keys gain a
    ``base_layer.`` infix. ``weight``, ``bias``, ``in_features`` and ``out_features`` pass through,
    for model code that reads them.
    """

    def __init__(self, base_layer: nn.Module, adapter: TTAdapter, side: str):
        super().__init__()
        if side not in SIDES:
            raise ValueError(f"AdaptedLinear: side={side!r} is not one of {list(SIDES)}")
        self.base_layer = base_layer
        self.adapter = adapter
        self.side = side

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return _in_out_features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return _in_out_features(self.base_layer)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.side == "input":
            return self.base_layer(self.adapter(x))
        return self.adapter(self.base_layer(x))

    def extra_repr(self) -> str:
        return f"side={self.side!r}"


def _in_out_features(layer: nn.Module) -> tuple[int, int]:
    # Conv1D (GPT-2) stores its weight as (in, out), the transpose of nn.Linear.
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    return layer.in_features, layer.out_features


def _normalize_modes(modes) -> dict[int, tuple[int, ...]]:
    # Accepts plain dicts and OmegaConf DictConfigs (keys may arrive as ints or strings).
    if modes is None:
        return {}
    try:
        return {int(k): tuple(int(f) for f in v) for k, v in modes.items()}
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError(
            f"modes must map a layer size to its factors, e.g. {{1024: [8, 16, 8], 64: [8, 8]}}; "
            f"got modes={modes!r}"
        ) from err


def _normalize_rules(rules) -> list[tuple[str, str]]:
    out = []
    for rule in rules:
        try:
            pattern, side = str(rule["pattern"]), str(rule["side"])
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"each target rule must be a mapping with keys 'pattern' and 'side', got {rule!r}"
            ) from err
        if side not in SIDES:
            raise ValueError(f"target rule {rule!r}: side={side!r} is not one of {list(SIDES)}")
        out.append((pattern, side))
    return out


def inject_tt_adapters(
    model: nn.Module,
    rank: int = 5,
    bottleneck: int = 64,
    scale: float = 1.0,
    targets: list[dict] | None = None,
    attention: bool = False,
    modes: dict | None = None,
    init: str = "paper",
) -> list[str]:
    """Wrap the matching Linear/Conv1D layers of ``model`` in ``AdaptedLinear``, in place.

    Args:
        model: a Hugging Face model (``model.config.model_type`` picks the family defaults).
        rank: TT rank of every adapter core.
        bottleneck: adapter hidden size b.
        scale: multiplier on the adapter branch.
        targets: placement rules ``[{"pattern": regex, "side": "input"|"output"}, ...]``, each
            pattern matched with ``re.fullmatch`` on the qualified module name; the first matching
            rule wins. None -> ``FAMILY_TARGETS[model_type]`` (+ ``ATTENTION_TARGETS`` if
            ``attention``).
        attention: also place adapters on the attention projections (family defaults only).
        modes: {size: factors} TT-mode overrides. None -> ``FAMILY_DEFAULT_MODES`` for the family
            (empty for most); pass ``{}`` to use plain ``factorize`` everywhere.
        init: ``"paper"`` or ``"identity"`` (see ``TTAdapter``).

    The adapter size is the layer's in_features on the input side and out_features on the output
    side. Adapters are built in fp32 on the device of the layer's weight (meta included), their
    values drawn on the CPU from the global CPU generator in module order (``TTLinear.
    reset_parameters``), so the init does not depend on where the layers sit. Nothing is frozen.
    Returns the qualified names of the wrapped layers, in ``named_modules()`` order.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if targets is None:
        if model_type not in FAMILY_TARGETS:
            raise ValueError(
                f"inject_tt_adapters: no default adapter placement for model_type={model_type!r}; "
                f"known families: {sorted(FAMILY_TARGETS)}. Set targets to a list of "
                "{'pattern': <regex on module names>, 'side': 'input'|'output'} rules."
            )
        rules = list(FAMILY_TARGETS[model_type])
        if attention:
            rules += ATTENTION_TARGETS[model_type]
    else:
        if attention:
            raise ValueError(
                "inject_tt_adapters: attention=True only extends the family defaults; "
                "with explicit targets, add the attention rules to targets instead"
            )
        rules = targets
    rules = _normalize_rules(rules)
    if modes is None:
        modes = FAMILY_DEFAULT_MODES.get(model_type, {})
    modes = _normalize_modes(modes)

    matches: list[tuple[str, nn.Module, str]] = []
    for name, module in model.named_modules():
        side = next((s for p, s in rules if re.fullmatch(p, name)), None)
        if side is None:
            continue
        if isinstance(module, AdaptedLinear):
            raise ValueError(f"inject_tt_adapters: {name!r} already has an adapter")
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ValueError(
                f"inject_tt_adapters: {name!r} matches a target pattern but is a "
                f"{type(module).__name__}, not an nn.Linear or Conv1D; tighten the pattern"
            )
        matches.append((name, module, side))
    if not matches:
        raise ValueError(
            f"inject_tt_adapters: no module of this {type(model).__name__} "
            f"(model_type={model_type!r}) matches the target patterns {[p for p, _ in rules]}; "
            "check the names in model.named_modules()"
        )

    # Replace after the walk: mutating the tree while named_modules() iterates it is unsafe.
    for name, module, side in matches:
        d_in, d_out = _in_out_features(module)
        adapter = TTAdapter(
            d_in if side == "input" else d_out,
            bottleneck=bottleneck,
            rank=rank,
            scale=scale,
            modes=modes,
            device=module.weight.device,
            init=init,
        )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AdaptedLinear(module, adapter, side))
    return [name for name, _, _ in matches]


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of every TT-adapter parameter in ``model``, in module order."""
    out, seen = [], set()
    for prefix, module in model.named_modules():
        if isinstance(module, TTAdapter):
            for name, param in module.named_parameters(prefix=prefix):
                if id(param) not in seen:
                    seen.add(id(param))
                    out.append((name, param))
    return out
