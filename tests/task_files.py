"""Task files in their public formats (GLUE tsv, LM-BFF csv, SuperGLUE jsonl, SQuAD and DROP json),
written by the tests into a folder: one writer per task (WRITERS), and the task built from them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from omegaconf import OmegaConf

from adazeta.config import TaskConfig
from adazeta.tasks import build_task


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    lines = ["\t".join(header)] + ["\t".join(str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_csv(path: Path, rows: list[list]) -> None:  # LM-BFF: no header
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def sst2_files(d: Path) -> None:
    rows = [["a gripping , funny film .", 1], ["dull and lifeless .", 0], ["a joy to watch .", 1]]
    write_tsv(d / "train.tsv", ["sentence", "label"], rows)
    write_tsv(d / "dev.tsv", ["sentence", "label"], rows[:2])


def sst5_files(d: Path) -> None:
    rows = [[4, "a gorgeous , witty film ."], [0, "an ugly mess ."], [2, "it is fine ."]]
    write_csv(d / "train.csv", rows)
    write_csv(d / "test.csv", rows[1:])


def mr_files(d: Path) -> None:
    rows = [[1, "a moving , honest story ."], [0, "tedious beyond words ."]]
    write_csv(d / "train.csv", rows)
    write_csv(d / "test.csv", rows)


def trec_files(d: Path) -> None:
    rows = [
        [5, "How many dogs does Ann own ?"],
        [3, "Who wrote Hamlet ?"],
        [0, "What is a fjord ?"],
    ]
    write_csv(d / "train.csv", rows)
    write_csv(d / "test.csv", rows)


def rte_files(d: Path) -> None:
    rows = [
        [0, "The cat sat on the mat.", "A cat is sitting.", "entailment"],
        [1, "Dogs bark at night.", "Cats bark.", "not_entailment"],
    ]
    write_tsv(d / "train.tsv", ["index", "sentence1", "sentence2", "label"], rows)
    write_tsv(d / "dev.tsv", ["index", "sentence1", "sentence2", "label"], rows)


MNLI_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]


def mnli_files(d: Path) -> None:
    rows = [
        [0, 1, "1e", "fiction", "He left early.", "He went home.", "neutral", "neutral"],
        [1, 2, "2e", "fiction", "She won the race.", "She lost.", "contradiction", "contradiction"],
        [2, 3, "3e", "fiction", "It rained all day.", "It was wet.", "entailment", "entailment"],
    ]
    write_tsv(d / "train.tsv", MNLI_HEADER, rows)
    write_tsv(d / "dev_matched.tsv", MNLI_HEADER, rows[:2])
    write_tsv(d / "dev_mismatched.tsv", MNLI_HEADER, rows)


def snli_files(d: Path) -> None:
    header = ["index", "captionID", "pairID", "sentence1", "sentence2", "label1", "gold_label"]
    rows = [
        [0, "c0", "p0", "A man plays a guitar.", "A man makes music.", "entailment", "entailment"],
        [1, "c1", "p1", "A dog runs.", "A cat sleeps.", "contradiction", "contradiction"],
        [2, "c2", "p2", "Kids play outside.", "Kids are happy.", "neutral", "-"],
    ]
    write_tsv(d / "train.tsv", header, rows)
    write_tsv(d / "dev.tsv", header, rows)


def cb_files(d: Path) -> None:
    rows = [
        {
            "premise": "Mary said it might rain.",
            "hypothesis": "It will rain",
            "label": "neutral",
            "idx": 0,
        },
        {
            "premise": "Tom is at home.",
            "hypothesis": "Tom is home",
            "label": "entailment",
            "idx": 1,
        },
        {
            "premise": "The shop is shut.",
            "hypothesis": "The shop is open",
            "label": "contradiction",
            "idx": 2,
        },
    ]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "val.jsonl", rows)


def boolq_files(d: Path) -> None:
    # Two train files, as in ../shared/data/boolq: read together.
    write_jsonl(
        d / "train_fewglue32.jsonl",
        [
            {
                "question": "is the sky blue",
                "passage": "The sky is blue on clear days.",
                "idx": 0,
                "label": True,
            }
        ],
    )
    write_jsonl(
        d / "train_ptuning_dev32.jsonl",
        [
            {
                "question": "can fish fly?",
                "passage": "Most fish cannot fly.",
                "idx": 0,
                "label": False,
            }
        ],
    )
    write_jsonl(
        d / "val.jsonl",
        [{"question": "is water wet", "passage": "Water is wet.", "idx": 0, "label": True}],
    )


def wic_files(d: Path) -> None:
    rows = [
        {
            "word": "bank",
            "sentence1": "He sat on the river bank.",
            "sentence2": "She works at a bank.",
            "idx": 0,
            "label": False,
            "start1": 20,
            "end1": 24,
            "start2": 15,
            "end2": 19,
            "version": 1.1,
        },
        {
            "word": "run",
            "sentence1": "I run daily.",
            "sentence2": "They run fast.",
            "idx": 1,
            "label": True,
            "start1": 2,
            "end1": 5,
            "start2": 5,
            "end2": 8,
            "version": 1.1,
        },
    ]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "val.jsonl", rows)


def wsc_files(d: Path) -> None:
    rows = [
        {
            "text": "Mark told Pete many lies about himself. He believed them.",
            "target": {
                "span1_index": 2,
                "span1_text": "Pete",
                "span2_index": 7,
                "span2_text": "He",
            },
            "idx": 0,
            "label": True,
        },
        {
            "text": "The trophy does not fit in the case because it is too big.",
            "target": {
                "span1_index": 6,
                "span1_text": "the case",
                "span2_index": 9,
                "span2_text": "it",
            },
            "idx": 1,
            "label": False,
        },
    ]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "val.jsonl", rows)


def multirc_files(d: Path) -> None:
    row = {
        "idx": 0,
        "version": 1.1,
        "passage": {
            "text": "Sam baked bread. Then Sam sold it at the market.",
            "questions": [
                {
                    "question": "What did Sam sell?",
                    "idx": 0,
                    "answers": [
                        {"text": "Bread", "idx": 0, "label": 1},
                        {"text": "Fish", "idx": 1, "label": 0},
                    ],
                }
            ],
        },
    }
    write_jsonl(d / "train.jsonl", [row])
    write_jsonl(d / "val.jsonl", [row])


def copa_files(d: Path) -> None:
    rows = [
        {
            "premise": "The man broke his toe.",
            "choice1": "He dropped a hammer on his foot.",
            "choice2": "I fell asleep.",
            "question": "cause",
            "label": 0,
            "idx": 0,
        },
        {
            "premise": "It started to rain.",
            "choice1": "The sun came out.",
            "choice2": "We opened umbrellas.",
            "question": "effect",
            "label": 1,
            "idx": 1,
        },
    ]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "val.jsonl", rows)


RECORD_TEXT = "Anna met Ben in Paris.\n@highlight\nAnna visits Paris"


def record_files(d: Path) -> None:
    spans = [(0, 3), (9, 11), (16, 20), (34, 37), (46, 50)]  # Anna Ben Paris Anna Paris, inclusive
    row = {
        "source": "test",
        "idx": 0,
        "passage": {"text": RECORD_TEXT, "entities": [{"start": s, "end": e} for s, e in spans]},
        "qas": [
            {
                "query": "@placeholder met Ben in the French capital.",
                "idx": 0,
                "answers": [
                    {"start": 0, "end": 3, "text": "Anna"},
                    {"start": 34, "end": 37, "text": "Anna"},
                ],
            }
        ],
    }
    write_jsonl(d / "train.jsonl", [row])
    write_jsonl(d / "val.jsonl", [row])


def squad_files(d: Path) -> None:
    data = {
        "version": "1.1",
        "data": [
            {
                "title": "Cats",
                "paragraphs": [
                    {
                        "context": "The cat sat on the mat.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where did the cat sit? ",
                                "answers": [
                                    {"text": "on the mat", "answer_start": 12},
                                    {"text": "the mat", "answer_start": 15},
                                ],
                            },
                            {
                                "id": "q2",
                                "question": "Who sat?",
                                "answers": [{"text": "The cat", "answer_start": 0}],
                            },
                        ],
                    }
                ],
            }
        ],
    }
    (d / "train-v1.1.json").write_text(json.dumps(data))
    (d / "dev-v1.1.json").write_text(json.dumps(data))


def drop_files(d: Path) -> None:
    empty_date = {"day": "", "month": "", "year": ""}
    data = {
        "nfl_1": {
            "passage": "The Bears scored 7 points, then 3 more.",
            "wiki_url": "",
            "qa_pairs": [
                {
                    "question": "How many points did the Bears score?",
                    "query_id": "q1",
                    "answer": {"number": "10", "date": empty_date, "spans": []},
                    "validated_answers": [
                        {"number": "", "date": empty_date, "spans": ["10 points"]}
                    ],
                },
                {
                    "question": "When?",
                    "query_id": "q2",
                    "answer": {
                        "number": "",
                        "date": {"day": "3", "month": "May", "year": "2001"},
                        "spans": [],
                    },
                },
            ],
        }
    }
    (d / "drop_dataset_train.json").write_text(json.dumps(data))
    (d / "drop_dataset_dev.json").write_text(json.dumps(data))


WRITERS = {
    "sst2": sst2_files,
    "sst5": sst5_files,
    "mr": mr_files,
    "trec": trec_files,
    "rte": rte_files,
    "mnli": mnli_files,
    "snli": snli_files,
    "cb": cb_files,
    "boolq": boolq_files,
    "wic": wic_files,
    "wsc": wsc_files,
    "multirc": multirc_files,
    "copa": copa_files,
    "record": record_files,
    "squad": squad_files,
    "drop": drop_files,
}


def task_cfg(name: str, data_dir: Path | None = None, **kw) -> TaskConfig:
    base = {
        "name": name,
        "data_dir": str(data_dir) if data_dir else None,
        "num_train": None,
        "num_dev": 0,
        "num_test": None,
        "k_shot": None,
        "data_seed": 0,
    }
    return OmegaConf.merge(OmegaConf.structured(TaskConfig), {**base, **kw})


def make_task(name: str, tmp_path: Path, **kw):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    WRITERS[name](d)
    return build_task(task_cfg(name, d, **kw))
