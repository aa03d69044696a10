"""The hub reader on a recorded slice of each task's hub schema, without network.

`datasets` 4 and later refuse loading scripts, so every task config names a script-free repository
(Parquet or JSON Lines). Each slice below is a few rows in that repository's columns and features
(ClassLabel integers, nested sequences), as its dataset card declares them; the source is cited in
each conf/task/<name>.yaml. `datasets.load_dataset` is replaced by `Dataset.from_dict` on the slice,
so the rows reach the task through `read_hub` and `list(ds)` exactly as the hub's would. The two
repositories without a card schema (SetFit's JSON Lines) are also loaded by the real
`datasets.load_dataset` from a local folder laid out like the repository, which checks how their
split names are inferred.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import ClassLabel, Features, Sequence, Value
from omegaconf import OmegaConf

from adazeta.config import TaskConfig
from adazeta.errors import DataError
from adazeta.tasks import TASKS, build_task
from adazeta.tasks.loading import Rows

REPO = Path(__file__).resolve().parents[2]

STR, I32, I64 = Value("string"), Value("int32"), Value("int64")
FALSE_TRUE = ClassLabel(names=["False", "True"])
NLI3 = ClassLabel(names=["entailment", "neutral", "contradiction"])  # GLUE MNLI, SNLI


# name -> (hub_path, hub_name, hub split read for "validation", features, rows)
SCHEMAS = {
    "sst2": (
        "nyu-mll/glue",
        "sst2",
        "validation",
        Features(sentence=STR, label=ClassLabel(names=["negative", "positive"]), idx=I32),
        [
            {"sentence": "a gripping , funny film . ", "label": 1, "idx": 0},
            {"sentence": "dull and lifeless . ", "label": 0, "idx": 1},
        ],
    ),
    "mnli": (
        "nyu-mll/glue",
        "mnli",
        "validation_matched",
        Features(premise=STR, hypothesis=STR, label=NLI3, idx=I32),
        [
            {"premise": "He left early.", "hypothesis": "He stayed.", "label": 2, "idx": 0},
            {"premise": "He left early.", "hypothesis": "He went.", "label": 0, "idx": 1},
        ],
    ),
    "snli": (
        "stanfordnlp/snli",
        None,
        "validation",
        Features(premise=STR, hypothesis=STR, label=NLI3),
        [
            {"premise": "A man plays.", "hypothesis": "A man sleeps.", "label": 2},
            {"premise": "A man plays.", "hypothesis": "Nobody agreed.", "label": -1},  # no gold
            {"premise": "A man plays.", "hypothesis": "A man is tall.", "label": 1},
        ],
    ),
    "rte": (
        "aps/super_glue",
        "rte",
        "validation",
        Features(
            premise=STR,
            hypothesis=STR,
            idx=I32,
            label=ClassLabel(names=["entailment", "not_entailment"]),
        ),
        [
            {"premise": "The cat sat.", "hypothesis": "A dog sat.", "idx": 0, "label": 1},
            {"premise": "The cat sat.", "hypothesis": "A cat sat.", "idx": 1, "label": 0},
        ],
    ),
    "cb": (
        "aps/super_glue",
        "cb",
        "validation",
        Features(
            premise=STR,
            hypothesis=STR,
            idx=I32,
            label=ClassLabel(names=["entailment", "contradiction", "neutral"]),
        ),
        [
            {
                "premise": "Mary said it might rain.",
                "hypothesis": "it will rain",
                "idx": 0,
                "label": 2,
            },
            {"premise": "It rained.", "hypothesis": "it was dry", "idx": 1, "label": 1},
        ],
    ),
    "boolq": (
        "aps/super_glue",
        "boolq",
        "validation",
        Features(question=STR, passage=STR, idx=I32, label=FALSE_TRUE),
        [
            {
                "question": "is paris in france",
                "passage": "Paris is in France.",
                "idx": 0,
                "label": 1,
            },
            {
                "question": "is paris in spain",
                "passage": "Paris is in France.",
                "idx": 1,
                "label": 0,
            },
        ],
    ),
    "copa": (
        "aps/super_glue",
        "copa",
        "validation",
        Features(
            premise=STR,
            choice1=STR,
            choice2=STR,
            question=STR,
            idx=I32,
            label=ClassLabel(names=["choice1", "choice2"]),
        ),
        [
            {
                "premise": "It started to rain.",
                "choice1": "The sun came out.",
                "choice2": "We opened umbrellas.",
                "question": "effect",
                "idx": 0,
                "label": 1,
            }
        ],
    ),
    "multirc": (
        "aps/super_glue",
        "multirc",
        "validation",
        Features(
            paragraph=STR,
            question=STR,
            answer=STR,
            idx={"paragraph": I32, "question": I32, "answer": I32},
            label=FALSE_TRUE,
        ),
        [
            {
                "paragraph": "Tom ate bread.",
                "question": "What did Tom eat?",
                "answer": "Fish",
                "idx": {"paragraph": 0, "question": 0, "answer": 1},
                "label": 0,
            }
        ],
    ),
    "record": (
        "aps/super_glue",
        "record",
        "validation",
        Features(
            passage=STR,
            query=STR,
            entities=Sequence(STR),
            entity_spans=Sequence({"text": STR, "start": I32, "end": I32}),
            answers=Sequence(STR),
            idx={"passage": I32, "query": I32},
        ),
        [
            {
                "passage": "Anna met Ben in Paris.\n@highlight\nAnna visits Paris",
                "query": "@placeholder met Ben.",
                "entities": ["Anna", "Ben", "Paris"],
                "entity_spans": {"text": ["Anna", "Ben"], "start": [0, 9], "end": [3, 11]},
                "answers": ["Anna"],
                "idx": {"passage": 0, "query": 0},
            }
        ],
    ),
    "wic": (
        "aps/super_glue",
        "wic",
        "validation",
        Features(
            word=STR,
            sentence1=STR,
            sentence2=STR,
            start1=I32,
            start2=I32,
            end1=I32,
            end2=I32,
            idx=I32,
            label=FALSE_TRUE,
        ),
        [
            {
                "word": "bank",
                "sentence1": "He sat on the bank.",
                "sentence2": "She robbed the bank.",
                "start1": 14,
                "start2": 15,
                "end1": 18,
                "end2": 19,
                "idx": 0,
                "label": 0,
            }
        ],
    ),
    "wsc": (
        "aps/super_glue",
        "wsc.fixed",
        "validation",
        Features(
            text=STR,
            span1_index=I32,
            span2_index=I32,
            span1_text=STR,
            span2_text=STR,
            idx=I32,
            label=FALSE_TRUE,
        ),
        [
            {
                "text": "Mark told Pete he was late.",
                "span1_index": 0,
                "span2_index": 3,
                "span1_text": "Mark",
                "span2_text": "He",
                "idx": 0,
                "label": 1,
            }
        ],
    ),
    "squad": (
        "rajpurkar/squad",
        None,
        "validation",
        Features(
            id=STR,
            title=STR,
            context=STR,
            question=STR,
            answers=Sequence({"text": STR, "answer_start": I32}),
        ),
        [
            {
                "id": "5733be284776f41900661182",
                "title": "Cats",
                "context": "The cat sat on the mat.",
                "question": "Where did the cat sit?",
                "answers": {"text": ["on the mat", "the mat"], "answer_start": [12, 15]},
            }
        ],
    ),
    "drop": (
        "ucinlp/drop",
        None,
        "validation",
        Features(
            section_id=STR,
            query_id=STR,
            passage=STR,
            question=STR,
            answers_spans=Sequence({"spans": STR, "types": STR}),
        ),
        [
            {
                "section_id": "nfl_1184",
                "query_id": "f37e81fa-ef7b-4583-b671-762fc433faa9",
                "passage": "The Bears scored 10 points.",
                "question": "How many points?",
                "answers_spans": {"spans": ["10"], "types": ["number"]},
            }
        ],
    ),
    "mr": (
        "cornell-movie-review-data/rotten_tomatoes",
        None,
        "test",
        Features(text=STR, label=ClassLabel(names=["neg", "pos"])),
        [{"text": "a joy to watch .", "label": 1}, {"text": "an ugly mess .", "label": 0}],
    ),
    "sst5": (
        "SetFit/sst5",
        None,
        "test",
        Features(text=STR, label=I64, label_text=STR),
        [
            {"text": "an ugly mess .", "label": 0, "label_text": "very negative"},
            {"text": "it is fine .", "label": 2, "label_text": "neutral"},
            {"text": "a gorgeous , witty film .", "label": 4, "label_text": "very positive"},
        ],
    ),
    "trec": (
        "SetFit/TREC-QC",
        None,
        "test",
        Features(
            text=STR,
            label=I64,
            label_text=STR,
            label_original=STR,
            label_coarse=I64,
            label_coarse_text=STR,
            label_coarse_original=STR,
        ),
        [
            # `label` is the fine class and `label_coarse` numbers classes by first appearance in
            # the source file: neither is LM-BFF's class index, which comes from the name.
            {
                "text": "What does NASA stand for ?",
                "label": 7,
                "label_text": "expression abbreviated",
                "label_original": "ABBR:exp",
                "label_coarse": 4,
                "label_coarse_text": "abbreviation",
                "label_coarse_original": "ABBR",
            },
            {
                "text": "Who wrote Hamlet ?",
                "label": 3,
                "label_text": "an individual",
                "label_original": "HUM:ind",
                "label_coarse": 0,
                "label_coarse_text": "human being",
                "label_coarse_original": "HUM",
            },
        ],
    ),
}

# name -> [(label, the fields or answers that show the columns were mapped)] per example read
EXPECTED = {
    "sst2": [
        (1, {"sentence": "a gripping , funny film ."}),
        (0, {"sentence": "dull and lifeless ."}),
    ],
    "mnli": [(2, {"premise": "He left early.", "hypothesis": "He stayed."}), (0, None)],
    "snli": [(2, {"hypothesis": "A man sleeps."}), (1, {"hypothesis": "A man is tall."})],
    "rte": [(1, {"premise": "The cat sat.", "hypothesis": "A dog sat."}), (0, None)],
    "cb": [(2, {"premise": "Mary said it might rain."}), (1, None)],
    "boolq": [(1, {"question": "is paris in france", "passage": "Paris is in France."}), (0, None)],
    "copa": [(1, {"question": "effect", "choice2": "We opened umbrellas."})],
    "multirc": [(0, {"paragraph": "Tom ate bread.", "answer": "Fish"})],
    "record": [(0, ("Anna",))],
    "wic": [(0, {"word": "bank", "sentence2": "She robbed the bank."})],
    "wsc": [(1, {"span1_text": "Mark", "span2_text": "He"})],
    "squad": [(0, ("on the mat", "the mat"))],
    "drop": [(0, ("10",))],
    "mr": [(1, {"sentence": "a joy to watch ."}), (0, None)],
    "sst5": [(0, {"sentence": "an ugly mess ."}), (2, None), (4, None)],
    "trec": [(2, {"sentence": "What does NASA stand for ?"}), (3, None)],  # Expression, Human
}


def task_config(name: str) -> TaskConfig:
    cfg = OmegaConf.merge(
        OmegaConf.structured(TaskConfig), OmegaConf.load(REPO / "conf/task" / f"{name}.yaml")
    )
    cfg.builtin = False  # sst2 defaults to its shipped sample; here the hub is the source
    return cfg


@pytest.fixture
def recorded_hub(monkeypatch):
    """Replace datasets.load_dataset by the recorded slice of the schema the call asks for."""
    asked = []

    def load_dataset(path, name=None, split=None, **kwargs):
        asked.append((path, name, split))
        for hub_path, hub_name, _, features, rows in SCHEMAS.values():
            if (path, name) == (hub_path, hub_name):
                columns = {key: [row[key] for row in rows] for key in features}
                return datasets.Dataset.from_dict(columns, features=features, split=split)
        raise FileNotFoundError(f"Dataset '{path}' (config {name!r}) is not recorded here")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


def test_every_task_reads_its_hub_from_a_script_free_repository():
    """Each config names a namespaced repository that has a recorded schema here; the bare
    canonical names (super_glue, glue, trec, drop, snli, squad, rotten_tomatoes) were loading
    scripts, or redirects to them, and datasets >= 4 refuses scripts."""
    assert set(SCHEMAS) == set(TASKS)
    for name, (hub_path, hub_name, *_rest) in SCHEMAS.items():
        cfg = task_config(name)
        assert (cfg.hub_path, cfg.hub_name) == (hub_path, hub_name), name
        assert "/" in cfg.hub_path, f"{name}: {cfg.hub_path!r} is not an owner/name repository"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_hub_slice_reads_through_read_hub(name, recorded_hub):
    hub_path, hub_name, split, _, _ = SCHEMAS[name]
    task = build_task(task_config(name))
    examples = task.read_split("validation")
    assert recorded_hub == [(hub_path, hub_name, split)]
    assert len(examples) == len(EXPECTED[name])
    for ex, (label, shown) in zip(examples, EXPECTED[name], strict=True):
        assert ex.label == label
        if isinstance(shown, dict):
            assert {k: ex.fields[k] for k in shown} == shown
        elif shown is not None:
            assert ex.answers == shown


def test_hub_classes_land_on_the_prompts_words(recorded_hub):
    """A hub ClassLabel integer lands on the word of the class it names (2 = contradiction -> "No")."""
    words = {}
    for name in ("mnli", "cb", "boolq", "rte", "sst5", "trec"):
        task = build_task(task_config(name))
        ex = task.read_split("validation")[0]
        words[name] = (task.label_words or task.candidates)[ex.label].strip()
    assert words == {
        "mnli": "No",  # contradiction
        "cb": "Maybe",  # neutral
        "boolq": "Yes",  # True
        "rte": "No",  # not_entailment
        "sst5": "terrible",  # very negative
        "trec": "Expression",  # ABBR
    }


def test_trec_hub_row_without_a_coarse_class_names_the_row():
    task = build_task(task_config("trec"))
    rows = Rows([{"text": "Why ?", "label_coarse_original": "WHY"}], "hub:x", "hub")
    with pytest.raises(DataError, match=r"hub:x, row 1: no coarse TREC class .*'WHY'"):
        task.examples(task.flatten(rows))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize(
    "name, files",
    [
        # SetFit/sst5: train.jsonl, dev.jsonl, test.jsonl, README.md (no configs)
        ("sst5", {"train.jsonl": "rows", "dev.jsonl": "rows", "test.jsonl": "rows"}),
        # SetFit/TREC-QC: the jsonl files beside the raw files prepare.py read
        (
            "trec",
            {
                "train.jsonl": "rows",
                "test.jsonl": "rows",
                "train_5500.label": "ABBR:exp What does NASA stand for ?\n",
                "TREC_10.label": "HUM:ind Who wrote Hamlet ?\n",
                "question_types.txt": "ABBR abbreviation\n",
                "prepare.py": "print('not a loading script')\n",
            },
        ),
    ],
)
def test_setfit_jsonl_layout_loads_with_the_splits_we_ask_for(name, files, tmp_path, monkeypatch):
    """The real datasets.load_dataset on a local copy of the repository's file layout (a folder
    is resolved like a script-free hub repository): `dev` becomes validation, the raw TREC files
    are not data files, and the test split we evaluate on exists."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for file, content in files.items():
        if content == "rows":
            write_jsonl(repo / file, SCHEMAS[name][4])
        else:
            (repo / file).write_text(content)
    real_load = datasets.load_dataset

    def load_local(path, config=None, split=None, **kwargs):
        return real_load(str(repo), config, split=split, cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_local)
    builder = datasets.load_dataset_builder(str(repo), cache_dir=str(tmp_path / "cache"))
    expected_splits = {"train", "validation", "test"} if "dev.jsonl" in files else {"train", "test"}
    assert set(builder.config.data_files) == expected_splits
    task = build_task(task_config(name))
    labels = [ex.label for ex in task.read_split("validation")]
    assert labels == [label for label, _ in EXPECTED[name]]
