"""The activation-cache format: writer/reader agreement, validation and crash safety."""

import json

import ml_dtypes
import numpy as np
import pytest

from jax_sae.data.cache import MANIFEST, ActivationCache, CacheError, CacheWriter

D = 8
LAYERS = [1, 3]


def _shard(rng, lengths):
    """Random activations for whole sequences of the given lengths (BOS dropped: positions 1..)."""
    n = sum(lengths)
    acts = {layer: rng.normal(size=(n, D)).astype(np.float32) for layer in LAYERS}
    tokens = rng.integers(0, 100, n).astype(np.int32)
    positions = np.concatenate([np.arange(1, m + 1) for m in lengths]).astype(np.int32)
    return acts, tokens, positions


def _write(path, shards, dtype="float32", resume=False, settings=None):
    writer = CacheWriter(
        path,
        layers=LAYERS,
        d_model=D,
        dtype=dtype,
        settings=settings or {"ctx_len": 16},
        metadata={"model": "test"},
        resume=resume,
    )
    for acts, tokens, positions, n_seq in shards:
        writer.write_shard(acts, tokens, positions, n_seq)
    return writer


@pytest.fixture
def shards():
    rng = np.random.default_rng(0)
    return [(*_shard(rng, lengths), len(lengths)) for lengths in ([5, 7], [3], [6, 2, 4])]


def test_reader_returns_what_was_written_across_shards(tmp_path, shards):
    _write(tmp_path / "c", shards).finish()
    cache = ActivationCache(tmp_path / "c", verify=True)
    assert cache.layers == LAYERS and cache.d_model == D and cache.complete
    assert cache.shard_sizes == [12, 3, 12] and cache.n_tokens == 27
    for layer in LAYERS:
        expected = np.concatenate([s[0][layer] for s in shards])
        np.testing.assert_array_equal(cache.acts(layer)[:], expected)
        np.testing.assert_array_equal(cache.acts(layer)[10:16], expected[10:16])
        index = np.array([26, 0, 13, 11, 12])
        np.testing.assert_array_equal(cache.acts(layer)[index], expected[index])
    np.testing.assert_array_equal(cache.tokens()[:], np.concatenate([s[1] for s in shards]))
    assert cache.manifest["n_sequences"] == 6


def test_sequence_starts_follow_positions(tmp_path, shards):
    _write(tmp_path / "c", shards)
    starts = ActivationCache(tmp_path / "c").sequence_starts()
    np.testing.assert_array_equal(np.flatnonzero(starts), [0, 5, 12, 15, 21, 23])


def test_layer_stats_match_numpy(tmp_path, shards):
    _write(tmp_path / "c", shards, dtype="bfloat16")
    cache = ActivationCache(tmp_path / "c")
    for layer in LAYERS:
        stored = np.concatenate([s[0][layer] for s in shards])
        stored = stored.astype(ml_dtypes.bfloat16).astype(np.float64)
        stats = cache.layer_stats(layer)
        np.testing.assert_allclose(stats["mean"], stored.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats["mean_sq_norm"], (stored**2).sum(1).mean(), rtol=1e-6)
        np.testing.assert_array_equal(cache.acts(layer)[:], stored.astype(np.float32))


def test_existing_cache_is_never_overwritten_without_resume(tmp_path, shards):
    _write(tmp_path / "c", shards[:1])
    with pytest.raises(CacheError, match="--resume"):
        _write(tmp_path / "c", shards[1:])
    assert ActivationCache(tmp_path / "c").n_tokens == 12


def test_resume_refuses_other_settings(tmp_path, shards):
    _write(tmp_path / "c", shards[:1])
    with pytest.raises(CacheError, match="settings differ \\(ctx_len\\)"):
        _write(tmp_path / "c", shards[1:], resume=True, settings={"ctx_len": 32})


def test_resume_drops_files_of_an_unlisted_shard(tmp_path, shards):
    """A kill after writing shard files but before listing them leaves orphans."""
    _write(tmp_path / "c", shards[:1])
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    _write(tmp_path / "c", shards[1:2], resume=True)
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(manifest))  # as if killed before listing
    (tmp_path / "c" / "L1" / "shard_00002.npy.tmp").write_bytes(b"half")
    writer = _write(tmp_path / "c", shards[1:], resume=True)
    assert writer.n_shards == 3 and writer.n_tokens == 27
    assert not list((tmp_path / "c").glob("*/*.tmp"))
    cache = ActivationCache(tmp_path / "c", verify=True)
    np.testing.assert_array_equal(cache.acts(3)[:], np.concatenate([s[0][3] for s in shards]))


@pytest.mark.parametrize(
    "damage, verify, message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-40]), False, "truncated"),
        (lambda f: f.unlink(), False, "missing shard"),
        (lambda f: f.write_bytes(f.read_bytes()[:-4] + b"\x00\x01\x02\x03"), True, "checksum"),
    ],
)
def test_damaged_shards_are_reported(tmp_path, shards, damage, verify, message):
    _write(tmp_path / "c", shards)
    damage(tmp_path / "c" / "L3" / "shard_00001.npy")
    with pytest.raises(CacheError, match=message):
        ActivationCache(tmp_path / "c", verify=verify)


def test_missing_and_unknown_things_are_reported(tmp_path, shards):
    with pytest.raises(CacheError, match="does not exist"):
        ActivationCache(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="no manifest.json"):
        ActivationCache(tmp_path / "empty")
    _write(tmp_path / "c", shards)
    with pytest.raises(CacheError, match=r"layer 2 is not in cache .* \[1, 3\]"):
        ActivationCache(tmp_path / "c").acts(2)
    with pytest.raises(CacheError, match="NaN"):
        acts, tokens, positions, n_seq = shards[0]
        acts = {k: v.copy() for k, v in acts.items()}
        acts[1][3, 2] = np.nan
        _write(tmp_path / "c2", [(acts, tokens, positions, n_seq)])
