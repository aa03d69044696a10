"""The Task abstraction: load splits, sample them by protocol, and say how an example is shown to
each kind of head (classification text, masked-LM template, causal-LM prompt and candidates)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from adazeta.config import TaskConfig
from adazeta.errors import ConfigError, DataError
from adazeta.tasks.loading import BUILTIN_DIR, Rows, column, read_file, read_hub, read_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]
    label: int


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]


class Task:
    """A classification task. Subclasses set the class attributes and the three renderings."""

    name: str
    text_fields: tuple[str, ...]  # columns holding the inputs, in order
    label_field: str = "label"
    label_values: tuple  # raw label values in class order (as they appear in the files)
    label_words: tuple[str, ...]  # masked LM: the word for each class at the mask position
    candidates: tuple[str, ...]  # causal LM: the continuation scored for each class
    builtin_file: str | None = None  # file in tasks/data shipped for the offline default

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @property
    def num_labels(self) -> int:
        return len(self.label_values)

    # -- renderings (override per task) -------------------------------------------------------
    def classification_text(self, ex: Example) -> tuple[str, str | None]:
        """Text (and optional second segment) fed to an encoder with a classification head."""
        first, *rest = (ex.fields[f] for f in self.text_fields)
        return first, (rest[0] if rest else None)

    def mlm_template(self, ex: Example, mask: str) -> str:
        raise ConfigError(f"task {self.name} has no masked-LM template; use model.head=classification")

    def causal_prompt(self, ex: Example) -> str:
        raise ConfigError(f"task {self.name} has no causal-LM prompt; use model.head=classification")

    # -- loading --------------------------------------------------------------------------------
    def parse_label(self, raw, rows: Rows, index: int) -> int:
        for i, value in enumerate(self.label_values):
            if str(raw).strip().lower() == str(value).lower():
                return i
        raise DataError(
            f"{rows.source}, row {index + 1}: label {raw!r} in column {self.label_field!r} is not "
            f"one of {list(self.label_values)}"
        )

    def examples(self, rows: Rows) -> list[Example]:
        out = []
        for i in range(len(rows.rows)):
            fields = {f: str(column(rows, i, f)).strip() for f in self.text_fields}
            label = self.parse_label(column(rows, i, self.label_field), rows, i)
            out.append(Example(fields=fields, label=label))
        return out

    def read_split(self, split: str) -> list[Example]:
        cfg = self.cfg
        if cfg.data_dir:
            rows = read_local(cfg.data_dir, split)
        elif cfg.builtin:
            rows = self.read_builtin(split)
        elif cfg.hub_path:
            rows = read_hub(cfg.hub_path, cfg.hub_name, split)
        else:
            raise DataError(f"task {self.name}: set task.data_dir, task.builtin=true or task.hub_path")
        examples = self.examples(rows)
        if not examples:
            raise DataError(f"{rows.source}: the {split} split is empty")
        return examples

    def read_builtin(self, split: str) -> Rows:
        """The shipped sample: its first three quarters are the train split, the rest validation."""
        if self.builtin_file is None:
            raise DataError(f"task {self.name} has no built-in sample; set task.data_dir or task.builtin=false")
        rows = read_file(BUILTIN_DIR / self.builtin_file)
        cut = len(rows.rows) * 3 // 4
        part = rows.rows[:cut] if split == "train" else rows.rows[cut:]
        return Rows(rows=part, source=rows.source)

    def load(self) -> Splits:
        """Sample train and dev from the train split, test from the validation split (MeZO protocol),
        or k examples per class for train and dev (LM-BFF protocol)."""
        cfg = self.cfg
        rng = random.Random(cfg.data_seed)
        pool = self.read_split("train")
        rng.shuffle(pool)
        if cfg.k_shot is not None:
            train, dev = self.k_per_class(pool, cfg.k_shot)
        else:
            n_train, n_dev = fit_sizes(self.name, len(pool), cfg.num_train, cfg.num_dev)
            dev, train = pool[:n_dev], pool[n_dev : n_dev + n_train]
        test = self.read_split("validation")
        if cfg.num_test is not None and cfg.num_test < len(test):
            test = rng.sample(test, cfg.num_test)
        return Splits(train=train, dev=dev, test=test)

    def k_per_class(self, pool: list[Example], k: int) -> tuple[list[Example], list[Example]]:
        by_class: dict[int, list[Example]] = {i: [] for i in range(self.num_labels)}
        for ex in pool:
            by_class[ex.label].append(ex)
        train, dev = [], []
        for label, exs in by_class.items():
            if len(exs) < 2 * k:
                raise DataError(
                    f"task {self.name}: task.k_shot={k} needs {2 * k} examples of class "
                    f"{self.label_values[label]!r} (k for train, k for dev) but the train split has {len(exs)}"
                )
            train += exs[:k]
            dev += exs[k : 2 * k]
        return train, dev


def fit_sizes(name: str, available: int, num_train: int | None, num_dev: int | None) -> tuple[int, int]:
    """Requested train/dev sizes, shrunk proportionally (with a warning) when the split is smaller."""
    n_dev = num_dev if num_dev is not None else 0
    n_train = num_train if num_train is not None else max(available - n_dev, 0)
    if n_train + n_dev > available:
        scale = available / (n_train + n_dev)
        n_dev, n_train = int(n_dev * scale), int(n_train * scale)
        log.warning(
            "task %s: the train split has %d examples, fewer than num_train + num_dev; using %d train "
            "and %d dev", name, available, n_train, n_dev,
        )
    if n_train == 0:
        raise DataError(f"task {name}: no training examples (train split has {available} rows)")
    return n_train, n_dev
