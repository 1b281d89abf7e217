"""Out of memory is named as such, before training where the size is predictable, and never
reported as a full disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import train
from jax_sae.data.cache import ActivationCache, CacheWriter
from jax_sae.model.variants import make_variant
from jax_sae.training import memory, trainer
from jax_sae.util.disk import is_disk_full, is_out_of_memory
from tests.helpers import poke_cache
from tests.test_train_cli import LAYER, REPO, args, one_error_line, write_cache

XLA_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 40000000000 bytes."
TENSORSTORE_FULL = "RESOURCE_EXHAUSTED: Error writing local file: No space left on device"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c")


def test_memory_and_disk_errors_are_told_apart():
    oom = RuntimeError(XLA_OOM)
    assert is_out_of_memory(oom) and not is_disk_full(oom)
    wrapped = ValueError("step failed")
    wrapped.__cause__ = oom
    assert is_out_of_memory(wrapped) and not is_disk_full(wrapped)
    assert is_out_of_memory(MemoryError())
    for full in (RuntimeError(TENSORSTORE_FULL), OSError(errno.ENOSPC, "No space left on device")):
        assert is_disk_full(full) and not is_out_of_memory(full)


def test_state_bytes_counts_parameters_and_adam_moments():
    d_in, d_sae = 16, 64
    params, state = memory.state_bytes(make_variant("standard", d_in=d_in, d_sae=d_sae), 100)
    expected_params = 4 * (2 * d_in * d_sae + d_sae + d_in)  # W_enc, W_dec, b_enc, b_dec
    assert params == expected_params
    assert state >= 3 * expected_params  # parameters and Adam's two moments, at the least


def test_step_bytes_splits_over_the_mesh():
    variant = make_variant("topk", d_in=32, d_sae=1024)
    one = memory.step_bytes([variant], 100, 256)
    assert memory.step_bytes([variant, variant], 100, 256) == 2 * one
    assert memory.step_bytes([variant], 100, 256, model=4) <= one // 4 + 1
    activations = memory.ACTIVATION_COPIES * 256 * 1024 * 4
    assert one >= activations
    assert memory.step_bytes([variant], 100, 256, data=2) < one


def test_host_memory_available_is_positive_and_bounded():
    free = memory.host_memory_available()
    assert free is not None and 0 < free < 1 << 50
    assert memory.device_memory_available(jax.local_devices()[0]) is not None


def test_a_dictionary_that_cannot_fit_is_refused_before_training(cache, tmp_path, capsys):
    out = tmp_path / "huge"
    sets = ("d_sae=2000000000", "warmup_steps=5", "lr=0.01", "lambda=0.003")
    assert train.main(args(cache, out, "--steps", "4", sets=sets)) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: out of memory on cpu: one training step needs at least")
    assert "lower d_sae or the batch size" in line and "--mesh model=N" in line
    assert "disk" not in line
    assert not (out / "checkpoints").exists()


def test_the_preflight_uses_the_free_memory_it_reads(cache, tmp_path, capsys, monkeypatch):
    """A run that fits the machine is refused when the device reports less free memory."""
    monkeypatch.setattr(memory, "host_memory_available", lambda: 1000)
    assert train.main(args(cache, tmp_path / "run", "--steps", "4")) == 2
    line = one_error_line(capsys)
    assert "out of memory on cpu" in line and "but 1.0 KB is free" in line


def test_an_allocation_failure_during_training_is_named_out_of_memory(
    cache, tmp_path, capsys, monkeypatch
):
    def exhausted(*_args, **_kwargs):
        raise RuntimeError(XLA_OOM)

    monkeypatch.setattr(trainer, "restore_or_init", exhausted)
    assert train.main(args(cache, tmp_path / "run", "--steps", "4")) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: out of memory on cpu") and "no space" not in line
    assert "--resume" in line


def _scaled_cache(path, scale: float):
    """The test cache's rows times ``scale``."""
    source = ActivationCache(write_cache(path.with_name(path.name + "_src")))
    writer = CacheWriter(
        path, layers=source.layers, d_model=source.d_model, dtype="bfloat16",
        settings={"ctx_len": 16}, metadata={"model": "tiny-test", "dataset": "scaled"},
    )  # fmt: skip
    rows = source.n_tokens
    acts = {layer: np.asarray(source.acts(layer)[:], np.float32) * scale for layer in source.layers}
    tokens, positions = source.tokens()[:], source.positions()[:]
    writer.write_shard(acts, tokens, positions, rows // 16)
    writer.finish()
    return path


def test_non_finite_held_out_metrics_fail_the_run(tmp_path, capsys):
    """One held-out row of magnitude 1e30 (valid bfloat16, checksum intact): training never sees
    it, the evaluation's squared norms overflow; the run must fail, not finish."""
    cache = write_cache(tmp_path / "cache")
    n_tokens = ActivationCache(cache).n_tokens
    for column in range(4):
        poke_cache(cache, f"L{LAYER}", n_tokens - 1, 1e30, column=column, keep_checksum=True)
    out = tmp_path / "run"
    assert train.main(args(cache, out, "--steps", "10")) == 2
    line = one_error_line(capsys)
    assert "held-out evaluation is not finite" in line and "explained_variance" in line
    assert json.loads((out / "status.json").read_text())["state"] == "diverged"


def test_all_zero_activations_are_refused_before_training(tmp_path, capsys):
    cache = _scaled_cache(tmp_path / "zero", 0.0)
    out = tmp_path / "run"
    assert train.main([*args(cache, out, "--steps", "4"), "--no-normalize"]) == 2
    line = one_error_line(capsys)
    assert "holds only zero activations" in line and "learning rate" not in line
    assert not (out / "checkpoints").exists()


def test_every_sweep_group_is_checked_before_any_trains(cache, tmp_path, capsys):
    """The d_sae=64 group would train first; the 2e9 group cannot fit: nothing may train."""
    out = tmp_path / "sweep"
    argv = [*args(cache, out, "--steps", "4"), "--sweep", "d_sae=64,2000000000"]
    assert train.main(argv) == 2
    assert "out of memory on cpu" in one_error_line(capsys)
    assert not list(out.rglob("sae_params.safetensors")) and not list(out.rglob("checkpoints"))


def test_a_group_the_mesh_cannot_split_is_refused_before_any_trains(cache, tmp_path):
    out = tmp_path / "sweep"
    argv = [*args(cache, out, "--steps", "4"), "--mesh", "model=2", "--sweep", "d_sae=64,65"]
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run(
        [sys.executable, "train.py", *argv], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "d_sae=65 is not divisible by the mesh's model size 2" in errors[0]
    assert not list(out.rglob("sae_params.safetensors")) and not list(out.rglob("checkpoints"))
