"""Config files and the command line next to them: every file value checked against its
TrainConfig field's type, command-line flags replacing the file's (lists and run length
included), duplicate sweep values refused, a resumed sweep given its values in another order,
and diverged members marked in sweep.md."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import train
from jax_sae.report import compare, runs
from jax_sae.training import TrainConfig
from jax_sae.training.config import (
    ConfigError,
    check_setting,
    parse_sweep,
    read_config_file,
    write_config_file,
)
from jax_sae.training.sweep import SWEEP_FILE, expand
from tests.test_compare import fake_run, table_lines
from tests.test_train_cli import LAYER, args, one_error_line, write_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("cache") / "c")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BOOL = "'normalize' must be true or false, got the string \"false\"; write normalize"
STEPS = "'steps' must be an integer, got the"
BAD_FILES = [
    ("run.toml", 'layer = "two"\n', "'layer' must be an integer, got the string \"two\""),
    (
        "run.yaml",
        'layer: "2"\n',
        "'layer' must be an integer, got the string \"2\"; write layer: 2",
    ),
    ("run.yaml", "steps: 1e2\n", f'{STEPS} string "1e2"; write steps: 100'),
    ("run.yaml", "steps: 1.0e+2\n", f"{STEPS} number 100.0; write steps: 100"),
    ("run.toml", "steps = 1e2\n", f"{STEPS} number 100.0; write steps = 100"),
    ("run.yaml", "steps: 2.5\n", f"{STEPS} number 2.5; write a whole number"),
    ("run.yaml", "1: 3\n", "unknown setting 1;"),
    ("run.yaml", "hparams: [1, 2]\n", "'hparams' must be a mapping of KEY: VALUE"),
    ("run.yaml", "hparams: {1: 2}\n", "'hparams' must be a mapping of KEY: VALUE (string keys)"),
    ("run.yaml", "normalize: 'false'\n", f"{BOOL}: false without quotes"),
    ("run.toml", 'normalize = "false"\n', f"{BOOL} = false without quotes"),
    ("run.yaml", "batch_size:\n", "'batch_size' must be an integer, got null"),
    ("run.yaml", "diverge_loss_factor: inf\n", 'string "inf"; write diverge_loss_factor: .inf'),
    ("run.yaml", "cache: 5\n", "'cache' must be a string, got the integer 5"),
    ("run.yaml", "sweep: lambda=0.1,0.2\n", 'write e.g. sweep: ["lambda=0.1,0.2"]'),
    ("run.yaml", "sweep: [1, 2]\n", "'sweep' must be a list of strings"),
    ("run.yaml", "batch-size: 8\nbatch_size: 16\n", "gives 'batch_size' twice"),
    ("run.yaml", "steps: 3\ntokens: 96\n", "gives steps and tokens; keep one of them"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_FILES)
def test_config_file_values_are_checked_against_the_field_types(
    tmp_path, capsys, name, text, message
):
    file = write(tmp_path, name, text)
    assert train.main(["--config", str(file), "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: --config {file}: ") or line.startswith(
        f"error: --config {file} "
    )
    assert message in line
    assert not (tmp_path / "run").exists()


def test_well_typed_values_pass_and_a_float_field_takes_an_integer(tmp_path):
    file = write(
        tmp_path,
        "run.yaml",
        "layer: 1\nnormalize: false\ndiverge_loss_factor: 3\ndiverge_min_ev: -.inf\n"
        "hparams: {k: 8}\nsweep: ['lambda=0.1,0.2']\nout: null\n",
    )
    settings = read_config_file(file)
    assert settings["normalize"] is False and settings["layer"] == 1 and settings["out"] is None
    assert type(settings["diverge_loss_factor"]) is float and settings["diverge_min_ev"] < 0
    assert check_setting("seed", 0) == 0


def test_the_resolved_train_config_passes_its_own_checks(tmp_path):
    """train_config.yaml is what --config of a run folder reads back."""
    config = TrainConfig(cache="c", layer=1, variant="standard", hparams={"k": 8, "lr": 1e-3})
    write_config_file(tmp_path / "train_config.yaml", config.replace(diverge_loss_factor=1e9))
    settings = read_config_file(tmp_path / "train_config.yaml")
    assert TrainConfig(**settings) == config.replace(diverge_loss_factor=1e9)


def test_command_line_sweep_replaces_the_files_sweep(tmp_path):
    file = write(tmp_path, "run.yaml", "layer: 1\nsweep: ['lambda=0.1,0.2']\n")
    command = train.parse_command(["--config", str(file), "--sweep", "seed=0,1"])
    assert command.train.sweep == ["seed=0,1"]
    both = train.parse_command([f"--config={file}", "--sweep", "seed=0,1", "--sweep", "k=4,8"])
    assert both.train.sweep == ["seed=0,1", "k=4,8"]
    assert train.parse_command(["--config", str(file)]).train.sweep == ["lambda=0.1,0.2"]


@pytest.mark.slow
def test_command_line_set_overrides_the_files_hparams_key_by_key(cache, tmp_path):
    file = write(
        tmp_path,
        "run.yaml",
        f"cache: {json.dumps(str(cache))}\nlayer: {LAYER}\nvariant: standard\nsteps: 2\n"
        "batch_size: 32\neval_tokens: 160\ndiverge_min_ev: -.inf\n"
        "hparams: {d_sae: 32, lambda: 0.5, lr: 0.01}\n",
    )
    out = tmp_path / "run"
    assert train.main(["--config", str(file), "--set", "lambda=0.25", "--out", str(out)]) == 0
    config = runs.read_json(out / runs.CONFIG)
    assert config["hparams"]["lambda"] == 0.25 and config["hparams"]["lr"] == 0.01
    assert config["d_sae"] == 32


def test_command_line_run_length_replaces_the_files(tmp_path):
    """--tokens next to a file with steps (e.g. a run's train_config.yaml) was refused with
    'give --steps or --tokens, not both' though only one was given."""
    file = write(tmp_path, "run.yaml", "layer: 1\nsteps: 3\n")
    command = train.parse_command(["--config", str(file), "--tokens", "100"])
    assert (command.train.steps, command.train.tokens) == (None, 100)
    command = train.parse_command(["--config", str(file), "--steps", "5"])
    assert (command.train.steps, command.train.tokens) == (5, None)
    command = train.parse_command(["--config", str(file)])
    assert (command.train.steps, command.train.tokens) == (3, None)
    tokens = write(tmp_path, "tokens.yaml", "layer: 1\ntokens: 640\n")
    command = train.parse_command(["--config", str(tokens), "--steps", "5"])
    assert (command.train.steps, command.train.tokens) == (5, None)


@pytest.mark.slow
def test_config_with_tokens_trains_for_the_tokens(cache, tmp_path, capsys):
    file = write(
        tmp_path,
        "run.yaml",
        f"cache: {json.dumps(str(cache))}\nlayer: {LAYER}\nvariant: standard\nsteps: 3\n"
        "batch_size: 32\neval_tokens: 160\ndiverge_min_ev: -.inf\nhparams: {d_sae: 32}\n",
    )
    out = tmp_path / "run"
    assert train.main(["--config", str(file), "--tokens", "64", "--out", str(out)]) == 0
    assert runs.read_json(out / runs.CONFIG)["steps"] == 2
    argv = ["--config", str(file), "--tokens", "64", "--steps", "2", "--out", str(tmp_path / "x")]
    assert train.main(argv) == 2
    assert "give --steps or --tokens, not both" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["lambda=1,1.0"], "--sweep lambda repeats a value: 1 and 1.0 are the same value;"),
        (["lambda=0.1, 0.10"], "--sweep lambda repeats a value: 0.1 and 0.10 are the same value"),
        (["seed=1,1"], "--sweep seed repeats a value: 1 is given twice; give each value once"),
        (["d_sae=64,6.4e1"], "--sweep d_sae repeats a value: 64 and 6.4e1"),
    ],
)
def test_sweep_values_equal_after_parsing_are_refused(items, message):
    with pytest.raises(ConfigError) as caught:
        parse_sweep(items)
    assert message in str(caught.value)


def test_sweep_values_of_other_types_are_distinct():
    assert parse_sweep(["dense=true,1"]) == {"dense": [True, 1]}


def test_duplicate_sweep_value_on_the_command_line_is_one_line(cache, tmp_path, capsys):
    out = tmp_path / "dup"
    assert train.main(args(cache, out, "--steps", "3", "--sweep", "lambda=1,1.0")) == 2
    assert "lambda repeats a value: 1 and 1.0" in one_error_line(capsys)
    assert not out.exists()
    missing = args(tmp_path / "missing", out, "--sweep", "lambda=1,1.0")  # before the cache
    assert train.main(missing) == 2
    assert "lambda repeats a value" in one_error_line(capsys)


def sweep_config(*items: str) -> TrainConfig:
    return TrainConfig(cache="c", layer=1, variant="standard", sweep=list(items))


def test_expand_keeps_the_recorded_order_for_the_same_members(tmp_path):
    first = expand(sweep_config("lambda=0.1,0.2", "seed=0,1"), tmp_path)
    record = {"members": [{"name": m.name, "swept": m.swept, "folder": m.name} for m in first]}
    runs.write_json(tmp_path / SWEEP_FILE, record)
    again = expand(sweep_config("seed=1,0", "lambda=0.2,0.1"), tmp_path)
    assert [m.name for m in again] == [m.name for m in first]
    assert [m.settings.out for m in again] == [m.settings.out for m in first]
    assert [m.settings.hparams["lambda"] for m in again] == [0.1, 0.1, 0.2, 0.2]
    with pytest.raises(ConfigError, match=r"holds a sweep over other values \(lambda=0.1,0.2"):
        expand(sweep_config("lambda=0.1,0.3", "seed=0,1"), tmp_path)


@pytest.mark.slow
def test_resume_of_a_sweep_with_its_values_in_another_order(cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    sets = ("d_sae=32", "warmup_steps=1")
    keep = "--diverge-min-ev=-inf"  # a run this short is judged on resuming, not on its quality
    assert (
        train.main(args(cache, out, "--steps", "12", keep, "--sweep", "lambda=0.1,0.2", sets=sets))
        == 0
    )
    finished = {name: load_file(out / name / runs.PARAMS) for name in ("lambda=0.1", "lambda=0.2")}
    # a kill after the checkpoint at step 10: resume it with the values the other way round
    for name in finished:
        (out / name / runs.PARAMS).unlink()
        runs.write_status(out / name, runs.RUNNING)
        shutil.rmtree(out / name / "checkpoints" / "12")
    capsys.readouterr()
    argv = args(
        cache, out, "--steps", "12", keep, "--sweep", "lambda=0.2,0.1", "--resume", sets=sets
    )
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "other values" not in err
    assert [m["name"] for m in runs.read_json(out / SWEEP_FILE)["members"]] == [
        "lambda=0.1",
        "lambda=0.2",
    ]
    for name, weights in finished.items():  # the same members in the same vmapped order
        resumed = load_file(out / name / runs.PARAMS)
        for key, value in weights.items():
            np.testing.assert_array_equal(resumed[key], value, err_msg=f"{name} {key}")


def test_sweep_report_marks_diverged_members(tmp_path):
    sweep = tmp_path / "runs" / "lam"
    members = []
    for i, lam in enumerate((0.01, 0.1, 1.0)):
        config = {"sweep": {"name": "lam", "member": f"m{i}", "swept": {"lambda": lam}}}
        members.append(fake_run(sweep, f"m{i}", variant="standard", l0=40.0 / (i + 1), **config))
    runs.write_status(members[2], runs.DIVERGED, reason="loss not finite at step 7")
    runs.write_status(members[0], runs.FINISHED)
    markdown = compare.write_sweep_report(sweep, members).read_text()
    header, *rows = table_lines(markdown)
    assert header[:3] == ["member", "diverged", "variant"]
    assert [row[:2] for row in rows] == [["m0", "-"], ["m1", "-"], ["m2", "yes"]]
    assert "1 of 3 members diverged" in markdown and "`m2`: loss not finite at step 7" in markdown
