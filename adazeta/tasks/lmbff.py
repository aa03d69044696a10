"""Single-sentence LM-BFF tasks: SST-5 and MR (sentiment), TREC (question type).

SST-5 and MR take SST-2's prompts. TREC's masked-LM template is LM-BFF's; MeZO has no TREC
prompt, so its causal prompt is written in the style of MeZO's SST-2 one (the input, then a short
phrase the candidate word completes): "<question> This question is about" -> " definition" /
" thing" / " abbreviation" / " person" / " place" / " number", each one token with its leading
space for SmolLM2's and GPT-2's tokenizers. Multi-token words lose under MeZO's mean log-prob
scoring: "Abbreviation" (3 tokens, the last two nearly certain after the first) won every example
of a 300-question sample of TREC's train set with PromptSource's TREC choices.

Their LM-BFF files are headerless csv (label, sentence), also read in the same layout as tsv
(label<TAB>sentence): train, and test which is the test set (LM-BFF evaluates on the original
test sets of these tasks).
"""

from adazeta.errors import DataError
from adazeta.tasks.base import Example, Task
from adazeta.tasks.loading import Rows
from adazeta.tasks.sst2 import SST2


class SST5(SST2):
    name = "sst5"
    label_values = (0, 1, 2, 3, 4)
    label_words = ("terrible", "bad", "okay", "good", "great")
    candidates = (" terrible", " bad", " okay", " good", " great")
    hub_splits = {"train": "train", "validation": "test"}  # SetFit/sst5
    builtin_file = None


class MR(SST2):
    name = "mr"
    hub_splits = {"train": "train", "validation": "test"}  # rotten_tomatoes
    builtin_file = None


# LM-BFF's TREC files number the coarse classes DESC, ENTY, ABBR, HUM, LOC, NUM. On the hub,
# SetFit/TREC-QC names each row's class in `label_coarse_original` (its `label` is the fine class,
# and its `label_coarse` integers follow first appearance in the source file), and the older
# script-based CogComp/trec numbers `coarse_label` ABBR, ENTY, DESC, HUM, LOC, NUM. Hub rows are
# read by class name, so either layout lands in LM-BFF's order.
LMBFF_TREC_CLASSES = ("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM")
COGCOMP_TREC_CLASSES = ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")


def hub_trec_class(row: dict) -> str | None:
    """The coarse class name of a hub TREC row (SetFit/TREC-QC or CogComp/trec), else None."""
    if "label_coarse_original" in row:
        return row["label_coarse_original"]
    coarse = row.get("coarse_label", row.get("label-coarse"))
    if isinstance(coarse, int) and 0 <= coarse < len(COGCOMP_TREC_CLASSES):
        return COGCOMP_TREC_CLASSES[coarse]
    return None


class TREC(Task):
    name = "trec"
    text_fields = ("sentence",)
    label_values = (0, 1, 2, 3, 4, 5)
    label_words = ("Description", "Entity", "Expression", "Human", "Location", "Number")
    candidates = (" definition", " thing", " abbreviation", " person", " place", " number")
    aliases = {"sentence": ("text", "text_a")}
    passage_field = "sentence"
    csv_columns = ("label", "sentence")
    hub_splits = {"train": "train", "validation": "test"}  # SetFit/TREC-QC

    def flatten(self, rows: Rows) -> Rows:
        if rows.kind != "hub":
            return rows
        flat = []
        for i, row in enumerate(rows.rows):
            name = hub_trec_class(row)
            if name not in LMBFF_TREC_CLASSES:
                raise DataError(
                    f"{rows.where(i)}: no coarse TREC class (label_coarse_original "
                    f"{row.get('label_coarse_original')!r}, coarse_label "
                    f"{row.get('coarse_label')!r}); expected one of {list(LMBFF_TREC_CLASSES)}"
                )
            flat.append({"sentence": row.get("text"), "label": LMBFF_TREC_CLASSES.index(name)})
        return Rows(flat, rows.source, rows.kind, [rows.where(i) for i in range(len(flat))])

    def mlm_template(self, ex: Example, mask: str) -> str:
        # LM-BFF `*cls**mask*:*+sent_0**sep+*`
        return f"{mask}: {ex.fields['sentence']}"

    def causal_prompt(self, ex: Example) -> str:
        # MeZO's SST-2 style ("<sentence> It was" -> " terrible" / " great"); see the module docstring
        return f"{ex.fields['sentence']} This question is about"
