"""Sentence-pair entailment: RTE, MNLI, SNLI (GLUE; LM-BFF masked-LM template) and CB (SuperGLUE;
MeZO causal prompt). Class 0 is always entailment, whose word is "Yes".

Columns: premise/hypothesis (SuperGLUE jsonl and the hub), sentence1/sentence2 (GLUE tsv) or
text_a/text_b (prompt-learning exports); the label is `label`, or `gold_label` in the MNLI/SNLI tsv
files.
"""

from adazeta.tasks.base import Example, Task, drop_final_punct, lower_first


class NLITask(Task):
    text_fields = ("premise", "hypothesis")
    aliases = {
        "premise": ("sentence1", "text_a"),
        "hypothesis": ("sentence2", "text_b"),
        "label": ("gold_label",),
    }
    passage_field = "premise"

    def mlm_template(self, ex: Example, mask: str) -> str:
        # LM-BFF `*cls**sent-_0*?*mask*,*+sentl_1**sep+*`
        premise, hypothesis = ex.fields["premise"], ex.fields["hypothesis"]
        return f"{drop_final_punct(premise)}?{mask}, {lower_first(hypothesis)}"

    def causal_prompt(self, ex: Example) -> str:
        # MeZO's CB prompt (PromptSource); used for every three-way NLI task.
        premise, hypothesis = ex.fields["premise"], ex.fields["hypothesis"]
        return f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'


class RTE(NLITask):
    name = "rte"
    label_values = (("entailment", "0"), ("not_entailment", "1"))
    label_words = ("Yes", "No")
    candidates = ("Yes", "No")

    def causal_prompt(self, ex: Example) -> str:
        premise, hypothesis = ex.fields["premise"], ex.fields["hypothesis"]
        return f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'


class CB(NLITask):
    name = "cb"
    label_values = (("entailment", "0"), ("contradiction", "1"), ("neutral", "2"))
    label_words = ("Yes", "No", "Maybe")
    candidates = ("Yes", "No", "Maybe")


class MNLI(NLITask):
    name = "mnli"
    label_values = (("entailment", "0"), ("neutral", "1"), ("contradiction", "2"))
    label_words = ("Yes", "Maybe", "No")
    candidates = ("Yes", "Maybe", "No")
    skip_labels = ("-", "-1")
    split_stems = {"validation": ("dev_matched", "validation_matched")}
    hub_splits = {"train": "train", "validation": "validation_matched"}


class SNLI(MNLI):
    name = "snli"
    split_stems = {}
    hub_splits = {"train": "train", "validation": "validation"}
