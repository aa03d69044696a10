"""`adazeta-replay`: rebuild the trainable parameters of a ZO run from the base model and its replay
log alone (no forward pass), and check them against a checkpoint.

    adazeta-replay outputs/runs/2026-11-24/10-00-00_mezo_sst2_minilm
    adazeta-replay <run> --checkpoint <run>/checkpoints/step-0000200 --save rebuilt.safetensors

The log, <run>/replay.jsonl, and what its records hold: adazeta/engine/replay_log.py. The replay
runs each step through the method's own ZOStep (`ZOStep.run`) with an estimate that repeats the
step's logged in-place writes and returns the logged g_q, so the update (fused or not, masks, rule
state) is the run's own code.
Adapter and LoRA sets draw z per group of tensors (adazeta/zo/spsa.py): a log replays with an
adazeta version that draws z as the version that wrote it did.
First-order methods (ft, lora_fo) have no replay log: backprop gradients are not a function of
seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from adazeta.engine.replay_log import decode
from adazeta.errors import AdazetaError, CheckpointError
from adazeta.zo.spsa import query_seed

log = logging.getLogger("adazeta")


class Logged:
    """The estimate of a logged step: repeats its in-place writes (through SPSA.perturb, as the run
    made them) and returns its g_q (an estimator of adazeta/zo/estimators.py's kind)."""

    writes_weights = True
    can_defer_restore = False  # a fused run's writes leave the displacement the update restores

    def __init__(self, spsa, writes: list[tuple[int, float]], grads: list[float]):
        self.spsa, self.writes, self.grads = spsa, writes, grads

    def __call__(self, loss_fn, seeds: list[int], defer_restore: bool = False) -> torch.Tensor:
        for seed, scale in self.writes:
            self.spsa.perturb(seed, scale)
        return torch.tensor([[g, 0.0] for g in self.grads], dtype=torch.float64)


@torch.no_grad()
def replay_step(zo_step, record: dict) -> None:
    """Apply one logged step through the method's own ZOStep (mask store/release, update rule),
    with an estimate that repeats the logged in-place writes and returns the logged g_q."""
    if not record.get("applied", True):  # rejected by the guard: its round trips only, then
        for seed, scale in decode(record["perturbs"], []):  # the restore ZOStep does on any stop
            zo_step.spsa.perturb(seed, scale)
        zo_step.spsa.restore()
        return
    step, seeds, grads = record["step"], record["seeds"], record["grads"]
    expected = [query_seed(zo_step.seed, step, i) for i in range(len(seeds))]
    if seeds != expected:
        raise CheckpointError(f"replay.jsonl step {step}: the logged seeds are not this config's "
                              f"query seeds (seed={zo_step.seed}); the log belongs to another run")
    estimate = Logged(zo_step.spsa, decode(record["perturbs"], seeds), grads)
    tape = iter(record.get("rule_losses", []))
    zo_step.lr = record["lr"]
    zo_step.run(estimate, lambda: torch.tensor(next(tape), dtype=torch.float64), step, seeds)


# The keys replay_step reads, with their JSON types: an applied step, and a step the guard rejected.
APPLIED = {"step": int, "seeds": list, "grads": list, "lr": (int, float), "perturbs": (str, list)}
REJECTED = {"step": int, "perturbs": list}


def read_record(path: Path, line: int, text: str) -> dict:
    """One line of replay.jsonl, checked for the keys and types replay_step reads; a CheckpointError
    naming the file and the line otherwise."""
    try:
        rec = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}, line {line}: not valid JSON ({e}); the log is damaged and this run "
                              "cannot be replayed past that line") from None
    keys = REJECTED if isinstance(rec, dict) and rec.get("applied", True) is False else APPLIED
    wrong = [k for k, t in keys.items() if not isinstance(rec, dict) or not isinstance(rec.get(k), t)]
    if wrong:
        raise CheckpointError(f"{path}, line {line}: lacks {', '.join(wrong)} (or holds another type) in {text[:120]!r}; "
                              "the log is damaged or not adazeta's, and this run cannot be replayed past that line")
    return rec


def run_config(run_dir: Path):
    """The run's config: the resolved values it saved in <run>/config.yaml, typed by the schema
    (the schedule and logger options, which have schemas of their own, are picked from them)."""
    from omegaconf import OmegaConf, open_dict

    from adazeta.config import compose_config
    from adazeta.legacy_keys import upgrade_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml); give a folder adazeta-train wrote")
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        saved = upgrade_config(OmegaConf.load(path))  # runs of earlier releases: flat method keys
        schedule = saved.schedule._target_.rsplit(".", 1)[-1].removesuffix("Schedule").lower()
        cfg = compose_config([f"schedule={schedule}", f"logger={saved.logger.name}"])
        with open_dict(cfg):  # open: free-form nodes (model.arch, adapter.modes) take the run's keys
            cfg.pop("hydra", None)
            merged = OmegaConf.merge(cfg, saved)
        # The schedule's class by its current path: runs written before the package's subpackages
        # saved adazeta.schedules.<Name>, which is now adazeta.zo.schedules.<Name>.
        merged.schedule._target_ = cfg.schedule._target_
        return merged
    except (YAMLError, OmegaConfBaseException, AttributeError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not the config adazeta-train wrote ({type(e).__name__}: {first}); "
                              "restore it from a copy of the run") from None


def replay(run_dir: Path, checkpoint: Path | None = None, save: Path | None = None) -> dict:
    """Rebuild the trainable parameters of `run_dir` at its newest checkpoint (or `checkpoint`)
    from the base model and replay.jsonl; compare them with the checkpoint's."""
    from adazeta.config import Optimizer
    from adazeta.engine import checkpoint as ckpt
    from adazeta.engine.build import build_run
    from adazeta.engine.tensor_files import read_tensors, write_tensors

    cfg = run_config(run_dir)
    if cfg.method.optimizer != Optimizer.zo:
        raise CheckpointError(f"method={cfg.method.name} is first-order: backprop updates cannot be "
                              "replayed from seeds; adazeta-replay works for ZO runs")
    if checkpoint is None:
        found = ckpt.complete(run_dir / "checkpoints")
        if not found:
            raise CheckpointError(f"{run_dir} has no checkpoint to compare with (checkpoints/step-<N>/state.json)")
        checkpoint = found[-1]
    saved = ckpt.read_json(checkpoint / "state.json")
    target_step, count = saved["step"], saved.get("replay_records")
    target = read_tensors(checkpoint / "trainable.safetensors")
    log_path = run_dir / "replay.jsonl"
    if not log_path.is_file() or count is None:
        raise CheckpointError(f"{log_path} does not exist: the run was made with train.replay_log=false, so it "
                              "cannot be replayed (runs keep the log by default)")
    records = [read_record(log_path, i, line) for i, line in enumerate(log_path.read_text().splitlines()[:count], 1)]
    if [r["step"] for r in records if r.get("applied", True)] != list(range(1, target_step + 1)):
        raise CheckpointError(f"{log_path} does not hold every step 1..{target_step} of the checkpoint "
                              f"(has {len(records)} records): it is incomplete")

    torch.manual_seed(cfg.seed)
    built = build_run(cfg)  # the same model, adapters, head and method as the run, in the same RNG order
    zo_step = built.method.step
    for record in records:
        replay_step(zo_step, record)

    rebuilt = {t.name: t.param.detach().to("cpu", copy=True) for t in built.method.trainables}  # views: copy
    if rebuilt.keys() != target.keys():
        raise CheckpointError(f"{checkpoint} holds other tensors than this run's trainable set")
    diffs = {n: (rebuilt[n].double() - target[n].double()).abs().max().item() if rebuilt[n].numel() else 0.0
             for n in rebuilt}
    unequal = [n for n in rebuilt if not torch.equal(rebuilt[n], target[n])]
    if save is not None:
        write_tensors(save, rebuilt)
    return {"steps": target_step, "checkpoint": str(checkpoint), "tensors": len(rebuilt),
            "values": sum(v.numel() for v in rebuilt.values()), "unequal": unequal,
            "max_abs_diff": max(diffs.values(), default=0.0), "worst": max(diffs, key=diffs.get) if diffs else None}


def main(argv: list[str] | None = None) -> None:
    """`adazeta-replay <run folder>`: exit 0 when the rebuilt parameters equal the checkpoint's."""
    parser = argparse.ArgumentParser(prog="adazeta-replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run folder (with replay.jsonl and checkpoints/)")
    parser.add_argument("--checkpoint", type=Path, help="compare with this checkpoint folder (default: the newest)")
    parser.add_argument("--save", type=Path, help="also write the rebuilt parameters to this safetensors file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        out = replay(args.run, args.checkpoint, args.save)
    except AdazetaError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        if args.save is not None and e.filename is not None and Path(e.filename) == args.save:
            sys.exit(f"error: cannot write --save {args.save} ({e.strerror or e}); give a file in a folder you can write")
        # a run file that cannot be read
        sys.exit(f"error: {e.strerror or e} ({e.filename}): check the paths given to adazeta-replay and their permissions")
    where = f"{out['checkpoint']} ({out['tensors']} tensors, {out['values']} values)"
    if out["unequal"]:
        sys.exit(f"MISMATCH after replaying {out['steps']} steps: {len(out['unequal'])} tensors differ from {where}; "
                 f"max abs diff {out['max_abs_diff']:.3g} in {out['worst']}")
    print(f"replayed {out['steps']} steps from the base model: the trainable parameters equal {where} exactly")


if __name__ == "__main__":
    main()
