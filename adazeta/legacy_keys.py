"""The flat method keys of earlier releases (`method.lora_r`), rewritten to their nodes (`method.lora.r`).

Each method's own settings live in a node of `method` (adazeta/config.py: `method.lora`,
`method.prefix`, `method.sparse`, `method.fzoo`, `method.lozo`, `method.hizoo`). The flat names are
still accepted where settings come in, and rewritten here, in one place:

- overrides (the command line, `compose_config`, study plans): `upgrade_overrides`, with a
  FutureWarning naming the new key;
- keyword arguments of the library API: `upgrade_keywords`, with the same warning;
- configs saved by earlier runs (<run>/config.yaml, a checkpoint's state.json), when read:
  `upgrade_config`, silently, so that replay and `train.resume=auto` still find and read them.

A flat key inside a yaml file's `method:` node fails to compose; `flat_key_hint` turns that error
into one naming the new key.

This module imports nothing of adazeta: every layer may use it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping

# Flat key of `method` -> its key under `method`.
FLAT_KEYS: dict[str, str] = {
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_targets": "lora.targets",
    "num_prefix": "prefix.num",
    "prefix_init_by_real_act": "prefix.init_by_real_act",
    "sparsity": "sparse.sparsity",
    "mask": "sparse.mask",
    "keep_ratio": "sparse.keep_ratio",
    "in_forward": "sparse.in_forward",
    "fzoo_n": "fzoo.n",
    "lozo_rank": "lozo.rank",
    "lozo_interval": "lozo.interval",
    "hizoo_alpha": "hizoo.alpha",
}
# `method.<nested>` -> `method.<flat>`: study plans name run folders by the flat names.
NESTED_KEYS: dict[str, str] = {f"method.{new}": f"method.{old}" for old, new in FLAT_KEYS.items()}


def message(old: str) -> str:
    return f"method.{old} is deprecated: use method.{FLAT_KEYS[old]}"


def warn(old: str) -> None:
    warnings.warn(message(old) + " (the flat key is rewritten to it for now)", FutureWarning, stacklevel=3)


_OVERRIDE = re.compile(r"^(?P<sign>[+~]{0,2})method\.(?P<key>\w+)(?P<rest>(=|$).*)", re.S)


def upgrade_override(override: str) -> str:
    """`method.lora_r=4` -> `method.lora.r=4` (with a FutureWarning); any other override unchanged."""
    m = _OVERRIDE.match(override)
    if m is None or m["key"] not in FLAT_KEYS:
        return override
    warn(m["key"])
    return f"{m['sign']}method.{FLAT_KEYS[m['key']]}{m['rest']}"


def upgrade_overrides(overrides: Iterable[str]) -> list[str]:
    return [upgrade_override(o) for o in overrides]


def upgrade_argv(argv: list[str]) -> list[str]:
    """A command line's overrides (the arguments with `=` that are not options) upgraded."""
    return [upgrade_override(a) if "=" in a and not a.startswith("-") else a for a in argv]


def upgrade_keywords(keywords: dict) -> dict:
    """Library keywords: `lora_r=4` -> `lora={"r": 4}` (with a FutureWarning), merged with a
    `lora=` dict given beside it; other keywords unchanged."""
    out: dict = {}
    for key, value in keywords.items():
        if key in FLAT_KEYS:
            warn(key)
            key, leaf = FLAT_KEYS[key].split(".")
            value = {leaf: value}
        if isinstance(out.get(key), Mapping) and isinstance(value, Mapping):
            value = {**out[key], **value}
        out[key] = value
    return out


def upgrade_config(cfg):
    """A saved config (plain dict or DictConfig) with its flat method keys moved into their nodes,
    in place; returned for convenience. Flat keys that are not the run's own are left as they are."""
    method = cfg.get("method") if hasattr(cfg, "get") else None
    if method is None or not hasattr(method, "keys"):
        return cfg
    for old in [k for k in list(method.keys()) if k in FLAT_KEYS]:
        node, leaf = FLAT_KEYS[old].split(".")
        value = method.pop(old)
        if method.get(node) is None:
            method[node] = {}
        method[node][leaf] = value
    return cfg


def flat_key_hint(error: BaseException | str) -> str | None:
    """For a compose error (or its text) caused by a flat method key in a yaml file, a message
    naming the file and the new key; None for any other error."""
    text = f"{error} {getattr(error, '__cause__', None) or ''}"
    for old in FLAT_KEYS:
        if re.search(rf"Key '{old}' not in 'MethodConfig'", text) or re.search(rf"full_key: method\.{old}\b", text):
            where = re.search(r"In '([^']+)'", text)
            node, leaf = FLAT_KEYS[old].split(".")
            return (f"{message(old)}: {'the config ' + repr(where[1]) if where else 'a yaml file'} gives `{old}:` in "
                    f"its `method:` node; write it as `{node}: {{{leaf}: ...}}` (method.{node}.{leaf})")
    return None
