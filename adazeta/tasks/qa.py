"""Extractive QA as generation (MeZO's prompts): SQuAD and DROP. Trained with the LM loss on the
first gold answer followed by a newline; evaluated by greedy generation (at most 50 new tokens,
stopping at a newline), scored by SQuAD-style F1 and exact match against every gold answer.

Local files: SQuAD v1.1 json ({"data": [{"title", "paragraphs": [{"context", "qas"}]}]}, e.g.
train-v1.1.json / dev-v1.1.json) and DROP json ({passage_id: {"passage", "qa_pairs"}}, e.g.
drop_dataset_train.json / drop_dataset_dev.json).
"""

from __future__ import annotations

from adazeta.errors import DataError
from adazeta.tasks.base import Example, Task
from adazeta.tasks.loading import Rows


class GenerativeQA(Task):
    loss = "lm"
    generation = True
    metric = "f1"

    def example(self, rows: Rows, index: int) -> Example | None:
        fields = {f: str(self.col(rows, index, f)) for f in self.text_fields}
        answers = tuple(str(a) for a in self.col(rows, index, "answers") if str(a).strip())
        if not answers:
            raise DataError(f"{rows.where(index)}: no answer in field 'answers'")
        return Example(fields, 0, answers=answers)

    @property
    def is_classification(self) -> bool:
        return False

    def gold_continuation(self, ex: Example) -> str:
        return f" {ex.answers[0]}\n"


class SQuAD(GenerativeQA):
    name = "squad"
    text_fields = ("title", "context", "question")
    passage_field = "context"

    def flatten(self, rows: Rows) -> Rows:
        flat, places = [], []
        for i, row in enumerate(rows.rows):
            if "paragraphs" not in row:  # the hub: one row per question, answers {"text": [...]}
                answers = row.get("answers")
                flat.append(
                    {
                        **row,
                        "answers": answers.get("text") if isinstance(answers, dict) else answers,
                    }
                )
                places.append(rows.where(i))
                continue
            for pi, paragraph in enumerate(row["paragraphs"]):
                for qi, qa in enumerate(paragraph.get("qas", [])):
                    flat.append(
                        {
                            "title": row.get("title", ""),
                            "context": paragraph.get("context"),
                            "question": qa.get("question"),
                            "answers": [a["text"] for a in qa.get("answers", [])],
                        }
                    )
                    places.append(
                        f"{rows.where(i)} (article), paragraph {pi + 1}, question {qi + 1}"
                    )
        return Rows(flat, rows.source, rows.kind, places)

    def causal_prompt(self, ex: Example) -> str:
        f = ex.fields
        return f"Title: {f['title']}\nContext: {f['context']}\nQuestion: {f['question'].strip()}\nAnswer:"


def drop_answer(answer: dict) -> list[str]:
    """A DROP answer object as text(s): its number, else its spans, else its date."""
    if str(answer.get("number", "")).strip():
        return [str(answer["number"])]
    if answer.get("spans"):
        return list(answer["spans"])
    date = answer.get("date") or {}
    text = " ".join(str(date[k]) for k in ("day", "month", "year") if str(date.get(k, "")).strip())
    return [text] if text else []


class DROP(GenerativeQA):
    name = "drop"
    text_fields = ("passage", "question")
    passage_field = "passage"

    def flatten(self, rows: Rows) -> Rows:
        flat, places = [], []
        for i, row in enumerate(rows.rows):
            if "qa_pairs" not in row:  # the hub: answers_spans {"spans": [...], "types": [...]}
                spans = row.get("answers_spans")
                flat.append(
                    {
                        **row,
                        "answers": spans.get("spans")
                        if isinstance(spans, dict)
                        else row.get("answers"),
                    }
                )
                places.append(rows.where(i))
                continue
            for qi, qa in enumerate(row["qa_pairs"]):
                answers = []
                for a in [qa.get("answer", {}), *qa.get("validated_answers", [])]:
                    answers += [t for t in drop_answer(a) if t not in answers]
                flat.append(
                    {
                        "passage": row.get("passage"),
                        "question": qa.get("question"),
                        "answers": answers,
                    }
                )
                places.append(f"{rows.where(i)} ({row.get('_key', 'passage')}), question {qi + 1}")
        return Rows(flat, rows.source, rows.kind, places)

    def causal_prompt(self, ex: Example) -> str:
        f = ex.fields
        return f"Passage: {f['passage']}\nQuestion: {f['question'].strip()}\nAnswer:"
