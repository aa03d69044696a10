"""SST-2: binary sentiment (GLUE). Prompts from LM-BFF (masked LM) and MeZO (causal LM)."""

from adazeta.tasks.base import Example, Task


class SST2(Task):
    name = "sst2"
    text_fields = ("sentence",)
    label_values = (0, 1)
    label_words = ("terrible", "great")
    candidates = (" terrible", " great")
    aliases = {"sentence": ("text", "text_a")}
    passage_field = "sentence"
    csv_columns = ("label", "sentence")  # LM-BFF csv layout, if given as csv
    builtin_file = "sentiment_sample.tsv"

    def mlm_template(self, ex: Example, mask: str) -> str:
        # LM-BFF `*cls**sent_0*_It_was*mask*.*sep+*`: no space around the mask, whose label words
        # carry the space themselves (RoBERTa "Ġgreat").
        return f"{ex.fields['sentence']} It was{mask}."

    def causal_prompt(self, ex: Example) -> str:
        return f"{ex.fields['sentence']} It was"
