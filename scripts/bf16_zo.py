"""What full-parameter ZO does to bf16 weights, before and after adazeta's low-precision path.
Prints one table; a minute on one CPU core.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bf16_zo.py

2^19 weights ~ N(0, 0.02) (a Llama-2-7B layer's scale), MeZO's setting of conf/experiment/
llama2_7b_mezo.yaml (eps 1e-3, lr 5e-7), projected gradients g_q ~ N(0, 2^2), so lr g z ~ 1e-6.
Compared with the fp32 twin (the same steps computed in fp32 from the same z and g):
- in place, rounded to nearest (before): each query's +eps z / -2 eps z / +eps z round trip is
  written to the bf16 weights, and so is the update;
- in forward + stochastic rounding (after): the perturbation is never written (ZOStep perturbs
  inside the forward), the update is written with stochastic rounding (adazeta/zo/spsa.py).
Columns: drift per round trip (RMS, and in bf16 ulps of the weights), the share of weights one update
moves, and after STEPS steps the regression slope of the bf16 displacement on the fp32 one (1 =
moves as fp32 does, in expectation) and the relative error ||d_bf16 - d_fp32|| / ||d_fp32||.
"""

from __future__ import annotations

import torch

from adazeta.params import Trainable
from adazeta.zo.spsa import SPSA, query_seed

N, EPS, LR, STEPS = 1 << 19, 1e-3, 5e-7, 100


def run(in_place: bool, stochastic: bool) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    w0 = (torch.randn(N, generator=gen) * 0.02).bfloat16()
    p = torch.nn.Parameter(w0.clone())
    spsa = SPSA([Trainable("w", p, decay=True)], eps=EPS, workers=1)
    twin = w0.float().clone()  # the fp32 twin: the same z (drawn in bf16) and g, computed in fp32
    ulp = (torch.nextafter(w0, torch.full_like(w0, 1.0)).float() - w0.float()).abs()
    drifts, moved_share = [], []
    for step in range(1, STEPS + 1):
        seed = query_seed(0, step, 0)
        g = float(torch.randn(1, generator=gen)) * 2.0
        if in_place:
            before = p.detach().float().clone()
            for scale in (1.0, -2.0, 1.0):
                spsa.perturb(seed, scale)
            drifts.append(p.detach().float() - before)
        z = spsa.z(0, seed).float()
        before = p.detach().float().clone()
        if stochastic:
            spsa.sgd_update([seed], [g], LR, 0.0)
        else:  # rounded to nearest, as a plain in-place add does
            with torch.no_grad():
                p.add_(spsa.z(0, seed), alpha=-LR * g)
        moved_share.append((p.detach().float() != before).float().mean().item())
        twin.add_(z, alpha=-LR * g)
    d16, d32 = p.detach().float() - w0.float(), twin - w0.float()
    drift = torch.stack(drifts) if drifts else torch.zeros(1, N)
    return {
        "drift_rms": drift.pow(2).mean().sqrt().item(),
        "drift_ulp": (drift.abs() / ulp).mean().item(),
        "moved": sum(moved_share) / len(moved_share),
        "slope": ((d16 * d32).sum() / (d32 * d32).sum()).item(),
        "rel_err": ((d16 - d32).norm() / d32.norm()).item(),
    }


def main() -> None:
    torch.manual_seed(0)
    rows = {
        "in place, rounded to nearest (before)": run(in_place=True, stochastic=False),
        "in place, stochastic update": run(in_place=True, stochastic=True),
        "in forward, rounded to nearest": run(in_place=False, stochastic=False),
        "in forward + stochastic update (after)": run(in_place=False, stochastic=True),
    }
    print(f"bf16 full-parameter ZO: {N} weights ~ N(0, 0.02), eps {EPS}, lr {LR}, g ~ N(0, 4), {STEPS} steps")
    print(f"{'':40} {'drift RMS':>10} {'drift ulp':>9} {'moved/upd':>9} {'slope':>7} {'rel err':>8}")
    for name, r in rows.items():
        print(f"{name:40} {r['drift_rms']:10.2e} {r['drift_ulp']:9.3f} {r['moved']:9.4f} {r['slope']:7.3f} "
              f"{r['rel_err']:8.2f}")


if __name__ == "__main__":
    main()
