"""What the planner measures: the model's architecture (its Hugging Face config keys, never its
weights) and the longest batch a run of it can draw."""

from __future__ import annotations

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Keys of a saved Hugging Face config that describe the checkpoint, not the architecture.
NOT_ARCH = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
            "_attn_implementation_autoset", "_commit_hash", "auto_map"}


def architecture(model_cfg) -> dict:
    """The Hugging Face config keys of the model: `model.arch`, or the config.json of a local or
    packaged checkpoint (the weights are never read)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    from adazeta.config import Init
    from adazeta.errors import ConfigError
    from adazeta.models.load import resolve_path

    if model_cfg.arch and "model_type" in model_cfg.arch:
        return OmegaConf.to_container(model_cfg.arch, resolve=True)
    if model_cfg.init == Init.random:
        raise ConfigError(f"model {model_cfg.name!r} has init=random but no model.arch with a model_type")
    try:
        hf = AutoConfig.from_pretrained(resolve_path(model_cfg.path), trust_remote_code=model_cfg.trust_remote_code)
    except OSError as e:
        raise ConfigError(
            f"cannot read the config of model.path={model_cfg.path!r} ({e}); the planner needs the "
            "architecture only: give model.arch (see conf/model/llama2-7b.yaml) or a folder with config.json"
        ) from e
    # Nested dicts (rope parameters) set no tensor shape, and would reach the strict HF config as
    # OmegaConf nodes through model.arch: left out.
    return {k: v for k, v in hf.to_dict().items() if k not in NOT_ARCH and not isinstance(v, dict)}


def layer_key(arch: dict) -> str:
    for key in LAYER_KEYS:
        if key in arch:
            return key
    raise ValueError(f"no layer count ({' / '.join(LAYER_KEYS)}) in the architecture {sorted(arch)}")


def plan_batch(cfg, arch: dict, seq_len: int | None):
    """The batch one step sees at its longest, and its description."""
    import torch
    from transformers import AutoConfig

    from adazeta.config import Init
    from adazeta.models.load import load_tokenizer, pick_head, resolve_path
    from adazeta.objectives import Objective
    from adazeta.tasks import Example, build_task

    spec = dict(arch)
    hf = AutoConfig.for_model(spec.pop("model_type"), **spec)
    head = pick_head(hf, cfg.model.head)
    path = resolve_path(cfg.model.path) if cfg.model.init == Init.pretrained else cfg.model.path
    tokenizer = load_tokenizer(cfg.model, path)
    task = build_task(cfg.task)
    bs = cfg.train.batch_size
    if seq_len is None:
        objective = Objective(task, tokenizer, head, cfg.model.max_length)
        train = task.load().train
        lengths = [objective.encode([ex], train=True)["input_ids"].shape[1] for ex in train]
        order = sorted(range(len(train)), key=lambda i: -lengths[i])
        batch = objective.encode([train[i] for i in order[:bs]], train=True)
        median = sorted(lengths)[len(lengths) // 2]
        source = (f"the {bs} longest of {len(train)} {task.name} training examples (median "
                  f"{median} tokens)")
    else:
        objective = Objective(task, tokenizer, head, seq_len)
        words = " ".join(["a quietly moving film with a fine cast and a story that holds"] * (seq_len // 4 + 8))
        examples = [Example(fields={f: words for f in task.text_fields}, label=i % max(task.num_labels, 1))
                    for i in range(bs)]
        batch = objective.encode(examples, train=True)
        source = f"synthetic text cut to model.max_length={seq_len}"
    vocab = getattr(hf, "vocab_size", None)
    for key in ("input_ids", "cand_last", "cand_targets"):  # another tokenizer's ids may exceed the model's vocabulary
        if key in batch and vocab:
            batch[key] = batch[key] % vocab
    rows, tokens = batch["input_ids"].shape
    tok_name = cfg.model.tokenizer or ("packaged:minilm" if cfg.model.init == Init.random else cfg.model.path)
    return batch, f"{rows} x {tokens} tokens: {source}; tokenizer {tok_name}", torch.Size([rows, tokens])
