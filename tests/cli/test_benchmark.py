"""adazeta/cli/bench.py on a tiny model: every table prints its header and finite ratios. Timings
are not asserted (the machine is shared); counts and shapes are."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import pytest
from conftest import subprocess_env


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("adazeta.cli.bench")


def table(text: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(names, [c.strip() for c in ln.strip("|").split("|")], strict=True)))
    return rows


def finite(value: str) -> float:
    x = float(value)
    assert math.isfinite(x) and x > 0, value
    return x


def test_speed_table_ratios_and_z_draws(bench):
    args = bench.parse_args(["--quick", "--model", "tiny-llama", "--methods", "adazeta,mezo,sparse_mezo,ft",
                             "--qs", "1,2", "model.device=cpu"])
    rows = table(bench.speed_table(args), "| method | Q |")
    assert [(r["method"], r["Q"]) for r in rows] == [
        ("adazeta", "1"), ("adazeta", "2"), ("mezo", "1"), ("mezo", "2"), ("sparse_mezo", "1"),
        ("sparse_mezo", "2"), ("ft", "1 fwd+bwd")]
    for r in rows:
        finite(r["step / bare"])
        assert r["batch (rows x tokens)"] == "16 x 63"  # tiny-llama: 64-token rows less the candidate
    for r in rows:
        if r["method"] == "mezo":
            # The seed trick draws each query's z at least twice (for +eps z and for -2 eps z).
            assert finite(r["z draws / step"]) >= 2 * int(r["Q"])
            assert finite(r["(bare + z floor) / bare"]) > 1
    mezo = next(r for r in rows if r["method"] == "mezo")
    assert int(mezo["trainable"].replace(",", "")) > 100 * int(rows[0]["trainable"].replace(",", ""))


def test_scaling_and_parallel_tables(bench):
    args = bench.parse_args(["--quick", "--model", "tiny-llama", "--scaling-methods", "adazeta", "--qs", "1",
                             "--parallel-methods", "adazeta", "model.device=cpu"])
    rows = table(bench.scaling_table(args), "| method | axis |")
    assert [r["batch (rows x tokens)"] for r in rows if r["axis"] == "batch size"] == ["1 x 63", "4 x 63"]
    assert [r["batch (rows x tokens)"] for r in rows if r["axis"] == "sequence length"] == ["16 x 15", "16 x 31"]
    for r in rows:
        finite(r["step / bare"])
    text = bench.parallel_table(args)
    rows = table(text, "| method | batch")
    assert [r["batch (rows x tokens)"] for r in rows] == ["1 x 31", "4 x 31"]
    for r in rows:
        finite(r["speed-up"])
        seq_tokens, par_tokens = (int(x) for x in r["tokens per forward: seq / par"].split(" / "))
        assert par_tokens % seq_tokens == 0 and par_tokens >= seq_tokens  # whole replicas per forward


def test_parallel_ceiling_is_the_sequential_step_at_the_best_bare_throughput(bench):
    # Fixed timings (a table's arithmetic, not this machine's speed): batch 1 x 10 ran its bare
    # forwards at 2*2*10/0.5 = 80 tokens/s, batch 4 x 10 at 2*2*40/1.0 = 160 tokens/s (the best).
    measured = [("1 x 10", 10, 40, {"bare": 0.5, "seq": 0.8, "par": 0.4}),
                ("4 x 10", 40, 160, {"bare": 1.0, "seq": 1.5, "par": 1.2})]
    rows = bench.parallel_rows(measured, q=2)
    assert [r[0] for r in rows] == ["1 x 10", "4 x 10"]
    assert [r[3] for r in rows] == ["80", "160"]  # bare tokens/s
    assert [r[6] for r in rows] == ["2.00", "1.25"]  # speed-up: seq / par
    # ceiling = seq * best / (2Q x tokens): 0.8 * 160 / 40 = 3.2 at batch 1; 1.5 * 160 / 160 at batch 4,
    # where the bare forwards ran at the best throughput (the step's overhead is all that is left).
    assert [r[7] for r in rows] == ["3.20", "1.50"]
    assert [r[8] for r in rows] == ["0.80", "1.20"]  # parallel / bare


@pytest.mark.slow  # adazeta-bench in a child process
def test_cli_prints_the_machine_and_the_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "adazeta.cli.bench", "--quick", "--model", "tiny-llama", "--tables", "speed", "--methods", "adazeta",
         "--qs", "1"], cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("machine: ") and "load average" in first and "torch" in first
    (row,) = table(proc.stdout, "| method | Q |")
    finite(row["step / bare"])


def test_unknown_table_is_an_error(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--tables", "speed,sped"])
    err = capsys.readouterr().err
    assert "sped" in err and "speed,memory,scaling" in err


@pytest.mark.slow
def test_memory_table_runs_the_trainer_and_the_planner(bench):
    args = bench.parse_args(["--quick", "--model", "tiny-llama", "--methods", "adazeta,mezo"])
    rows = table(bench.memory_table(args), "| method | trainable |")
    assert [r["method"] for r in rows] == ["adazeta", "mezo"]
    for r in rows:
        assert finite(r["trainer: peak / inference"]) >= 0.9
        assert finite(r["net: peak / inference"]) >= 0.9
        finite(r["net: weights GiB"])


def test_reference_mezo_step_is_the_published_algorithm(bench):
    """On a quadratic loss the central difference is exact: the reference step must move theta
    by -lr (z . grad) z - lr wd theta (decay on the weight only), with z the per-parameter
    `torch.normal` draws after `torch.manual_seed(seed)`, and its perturbations must cancel."""
    import torch

    w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    target = torch.randn(16, dtype=torch.float64)
    params = [("w", torch.nn.Parameter(w.clone()), True), ("bias", torch.nn.Parameter(b.clone()), False)]
    loss = lambda: ((torch.cat([params[0][1].flatten(), params[1][1]]) - target) ** 2).sum()  # noqa: E731
    lr, eps, wd = 0.01, 1e-3, 0.1
    g = bench.reference_mezo_step(params, loss, seed=7, lr=lr, eps=eps, weight_decay=wd)
    torch.manual_seed(7)
    zw = torch.normal(mean=0, std=1, size=(3, 4), dtype=torch.float64)
    zb = torch.normal(mean=0, std=1, size=(4,), dtype=torch.float64)
    grad = 2 * (torch.cat([w.flatten(), b]) - target)
    expected_g = float(torch.dot(torch.cat([zw.flatten(), zb]), grad))
    assert math.isclose(g, expected_g, rel_tol=1e-6)
    torch.testing.assert_close(params[0][1].data, w - lr * (expected_g * zw + wd * w))
    torch.testing.assert_close(params[1][1].data, b - lr * expected_g * zb)


def test_peer_table_times_ours_against_the_reference(bench):
    args = bench.parse_args(["--quick", "--model", "tiny-llama", "--tables", "peer", "model.device=cpu"])
    (row,) = table(bench.peer_table(args), "| model |")
    assert row["model"] == "tiny-llama" and row["batch (rows x tokens)"] == "16 x 63"
    for key in ("bare 2 forwards s", "ours s", "reference s", "ours / reference", "ours / bare", "reference / bare"):
        finite(row[key])
    assert int(row["trainable"].replace(",", "")) > 10_000  # every weight of the model: full-parameter MeZO


def test_default_methods_are_the_shipped_presets_zo_first(bench):
    """--methods defaults to every conf/method/ preset, read from the files (a new preset is
    benchmarked without touching bench.py): the ZO ones, then the first-order ones."""
    from adazeta.api import method_names
    from adazeta.config import Optimizer, method_presets

    names = bench.parse_args([]).methods
    assert sorted(names) == method_names()
    kinds = [method_presets()[n].optimizer for n in names]
    assert kinds == sorted(kinds, key=lambda k: k != Optimizer.zo) and Optimizer.fo in kinds
    assert {"mezo", "fzoo", "lozo", "hizoo", "ft"} <= set(names)
