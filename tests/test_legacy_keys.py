"""The flat method keys of earlier releases (`method.lora_r`): each method's own settings sit in
its node (`method.lora.r`); a flat key on the command line, in compose_config, in a study plan or
as a library keyword is rewritten to it with a warning naming the new key, a flat key in a yaml
file fails naming it, and a run folder saved with flat keys still replays and is found by
`train.resume=auto`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import SMALL, compose_config, job_config, output
from omegaconf import OmegaConf

from adazeta.api import compose_method
from adazeta.cli.replay import replay
from adazeta.cli.study import point_name
from adazeta.engine.checkpoint import config_changes, plain_config
from adazeta.engine.loop import run
from adazeta.errors import ConfigError
from adazeta.legacy_keys import FLAT_KEYS, upgrade_config
from adazeta.validate import check_ignored, validate

# flat key -> (a method that reads it, a value other than the preset's)
CASES = {
    "lora_r": ("mezo_lora", "4"), "lora_alpha": ("mezo_lora", "8"), "lora_dropout": ("lora_fo", "0.1"),
    "lora_targets": ("mezo_lora", "[q_proj]"), "num_prefix": ("mezo_prefix", "3"),
    "prefix_init_by_real_act": ("mezo_prefix", "false"), "sparsity": ("sparse_mezo", "0.5"),
    "mask": ("sparse_mezo", "random"), "keep_ratio": ("sparse_mezo", "0.5"), "in_forward": ("sparse_mezo", "false"),
    "fzoo_n": ("fzoo", "4"), "lozo_rank": ("lozo", "3"), "lozo_interval": ("lozo", "7"), "hizoo_alpha": ("hizoo", "1e-06"),
}


def test_every_flat_key_has_a_case():
    assert set(CASES) == set(FLAT_KEYS)


@pytest.mark.parametrize("old", list(CASES))
def test_a_flat_override_is_rewritten_with_a_warning_naming_the_new_key(old):
    method, value = CASES[old]
    new = FLAT_KEYS[old]
    with pytest.warns(FutureWarning, match=rf"method\.{old} is deprecated: use method\.{new.replace('.', '[.]')}"):
        flat = compose_config([f"method={method}", f"method.{old}={value}"], hydra_config=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new key composes without a warning
        nested = compose_config([f"method={method}", f"method.{new}={value}"], hydra_config=False)
    assert OmegaConf.to_container(flat) == OmegaConf.to_container(nested)
    node, leaf = new.split(".")
    preset = compose_config([f"method={method}"], hydra_config=False)
    assert nested.method[node][leaf] != preset.method[node][leaf]  # the override did change something


def test_the_command_line_rewrites_a_flat_key_and_names_the_new_one(entrypoint):
    proc = entrypoint("--cfg", "job", "method=mezo_lora", "method.lora_r=4")
    assert proc.returncode == 0, output(proc)
    assert "method.lora_r is deprecated: use method.lora.r" in proc.stderr
    assert yaml.safe_load(proc.stdout)["method"]["lora"]["r"] == 4


def write_experiment(root: Path) -> Path:
    (root / "experiment").mkdir(parents=True)
    (root / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /method: mezo_lora\nmethod:\n  lora_r: 4\n")
    return root


def test_a_flat_key_in_a_yaml_file_fails_naming_the_new_key(tmp_path, entrypoint):
    root = write_experiment(tmp_path / "mine")
    with pytest.raises(ConfigError, match=r"method\.lora_r is deprecated: use method\.lora\.r.*'experiment/mine'.*"
                                          r"`lora: \{r: \.\.\.\}`"):
        compose_config([f"hydra.searchpath=[file://{root}]", "experiment=mine"])
    proc = entrypoint("--cfg", "job", f"hydra.searchpath=[file://{root}]", "experiment=mine")
    assert proc.returncode == 1
    assert "error: method.lora_r is deprecated: use method.lora.r" in proc.stderr


def test_an_unread_nested_key_is_refused_by_its_key():
    cfg = compose_config(["method=mezo", "method.fzoo.n=4"])
    with pytest.raises(ConfigError, match=r"method\.fzoo\.n is not read by method=mezo.*method\.estimator=fzoo.*"
                                          r"method=fzoo.*drop 'method\.fzoo\.n=4'"):
        validate(cfg, ["method.fzoo.n=4"])
    with pytest.raises(ConfigError, match=r"method\.lora is not read by method=mezo.*method\.trainable=lora"):
        check_ignored(cfg, ["method.lora={r:4}"])
    with pytest.raises(ConfigError, match=r"method\.lozo\.rank is not read by method=mezo"):  # a flat key, rewritten
        with pytest.warns(FutureWarning, match="use method.lozo.rank"):
            validate(compose_config(["method=mezo", "method.lozo_rank=3"]))


def test_the_api_takes_a_node_as_a_dict_and_flat_keywords_with_a_warning():
    cfg = compose_method("hizoo_lora", lora={"r": 4})
    assert OmegaConf.to_container(cfg.method.lora) == {"r": 4, "alpha": 16, "dropout": 0.0, "targets": None}
    with pytest.warns(FutureWarning) as record:
        flat = compose_method("hizoo_lora", lora={"r": 4}, lora_alpha=8, hizoo_alpha=1e-6)
    said = " ".join(str(w.message) for w in record)
    assert "method.lora_alpha is deprecated: use method.lora.alpha" in said
    assert "method.hizoo_alpha is deprecated: use method.hizoo.alpha" in said
    assert OmegaConf.to_container(flat.method) == OmegaConf.to_container(
        compose_method("hizoo_lora", lora={"r": 4, "alpha": 8}, hizoo={"alpha": 1e-6}).method)
    with pytest.raises(ConfigError, match=r"lora=\{'rank': 4\}.*the keys of lora: r, alpha, dropout, targets"):
        compose_method("mezo_lora", lora={"rank": 4})
    with pytest.raises(ConfigError, match=r"method\.fzoo\.n is not read by method=mezo"):
        compose_method("mezo", fzoo={"n": 4})
    with pytest.raises(ConfigError, match=r"valid keys: .*lora=\{r, alpha, dropout, targets\}"):
        compose_method("mezo_lora", lora_rank=4)


def test_study_folders_keep_their_flat_names():
    assert point_name({"method.lr": 1e-5, "method.hizoo.alpha": 1e-8}) == "lr1e-05_hizoo_alpha1e-08"
    assert point_name({"method.sparse.sparsity": 0.5}) == point_name({"method.sparsity": 0.5}) == "sparsity0.5"


def flatten_method(cfg: dict) -> dict:
    """A config as an earlier release saved it: every node's keys back at their flat names."""
    method = cfg["method"]
    for old, new in FLAT_KEYS.items():
        node, leaf = new.split(".")
        method[old] = method[node][leaf]
    for node in {new.split(".")[0] for new in FLAT_KEYS.values()}:
        del method[node]
    return cfg


RUN = [*SMALL, "model=tiny-llama", "method=mezo_lora", "method.lr=1e-3", "method.lora.r=4", "train.max_steps=6",
       "train.eval_steps=3", "train.save_steps=3", "train.save_total_limit=5"]


def train(root: Path, name: str, *overrides: str) -> Path:
    run_dir = root / "runs" / "day" / name
    run_dir.mkdir(parents=True)
    cfg = job_config(compose_config([*RUN, *overrides]))
    validate(cfg)
    run(cfg, run_dir)
    return run_dir


def test_a_run_saved_with_flat_keys_replays_and_resumes_with_auto(tmp_path):
    old = train(tmp_path, "old")
    saved = yaml.safe_load((old / "config.yaml").read_text())
    (old / "config.yaml").write_text(yaml.safe_dump(flatten_method(saved)))
    for state in (old / "checkpoints").glob("step-*/state.json"):
        record = json.loads(state.read_text())
        record["config"] = flatten_method(record["config"])
        state.write_text(json.dumps(record))
    assert "lora_r" in (old / "config.yaml").read_text()

    out = replay(old)
    assert out["steps"] == 6 and out["unequal"] == [], out
    mine = plain_config(job_config(compose_config([*RUN, "train.resume=auto"])))
    assert config_changes(record["config"], mine) == []
    assert upgrade_config(flatten_method(plain_config(job_config(compose_config(RUN)))))["method"]["lora"]["r"] == 4

    resumed = train(tmp_path, "new", "train.resume=auto")
    assert (resumed / "resumed_from.txt").read_text().strip() == str(old / "checkpoints" / "step-0000006")
