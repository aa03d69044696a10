"""The causal-LM head (MeZO on OPT/Llama): one sequence per candidate continuation, each scored by
the mean log-prob of its own tokens; the prediction is the best-scoring one. Classification tasks
train with cross-entropy over the candidate scores; COPA, ReCoRD, SQuAD and DROP with the LM loss on
the gold continuation (minus its mean token log-prob), and at training time encode only that one
(`encode(..., train=True)`).

A prompt and its continuation are tokenised together (as MeZO does), and the continuation's tokens
are those after the prompt's own tokens, so that tokenisers which merge across the boundary or
add a word-start marker score the same tokens a model sees when it reads the whole text."""

from __future__ import annotations

import torch

from adazeta.errors import ConfigError
from adazeta.objectives.tokens import Row, accepts, pad
from adazeta.tasks import Example


class CausalLMEncoder:
    """Examples -> candidate rows after the task's prompt; a batch -> candidate scores."""

    def __init__(self, objective):
        self.objective, self.task, self.tok = objective, objective.task, objective.tok
        self.fit, self.ids = objective.fit, objective.ids
        self.prefix = self.bos_prefix()

    @property
    def max_length(self) -> int:
        """The objective's: a caller may change it after the encoder is built (adazeta-bench does)."""
        return self.objective.max_length

    def bos_prefix(self) -> list[int]:
        """BOS only if the tokenizer adds one by itself (Llama, OPT); never a trailing EOS/SEP."""
        ids = self.tok("a").input_ids
        plain = self.tok("a", add_special_tokens=False).input_ids
        return ids[: len(ids) - len(plain)] if ids[-len(plain) :] == plain else []

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

    def encode(self, examples: list[Example], train: bool = False) -> dict[str, torch.Tensor]:
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

    def logits(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the objective takes as logits: the candidate scores (for an LM-loss task, the gold
        continuation's score, at its label 0)."""
        return self.candidate_scores(model, batch)

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

    def replicate(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], r: int) -> None:
        """Shift the candidate row indices of `out` (the batch repeated r times) to their replica's
        rows, and candidates' example indices to their replica's examples."""
        for key, per in (("cand_row", batch["input_ids"].shape[0]), ("cand_example", batch["gold"].shape[0])):
            offsets = per * torch.arange(r, device=batch[key].device).unsqueeze(1)
            out[key] = (batch[key].unsqueeze(0) + offsets).flatten()

    def kept_logits_bytes(self, model, batch: dict[str, torch.Tensor]) -> int:
        """The fp32 logits one replica of the batch keeps: the candidates' positions, and their log-softmax."""
        rows = batch["input_ids"].shape[0]
        return rows * batch["cand_own"].shape[1] * getattr(getattr(model, "config", None), "vocab_size", 0) * 4 * 2
