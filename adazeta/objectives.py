"""How a task's examples become tensors, a loss and a metric, for each kind of head.

- classification: an encoder with a sequence-classification head; cross-entropy on its logits.
- masked_lm (LM-BFF / MeZO RoBERTa): logits at the mask position over the label words.
- causal_lm (MeZO OPT/Llama): one sequence per candidate continuation, each scored by the mean
  log-prob of its own tokens; the prediction is the best-scoring one. Classification tasks train
  with cross-entropy over the candidate scores; COPA, ReCoRD, SQuAD and DROP with the LM loss on
  the gold continuation (minus its mean token log-prob), and at training time encode only that
  one (`encode(..., train=True)`). SQuAD and DROP are evaluated by greedy generation.

A prompt and its continuation are tokenised together (as MeZO does), and the continuation's tokens
are those after the prompt's own tokens, so that tokenisers which merge across the boundary or
add a word-start marker score the same tokens a model sees when it reads the whole text.

Inputs longer than `model.max_length` lose the end of the task's passage field (the template,
question and candidates stay whole); each truncated example is counted in `Objective.truncated`,
with one warning.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from adazeta.config import Head, ZOObjective
from adazeta.errors import ConfigError
from adazeta.tasks import Example, Task
from adazeta.tasks.metrics import exact_match, f1_score

log = logging.getLogger(__name__)
Row = tuple[list[int], int]  # token ids, and how many of the last ones are the continuation


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
        if head == Head.masked_lm:
            self.label_ids = [self.single_token(" " + w, w) for w in task.label_words]
        if head == Head.causal_lm:
            self.prefix = self.bos_prefix()

    @property
    def metric(self) -> str:
        """The dev metric that selects checkpoints: `accuracy`, or `f1` for SQuAD/DROP."""
        return self.task.metric

    def check_head(self) -> None:
        """Refuse a head the task cannot use, naming the heads it runs on (Task.heads)."""
        if self.head not in self.task.heads:
            raise ConfigError(self.task.head_error(self.head))

    # -- tokens --------------------------------------------------------------------------------
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
        return ids[: len(ids) - len(plain)] if ids[-len(plain) :] == plain else []

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

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, examples: list[Example], train: bool = False) -> dict[str, torch.Tensor]:
        """Tensors of a batch. `train=True` encodes only the gold continuation of LM-loss tasks."""
        labels = torch.tensor([ex.label for ex in examples])
        if self.head == Head.classification:
            return self.encode_classification(examples, labels)
        if self.head == Head.masked_lm:
            return self.encode_mlm(examples, labels)
        return self.encode_causal(examples, train)

    def encode_classification(
        self, examples: list[Example], labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
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

    def encode_mlm(self, examples: list[Example], labels: torch.Tensor) -> dict[str, torch.Tensor]:
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

    def continuation_rows(self, ex: Example, continuations: tuple[str, ...]) -> list[Row]:
        """(prompt + continuation tokenised together, the number of continuation tokens: those
        after the prompt's own) for each continuation."""
        prompt = self.task.causal_prompt(ex)
        p_ids = self.ids(prompt)
        rows = []
        for cont in continuations:
            full = self.ids(prompt + cont)
            n = 0
            while n < min(len(p_ids), len(full) - 1) and p_ids[n] == full[n]:
                n += 1
            rows.append((full, len(full) - n))
        return rows

    def encode_causal(self, examples: list[Example], train: bool) -> dict[str, torch.Tensor]:
        """Each candidate is a row (prompt + its tokens but the last) and its last token: the row's
        final positions predict the candidate's tokens. Rows equal within an example are shared, so
        single-token candidates after the same prompt (" great"/" terrible", Yes/No) cost one row."""
        task = self.task
        budget = self.max_length - len(self.prefix)
        rows, cand_row, cand_lens, cand_last, n_cands, labels, golds, gens = (
            [],
            [],
            [],
            [],
            [],
            [],
            [],
            [],
        )
        for ex in examples:
            if task.generation or (train and task.loss == "lm"):
                conts, label, gold = (task.gold_continuation(ex),), 0, [True]
            else:
                conts, label = task.causal_candidates(ex), ex.label
                gold = (
                    [c in ex.answers for c in ex.candidates]
                    if ex.answers
                    else [i == ex.label for i in range(len(conts))]
                )
            mine: dict[tuple[int, ...], int] = {}
            for ids, n in self.fit(ex, lambda e, c=conts: self.continuation_rows(e, c), budget):
                full = self.prefix + ids
                row = tuple(full[:-1])
                if row not in mine:
                    mine[row] = len(rows)
                    rows.append(list(row))
                cand_row.append(mine[row])
                cand_lens.append(min(n, len(full) - 1))
                cand_last.append(full[-1])
            n_cands.append(len(conts))
            labels.append(label)
            golds.append(gold)
            if task.generation and not train:
                gen_budget = self.max_length - task.max_new_tokens - len(self.prefix)
                if gen_budget <= 0:
                    raise ConfigError(
                        f"model.max_length={self.max_length} leaves no room for a prompt "
                        f"and {task.max_new_tokens} generated tokens; raise it"
                    )
                prompt = self.fit(ex, lambda e: [(self.ids(task.causal_prompt(e)), 0)], gen_budget)[
                    0
                ][0]
                gens.append(self.prefix + prompt)
        # Left padding puts every candidate's tokens at the end, so only the last few positions'
        # logits are needed (logits_to_keep), not a batch x length x vocab tensor.
        input_ids, attention = pad(rows, self.tok.pad_token_id, left=True)
        gold = torch.zeros((len(examples), max(n_cands)), dtype=torch.bool)
        for i, g in enumerate(golds):
            gold[i, : len(g)] = torch.tensor(g)
        # Everything whose size depends on the data is sized here, on the host, once per batch:
        # `candidate_scores` then runs without a host sync (on a GPU, int(t.max()) or a
        # repeat_interleave without output_size stalls every forward). `keep` = the longest
        # candidate, read from these tensors' shapes, never from their values.
        keep = max(cand_lens)
        rows_t, lens_t = torch.tensor(cand_row), torch.tensor(cand_lens)
        tail = input_ids[rows_t, input_ids.shape[1] - keep + 1 :] if keep > 1 else input_ids[rows_t, :0]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "cand_row": rows_t,
            "cand_lens": lens_t,
            "cand_last": torch.tensor(cand_last),
            "n_cands": torch.tensor(n_cands),
            "labels": torch.tensor(labels),
            "gold": gold,
            # Candidate c's tokens: the last cand_lens[c] - 1 tokens of its row, then cand_last[c];
            # position j of the kept logits predicts target j.
            "cand_targets": torch.cat([tail, torch.tensor(cand_last).unsqueeze(1)], dim=1),  # (C, keep)
            "cand_own": torch.arange(keep) >= (keep - lens_t).unsqueeze(1),  # (C, keep): c's positions
            "cand_example": torch.tensor([i for i, n in enumerate(n_cands) for _ in range(n)]),
            "cand_slot": torch.tensor([k for n in n_cands for k in range(n)]),
        }
        if gens:
            batch["gen_input_ids"], batch["gen_attention_mask"] = pad(
                gens, self.tok.pad_token_id, left=True
            )
        return batch

    # -- loss -----------------------------------------------------------------------------------
    def forward(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses (float32) and predicted classes (candidate indices)."""
        if self.head == Head.classification:
            segments = (
                {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
            )
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **segments
            ).logits
        elif self.head == Head.masked_lm:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            at_mask = out[torch.arange(out.shape[0], device=out.device), batch["mask_pos"]]
            logits = at_mask[:, self.label_ids]
        else:
            scores = self.candidate_scores(model, batch)
            if self.task.loss == "lm":  # minus the mean log-prob of the gold continuation's tokens
                losses = -scores.gather(1, batch["labels"].unsqueeze(1)).squeeze(1)
                return losses, scores.argmax(dim=-1)
            logits = scores
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
        r replicas' per-example losses one after another. Candidate row indices (causal LM) are
        shifted to their replica's rows, and candidates' example indices to their replica's examples."""
        out = {k: v.repeat(r, *([1] * (v.dim() - 1))) for k, v in batch.items()}
        if "cand_row" in batch:
            for key, per in (("cand_row", batch["input_ids"].shape[0]), ("cand_example", batch["gold"].shape[0])):
                offsets = per * torch.arange(r, device=batch[key].device).unsqueeze(1)
                out[key] = (batch[key].unsqueeze(0) + offsets).flatten()
        return out

    def candidate_scores(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean log-prob of each candidate's own tokens: a (batch, max candidates) tensor, -inf
        where an example has fewer candidates than the widest one. No host sync: the sizes come
        from the shapes of tensors `encode` built (`cand_own`, `gold`)."""
        keep = batch["cand_own"].shape[1]
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if accepts(
            model, "position_ids"
        ):  # left padding: positions count from the first real token
            kwargs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        if accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = keep
        if accepts(model, "use_cache"):  # a scoring forward: no key/value cache to keep
            kwargs["use_cache"] = False
        logp = torch.log_softmax(
            model(**kwargs).logits[:, -keep:].float(), dim=-1
        )  # (rows, keep, V)
        rows, targets, own = batch["cand_row"], batch["cand_targets"], batch["cand_own"]
        steps = torch.arange(keep, device=logp.device)
        token_logp = logp[rows.unsqueeze(1), steps, targets]  # (candidates, keep)
        cand_scores = (token_logp * own).sum(-1) / batch["cand_lens"]
        scores = torch.full(batch["gold"].shape, float("-inf"), device=logp.device)
        scores[batch["cand_example"], batch["cand_slot"]] = cand_scores
        return scores

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
        """Greedy generation from the batch's prompts: at most task.max_new_tokens tokens, stopping
        at a newline (MeZO); returns the first line of each output, stripped."""
        ids, mask = batch["gen_input_ids"], batch["gen_attention_mask"]
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.task.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tok.pad_token_id,
            stopping_criteria=StoppingCriteriaList([StopAtNewline(self.tok, ids.shape[1])]),
        )
        texts = self.tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return [first_line(t) for t in texts]


class MetricLoss:
    """Minus the task metric of one batch, as a ZO step's loss (`method.objective=metric`; MeZO's
    --non_diff, arXiv 2305.17333 section 3.3): the accuracy of the model's predictions, or for
    SQuAD/DROP the mean F1 of its greedy generations against the gold answers. SPSA needs only the
    value at theta +/- eps z, so a metric without a gradient can be optimised directly.

    The value moves in steps of 1/batch (accuracy) or by whole changed answers (F1): a query whose
    two perturbed models answer alike estimates a zero gradient, and the step does not move."""

    def __init__(self, objective: Objective, model, batch: dict[str, torch.Tensor], examples: list[Example] | None):
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

    def __init__(self, objective: Objective, model, batch: dict[str, torch.Tensor]):
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
        vocab = getattr(config, "vocab_size", 0)
        rows, length = self.batch["input_ids"].shape
        total = rows * length * (6 * hidden + 2 * inter + heads * length) * 4
        if self.objective.head == Head.masked_lm:
            total += rows * length * vocab * 4
        elif self.objective.head == Head.causal_lm:
            total += rows * self.batch["cand_own"].shape[1] * vocab * 4 * 2
        return int(total)


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


def pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


_ACCEPTS: dict[tuple[type, type, str], bool] = {}


def accepts(model, arg: str) -> bool:
    """Whether the model's forward names `arg`. A peft wrapper's forward passes its **kwargs on
    to the model it wraps, so that model's signature is the one that counts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = (type(model), type(base), arg)
    if key not in _ACCEPTS:
        _ACCEPTS[key] = arg in inspect.signature(base.forward).parameters
    return _ACCEPTS[key]
