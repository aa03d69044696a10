"""torch.distributed ZO (adazeta/engine/distributed.py): query- and data-parallel steps across real gloo
processes on CPU, the drift check, the torchrun entrypoint against a single process, and the
errors of configurations torchrun cannot run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
from conftest import TINY_RUN, output, read_jsonl, subprocess_env
from safetensors.torch import load_file

from adazeta.config import DistMode, MethodConfig, TrainableSet, ZOConfig
from adazeta.engine.distributed import check_drift, checksum
from adazeta.trainable.sets import collect
from adazeta.zo.sharded import Dist
from adazeta.zo.spsa_step import ZOStep

STEPS, Q, BATCH = 3, 3, 8  # Q = 3 does not divide across 2 ranks: one rank runs 2 queries, the other 1


def toy_step(seed: int = 0, dist: Dist | None = None) -> tuple[torch.nn.Module, ZOStep, torch.Tensor, torch.Tensor]:
    """A small regression model with every weight trainable, and its data; `dist`: the step's
    queries shared across ranks. No fused restore: under torch.distributed every query restores its
    own perturbation, and the single-process reference must round the same way to be bit-identical."""
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x, y = torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 1, generator=gen)
    cfg = MethodConfig(name="mezo", trainable=TrainableSet.full, lr=1e-2, eps=1e-3, weight_decay=0.1)
    return model, ZOStep(model, collect(model), cfg, seed=seed, zo=ZOConfig(fused_update=False), dist=dist), x, y


def train_toy(step: ZOStep, model, x, y, shard: slice = slice(None)) -> list[list[float]]:
    grads = []
    for k in range(1, STEPS + 1):
        result = step(lambda: torch.nn.functional.mse_loss(model(x[shard]), y[shard]), k, Q)
        grads.append(result.grads)
    return grads


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: trains the toy model in query mode, then in data mode, then checks drift."""
    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for mode in ("query", "data"):
        d = Dist(rank=rank, world=world, mode=DistMode(mode))
        model, step, x, y = toy_step(dist=d)
        n = BATCH // world
        shard = slice(rank * n, (rank + 1) * n) if d.mode == DistMode.data else slice(None)
        grads = train_toy(step, model, x, y, shard)
        results[mode] = {"params": {k: v.detach().clone() for k, v in model.state_dict().items()}, "grads": grads}
    if rank == 1:  # rank 1's replica drifts by one small update
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-3
    results["drift"] = {
        "resynced": check_drift(step.spsa.trainables, d, STEPS),
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    # A signal that reached rank 1 only stops both; rank 0's choice of resume folder reaches both.
    results["any"] = {"one": d.any(rank == 1), "none": d.any(False), "main": d.from_main(f"rank{rank}")}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    td.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Two real gloo processes on CPU (spawned once for the tests below)."""
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow  # torchrun: two ranks in child processes
def test_query_parallel_ranks_are_bit_identical_and_equal_one_process(ranks):
    model, step, x, y = toy_step()
    single_grads = train_toy(step, model, x, y)
    single = model.state_dict()
    for r in ranks:
        assert r["query"]["grads"] == single_grads  # the same queries, the same seeds, the same batch
        for name, value in single.items():
            assert torch.equal(r["query"]["params"][name], value), name


@pytest.mark.slow  # torchrun: two ranks in child processes
def test_data_parallel_ranks_agree_and_match_the_whole_batch(ranks):
    model, step, x, y = toy_step()
    single_grads = train_toy(step, model, x, y)
    a, b = ranks[0]["data"], ranks[1]["data"]
    assert a["grads"] == b["grads"]
    # The mean of the two shard losses is the batch loss: g_q agree up to the float32 rounding of
    # L+ and L- (~1e-7) divided by 2 eps, and the weights up to lr times that.
    torch.testing.assert_close(torch.tensor(a["grads"]), torch.tensor(single_grads), rtol=1e-3, atol=1e-3)
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name
        torch.testing.assert_close(a["params"][name], model.state_dict()[name], rtol=1e-3, atol=2e-5)


@pytest.mark.slow  # torchrun: two ranks in child processes
def test_drift_check_rebroadcasts_rank_0(ranks):
    assert ranks[0]["drift"]["resynced"] and ranks[1]["drift"]["resynced"]
    for name in ranks[0]["drift"]["params"]:
        assert torch.equal(ranks[0]["drift"]["params"][name], ranks[1]["drift"]["params"][name]), name
    assert torch.equal(ranks[0]["drift"]["params"]["0.weight"], ranks[0]["data"]["params"]["0.weight"])


@pytest.mark.slow  # torchrun: two ranks in child processes
def test_ranks_agree_on_stopping_and_on_rank_0s_values(ranks):
    for r in ranks:
        assert r["any"] == {"one": True, "none": False, "main": "rank0"}


def test_checksum_sees_one_ulp():
    model, step, _, _ = toy_step()
    before = checksum(step.spsa.trainables)
    with torch.no_grad():
        w = model[0].weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert checksum(step.spsa.trainables) != before


TORCHRUN_RUN = [
    *TINY_RUN, "model=tiny-llama", "train.max_steps=3", "train.eval_steps=3", "train.log_steps=1",
    "schedule=constant", "schedule.q=4", "train.threads=1", "dist.check_steps=1",
]


@pytest.mark.slow  # torchrun: two ranks in child processes
def test_torchrun_query_parallel_equals_a_single_process(tmp_path, entrypoint):
    home = tmp_path / "home"
    home.mkdir()
    run = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "adazeta.cli.train", *TORCHRUN_RUN, f"hydra.run.dir={run}"],
        cwd=tmp_path, env=subprocess_env(home), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, output(proc)[-3000:]
    single = entrypoint(*TORCHRUN_RUN, "zo.fused_update=false")  # rounds as the ranks do
    assert single.returncode == 0, output(single)[-3000:]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["dist/world_size"] == 2 and summary["dist/resyncs"] == 0
    assert len(set(summary["dist/checksums"])) == 1  # all ranks bit-identical
    dist_rows, single_rows = ([r for r in read_jsonl(path / "metrics.jsonl") if "train/loss" in r]
                              for path in (run, tmp_path / "run"))
    assert [r["step"] for r in dist_rows] == [r["step"] for r in single_rows] == [1, 2, 3]
    for a, b in zip(dist_rows, single_rows, strict=True):
        assert a["zo/projected_grad"] == pytest.approx(b["zo/projected_grad"], rel=1e-6, abs=1e-9)
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6)
        assert a["forward_passes"] == b["forward_passes"]
    a, b = load_file(run / "best_trainable.safetensors"), load_file(tmp_path / "run" / "best_trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Only rank 0 wrote: nothing in the working folder but the two run folders and HOME.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "home", "run"]
    assert not any(home.iterdir())


@pytest.mark.parametrize(
    ("overrides", "argv", "message"),
    [
        (["method=ft"], [], "first-order; torchrun runs the ZO methods only"),
        (["dist.mode=data", "train.batch_size=5"], [], "train.batch_size=5 must be a multiple of 2"),
        (["model.device_map=auto"], [], "under torchrun each rank holds a whole model"),
        (["dist.backend=mpi"], [], "dist.backend='mpi' is not one of"),
        ([], ["-m"], "sweep with -m outside torchrun"),
    ],
)
@pytest.mark.slow  # torchrun: two ranks in child processes
def test_torchrun_configuration_errors(tmp_path, overrides, argv, message):
    """What torchrun cannot run fails before any process group is joined, with its reason."""
    home = tmp_path / "home"
    home.mkdir()
    env = subprocess_env(home) | {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "adazeta.cli.train", *argv, *TINY_RUN, "model=tiny-llama", *overrides,
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert message in output(proc)
    assert "Traceback" not in output(proc)


@pytest.mark.parametrize(
    ("device", "local_rank", "gpus", "expected"),
    [
        ("auto", 3, 4, "cuda:3"),  # one node, every GPU visible: GPU LOCAL_RANK
        ("cuda", 1, 2, "cuda:1"),
        ("auto", 3, 1, "cuda:0"),  # SLURM --gpus-per-task=1: the one GPU this task sees
        ("cuda", 7, 1, "cuda:0"),
        ("auto", 1, 0, "cpu"),  # no GPU: gloo on the CPU
        ("cpu", 2, 8, "cpu"),
    ],
)
def test_torchrun_rank_takes_the_gpu_of_its_local_rank(device, local_rank, gpus, expected):
    from adazeta.engine.distributed import rank_device

    assert rank_device(device, local_rank, gpus) == expected


@pytest.mark.parametrize(
    ("device", "local_rank", "gpus", "message"),
    [
        ("cuda:0", 1, 2, "model.device=cuda:0 under torchrun would put every rank on that GPU; use model.device=cuda"),
        ("cuda:1", 0, 1, "model.device=cuda:1 under torchrun"),
        ("auto", 4, 2, "LOCAL_RANK=4, but this process sees 2 GPUs (0..1): start at most 2 processes per node"),
        ("cuda", 0, 0, "this process sees no GPU; use model.device=cpu"),
    ],
)
def test_torchrun_device_errors_name_the_value_and_the_fix(device, local_rank, gpus, message):
    from adazeta.engine.distributed import rank_device
    from adazeta.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        rank_device(device, local_rank, gpus)
    assert message in str(err.value) and "\n" not in str(err.value)
