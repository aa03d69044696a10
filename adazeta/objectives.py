"""How a task's examples become tensors and a loss, for each kind of head.

- classification: an encoder with a sequence-classification head; cross-entropy on its logits.
- masked_lm (LM-BFF / MeZO RoBERTa): logits at the mask position over the label words.
- causal_lm (MeZO OPT/Llama): one sequence per candidate, each scored by the mean log-prob of its
  own tokens; cross-entropy over the candidate scores; the prediction is the best-scoring one.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from adazeta.config import Head
from adazeta.errors import ConfigError
from adazeta.tasks import Example, Task

log = logging.getLogger(__name__)


class Objective:
    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, head: Head, max_length: int):
        self.task, self.tok, self.head, self.max_length = task, tokenizer, head, max_length
        self.truncated = 0  # examples whose text was cut to fit max_length (warned once)
        if head == Head.masked_lm:
            self.label_ids = [self.single_token(" " + w, w) for w in task.label_words]
        if head == Head.causal_lm:
            self.prefix = self.bos_prefix()
            self.cand_ids = [tokenizer(c, add_special_tokens=False).input_ids for c in task.candidates]

    # -- encoding ------------------------------------------------------------------------------
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

    def bos_prefix(self) -> list[int]:
        """BOS only if the tokenizer adds one by itself (Llama, OPT); never a trailing EOS/SEP."""
        ids = self.tok("a").input_ids
        plain = self.tok("a", add_special_tokens=False).input_ids
        return ids[: len(ids) - len(plain)] if ids[-len(plain):] == plain else []

    def fit(self, ids: list[int], budget: int) -> list[int]:
        """Cut the passage's tokens from its end so the whole input fits max_length."""
        if len(ids) <= budget:
            return ids
        self.note_truncated(1)
        return ids[: max(budget, 0)]

    def note_truncated(self, n: int) -> None:
        if n and not self.truncated:
            log.warning(
                "task %s: inputs longer than model.max_length=%d are truncated from the passage "
                "side (counted in summary.json as data/truncated)", self.task.name, self.max_length,
            )
        self.truncated += n

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([ex.label for ex in examples])
        if self.head == Head.classification:
            texts = [self.task.classification_text(ex) for ex in examples]
            firsts, seconds = [t[0] for t in texts], [t[1] for t in texts]
            enc = self.tok(
                firsts, seconds if any(s is not None for s in seconds) else None,
                truncation="only_first" if seconds[0] is not None else True,
                max_length=self.max_length, padding=True, return_tensors="pt",
            )
            self.note_truncated(int((enc["attention_mask"].sum(-1) >= self.max_length).sum()))
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
        if self.head == Head.masked_lm:
            return self.encode_mlm(examples, labels)
        return self.encode_causal(examples, labels)

    def encode_mlm(self, examples: list[Example], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = []
        for ex in examples:
            text = self.task.mlm_template(ex, self.tok.mask_token)
            ids = self.tok(text).input_ids
            if len(ids) > self.max_length:  # drop passage tokens, keep the template and the mask
                mask_at = ids.index(self.tok.mask_token_id)
                keep_tail = len(ids) - mask_at + 2
                ids = self.fit(ids[:-keep_tail], self.max_length - keep_tail) + ids[-keep_tail:]
            rows.append(ids)
        input_ids, attention = pad(rows, self.tok.pad_token_id, left=False)
        mask_pos = (input_ids == self.tok.mask_token_id).int().argmax(dim=1)
        return {"input_ids": input_ids, "attention_mask": attention, "mask_pos": mask_pos, "labels": labels}

    def encode_causal(self, examples: list[Example], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        rows, cand_lens = [], []
        longest = max(len(c) for c in self.cand_ids)
        for ex in examples:
            prompt = self.tok(self.task.causal_prompt(ex), add_special_tokens=False).input_ids
            prompt = self.fit(prompt, self.max_length - len(self.prefix) - longest)
            for cand in self.cand_ids:
                rows.append(self.prefix + prompt + cand)
                cand_lens.append(len(cand))
        # Left padding puts every candidate's tokens at the end, so only the last few positions'
        # logits are needed (logits_to_keep), not a batch x length x vocab tensor.
        input_ids, attention = pad(rows, self.tok.pad_token_id, left=True)
        return {
            "input_ids": input_ids, "attention_mask": attention,
            "cand_lens": torch.tensor(cand_lens), "labels": labels,
        }

    # -- loss -----------------------------------------------------------------------------------
    def forward(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses (float32) and predicted classes."""
        if self.head == Head.classification:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        elif self.head == Head.masked_lm:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            at_mask = out[torch.arange(out.shape[0], device=out.device), batch["mask_pos"]]
            logits = at_mask[:, self.label_ids]
        else:
            logits = self.candidate_scores(model, batch)
        logits = logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction="none"), logits.argmax(dim=-1)

    def candidate_scores(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean log-prob of each candidate's own tokens: a (batch, num_candidates) tensor."""
        keep = int(batch["cand_lens"].max()) + 1
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if accepts(model, "position_ids"):  # left padding: positions count from the first real token
            kwargs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = keep
        logits = model(**kwargs).logits[:, -keep:].float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = batch["input_ids"][:, -(keep - 1):]
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (rows, keep - 1)
        steps = torch.arange(keep - 1, device=token_logp.device)
        own = steps >= (keep - 1 - batch["cand_lens"]).unsqueeze(1)  # the candidate's positions
        scores = (token_logp * own).sum(-1) / batch["cand_lens"]
        return scores.view(-1, self.task.num_labels)


def pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


_ACCEPTS: dict[tuple[type, str], bool] = {}


def accepts(model, arg: str) -> bool:
    key = (type(model), arg)
    if key not in _ACCEPTS:
        _ACCEPTS[key] = arg in inspect.signature(model.forward).parameters
    return _ACCEPTS[key]
