"""Bad input, in one table: each config, data file, checkpoint and run folder below fails with one
clear message naming the bad value and what to do.

The table runs in process: the config cases fail when Hydra composes or validate() checks the
config; the others run adazeta.engine.loop.run (or the replay) on tiny models until the error. A few cases
also go through the real CLI (one message, no traceback, the error kept in the run folder);
tests/test_errors.py has more CLI cases (unknown options, data files, model paths, devices).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, compose_config, job_config, output, run_entrypoints
from hydra.errors import ConfigCompositionException

from adazeta.cli.replay import replay
from adazeta.engine.loop import run
from adazeta.errors import AdazetaError
from adazeta.validate import validate

SOURCE = ["model=tiny-bert", "method=adazeta", *TINY_RUN, "train.max_steps=4", "train.save_steps=2"]
GOOD_DEV = "sentence\tlabel\nfine .\t1\nbad .\t0\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished runs to resume or replay: AdaZeta (checkpoints at steps 2 and 4), first-order
    fine-tuning, and AdaZeta without a replay log."""
    out = {}
    for name, overrides in {"adazeta": SOURCE, "ft": ["model=tiny-bert", "method=ft", *TINY_RUN],
                            "no_log": [*SOURCE, "train.replay_log=false"]}.items():
        out[name] = tmp_path_factory.mktemp(name) / "run"
        out[name].mkdir()
        run(job_config(compose_config(overrides)), out[name])
    return out


def copy_checkpoint(runs: dict[str, Path], tmp: Path) -> Path:
    """A copy of the AdaZeta run (to damage) and its newest checkpoint."""
    dst = tmp / "copy"
    shutil.copytree(runs["adazeta"], dst)
    return dst / "checkpoints" / "step-0000004"


def truncated(runs, tmp) -> list[str]:
    ckpt = copy_checkpoint(runs, tmp)
    data = (ckpt / "trainable.safetensors").read_bytes()
    (ckpt / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    return [*SOURCE, f"train.resume={ckpt.parent.parent}"]


def pickled(runs, tmp) -> list[str]:
    ckpt = copy_checkpoint(runs, tmp)
    torch.save({"w": torch.zeros(2)}, ckpt / "trainable.safetensors")  # a pickle under the right name
    return [*SOURCE, f"train.resume={ckpt.parent.parent}"]


def pickle_only(runs, tmp) -> list[str]:
    ckpt = copy_checkpoint(runs, tmp)
    (ckpt / "trainable.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, ckpt / "trainable.pt")
    return [*SOURCE, f"train.resume={ckpt}"]


def no_state_json(runs, tmp) -> list[str]:
    ckpt = copy_checkpoint(runs, tmp)
    (ckpt / "state.json").unlink()
    return [*SOURCE, f"train.resume={ckpt}"]


def broken_state_json(runs, tmp) -> list[str]:
    ckpt = copy_checkpoint(runs, tmp)
    (ckpt / "state.json").write_text('{"format": 1, "step": 4, "ident')
    return [*SOURCE, f"train.resume={ckpt}"]


def other_format(runs, tmp) -> list[str]:
    ckpt = copy_checkpoint(runs, tmp)
    (ckpt / "state.json").write_text(json.dumps({"format": 99, "step": 4}))
    return [*SOURCE, f"train.resume={ckpt}"]


def without_checkpoint(runs, tmp) -> list[str]:
    (tmp / "empty_run" / "checkpoints").mkdir(parents=True)
    return [*SOURCE, f"train.resume={tmp / 'empty_run'}"]


def data_dir(tmp: Path, files: dict[str, str]) -> str:
    folder = tmp / "data"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return str(folder)


def bad_label(runs, tmp) -> list[str]:
    folder = data_dir(tmp, {"train.tsv": "sentence\tlabel\nodd .\t7\n", "dev.tsv": GOOD_DEV})
    return [f"task.data_dir={folder}"]


def no_data_file(runs, tmp) -> list[str]:
    return [f"task.data_dir={data_dir(tmp, {'notes.txt': 'not data'})}"]


def a_file(tmp: Path) -> str:
    (tmp / "run.pt").write_bytes(b"\x80\x04")
    return str(tmp / "run.pt")


Make = Callable[[dict, Path], "list[str] | Path"]  # -> overrides (a run), or a folder (a replay)
# (id, make, fragments the message must contain)
CASES: list[tuple[str, Make, list[str]]] = [
    # -- config, at compose time (Hydra + the structured schema) --
    ("unknown key", lambda r, t: ["train.max_step=10"], ["train.max_step", "+train.max_step=10"]),
    ("wrong type", lambda r, t: ["seed=abc"], ["seed", "'abc'", "could not be converted to Integer"]),
    ("bad guard.action", lambda r, t: ["guard.action=retry"], ["guard.action", "'retry'", "stop, rollback"]),
    # -- config, ranges (adazeta/validate.py) --
    ("eps = 0", lambda r, t: ["method.eps=0"], ["method.eps=0.0 is out of range: it must be > 0"]),
    ("TT rank 0", lambda r, t: ["adapter.rank=0"], ["adapter.rank=0 is out of range: it must be >= 1"]),
    ("Q_max 0", lambda r, t: ["schedule.q_max=0"], ["schedule.q_max=0 is out of range: it must be >= 1"]),
    ("sparsity 1", lambda r, t: ["method=sparse_mezo", "method.sparse.sparsity=1.0"], ["method.sparse.sparsity=1.0", "in [0, 1)"]),
    ("save_total_limit 0", lambda r, t: ["train.save_total_limit=0"],
     ["train.save_total_limit=0 is out of range: it must be >= 1"]),
    ("save_steps < 0", lambda r, t: ["train.save_steps=-5"], ["train.save_steps=-5", ">= 0"]),
    ("explode_factor 1", lambda r, t: ["guard.explode_factor=1"], ["guard.explode_factor=1.0", "> 1", "null"]),
    ("lr_factor 1", lambda r, t: ["guard.lr_factor=1"], ["guard.lr_factor=1.0", "in (0, 1)"]),
    ("max_rollbacks 0", lambda r, t: ["guard.max_rollbacks=0"], ["guard.max_rollbacks=0", ">= 1"]),
    ("guard window 0", lambda r, t: ["guard.window=0"], ["guard.window=0", ">= 1"]),
    ("threads 0", lambda r, t: ["train.threads=0"], ["train.threads=0", ">= 1"]),
    ("resume folder missing", lambda r, t: [f"train.resume={t / 'nope'}"],
     ["train.resume='{tmp}/nope' does not exist", "checkpoints/step-<N>", "auto"]),
    ("resume is a file", lambda r, t: [f"train.resume={a_file(t)}"], ["is a file", "give the folder of an earlier run"]),
    # -- model and data --
    ("model dtype", lambda r, t: ["model.dtype=float64"], ["model.dtype='float64' is not supported", "bfloat16"]),
    ("label outside the set", bad_label, ["{tmp}/data/train.tsv, row 1", "label '7'", "[0, 1]"]),
    ("data folder without files", no_data_file, ["{tmp}/data", "train.tsv", "notes.txt"]),
    # -- checkpoints --
    ("resume folder without checkpoint", without_checkpoint, ["has no checkpoint", "train.save_steps", "start this run afresh"]),
    ("incomplete checkpoint", no_state_json, ["is an incomplete checkpoint (no state.json)", "resume from its run folder"]),
    ("damaged state.json", broken_state_json, ["cannot read", "state.json", "resume from another checkpoint"]),
    ("checkpoint of another format", other_format, ["is not an adazeta checkpoint of format 1"]),
    ("checkpoint of another method", lambda r, t: ["model=tiny-bert", "method=mezo", *TINY_RUN, f"train.resume={r['adazeta']}"],
     ["belongs to a different run: method='adazeta' (this run: 'mezo')", "same method, model, task and seed"]),
    ("checkpoint of another seed", lambda r, t: [*SOURCE, "seed=1", f"train.resume={r['adazeta']}"],
     ["seed=0 (this run: 1)"]),
    ("checkpoint of another trainable set", lambda r, t: [*SOURCE, "adapter.rank=3", f"train.resume={r['adazeta']}"],
     ["different trainable set: shape/dtype differs (checkpoint vs this run): ", "[1, 4, 5] float32 vs [1, 4, 3] float32",
      "same method, adapter and LoRA settings"]),
    ("checkpoint past max_steps", lambda r, t: [*SOURCE, "train.max_steps=3", f"train.resume={r['adazeta']}"],
     ["is at step 4, past train.max_steps=3", "train.max_steps >= 4"]),
    ("truncated safetensors", truncated, ["trainable.safetensors", "damaged or truncated", "safetensors only"]),
    ("pickle in place of safetensors", pickled, ["a pickle, not safetensors", "loaded with safetensors only"]),
    ("pickle instead of safetensors", pickle_only, ["trainable.safetensors is missing", "found trainable.pt",
                                                   "never unpickled"]),
    # -- replay --
    ("replay of a first-order run", lambda r, t: r["ft"], ["method=ft is first-order", "ZO runs"]),
    ("replay of a run without a log", lambda r, t: r["no_log"], ["train.replay_log=false"]),
    ("replay of a folder that is no run", lambda r, t: t, ["is not a run folder (no config.yaml)"]),
]


def error_of(made: list[str] | Path, tmp: Path) -> str:
    """The message of the AdazetaError (or Hydra composition error) the input raises."""
    try:
        if isinstance(made, Path):
            replay(made)
        else:
            cfg = compose_config(["model=tiny-bert", *TINY_RUN, *made])
            validate(cfg)
            (tmp / "run").mkdir()
            run(job_config(cfg), tmp / "run")
    except ConfigCompositionException as e:
        parts, exc = [], e
        while exc is not None:
            parts.append(str(exc))
            exc = exc.__cause__ or exc.__context__
        return "\n".join(parts)
    except AdazetaError as e:
        return str(e)
    pytest.fail("no error was raised")


def test_the_table_has_twenty_distinct_bad_inputs():
    assert len({name for name, _, _ in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize(("name", "make", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_its_clear_error(runs, tmp_path, name, make, fragments):
    message = error_of(make(runs, tmp_path), tmp_path)
    for fragment in fragments:
        fragment = fragment.replace("{tmp}", str(tmp_path))
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_trust_remote_code_is_only_what_the_user_sets(monkeypatch):
    """Every from_pretrained call gets model.trust_remote_code, False unless the user sets it."""
    from adazeta.models import load as models

    seen = []
    for cls in (models.AutoConfig, models.AutoTokenizer, models.AutoModel):
        original = cls.from_pretrained.__func__

        def spy(c, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "absent"))
            return _original(c, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    assert compose_config([]).model.trust_remote_code is False
    for value in (False, True):
        seen.clear()
        cfg = job_config(compose_config(["model=minilm", "model.device=cpu", f"model.trust_remote_code={value}"]))
        models.load_model(cfg.model)
        assert seen and set(seen) == {value}
    source = "\n".join(p.read_text() for p in Path(models.__file__).parents[1].rglob("*.py"))
    assert "trust_remote_code=True" not in source


def test_nothing_is_unpickled():
    """Checkpoints and weights are read with safetensors; any torch.load must pass weights_only=True."""
    from adazeta.models import load as models

    for path in Path(models.__file__).parents[1].rglob("*.py"):
        text = path.read_text()
        assert "pickle.load" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


CLI_CASES = {  # one range error, one checkpoint error: two processes, one per core
    "save_total_limit 0": ["train.save_total_limit=0"],
    "pickle in place of safetensors": None,
}


@pytest.mark.slow  # the entrypoint in child processes
def test_checkpoint_errors_through_the_cli(runs, tmp_path_factory):
    """One message, `error: ` first, no traceback, and error.txt in the new run folder."""
    jobs, expected = {}, {}
    for name, make, fragments in CASES:
        if name in CLI_CASES:
            tmp = tmp_path_factory.mktemp("cli")
            made = CLI_CASES[name] or make(runs, tmp)
            jobs[name] = (["model=tiny-bert", *TINY_RUN, *made], tmp)
            expected[name] = fragments
    done = run_entrypoints(jobs)
    for name, proc in done.items():
        text = output(proc)
        assert proc.returncode != 0 and "Traceback" not in text, text[-3000:]
        assert "error: " in text
        for fragment in expected[name]:
            assert fragment in text
        assert expected[name][0] in (jobs[name][1] / "run" / "error.txt").read_text()
