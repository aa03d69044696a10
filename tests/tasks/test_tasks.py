"""The task suite: exact prompts, label mappings, losses against a hand computation from tiny
random models, metrics (accuracy, ReCoRD's any-gold accuracy, SQuAD F1/EM), the public file
formats and the hub formats, truncation, protocols and data errors.

Every fixture is written by the test into tmp_path in the task's public format. The slow test
trains two steps on each task that has real files in <repo>/../shared/data.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_entrypoint
from omegaconf import OmegaConf
from task_files import (
    RECORD_TEXT,
    WRITERS,
    make_task,
    record_files,
    squad_files,
    task_cfg,
    write_csv,
    write_jsonl,
    write_tsv,
)

from adazeta.config import Head, ModelConfig, TaskConfig
from adazeta.errors import ConfigError, DataError
from adazeta.models.load import load_model
from adazeta.objectives import EvalBatch, Objective, first_line
from adazeta.tasks import TASKS, Example, build_task
from adazeta.tasks import base as task_base
from adazeta.tasks.base import fit_sizes
from adazeta.tasks.metrics import exact_match, f1_score, normalize_answer

SHARED_DATA = REPO.parent / "shared" / "data"
MASK = "<mask>"

# -------------------------------------------------------------------- exact prompts and labels

# task -> (expected rendering of the first train example, expected candidates, expected label)
CAUSAL = {
    "sst2": ("a gripping , funny film . It was", (" terrible", " great"), 1),
    "sst5": (
        "a gorgeous , witty film . It was",
        (" terrible", " bad", " okay", " good", " great"),
        4,
    ),
    "mr": ("a moving , honest story . It was", (" terrible", " great"), 1),
    "trec": (
        "How many dogs does Ann own ? This question is about",
        (" definition", " thing", " abbreviation", " person", " place", " number"),
        5,
    ),
    "rte": (
        'The cat sat on the mat.\nDoes this mean that "A cat is sitting." is true? Yes or No?\n',
        ("Yes", "No"),
        0,
    ),
    "mnli": (
        'Suppose He left early. Can we infer that "He went home."? Yes, No, or Maybe?\n',
        ("Yes", "Maybe", "No"),
        1,
    ),
    "snli": (
        'Suppose A man plays a guitar. Can we infer that "A man makes music."? Yes, No, or Maybe?\n',
        ("Yes", "Maybe", "No"),
        0,
    ),
    "cb": (
        'Suppose Mary said it might rain. Can we infer that "It will rain"? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"),
        2,
    ),
    "boolq": ("The sky is blue on clear days. Is the sky blue?\n", ("No", "Yes"), 1),
    "wic": (
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
        "He sat on the river bank.\nShe works at a bank.\n",
        ("No", "Yes"),
        0,
    ),
    "wsc": (
        "Mark told Pete many lies about himself. He believed them.\nIn the previous sentence, "
        'does the pronoun "he" refer to Pete? Yes or No?\n',
        ("No", "Yes"),
        1,
    ),
    "multirc": (
        "Sam baked bread. Then Sam sold it at the market.\nQuestion: What did Sam sell?\n"
        'I found this answer "Bread". Is that correct? Yes or No?\n',
        ("No", "Yes"),
        1,
    ),
    "copa": (
        "The man broke his toe because",
        (" he dropped a hammer on his foot.", " I fell asleep."),
        0,
    ),
    "record": (
        "Anna met Ben in Paris.\n- Anna visits Paris\n-",
        (
            " Anna met Ben in the French capital.",
            " Ben met Ben in the French capital.",
            " Paris met Ben in the French capital.",
        ),
        0,
    ),
    "squad": (
        "Title: Cats\nContext: The cat sat on the mat.\nQuestion: Where did the cat sit?\nAnswer:",
        (" on the mat\n",),
        0,
    ),
    "drop": (
        "Passage: The Bears scored 7 points, then 3 more.\nQuestion: How many points did the Bears "
        "score?\nAnswer:",
        (" 10\n",),
        0,
    ),
}

MASKED = {  # task -> (LM-BFF or PET rendering of the first train example, label words, label)
    "sst2": ("a gripping , funny film . It was<mask>.", ("terrible", "great"), 1),
    "sst5": (
        "a gorgeous , witty film . It was<mask>.",
        ("terrible", "bad", "okay", "good", "great"),
        4,
    ),
    "mr": ("a moving , honest story . It was<mask>.", ("terrible", "great"), 1),
    "trec": (
        "<mask>: How many dogs does Ann own ?",
        ("Description", "Entity", "Expression", "Human", "Location", "Number"),
        5,
    ),
    "rte": ("The cat sat on the mat?<mask>, a cat is sitting.", ("Yes", "No"), 0),
    "mnli": ("He left early?<mask>, he went home.", ("Yes", "Maybe", "No"), 1),
    "snli": ("A man plays a guitar?<mask>, a man makes music.", ("Yes", "Maybe", "No"), 0),
    "cb": ("Mary said it might rain?<mask>, it will rain", ("Yes", "No", "Maybe"), 2),
    # PET's patterns (SuperGLUE): the fields' own final punctuation is not doubled
    "boolq": ("The sky is blue on clear days. Question: is the sky blue? Answer:<mask>.", ("No", "Yes"), 1),
    "wic": (
        "He sat on the river bank. She works at a bank. Does bank have the same meaning in both "
        "sentences?<mask>",
        ("No", "Yes"),
        0,
    ),
    "wsc": (
        "Mark told Pete many lies about himself. He believed them. The pronoun 'He' refers to Pete?<mask>",
        ("No", "Yes"),
        1,
    ),
    "multirc": (
        "Sam baked bread. Then Sam sold it at the market. Question: What did Sam sell? Is it Bread?<mask>.",
        ("No", "Yes"),
        1,
    ),
}


def test_every_task_is_covered_and_has_a_config():
    assert set(WRITERS) == set(TASKS) == set(CAUSAL) | set(MASKED)
    for name in TASKS:
        cfg = OmegaConf.merge(
            OmegaConf.structured(TaskConfig), OmegaConf.load(REPO / "conf/task" / f"{name}.yaml")
        )
        assert cfg.name == name and cfg.hub_path
        assert (cfg.k_shot, cfg.data_seed) == (
            (16, 13) if name in ("sst5", "mr", "trec", "snli", "mnli") else (None, 0)
        )
        assert cfg.num_dev == (100 if name in ("cb", "copa") else None if cfg.k_shot else 500)


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_causal_prompt_candidates_and_label(name, tmp_path):
    task = make_task(name, tmp_path)
    ex = task.read_split("train")[0]
    prompt, candidates, label = CAUSAL[name]
    assert task.causal_prompt(ex) == prompt
    assert ex.label == label
    if task.generation:
        assert task.gold_continuation(ex) == candidates[0]
    else:
        assert task.causal_candidates(ex) == candidates


@pytest.mark.parametrize("name", sorted(MASKED))
def test_masked_template_and_label_words(name, tmp_path):
    task = make_task(name, tmp_path)
    ex = task.read_split("train")[0]
    text, words, label = MASKED[name]
    assert task.mlm_template(ex, MASK) == text
    assert task.label_words == words and ex.label == label


def test_label_mappings_across_formats(tmp_path):
    """The same class whatever the source writes: GLUE strings, SuperGLUE booleans, hub integers."""
    rte = make_task("rte", tmp_path)
    assert [e.label for e in rte.read_split("train")] == [0, 1]  # entailment -> Yes, not -> No
    rows = task_base.Rows(
        [{"premise": "p", "hypothesis": "h", "label": 1}], "hub:super_glue/rte", "hub"
    )
    assert rte.examples(rows)[0].label == 1
    boolq = make_task("boolq", tmp_path)
    assert [e.label for e in boolq.read_split("train")] == [1, 0]  # both train files, in name order
    hub_boolq = task_base.Rows(
        [{"question": "q", "passage": "p", "answer": False}], "hub:boolq", "hub"
    )
    assert boolq.examples(hub_boolq)[0].label == 0
    cb = make_task("cb", tmp_path)
    assert [cb.candidates[e.label] for e in cb.read_split("train")] == ["Maybe", "Yes", "No"]
    snli = make_task("snli", tmp_path)
    assert [e.label for e in snli.read_split("train")] == [0, 2]  # the "-" row is dropped
    mnli = make_task("mnli", tmp_path)
    assert len(mnli.read_split("validation")) == 2  # dev_matched, not dev_mismatched
    copa = make_task("copa", tmp_path)
    ex = copa.read_split("train")[1]
    assert copa.causal_prompt(ex) == "It started to rain so" and ex.label == 1
    assert copa.causal_candidates(ex) == (" the sun came out.", " we opened umbrellas.")


def test_nested_formats_flatten_with_all_answers(tmp_path):
    record = make_task("record", tmp_path)
    ex = record.read_split("train")[0]
    assert ex.candidates == ("Anna", "Ben", "Paris") and ex.answers == ("Anna",)
    squad = make_task("squad", tmp_path)
    exs = squad.read_split("validation")
    assert [e.answers for e in exs] == [("on the mat", "the mat"), ("The cat",)]
    drop = make_task("drop", tmp_path)
    exs = drop.read_split("train")
    assert [e.answers for e in exs] == [("10", "10 points"), ("3 May 2001",)]
    multirc = make_task("multirc", tmp_path)
    assert [(e.fields["answer"], e.label) for e in multirc.read_split("train")] == [
        ("Bread", 1),
        ("Fish", 0),
    ]


def test_hub_rows_read_like_local_files(tmp_path, monkeypatch):
    """Hub layouts (no network here: read_hub is replaced) give the same examples."""
    hub = {
        # CogComp/trec's layout (datasets < 4); SetFit/TREC-QC's is in test_hub.py
        "trec": [{"text": "What does NASA stand for ?", "coarse_label": 0, "fine_label": 1}],
        "squad": [
            {
                "id": "1",
                "title": "T",
                "context": "C",
                "question": "Q?",
                "answers": {"text": ["A", "B"], "answer_start": [0, 1]},
            }
        ],
        "drop": [
            {
                "section_id": "s",
                "query_id": "q",
                "passage": "P",
                "question": "Q?",
                "answers_spans": {"spans": ["7"], "types": ["number"]},
            }
        ],
        "record": [
            {
                "passage": RECORD_TEXT,
                "query": "@placeholder met Ben.",
                "entities": ["Anna", "Ben"],
                "entity_spans": {},
                "answers": ["Ben"],
                "idx": {},
            }
        ],
        "multirc": [{"paragraph": "P", "question": "Q", "answer": "A", "idx": {}, "label": 1}],
        "wsc": [
            {
                "text": "T",
                "span1_index": 0,
                "span2_index": 1,
                "span1_text": "A",
                "span2_text": "B",
                "idx": 0,
                "label": 0,
            }
        ],
        "mnli": [
            {"premise": "P.", "hypothesis": "H", "label": 2, "idx": 0},
            {"premise": "P", "hypothesis": "H", "label": -1, "idx": 1},
        ],
    }
    asked = []

    def fake_read_hub(path, name, split):
        asked.append((path, name, split))
        return task_base.Rows([dict(r) for r in hub[current]], f"hub:{path}/{name}:{split}", "hub")

    monkeypatch.setattr(task_base, "read_hub", fake_read_hub)
    expected = {
        "trec": (2, None),
        "squad": (0, ("A", "B")),
        "drop": (0, ("7",)),
        "record": (1, ("Ben",)),
        "multirc": (1, None),
        "wsc": (0, None),
        "mnli": (2, None),
    }
    for current, (label, answers) in expected.items():
        cfg = OmegaConf.merge(
            OmegaConf.structured(TaskConfig), OmegaConf.load(REPO / "conf/task" / f"{current}.yaml")
        )
        task = build_task(cfg)
        exs = task.read_split("validation")
        assert len(exs) == 1 and exs[0].label == label
        if answers:
            assert exs[0].answers == answers
    assert ("SetFit/TREC-QC", None, "test") in asked
    assert ("nyu-mll/glue", "mnli", "validation_matched") in asked


# -------------------------------------------------------------------- losses against hand computation


def model_cfg(name: str) -> ModelConfig:
    return OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf/model" / f"{name}.yaml")
    )


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        head: load_model(model_cfg(name), num_labels=n)
        for head, name, n in [
            (Head.causal_lm, "tiny-llama", 2),
            (Head.masked_lm, "tiny-roberta", 2),
        ]
    }


def hand_causal_scores(
    model, tok, prefix: list[int], prompt: str, continuations: tuple[str, ...]
) -> torch.Tensor:
    """Mean log-prob of each continuation's tokens, one unpadded sequence at a time; the
    continuation's tokens are counted as MeZO does (whole text minus the prompt)."""
    scores = []
    for cont in continuations:
        ids = prefix + tok(prompt + cont, add_special_tokens=False).input_ids
        n = len(ids) - len(prefix) - len(tok(prompt, add_special_tokens=False).input_ids)
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        scores.append(
            torch.stack([logp[i - 1, ids[i]] for i in range(len(ids) - n, len(ids))]).mean()
        )
    return torch.stack(scores)


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_causal_loss_matches_hand_computation(name, tmp_path, models):
    loaded = models[Head.causal_lm]
    task = make_task(name, tmp_path)
    exs = task.read_split("train")[:3]
    obj = Objective(task, loaded.tokenizer, Head.causal_lm, max_length=128)
    losses, preds = obj.forward(loaded.model, obj.encode(exs))  # a left-padded batch
    train_losses, _ = obj.forward(loaded.model, obj.encode(exs, train=True))
    for i, ex in enumerate(exs):
        prompt = task.causal_prompt(ex)
        if task.loss == "lm":  # minus the mean log-prob of the gold continuation
            gold = hand_causal_scores(
                loaded.model, loaded.tokenizer, obj.encoder.prefix, prompt, (task.gold_continuation(ex),)
            )
            expected = -gold[0]
        else:
            scores = hand_causal_scores(
                loaded.model, loaded.tokenizer, obj.encoder.prefix, prompt, task.causal_candidates(ex)
            )
            expected = F.cross_entropy(scores, torch.tensor(ex.label))
            assert preds[i] == scores.argmax()
        assert losses[i] == pytest.approx(float(expected), abs=1e-4)
        assert train_losses[i] == pytest.approx(float(expected), abs=1e-4)
    assert obj.truncated == 0


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(MASKED))
def test_masked_loss_matches_hand_computation(name, tmp_path, models):
    loaded = models[Head.masked_lm]
    tok = loaded.tokenizer
    task = make_task(name, tmp_path)
    exs = task.read_split("train")[:3]
    obj = Objective(task, tok, Head.masked_lm, max_length=64)
    losses, _ = obj.forward(loaded.model, obj.encode(exs))
    word_ids = [tok.convert_tokens_to_ids(tok.tokenize(w))[0] for w in task.label_words]
    for i, ex in enumerate(exs):
        ids = tok(task.mlm_template(ex, tok.mask_token)).input_ids
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, ids.index(tok.mask_token_id)]
        expected = F.cross_entropy(logits[word_ids], torch.tensor(ex.label))
        assert losses[i] == pytest.approx(float(expected), abs=1e-4)


@torch.no_grad()
@pytest.mark.parametrize(
    "name", sorted(n for n in TASKS if TASKS[n](task_cfg(n)).is_classification)
)
def test_classification_head_loss_matches_hand_computation(name, tmp_path):
    torch.manual_seed(0)
    task = make_task(name, tmp_path)
    loaded = load_model(model_cfg("tiny-bert"), num_labels=task.num_labels)
    exs = task.read_split("train")[:3]
    obj = Objective(task, loaded.tokenizer, Head.classification, max_length=64)
    losses, _ = obj.forward(loaded.model, obj.encode(exs))
    for i, ex in enumerate(exs):
        first, second = task.classification_text(ex)
        enc = loaded.tokenizer(first, second, return_tensors="pt")
        logits = loaded.model(**enc).logits[0]
        assert losses[i] == pytest.approx(
            float(F.cross_entropy(logits, torch.tensor(ex.label))), abs=1e-4
        )


@torch.no_grad()
@pytest.mark.parametrize(
    "name", sorted(n for n in TASKS if TASKS[n](task_cfg(n)).is_classification)
)
def test_mean_pooled_head_reads_every_task_with_its_segments(name, tmp_path):
    # The default model's path (MiniLM: BERT read by mean pooling): sentence pairs carry
    # token_type_ids, which the pooled classifier must pass to the encoder (it crashed on them).
    torch.manual_seed(0)
    task = make_task(name, tmp_path)
    loaded = load_model(OmegaConf.merge(model_cfg("tiny-bert"), {"pooling": "mean"}), num_labels=task.num_labels)
    exs = task.read_split("train")[:3]
    obj = Objective(task, loaded.tokenizer, Head.classification, max_length=64)
    losses, _ = obj.forward(loaded.model, obj.encode(exs))
    for i, ex in enumerate(exs):
        enc = loaded.tokenizer(*task.classification_text(ex), return_tensors="pt")
        hidden = loaded.model.encoder(**enc).last_hidden_state[0]  # one unpadded row: mean of all tokens
        logits = loaded.model.classifier(hidden.mean(0))
        assert losses[i] == pytest.approx(float(F.cross_entropy(logits, torch.tensor(ex.label))), abs=1e-4)


def test_heads_a_task_cannot_use_fail_clearly(tmp_path, models):
    tok = models[Head.causal_lm].tokenizer
    with pytest.raises(ConfigError, match=r"task copa does not run on the classification head "
                       r"\(model.head=classification\): its choices differ per example"):
        Objective(make_task("copa", tmp_path), tok, Head.classification, 64)
    with pytest.raises(ConfigError, match=r"task squad does not run on the masked-LM head \(model.head=masked_lm\): "
                       r"it generates its answers.*It runs on the causal-LM head \(model.head=causal_lm"):
        Objective(make_task("squad", tmp_path), tok, Head.masked_lm, 64)
    with pytest.raises(ConfigError, match="max_length"):
        obj = Objective(make_task("squad", tmp_path), tok, Head.causal_lm, 40)
        obj.encode(obj.task.read_split("train"))


# -------------------------------------------------------------------- metrics


def test_squad_f1_and_exact_match_known_values():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert f1_score("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)  # P = 1, R = 2/3
    assert f1_score("10 points", ["10"]) == pytest.approx(2 / 3)
    assert f1_score("10", ["7", "10 points", "10"]) == 1.0  # best over the gold answers
    assert f1_score("dog", ["a cat"]) == 0.0
    assert exact_match("The mat.", ["on the mat", "the mat"]) == 1.0
    assert exact_match("the cat sat", ["a cat sat down"]) == 0.0
    assert first_line("  on the mat\nQuestion: more") == "on the mat"


@torch.no_grad()
def test_accuracy_is_argmax_of_candidate_scores(tmp_path, models):
    loaded = models[Head.causal_lm]
    task = make_task("cb", tmp_path)
    exs = task.read_split("validation")
    obj = Objective(task, loaded.tokenizer, Head.causal_lm, 128)
    result = obj.evaluate(loaded.model, obj.eval_batches(exs, 2), "cpu")
    hand = [
        hand_causal_scores(
            loaded.model, loaded.tokenizer, obj.encoder.prefix, task.causal_prompt(e), task.candidates
        )
        for e in exs
    ]
    assert set(result) == {"loss", "accuracy"} and obj.metric == "accuracy"
    assert result["accuracy"] == pytest.approx(
        sum(int(s.argmax() == e.label) for s, e in zip(hand, exs, strict=True)) / 3
    )
    expected_loss = (
        sum(
            float(F.cross_entropy(s, torch.tensor(e.label))) for s, e in zip(hand, exs, strict=True)
        )
        / 3
    )
    assert result["loss"] == pytest.approx(expected_loss, abs=1e-4)


@torch.no_grad()
def test_record_accuracy_counts_any_gold_entity(tmp_path, models):
    loaded = models[Head.causal_lm]
    task = make_task("record", tmp_path)
    ex = task.read_split("train")[0]
    obj = Objective(task, loaded.tokenizer, Head.causal_lm, 128)
    scores = hand_causal_scores(
        loaded.model,
        loaded.tokenizer,
        obj.encoder.prefix,
        task.causal_prompt(ex),
        task.causal_candidates(ex),
    )
    worst = ex.candidates[int(scores.argmin())]
    every = Example(ex.fields, 0, ex.candidates, answers=ex.candidates)  # any prediction is right
    only_worst = Example(ex.fields, int(scores.argmin()), ex.candidates, answers=(worst,))
    assert obj.evaluate(loaded.model, [every], "cpu")["accuracy"] == 1.0
    assert obj.evaluate(loaded.model, [only_worst], "cpu")["accuracy"] == 0.0


@torch.no_grad()
def test_generation_is_greedy_and_capped(tmp_path, models):
    loaded = models[Head.causal_lm]
    model, tok = loaded.model, loaded.tokenizer
    task = make_task("squad", tmp_path)
    ex = task.read_split("validation")[0]
    obj = Objective(task, tok, Head.causal_lm, 128)
    batch = obj.encode([ex])
    [text] = obj.generate(model, batch)
    ids = obj.encoder.prefix + tok(task.causal_prompt(ex), add_special_tokens=False).input_ids
    new = []
    for _ in range(task.max_new_tokens):  # greedy by hand, no cache
        nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        new.append(nxt)
        if nxt == model.generation_config.eos_token_id:
            break
    assert text == first_line(tok.decode(new, skip_special_tokens=True))
    assert len(new) <= 50


def test_generation_metrics_aggregate_f1_and_em(tmp_path, models, monkeypatch):
    loaded = models[Head.causal_lm]
    task = make_task("squad", tmp_path)
    exs = task.read_split("validation")  # golds: ("on the mat", "the mat"), ("The cat",)
    obj = Objective(task, loaded.tokenizer, Head.causal_lm, 128)
    monkeypatch.setattr(obj, "generate", lambda model, batch: ["the mat", "a cat sat"])
    result = obj.evaluate(loaded.model, [EvalBatch(obj.encode(exs), exs)], "cpu")
    assert set(result) == {"loss", "f1", "em"} and obj.metric == "f1"
    assert result["f1"] == pytest.approx((1.0 + 2 * (1 / 2) * 1 / (1 / 2 + 1)) / 2)  # 1 and 2/3
    assert result["em"] == pytest.approx(0.5)


# -------------------------------------------------------------------- truncation and protocols


def test_long_passage_is_cut_from_its_end_once_warned(tmp_path, models, caplog):
    loaded = models[Head.causal_lm]
    d = tmp_path / "long"
    d.mkdir()
    passage = " ".join(f"word{i}" for i in range(300)) + "."
    write_jsonl(
        d / "train.jsonl", [{"question": "is it long", "passage": passage, "label": True}] * 2
    )
    write_jsonl(d / "val.jsonl", [{"question": "is it long", "passage": passage, "label": True}])
    task = build_task(task_cfg("boolq", d))
    obj = Objective(task, loaded.tokenizer, Head.causal_lm, max_length=48)
    with caplog.at_level(logging.WARNING):
        batch = obj.encode(task.read_split("train"))
    # One shared row per example (Yes/No are single tokens after the same prompt), plus the answer.
    assert batch["input_ids"].shape[0] == 2 and batch["cand_row"].tolist() == [0, 0, 1, 1]
    assert 44 <= batch["input_ids"].shape[1] + 1 <= 48 and obj.truncated == 2
    assert sum("truncated from the passage side" in r.message for r in caplog.records) == 1
    text = loaded.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("word0 word1") and text.endswith("is it long?")
    assert loaded.tokenizer.decode(batch["cand_last"][:2]) == "no yes"


def test_protocols(tmp_path):
    assert fit_sizes("cb", 250, 1000, 100) == (150, 100)  # MeZO: CB and COPA keep 100 dev
    assert fit_sizes("boolq", 64, 1000, 500) == (42, 21)  # too few for 500 dev: shrink both
    d = tmp_path / "sst5"
    d.mkdir()
    write_csv(d / "train.csv", [[c, f"sentence {c} {i} ."] for c in range(5) for i in range(40)])
    write_csv(d / "test.csv", [[c, f"test {c} {i} ."] for c in range(5) for i in range(300)])
    splits = build_task(task_cfg("sst5", d, k_shot=16, data_seed=13, num_test=1000)).load()
    assert len(splits.train) == len(splits.dev) == 80 and len(splits.test) == 1000
    assert all(sum(e.label == c for e in splits.train) == 16 for c in range(5))
    assert not {e.fields["sentence"] for e in splits.train} & {
        e.fields["sentence"] for e in splits.dev
    }
    again = build_task(task_cfg("sst5", d, k_shot=16, data_seed=13, num_test=1000)).load()
    other = build_task(task_cfg("sst5", d, k_shot=16, data_seed=21, num_test=1000)).load()
    assert again.train == splits.train and other.train != splits.train


# These tasks in LM-BFF's layout as tsv (label<TAB>sentence, no header, as distributed for SST-5,
# MR, TREC): sentences keep bare quotes, and a trailing blank line is no row.
LMBFF_ROWS = {
    "sst5": [(4, "a gorgeous , witty film ."), (0, 'an " ugly " mess .'), (2, "it is fine .")],
    "mr": [(1, "a moving , honest story ."), (0, 'tedious " beyond " words .')],
    "trec": [(5, "How many dogs does Ann own ?"), (3, 'Who wrote " Hamlet " ?')],
}


@pytest.mark.parametrize("name", sorted(LMBFF_ROWS))
@pytest.mark.parametrize("header", [False, True])
def test_lmbff_tsv_is_read_with_or_without_a_header(name, header, tmp_path):
    rows = LMBFF_ROWS[name]
    lines = ["label\tsentence"] * header + [f"{label}\t{sentence}" for label, sentence in rows]
    for split in ("train", "test"):
        (tmp_path / f"{split}.tsv").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    task = build_task(task_cfg(name, tmp_path))
    for split in ("train", "validation"):  # LM-BFF's test.tsv is what these tasks evaluate on
        got = [(ex.label, ex.fields["sentence"]) for ex in task.read_split(split)]
        assert got == rows  # every row, the first one too; labels are the classes' indices here


# Prompt-learning repositories (PET, OpenPrompt) export examples as {"text_a", "text_b", "label"}.
PROMPT_EXPORTS = {
    "sst2": ({"text_a": "a joy to watch .", "label": 1}, {"sentence": "a joy to watch ."}, 1),
    "sst5": ({"text_a": "an ugly mess .", "label": 0}, {"sentence": "an ugly mess ."}, 0),
    "trec": ({"text_a": "Who wrote Hamlet ?", "label": 3}, {"sentence": "Who wrote Hamlet ?"}, 3),
    "rte": (
        {"text_a": "Dogs bark.", "text_b": "Cats bark.", "label": "not_entailment"},
        {"premise": "Dogs bark.", "hypothesis": "Cats bark."},
        1,
    ),
    "cb": (
        {"text_a": "It rained.", "text_b": "It was dry", "label": "contradiction"},
        {"premise": "It rained.", "hypothesis": "It was dry"},
        1,
    ),
    "boolq": (
        {"text_a": "The sky is blue.", "text_b": "is the sky blue", "label": "true"},
        {"passage": "The sky is blue.", "question": "is the sky blue"},
        1,
    ),
    "wic": (
        {"text_a": "He sat on the bank.", "text_b": "She works at a bank.", "word": "bank",
         "label": False},
        {"sentence1": "He sat on the bank.", "sentence2": "She works at a bank.", "word": "bank"},
        0,
    ),
}


@pytest.mark.parametrize("name", sorted(PROMPT_EXPORTS))
def test_text_a_and_text_b_exports_are_read_in_json_and_jsonl(name, tmp_path):
    row, fields, label = PROMPT_EXPORTS[name]
    write_jsonl(tmp_path / "train.jsonl", [row])
    (tmp_path / "dev.json").write_text(json.dumps([row]), encoding="utf-8")
    task = build_task(task_cfg(name, tmp_path))
    for split in ("train", "validation"):
        assert task.read_split(split) == [Example(fields=fields, label=label)]


# -------------------------------------------------------------------- data errors


@pytest.mark.parametrize(
    "case",
    [
        "missing_column",
        "unknown_label",
        "empty",
        "k_too_large",
        "bad_json",
        "multirc_nested",
        "squad_no_answer",
        "copa_question",
        "record_answer",
        "all_skipped",
        "no_file",
        "csv_fields",
        "tsv_fields",
    ],
)
def test_bad_data_names_file_row_and_field(case, tmp_path):
    d = tmp_path / case
    d.mkdir()
    name, kw, match = {
        "missing_column": (
            "rte",
            {},
            r"train.tsv, row 1: missing column 'premise' \(or 'sentence1', 'text_a'\)",
        ),
        "unknown_label": (
            "rte",
            {},
            r"train.tsv, row 1: label 'maybe' in column 'label' is not one of",
        ),
        "empty": ("sst2", {"num_dev": 1}, r"dev.tsv: the file has no rows"),  # a dev example, then no test
        "k_too_large": ("sst2", {"k_shot": 2}, r"k_shot=2 needs 4 examples of class 0 .* has 1"),
        "bad_json": ("cb", {}, r"train.jsonl, line 2: not valid JSON"),
        "multirc_nested": ("multirc", {}, r"train.jsonl, row 1: missing field 'passage'"),
        "squad_no_answer": (
            "squad",
            {},
            r"train-v1.1.json, row 1 \(article\), paragraph 1, question 2: no answer",
        ),
        "copa_question": ("copa", {}, r"train.jsonl, row 1: question 'why' in column 'question'"),
        "record_answer": (
            "record",
            {},
            r"train.jsonl, row 1, query 1: none of the answers \['Zoe'\]",
        ),
        "all_skipped": ("snli", {}, r"train.tsv: the train split is empty"),
        "no_file": ("cb", {}, r"no train file in .*found \['notes.txt'\]"),
        "csv_fields": ("trec", {}, r"train.csv, line 2: 3 fields, expected 2"),
        "tsv_fields": ("trec", {}, r"train.tsv, line 3: 3 fields, expected 2"),
    }[case]
    if case == "missing_column":
        write_tsv(
            d / "train.tsv",
            ["index", "sentence_1", "sentence2", "label"],
            [[0, "a", "b", "entailment"]],
        )
    elif case == "unknown_label":
        write_tsv(
            d / "train.tsv", ["index", "sentence1", "sentence2", "label"], [[0, "a", "b", "maybe"]]
        )
    elif case == "empty":
        write_tsv(d / "train.tsv", ["sentence", "label"], [["good .", 1], ["bad .", 0]])
        write_tsv(d / "dev.tsv", ["sentence", "label"], [])
    elif case == "k_too_large":
        write_tsv(d / "train.tsv", ["sentence", "label"], [["good .", 1]] * 5 + [["bad .", 0]])
        write_tsv(d / "dev.tsv", ["sentence", "label"], [["good .", 1]])
    elif case == "bad_json":
        (d / "train.jsonl").write_text(
            '{"premise": "a", "hypothesis": "b", "label": "neutral"}\n{oops\n'
        )
    elif case == "multirc_nested":
        write_jsonl(d / "train.jsonl", [{"idx": 0, "text": "no passage object"}])
    elif case == "squad_no_answer":
        squad_files(d)
        data = json.loads((d / "train-v1.1.json").read_text())
        data["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []
        (d / "train-v1.1.json").write_text(json.dumps(data))
    elif case == "copa_question":
        write_jsonl(
            d / "train.jsonl",
            [{"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0}],
        )
    elif case == "record_answer":
        record_files(d)
        row = json.loads((d / "train.jsonl").read_text())
        row["qas"][0]["answers"] = [{"start": 0, "end": 2, "text": "Zoe"}]
        write_jsonl(d / "train.jsonl", [row])
    elif case == "all_skipped":
        write_tsv(d / "train.tsv", ["sentence1", "sentence2", "gold_label"], [["a", "b", "-"]])
    elif case == "no_file":
        (d / "notes.txt").write_text("nothing here")
    elif case == "csv_fields":
        (d / "train.csv").write_text('5,"How many ?"\n3,Who,extra\n')
    elif case == "tsv_fields":
        (d / "train.tsv").write_text("5\tHow many ?\n\n3\tWho\textra\n")
    task = build_task(task_cfg(name, d, **kw))
    with pytest.raises(DataError, match=match):
        task.load()


# -------------------------------------------------------------------- slow: real files, real entrypoint

REAL = ["sst2", "rte", "boolq", "cb", "copa", "wic"]


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_train_two_steps_on_real_files(name, tmp_path):
    data = SHARED_DATA / name
    if not data.is_dir():
        pytest.skip(f"{data} is absent: the real task files ship beside the repo (../shared/data; task.data_dir points a task at them)")
    proc = run_entrypoint(
        [
            f"task={name}",
            f"task.data_dir={data}",
            "model=tiny-llama",
            "method=mezo",
            "train.max_steps=2",
            "train.eval_steps=2",
            "train.batch_size=4",
            "task.num_train=32",
            "task.num_dev=16",
            "task.num_test=16",
            "train.progress=false",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["forward_passes"] == 4 and summary["data/train"] == 32 and summary["data/dev"] == 16
    )
    assert 0.0 <= summary["best/eval_accuracy"] <= 1.0 and summary["test/loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rte", "boolq", "cb", "wic"])
def test_minilm_trains_on_every_real_sentence_pair_task(name, tmp_path):
    """The packaged MiniLM through its mean-pooled head on real sentence pairs, which carry
    token_type_ids."""
    data = SHARED_DATA / name
    if not data.is_dir():
        pytest.skip(f"{data} is absent: the real task files ship beside the repo (../shared/data; task.data_dir points a task at them)")
    proc = run_entrypoint([f"task={name}", f"task.data_dir={data}", "model=minilm", "method=adazeta",
                           "train.max_steps=2", "train.eval_steps=2", "train.batch_size=4", "task.num_train=16",
                           "task.num_dev=8", "task.num_test=8", "train.progress=false"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # AdaZeta's default schedule takes at least two queries a step (schedule.q_min=2): 2 steps x 2 x 2 passes.
    assert summary["model"] == "minilm" and summary["forward_passes"] == 8 and 0 <= summary["test/accuracy"] <= 1
