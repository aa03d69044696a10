"""The Task abstraction: load splits, sample them by protocol, and say how an example is shown to
each kind of head (classification text, masked-LM template, causal-LM prompt and continuations).

A task is a small class: the columns it reads (with their names in other public formats), its
label values in class order, its prompts, and how it is trained and scored:

- `loss = "candidates"` (classification): cross-entropy over the candidates' scores;
- `loss = "lm"` (COPA, ReCoRD, SQuAD, DROP): language-model loss on the gold continuation only;
- `generation = True` (SQuAD, DROP): evaluated by greedy generation, scored by `metric` ("f1",
  with exact match reported too); otherwise by the best-scoring candidate ("accuracy").

Protocols (docs/design.md, section 5): MeZO samples num_train + num_dev examples from the train split (dev
first) and num_test from the validation split; LM-BFF (task.k_shot) samples k per class for train
and for dev, and caps test at num_test.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from adazeta.config import Head, TaskConfig
from adazeta.errors import ConfigError, DataError
from adazeta.tasks.loading import BUILTIN_DIR, Rows, column, read_file, read_hub, read_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]
    label: int  # class index; for per-example candidates, the index of the gold one
    candidates: tuple[str, ...] | None = None  # per-example choices (COPA choices, ReCoRD entities)
    answers: tuple[str, ...] = ()  # every gold answer (ReCoRD entities, SQuAD/DROP texts)


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]


def norm_label(raw) -> str:
    """A raw label as text: True -> 'true', 1 -> '1', 1.0 (pandas) -> '1', ' Entailment' -> 'entailment'."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    return str(raw).strip().lower()


# Each head as errors name it, and models that have it (conf/model/*.yaml) to suggest.
HEAD_NAMES = {
    Head.causal_lm: "causal-LM",
    Head.masked_lm: "masked-LM",
    Head.classification: "classification",
}
HEAD_EXAMPLES = {
    Head.causal_lm: "e.g. model=smollm2-135m or model=tiny-llama",
    Head.masked_lm: "e.g. model=roberta-large or model=tiny-roberta",
    Head.classification: "e.g. model=minilm or model=tiny-bert",
}


class Task:
    """A task. Subclasses set the class attributes and override the renderings they support."""

    name: str
    text_fields: tuple[str, ...]  # columns holding the inputs, in order
    label_field: str = "label"
    # Raw label values in class order, as they appear in the files. An entry may be a tuple of
    # aliases: ("entailment", "0") matches GLUE tsv strings and hub integers alike.
    label_values: tuple = ()
    label_words: tuple[str, ...] = ()  # masked LM: the word for each class at the mask position
    candidates: tuple[str, ...] = ()  # causal LM: the continuation scored for each class
    # column -> its names in other formats or on the hub; `text_a`/`text_b` are the first and second
    # text in the json/jsonl exports of prompt-learning repositories (PET, OpenPrompt)
    aliases: dict[str, tuple[str, ...]] = {}
    skip_labels: tuple[str, ...] = ()  # raw labels meaning "no gold label" (SNLI "-"): rows dropped
    passage_field: str | None = None  # the field cut (from its end) when an input is too long
    split_stems: dict[str, tuple[str, ...]] = {}  # local file stems per split, tried first
    hub_splits: dict[str, str] = {"train": "train", "validation": "validation"}
    csv_columns: tuple[str, ...] | None = None  # column names of headerless csv/tsv files (LM-BFF)
    builtin_file: str | None = None  # file in tasks/data shipped for the offline default
    loss: str = "candidates"  # "candidates" (classification) or "lm" (gold continuation)
    generation: bool = False  # evaluate by greedy generation (SQuAD, DROP)
    max_new_tokens: int = 50  # generation length cap; generation also stops at a newline
    metric: str = "accuracy"  # the dev metric that selects checkpoints

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @property
    def num_labels(self) -> int:
        return len(self.label_values)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric evaluation reports (besides the loss)."""
        return ("f1", "em") if self.generation else ("accuracy",)

    @property
    def has_mlm(self) -> bool:
        return type(self).mlm_template is not Task.mlm_template and bool(self.label_words)

    @property
    def is_classification(self) -> bool:
        """Fixed classes shared by every example: works with a classification head."""
        return self.loss == "candidates" and not self.generation and self.num_labels > 0

    @property
    def has_causal(self) -> bool:
        return type(self).causal_prompt is not Task.causal_prompt

    @property
    def heads(self) -> tuple[Head, ...]:
        """The heads this task runs on: a causal LM (its prompt), a masked LM (its template and
        label words, over fixed classes) and a classification head (fixed classes)."""
        runs = {
            Head.causal_lm: self.has_causal,
            Head.masked_lm: self.has_mlm and self.is_classification,
            Head.classification: self.is_classification,
        }
        return tuple(head for head, ok in runs.items() if ok)

    def head_error(self, head: Head) -> str:
        """Why this task does not run on `head`, the heads it runs on, and what to do."""
        if self.generation:
            why = "it generates its answers, which only a causal LM does"
        elif not self.is_classification:
            why = (
                "its choices differ per example (no fixed classes for label words or a "
                "classification head to score)"
            )
        elif head == Head.masked_lm:
            why = "it has no masked-LM template and label words"
        else:
            why = "it has no causal-LM prompt"
        runs = "; ".join(
            f"the {HEAD_NAMES[h]} head (model.head={h.value}, {HEAD_EXAMPLES[h]})" for h in self.heads
        )
        return (
            f"task {self.name} does not run on the {HEAD_NAMES[head]} head (model.head="
            f"{head.value}): {why}. It runs on {runs}"
        )

    # -- renderings (override per task) -------------------------------------------------------
    def classification_text(self, ex: Example) -> tuple[str, str | None]:
        """Text (and optional second segment) fed to an encoder with a classification head. The
        passage comes first: it is the segment cut when the pair is too long."""
        first, *rest = (ex.fields[f] for f in self.text_fields)
        return first, (rest[0] if rest else None)

    def mlm_template(self, ex: Example, mask: str) -> str:
        raise ConfigError(self.head_error(Head.masked_lm))

    def causal_prompt(self, ex: Example) -> str:
        raise ConfigError(self.head_error(Head.causal_lm))

    def causal_candidates(self, ex: Example) -> tuple[str, ...]:
        """The continuations scored after the prompt; candidate i belongs to class i."""
        return self.candidates

    def gold_continuation(self, ex: Example) -> str:
        """The continuation trained with the LM loss (loss="lm")."""
        return self.causal_candidates(ex)[ex.label]

    # -- loading --------------------------------------------------------------------------------
    def col(self, rows: Rows, index: int, name: str):
        return column(rows, index, name, self.aliases.get(name, ()))

    def parse_label(self, raw, rows: Rows, index: int) -> int:
        text = norm_label(raw)
        for i, value in enumerate(self.label_values):
            if text in {norm_label(v) for v in (value if isinstance(value, tuple) else (value,))}:
                return i
        shown = [v[0] if isinstance(v, tuple) else v for v in self.label_values]
        raise DataError(
            f"{rows.where(index)}: label {raw!r} in column {self.label_field!r} is not one of {shown}"
        )

    def flatten(self, rows: Rows) -> Rows:
        """Nested public formats -> one flat row per example (MultiRC, ReCoRD, SQuAD, DROP, ...)."""
        return rows

    def example(self, rows: Rows, index: int) -> Example | None:
        """One row as an Example; None drops the row (no gold label)."""
        raw = self.col(rows, index, self.label_field)
        if norm_label(raw) in self.skip_labels:
            return None
        fields = {f: str(self.col(rows, index, f)).strip() for f in self.text_fields}
        return Example(fields=fields, label=self.parse_label(raw, rows, index))

    def examples(self, rows: Rows) -> list[Example]:
        out = [self.example(rows, i) for i in range(len(rows.rows))]
        kept = [ex for ex in out if ex is not None]
        if len(kept) < len(out):
            log.info("%s: dropped %d rows without a gold label", rows.source, len(out) - len(kept))
        return kept

    def read_rows(self, split: str) -> Rows:
        cfg = self.cfg
        if cfg.data_dir:
            label_names = (self.label_field, *self.aliases.get(self.label_field, ()))
            return read_local(
                cfg.data_dir, split, self.split_stems.get(split, ()), self.csv_columns, label_names
            )
        if cfg.builtin:
            return self.read_builtin(split)
        if cfg.hub_path:
            return read_hub(cfg.hub_path, cfg.hub_name, self.hub_splits[split])
        raise DataError(f"task {self.name}: set task.data_dir, task.builtin=true or task.hub_path")

    def read_split(self, split: str) -> list[Example]:
        rows = self.read_rows(split)
        examples = self.examples(self.flatten(rows))
        if not examples:
            raise DataError(f"{rows.source}: the {split} split is empty (no usable examples)")
        return examples

    def read_builtin(self, split: str) -> Rows:
        """The shipped sample: its first three quarters are the train split, the rest validation."""
        if self.builtin_file is None:
            raise DataError(
                f"task {self.name} has no built-in sample; set task.data_dir or task.builtin=false"
            )
        rows = read_file(BUILTIN_DIR / self.builtin_file)
        cut = len(rows.rows) * 3 // 4
        part = rows.rows[:cut] if split == "train" else rows.rows[cut:]
        offset = 0 if split == "train" else cut
        return Rows(
            rows=part,
            source=rows.source,
            kind=rows.kind,
            places=[f"{rows.source}, row {offset + i + 1}" for i in range(len(part))],
        )

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
        if not dev:  # the best-dev selection and every eval/* metric need one (checked before training)
            raise DataError(
                f"task {self.name}: no dev example: the train split has {len(pool)} usable rows and "
                f"task.num_dev={null(cfg.num_dev)}, task.num_train={null(cfg.num_train)} leave none for dev; "
                "give a larger train file, or set task.num_dev (>= 1) and a smaller task.num_train"
            )
        test = self.read_split("validation")
        if cfg.num_test is not None and cfg.num_test < len(test):
            test = rng.sample(test, cfg.num_test)
        return Splits(train=train, dev=dev, test=test)

    def k_per_class(self, pool: list[Example], k: int) -> tuple[list[Example], list[Example]]:
        if not self.is_classification:
            raise ConfigError(
                f"task.k_shot={k}: task {self.name} has no fixed classes to sample k of; set "
                "task.k_shot=null and use task.num_train / task.num_dev"
            )
        by_class: dict[int, list[Example]] = {i: [] for i in range(self.num_labels)}
        for ex in pool:
            by_class[ex.label].append(ex)
        train, dev = [], []
        for label, exs in by_class.items():
            if len(exs) < 2 * k:
                value = self.label_values[label]
                raise DataError(
                    f"task {self.name}: task.k_shot={k} needs {2 * k} examples of class "
                    f"{value[0] if isinstance(value, tuple) else value!r} (k for train, k for dev) "
                    f"but the train split has {len(exs)}; lower task.k_shot"
                )
            train += exs[:k]
            dev += exs[k : 2 * k]
        return train, dev


def fit_sizes(
    name: str, available: int, num_train: int | None, num_dev: int | None
) -> tuple[int, int]:
    """Requested train/dev sizes when the train split is smaller than both (with a warning): dev
    keeps its size if that leaves at least as many training examples (MeZO: CB and COPA, 100 dev),
    otherwise both shrink proportionally."""
    n_dev = num_dev if num_dev is not None else 0
    n_train = num_train if num_train is not None else max(available - n_dev, 0)
    if n_train + n_dev > available:
        if 2 * n_dev <= available:
            n_train = available - n_dev
        else:
            scale = available / (n_train + n_dev)
            n_dev, n_train = int(n_dev * scale), int(n_train * scale)
        log.warning(
            "task %s: the train split has %d examples, fewer than num_train + num_dev; using %d train "
            "and %d dev",
            name,
            available,
            n_train,
            n_dev,
        )
    if n_train == 0:
        raise DataError(f"task {name}: no training examples (train split has {available} rows)")
    return n_train, n_dev


def null(value) -> str:
    """A config value as one writes it on the command line (None as null)."""
    return "null" if value is None else str(value)


# -- small text helpers shared by the prompts ---------------------------------------------------
def lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def drop_final_punct(text: str) -> str:
    """LM-BFF's `*sent-_0*` drops the sentence's last character, its final punctuation; we drop
    it only when it is punctuation, so that an unpunctuated sentence keeps its last letter."""
    return text[:-1] if text[-1:] in ".?!,;:" else text
