"""How a task's examples become tensors, a loss and a metric, for each kind of head.

- classification (classification.py): an encoder with a sequence-classification head;
  cross-entropy on its logits.
- masked_lm (masked_lm.py; LM-BFF, MeZO on RoBERTa): logits at the mask position over the label words.
- causal_lm (causal_lm.py; MeZO on OPT/Llama): one sequence per candidate continuation, each scored
  by the mean log-prob of its own tokens; SQuAD and DROP are evaluated by greedy generation
  (generation.py).

`Objective` (objective.py) holds what every head shares: the task, truncation to
`model.max_length`, the loss and the evaluation; losses.py the callables a ZO step minimises."""

from adazeta.objectives.generation import first_line
from adazeta.objectives.losses import BatchLoss, MetricLoss
from adazeta.objectives.objective import EvalBatch, Objective

__all__ = ["BatchLoss", "EvalBatch", "MetricLoss", "Objective", "first_line"]
