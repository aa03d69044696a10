"""SST-2: binary sentiment (GLUE). Prompts from LM-BFF (masked LM) and MeZO (causal LM)."""

from adazeta.tasks.base import Example, Task


class SST2(Task):
    name = "sst2"
    text_fields = ("sentence",)
    label_values = (0, 1)
    label_words = ("terrible", "great")
    candidates = (" terrible", " great")
    builtin_file = "sentiment_sample.tsv"

    def mlm_template(self, ex: Example, mask: str) -> str:
        return f"{ex.fields['sentence']} It was {mask} ."

    def causal_prompt(self, ex: Example) -> str:
        return f"{ex.fields['sentence']} It was"
