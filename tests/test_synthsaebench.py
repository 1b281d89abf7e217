"""SynthSAEBench: the world build, and the JAX sampler against SAELens's own sampler.

The world (SynthSAEBench-16k's settings, shrunk to 1024 features x 64 dimensions and 8 trees)
is built with SAELens's config classes in the evaluation environment. Both samplers draw 65536
samples of it; their statistics (``synth.sampler_stats``) must agree, and a sampler with one
rule left out must not."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import train
from jax_sae.data.synthetic import WORLD_JSON, WORLD_TABLES, WorldError, draw, load_world
from synth.sampler_stats import CodeStats, correlated_pairs, differences

REPO = Path(__file__).resolve().parents[1]
EVAL_PYTHON = REPO / ".venv-eval" / "bin" / "python"
SAMPLES = 65536


def run_eval(*args: str) -> None:
    subprocess.run([str(EVAL_PYTHON), "-m", "synth.synthsaebench", *args], cwd=REPO, check=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    if not EVAL_PYTHON.exists():
        pytest.fail(".venv-eval is missing; `make setup-eval` builds it")
    out = tmp_path_factory.mktemp("synthsaebench") / "small"
    run_eval("--small", "--out", str(out))
    return out


@pytest.fixture(scope="module")
def saelens_stats(world) -> dict:
    file = world.parent / "saelens.npz"
    run_eval("--out", str(world), "--stats", str(file), "--samples", str(SAMPLES))
    return dict(np.load(file))


def jax_stats(world: Path, scale_children: bool = True, seed: int = 0) -> dict:
    loaded = load_world(world)
    tables = load_file(world / WORLD_TABLES)
    stats = CodeStats(
        correlated_pairs(tables["correlation_factor"], tables["parent"]),
        tables["parent"],
        tables["group_members"],
    )
    for index in range(SAMPLES // 8192):
        key = jax.random.fold_in(jax.random.key(seed), index)
        stats.add(np.asarray(draw(loaded.tables, key, 8192, scale_children, loaded.layout)[1]))
    return stats.arrays()


def test_the_build_is_deterministic_and_checksummed(world, tmp_path):
    again = tmp_path / "again"
    run_eval("--small", "--out", str(again))
    for name in (WORLD_TABLES, "world/synthetic_model.safetensors"):
        assert (world / name).read_bytes() == (again / name).read_bytes(), name
    record = json.loads((world / WORLD_JSON).read_text())
    digest = hashlib.sha256((world / WORLD_TABLES).read_bytes()).hexdigest()
    assert record["tables_sha256"] == digest and record["num_features"] == 1024
    damaged = bytearray((again / WORLD_TABLES).read_bytes())
    damaged[-1] ^= 1
    (again / WORLD_TABLES).write_bytes(bytes(damaged))
    with pytest.raises(WorldError, match="checksum mismatch"):
        load_world(again)


def test_the_jax_sampler_draws_saelens_distribution(world, saelens_stats):
    ours = jax_stats(world)
    assert not differences(saelens_stats, ours), differences(saelens_stats, ours)
    tables = load_file(world / WORLD_TABLES)
    rates = ours["fires"] / SAMPLES
    assert (tables["parent"] >= 0).sum() == 8 * 84 and rates.max() > 0.2  # 8 trees of 85
    assert ours["cofires"].sum() > 0 and ours["l0"][0] / SAMPLES > 3


def test_the_regular_layout_draws_the_same_numbers_as_the_general_path(world):
    """SynthSAEBench's complete breadth-first trees run on slices (``regular_layout``); the
    general path, for any hierarchy, gathers. Same key, same codes, bit for bit."""
    loaded = load_world(world)
    assert loaded.layout == ((0, 8, 40, 168), (8, 32, 128, 512), 4)
    key = jax.random.key(5)
    general = draw(loaded.tables, key, 2048, True, None)
    regular = draw(loaded.tables, key, 2048, True, loaded.layout)
    np.testing.assert_array_equal(np.asarray(general[1]), np.asarray(regular[1]))
    np.testing.assert_array_equal(np.asarray(general[0]), np.asarray(regular[0]))


def test_the_comparison_catches_a_sampler_that_skips_a_rule(world, saelens_stats):
    """Without the children's scaling by their parent only the spread of magnitudes changes
    (the factor has mean about 1): caught."""
    found = differences(saelens_stats, jax_stats(world, scale_children=False))
    assert any("mean squared magnitudes differ" in line for line in found), found
    tampered = dict(saelens_stats)
    tampered["violations"] = np.array([3, 0])
    assert any("breaks the hierarchy" in line for line in differences(tampered, saelens_stats))


def test_a_run_trains_on_the_world_drawn_on_the_device(world, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--cache", str(world), "--layer", "0", "--variant", "batchtopk", "--steps", "40",
            "--batch-size", "512", "--set", "d_sae=256", "--set", "k=8", "--eval-tokens", "2048",
            "--out", str(out)]  # fmt: skip
    assert train.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["cache_manifest_sha256"].startswith("world:")
    info = json.loads((out / "final_info.json").read_text())
    assert info  # the held-out evaluation ran on drawn rows
    assert train.main([*argv[:2], "--layer", "1", *argv[4:-1], str(tmp_path / "b")]) == 2
    assert "pass --layer 0" in capsys.readouterr().err


def test_a_cache_of_the_world_holds_its_draws_and_their_true_codes(world, tmp_path):
    """``make synth WORLD=synthsaebench-16k``: an ordinary cache drawn by the JAX sampler, whose
    held-out tail's true codes reconstruct its activations; the build is deterministic."""
    from jax_sae.data.cache import ActivationCache
    from synth.world_cache import write_world_cache

    first = write_world_cache(world, tmp_path / "a", 20000)
    again = write_world_cache(world, tmp_path / "b", 20000)
    shards = [json.loads((out / "manifest.json").read_text())["shards"] for out in (first, again)]
    assert shards[0] == shards[1]  # the same bytes: each shard's checksum
    truth = load_file(first / "ground_truth.safetensors")
    offset = int(truth["heldout_offset"][0])
    cache = ActivationCache(first)
    assert cache.complete and cache.n_tokens == 20000 and offset == 20000 - 16384
    rows = slice(offset, offset + 100)
    codes = np.zeros((100, 1024), np.float32)
    for row in range(100):
        lo, hi = truth["heldout_indptr"][row], truth["heldout_indptr"][row + 1]
        codes[row, truth["heldout_indices"][lo:hi]] = truth["heldout_values"][lo:hi]
    rebuilt = codes @ truth["feature_vectors"] + truth["bias"]
    np.testing.assert_allclose(cache.acts(0)[rows], rebuilt, rtol=2e-2, atol=3e-2)  # bf16
    assert (cache.tokens()[rows] == np.where(codes.max(1) > 0, codes.argmax(1) + 1, 0)).all()
    assert (first / "world" / "synthetic_model.safetensors").is_file()
