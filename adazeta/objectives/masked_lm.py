"""The masked-LM head (LM-BFF; MeZO on RoBERTa): the task's template with one mask token, and the
logits at the mask over the task's label words."""

from __future__ import annotations

import torch

from adazeta.errors import ConfigError
from adazeta.objectives.tokens import pad
from adazeta.tasks import Example


class MaskedLMEncoder:
    """Examples -> templates with the mask token; a batch -> logits at the mask over the label words."""

    def __init__(self, objective):
        self.objective, self.task, self.tok, self.fit = objective, objective.task, objective.tok, objective.fit
        self.label_ids = [self.single_token(" " + w, w) for w in self.task.label_words]

    @property
    def max_length(self) -> int:
        """The objective's: a caller may change it after the encoder is built (adazeta-bench does)."""
        return self.objective.max_length

    def single_token(self, spaced: str, word: str) -> int:
        """The vocabulary id of a label word (RoBERTa BPE wants the leading space)."""
        for text in (spaced, word):
            ids = self.tok(text, add_special_tokens=False).input_ids
            if len(ids) == 1:
                return ids[0]
        raise ConfigError(
            f"label word {word!r} of task {self.task.name} is not one token for this tokenizer; "
            "masked-LM prompting needs single-token label words"
        )

    def encode(self, examples: list[Example], train: bool = False) -> dict[str, torch.Tensor]:
        labels = torch.tensor([ex.label for ex in examples])
        mask = self.tok.mask_token
        rows = [
            self.fit(
                ex,
                lambda e: [(self.tok(self.task.mlm_template(e, mask)).input_ids, 0)],
                self.max_length,
                keep_first=1,
            )[0][0]
            for ex in examples
        ]
        input_ids, attention = pad(rows, self.tok.pad_token_id, left=False)
        mask_pos = (input_ids == self.tok.mask_token_id).int().argmax(dim=1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "mask_pos": mask_pos,
            "labels": labels,
        }

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        at_mask = out[torch.arange(out.shape[0], device=out.device), batch["mask_pos"]]
        return at_mask[:, self.label_ids]

    def kept_logits_bytes(self, model, batch: dict[str, torch.Tensor]) -> int:
        """The fp32 logits one replica of the batch keeps: every position's, over the vocabulary."""
        rows, length = batch["input_ids"].shape
        return rows * length * getattr(getattr(model, "config", None), "vocab_size", 0) * 4
