"""The classification head: the task's text (and second segment) into an encoder with a
sequence-classification head; cross-entropy on its logits."""

from __future__ import annotations

import torch

from adazeta.tasks import Example


class ClassificationEncoder:
    """Examples -> tokenised text pairs and labels; a batch -> the head's logits."""

    def __init__(self, objective):
        self.objective, self.task, self.tok = objective, objective.task, objective.tok
        self.note_truncated = objective.note_truncated

    @property
    def max_length(self) -> int:
        """The objective's: a caller may change it after the encoder is built (adazeta-bench does)."""
        return self.objective.max_length

    def encode(self, examples: list[Example], train: bool = False) -> dict[str, torch.Tensor]:
        labels = torch.tensor([ex.label for ex in examples])
        texts = [self.task.classification_text(ex) for ex in examples]
        firsts, seconds = [t[0] for t in texts], [t[1] for t in texts]
        pair = seconds[0] is not None
        full = self.tok(firsts, seconds if pair else None, truncation=False).input_ids
        self.note_truncated(sum(len(ids) > self.max_length for ids in full))
        enc = self.tok(  # the pair is (passage, question): "only_first" cuts the passage
            firsts,
            seconds if pair else None,
            truncation="only_first" if pair else True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        batch = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": labels,
        }
        if pair and "token_type_ids" in enc:  # BERT-style segment ids of the second text
            batch["token_type_ids"] = enc["token_type_ids"]
        return batch

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        segments = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **segments).logits

    def kept_logits_bytes(self, model, batch: dict[str, torch.Tensor]) -> int:
        """The fp32 logits one replica of the batch keeps beyond the model's activations: none to speak of."""
        return 0
