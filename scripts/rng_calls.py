"""RNG calls (normal_ launches) per pass over the trainables, for AdaZeta on the Llama-2-7B
architecture: per tensor (before) and per group (after). A model of 1 and 2
layers built from conf/model/llama2-7b.yaml's config with uninitialised base weights (built on the
meta device, then given memory: SPSA never reads them) and real TT adapters, vocabulary cut to 256
(the adapters do not see it), extrapolated linearly to its 32 layers. Seconds on one CPU core.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/rng_calls.py

"CUDA" counts are what a CUDA device launches (z drawn whole per tensor or group: `chunks_exact`
is false there); "CPU" counts include the cache-sized chunks CPU passes draw large groups in.
"""

from __future__ import annotations

from unittest import mock

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from adazeta.config import Head, compose_config
from adazeta.trainable.sets import make_trainable
from adazeta.zo import spsa as zo
from adazeta.zo.spsa import SPSA


def count(spsa: SPSA) -> int:
    calls = 0
    original = torch.Tensor.normal_

    def normal_(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "normal_", normal_):
        spsa.perturb(12345, 1.0)
    spsa.restore()
    return calls


def measure(layers: int) -> dict[str, int]:
    cfg = compose_config(["model=llama2-7b", "method=adazeta"])
    arch = {k: v for k, v in dict(cfg.model.arch).items() if k not in ("model_type", "architectures")}
    arch.update(num_hidden_layers=layers, vocab_size=256)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**arch), dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    model, trainables = make_trainable(model, cfg.method, cfg.adapter, Head.causal_lm)
    out = {"tensors": len(trainables), "values": sum(t.param.numel() for t in trainables)}
    for device_rule in ("CPU", "CUDA"):
        exact = zo.chunks_exact if device_rule == "CPU" else (lambda *_: False)
        with mock.patch.object(zo, "chunks_exact", exact):
            out[f"before {device_rule}"] = count(SPSA(trainables, 1e-3, workers=1))
            grouped = SPSA(trainables, 1e-3, workers=1, group=True)
            out[f"after {device_rule}"] = count(grouped)
            out["groups"] = len(grouped.units)
            out["group sizes"] = [u.param.numel() for u in grouped.units]
    return out


def main() -> None:
    one, two = measure(1), measure(2)
    print("AdaZeta (TT adapters, rank 5, bottleneck 64, FFN placement) on the Llama-2-7B architecture:")
    print(f"{'':14} {'1 layer':>8} {'2 layers':>9} {'32 layers (extrapolated)':>25}")
    for key in one:
        if key == "group sizes":
            continue
        at32 = one[key] + 31 * (two[key] - one[key])
        if key == "after CPU":  # CPU draws a group of 2 * CHUNK values or more in chunks: not linear
            at32 = sum(len(zo.chunk_bounds(32 * n)) if 32 * n >= 2 * zo.CHUNK else 1 for n in one["group sizes"])
        print(f"{key:14} {one[key]:8d} {two[key]:9d} {at32:25d}")
    print(f"group sizes at 32 layers: {[32 * n for n in one['group sizes']]} values")
    print("RNG calls per pass: one perturbation of one query; a query makes 3 such passes (2 with the fused")
    print("update), and an update pass makes one per group and query.")


if __name__ == "__main__":
    main()
