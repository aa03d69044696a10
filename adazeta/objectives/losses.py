"""What a ZO step calls as its loss: the training loss of one batch (`BatchLoss`, also batched
over replicas for parallel queries), or minus the task metric of the batch (`MetricLoss`)."""

from __future__ import annotations

import torch

from adazeta.tasks import Example
from adazeta.tasks.metrics import f1_score


class MetricLoss:
    """Minus the task metric of one batch, as a ZO step's loss (`method.objective=metric`; MeZO's
    --non_diff, arXiv 2305.17333 section 3.3): the accuracy of the model's predictions, or for
    SQuAD/DROP the mean F1 of its greedy generations against the gold answers. SPSA needs only the
    value at theta +/- eps z, so a metric without a gradient can be optimised directly.

    The value moves in steps of 1/batch (accuracy) or by whole changed answers (F1): a query whose
    two perturbed models answer alike estimates a zero gradient, and the step does not move."""

    def __init__(self, objective, model, batch: dict[str, torch.Tensor], examples: list[Example] | None):
        if objective.task.generation and examples is None:
            raise ValueError("MetricLoss of a generation task needs the batch's examples (their gold answers)")
        self.objective, self.model, self.batch, self.examples = objective, model, batch, examples

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        task = self.objective.task
        if task.generation:
            texts = self.objective.generate(self.model, self.batch)
            f1 = [f1_score(text, ex.answers) for text, ex in zip(texts, self.examples, strict=True)]
            return -torch.tensor(sum(f1) / len(f1), device=self.batch["input_ids"].device)
        _, preds = self.objective.forward(self.model, self.batch)
        return -self.objective.correct(self.batch, preds).mean()


class BatchLoss:
    """The loss of one training batch, as the ZO estimators call it.

    `loss()` is the mean per-example loss at the model's current weights (what every method
    uses); `loss.replicated(r)` evaluates the batch repeated r times in one forward and returns
    the r per-replica mean losses, for an estimator that gives each replica its own perturbed
    weights (`adazeta.zo.parallel`). Replicated batches are built once per r and kept for the step.
    """

    def __init__(self, objective, model, batch: dict[str, torch.Tensor]):
        self.objective, self.model, self.batch = objective, model, batch
        self._replicas: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self) -> torch.Tensor:
        return self.objective.forward(self.model, self.batch)[0].mean()

    def replicated(self, r: int) -> torch.Tensor:
        if r not in self._replicas:
            self._replicas[r] = self.objective.replicate(self.batch, r)
        losses = self.objective.forward(self.model, self._replicas[r])[0]
        return losses.view(r, -1).mean(1)

    def replica_tokens(self) -> int:
        """Tokens one replica of the batch adds to a forward (rows x padded length)."""
        return self.batch["input_ids"].numel()

    def replica_bytes(self) -> int:
        """A rough upper estimate of the activation memory one more replica adds to a no-grad
        forward: per token a few hidden-sized tensors, the MLP's intermediate ones and one row of
        eager attention scores per head; plus the fp32 logits the head keeps (all positions for
        a masked LM, the candidates' positions and their log-softmax for a causal LM)."""
        config = getattr(self.model, "config", None)
        hidden = getattr(config, "hidden_size", 1024)
        inter = getattr(config, "intermediate_size", None) or 4 * hidden
        heads = getattr(config, "num_attention_heads", 16)
        rows, length = self.batch["input_ids"].shape
        total = rows * length * (6 * hidden + 2 * inter + heads * length) * 4
        return int(total + self.objective.encoder.kept_logits_bytes(self.model, self.batch))
