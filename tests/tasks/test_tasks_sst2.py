"""SST-2 (adazeta/tasks/sst2.py) and the Objective on it: prompts, labels, sampling, and losses
recomputed by hand from the tiny models' own logits."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from adazeta.config import Head, TaskConfig
from adazeta.errors import DataError
from adazeta.objectives import Objective
from adazeta.tasks import Example, build_task
from adazeta.tasks.sst2 import SST2

SHORT = "a gem ."
LONG = "the plot wanders for an hour , the jokes land late , and the ending simply stops ."


def sst2(**kw) -> SST2:
    cfg = TaskConfig(**{"name": "sst2", "builtin": True, "num_train": 32, "num_dev": 16, "num_test": 8, **kw})
    task = build_task(cfg)
    assert isinstance(task, SST2)
    return task


def ex(sentence: str, label: int) -> Example:
    return Example(fields={"sentence": sentence}, label=label)


def sentences(examples: list[Example]) -> list[str]:
    return [e.fields["sentence"] for e in examples]


# -- prompts and labels ---------------------------------------------------------------------------


def test_prompts():
    """LM-BFF's `*cls**sent_0*_It_was*mask*.*sep+*` (the label words carry their own leading
    space) and MeZO's causal prompt `<sentence> It was` followed by ` terrible` / ` great`."""
    task = sst2()
    assert task.mlm_template(ex("<s>", 0), "<mask>") == "<s> It was<mask>."
    assert task.causal_prompt(ex("<s>", 0)) == "<s> It was"
    assert task.mlm_template(ex(SHORT, 1), "[MASK]") == "a gem . It was[MASK]."
    assert task.label_words == ("terrible", "great")
    assert task.causal_candidates(ex(SHORT, 1)) == (" terrible", " great")
    assert task.num_labels == 2


def test_label_mapping(tmp_path):
    """GLUE tsv labels "0"/"1" are classes 0/1; anything else names its file, row and value."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nbad .\t0\ngood .\t1\n fine .\t 1 \n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok .\t1\n")
    task = sst2(builtin=False, data_dir=str(tmp_path))
    train = task.read_split("train")
    assert [e.label for e in train] == [0, 1, 1]
    assert sentences(train) == ["bad .", "good .", "fine ."]

    (tmp_path / "train.tsv").write_text("sentence\tlabel\nbad .\t0\ngood .\t1\nodd .\t7\n")
    with pytest.raises(DataError) as info:
        task.read_split("train")
    msg = str(info.value)
    assert f"{tmp_path / 'train.tsv'}, row 3" in msg
    assert "'7'" in msg and "[0, 1]" in msg


def test_missing_sentence_column_names_file_row_and_column(tmp_path):
    (tmp_path / "train.tsv").write_text("review\tlabel\nbad .\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok .\t1\n")
    with pytest.raises(DataError) as info:
        sst2(builtin=False, data_dir=str(tmp_path)).read_split("train")
    msg = str(info.value)
    assert f"{tmp_path / 'train.tsv'}, row 1" in msg and "'sentence'" in msg and "review" in msg


# -- sampling -------------------------------------------------------------------------------------


def test_builtin_split_sizes():
    """The shipped 400-row sample: the first 300 rows are train, the last 100 validation."""
    task = sst2()
    train, val = task.read_split("train"), task.read_split("validation")
    assert (len(train), len(val)) == (300, 100)
    assert not set(sentences(train)) & set(sentences(val))
    labels = [e.label for e in train + val]
    assert labels.count(0) == labels.count(1) == 200


def test_sampling_sizes_are_disjoint_and_seeded():
    splits = sst2().load()
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (32, 16, 8)
    train, dev, test = map(set, (sentences(splits.train), sentences(splits.dev), sentences(splits.test)))
    assert len(train) == 32 and len(dev) == 16  # no duplicates
    assert not train & dev and not (train | dev) & test
    again = sst2().load()
    assert sentences(again.train) == sentences(splits.train) and sentences(again.test) == sentences(splits.test)
    other = sst2(data_seed=1).load()
    assert sentences(other.train) != sentences(splits.train)


def test_sampling_all_and_shrinking():
    with pytest.raises(DataError, match="no dev example"):  # every eval and the best-dev selection need one
        sst2(num_train=None, num_dev=None, num_test=None).load()
    everything = sst2(num_train=None, num_dev=50, num_test=None).load()
    assert (len(everything.train), len(everything.dev), len(everything.test)) == (250, 50, 100)
    # 1000 + 500 requested from 300: both shrink in proportion (dev would not leave enough train).
    shrunk = sst2(num_train=1000, num_dev=500).load()
    assert (len(shrunk.train), len(shrunk.dev)) == (200, 100)


def test_k_shot_per_class():
    splits = sst2(k_shot=4).load()
    for part in (splits.train, splits.dev):
        labels = [e.label for e in part]
        assert labels.count(0) == labels.count(1) == 4
    assert not set(sentences(splits.train)) & set(sentences(splits.dev))
    assert len(splits.test) == 8


def test_k_shot_too_large_says_so():
    task = sst2(k_shot=1000)
    negatives = sum(e.label == 0 for e in task.read_split("train"))
    with pytest.raises(DataError) as info:
        task.load()
    msg = str(info.value)
    assert "k_shot=1000" in msg and "2000" in msg and f"has {negatives}" in msg


# -- the objective on the tiny models ------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny_model(name)
        return cache[name]

    return get


def objective_for(loaded_model) -> Objective:
    return Objective(sst2(), loaded_model.tokenizer, loaded_model.head, max_length=64)


@torch.no_grad()
def test_classification_loss_by_hand(loaded):
    lm = loaded("tiny-bert")
    assert lm.head == Head.classification
    obj = objective_for(lm)
    examples = [ex(SHORT, 1), ex(LONG, 0)]
    losses, preds = obj.forward(lm.model, obj.encode(examples))
    for i, e in enumerate(examples):
        enc = lm.tokenizer(e.fields["sentence"], return_tensors="pt")  # alone: no padding
        logits = lm.model(**enc).logits[0].float()
        expected = -torch.log_softmax(logits, -1)[e.label]
        assert float(losses[i]) == pytest.approx(float(expected), abs=1e-5)
        assert int(preds[i]) == int(logits.argmax())


@torch.no_grad()
def test_masked_lm_loss_by_hand(loaded):
    lm = loaded("tiny-roberta")
    assert lm.head == Head.masked_lm
    tok = lm.tokenizer
    obj = objective_for(lm)
    examples = [ex(SHORT, 1), ex(LONG, 0)]
    losses, preds = obj.forward(lm.model, obj.encode(examples))
    word_ids = []
    for w in ("terrible", "great"):
        ids = tok(" " + w, add_special_tokens=False).input_ids
        assert len(ids) == 1
        word_ids.append(ids[0])
    for i, e in enumerate(examples):
        ids = tok(f"{e.fields['sentence']} It was{tok.mask_token}.").input_ids
        at = ids.index(tok.mask_token_id)
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, at, word_ids].float()
        expected = -torch.log_softmax(logits, -1)[e.label]
        assert float(losses[i]) == pytest.approx(float(expected), abs=1e-5)
        assert int(preds[i]) == int(logits.argmax())


@torch.no_grad()
def causal_scores_by_hand(lm, obj: Objective, sentence: str) -> torch.Tensor:
    """Mean log-prob of each candidate's tokens after the prompt, one unpadded sequence each."""
    tok = lm.tokenizer
    prompt = tok(f"{sentence} It was", add_special_tokens=False).input_ids
    scores = []
    for cand in (" terrible", " great"):
        cand_ids = tok(cand, add_special_tokens=False).input_ids
        seq = obj.encoder.prefix + prompt + cand_ids
        assert tok(f"{sentence} It was{cand}", add_special_tokens=False).input_ids == prompt + cand_ids
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
        start = len(seq) - len(cand_ids)
        scores.append(torch.stack([logp[t - 1, seq[t]] for t in range(start, len(seq))]).mean())
    return torch.stack(scores)


@torch.no_grad()
def test_causal_lm_loss_by_hand(loaded):
    lm = loaded("tiny-llama")
    assert lm.head == Head.causal_lm
    obj = objective_for(lm)
    examples = [ex(SHORT, 1), ex(LONG, 0)]
    losses, preds = obj.forward(lm.model, obj.encode(examples))
    for i, e in enumerate(examples):
        scores = causal_scores_by_hand(lm, obj, e.fields["sentence"])
        expected = -torch.log_softmax(scores, -1)[e.label]
        assert float(losses[i]) == pytest.approx(float(expected), abs=1e-5)
        assert int(preds[i]) == int(scores.argmax())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-gpt2"])
@torch.no_grad()
def test_left_padding_does_not_change_candidate_scores(loaded, name):
    lm = loaded(name)
    assert lm.head == Head.causal_lm
    obj = objective_for(lm)
    alone = obj.encoder.candidate_scores(lm.model, obj.encode([ex(SHORT, 1)]))
    batch = obj.encode([ex(SHORT, 1), ex(LONG, 0)])
    assert int(batch["attention_mask"][:2].sum(-1).min()) < batch["input_ids"].shape[1]  # SHORT is padded
    padded = obj.encoder.candidate_scores(lm.model, batch)
    torch.testing.assert_close(padded[0], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[0], causal_scores_by_hand(lm, obj, SHORT), rtol=0, atol=1e-5)
