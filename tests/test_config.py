"""Config composition: every option of every group composes into the typed schema of
adazeta/config.py, and bad keys, types, options and enum values fail at compose time, naming them.

The options are discovered from conf/<group>/*.yaml, so a new option is tested without editing
this file.
"""

from __future__ import annotations

import dataclasses
import typing
from enum import Enum

import pytest
from conftest import CONF_DIR, compose_config, config_groups, config_options, job_config
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from adazeta import config as schema

# Keys an option may leave for the user to fill in (`model=hf model.path=<id or folder>`).
REQUIRED_FROM_USER = {("model", "hf"): {"model.path"}}
# Groups whose option file names the thing it configures: run names and wandb tags use `name`.
NAMED_GROUPS = {"model", "task", "method", "logger"}

GROUP_OPTIONS = [(g, o) for g in config_groups() for o in config_options(g)]


def full_message(exc: BaseException) -> str:
    """The exception's message and those of its causes (Hydra puts OmegaConf's detail there)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def compose_error(*overrides: str) -> str:
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(overrides)
    return full_message(info.value)


def enum_fields(cls, prefix: str) -> list[tuple[str, type[Enum]]]:
    """(dotted key, Enum type) for every enum-typed field of a schema dataclass, recursively."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        candidates = typing.get_args(tp) or (tp,)
        for t in candidates:
            if isinstance(t, type) and issubclass(t, Enum):
                out.append((f"{prefix}{f.name}", t))
            elif dataclasses.is_dataclass(t):
                out.extend(enum_fields(t, f"{prefix}{f.name}."))
    return out


def all_enum_fields() -> list[tuple[str, type[Enum], list[str]]]:
    """Every enum field reachable from the config, with the overrides that make it present."""
    fields = [(key, enum, []) for key, enum in enum_fields(schema.Config, "")]
    fields += [
        (f"logger.{key}", enum, ["logger=wandb"])
        for key, enum in enum_fields(schema.WandbLoggerConfig, "")
        if not any(k == f"logger.{key}" for k, _, _ in fields)
    ]
    return fields


def test_groups_are_discovered():
    """The discovery itself: a silent empty list would make the parametrised tests vacuous."""
    groups = config_groups()
    assert {"model", "task", "method", "schedule", "logger", "adapter"} <= set(groups)
    assert {"tiny-bert", "tiny-llama", "tiny-roberta", "hf", "minilm"} <= set(config_options("model"))
    assert {"adazeta", "mezo"} <= set(config_options("method"))


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_to_the_typed_schema(group, option):
    if group == "hparams_search":  # its sweeper is an optional extra (in .[dev])
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason='pip install -e ".[optuna]"')
    cfg = compose_config([f"{group}={option}"])
    assert cfg.hydra.runtime.choices[group] == option  # the option chosen is the option used
    job = job_config(cfg)

    missing = OmegaConf.missing_keys(job)
    assert missing == REQUIRED_FROM_USER.get((group, option), set()), f"{group}={option} leaves {missing} unset"
    if missing:
        job = job_config(compose_config([f"{group}={option}", *(f"{k}=x" for k in missing)]))

    obj = OmegaConf.to_object(job)  # fails on any value that does not fit its declared type
    assert isinstance(obj, schema.Config)
    assert isinstance(obj.model, schema.ModelConfig)
    assert isinstance(obj.task, schema.TaskConfig)
    assert isinstance(obj.method, schema.MethodConfig)
    assert isinstance(obj.adapter, schema.AdapterConfig)
    assert isinstance(obj.train, schema.TrainConfig)
    assert isinstance(obj.schedule, schema.ScheduleConfig) and type(obj.schedule) is not schema.ScheduleConfig
    assert isinstance(obj.logger, schema.LoggerConfig)
    # Enum fields hold enum members, not strings that merely look right.
    for key, enum, _ in all_enum_fields():
        node = obj
        for part in key.split("."):
            node = getattr(node, part, None)
        if node is not None:
            assert isinstance(node, enum), f"{key} is {node!r}, not a {enum.__name__}"
    if group in NAMED_GROUPS:
        assert getattr(obj, group).name == option

    # The schedule is built from its node by Hydra, as the trainer does, and gives Q >= 1.
    sched = instantiate(job.schedule)
    sched.bind(steps_per_epoch=4, max_steps=10)
    assert all(isinstance(sched(s), int) and sched(s) >= 1 for s in range(10))


def zo_methods() -> list[str]:
    """Methods whose optimizer is zo (the first-order references have no query schedule)."""
    out = []
    for option in config_options("method"):
        node = OmegaConf.load(CONF_DIR / "method" / f"{option}.yaml").method
        if node.get("optimizer", "zo") == "zo":
            out.append(option)
    return out


@pytest.mark.parametrize("method", zo_methods())
@pytest.mark.parametrize("sched", config_options("schedule"))
def test_every_method_composes_with_every_schedule(method, sched):
    """A method is a composition: any query schedule can be put under any ZO method, and the
    schedule named on the command line wins over the method's default."""
    cfg = compose_config([f"method={method}", f"schedule={sched}"])
    assert cfg.hydra.runtime.choices.schedule == sched
    assert cfg.method.name == method
    # adaptive and adaptive_released are two options of one schema, AdaptiveScheduleConfig.
    assert type(OmegaConf.to_object(job_config(cfg)).schedule).__name__.lower().startswith(sched.split("_")[0])


def test_overrides_reach_typed_fields(compose_cfg):
    cfg = compose_cfg("seed=3", "train.batch_size=8", "method.lr=0.5", "model.head=masked_lm")
    assert cfg.seed == 3 and isinstance(cfg.seed, int)
    assert cfg.train.batch_size == 8
    assert cfg.method.lr == 0.5 and isinstance(cfg.method.lr, float)
    assert cfg.model.head is schema.Head.masked_lm


def test_unknown_key_fails_naming_it():
    msg = compose_error("train.max_step=3")
    assert "train.max_step" in msg
    assert "Key 'max_step' not in 'TrainConfig'" in msg


def test_unknown_key_in_an_option_file_fails_naming_it(tmp_path):
    """A typo inside a config file (here a new model option on the search path) fails at compose
    time too: the group's schema is closed."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "typo.yaml").write_text("name: typo\npath: tiny\ninit: random\nmax_lenght: 64\n")
    msg = compose_error(f"hydra.searchpath=[file://{tmp_path}]", "model=typo")
    assert "model/typo" in msg
    assert "Key 'max_lenght' not in 'ModelConfig'" in msg


@pytest.mark.parametrize(
    ("override", "key", "kind"),
    [("seed=abc", "seed", "Integer"), ("train.batch_size=1.5", "train.batch_size", "Integer"),
     ("method.lr=fast", "method.lr", "Float"), ("train.progress=maybe", "train.progress", "valid bool")],
)
def test_wrong_type_fails_naming_the_key(override, key, kind):
    msg = compose_error(override)
    assert f"full_key: {key}" in msg
    assert kind in msg


@pytest.mark.parametrize("group", ["task", "method", "model", "schedule", "logger"])
def test_unknown_option_lists_the_available_ones(group):
    msg = compose_error(f"{group}=nope")
    assert f"Could not find '{group}/nope'" in msg
    for option in config_options(group):
        assert option in msg


@pytest.mark.parametrize(
    ("key", "enum", "needs"), all_enum_fields(), ids=[k for k, _, _ in all_enum_fields()],
)
def test_enum_fields_reject_bad_values_listing_valid_ones(key, enum, needs):
    msg = compose_error(*needs, f"{key}=not_a_choice")
    assert "not_a_choice" in msg and f"full_key: {key}" in msg
    for member in enum:
        assert member.name in msg


def test_enum_fields_are_discovered():
    keys = {k for k, _, _ in all_enum_fields()}
    assert {"model.head", "model.init", "method.trainable", "method.optimizer", "logger.mode"} <= keys
