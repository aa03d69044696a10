"""Greedy generation for SQuAD and DROP (MeZO): at most the task's max_new_tokens, stopping at a
newline; the answer is the first line of the output."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList


def generate(model, tok: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor], max_new_tokens: int) -> list[str]:
    """Greedy generation from the batch's prompts (`gen_input_ids`, left-padded): the first line of
    each output, stripped."""
    ids, mask = batch["gen_input_ids"], batch["gen_attention_mask"]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tok.pad_token_id,
        stopping_criteria=StoppingCriteriaList([StopAtNewline(tok, ids.shape[1])]),
    )
    texts = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [first_line(t) for t in texts]


def first_line(text: str) -> str:
    """The answer in a generated text: up to the first newline, stripped (MeZO)."""
    return text.strip().split("\n")[0].strip()


class StopAtNewline(StoppingCriteria):
    """Stop each sequence once its generated text contains a newline."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_len: int):
        self.tok, self.start = tokenizer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tok.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)
