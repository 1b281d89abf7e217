"""train.py end to end on a small synthetic cache: outputs, resume bit for bit, bad input."""

import dataclasses
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import train
from jax_sae.data.cache import ActivationCache, CacheWriter
from jax_sae.data.loader import Loader
from jax_sae.report import runs
from jax_sae.training import TrainConfig
from jax_sae.training.config import parse_overrides
from jax_sae.training.engine import optimizer_for
from jax_sae.training.loop import per_second
from jax_sae.training.optim import make_optimizer
from jax_sae.training.resolve import make_loader, open_cache, resolve_run
from jax_sae.training.trainer import device_line
from tests.helpers import poke_cache

REPO = Path(__file__).resolve().parents[1]
D, LAYER = 16, 1
STEPS, CHECKPOINT_EVERY = 60, 10


def write_cache(path: Path) -> Path:
    """Sparse combinations of 32 directions plus noise and an offset, bf16 as in real caches."""
    rng = np.random.default_rng(0)
    writer = CacheWriter(
        path,
        layers=[LAYER, 2],
        d_model=D,
        dtype="bfloat16",
        settings={"ctx_len": 16},
        metadata={"model": "tiny-test", "dataset": "synthetic", "ctx_len": 16},
    )
    directions = rng.normal(size=(32, D))
    for _ in range(3):
        n = 40 * 16
        codes = rng.exponential(size=(n, 32)) * (rng.random((n, 32)) < 0.1)
        x = (codes @ directions + 0.05 * rng.normal(size=(n, D)) + 1.0).astype(np.float32)
        positions = np.tile(np.arange(1, 17), 40)
        writer.write_shard({LAYER: x, 2: x}, rng.integers(0, 500, n), positions, 40)
    writer.finish()
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("cache") / "c")


STANDARD_SETS = ("d_sae=64", "warmup_steps=5", "lr=0.01", "lambda=0.003")


def args(cache: Path, out: Path, *extra: str, variant="standard", sets=STANDARD_SETS) -> list[str]:
    argv = ["--cache", str(cache), "--layer", str(LAYER), "--variant", variant]
    for item in sets:
        argv += ["--set", item]
    argv += ["--batch-size", "32", "--eval-tokens", "160", "--log-every", "5"]
    argv += ["--checkpoint-every", str(CHECKPOINT_EVERY), "--normalize", "--out", str(out)]
    return argv + list(extra)


@pytest.fixture(scope="module")
def reference_run(cache, tmp_path_factory) -> Path:
    """One uninterrupted run that the other tests compare against."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert train.main(args(cache, out, "--steps", str(STEPS))) == 0
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_run_writes_outputs_and_learns(reference_run, cache):
    out = reference_run
    for name in ("config.json", "final_info.json", "metrics.jsonl", "sae_params.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "plots" / "training_curves.png").is_file()
    assert (out / "plots" / "firing_rate_hist.png").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, STEPS + 1, 5))
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]

    config = json.loads((out / "config.json").read_text())
    c = ActivationCache(cache)
    stats = c.layer_stats(LAYER)
    assert config["norm_scale"] == pytest.approx(np.sqrt(D / stats["mean_sq_norm"]))
    assert config["d_in"] == D and config["d_sae"] == 64 and config["layer"] == LAYER
    assert (
        config["hparams"]["lambda"] == 0.003 and config["hook_name"] == "blocks.1.hook_resid_post"
    )
    assert config["model_name"] == "tiny-test" and config["ctx_len"] == 16
    assert config["export_info"] == {"architecture": "standard"}
    assert set(config["versions"]) >= {"jax", "flax", "optax", "orbax-checkpoint"}

    weights = load_file(out / "sae_params.safetensors")
    assert {k: v.shape for k, v in weights.items()} == {
        "W_enc": (D, 64),
        "W_dec": (64, D),
        "b_enc": (64,),
        "b_dec": (D,),
    }
    assert all(v.dtype == np.float32 for v in weights.values())
    np.testing.assert_allclose(np.linalg.norm(weights["W_dec"], axis=1), 1, rtol=1e-5)

    info = json.loads((out / "final_info.json").read_text())
    entry = info[f"training results for layer {LAYER}"]
    assert set(entry["final_info"]) == {
        "training_steps",
        "final_loss",
        "layer",
        "dict_size",
        "learning_rate",
        "sparsity_penalty",
    }
    assert entry["final_info"]["training_steps"] == STEPS
    assert entry["final_info"]["sparsity_penalty"] == 0.003
    assert entry["config"]["config_hash"] == config["config_hash"]
    fast = entry["fast evaluation results"]
    assert fast["n_tokens"] >= 160 and 0.5 < fast["explained_variance_pooled"] <= 1
    assert 0 < fast["l0"] < 64 and 0 < fast["cossim"] <= 1


def test_resume_from_a_checkpoint_is_bit_for_bit(reference_run, cache, tmp_path, capsys):
    # the state a kill right after checkpoint 40 leaves: later checkpoints and outputs missing
    out = tmp_path / "resumed"
    shutil.copytree(reference_run, out)
    for step in (50, 60):
        shutil.rmtree(out / "checkpoints" / str(step))
    for name in ("sae_params.safetensors", "final_info.json", "plots"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [40]
    assert train.main(args(cache, out, "--steps", str(STEPS), "--resume")) == 0
    assert "resuming" in capsys.readouterr().err
    reference = load_file(reference_run / "sae_params.safetensors")
    resumed = load_file(out / "sae_params.safetensors")
    for key, value in reference.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    assert training_records(out) == training_records(reference_run)


def training_records(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock keys, which no resume can reproduce."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for record in records:
        assert all(record.pop(key) > 0 for key in runs.TIMING_KEYS)
    return records


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(reference_run, cache, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *args(cache, out, "--steps", str(STEPS))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoints" / str(CHECKPOINT_EVERY)).is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "sae_params.safetensors").exists(), "the run finished before the kill"
    assert train.main(args(cache, out, "--steps", str(STEPS), "--resume")) == 0
    reference = load_file(reference_run / "sae_params.safetensors")
    resumed = load_file(out / "sae_params.safetensors")
    for key, value in reference.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)


def test_resume_refuses_another_config_and_plain_rerun_refuses_to_overwrite(
    reference_run, cache, capsys
):
    before = (reference_run / "config.json").read_text()
    changed = args(cache, reference_run, "--steps", str(STEPS), "--resume", "--set", "lambda=0.1")
    assert train.main(changed) == 2
    assert "hparams.lambda" in one_error_line(capsys)
    assert train.main(args(cache, reference_run, "--steps", str(STEPS))) == 2
    assert "--resume" in one_error_line(capsys)
    assert (reference_run / "config.json").read_text() == before


def test_resume_of_a_folder_without_a_run_is_an_error_and_if_exists_starts_one(
    cache, tmp_path, capsys
):
    out = tmp_path / "typo"
    assert train.main(args(cache, out, "--steps", "10", "--resume")) == 2
    line = one_error_line(capsys)
    assert "holds no run to continue" in line and "--resume-if-exists" in line
    assert not out.exists()
    sweep = args(cache, tmp_path / "sweep", "--steps", "10", "--resume", "--sweep", "seed=0,1")
    assert train.main(sweep) == 2
    assert "holds no sweep to continue (no sweep.json)" in one_error_line(capsys)
    assert train.main(args(cache, out, "--steps", "10", "--resume-if-exists")) == 0
    weights = (out / "sae_params.safetensors").read_bytes()
    assert train.main(args(cache, out, "--steps", "20", "--resume-if-exists")) == 0
    assert json.loads((out / "config.json").read_text())["steps"] == 20  # extended, not restarted
    assert train.main(args(cache, out, "--steps", "20", "--resume")) == 0
    assert (out / "sae_params.safetensors").read_bytes() != weights


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    cache, tmp_path, capsys
):
    bad_cache = tmp_path / "nan_cache"
    shutil.copytree(cache, bad_cache)
    loader = Loader(ActivationCache(bad_cache), LAYER, batch_size=32, eval_tokens=160)
    # a training row first used at a step between two checkpoints
    row = next(
        r
        for r in loader.plan.batch_indices(23)
        if r < 640 and r not in loader.plan.batch_indices(0)
    )
    first_use = next(s for s in range(STEPS) if row in loader.plan.batch_indices(s))
    assert first_use + 1 > CHECKPOINT_EVERY
    # huge but finite, with a matching checksum: only the loss (x^2 overflows) can notice it
    poke_cache(bad_cache, f"L{LAYER}", row, 1e30, column=3, keep_checksum=True)
    out = tmp_path / "nan_run"
    code = train.main(args(bad_cache, out, "--steps", str(STEPS)))
    assert code == 2
    line = one_error_line(capsys)
    assert f"not finite at step {first_use + 1};" in line and "lower the learning rate" in line
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert kept and max(kept) <= first_use
    assert not (out / "sae_params.safetensors").exists()


def test_batchtopk_exports_its_threshold_next_to_the_weights(cache, tmp_path):
    out = tmp_path / "btk"
    sets = ("d_sae=64", "k=4", "warmup_steps=5")
    assert train.main(args(cache, out, "--tokens", "620", variant="batchtopk", sets=sets)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 20 and config["tokens"] == 640
    assert config["export_info"] == {
        "architecture": "jumprelu",
        "k": 4,
        "threshold": "sae_params.safetensors:threshold",
    }
    weights = load_file(out / "sae_params.safetensors")
    assert weights["threshold"].shape == (64,) and weights["threshold"].dtype == np.float32


@pytest.mark.slow
def test_temporal_run_on_the_extracted_tiny_model_cache(tiny_cache, tmp_path):
    """The real extractor's cache (sequence order, metadata) through the temporal variant."""
    out = tmp_path / "temporal"
    sets = ("d_sae=128", "warmup_steps=2")
    argv = ["--cache", str(tiny_cache), "--layer", "2", "--variant", "temporal", "--out", str(out)]
    argv += ["--set", sets[0], "--set", sets[1], "--steps", "15", "--batch-size", "128"]
    assert train.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    manifest = ActivationCache(tiny_cache).manifest
    assert config["model_name"] == manifest["model"] and config["ctx_len"] == 64
    assert config["prepend_bos"] == manifest["prepend_bos"]
    assert config["eval_tokens"] == ActivationCache(tiny_cache).n_tokens // 10
    entry = json.loads((out / "final_info.json").read_text())["training results for layer 2"]
    assert entry["final_info"]["sparsity_penalty"] == config["hparams"]["lambda_1"]
    assert np.isfinite(entry["final_info"]["final_loss"])
    assert entry["fast evaluation results"]["n_tokens"] >= config["eval_tokens"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--variant": "nope"}, "unknown variant 'nope'; valid variants: standard"),
        ({"--layer": "7"}, "layer 7 is not in cache"),
        ({"--set": "wat=1"}, "unknown hyper-parameter 'wat'"),
        ({"--set": "novalue"}, "is not KEY=VALUE"),
        ({"--cache": "missing"}, "does not exist"),
        ({"--batch-size": "0"}, "--batch-size must be > 0"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(cache, tmp_path, capsys, change, message):
    argv = args(cache, tmp_path / "bad", "--steps", "3")
    for flag, value in change.items():
        if flag == "--cache" and value == "missing":
            value = str(tmp_path / "missing")
        argv[argv.index(flag) + 1] = value
    assert train.main(argv) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        ("k=sixteen", ("hyper-parameter k must be", "got 'sixteen'")),
        ("warmup_steps=abc", ("hyper-parameter warmup_steps must be", "got 'abc'")),
        ("grad_clip_norm=abc", ("grad_clip_norm must be > 0 or None, got 'abc'; change it",)),
        ("d_sae=512.5", ("d_sae must be a positive integer, got 512.5; e.g. --set d_sae=4096",)),
        ("d_sae=abc", ("d_sae must be a positive integer, got 'abc'",)),
        ("kk=3", ("unknown hyper-parameter 'kk' for variant 'topk' (did you mean 'k'?); valid:",)),
        (
            "d_sea=64",
            ("unknown hyper-parameter 'd_sea' for variant 'topk' (did you mean 'd_sae'?)",),
        ),
    ],
)
def test_a_set_value_the_variant_cannot_take_is_one_error_line(
    cache, tmp_path, capsys, value, parts
):
    """Values of the wrong type used to end in a TypeError traceback (adaptive defaults compared
    them as numbers), d_sae=512.5 trained 512 latents, and a typo got no suggestion."""
    out = tmp_path / "bad"
    sets = ("d_sae=64", "k=4", value)
    assert train.main(args(cache, out, "--steps", "3", variant="topk", sets=sets)) == 2
    line = one_error_line(capsys)
    assert all(part in line for part in parts), line
    assert not (out / "config.json").exists()


def test_an_integral_float_d_sae_is_that_integer(cache, tmp_path):
    """As for every integer hyper-parameter: 128.0 (JSON) is 128."""
    base = TrainConfig(cache=str(cache), layer=LAYER, variant="standard", batch_size=32)
    loader = make_loader(base, open_cache(base))
    run = resolve_run(base.replace(hparams={"d_sae": 128.0}), loader, tmp_path)
    assert run.variant.d_sae == 128 and type(run.config.d_sae) is int


def test_corrupted_cache_is_refused(cache, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    shard = broken / "L1" / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert train.main(args(broken, tmp_path / "run", "--steps", "3")) == 2
    assert "shard_00001.npy" in one_error_line(capsys)


def test_set_values_are_json_when_possible():
    assert parse_overrides(["k=8", "lr=1e-3", "recon=l2norm", "on=true", "x=null"]) == {
        "k": 8,
        "lr": 1e-3,
        "recon": "l2norm",
        "on": True,
        "x": None,
    }


def test_dense_hparam_selects_the_dense_reference_path(cache, tmp_path):
    base = TrainConfig(
        cache=str(cache),
        layer=LAYER,
        variant="topk",
        hparams={"d_sae": 64, "k": 4},
        batch_size=32,
        eval_tokens=160,
    )
    loader = make_loader(base, open_cache(base))
    dense = resolve_run(base.replace(hparams={**base.hparams, "dense": True}), loader, tmp_path)
    assert dense.variant.hparams["dense"] is True and dense.config.hparams["dense"] is True
    assert resolve_run(base, loader, tmp_path).variant.hparams["dense"] is False


# ------------------------------------------------------------------ help and what a run prints

HELP_SECTIONS = ("data options", "model options", "optimisation options", "run options")
HELP_SECTIONS += ("scale options",)


def read_help(text: str) -> tuple[list[str], list[str]]:
    """--help's section headings, and its flags each with its help on one line; tyro draws the
    sections as boxes on a UTF-8 stream and as a title over dashes otherwise."""
    headings: list[str] = []
    entries: list[str] = []
    for line in text.splitlines():
        body = line.rstrip().rstrip("│").rstrip()
        if body.lstrip().startswith("│"):
            body = body.lstrip()[1:]
        inner = body.strip()
        if re.fullmatch(r"[a-z ]*options", inner.strip("╭╮─ ")):
            headings.append(inner.strip("╭╮─ "))
            entries.append("")  # nothing continues across a heading
        elif not headings or not inner or set(inner) <= set("╰╯─-"):
            continue  # the description above the sections, or a frame
        elif len(body) - len(body.lstrip()) <= 2:  # a flag; its help goes on indented
            entries.append(inner)
        elif entries and entries[-1]:
            entries[-1] += " " + inner
    return headings, [entry for entry in entries if entry]


def test_help_is_grouped_with_one_default_per_flag(monkeypatch, capsys):
    """It was 104 lines of `{None}|STR` with doubled defaults ("(default: --tokens /
    --batch-size) (default: None)") and references to internal names."""
    monkeypatch.setenv("COLUMNS", "80")
    assert train.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "{None}" not in text and "TrainConfig" not in text and "jax.sharding" not in text
    headings, entries = read_help(text)
    assert headings == ["options", *HELP_SECTIONS]
    assert len(text.splitlines()) <= 80, len(text.splitlines())
    for entry in entries:
        hints = entry.count("(default") + entry.count("(required)") + entry.count("(repeatable)")
        assert hints <= 1, entry
    flags = [entry.split()[0].rstrip(",") for entry in entries]
    expected = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)]
    expected = [flag for flag in expected if flag != "--hparams"]
    expected += ["--set", "--config", "--help-variant", "-h"]
    assert sorted(flags) == sorted(expected)  # every flag once, under its own name
    entry = {flag: e for flag, e in zip(flags, entries, strict=True)}
    assert entry["--steps"].endswith("(default: --tokens / --batch-size)")
    assert entry["--cache"].endswith("(required)") and "(default" not in entry["--cache"]
    assert entry["--batch-size"].endswith("(default: 2048)")


def test_a_config_file_value_is_the_default_help_shows(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    file = tmp_path / "run.yaml"
    file.write_text("layer: 3\nout: runs/x\n")
    assert train.main(["--config", str(file), "--help"]) == 0
    entry = {e.split()[0].rstrip(","): e for e in read_help(capsys.readouterr().out)[1]}
    assert entry["--layer"].endswith("(default: 3)") and entry["--out"].endswith(
        "(default: runs/x)"
    )


def test_every_flag_keeps_its_name_and_lands_in_the_config():
    argv = ["--cache", "c", "--layer", "2", "--variant", "topk", "--set", "k=8", "--sweep"]
    argv += ["seed=0,1", "--seed", "3", "--data-seed", "4", "--steps", "5", "--batch-size", "64"]
    argv += ["--out", "o", "--resume", "--resume-if-exists", "--no-normalize"]
    argv += ["--checkpoint-every", "7"]
    argv += ["--log-every", "2", "--eval-tokens", "100", "--allow-incomplete", "--mesh", "data=1"]
    argv += ["--diverge-loss-factor", "5", "--diverge-min-ev=-1", "--compute-dtype", "bfloat16"]
    argv += ["--stream", "x", "--disk-budget", "1G", "--stream-window", "2", "--tensorboard"]
    argv += ["--wandb", "p", "--help-variant", "topk"]
    command = train.parse_command(argv)
    assert command.set == ["k=8"] and command.help_variant == "topk"
    assert command.train == TrainConfig(
        cache="c", layer=2, variant="topk", sweep=["seed=0,1"], seed=3, data_seed=4, steps=5,
        batch_size=64, out="o", resume=True, resume_if_exists=True, normalize=False,
        checkpoint_every=7, log_every=2,
        eval_tokens=100, allow_incomplete=True, mesh="data=1", diverge_loss_factor=5.0,
        diverge_min_ev=-1.0, compute_dtype="bfloat16", stream="x", disk_budget="1G",
        stream_window=2, tensorboard=True, wandb="p",
    )  # fmt: skip


def test_a_run_prints_its_device_every_adapted_value_and_labelled_dead_fractions(
    cache, tmp_path, capsys
):
    """A new user saw `lr 0.0001` in the help while the run used a learning rate scaled with
    d_sae without a word, `dead` 0.076 in the bar and 0.102 at the end with no definition, and
    tokens/s as 9.21e+04."""
    out = tmp_path / "topk"
    sets = ("d_sae=64", "warmup_steps=2")  # k and lr: the adapted defaults
    assert train.main(args(cache, out, "--steps", "10", variant="topk", sets=sets)) == 0
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").splitlines()
    device = [line for line in lines if line.startswith("training on ")]
    assert len(device) == 1 and device[0].startswith("training on cpu (")
    notes = [line for line in lines if line.startswith("default adapted: ")]
    assert "default adapted: k 2: reference 320 x d_in 16 / 2304" in notes
    (lr_note,) = [note for note in notes if note.startswith("default adapted: lr ")]
    lr = json.loads((out / "config.json").read_text())["hparams"]["lr"]
    assert lr_note.startswith(f"default adapted: lr {lr:.4g}: 2e-4 / sqrt(d_sae / 2^14)")
    assert len(notes) == len(set(notes))  # each once
    assert re.search(r"dead\(train\)=\d\.\d{3}, \d+(\.\d)?[kMG]? tok/s", err), err
    assert "e+0" not in err
    (done,) = [line for line in lines if line.startswith("done: ")]
    assert re.search(r"dead \(held-out\) \d\.\d{3}", done) and " dead 0" not in done


def test_tokens_per_second_reads_like_a_person_would_say_it():
    assert [per_second(r) for r in (7, 850, 9210, 92100, 97340, 1.23e6)] == [
        "7.0", "850", "9.2k", "92k", "97k", "1.2M"
    ]  # fmt: skip


def test_the_device_line_names_the_devices_a_run_uses():
    devices = jax.devices()
    line = device_line(None)
    if devices[0].platform == "cpu":
        assert line == (
            "training on cpu (1 device)"
            if len(devices) == 1
            else f"training on cpu (1 of {len(devices)} devices)"
        )
    else:
        assert line.startswith("training on 1") and devices[0].device_kind in line


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("adam_b1=1.0", "adam_b1 must be in [0, 1), got 1.0; change it with --set"),
        ("adam_b2=-0.1", "adam_b2 must be in [0, 1), got -0.1"),
        ("adam_eps=0", "adam_eps must be > 0, got 0.0"),
    ],
)
def test_adam_settings_that_cannot_train_are_one_error_line(
    cache, tmp_path, capsys, value, message
):
    out = tmp_path / "bad"
    assert train.main(args(cache, out, "--steps", "3", sets=(*STANDARD_SETS, value))) == 2
    assert message in one_error_line(capsys)


def test_adam_settings_reach_the_optimizer(cache, tmp_path):
    base = TrainConfig(cache=str(cache), layer=LAYER, variant="standard", batch_size=32)
    loader = make_loader(base, open_cache(base))
    run = resolve_run(base.replace(hparams={"adam_b2": 0.5, "adam_eps": 0.1}), loader, tmp_path)
    hp = run.variant.hparams
    assert (hp["adam_b1"], hp["adam_b2"], hp["adam_eps"]) == (0.9, 0.5, 0.1)
    assert run.config.hparams["adam_eps"] == 0.1
    default = resolve_run(base, loader, tmp_path).variant.hparams
    assert (default["adam_b1"], default["adam_b2"], default["adam_eps"]) == (0.9, 0.999, 1e-8)
    params = {"b_enc": jnp.zeros(3)}
    grads = {"b_enc": jnp.asarray([1e-3, 1.0, -2.0])}
    got, _ = optimizer_for(hp, 10).update(grads, optimizer_for(hp, 10).init(params), params)
    want_opt = make_optimizer(
        lr=hp["lr"], warmup_steps=hp["warmup_steps"], total_steps=10, b2=0.5, eps=0.1
    )
    want, _ = want_opt.update(grads, want_opt.init(params), params)
    np.testing.assert_allclose(got["b_enc"], want["b_enc"], rtol=1e-6)
    plain_opt = make_optimizer(lr=hp["lr"], warmup_steps=hp["warmup_steps"], total_steps=10)
    plain, _ = plain_opt.update(grads, plain_opt.init(params), params)
    assert not np.allclose(got["b_enc"], plain["b_enc"])
