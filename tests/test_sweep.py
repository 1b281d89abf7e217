"""Sweeps and the trainer library: a member equals its single run, a killed sweep resumes bit for
bit, shape-changing keys form groups, members export; the typed config, config files, --help."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

import train
from jax_sae.export import saelens
from jax_sae.report import runs
from jax_sae.training import TrainConfig, Trainer
from jax_sae.training.config import RESOLVED_CONFIG, ConfigError, parse_sweep
from jax_sae.training.sweep import SWEEP_FILE
from tests.test_faults import assert_same_weights
from tests.test_train_cli import LAYER, REPO, args, one_error_line, write_cache

STEPS = 30
SWEEP = ("--sweep", "lambda=0.003,0.03", "--sweep", "seed=0,1")
MEMBERS = ("lambda=0.003_seed=0", "lambda=0.003_seed=1", "lambda=0.03_seed=0", "lambda=0.03_seed=1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("cache") / "c")


@pytest.fixture(scope="module")
def sweep(cache, tmp_path_factory) -> Path:
    """One uninterrupted 4-member sweep that the other tests compare against."""
    out = tmp_path_factory.mktemp("runs") / "sweep"
    assert train.main(args(cache, out, "--steps", str(STEPS), *SWEEP)) == 0
    return out


def weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(run / runs.PARAMS)


def assert_close_weights(run: Path, reference: Path) -> None:
    """Equal to float32 tolerance: a vmapped step may round differently from a plain one."""
    expected, actual = weights(reference), weights(run)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_every_member_is_a_complete_run_folder_with_a_report(sweep):
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(MEMBERS)
    record = runs.read_json(sweep / SWEEP_FILE)
    assert record["groups"] == [list(MEMBERS)]  # float keys and seeds share one vmapped step
    for name in MEMBERS:
        member = sweep / name
        assert runs.read_status(member)["state"] == runs.FINISHED
        config = runs.read_json(member / runs.CONFIG)
        assert config["sweep"]["member"] == name and config["data_seed"] == 0
        assert len(runs.MetricsLog(member / runs.METRICS).read()) == STEPS // 5
        assert (member / "plots" / "training_curves.png").exists()
    table = (sweep / "sweep.md").read_text()
    assert all(name in table for name in MEMBERS) and "EV (1 - FVU)" in table
    assert (sweep / "pareto.png").stat().st_size > 10_000
    # the members differ: lambda and the seed reach the step
    a, b, c = (weights(sweep / name)["W_enc"] for name in MEMBERS[:3])
    assert not np.allclose(a, b) and not np.allclose(a, c)


@pytest.mark.slow
def test_a_member_equals_the_same_single_run(sweep, cache, tmp_path):
    single = tmp_path / "single"
    sets = ("d_sae=64", "warmup_steps=5", "lr=0.01", "lambda=0.03")
    argv = args(cache, single, "--steps", str(STEPS), "--seed", "1", "--data-seed", "0", sets=sets)
    assert train.main(argv) == 0
    member = sweep / "lambda=0.03_seed=1"
    assert_close_weights(member, single)
    assert (
        runs.read_json(single / runs.CONFIG)["config_hash"]
        == (runs.read_json(member / runs.CONFIG)["config_hash"])
    )  # so a member resumes and compares as the single run it is


@pytest.mark.slow
def test_killed_sweep_resumes_bit_for_bit(sweep, cache, tmp_path):
    out = tmp_path / "killed"
    argv = args(cache, out, "--steps", str(STEPS), *SWEEP)
    # the third member's orbax commit of step 20: two members hold step 20, two only step 10
    proc = subprocess.run(
        [sys.executable, "tests/kill_at.py", "checkpoints/20", "3", "train", *argv],
        cwd=REPO, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert saelens.main([str(out / MEMBERS[0])]) == 2  # not finished: refused
    assert train.main([*argv, "--resume"]) == 0
    for name in MEMBERS:
        assert_same_weights(out / name, sweep / name)


@pytest.mark.slow
def test_shape_changing_keys_train_as_separate_groups_and_members_export(cache, tmp_path, capsys):
    out = tmp_path / "k"
    sets = ("d_sae=64", "warmup_steps=5", "lr=0.01")
    argv = args(cache, out, "--steps", "10", "--sweep", "k=2,4", variant="topk", sets=sets)
    assert train.main(argv) == 0
    assert runs.read_json(out / SWEEP_FILE)["groups"] == [["k=2"], ["k=4"]]
    single = tmp_path / "single"
    assert (
        train.main(args(cache, single, "--steps", "10", variant="topk", sets=(*sets, "k=4"))) == 0
    )
    for key, value in weights(single).items():
        np.testing.assert_allclose(weights(out / "k=4")[key], value, rtol=1e-5, atol=1e-6)
    assert saelens.main([str(out / "k=4"), "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "cfg.json").read_text())["k"] == 4


@pytest.mark.slow
def test_a_key_that_sets_a_shape_inside_the_step_falls_back_to_one_member_at_a_time(
    cache, tmp_path, capsys
):
    """pair_ortho's rho sets how many pairs are kept (a size): it cannot be a traced array."""
    out = tmp_path / "rho"
    sets = ("d_sae=32", "warmup_steps=5", "lr=0.01")
    argv = args(cache, out, "--steps", "5", "--sweep", "rho=0.01,0.02", variant="pair_ortho")
    assert train.main(argv + [f"--set={item}" for item in sets]) == 0
    assert "rho cannot vary inside one vmapped step" in capsys.readouterr().err
    for name in ("rho=0.01", "rho=0.02"):
        assert runs.read_status(out / name)["state"] == runs.FINISHED


def test_sweep_folder_of_other_values_is_refused(sweep, cache, capsys):
    argv = args(cache, sweep, "--steps", str(STEPS), "--sweep", "lambda=0.1,0.2", "--resume")
    assert train.main(argv) == 2
    assert "holds a sweep over other values" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["lambda"], "is not KEY=V1,V2"),
        (["lambda=0.1", "lambda=0.2"], "names 'lambda' twice"),
        (["seed=1,1"], "repeats a value"),
    ],
)
def test_bad_sweep_items_are_one_line(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep(items)


@pytest.mark.slow
def test_trainer_from_python_with_tensorboard_and_offline_wandb(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "py"
    config = TrainConfig(
        cache=str(cache),
        layer=LAYER,
        variant="standard",
        hparams={"d_sae": 64, "lr": 0.01, "warmup_steps": 5},
        steps=10,
        batch_size=32,
        eval_tokens=160,
        out=str(out),
        tensorboard=True,
        wandb="jax-sae-lab-test",
    )
    (finished,) = Trainer(config).fit()
    assert finished.out == out and finished.status == runs.FINISHED
    assert finished.fast_eval["l0"] > 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "wandb").glob("offline-run-*"))
    records = runs.MetricsLog(out / runs.METRICS).read()
    assert len(records) == 10  # default log interval: about 200 points, here every step
    assert all("lr" in r and "grad_norm" in r for r in records)


@pytest.mark.slow
def test_resolved_config_file_repeats_the_run(sweep, cache, tmp_path):
    member = sweep / MEMBERS[3]
    settings = yaml.safe_load((member / RESOLVED_CONFIG).read_text())
    assert settings["hparams"]["lambda"] == 0.03 and settings["seed"] == 1
    assert settings["data_seed"] == 0 and settings["sweep"] == [] and settings["steps"] == STEPS
    toml = tmp_path / "run.toml"  # the same settings as TOML, with flags next to it winning
    toml.write_text(f'cache = "{cache}"\nlayer = {LAYER}\nvariant = "standard"\n')
    again = tmp_path / "again"
    assert train.main(["--config", str(member / RESOLVED_CONFIG), "--out", str(again)]) == 0
    assert_close_weights(again, member)  # the single run a member is, to float32 tolerance
    assert train.main(["--config", str(toml), "--help-variant", "standard"]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("layer: [1\n", "is not valid yaml"),
        ("nope: 1\n", "unknown setting 'nope'"),
        ("- 1\n", "must hold a mapping"),
    ],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, content, message):
    file = tmp_path / "bad.yaml"
    file.write_text(content)
    assert train.main(["--config", str(file)]) == 2
    assert message in one_error_line(capsys)


def test_missing_required_setting_is_one_line(capsys):
    assert train.main(["--layer", "1", "--variant", "topk"]) == 2
    assert "--cache is required" in one_error_line(capsys)


def test_help_lists_every_flag_and_help_variant_every_hyperparameter(capsys):
    assert train.main(["--help"]) == 0
    text = capsys.readouterr().out
    for field in TrainConfig.__dataclass_fields__:
        if field != "hparams":
            assert f"--{field.replace('_', '-')}" in text, field
    assert "--set" in text and "--config" in text and "--help-variant" in text
    assert train.main(["--help-variant", "topk"]) == 0
    text = capsys.readouterr().out
    assert "k_aux" in text and "alpha_aux" in text and "dead_tokens" in text
    assert train.main(["--help-variant", "nope"]) == 2
    assert "unknown variant 'nope'" in one_error_line(capsys)
