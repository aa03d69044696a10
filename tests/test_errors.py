"""Bad inputs to the real entrypoint: each exits non-zero with one clear message that names the bad
value and what to do, and no Python traceback.

The cases run as concurrent subprocesses (a module fixture); each test checks one of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, config_options, output, run_entrypoints

# Every case runs the entrypoint in a child process (the module fixture below).
pytestmark = pytest.mark.slow

BASE = ["method=mezo", *TINY_RUN]


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path.parent)


def case_inputs(tmp: Path) -> dict[str, list[str]]:
    """Each case's overrides; data files go into the case's own folder."""
    good_dev = "sentence\tlabel\nfine .\t1\nbad .\t0\n"
    no_file = tmp / "data_no_file"
    no_file.mkdir()
    (no_file / "notes.txt").write_text("not data\n")
    missing_col = write(tmp / "data_missing_col" / "train.jsonl", "\n".join([
        '{"sentence": "good .", "label": 1}', '{"sentence": "bad .", "label": 0}',
        '{"review": "odd .", "label": 1}', '{"sentence": "fine .", "label": 1}',
    ]) + "\n")
    write(tmp / "data_missing_col" / "dev.tsv", good_dev)
    bad_label = write(tmp / "data_bad_label" / "train.tsv", "sentence\tlabel\ngood .\t1\nodd .\t7\nbad .\t0\n")
    write(tmp / "data_bad_label" / "dev.tsv", good_dev)
    return {
        "unknown_model": [*BASE, "model=nope"],
        "unknown_task": [*BASE, "model=tiny-bert", "task=nope"],
        "unknown_method": [*TINY_RUN, "model=tiny-bert", "method=nope"],
        "data_dir_without_files": [*BASE, "model=tiny-bert", f"task.data_dir={no_file}"],
        "missing_column": [*BASE, "model=tiny-bert", f"task.data_dir={missing_col}"],
        "bad_label": [*BASE, "model=tiny-bert", f"task.data_dir={bad_label}"],
        "hf_nonexistent_path": [*BASE, "model=hf", "model.path=/nonexistent"],
        "cuda_without_cuda": [*BASE, "model=tiny-bert", "model.device=cuda"],
    }


CASES = [
    "unknown_model", "unknown_task", "unknown_method", "data_dir_without_files", "missing_column",
    "bad_label", "hf_nonexistent_path", "cuda_without_cuda",
]


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> dict:
    """{case: (CompletedProcess, tmp folder)}; every case runs in its own folder."""
    jobs, folders = {}, {}
    for name in CASES:
        if name == "cuda_without_cuda" and torch.cuda.is_available():
            continue
        tmp = tmp_path_factory.mktemp(name)
        jobs[name] = (case_inputs(tmp)[name], tmp)
        folders[name] = tmp
    done = run_entrypoints(jobs)
    return {name: (done[name], folders[name]) for name in done}


def failed(failures, case) -> tuple[str, Path]:
    """The combined output of a failed run, checked for a non-zero exit and no traceback."""
    if case not in failures:
        pytest.skip(f"{case}: not run on this machine (CUDA is present, so there is no error to check)")
    proc, tmp = failures[case]
    text = output(proc)
    assert proc.returncode != 0, text[-2000:]
    assert "Traceback" not in text, text[-4000:]
    return text, tmp


def error_file(tmp: Path) -> str:
    """Errors raised after the run folder exists are also kept in it, as error.txt."""
    return (tmp / "run" / "error.txt").read_text()


@pytest.mark.parametrize("group", ["model", "task", "method"])
def test_unknown_option_lists_valid_ones(failures, group):
    text, _ = failed(failures, f"unknown_{group}")
    assert f"Could not find '{group}/nope'" in text
    for option in config_options(group):
        assert option in text


def test_data_dir_without_the_expected_file(failures):
    text, tmp = failed(failures, "data_dir_without_files")
    folder = str(tmp / "data_no_file")
    assert folder in text
    assert "train.tsv" in text and "train.jsonl" in text  # what it looked for
    assert "notes.txt" in text  # and what it found instead
    assert folder in error_file(tmp)


def test_data_file_missing_the_sentence_column(failures):
    text, tmp = failed(failures, "missing_column")
    assert f"{tmp / 'data_missing_col' / 'train.jsonl'}, row 3" in text
    assert "missing column 'sentence'" in text
    assert "review" in text  # the columns the row does have
    assert "row 3" in error_file(tmp)


def test_label_outside_the_label_set(failures):
    text, tmp = failed(failures, "bad_label")
    assert f"{tmp / 'data_bad_label' / 'train.tsv'}, row 2" in text
    assert "label '7'" in text and "[0, 1]" in text
    assert "'7'" in error_file(tmp)


def test_hf_model_path_that_does_not_exist(failures):
    text, tmp = failed(failures, "hf_nonexistent_path")
    assert "model.path='/nonexistent'" in text
    assert "is not a folder" in text and "local folder" in text  # says what is wrong and what would work
    assert "/nonexistent" in error_file(tmp)


def test_cuda_device_without_cuda(failures):
    text, tmp = failed(failures, "cuda_without_cuda")
    assert "model.device='cuda'" in text and "CUDA is not available" in text
    assert "cpu" in text  # what to use instead
    assert "CUDA" in error_file(tmp)
