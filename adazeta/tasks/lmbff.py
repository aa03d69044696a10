"""Single-sentence LM-BFF tasks: SST-5 and MR (sentiment), TREC (question type).

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


# The hub's TREC lists coarse classes as ABBR, ENTY, DESC, HUM, LOC, NUM; LM-BFF's files number
# them DESC, ENTY, ABBR, HUM, LOC, NUM. Hub rows are renumbered to LM-BFF's order.
HUB_TREC_TO_LMBFF = {0: 2, 1: 1, 2: 0, 3: 3, 4: 4, 5: 5}


class TREC(Task):
    name = "trec"
    text_fields = ("sentence",)
    label_values = (0, 1, 2, 3, 4, 5)
    label_words = ("Description", "Entity", "Expression", "Human", "Location", "Number")
    aliases = {"sentence": ("text", "text_a")}
    passage_field = "sentence"
    csv_columns = ("label", "sentence")
    hub_splits = {"train": "train", "validation": "test"}  # trec

    def flatten(self, rows: Rows) -> Rows:
        if rows.kind != "hub":
            return rows
        flat = []
        for i, row in enumerate(rows.rows):
            coarse = row.get("coarse_label", row.get("label-coarse"))
            if coarse not in HUB_TREC_TO_LMBFF:
                raise DataError(f"{rows.where(i)}: coarse_label {coarse!r} is not one of 0..5")
            flat.append({"sentence": row.get("text"), "label": HUB_TREC_TO_LMBFF[coarse]})
        return Rows(flat, rows.source, rows.kind, [rows.where(i) for i in range(len(flat))])

    def mlm_template(self, ex: Example, mask: str) -> str:
        # LM-BFF `*cls**mask*:*+sent_0**sep+*`
        return f"{mask}: {ex.fields['sentence']}"
