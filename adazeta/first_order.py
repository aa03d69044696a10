"""The first-order references (method.optimizer=fo: ft, lora_fo, prefix_fo): backprop through
the loss and one AdamW step, over the same trainable sets as the ZO methods (sparse excepted: its
mask is Sparse-MeZO's perturbation). Registered as `fo`."""

from __future__ import annotations

import torch

from adazeta.config import MethodConfig, TrainableSet, ZOConfig
from adazeta.params import Trainable
from adazeta.step import CudaBuffer, Guard, LossFn, StepResult, Supports, register_step


class FOStep:
    """Backprop through the loss and one AdamW step (the first-order references)."""

    def __init__(
        self, model, trainables: list[Trainable], cfg: MethodConfig, seed: int, zo: ZOConfig, dist=None,
    ):
        # seed, zo and dist: the registry's one signature; backprop draws no query seeds and runs in
        # one process (torchrun is refused before the step is built).
        groups = [
            {"params": [t.param for t in trainables if t.decay], "weight_decay": cfg.weight_decay},
            {"params": [t.param for t in trainables if not t.decay], "weight_decay": 0.0},
        ]
        self.model = model
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = value

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """AdamW's state: its tensors as `opt.<param>.<name>`, the rest as JSON scalars."""
        sd = self.opt.state_dict()
        tensors, per_param = {}, {}
        for i, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{i}.{k}"] = v
                else:
                    per_param.setdefault(str(i), {})[k] = v
        return tensors, {"lr": self.lr, "param_groups": sd["param_groups"], "state": per_param}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        for i, st in scalars["state"].items():
            state.setdefault(int(i), {}).update(st)
        groups = [{**g, "betas": tuple(g["betas"])} for g in scalars["param_groups"]]
        self.opt.load_state_dict({"state": state, "param_groups": groups})

    def cuda_buffers(self, target_dtype: str, kept: set[int]) -> list[CudaBuffer]:
        """None: backprop's gradients, activations and AdamW's moments are allocated alike on both
        devices, so a CPU measurement holds them."""
        return []

    def __call__(self, loss_fn: LossFn, step: int, q: int, guard: Guard | None = None) -> StepResult:
        """One forward and backward; `guard` sees the loss before backward: a bad loss moves no weight."""
        self.model.train()  # dropout on, as in ordinary fine-tuning
        with torch.enable_grad():
            loss = loss_fn()
            if guard is not None:
                try:
                    guard(step, [float(loss.detach())], [])
                finally:
                    self.model.eval()
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.eval()
        return StepResult(float(loss.detach()), None, 1)


FO_SETS = (TrainableSet.full, TrainableSet.tt_adapter, TrainableSet.lora, TrainableSet.prefix)
SUPPORTS = Supports(
    trainable=FO_SETS,
    update_rules=None,  # AdamW: method.update_rule is a ZO key
    low_precision=FO_SETS,  # nothing is perturbed: AdamW writes bf16/fp16 weights as they are
    # train.replay_log: a first-order run keeps no log (the loop writes one for ZO methods only)
)
register_step("fo", FOStep, SUPPORTS)
