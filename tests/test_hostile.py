"""Hostile inputs, continued: each of these gives one line that names the bad value and what to
do (no Python traceback, no hang, nothing accepted and silently ignored), and leaves the run data
it found intact.

The table runs in process, as tests/test_bad_inputs.py does (its `runs` fixture, its error_of);
adazeta-plan and adazeta-compare run through their main(); the cases that only the real entrypoint
shows (the environment, argv, the out-of-memory mapping) run as concurrent subprocesses.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY_RUN, compose_config, output, subprocess_env
from run_files import write_run
from test_bad_inputs import SOURCE, copy_checkpoint, error_of, runs  # noqa: F401  (runs: the fixture)

from adazeta.cli import compare
from adazeta.cli import plan as planner
from adazeta.engine.interrupt import interruption
from adazeta.errors import AdazetaError, DivergenceError, Interrupted, environment_error
from adazeta.step import check_update_fits
from adazeta.tasks import loading
from adazeta.validate import validate

GOOD_DEV = b"sentence\tlabel\nfine .\t1\nbad .\t0\n"


def data(tmp: Path, files: dict[str, bytes]) -> list[str]:
    """A data folder with these files (a good dev.tsv unless given) -> the task.data_dir override."""
    folder = tmp / "data"
    folder.mkdir()
    for name, content in {"dev.tsv": GOOD_DEV, **files}.items():
        (folder / name).write_bytes(content)
    return [f"task.data_dir={folder}"]


def state_json(change: Callable[[dict], None]) -> Callable[[dict, Path], list[str]]:
    """Resume from a copy of the AdaZeta run whose newest checkpoint's state.json was changed."""
    def make(done, tmp):
        ckpt = copy_checkpoint(done, tmp)
        saved = json.loads((ckpt / "state.json").read_text())
        change(saved)
        (ckpt / "state.json").write_text(json.dumps(saved))
        return [*SOURCE, f"train.resume={ckpt}"]
    return make


def damaged_metrics(done, tmp) -> list[str]:
    ckpt = copy_checkpoint(done, tmp)
    (ckpt.parent.parent / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.7}\n{not json\n')
    return [*SOURCE, f"train.resume={ckpt.parent.parent}"]


def replay_line(line: str) -> Callable[[dict, Path], Path]:
    """A copy of the AdaZeta run whose replay.jsonl has `line` as its second line (for adazeta-replay)."""
    def make(done, tmp):
        folder = copy_checkpoint(done, tmp).parent.parent
        lines = (folder / "replay.jsonl").read_text().splitlines()
        lines[1] = line
        (folder / "replay.jsonl").write_text("\n".join(lines) + "\n")
        return folder
    return make


def broken_config(done, tmp) -> Path:
    folder = copy_checkpoint(done, tmp).parent.parent
    (folder / "config.yaml").write_text("model: [\n")
    return folder


Make = Callable[[dict, Path], "list[str] | Path"]
# (id, make, fragments the message must contain); the base config is tiny-bert with AdaZeta.
CASES: list[tuple[str, Make, list[str]]] = [
    # -- data files --
    ("non-UTF-8 byte in a tsv", lambda r, t: data(t, {"train.tsv": b"sentence\tlabel\ngood .\t1\nbad \xff .\t0\n"}),
     ["{tmp}/data/train.tsv, line 3, column 5: byte 0xff is not UTF-8", "save the file as UTF-8"]),
    ("non-UTF-8 byte deep in a jsonl", lambda r, t: data(t, {"train.jsonl": b'{"sentence": "ok .", "label": 1}\n' * 3000
                                                               + b'{"sentence": "caf\xe9", "label": 0}\n'}),
     ["{tmp}/data/train.jsonl, line 3001, column 18: byte 0xe9 is not UTF-8"]),
    ("jsonl line that is no object", lambda r, t: data(t, {"train.jsonl": b'{"sentence": "ok .", "label": 1}\n[1, 2]\n'}),
     ["{tmp}/data/train.jsonl, line 2: expected a JSON object", "got list"]),
    ("parquet that is no parquet", lambda r, t: data(t, {"train.parquet": b"PAR1 not really"}),
     ["{tmp}/data/train.parquet: not a readable parquet file"]),
    ("train split too small for a dev example", lambda r, t: data(t, {"train.tsv": b"sentence\tlabel\ngood .\t1\nbad .\t0\n"}),
     ["no dev example", "2 usable rows", "task.num_dev=8, task.num_train=16", "give a larger train file"]),
    ("num_dev null without k_shot", lambda r, t: ["task.num_dev=null"], ["no dev example", "task.num_dev=null"]),
    # -- values that reached torch or peft unchecked --
    ("TT modes that do not multiply to the size", lambda r, t: ["adapter.modes={64: [8, 4]}"],
     ["adapter.modes={64: [8, 4]}", "multiply to 32, not 64"]),
    ("TT modes given as a list", lambda r, t: ["adapter.modes=[8,8]"], ["adapter.modes=[8, 8] must map a layer size"]),
    ("TT modes with a zero factor", lambda r, t: ["adapter.modes={0: [0]}"], ["integer factors >= 1"]),
    ("adapter target that matches no module", lambda r, t: ["adapter.targets=[{pattern: nope, side: input}]"],
     ["matches the target patterns ['nope']", "adapter.targets=[{'pattern': 'nope', 'side': 'input'}]"]),
    ("adapter target on a side that does not exist", lambda r, t: ["adapter.targets=[{pattern: nope, side: middle}]"],
     ["side='middle' is not one of", "adapter.targets="]),
    ("adapter target that is no regex", lambda r, t: ["adapter.targets=[{pattern: '(', side: input}]"],
     ["missing ), unterminated subpattern", "adapter.targets="]),
    ("LoRA target that matches no module", lambda r, t: ["method=mezo_lora", "method.lora.targets=[nope]"],
     ["method.lora.targets=['nope']", "linear layers are named", "'query'"]),
    ("lr beyond float32", lambda r, t: ["method.lr=1e300"], ["method.lr=1e+300 is out of range", "overflows float32"]),
    ("eps beyond float32", lambda r, t: ["method.eps=1e300"], ["method.eps=1e+300 is out of range", "overflows float32"]),
    ("first-order lr whose first AdamW step overflows", lambda r, t: ["method=ft", "method.lr=3e38"],
     ["method.lr=3e+38 is out of range: AdamW's first step is lr / (1 - betas[0]) = 3e+39"]),
    ("eps whose double overflows", lambda r, t: ["method.eps=3e38"], ["method.eps=3e+38 is out of range"]),
    ("weight decay beyond float32", lambda r, t: ["method.weight_decay=1e39"], ["method.weight_decay=1e+39", "overflows"]),
    ("seed past 64 bits", lambda r, t: ["seed=18446744073709551616"],
     ["seed=18446744073709551616 is out of range: integers must fit in 64 bits"]),
    ("threads past 32 bits", lambda r, t: ["train.threads=2147483648"], ["train.threads=2147483648", "below 2**31"]),
    ("max_length of one token", lambda r, t: ["model.max_length=1"], ["model.max_length=1 is out of range: it must be >= 2"]),
    ("architecture transformers cannot build", lambda r, t: ["model.arch.num_attention_heads=5"],
     ["model.arch={", "'num_attention_heads': 5", "is not an architecture transformers can build"]),
    ("unknown architecture type", lambda r, t: ["model.arch.model_type=nope"], ["'model_type': 'nope'", "model=tiny-llama"]),
    ("tokenizer that does not exist", lambda r, t: ["model.tokenizer=/nonexistent/tok"],
     ["cannot load the tokenizer '/nonexistent/tok'", "packaged:minilm"]),
    ("linear schedule that shrinks", lambda r, t: ["schedule=linear", "schedule.q_start=5", "schedule.q_end=1"],
     ["schedule.q_end=1 is below schedule.q_start=5"]),
    ("adaptive floor above its cap", lambda r, t: ["schedule.q_min=8", "schedule.q_max=4"],
     ["schedule.q_min=8 is above schedule.q_max=4"]),
    ("adapter scale beyond float32", lambda r, t: ["adapter.scale=1e300"], ["adapter.scale=1e+300", "overflows float32"]),
    ("adapter scale that is no number", lambda r, t: ["adapter.scale=nan"], ["adapter.scale=nan is out of range"]),
    # -- keys the chosen method would silently ignore --
    ("LoRA rank with AdaZeta", lambda r, t: ["method=adazeta", "method.lora.r=4"],
     ["method.lora.r is not read by method=adazeta", "method.trainable=lora", "method=hizoo_lora,lora_fo,mezo_lora",
      "drop 'method.lora.r=4'"]),
    ("LoRA targets with MeZO", lambda r, t: ["method=mezo", "method.lora.targets=[query]"],
     ["method.lora.targets is not read by method=mezo"]),
    ("TT rank with MeZO", lambda r, t: ["method=mezo", "adapter.rank=3"],
     ["adapter.rank is not read by method=mezo", "method=adazeta"]),
    ("eps with first-order fine-tuning", lambda r, t: ["method=ft", "method.eps=1e-2"],
     ["method.eps is not read by method=ft", "method.optimizer=zo"]),
    ("momentum without the momentum rule", lambda r, t: ["method=mezo", "method.momentum=0.5"],
     ["method.momentum is not read by method=mezo", "method.update_rule=momentum"]),
    ("keep_ratio with the magnitude mask", lambda r, t: ["method=sparse_mezo", "method.sparse.keep_ratio=0.3"],
     ["method.sparse.keep_ratio is not read", "method.sparse.mask=random"]),
    ("sparsity without a sparse method", lambda r, t: ["method=mezo", "method.sparse.sparsity=0.5"],
     ["method.sparse.sparsity is not read by method=mezo", "method=sparse_mezo"]),
    ("Adam betas with the SGD rule", lambda r, t: ["method=mezo", "method.betas=[0.8,0.9]"],
     ["method.betas is not read by method=mezo", "method.update_rule=adam"]),
    ("ZO keys with a first-order method", lambda r, t: ["method=lora_fo", "zo.fused_update=false"],
     ["zo.fused_update is not read by method=lora_fo"]),
    # -- files that parse but hold the wrong content --
    ("checkpoint step that is no number", state_json(lambda s: s.update(step="four")), ["holds step='four'"]),
    ("checkpoint guard state that is no object", state_json(lambda s: s.update(guard=5)),
     ["holds guard=5", "resume from another checkpoint"]),
    ("checkpoint RNG state of another shape", state_json(lambda s: s["rng"].update(python="x")),
     ["state.json or state.safetensors holds values this version cannot restore", "resume from another checkpoint"]),
    ("earlier run's metrics line damaged", damaged_metrics,
     ["metrics.jsonl, line 2: not a metrics row with a step", "nothing was changed"]),
    ("replay line without its keys", replay_line('{"step": 2}'),
     ["replay.jsonl, line 2: lacks seeds, grads, lr, perturbs"]),
    ("replay line that is no JSON", replay_line("garbage"), ["replay.jsonl, line 2: not valid JSON"]),
    ("replay line that is no object", replay_line("[1, 2]"), ["replay.jsonl, line 2: lacks step"]),
    ("run config that is no YAML", broken_config, ["config.yaml is not the config adazeta-train wrote"]),
]


@pytest.mark.parametrize(("name", "make", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gives_its_clear_error(runs, tmp_path, name, make, fragments):  # noqa: F811
    message = error_of(make(runs, tmp_path), tmp_path)
    for fragment in fragments:
        fragment = fragment.replace("{tmp}", str(tmp_path))
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_resume_with_a_damaged_metrics_line_changes_no_file(runs, tmp_path):  # noqa: F811
    overrides = damaged_metrics(runs, tmp_path)
    folder = tmp_path / "copy"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    error_of(overrides, tmp_path)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


# -- data files that need the file system or csv's limit bent --


def test_unreadable_data_file_is_named(tmp_path, monkeypatch):
    """As root chmod cannot make a file unreadable: Path.open is made to refuse it instead."""
    overrides = data(tmp_path, {"train.tsv": b"sentence\tlabel\ngood .\t1\n"})
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self.name == "train.tsv":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    message = error_of(overrides, tmp_path)
    assert f"{tmp_path / 'data' / 'train.tsv'}: cannot read it (Permission denied)" in message


def test_a_tsv_field_over_128_kib_is_read(tmp_path):
    """Python's csv stops at 128 KiB a field; a long passage is the tokenizer's to truncate."""
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "x" * 200_000 + "\t1\nshort .\t0\n")
    rows = loading.read_file(path).rows
    assert [len(r["sentence"]) for r in rows] == [200_000, 7]


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, suffix):
    """Excel's "CSV UTF-8" starts the file with a BOM: it read as a column named '\ufeffsentence'."""
    sep = {".tsv": "\t", ".csv": ","}.get(suffix)
    text = (f"sentence{sep}label\nfine .{sep}1\n" if sep else '{"sentence": "fine .", "label": 1}\n')
    path = tmp_path / f"train{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert loading.read_file(path).rows[0]["sentence"] == "fine ."


def test_a_csv_field_past_the_limit_names_the_line(tmp_path, monkeypatch):
    import csv

    limit = csv.field_size_limit()
    monkeypatch.setattr(loading, "FIELD_LIMIT", 100)
    path = tmp_path / "train.csv"
    path.write_text('sentence,label\nfine,1\n"open quote,0\n' + "y" * 200 + "\n")
    try:
        csv.field_size_limit(100)
        with pytest.raises(AdazetaError) as err:
            loading.read_file(path)
    finally:
        csv.field_size_limit(limit)
    assert f"{path}, line 3: field larger than field limit (100) (a quote left open?)" in str(err.value)


# -- values --


def test_tt_modes_as_the_readme_writes_them_compose_and_validate():
    """`adapter.modes={64: [8, 8]}` failed inside OmegaConf (a dict merged into a null typed node)."""
    cfg = compose_config(["model=tiny-llama", "adapter.modes={64: [8, 8]}"])
    validate(cfg)
    assert cfg.adapter.modes == {64: [8, 8]}


@pytest.mark.parametrize(("alpha", "beta", "qs"), [(0.85, 1e300, [1, 1, 1, 1, 20, 20]),  # 1 ** beta = 1
                                                  (1e308, 2.0, [1, 1, 20, 20, 20, 20])])
def test_a_query_schedule_past_float_range_gives_q_max(alpha, beta, qs):
    """alpha * e ** beta overflowed (OverflowError) or was inf (floor failed) at the second epoch."""
    from adazeta.zo.schedules import AdaptiveSchedule

    schedule = AdaptiveSchedule(alpha=alpha, beta=beta, q_max=20)
    schedule.bind(steps_per_epoch=2, max_steps=10)
    assert [schedule(step) for step in range(6)] == qs


def test_an_update_that_overflows_float32_stops_the_step():
    with pytest.raises(DivergenceError) as err:
        check_update_fits(7, 3e38, [0.5, -2.0])
    assert "step 7: the update lr * projected gradient = 3e+38 * 2 overflows float32" in str(err.value)
    check_update_fits(7, 1e38, [2.0])  # 2e38 fits


@pytest.mark.parametrize("overrides", [["method=adazeta", "adapter.rank=3"], ["method=mezo_lora", "method.lora.r=4"],
                                       ["method=ft", "method.betas=[0.9,0.99]"], ["method=sparse_mezo", "method.sparse.sparsity=0.5"],
                                       ["method=mezo", "method.update_rule=momentum", "method.momentum=0.5"]])
def test_keys_the_method_reads_are_accepted(overrides):
    validate(compose_config(["model=tiny-bert", *overrides]))


# -- the environment --


@pytest.mark.parametrize(("error", "says"), [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/step-4/trainable.safetensors.tmp"),
     "No space left on device (/runs/x/checkpoints/step-4/trainable.safetensors.tmp): free space"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), "Permission denied (/runs/x): check its permissions"),
    (OSError(errno.EROFS, "Read-only file system", "/runs"), "read-only: write the run elsewhere with hydra.run.dir"),
    (MemoryError(), "out of memory (MemoryError): lower train.batch_size"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried"),
     "out of memory ([enforce fail"),
])
def test_what_the_machine_refuses_is_one_line(error, says):
    assert says in environment_error(error)


def test_a_bug_is_not_mistaken_for_the_machine():
    assert environment_error(ValueError("bad")) is None and environment_error(FileNotFoundError(2, "x")) is None


def test_a_second_signal_stops_at_once_with_one_line(tmp_path):
    with pytest.raises(Interrupted) as err, interruption(tmp_path) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # the first only asks for a checkpoint after the step
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the second signal did not stop the run")
    assert err.value.exit_code == 128 + signal.SIGTERM
    assert "second SIGTERM while stopping: stopped at once" in str(err.value)
    assert f"train.resume={tmp_path}" in str(err.value)


def test_ctrl_c_while_hydra_composes_is_one_line(monkeypatch, capsys):
    from adazeta.cli import train

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "hydra_main", interrupted)
    monkeypatch.setattr(sys, "argv", ["adazeta-train", "model=tiny-llama"])
    with pytest.raises(SystemExit) as exit_:
        train.main()
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "interrupted by SIGINT before the run started: nothing was trained; start it again\n"


# -- adazeta-plan and adazeta-compare --


@pytest.mark.parametrize(("argv", "says"), [
    (["--fit", "a,b"], "argument --fit: 'a,b' is not a list of layer counts >= 1"),
    (["--check", "0"], "argument --check: '0' is not a list of layer counts >= 1"),
    (["--check-dtype", "1,x"], "argument --check-dtype: '1,x'"),
    (["--q", "0"], "argument --q: '0' is not an integer >= 1"),
    (["--steps", "-1"], "argument --steps: '-1' is not an integer >= 1"),
    (["--seq-len", "abc"], "argument --seq-len: 'abc' is not an integer >= 1"),
    (["--threads", "0"], "argument --threads: '0' is not an integer >= 1"),
])
def test_plan_arguments_are_checked(capsys, argv, says):
    with pytest.raises(SystemExit) as exit_:
        planner.main([*argv, "model=tiny-llama"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def compare_run(tmp: Path, damage: Callable[[Path], None] | None = None) -> Path:
    folder = tmp / "runs" / "r0"
    write_run(folder, "adazeta", 0)
    if damage is not None:
        damage(folder)
    return folder.parent


def append_metrics(line: bytes) -> Callable[[Path], None]:
    return lambda f: (f / "metrics.jsonl").write_bytes((f / "metrics.jsonl").read_bytes() + line)


def summary_without(key: str) -> Callable[[Path], None]:
    def damage(f: Path) -> None:
        s = json.loads((f / "summary.json").read_text())
        del s[key]
        (f / "summary.json").write_text(json.dumps(s))
    return damage


@pytest.mark.parametrize(("damage", "says"), [
    (lambda f: (f / "summary.json").write_text("[1, 2]"), "r0/summary.json: expected a JSON object, got list"),
    (summary_without("mem/peak_gib"), "r0/summary.json: lacks ['mem/peak_gib']"),
    (summary_without("best/eval_accuracy"), "r0/summary.json: lacks ['best/eval_accuracy']"),
    (append_metrics(b'{"step": 70, "eval/loss": \n'), "r0/metrics.jsonl, line 8: malformed JSON"),
    (append_metrics(b'{"step": "70"}\n'), "r0/metrics.jsonl, line 8: step='70' is not a number"),
    (append_metrics(b'{"step": 70, "eval/loss": "low"}\n'), "r0/metrics.jsonl, line 8: eval/loss='low' is not a number"),
    (append_metrics(b'{"no_step": 1}\n'), "r0/metrics.jsonl, line 8: lacks ['step']"),
    (append_metrics(b'{"step": 70, "note": "\xff"}\n'), "r0/metrics.jsonl, line 8: not UTF-8 text"),
], ids=["summary list", "summary lacks mem", "summary lacks best", "metrics not JSON", "step a string",
        "eval loss a string", "row without step", "not UTF-8"])
def test_compare_names_the_file_and_line_of_a_bad_run(tmp_path, capsys, damage, says):
    assert compare.main([str(compare_run(tmp_path, damage)), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "abc"])
def test_compare_target_loss_must_be_reachable(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(compare_run(tmp_path)), "-o", str(tmp_path / "out"), "--target-loss", value])
    assert exit_.value.code == 2
    assert f"argument --target-loss: {value!r} is not a dev loss to reach: give a finite number > 0" in capsys.readouterr().err


def test_compare_into_an_unwritable_folder(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out"
    assert compare.main([str(compare_run(tmp_path)), "-o", str(out)]) == 2
    assert f"error: cannot write the comparison into -o {out} (Not a directory" in capsys.readouterr().err


# -- the real entrypoint: environment, argv, memory --

CLI = [*TINY_RUN, "model=tiny-llama"]
CLI_CASES: dict[str, tuple[list[str], dict[str, str], list[str], int]] = {  # argv, env, says, exit code
    "WORLD_SIZE without torchrun (rank 1)": (CLI, {"WORLD_SIZE": "2", "RANK": "1"},
                                             ["WORLD_SIZE=2 (RANK=1) is set, but this process was not started by torchrun",
                                              "torchrun --nproc_per_node 2"], 1),
    "WORLD_SIZE and MASTER_ADDR without torchrun": (CLI, {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                                          "MASTER_PORT": "29517"}, ["not started by torchrun"], 1),
    "a TT rank past memory": ([*CLI, "adapter.rank=100000000"], {}, ["error: out of memory", "adapter.rank"], 1),
    "TT modes as the README writes them": ([*CLI, "adapter.modes={64: [8, 8]}"], {}, [], 0),
    "overrides before --cfg": (["model=tiny-llama", "--cfg", "job"], {}, ["name: tiny-llama"], 0),
    "a disk that fills up at the second checkpoint": ([*CLI, "train.max_steps=4", "train.save_steps=2"],
                                                      {"ENOSPC_AT": "step-0000004"},
                                                      ["error: No space left on device", "free space on that disk"], 1),
}
# sitecustomize for ENOSPC_AT: opening a file for writing on a path containing it fails with ENOSPC,
# as a full disk makes the first write fail.
FULL_DISK = """import builtins, errno, io, os
_open = io.open
def full_disk_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and os.environ["ENOSPC_AT"] in str(file):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = full_disk_open
"""


def run_cli(argv: list[str], env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess:
    (tmp / "home").mkdir(parents=True)
    if "ENOSPC_AT" in env:
        (tmp / "site").mkdir()
        (tmp / "site" / "sitecustomize.py").write_text(FULL_DISK)
        env = {**env, "PYTHONPATH": os.pathsep.join([str(tmp / "site"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "adazeta.cli.train", f"hydra.run.dir={tmp / 'run'}", *argv], cwd=tmp,
                          env=subprocess_env(tmp / "home") | env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    folders = {name: tmp_path_factory.mktemp("cli") for name in CLI_CASES}
    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 2)) as pool:
        jobs = {n: pool.submit(run_cli, CLI_CASES[n][0], CLI_CASES[n][1], folders[n]) for n in CLI_CASES}
        return {n: (job.result(), folders[n]) for n, job in jobs.items()}


@pytest.mark.slow  # the entrypoint, one child process per case
@pytest.mark.parametrize("name", list(CLI_CASES))
def test_the_entrypoint_answers_in_one_line(cli, name):
    proc, _ = cli[name]
    _, _, says, code = CLI_CASES[name]
    text = output(proc)
    assert proc.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for fragment in says:
        assert fragment in text, text[-3000:]


@pytest.mark.slow  # the entrypoint, one child process per case
def test_the_readme_modes_reach_the_run(cli):
    from omegaconf import OmegaConf

    proc, tmp = cli["TT modes as the README writes them"]
    assert proc.returncode == 0, output(proc)[-3000:]
    assert OmegaConf.load(tmp / "run" / "config.yaml").adapter.modes == {64: [8, 8]}


def test_replay_save_into_an_unwritable_place(runs, tmp_path, capsys):  # noqa: F811
    from adazeta.cli import replay

    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        replay.main([str(runs["adazeta"]), "--save", str(tmp_path / "a_file" / "rebuilt.safetensors")])
    assert f"error: cannot write --save {tmp_path / 'a_file' / 'rebuilt.safetensors'}" in str(exit_.value.code)
    assert "Not a directory" in str(exit_.value.code)


@pytest.mark.slow  # the entrypoint, one child process per case
def test_a_full_disk_leaves_the_earlier_checkpoint_intact(cli):
    from adazeta.engine.checkpoint import damage

    proc, tmp = cli["a disk that fills up at the second checkpoint"]
    checkpoints = tmp / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith("step-")] == ["step-0000002"], output(proc)[-2000:]
    assert damage(checkpoints / "step-0000002") is None
