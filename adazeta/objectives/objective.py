"""A task's objective on a model: how its examples become tensors, a loss and a metric, through
the encoder of the model's head (classification.py, masked_lm.py, causal_lm.py).

Inputs longer than `model.max_length` lose the end of the task's passage field (the template,
question and candidates stay whole); each truncated example is counted in `Objective.truncated`,
with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from adazeta.config import Head, ZOObjective
from adazeta.errors import ConfigError
from adazeta.objectives.causal_lm import CausalLMEncoder
from adazeta.objectives.classification import ClassificationEncoder
from adazeta.objectives.generation import generate
from adazeta.objectives.losses import BatchLoss, MetricLoss
from adazeta.objectives.masked_lm import MaskedLMEncoder
from adazeta.objectives.tokens import Row
from adazeta.tasks import Example, Task
from adazeta.tasks.metrics import exact_match, f1_score

log = logging.getLogger("adazeta.objectives")
# One encoder per head: encode(examples, train) -> tensors; logits(model, batch); kept_logits_bytes(model, batch).
ENCODERS = {Head.classification: ClassificationEncoder, Head.masked_lm: MaskedLMEncoder, Head.causal_lm: CausalLMEncoder}


@dataclass
class EvalBatch:
    """Encoded tensors of an evaluation batch and the examples they came from (for generation)."""

    tensors: dict[str, torch.Tensor]
    examples: list[Example]


class Objective:
    def __init__(self, task: Task, tokenizer: PreTrainedTokenizerBase, head: Head, max_length: int):
        self.task, self.tok, self.head, self.max_length = task, tokenizer, head, max_length
        self.truncated = 0  # examples whose text was cut to fit max_length (warned once)
        self.check_head()
        self.encoder = ENCODERS[head](self)

    @property
    def metric(self) -> str:
        """The dev metric that selects checkpoints: `accuracy`, or `f1` for SQuAD/DROP."""
        return self.task.metric

    def check_head(self) -> None:
        """Refuse a head the task cannot use, naming the heads it runs on (Task.heads)."""
        if self.head not in self.task.heads:
            raise ConfigError(self.task.head_error(self.head))

    # -- tokens --------------------------------------------------------------------------------
    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def note_truncated(self, n: int) -> None:
        if n and not self.truncated:
            log.warning(
                "task %s: inputs longer than model.max_length=%d are truncated from the passage "
                "side (counted in summary.json as data/truncated)",
                self.task.name,
                self.max_length,
            )
        self.truncated += n

    def fit(
        self, ex: Example, render: Callable[[Example], list[Row]], budget: int, keep_first: int = 0
    ) -> list[Row]:
        """render(ex) with the passage field cut from its end until the longest sequence fits the
        budget. If the rest of the template alone is too long, keep the first `keep_first` tokens
        (CLS) and the last ones of each sequence (where the question and the candidate are)."""
        out = render(ex)
        over = max(len(ids) for ids, _ in out) - budget
        if over <= 0:
            return out
        self.note_truncated(1)
        field = self.task.passage_field
        if field and ex.fields.get(field):
            text = ex.fields[field]
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=self.tok.is_fast)
            keep = len(enc.input_ids) - over
            while keep > 0:
                if self.tok.is_fast:
                    cut = text[: enc.offset_mapping[keep - 1][1]]
                else:
                    cut = self.tok.decode(enc.input_ids[:keep])
                out = render(replace(ex, fields={**ex.fields, field: cut.rstrip()}))
                over = max(len(ids) for ids, _ in out) - budget
                if over <= 0:
                    return out
                keep -= over
        return [
            (ids[:keep_first] + ids[len(ids) - budget + keep_first :], n)
            if len(ids) > budget
            else (ids, n)
            for ids, n in out
        ]

    # -- encoding and loss -----------------------------------------------------------------------
    def encode(self, examples: list[Example], train: bool = False) -> dict[str, torch.Tensor]:
        """Tensors of a batch. `train=True` encodes only the gold continuation of LM-loss tasks."""
        return self.encoder.encode(examples, train)

    def forward(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses (float32) and predicted classes (candidate indices)."""
        logits = self.encoder.logits(model, batch)
        if self.task.loss == "lm":  # minus the mean log-prob of the gold continuation's tokens
            losses = -logits.gather(1, batch["labels"].unsqueeze(1)).squeeze(1)
            return losses, logits.argmax(dim=-1)
        logits = logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction="none"), logits.argmax(dim=-1)

    def batch_loss(
        self, model, batch: dict[str, torch.Tensor], kind: ZOObjective = ZOObjective.loss,
        examples: list[Example] | None = None,
    ) -> BatchLoss | MetricLoss:
        """What `method.step` minimises on `batch`, as a callable: the training loss (`BatchLoss`),
        or with `kind=metric` minus the task metric of the batch (`MetricLoss`; `batch` then
        encoded as for evaluation, `encode(examples)`, and `examples` the batch's examples)."""
        if kind == ZOObjective.metric:
            return MetricLoss(self, model, batch, examples)
        return BatchLoss(self, model, batch)

    def replicate(self, batch: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
        """`batch` repeated r times along its first dimension, replica k in rows [k n, (k+1) n):
        every tensor of the batch is per row or per example, so `forward` on the result gives the
        r replicas' per-example losses one after another (the causal-LM encoder shifts its
        candidates' row and example indices to their replica's)."""
        out = {k: v.repeat(r, *([1] * (v.dim() - 1))) for k, v in batch.items()}
        if isinstance(self.encoder, CausalLMEncoder):
            self.encoder.replicate(batch, out, r)
        return out

    # -- evaluation -----------------------------------------------------------------------------
    def eval_batches(self, examples: list[Example], batch_size: int) -> list[EvalBatch]:
        """Encode an evaluation split once, in batches of similar length (less padding; the
        metrics are means, so the order does not matter)."""
        ordered = sorted(examples, key=lambda ex: sum(len(v) for v in ex.fields.values()))
        return [
            EvalBatch(self.encode(ordered[i : i + batch_size]), ordered[i : i + batch_size])
            for i in range(0, len(ordered), batch_size)
        ]

    @torch.no_grad()
    def evaluate(
        self, model, data: list[EvalBatch] | list[Example], device, batch_size: int = 16
    ) -> dict[str, float]:
        """Mean loss and the task's metrics: {"loss", "accuracy"}, or {"loss", "f1", "em"} for
        generation tasks (F1 and exact match in [0, 1], best over the gold answers)."""
        batches = (
            data if data and isinstance(data[0], EvalBatch) else self.eval_batches(data, batch_size)
        )
        loss_sum, n, scores = 0.0, 0, {m: 0.0 for m in self.task.metrics}
        for b in batches:
            t = {k: v.to(device) for k, v in b.tensors.items()}
            losses, preds = self.forward(model, t)
            loss_sum += float(losses.sum())
            n += len(losses)
            if self.task.generation:
                for text, ex in zip(self.generate(model, t), b.examples, strict=True):
                    scores["f1"] += f1_score(text, ex.answers)
                    scores["em"] += exact_match(text, ex.answers)
            else:
                scores["accuracy"] += float(self.correct(t, preds).sum())
        return {"loss": loss_sum / n, **{k: v / n for k, v in scores.items()}}

    @staticmethod
    def correct(batch: dict[str, torch.Tensor], preds: torch.Tensor) -> torch.Tensor:
        """1.0 where an example's prediction is right, else 0.0 (a per-example float tensor)."""
        if "gold" in batch:  # candidates scored by log-prob: gold[i, j] marks example i's right ones
            return batch["gold"].gather(1, preds.unsqueeze(1)).squeeze(1).float()
        return (preds == batch["labels"]).float()

    def generate(self, model, batch: dict[str, torch.Tensor]) -> list[str]:
        """Greedy generation from the batch's prompts (adazeta/objectives/generation.py)."""
        return generate(model, self.tok, batch, self.task.max_new_tokens)
