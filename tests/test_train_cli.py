"""train.py end to end on a small synthetic cache: outputs, resume bit for bit, bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import train
from jax_sae.data.cache import ActivationCache, CacheWriter
from jax_sae.data.loader import Loader
from jax_sae.training import TrainConfig
from jax_sae.training.config import parse_overrides
from jax_sae.training.resolve import make_loader, open_cache, resolve_run
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
    assert (out / "metrics.jsonl").read_text() == (reference_run / "metrics.jsonl").read_text()


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
