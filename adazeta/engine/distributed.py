"""One ZO run across processes and nodes with torchrun (torch.distributed).

    torchrun --nproc_per_node 2 -m adazeta.cli.train dist.mode=query schedule=constant schedule.q=4

A ZO step exchanges scalars only, never gradients (the estimator that shares it: `Sharded`,
adazeta/zo/sharded.py):
- `dist.mode=query`: the Q queries of a step are dealt out across ranks (query i to rank i mod W).
  Each rank draws z for its queries from query_seed(seed, step, i), the same pure function a
  single process uses, so no two ranks share a seed by accident and the union of the ranks'
  queries is exactly the single-process step. One all_gather of the (g_q, loss_q) pairs per step;
  every rank then applies the same update from the same seeds, so the replicas stay identical.
- `dist.mode=data`: every rank runs every query with the same seeds on its own shard of the batch;
  one all_reduce (mean) of the (g_q, loss_q) pairs per step. With equal shards the mean of the
  shard losses is the loss of the whole batch, so the step is the single-process step.

This module joins the process group (`setup`) and keeps the replicas identical: every
`dist.check_steps` steps the ranks compare a checksum of their trainable parameters; on a mismatch
rank 0's are broadcast to all and the event is logged as `dist/resyncs`. Only rank 0 logs, writes
files and shows the progress bar.
"""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as td

from adazeta.config import DistConfig, DistMode, ModelConfig
from adazeta.errors import ConfigError
from adazeta.params import Trainable
from adazeta.zo.sharded import Dist, launched

log = logging.getLogger("adazeta")
BACKENDS = ("auto", "gloo", "nccl")


def rank_device(device: str, local_rank: int, gpus: int) -> str:
    """The device of one torchrun rank, from `model.device`, the rank's LOCAL_RANK and the number of
    GPUs it sees. Each rank takes one GPU of its own: GPU LOCAL_RANK when the node's GPUs are all
    visible, or the one GPU it sees when the launcher gives each task one (SLURM's
    --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES per task, so LOCAL_RANK may exceed 0 with one
    GPU visible). An explicit index (cuda:0) would put every rank on that GPU (NCCL: "duplicate
    GPU"), so it is refused."""
    if device == "cpu" or (device == "auto" and gpus == 0):
        return "cpu"
    if device not in ("auto", "cuda"):
        if device.startswith("cuda:"):
            raise ConfigError(
                f"model.device={device} under torchrun would put every rank on that GPU; use model.device=cuda "
                "(or auto): each rank takes the GPU of its LOCAL_RANK (CUDA_VISIBLE_DEVICES selects the node's GPUs)"
            )
        return device  # not a CUDA device: resolve_device judges it
    if gpus == 0:
        raise ConfigError(f"model.device={device} under torchrun, but this process sees no GPU; use model.device=cpu")
    if gpus == 1:
        return "cuda:0"  # one GPU per task: LOCAL_RANK % 1
    if local_rank >= gpus:
        raise ConfigError(
            f"LOCAL_RANK={local_rank}, but this process sees {gpus} GPUs (0..{gpus - 1}): start at most {gpus} "
            f"processes per node (torchrun --nproc_per_node {gpus}), or give each process one GPU "
            "(CUDA_VISIBLE_DEVICES, SLURM --gpus-per-task=1)"
        )
    return f"cuda:{local_rank}"


def setup(cfg: DistConfig, model: ModelConfig, batch_size: int) -> Dist:
    """Join the process group torchrun set up the environment for (no-op in a single process).
    On CUDA each rank takes the GPU of its LOCAL_RANK, so `model.device=auto|cuda` is that GPU."""
    if not launched():
        return Dist()
    from adazeta.models.load import resolve_device

    if model.device_map is not None:
        raise ConfigError(
            f"model.device_map={model.device_map} spreads one model over the node's GPUs; under torchrun each "
            "rank holds a whole model on its own GPU: set model.device_map=null, or run without torchrun"
        )
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device(rank_device(model.device, int(os.environ.get("LOCAL_RANK", "0")), gpus))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # model.device=auto|cuda then means this GPU (adazeta/models/load.py load_model)
    else:
        resolve_device(model.device)  # its errors for a device that is not one
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"dist.backend={cfg.backend!r} is not one of {list(BACKENDS)}")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"dist.backend=nccl needs CUDA devices, but model.device is {device}; use gloo or auto")
    world = int(os.environ["WORLD_SIZE"])
    if cfg.mode == DistMode.data and batch_size % world:
        raise ConfigError(
            f"dist.mode=data splits each batch across {world} ranks: train.batch_size={batch_size} must be "
            f"a multiple of {world}"
        )
    if not td.is_initialized() and "TORCHELASTIC_RUN_ID" not in os.environ:
        # Without torchrun's rendezvous a stray WORLD_SIZE fails on a missing MASTER_ADDR, or, with
        # one set, waits (up to the timeout below) for ranks that were never started.
        raise ConfigError(
            f"WORLD_SIZE={world} (RANK={os.environ.get('RANK', 'unset')}) is set, but this process was not "
            f"started by torchrun: launch with `torchrun --nproc_per_node {world} -m adazeta.cli.train ...`, "
            "or unset WORLD_SIZE and RANK to run in one process"
        )
    if not td.is_initialized():
        # Rank 0 evaluates on dev alone while the others wait at the next collective: a long timeout.
        td.init_process_group(backend=backend, timeout=timedelta(hours=2))
    comm = device if backend == "nccl" else torch.device("cpu")
    d = Dist(rank=td.get_rank(), world=td.get_world_size(), mode=cfg.mode, comm_device=comm)
    log.info("torch.distributed: rank %d of %d, backend %s, mode %s", d.rank, d.world, backend, cfg.mode.value)
    return d


def checksum(trainables: list[Trainable]) -> str:
    """sha256 of the trainable parameters' bytes: equal iff the replicas are bit-identical."""
    h = hashlib.sha256()
    for t in trainables:
        h.update(t.param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_checksums(trainables: list[Trainable], d: Dist) -> list[str]:
    digest = checksum(trainables)
    if not d.enabled:
        return [digest]
    out: list[str | None] = [None] * d.world
    td.all_gather_object(out, digest)
    return [str(x) for x in out]


@torch.no_grad()
def check_drift(trainables: list[Trainable], d: Dist, step: int) -> bool:
    """Compare the ranks' checksums; on a mismatch broadcast rank 0's parameters. Returns True if
    the ranks had drifted (and were resynchronised)."""
    if not d.enabled:
        return False
    digests = gather_checksums(trainables, d)
    if len(set(digests)) == 1:
        return False
    if d.is_main:
        log.warning("step %d: trainable parameters differ across ranks (%s); broadcasting rank 0's",
                    step, ", ".join(x[:8] for x in digests))
    for t in trainables:
        buf = t.param.data if d.comm_device == t.param.device else t.param.data.to(d.comm_device)
        td.broadcast(buf, src=0)
        if buf is not t.param.data:
            t.param.data.copy_(buf)
    return True
