"""SuperGLUE tasks with MeZO's prompts (PromptSource-derived): BoolQ, WiC, WSC, MultiRC (yes/no
classification by candidate scoring), COPA and ReCoRD (choices that differ per example, trained
with the LM loss on the gold choice).

The yes/no tasks have masked-LM templates too, from PET's patterns (Schick & Schuetze 2021, "It's
Not Just Size That Matters", pet/pvp.py), with PET's label words No / Yes. As in the LM-BFF
templates (sst2.py, nli.py) the mask follows the text without a space: the label words carry it
(RoBERTa "ĠYes"). Where a pattern appends "." or "?" to a field, the field's own final
punctuation is dropped first, so that it is not doubled.

Local files are SuperGLUE jsonl; the nested ones (WSC `target`, MultiRC and ReCoRD `passage`) are
flattened to the hub's columns, so the hub (super_glue/<task>) and local files read alike.
"""

from __future__ import annotations

from adazeta.errors import DataError
from adazeta.tasks.base import Example, Task, drop_final_punct
from adazeta.tasks.loading import Rows

YES_NO = ((False, "0"), (True, "1"))  # class 0 = False/0 -> "No", class 1 = True/1 -> "Yes"


class BoolQ(Task):
    name = "boolq"
    text_fields = ("passage", "question")
    label_values = YES_NO
    label_words = ("No", "Yes")
    candidates = ("No", "Yes")
    aliases = {
        "passage": ("text_a",),
        "question": ("text_b",),
        "label": ("answer",),  # google/boolq calls the label `answer`
    }
    passage_field = "passage"

    def causal_prompt(self, ex: Example) -> str:
        question = ex.fields["question"]
        if not question.endswith("?"):
            question += "?"
        return f"{ex.fields['passage']} {question[:1].upper() + question[1:]}\n"

    def mlm_template(self, ex: Example, mask: str) -> str:
        # PET BoolQ pattern 0: passage, ". Question: ", question, "? Answer: ", mask, "."
        f = ex.fields
        return f"{drop_final_punct(f['passage'])}. Question: {drop_final_punct(f['question'])}? Answer:{mask}."


class WiC(Task):
    name = "wic"
    text_fields = ("sentence1", "sentence2", "word")
    label_values = YES_NO
    label_words = ("No", "Yes")
    candidates = ("No", "Yes")
    aliases = {"sentence1": ("text_a",), "sentence2": ("text_b",)}

    def classification_text(self, ex: Example) -> tuple[str, str | None]:
        return f"{ex.fields['word']}: {ex.fields['sentence1']}", ex.fields["sentence2"]

    def causal_prompt(self, ex: Example) -> str:
        f = ex.fields
        return (
            f'Does the word "{f["word"]}" have the same meaning in these two sentences? '
            f"Yes, No?\n{f['sentence1']}\n{f['sentence2']}\n"
        )

    def mlm_template(self, ex: Example, mask: str) -> str:
        # PET WiC pattern 1: sentence1, sentence2, "Does <word> have the same meaning in both
        # sentences?", mask
        f = ex.fields
        return (
            f"{f['sentence1']} {f['sentence2']} Does {f['word']} have the same meaning in both "
            f"sentences?{mask}"
        )


class WSC(Task):
    name = "wsc"
    text_fields = ("text", "span1_text", "span2_text")
    label_values = YES_NO
    label_words = ("No", "Yes")
    candidates = ("No", "Yes")
    passage_field = "text"

    def flatten(self, rows: Rows) -> Rows:
        # SuperGLUE jsonl nests the spans under `target`; the hub (wsc.fixed) has them flat.
        flat = [{**row.get("target", {}), **row} for row in rows.rows]
        return Rows(flat, rows.source, rows.kind, rows.places)

    def classification_text(self, ex: Example) -> tuple[str, str | None]:
        f = ex.fields
        return f["text"], f"{f['span2_text']} refers to {f['span1_text']}"

    def causal_prompt(self, ex: Example) -> str:
        f = ex.fields
        return (
            f'{f["text"]}\nIn the previous sentence, does the pronoun "{f["span2_text"].lower()}" '
            f"refer to {f['span1_text']}? Yes or No?\n"
        )

    def mlm_template(self, ex: Example, mask: str) -> str:
        # PET WSC pattern 0 ("<text> The pronoun '*<pronoun>*' refers to <masks>.") fills in the
        # referent; SuperGLUE's WSC is binary (does the pronoun refer to span1?), so the referent is
        # given and the mask answers No / Yes, as in PET's other yes/no patterns.
        f = ex.fields
        return f"{f['text']} The pronoun '{f['span2_text']}' refers to {f['span1_text']}?{mask}"


class MultiRC(Task):
    """One example per (paragraph, question, answer option): is this option correct? Scored by
    accuracy over answer options, as MeZO's code does."""

    name = "multirc"
    text_fields = ("paragraph", "question", "answer")
    label_values = YES_NO
    label_words = ("No", "Yes")
    candidates = ("No", "Yes")
    passage_field = "paragraph"

    def flatten(self, rows: Rows) -> Rows:
        if rows.kind == "hub" or (rows.rows and "paragraph" in rows.rows[0]):
            return rows
        flat, places = [], []
        for i, row in enumerate(rows.rows):
            passage = row.get("passage")
            if not isinstance(passage, dict) or "text" not in passage or "questions" not in passage:
                raise DataError(
                    f"{rows.where(i)}: missing field 'passage' with 'text' and 'questions' "
                    "(SuperGLUE MultiRC jsonl)"
                )
            for qi, q in enumerate(passage["questions"]):
                for ai, a in enumerate(q.get("answers", [])):
                    flat.append(
                        {
                            "paragraph": passage["text"],
                            "question": q.get("question"),
                            "answer": a.get("text"),
                            "label": a.get("label"),
                        }
                    )
                    places.append(f"{rows.where(i)}, question {qi + 1}, answer {ai + 1}")
        return Rows(flat, rows.source, rows.kind, places)

    def classification_text(self, ex: Example) -> tuple[str, str | None]:
        f = ex.fields
        return f["paragraph"], f"{f['question']} {f['answer']}"

    def causal_prompt(self, ex: Example) -> str:
        f = ex.fields
        return (
            f'{f["paragraph"]}\nQuestion: {f["question"]}\nI found this answer "{f["answer"]}". '
            "Is that correct? Yes or No?\n"
        )

    def mlm_template(self, ex: Example, mask: str) -> str:
        # PET MultiRC pattern 0: paragraph, ". Question: ", question, "? Is it ", answer, "?",
        # mask, "."
        f = ex.fields
        return (
            f"{drop_final_punct(f['paragraph'])}. Question: {drop_final_punct(f['question'])}? "
            f"Is it {drop_final_punct(f['answer'])}?{mask}."
        )


def copa_choice(text: str) -> str:
    """MeZO's COPA capitalisation: the first word in lower case, unless it is "I"."""
    words = text.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


class COPA(Task):
    """premise + " because"/" so", then each choice as a continuation; LM loss on the gold one."""

    name = "copa"
    text_fields = ("premise", "choice1", "choice2", "question")
    label_values = (0, 1)
    loss = "lm"

    def example(self, rows: Rows, index: int) -> Example | None:
        ex = super().example(rows, index)
        if ex.fields["question"] not in ("cause", "effect"):
            raise DataError(
                f"{rows.where(index)}: question {ex.fields['question']!r} in column "
                "'question' is not one of ['cause', 'effect']"
            )
        return Example(ex.fields, ex.label, candidates=(ex.fields["choice1"], ex.fields["choice2"]))

    @property
    def is_classification(self) -> bool:
        return False

    def causal_prompt(self, ex: Example) -> str:
        premise = ex.fields["premise"].rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        return premise + (" because" if ex.fields["question"] == "cause" else " so")

    def causal_candidates(self, ex: Example) -> tuple[str, ...]:
        return tuple(" " + copa_choice(c) for c in ex.candidates)


class ReCoRD(Task):
    """Cloze over the passage's entities (MeZO's GPT-3-style template): each entity fills the
    query's @placeholder; LM loss on the gold filling; correct if the best-scoring entity is any
    of the gold answers."""

    name = "record"
    text_fields = ("passage", "query")
    loss = "lm"
    passage_field = "passage"

    def flatten(self, rows: Rows) -> Rows:
        if rows.kind == "hub" or (rows.rows and "query" in rows.rows[0]):
            return rows
        flat, places = [], []
        for i, row in enumerate(rows.rows):
            passage = row.get("passage")
            if not isinstance(passage, dict) or "text" not in passage or "entities" not in passage:
                raise DataError(
                    f"{rows.where(i)}: missing field 'passage' with 'text' and 'entities' "
                    "(SuperGLUE ReCoRD jsonl)"
                )
            text = passage["text"]
            # Entity spans are inclusive of `end`; unique texts sorted, as on the hub.
            entities = sorted({text[e["start"] : e["end"] + 1] for e in passage["entities"]})
            for qi, qa in enumerate(row.get("qas", [])):
                answers = sorted({a["text"] for a in qa.get("answers", [])})
                flat.append(
                    {
                        "passage": text,
                        "query": qa.get("query"),
                        "entities": entities,
                        "answers": answers,
                    }
                )
                places.append(f"{rows.where(i)}, query {qi + 1}")
        return Rows(flat, rows.source, rows.kind, places)

    def example(self, rows: Rows, index: int) -> Example | None:
        fields = {f: str(self.col(rows, index, f)) for f in self.text_fields}
        entities = tuple(self.col(rows, index, "entities"))
        answers = tuple(self.col(rows, index, "answers"))
        gold = [entities.index(a) for a in answers if a in entities]
        if not gold:
            raise DataError(
                f"{rows.where(index)}: none of the answers {list(answers)} in field "
                f"'answers' is among the entities {list(entities)[:8]}"
            )
        if "@placeholder" not in fields["query"]:
            raise DataError(f"{rows.where(index)}: the query in field 'query' has no @placeholder")
        return Example(fields, gold[0], candidates=entities, answers=answers)

    def causal_prompt(self, ex: Example) -> str:
        return ex.fields["passage"].replace("@highlight\n", "- ") + "\n-"

    def causal_candidates(self, ex: Example) -> tuple[str, ...]:
        return tuple(" " + ex.fields["query"].replace("@placeholder", e) for e in ex.candidates)
